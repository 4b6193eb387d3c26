/**
 * The Dexie adapter in a real browser against the real server, on each
 * store: devices are browser contexts (each its own IndexedDB), the page
 * is the example app on an origin of its own (so CORS is real), and the
 * server mints each device's tokens.
 */
import type { Browser, Page } from "playwright-core";
import { afterAll, beforeAll, describe, expect, it } from "vitest";

import { launch, metric, openDevice, percentile, servePage, servers, settled, token, type Device } from "./harness.js";

interface Todo {
  id: string;
  title: string;
  done: boolean;
  createdAt: string;
}

/** Runs `fn` in the page with its `mana` global (the example's db, sync engine and liveQuery). */
function inPage<T, A = undefined>(page: Page, fn: (mana: any, arg: A) => T | Promise<T>, arg?: A): Promise<T> {
  return page.evaluate(
    ([source, a]) => new Function("mana", "arg", `return (${source})(mana, arg)`)((globalThis as any).mana, a),
    [fn.toString(), arg] as const,
  ) as Promise<T>;
}

const todo = (id: string, title: string): Todo => ({ id, title, done: false, createdAt: new Date().toISOString() });

async function get(device: Device, id: string): Promise<Todo | undefined> {
  return inPage(device.page, (mana, id) => mana.db.todos.get(id), id);
}

/**
 * Polls `check` until it holds, or fails after `timeout` ms. (Playwright's
 * `waitForFunction` takes any promise for truthy: IndexedDB reads, being
 * asynchronous, are polled from here.)
 */
async function poll(check: () => Promise<boolean>, timeout: number, what: string): Promise<void> {
  const deadline = Date.now() + timeout;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`timed out after ${timeout} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

/** Waits until `device` holds `id` as `expected` (undefined: absent). */
async function until(device: Device, id: string, expected: Partial<Todo> | undefined, timeout = 5_000): Promise<void> {
  await poll(
    async () => {
      const record = await get(device, id);
      if (expected === undefined) return record === undefined;
      return record !== undefined && Object.entries(expected).every(([k, v]) => record[k as keyof Todo] === v);
    },
    timeout,
    `${device.user}'s ${id} to be ${JSON.stringify(expected)}`,
  );
}

let browser: Browser;
let page: { origin: string; close: () => Promise<void> };

beforeAll(async () => {
  expect(servers.length, "MANA_SYNC_SERVERS names the servers").toBeGreaterThan(0);
  [browser, page] = await Promise.all([launch(), servePage()]);
});

afterAll(async () => {
  await browser?.close();
  await page?.close();
});

