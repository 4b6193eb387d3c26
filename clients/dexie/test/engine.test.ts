import { afterEach, describe, expect, it } from "vitest";

import type { RemoteChange, SyncEngine } from "../src/index.js";
import { PENDING } from "../src/tables.js";
import { FakeServer } from "./fake-server.js";
import { database, eventually } from "./helpers.js";

const engines: SyncEngine[] = [];
afterEach(async () => {
  await Promise.all(engines.splice(0).map((e) => e.stop()));
});

function started(server: FakeServer, options: Parameters<typeof database>[0] = {}, name?: string) {
  const made = database({ fetch: server.fetch, ...options }, name);
  engines.push(made.engine);
  made.engine.start();
  return made;
}

const pushes = (server: FakeServer) => server.requests.filter((r) => r.method === "POST");

describe("pushing", () => {
  it("pushes queued writes in batches with an Idempotency-Key and empties the queue", async () => {
    const server = new FakeServer();
    const { db, engine } = database({ fetch: server.fetch, batchSize: 2 });
    engines.push(engine);
    await db.open();
    await db.todos.bulkAdd([
      { id: "a", title: "1" },
      { id: "b", title: "2" },
      { id: "c", title: "3" },
    ]);
    engine.start();
    await eventually(async () => (await db.table(PENDING).count()) === 0);
    const sent = pushes(server);
    expect(sent.map((r) => r.body!.changes.length)).toEqual([2, 1]);
    const keys = sent.map((r) => r.headers.get("idempotency-key"));
    expect(new Set(keys).size).toBe(2);
    expect(server.record("todos", "c")).toEqual({ title: "3" });
    expect(sent[0]!.headers.get("x-client-id")).toBe(sent[0]!.body!.clientId);
    expect(sent[0]!.headers.get("authorization")).toBe("Bearer token");
  });

  it("sends a batch whose answer was lost again under the same key, recorded once", async () => {
    const server = new FakeServer();
    server.faults.push({ loseAnswer: true, on: "POST" }, { network: true, on: "POST" });
    const { db, engine } = started(server);
    await db.todos.add({ id: "a", title: "milk" });
    await eventually(async () => engine.status.current.pending === 0 && (await db.table(PENDING).count()) === 0);
    const sent = pushes(server);
    expect(sent).toHaveLength(3);
    expect(new Set(sent.map((r) => r.headers.get("idempotency-key"))).size).toBe(1);
    expect(new Set(sent.map((r) => JSON.stringify(r.body))).size).toBe(1);
    expect(server.log).toHaveLength(1);
    expect(engine.stats.retries).toBe(2);
  });

  it("waits as long as a 429 or 503 says in Retry-After", async () => {
    const server = new FakeServer();
    server.faults.push({ status: 429, retryAfter: "1", on: "POST" }, { status: 503, retryAfter: "1", on: "POST" });
    const { db } = started(server);
    await db.todos.add({ id: "a", title: "milk" });
    await eventually(async () => (await db.table(PENDING).count()) === 0, 5000);
    const [first, second, third] = pushes(server);
    expect(second!.at - first!.at).toBeGreaterThanOrEqual(950);
    expect(third!.at - second!.at).toBeGreaterThanOrEqual(950);
    expect(server.log).toHaveLength(1);
  });

  it("asks for a new token after a 401", async () => {
    const server = new FakeServer();
    server.faults.push({ status: 401 });
    let issued = 0;
    const { db } = started(server, { token: () => `token-${++issued}` });
    await db.todos.add({ id: "a", title: "milk" });
    await eventually(async () => (await db.table(PENDING).count()) === 0);
    const auth = pushes(server).map((r) => r.headers.get("authorization"));
    expect(auth).toEqual(["Bearer token-1", "Bearer token-2"]);
  });

  it("keeps a batch the server refuses as malformed, and goes on with the next", async () => {
    const server = new FakeServer();
    server.faults.push({ status: 400 });
    const { db, engine } = started(server, { batchSize: 1 });
    await db.todos.add({ id: "a", title: "bad" });
    await eventually(async () => (await engine.rejected()).length === 1);
    await db.todos.add({ id: "b", title: "good" });
    await eventually(async () => (await db.table(PENDING).count()) === 0);
    expect(server.record("todos", "b")).toEqual({ title: "good" });
    expect((await engine.rejected())[0]!.batch.body.changes[0]!.id).toBe("a");
    expect(engine.status.current.lastError).toContain("400");
  });

  it("sends every other change when the server refuses one, keeping only that one aside", async () => {
    const server = new FakeServer();
    server.refuse = (change) => change.id === "bad";
    const { db, engine } = started(server, { batchSize: 8 });
    await db.todos.bulkAdd(["r1", "r2", "bad", "r3", "r4", "r5"].map((id) => ({ id, title: id })));
    await eventually(async () => (await db.table(PENDING).count()) === 0);
    expect(server.log.map((c) => c.id).sort()).toEqual(["r1", "r2", "r3", "r4", "r5"]);
    const rejected = await engine.rejected();
    expect(rejected.map((r) => r.batch.body.changes.map((c) => c.id))).toEqual([["bad"]]);
    // Said once (state `error` for that round); the message stays.
    await eventually(() => engine.status.current.lastError?.includes("bad_request") === true);
  });

  it("retries what is not the server's refusal (a proxy's 404) instead of dropping it", async () => {
    const server = new FakeServer();
    server.faults.push({ status: 404, body: "<html>not found</html>", on: "POST" });
    const { db, engine } = started(server);
    await db.todos.add({ id: "a", title: "kept" });
    await eventually(async () => (await db.table(PENDING).count()) === 0);
    expect(server.record("todos", "a")).toEqual({ title: "kept" });
    expect(await engine.rejected()).toEqual([]);
  });

  it("halves a batch the server finds too large", async () => {
    const server = new FakeServer();
    server.faults.push({ status: 413 });
    const { db } = started(server, { batchSize: 4 });
    await db.todos.bulkAdd([1, 2, 3, 4].map((n) => ({ id: `r${n}`, title: String(n) })));
    await eventually(async () => (await db.table(PENDING).count()) === 0);
    expect(pushes(server).map((r) => r.body!.changes.length)).toEqual([4, 2, 2]);
    expect(server.log).toHaveLength(4);
  });
});

