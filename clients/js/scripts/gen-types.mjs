#!/usr/bin/env node
// Generates src/types.ts (and test/schema-examples.ts) from the protocol's JSON Schemas in
// contracts/jsonschema/party_sync/, the single source of truth of the party_sync protocol.
//
//   node scripts/gen-types.mjs          write both files
//   node scripts/gen-types.mjs --check  fail (exit 1) if either file is not what the schemas give
//
// It handles exactly the JSON Schema subset the contracts use: type, properties, required,
// additionalProperties, const, enum, $ref (to common.json#/$defs/... and envelope.json), items,
// anyOf, allOf (the envelope), false (a forbidden field) and if/then/else, which becomes a union of
// two variants (if ∧ then, ¬if ∧ else; ¬if is expressed with Exclude<> on the if's const/enum
// properties and as an absent field for an if that only requires one). Anything else fails loudly,
// so a schema change the generator does not understand cannot silently produce a wrong type.
import { readFileSync, readdirSync, writeFileSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const root = resolve(here, "..");
const schemaDir = resolve(root, "../../contracts/jsonschema/party_sync");
const outTypes = join(root, "src/types.ts");
const outExamples = join(root, "test/schema-examples.ts");

const KNOWN_KEYWORDS = new Set([
  "$schema", "$id", "$defs", "title", "description", "examples", "type", "properties", "required",
  "additionalProperties", "const", "enum", "$ref", "items", "anyOf", "allOf", "if", "then", "else",
  "pattern", "minLength", "maxLength", "minimum", "maximum", "exclusiveMinimum", "minItems",
  "maxItems", "format", "propertyNames", "__exclude",
]);

const files = readdirSync(schemaDir).filter((f) => f.endsWith(".json")).sort();
const schemas = Object.fromEntries(
  files.map((f) => [f, JSON.parse(readFileSync(join(schemaDir, f), "utf8"))]),
);
const common = schemas["common.json"];
const envelope = schemas["envelope.json"];
if (!common || !envelope) throw new Error(`common.json and envelope.json expected in ${schemaDir}`);

const pascal = (s) =>
  s.split(/[._-]/).map((p) => p.charAt(0).toUpperCase() + p.slice(1)).join("");
const defName = (name) => pascal(name);
const messageName = (type) => `${pascal(type)}Message`;

function refName(ref) {
  const m = /^(?:common\.json)?#\/\$defs\/([a-z_]+)$/.exec(ref);
  if (!m) throw new Error(`unsupported $ref ${ref}`);
  if (!common.$defs[m[1]]) throw new Error(`dangling $ref ${ref}`);
  return defName(m[1]);
}

function checkKeywords(schema, where) {
  if (typeof schema !== "object" || schema === null) return;
  for (const key of Object.keys(schema)) {
    if (!KNOWN_KEYWORDS.has(key)) throw new Error(`${where}: unsupported keyword ${key}`);
  }
}

// Deep merge of two object schemas (allOf / if-then-else): properties merged recursively,
// required united, `false` wins, the later schema's scalars win.
function merge(a, b) {
  if (a === false || b === false) return false;
  if (a === undefined || a === true) return b;
  if (b === undefined || b === true) return a;
  const out = { ...a };
  for (const [key, value] of Object.entries(b)) {
    if (key === "properties") {
      const props = { ...(a.properties ?? {}) };
      for (const [name, sub] of Object.entries(value)) props[name] = merge(props[name], sub);
      out.properties = props;
    } else if (key === "required") {
      out.required = [...new Set([...(a.required ?? []), ...value])];
    } else if (key === "description" || key === "title") {
      if (!(key in a)) out[key] = value;
    } else {
      out[key] = value;
    }
  }
  return out;
}

// ¬if, as far as TypeScript can say it: const/enum properties become Exclude<>, a bare
// `required: [x]` (without properties) becomes "x is absent".
function negate(cond) {
  const out = { properties: {} };
  for (const [name, sub] of Object.entries(cond.properties ?? {})) {
    const values = "const" in sub ? [sub.const] : sub.enum;
    if (!values) throw new Error(`cannot negate if-condition on ${name}`);
    out.properties[name] = { __exclude: values };
  }
  for (const name of cond.required ?? []) {
    if (!(name in (cond.properties ?? {}))) out.properties[name] = false;
  }
  return out;
}

function literal(value) {
  return JSON.stringify(value);
}

function doc(text, pad) {
  if (!text) return "";
  const clean = text.replace(/\*\//g, "* /");
  return `${pad}/** ${clean} */\n`;
}

function isPlainObjectSchema(schema) {
  return schema.type === "object" || "properties" in schema || "additionalProperties" in schema;
}

function withoutConditional(schema) {
  const { if: _if, then: _then, else: _else, ...rest } = schema;
  return rest;
}

function tsType(schema, pad, where) {
  if (schema === true || schema === undefined) return "unknown";
  if (schema === false) return "never";
  checkKeywords(schema, where);
  if ("if" in schema) {
    const base = withoutConditional(schema);
    const yes = merge(merge(base, schema.if), schema.then ?? {});
    const no = merge(merge(base, negate(schema.if)), schema.else ?? {});
    return `(\n${pad}  | ${tsType(yes, pad + "    ", where)}\n${pad}  | ${tsType(no, pad + "    ", where)}\n${pad})`;
  }
  let type;
  if ("const" in schema) type = literal(schema.const);
  else if (schema.enum) type = schema.enum.map(literal).join(" | ");
  else if (schema.$ref) type = refName(schema.$ref);
  else if (schema.anyOf) type = schema.anyOf.map((s) => tsType(s, pad, where)).join(" | ");
  else if (Array.isArray(schema.type)) {
    type = schema.type.map((t) => tsType({ type: t }, pad, where)).join(" | ");
  } else if (isPlainObjectSchema(schema)) type = objectType(schema, pad, where);
  else if (schema.type === "array") {
    const item = tsType(schema.items, pad, where);
    type = /[|&]/.test(item) ? `Array<${item}>` : `${item}[]`;
  } else if (schema.type === "string") type = "string";
  else if (schema.type === "integer" || schema.type === "number") type = "number";
  else if (schema.type === "boolean") type = "boolean";
  else if (schema.type === "null") type = "null";
  else if (schema.__exclude) type = "unknown";
  else throw new Error(`${where}: cannot type ${JSON.stringify(schema).slice(0, 200)}`);
  if (schema.__exclude) return `Exclude<${type}, ${schema.__exclude.map(literal).join(" | ")}>`;
  return type;
}

function objectType(schema, pad, where) {
  const props = schema.properties ?? {};
  const required = new Set(schema.required ?? []);
  const lines = [];
  for (const [name, sub] of Object.entries(props)) {
    const key = /^[A-Za-z_$][A-Za-z0-9_$]*$/.test(name) ? name : literal(name);
    if (sub === false) {
      lines.push(`${pad}  ${key}?: never;`);
      continue;
    }
    const optional = required.has(name) ? "" : "?";
    lines.push(
      `${doc(sub.description, pad + "  ")}${pad}  ${key}${optional}: ${tsType(sub, pad + "  ", `${where}.${name}`)};`,
    );
  }
  for (const name of required) {
    if (!(name in props)) lines.push(`${pad}  ${name}: unknown;`);
  }
  const extra = schema.additionalProperties;
  if (extra === undefined || extra === true) {
    lines.push(`${pad}  [key: string]: unknown;`);
  } else if (extra !== false) {
    lines.push(`${pad}  [key: string]: ${tsType(extra, pad + "  ", `${where}[*]`)};`);
  }
  if (lines.length === 0) return "Record<string, never>";
  return `{\n${lines.join("\n")}\n${pad}}`;
}

// --- the message types -----------------------------------------------------------------------

function messageSchema(file) {
  const schema = schemas[file];
  const { allOf, ...rest } = schema;
  if (!allOf || allOf.length !== 1 || allOf[0].$ref !== "envelope.json") {
    throw new Error(`${file}: expected allOf: [{$ref: envelope.json}]`);
  }
  const { examples: _e, $id: _i, $schema: _s, title: _t, ...env } = envelope;
  const { examples: _e2, $id: _i2, $schema: _s2, ...own } = rest;
  return merge(env, own);
}

const messageFiles = files.filter((f) => f !== "common.json" && f !== "envelope.json");
const messages = messageFiles.map((file) => {
  const schema = messageSchema(file);
  const type = schema.properties.type.const;
  if (`${type}.json` !== file) throw new Error(`${file}: type const ${type} does not match`);
  const required = new Set(schema.required ?? []);
  const ifRequiresSeq = (schema.if?.required ?? []).includes("seq");
  // A message without seq goes one way or the other: its description says which ("Server →
  // client, no seq, to every member …" for the transient party messages; "Client → server" for
  // a request, system.ping included).
  const direction = /^(Server|Client) → (server|client)/.exec(schemas[file].description ?? "");
  const fromServer = direction !== null && direction[1] === "Server";
  const system = type.startsWith("system.") && (direction === null || fromServer);
  const noSeq = schema.properties.seq === false;
  if (!system && noSeq && direction === null) {
    throw new Error(`${file}: a message without seq must say "Server → client" or "Client → server"`);
  }
  const transient = !system && noSeq && fromServer;
  const event = !system && (required.has("seq") || ifRequiresSeq);
  const client = !system && !transient && (noSeq || ifRequiresSeq);
  return { file, type, schema, system, transient, event, client, raw: schemas[file] };
});

function header() {
  return [
    "// GENERATED by scripts/gen-types.mjs from contracts/jsonschema/party_sync/*.json.",
    "// Do not edit by hand: change the schemas, then run `npm run gen` (the tests fail if this",
    "// file is stale).",
    "/* eslint-disable */",
    "",
  ];
}

function generateTypes() {
  const out = header();
  out.push(`/** ${common.description.replace(/\*\//g, "* /")} */`, "");
  for (const [name, def] of Object.entries(common.$defs)) {
    out.push(doc(def.description, "").trimEnd());
    out.push(`export type ${defName(name)} = ${tsType(def, "", `common.${name}`)};`, "");
  }
  for (const m of messages) {
    const title = m.raw.title ?? m.type;
    out.push(`/** ${title}: ${(m.raw.description ?? "").replace(/\*\//g, "* /")} */`);
    out.push(`export type ${messageName(m.type)} = ${tsType(m.schema, "", m.type)};`);
    out.push(`/** The payload of ${m.type}. */`);
    out.push(`export type ${pascal(m.type)}Payload = ${messageName(m.type)}["payload"];`, "");
  }
  const both = messages.filter((m) => m.event && m.client);
  for (const m of both) {
    const name = messageName(m.type);
    const base = pascal(m.type);
    out.push(`/** ${m.type} as a server → client party event (with seq). */`);
    out.push(`export type ${base}Event = Extract<${name}, { seq: number }>;`);
    out.push(`/** ${m.type} as a client → server request (no seq). */`);
    out.push(`export type ${base}Request = Exclude<${name}, { seq: number }>;`, "");
  }
  const eventName = (m) => (m.client ? `${pascal(m.type)}Event` : messageName(m.type));
  const requestName = (m) => (m.event ? `${pascal(m.type)}Request` : messageName(m.type));
  const events = messages.filter((m) => m.event);
  const system = messages.filter((m) => m.system);
  const transient = messages.filter((m) => m.transient);
  const clients = messages.filter((m) => m.client);
  const list = (ms) => ms.map((m) => `  ${literal(m.type)},`).join("\n");
  out.push(
    "/** Every server → client party event type (they carry seq). */",
    `export const PARTY_EVENT_TYPES = [\n${list(events)}\n] as const;`,
    "/** Server → client messages without seq, sent to one connection. */",
    `export const SYSTEM_TYPES = [\n${list(system)}\n] as const;`,
    "/**",
    " * Server → client messages without seq to every member of a party: not part of the sequenced",
    " * history and never replayed (system.hello restates what they tell).",
    " */",
    `export const TRANSIENT_TYPES = [\n${list(transient)}\n] as const;`,
    "/** Client → server message types. */",
    `export const CLIENT_TYPES = [\n${list(clients)}\n] as const;`,
    "export type PartyEventType = (typeof PARTY_EVENT_TYPES)[number];",
    "export type SystemType = (typeof SYSTEM_TYPES)[number];",
    "export type TransientType = (typeof TRANSIENT_TYPES)[number];",
    "export type ClientType = (typeof CLIENT_TYPES)[number];",
    "",
    "/** The party event type → its message. */",
    `export interface PartyEventMap {\n${events.map((m) => `  ${literal(m.type)}: ${eventName(m)};`).join("\n")}\n}`,
    "/** Any server → client party event (with seq). */",
    `export type PartyEvent = PartyEventMap[PartyEventType];`,
    "/** The transient message type → its message. */",
    `export interface TransientMessageMap {\n${transient.map((m) => `  ${literal(m.type)}: ${messageName(m.type)};`).join("\n")}\n}`,
    "/** Any transient server → client message (no seq, to every member). */",
    "export type TransientMessage = TransientMessageMap[TransientType];",
    "/** Any server → client message. */",
    `export type ServerMessage = ${[...system.map((m) => messageName(m.type)), "TransientMessage", "PartyEvent"].join(" | ")};`,
    "/** Any client → server message. */",
    `export type ClientMessage = ${clients.map(requestName).join(" | ")};`,
    "",
  );
  const codes = common.$defs.error_code.enum;
  const errorIf = schemas["system.error.json"].properties.payload.if.properties.code.enum;
  out.push(
    "/** Every error code of system.error. */",
    `export const ERROR_CODES = [\n${codes.map((c) => `  ${literal(c)},`).join("\n")}\n] as const;`,
    "/** The codes whose retryable flag is true (the same message may succeed later). */",
    `export const RETRYABLE_ERROR_CODES = [\n${errorIf.map((c) => `  ${literal(c)},`).join("\n")}\n] as const;`,
    "",
  );
  return out.join("\n");
}

function generateExamples() {
  const out = header();
  out.push(
    "// Every example of every schema, typed with the generated types: `tsc` fails if an example",
    "// does not fit its type, so the types and the schemas cannot drift apart unnoticed.",
    'import type * as T from "../src/types.js";',
    "",
  );
  const json = (value) => JSON.stringify(value, null, 2);
  out.push(`export const memberExamples = ${json(common.examples)} satisfies T.Member[];`, "");
  out.push(
    `export const envelopeExamples = ${json(envelope.examples)} satisfies Array<T.ServerMessage | T.ClientMessage>;`,
    "",
  );
  out.push("export const messageExamples = {");
  for (const m of messages) {
    const body = JSON.stringify(m.raw.examples ?? [], null, 2).replace(/\n/g, "\n  ");
    out.push(`  ${literal(m.type)}: ${body} satisfies T.${messageName(m.type)}[],`);
  }
  out.push("};", "");
  return out.join("\n");
}

const outputs = [
  [outTypes, generateTypes()],
  [outExamples, generateExamples()],
];
if (process.argv.includes("--check")) {
  let stale = false;
  for (const [path, text] of outputs) {
    let current = "";
    try {
      current = readFileSync(path, "utf8");
    } catch {
      current = "";
    }
    if (current !== text) {
      console.error(`${path} is stale: run \`npm run gen\` (the schemas changed)`);
      stale = true;
    }
  }
  process.exit(stale ? 1 : 0);
} else {
  for (const [path, text] of outputs) writeFileSync(path, text);
  console.log(`wrote ${outputs.map(([p]) => p.slice(root.length + 1)).join(", ")}`);
}
