import { afterEach, describe, expect, it } from "vitest";

import type { Locks, SyncEngine } from "../src/index.js";
import { FakeServer } from "./fake-server.js";
import { database, eventually } from "./helpers.js";

/** Web Locks' exclusive mode, in memory: requests for one name run one after the other. */
class FakeLocks implements Locks {
  private readonly tails = new Map<string, Promise<void>>();

  request(name: string, options: { signal?: AbortSignal }, callback: () => Promise<void>): Promise<unknown> {
    const before = this.tails.get(name) ?? Promise.resolve();
    let release = () => {};
    const held = new Promise<void>((r) => (release = r));
    this.tails.set(name, before.then(() => held));
    return before.then(async () => {
      try {
        if (options.signal?.aborted) throw new DOMException("aborted", "AbortError");
        return await callback();
      } finally {
        release();
      }
    });
  }
}

const engines: SyncEngine[] = [];
afterEach(async () => {
  await Promise.all(engines.splice(0).map((e) => e.stop()));
});

describe("tabs", () => {
  it("one tab syncs at a time; another's writes go through it; the next takes over when it stops", async () => {
    const server = new FakeServer();
    const locks = new FakeLocks();
    const name = `tabs-${Math.random()}`;
    const tabs = [0, 1].map(() => database({ fetch: server.fetch, locks }, name));
    const [first, second] = tabs as [(typeof tabs)[0], (typeof tabs)[0]];
    engines.push(first.engine, second.engine);
    first.engine.start();
    await eventually(() => first.engine.status.current.state === "idle" && first.engine.status.current.leader);
    // A tab opened later is told the leader's status (and is not the leader).
    second.engine.start();
    await eventually(() => second.engine.status.current.lastSyncAt !== null);
    expect(second.engine.status.current.leader).toBe(false);

    // The follower records; the leader pushes.
    await second.db.todos.add({ id: "a", title: "from the second tab" });
    await eventually(() => server.record("todos", "a") !== undefined);
    await eventually(() => second.engine.status.current.pending === 0);
    expect(server.requests.every((r) => r.headers.get("x-client-id") === server.requests[0]!.headers.get("x-client-id"))).toBe(true);

    await first.engine.stop();
    await eventually(() => second.engine.status.current.leader);
    server.write([{ table: "todos", id: "b", op: "insert", data: { title: "from another device" } }]);
    await second.engine.sync();
    expect(await second.db.todos.get("b")).toEqual({ id: "b", title: "from another device" });
    // Both tabs see it: one database.
    expect(await first.db.todos.get("b")).toEqual({ id: "b", title: "from another device" });
  });
});