describe("pulling", () => {
  it("pulls page after page until hasMore is false, then resumes from the stored cursor", async () => {
    const server = new FakeServer();
    for (let n = 0; n < 25; n++) {
      server.write([{ table: "todos", id: `r${n}`, op: "insert", data: { title: `t${n}` } }]);
    }
    const name = `pull-${Math.random()}`;
    const first = started(server, { pullLimit: 10 }, name);
    await eventually(async () => (await first.db.todos.count()) === 25);
    await eventually(() => first.engine.stats.pulls === 3);
    await first.engine.stop();
    first.db.close();

    const again = started(server, { pullLimit: 10 }, name);
    await eventually(() => again.engine.stats.pulls === 1 && again.engine.status.current.state === "idle");
    expect(again.engine.stats.pulledRecords).toBe(0);
    const since = server.requests.at(-1)!.query.get("since");
    expect(since).toBe("000000000025");
  });

  it("applies server changes without overwriting newer local writes, field by field", async () => {
    const server = new FakeServer();
    const { db, engine } = started(server);
    await db.todos.add({ id: "a", title: "old", note: "old" });
    await eventually(async () => (await db.table(PENDING).count()) === 0);
    // Offline: a local edit waits in the queue...
    server.faults.push({ network: true }, { network: true }, { network: true });
    await db.todos.update("a", { title: "mine" });
    // ...while another device wrote both fields, one before the local edit, one after.
    const before = new Date(Date.now() - 60_000).toISOString();
    const after = new Date(Date.now() + 60_000).toISOString();
    server.write([
      {
        table: "todos",
        id: "a",
        op: "update",
        fields: { title: { value: "theirs, older", updatedAt: before }, note: { value: "theirs, newer", updatedAt: after } },
      },
    ]);
    await engine.sync();
    expect(await db.todos.get("a")).toEqual({ id: "a", title: "mine", note: "theirs, newer" });
    expect(server.record("todos", "a")).toMatchObject({ title: "mine", note: "theirs, newer" });
  });

  it("sends field times as at with the app's actor, and tells the app who made each change it applies", async () => {
    const server = new FakeServer();
    const told: RemoteChange[] = [];
    const { db, engine } = started(server, {
      actor: { kind: "user", principalId: "ann" },
      origin: "user",
      onRemoteChange: (change) => told.push(change),
    });
    await db.todos.add({ id: "a", title: "mine" });
    await eventually(async () => (await db.table(PENDING).count()) === 0);
    const [sent] = pushes(server);
    expect(sent!.body).toMatchObject({ schemaVersion: 1, actor: { kind: "user", principalId: "ann" }, origin: "user" });
    const written = sent!.body!.changes[0]!.fields!.title!;
    expect(written.at).toMatch(/^\d{4}-\d\d-\d\dT/);
    expect(written.updatedAt).toBeUndefined();
    // Another device's agent edits the title, later.
    const later = new Date(Date.now() + 60_000).toISOString();
    server.write([{ table: "todos", id: "a", op: "update", fields: { title: { value: "theirs", at: later } }, actor: { kind: "ai", principalId: "agent-7" }, origin: "agent" }]);
    await engine.sync();
    expect(await db.todos.get("a")).toMatchObject({ title: "theirs" });
    const last = told.at(-1)!;
    expect(last).toMatchObject({ table: "todos", id: "a", actor: { kind: "ai", principalId: "agent-7" }, origin: "agent", schemaVersion: 1 });
    expect(last.eventId).toMatch(/^\d+$/);
  });

  it("makes a record another device deleted live again when it is made here anew", async () => {
    const server = new FakeServer();
    const { db, engine } = started(server);
    await db.todos.add({ id: "a", title: "first", note: "n" });
    await eventually(async () => (await db.table(PENDING).count()) === 0);
    server.write([{ table: "todos", id: "a", op: "delete", deletedAt: new Date().toISOString() }]);
    await engine.sync();
    expect(await db.todos.get("a")).toBeUndefined();
    await new Promise((r) => setTimeout(r, 2));
    await db.todos.add({ id: "a", title: "second" });
    await eventually(async () => (await db.table(PENDING).count()) === 0);
    expect(server.record("todos", "a")).toEqual({ title: "second", note: null, deletedAt: null });
    expect(await db.todos.get("a")).toEqual({ id: "a", title: "second", note: null, deletedAt: null });
  });

  it("applies a delete as a delete", async () => {
    const server = new FakeServer();
    const { db, engine } = started(server);
    await db.todos.add({ id: "a", title: "x" });
    await eventually(async () => (await db.table(PENDING).count()) === 0);
    server.write([{ table: "todos", id: "a", op: "delete", deletedAt: new Date(Date.now() + 1000).toISOString() }]);
    await engine.sync();
    expect(await db.todos.get("a")).toBeUndefined();
    expect(await db.table(PENDING).count()).toBe(0);
  });
});

