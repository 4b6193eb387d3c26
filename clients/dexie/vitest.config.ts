import { defineConfig } from "vitest/config";

// The adapter's unit tests: Node, with fake-indexeddb standing in for the
// browser's IndexedDB. The browser tests have their own config (e2e/).
export default defineConfig({
  resolve: { conditions: ["source"] },
  test: {
    include: ["test/**/*.test.ts"],
    setupFiles: ["fake-indexeddb/auto"],
  },
});
