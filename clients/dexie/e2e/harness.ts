/**
 * What the browser tests run against: Debian's chromium (driven by
 * playwright-core; no browser download), the example app built and served
 * on its own origin, and the servers `tests/browser.rs` started:
 *
 * - `MANA_SYNC_SERVERS`: JSON `[{ "store": "sqlite", "url": "http://localhost:…", "dataDir": "…" }, …]`
 * - `MANA_SYNC_BIN`: the server binary (which also mints the local-mode tokens)
 * - `MANA_SYNC_PAGE_PORT`: where to serve the page (the servers' `CORS_ORIGINS`)
 * - `CHROMIUM` (optional): the browser, `/usr/bin/chromium` by default
 */
import { execFile } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";

import { chromium, type Browser, type BrowserContext, type Page } from "playwright-core";
import { build, preview, type PreviewServer } from "vite";

export interface Server {
  store: string;
  url: string;
  dataDir: string;
}

function required(name: string): string {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set: run the browser tests with \`cargo test --test integration clients::\``);
  return value;
}

export const servers: Server[] = JSON.parse(process.env.MANA_SYNC_SERVERS ?? "[]");
const pagePort = Number(required("MANA_SYNC_PAGE_PORT"));

/** A token for `sub`, valid for `ttl` (`8s`, `1h`), from the server's local issuer. */
export async function token(server: Server, sub: string, ttl = "1h"): Promise<string> {
  const { stdout } = await promisify(execFile)(required("MANA_SYNC_BIN"), ["token", "--sub", sub, "--ttl", ttl], {
    env: { DATA_DIR: server.dataDir, PATH: process.env.PATH ?? "" },
  });
  return stdout.trim();
}

/** The example app, built and served on `http://127.0.0.1:$MANA_SYNC_PAGE_PORT`. */
export async function servePage(): Promise<{ origin: string; close: () => Promise<void> }> {
  const root = new URL("../example/", import.meta.url).pathname;
  const outDir = mkdtempSync(join(tmpdir(), "mana-sync-example-"));
  await build({ root, configFile: `${root}vite.config.ts`, logLevel: "warn", build: { outDir, emptyOutDir: true } });
  const server: PreviewServer = await preview({
    root,
    configFile: `${root}vite.config.ts`,
    logLevel: "warn",
    build: { outDir },
    preview: { port: pagePort, host: "127.0.0.1", strictPort: true },
  });
  return {
    origin: `http://127.0.0.1:${pagePort}`,
    close: async () => {
      await server.close();
      rmSync(outDir, { recursive: true, force: true });
    },
  };
}

export function launch(): Promise<Browser> {
  return chromium.launch({
    executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
    // As root in a container there is no sandbox to use; without the
    // background-networking flags chromium keeps calling Google's hosts,
    // which this closed network refuses.
    args: [
      "--no-sandbox",
      "--disable-gpu",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
      "--no-first-run",
    ],
  });
}

/** One browser profile (a device) of `user`, with the example app open. */
export interface Device {
  context: BrowserContext;
  page: Page;
  user: string;
}

export async function openDevice(
  browser: Browser,
  server: Server,
  origin: string,
  user: string,
  ttl = "1h",
): Promise<Device> {
  const context = await browser.newContext();
  // The page asks for its token through this binding, as an app asks its auth service.
  await context.exposeBinding("manaSyncToken", () => token(server, user, ttl));
  const page = await context.newPage();
  page.on("pageerror", (e) => console.error(`[${user}] page error: ${e.message}`));
  await page.goto(`${origin}/?server=${encodeURIComponent(server.url)}`);
  await settled(page);
  return { context, page, user };
}

/** Waits until the page's engine leads, its socket is live and nothing is left to do. */
export async function settled(page: Page, timeout = 10_000): Promise<void> {
  await page.waitForFunction(
    () => {
      const s = (globalThis as any).mana?.sync.status.current;
      return s?.leader && s.connected && s.state === "idle" && s.pending === 0;
    },
    undefined,
    { timeout, polling: 20 },
  );
}

/** A counter of the server's `/metrics` (`mana_sync_<name>_total`, summed over its labels). */
export async function metric(server: Server, name: string): Promise<number> {
  const text = await (await fetch(`${server.url}/metrics`)).text();
  const sample = new RegExp(`^mana_sync_${name}_total(\\{[^}]*\\})? (\\S+)$`);
  return text
    .split("\n")
    .map((line) => sample.exec(line))
    .reduce((sum, match) => sum + (match ? Number(match[2]) : 0), 0);
}

export function percentile(values: number[], p: number): number {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.ceil((p / 100) * sorted.length) - 1)]!;
}
