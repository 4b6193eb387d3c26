import { defineConfig } from "vite";

// `npm run example` (in clients/): serves this page on localhost:5173,
// the origin a local mana-sync allows by default (CORS_ORIGINS).
export default defineConfig({
  root: import.meta.dirname,
  resolve: { conditions: ["source"] },
  server: { port: 5173, strictPort: true, host: "localhost" },
  build: { outDir: "dist", emptyOutDir: true },
});