describe("while the socket is down", () => {
  it("polls every pollInterval while the socket cannot connect", async () => {
    const server = new FakeServer();
    /** A socket that never connects. */
    class Refused {
      onclose: ((e: { code: number }) => void) | null = null;
      readyState = 0;
      constructor() {
        setTimeout(() => this.onclose?.({ code: 1006 }), 1);
      }
      close() {}
    }
    const { db, engine } = started(server, { live: true, WebSocket: Refused as unknown as typeof WebSocket, pollInterval: 50 });
    await eventually(() => engine.status.current.state === "idle" && engine.stats.pulls > 0);
    server.write([{ table: "todos", id: "a", op: "insert", data: { title: "found by polling" } }]);
    await eventually(async () => (await db.todos.get("a")) !== undefined, 1000);
    expect(engine.status.current.connected).toBe(false);
    expect(engine.stats.socketsOpened).toBeGreaterThan(1);
  });

  it("pulls at once when a live socket drops, then polls until it is back", async () => {
    const server = new FakeServer();
    /** The first connection is accepted, then cut; later ones are refused. */
    class Flaky {
      static made = 0;
      readonly OPEN = 1;
      readonly CONNECTING = 0;
      readyState = 0;
      onopen: (() => void) | null = null;
      onmessage: ((e: { data: string }) => void) | null = null;
      onclose: ((e: { code: number }) => void) | null = null;
      constructor() {
        const first = Flaky.made++ === 0;
        setTimeout(() => {
          if (!first) return this.onclose?.({ code: 1006 });
          this.readyState = 1;
          this.onopen?.();
        }, 1);
      }
      send(data: string) {
        if (JSON.parse(data).type !== "auth") return;
        setTimeout(() => this.onmessage?.({ data: JSON.stringify({ type: "auth-ok" }) }), 1);
        setTimeout(() => this.onclose?.({ code: 1006 }), 60);
      }
      close() {}
    }
    const { db, engine } = started(server, { live: true, WebSocket: Flaky as unknown as typeof WebSocket, pollInterval: 50 });
    await eventually(() => engine.status.current.connected);
    await eventually(() => !engine.status.current.connected);
    server.write([{ table: "todos", id: "a", op: "insert", data: { title: "after the socket went" } }]);
    await eventually(async () => (await db.todos.get("a")) !== undefined, 1000);
  });
});

