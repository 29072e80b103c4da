/** The protocol's JSON Schemas, loaded into ajv (draft 2020-12, with formats). */
import { readdirSync, readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

import type { AnySchemaObject, ValidateFunction } from "ajv";
import type { Ajv2020 as Ajv2020Class } from "ajv/dist/2020.js";

const require = createRequire(import.meta.url);
const Ajv2020 = (require("ajv/dist/2020.js") as { Ajv2020: typeof Ajv2020Class }).Ajv2020;
const addFormats = require("ajv-formats") as (ajv: Ajv2020Class) => Ajv2020Class;

const here = dirname(fileURLToPath(import.meta.url));

/** contracts/jsonschema/party_sync, found from the compiled test's or the source's directory. */
function schemaDir(): string {
  for (let dir = here; dir !== dirname(dir); dir = dirname(dir)) {
    const candidate = join(dir, "contracts/jsonschema/party_sync");
    try {
      readdirSync(candidate);
      return candidate;
    } catch {
      // keep climbing
    }
  }
  throw new Error(`contracts/jsonschema/party_sync not found above ${here}`);
}

export const SCHEMA_DIR = resolve(schemaDir());

export const schemas: Record<string, AnySchemaObject> = Object.fromEntries(
  readdirSync(SCHEMA_DIR)
    .filter((f) => f.endsWith(".json"))
    .sort()
    .map((f) => [f, JSON.parse(readFileSync(join(SCHEMA_DIR, f), "utf8")) as AnySchemaObject]),
);

const ajv = new Ajv2020({ allErrors: true, strict: false });
addFormats(ajv);
for (const schema of Object.values(schemas)) ajv.addSchema(schema);

const ID = "https://schemas.rpg-bot.dev/party_sync/v1/";

export function validator(file: string): ValidateFunction {
  const validate = ajv.getSchema(ID + file);
  if (validate === undefined) throw new Error(`no schema ${file}`);
  return validate;
}

/** Validate a whole message against its type's schema; returns the errors (empty if valid). */
export function validateMessage(message: Record<string, unknown>): string[] {
  const type = message["type"];
  if (typeof type !== "string" || schemas[`${type}.json`] === undefined) {
    return [`unknown type ${String(type)}`];
  }
  const validate = validator(`${type}.json`);
  return validate(message) ? [] : (validate.errors ?? []).map((e) => `${e.instancePath} ${e.message}`);
}

export function validateDef(def: string, value: unknown): string[] {
  const validate = ajv.getSchema(`${ID}common.json#/$defs/${def}`);
  if (validate === undefined) throw new Error(`no def ${def}`);
  return validate(value) ? [] : (validate.errors ?? []).map((e) => `${e.instancePath} ${e.message}`);
}
