/**
 * The npm package as it would be published: `npm pack --dry-run` lists the tarball (the library's
 * ES modules, declarations, source maps and their sources, the one-file bundle, README, LICENSE;
 * no tests, no demo page, no node_modules), its metadata is publishable (a licence consistent
 * with the Python packages), and the bundle is one self-contained ES module with the library's
 * exports. Runs after `npm run build` (the `pretest` script).
 */
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { existsSync, readFileSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { describe, it } from "node:test";
import { fileURLToPath, pathToFileURL } from "node:url";

// dist/test/test/package.test.js → clients/js
const root = resolve(dirname(fileURLToPath(import.meta.url)), "..", "..", "..");
const repo = resolve(root, "..", "..");
const BUNDLE = "dist/bundle/party-sync-client.js";

interface PackFile {
  path: string;
  size: number;
}

function packedFiles(): string[] {
  // --ignore-scripts: the build is done (pretest); prepack would only build it again.
  const out = execFileSync("npm", ["pack", "--dry-run", "--json", "--ignore-scripts"], {
    cwd: root,
    encoding: "utf8",
    stdio: ["ignore", "pipe", "pipe"],
  });
  const [report] = JSON.parse(out) as [{ files: PackFile[] }];
  return report.files.map((f) => f.path).sort();
}

function pyprojectField(path: string, field: string): string | undefined {
  const text = readFileSync(join(repo, path), "utf8");
  return new RegExp(`^${field} = "([^"]*)"`, "m").exec(text)?.[1];
}

describe("the npm package", () => {
  const pkg = JSON.parse(readFileSync(join(root, "package.json"), "utf8")) as Record<
    string,
    unknown
  >;

  it("holds the library, its declarations, source maps, the bundle, README and LICENSE only", () => {
    const files = packedFiles();
    for (const required of [
      "package.json",
      "README.md",
      "LICENSE",
      "dist/index.js",
      "dist/index.js.map",
      "dist/index.d.ts",
      "dist/index.d.ts.map",
      "dist/client.js",
      "dist/client.js.map",
      "dist/client.d.ts",
      "src/index.ts",
      "src/client.ts",
      BUNDLE,
      `${BUNDLE}.map`,
    ]) {
      assert.ok(files.includes(required), `${required} is missing from the tarball`);
    }
    const stray = files.filter(
      (f) =>
        f.startsWith("test/") ||
        f.startsWith("dist/test/") ||
        f.startsWith("dist/demo/") ||
        f.startsWith("demo/") ||
        f.includes("node_modules/") ||
        f.startsWith("scripts/") ||
        f.startsWith("tsconfig") ||
        f.endsWith(".built"),
    );
    assert.deepEqual(stray, [], "the tarball holds files a user does not need");
    // Every module has its map and its declaration.
    for (const js of files.filter((f) => /^dist\/[^/]+\.js$/.test(f))) {
      assert.ok(files.includes(`${js}.map`), `${js}.map`);
      assert.ok(files.includes(js.replace(/\.js$/, ".d.ts")), `${js} has no declaration`);
    }
  });

  it("is publishable: licence as the Python packages', repository, homepage, keywords, access", () => {
    for (const pyproject of [
      "services/party_sync/pyproject.toml",
      "services/campaign_engine/pyproject.toml",
    ]) {
      assert.equal(pkg["license"], pyprojectField(pyproject, "license"), pyproject);
    }
    assert.equal(
      readFileSync(join(root, "LICENSE"), "utf8"),
      readFileSync(join(repo, "LICENSE"), "utf8"),
    );
    const repository = pkg["repository"] as { url: string; directory: string };
    const pyRepository = pyprojectField("services/party_sync/pyproject.toml", "Repository");
    assert.equal(repository.url, `git+${pyRepository}.git`);
    assert.equal(repository.directory, "clients/js");
    assert.match(String(pkg["homepage"]), /^https:\/\//);
    assert.ok(Array.isArray(pkg["keywords"]) && pkg["keywords"].length > 0);
    assert.deepEqual((pkg["publishConfig"] as { access: string }).access, "public");
    assert.notEqual(pkg["private"], true);
  });

  it("ships one self-contained ES module that a page loads with one script tag", async () => {
    const text = readFileSync(join(root, BUNDLE), "utf8");
    // Nothing to resolve: no import statements, no import map needed.
    assert.doesNotMatch(text, /\bimport\s*[{*"'\w]|\bfrom\s*["']/);
    assert.match(text, /\/\/# sourceMappingURL=party-sync-client\.js\.map\s*$/);
    const map = JSON.parse(readFileSync(join(root, `${BUNDLE}.map`), "utf8")) as {
      sources: string[];
      sourcesContent: string[];
    };
    assert.ok(map.sources.some((s) => s.endsWith("src/client.ts")));
    assert.equal(map.sourcesContent.length, map.sources.length);
    const bundle = (await import(pathToFileURL(join(root, BUNDLE)).href)) as Record<
      string,
      unknown
    >;
    const library = (await import(pathToFileURL(join(root, "dist", "index.js")).href)) as Record<
      string,
      unknown
    >;
    assert.deepEqual(Object.keys(bundle).sort(), Object.keys(library).sort());
    assert.equal(typeof bundle["PartySyncClient"], "function");
    assert.deepEqual(bundle["ERROR_CODES"], library["ERROR_CODES"]);
    assert.equal(
      (pkg["exports"] as Record<string, { default: string }>)["./bundle"]?.default,
      `./${BUNDLE}`,
    );
    assert.ok(existsSync(join(root, String(pkg["unpkg"]))));
  });
});