describe("stopping", () => {
  it("stops between pages, without waiting for the whole download", async () => {
    const server = new FakeServer();
    for (let n = 0; n < 30; n++) server.write([{ table: "todos", id: `r${n}`, op: "insert", data: { title: "t" } }]);
    server.delay = 20;
    const { engine } = started(server, { pullLimit: 1 });
    await eventually(() => engine.stats.pulls >= 1);
    const pullsWhenAsked = engine.stats.pulls;
    await engine.stop();
    // By the order of events, not the clock: stop() waited for the page
    // in flight at most, and nothing is fetched after it.
    const pullsWhenStopped = engine.stats.pulls;
    expect(pullsWhenStopped).toBeLessThanOrEqual(pullsWhenAsked + 1);
    const requests = server.requests.length;
    await new Promise((r) => setTimeout(r, 100));
    expect(engine.stats.pulls).toBe(pullsWhenStopped);
    expect(server.requests.length).toBe(requests);
    expect(pullsWhenStopped).toBeLessThan(30);
  });

  it("rejects a sync() that cannot finish, and one asked of a stopped engine", async () => {
    const server = new FakeServer();
    server.faults.push(...Array.from({ length: 50 }, () => ({ network: true as const })));
    const { engine } = started(server, { backoff: { base: 1000, cap: 1000 } });
    await eventually(() => engine.status.current.leader);
    const pending = engine.sync();
    await engine.stop();
    await expect(pending).rejects.toThrow("stopped");
    await expect(engine.sync()).rejects.toThrow("not started");
  });
});

describe("status", () => {
  it("says offline while the server cannot be reached, then idle", async () => {
    const server = new FakeServer();
    server.faults.push({ network: true }, { network: true });
    const seen: string[] = [];
    const { db, engine } = database({ fetch: server.fetch });
    engines.push(engine);
    engine.status.subscribe((s) => seen.push(s.state));
    await db.open();
    await db.todos.add({ id: "a", title: "x" });
    engine.start();
    await eventually(() => server.log.length === 1 && engine.status.current.state === "idle");
    expect(seen).toContain("offline");
    expect(seen).toContain("syncing");
    expect(engine.status.current.lastError).toContain("network");
  });
});
