// Fails when src/schema.ts is not what openapi-typescript makes of the
// committed spec today: the spec, the server and this client must never
// drift apart. `npm run generate` brings it up to date.
import { spawnSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

const dir = mkdtempSync(join(tmpdir(), "mana-sync-schema-"));
try {
  const fresh = join(dir, "schema.ts");
  const run = spawnSync(
    "npx",
    ["--no-install", "openapi-typescript", "../../openapi/mana-sync.json", "-o", fresh],
    { encoding: "utf8" },
  );
  const output = `${run.stdout}${run.stderr}`;
  if (run.status !== 0) {
    console.error(output);
    throw new Error(`openapi-typescript failed (${run.status})`);
  }
  // openapi-typescript prints a warning (⚠) for anything it cannot render
  // faithfully; a spec that needs one is a spec to fix.
  if (/warn|⚠/i.test(output)) {
    console.error(output);
    throw new Error("openapi-typescript warned about openapi/mana-sync.json");
  }
  if (readFileSync(fresh, "utf8") !== readFileSync("src/schema.ts", "utf8")) {
    console.error(
      "src/schema.ts differs from what openapi/mana-sync.json generates: run `npm run generate` in clients/typescript and commit the result",
    );
    process.exit(1);
  }
  console.log("src/schema.ts matches openapi/mana-sync.json");
} finally {
  rmSync(dir, { recursive: true, force: true });
}