describe.each(servers)("on $store", (server) => {
  let laptop: Device;
  let phone: Device;
  let stranger: Device;
  const devices: Device[] = [];

  beforeAll(async () => {
    [laptop, phone, stranger] = await Promise.all([
      openDevice(browser, server, page.origin, "alice"),
      openDevice(browser, server, page.origin, "alice"),
      openDevice(browser, server, page.origin, `bob-${server.store}`),
    ]);
    devices.push(laptop, phone, stranger);
  });

  afterAll(async () => {
    await Promise.all(devices.map((d) => d.context.close()));
  });

  it("a todo added in the app's form appears on the other device", async () => {
    await laptop.page.fill("#title", "Buy milk");
    await laptop.page.press("#title", "Enter");
    await phone.page.waitForSelector("#list li span:text('Buy milk')", { timeout: 2_000 });
  });

  it("an edit on one device reaches the other through the socket within a second (50 edits)", async () => {
    await inPage(laptop.page, (mana, t) => mana.db.todos.put(t), todo("latency", "edit 0"));
    await until(phone, "latency", { title: "edit 0" });
    // The phone notes when each title arrives, by its own clock (one machine: the same clock).
    await inPage(phone.page, (mana) => {
      (globalThis as any).arrivals = {};
      mana.liveQuery(() => mana.db.todos.get("latency")).subscribe((t: Todo | undefined) => {
        const arrivals = (globalThis as any).arrivals;
        if (t && !(t.title in arrivals)) arrivals[t.title] = Date.now();
      });
    });
    const pullsBefore = await inPage(phone.page, (mana) => mana.sync.stats.pulls);
    const latencies: number[] = [];
    for (let i = 1; i <= 50; i++) {
      const title = `edit ${i}`;
      const sent = await inPage(laptop.page, async (mana, title) => {
        const at = Date.now();
        await mana.db.todos.update("latency", { title });
        return at;
      }, title);
      const arrived = await phone.page.waitForFunction((title) => (globalThis as any).arrivals[title], title, {
        timeout: 1_000,
        polling: 5,
      });
      latencies.push((await arrived.jsonValue()) - sent);
      // About as fast as a person edits: within the server's default rate limits.
      await new Promise((r) => setTimeout(r, 60));
    }
    const p50 = percentile(latencies, 50);
    const p99 = percentile(latencies, 99);
    console.log(`[${server.store}] edit to other device over ${latencies.length} edits: p50 ${p50} ms, p99 ${p99} ms, max ${Math.max(...latencies)} ms`);
    expect(p99).toBeLessThan(1_000);
    // Through the socket: each edit was one notice and one pull, no polling.
    const stats = await inPage(phone.page, (mana) => ({ ...mana.sync.stats, status: mana.sync.status.current }));
    expect(stats.status.connected).toBe(true);
    expect(stats.pulls - pullsBefore).toBeGreaterThanOrEqual(50);
    expect(stats.socketsOpened).toBe(1);
  });

  it("offline edits replay once back online, exactly once even when an answer is lost", async () => {
    await inPage(laptop.page, (mana, rows) => mana.db.todos.bulkPut(rows), [todo("o1", "one"), todo("o2", "two")]);
    await until(phone, "o2", { title: "two" });
    await settled(laptop.page);
    const appended = await metric(server, "changes_appended");
    const replays = await metric(server, "idempotent_replays");

    await laptop.context.setOffline(true);
    await inPage(laptop.page, async (mana, t) => {
      await mana.db.todos.update("o1", { title: "one, edited offline" });
      await mana.db.todos.update("o1", { done: true });
      await mana.db.todos.add(t);
      await mana.db.todos.delete("o2");
    }, todo("o3", "three, added offline"));
    await laptop.page.waitForFunction(() => (globalThis as any).mana.sync.status.current.state === "offline", undefined, {
      timeout: 5_000,
    });
    expect(await inPage(laptop.page, (mana) => mana.sync.status.current.pending)).toBe(4);

    // The first push after coming back reaches the server, but its answer is lost on the way back.
    let lost = 0;
    await laptop.page.route(`${server.url}/sync/todo`, async (route) => {
      if (route.request().method() !== "POST" || lost > 0) return route.fallback();
      lost++;
      await route.fetch();
      await route.abort("connectionreset");
    });
    await laptop.context.setOffline(false);
    await until(phone, "o1", { title: "one, edited offline", done: true });
    await until(phone, "o3", { title: "three, added offline" });
    await until(phone, "o2", undefined);
    await settled(laptop.page);
    expect(lost).toBe(1);
    // Three records changed: one update (two edits, coalesced), one new record, one delete.
    expect((await metric(server, "changes_appended")) - appended).toBe(3);
    expect((await metric(server, "idempotent_replays")) - replays).toBe(1);
    await laptop.page.unroute(`${server.url}/sync/todo`);
  });

  it("concurrent edits of one field converge on both devices to the later write, whoever reconnects first", async () => {
    await inPage(laptop.page, (mana, t) => mana.db.todos.put(t), todo("c1", "original"));
    await until(phone, "c1", { title: "original" });
    await Promise.all([laptop.context.setOffline(true), phone.context.setOffline(true)]);
    await inPage(laptop.page, (mana) => mana.db.todos.update("c1", { title: "laptop (earlier)" }));
    await new Promise((r) => setTimeout(r, 20));
    await inPage(phone.page, (mana) => mana.db.todos.update("c1", { title: "phone (later)", done: true }));
    // The later write goes first; the earlier one arrives after it and must still lose.
    await phone.context.setOffline(false);
    await settled(phone.page);
    await laptop.context.setOffline(false);
    await until(laptop, "c1", { title: "phone (later)", done: true });
    await until(phone, "c1", { title: "phone (later)", done: true });
    await settled(laptop.page);
    await settled(phone.page);
    expect(await get(laptop, "c1")).toEqual(await get(phone, "c1"));
  });

  it("a deleted record disappears on both devices", async () => {
    await inPage(laptop.page, (mana, t) => mana.db.todos.put(t), todo("d1", "to delete"));
    await until(phone, "d1", { title: "to delete" });
    await inPage(phone.page, (mana) => mana.db.todos.delete("d1"));
    await until(laptop, "d1", undefined, 2_000);
    expect(await get(phone, "d1")).toBeUndefined();
  });

  it("the other user sees none of it", async () => {
    await settled(stranger.page);
    const seen = await inPage(stranger.page, async (mana) => ({ count: await mana.db.todos.count(), pulled: mana.sync.stats.pulledRecords }));
    expect(seen).toEqual({ count: 0, pulled: 0 });
    expect(await laptop.page.locator("#list li").count()).toBeGreaterThan(0);
  });

  it("a reloaded page resumes from its stored cursor without downloading everything again", async () => {
    const before = await inPage(phone.page, (mana) => mana.db.todos.count());
    expect(before).toBeGreaterThan(3);
    await phone.page.reload();
    await settled(phone.page);
    await inPage(laptop.page, (mana, t) => mana.db.todos.put(t), todo("after-reload", "new"));
    await until(phone, "after-reload", { title: "new" });
    const stats = await inPage(phone.page, async (mana) => ({ ...mana.sync.stats, count: await mana.db.todos.count() }));
    expect(stats.count).toBe(before + 1);
    // Only the one new record came down.
    expect(stats.pulledRecords).toBe(1);
  });

  it("one tab of a device syncs; another tab's writes go through it, and it takes over when the first closes", async () => {
    const tab = await laptop.context.newPage();
    await tab.goto(laptop.page.url());
    await tab.waitForFunction(() => (globalThis as any).mana?.sync.status.current.state === "idle", undefined, { polling: 20 });
    const roles = await Promise.all([laptop.page, tab].map((p) => inPage(p, (mana) => mana.sync.status.current.leader)));
    expect(roles).toEqual([true, false]);
    await inPage(tab, (mana, t) => mana.db.todos.put(t), todo("from-tab", "written in a second tab"));
    await until(phone, "from-tab", { title: "written in a second tab" });
    expect(await inPage(tab, (mana) => mana.sync.stats.pushes)).toBe(0);
    await laptop.page.close();
    laptop.page = tab;
    await settled(tab);
    await inPage(phone.page, (mana) => mana.db.todos.update("from-tab", { done: true }));
    await until(laptop, "from-tab", { done: true }, 2_000);
  });

  it("a token that expires while the page is open is renewed on the same socket", async () => {
    // 8 s tokens: renewed 2 s before expiry; the server closes a socket whose token expires (4001).
    const tablet = await openDevice(browser, server, page.origin, "alice", "8s");
    devices.push(tablet);
    await new Promise((r) => setTimeout(r, 12_000));
    await inPage(laptop.page, (mana, t) => mana.db.todos.put(t), todo("after-expiry", "still live"));
    await until(tablet, "after-expiry", { title: "still live" }, 1_000);
    const stats = await inPage(tablet.page, (mana) => ({ ...mana.sync.stats, connected: mana.sync.status.current.connected }));
    expect(stats.connected).toBe(true);
    expect(stats.socketsOpened).toBe(1);
    expect(stats.tokenRenewals).toBeGreaterThanOrEqual(1);
  });

  it("5,000 records reach a fresh device through hasMore pages", async () => {
    const user = `carol-${server.store}`;
    const bearer = await token(server, user);
    for (let batch = 0; batch < 5; batch++) {
      const changes = Array.from({ length: 1000 }, (_, i) => {
        const n = batch * 1000 + i;
        return { table: "todos", id: `bulk-${n}`, op: "insert", data: { title: `todo ${n}`, done: false, createdAt: new Date(n).toISOString() } };
      });
      const pushed = await fetch(`${server.url}/sync/todo`, {
        method: "POST",
        headers: { authorization: `Bearer ${bearer}`, "content-type": "application/json", "x-client-id": "seeder" },
        body: JSON.stringify({ changes, since: new Date().toISOString() }),
      });
      expect(pushed.status).toBe(200);
    }
    const started = Date.now();
    const fresh = await openDevice(browser, server, page.origin, user);
    devices.push(fresh);
    await poll(async () => (await inPage(fresh.page, (mana) => mana.db.todos.count())) === 5000, 30_000, "5,000 records");
    const elapsed = Date.now() - started;
    const stats = await inPage(fresh.page, (mana) => ({
      ...mana.sync.stats,
      synced: Date.parse(mana.sync.status.current.lastSyncAt) - mana.startedAt,
    }));
    console.log(
      `[${server.store}] 5,000 records to a fresh device: ${elapsed} ms from opening the page, ` +
        `${stats.synced} ms from the engine's start to the end of its first round, in ${stats.pulls} pulls`,
    );
    expect(stats.pulledRecords).toBe(5000);
    expect(stats.pulls).toBeGreaterThanOrEqual(5);
    expect(await fresh.page.locator("#list li").count()).toBe(5000);
  });
});
