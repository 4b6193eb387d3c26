import { defineConfig } from "vitest/config";

// The browser tests: run by `tests/browser.rs` (cargo test), which starts
// PostgreSQL and the release build of the server on both stores and
// passes them in the environment (see harness.ts).
export default defineConfig({
  test: {
    root: import.meta.dirname,
    include: ["**/*.e2e.ts"],
    testTimeout: 120_000,
    hookTimeout: 120_000,
    fileParallelism: false,
  },
});
