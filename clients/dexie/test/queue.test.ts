import { describe, expect, it } from "vitest";

import { merge } from "../src/apply.js";
import { coalesce, pendingRecords } from "../src/queue.js";
import type { PendingEntry } from "../src/tables.js";
import type { ServerChange } from "@mana-sync/client";

/** A server change as the server names it: with its entry's id and schema version. */
const sc = (change: Omit<ServerChange, "eventId" | "schemaVersion">): ServerChange => ({ eventId: "1", schemaVersion: 1, ...change });

const t = (s: number) => new Date(Date.UTC(2026, 0, 1, 0, 0, s)).toISOString();
const put = (key: string, fields: Record<string, unknown>, at: string, created = false): PendingEntry => ({
  table: "todos",
  key,
  op: "put",
  at,
  created,
  fields: Object.fromEntries(Object.entries(fields).map(([f, value]) => [f, { value, at }])),
});
const del = (key: string, at: string): PendingEntry => ({ table: "todos", key, op: "delete", at });

describe("coalescing the queue into changes", () => {
  it("merges a record's writes into one update holding each field's latest write", () => {
    const changes = coalesce([put("a", { title: "1", done: false }, t(1), true), put("b", { title: "b" }, t(2), true), put("a", { title: "2" }, t(3))]);
    expect(changes).toEqual([
      { table: "todos", id: "a", op: "update", fields: { title: { value: "2", at: t(3) }, done: { value: false, at: t(1) } } },
      { table: "todos", id: "b", op: "update", fields: { title: { value: "b", at: t(2) } } },
    ]);
  });

  it("keeps a delete between a record's writes", () => {
    const again = put("a", { title: "again", deletedAt: null }, t(4), true);
    const changes = coalesce([put("a", { title: "1" }, t(1), true), del("a", t(2)), del("a", t(3)), again]);
    expect(changes).toEqual([
      { table: "todos", id: "a", op: "update", fields: { title: { value: "1", at: t(1) } } },
      { table: "todos", id: "a", op: "delete", deletedAt: t(2) },
      {
        table: "todos",
        id: "a",
        op: "update",
        fields: { title: { value: "again", at: t(4) }, deletedAt: { value: null, at: t(4) } },
      },
    ]);
  });
});

describe("merging a server change under queued writes", () => {
  const local = { id: "a", title: "mine", note: "n", done: false };
  const pending = pendingRecords([put("a", { title: "mine" }, t(10))]);

  it("keeps a queued field unless the server's was written later", () => {
    const older = merge(
      sc({ table: "todos", id: "a", op: "update", data: { id: "a", title: "old", note: "theirs", done: true }, fields: { title: { value: "old", updatedAt: t(5), at: t(5) }, done: { value: true, updatedAt: t(5), at: t(5) } } }),
      local,
      pending.get(JSON.stringify(["todos", "a"])),
    );
    expect(older).toEqual({ put: { id: "a", title: "mine", note: "theirs", done: true } });
    const newer = merge(
      sc({ table: "todos", id: "a", op: "update", data: { id: "a", title: "new", note: "n", done: false }, fields: { title: { value: "new", updatedAt: "2026-01-01T00:00:10.000000001Z", at: "2026-01-01T00:00:10.000000001Z" } } }),
      local,
      pending.get(JSON.stringify(["todos", "a"])),
    );
    expect(newer).toEqual({ put: { id: "a", title: "mine", note: "n", done: false } });
    const later = merge(
      sc({ table: "todos", id: "a", op: "update", data: { id: "a", title: "new", note: "n", done: false }, fields: { title: { value: "new", updatedAt: t(11), at: t(11) } } }),
      local,
      pending.get(JSON.stringify(["todos", "a"])),
    );
    expect(later).toEqual({ put: { id: "a", title: "new", note: "n", done: false } });
  });

  it("keeps queued fields over a whole record (an insert has no field times)", () => {
    const outcome = merge(sc({ table: "todos", id: "a", op: "insert", data: { id: "a", title: "theirs", extra: 1 } }), local, pending.get(JSON.stringify(["todos", "a"])));
    expect(outcome).toEqual({ put: { id: "a", title: "mine", extra: 1 } });
  });

  it("keeps a record made again here after the server's delete", () => {
    const revived = pendingRecords([put("a", { title: "again", deletedAt: null }, t(5), true)]).get(JSON.stringify(["todos", "a"]));
    expect(merge(sc({ table: "todos", id: "a", op: "delete", deletedAt: t(4) }), local, revived)).toBeNull();
    expect(merge(sc({ table: "todos", id: "a", op: "delete", deletedAt: t(6) }), local, revived)).toEqual({ delete: true });
  });

  it("applies deletes, and leaves a record deleted here until the delete is pushed", () => {
    expect(merge(sc({ table: "todos", id: "a", op: "delete", deletedAt: t(1) }), local, pending.get(JSON.stringify(["todos", "a"])))).toEqual({ delete: true });
    const deleted = pendingRecords([put("a", { title: "x" }, t(1)), del("a", t(2))]).get(JSON.stringify(["todos", "a"]));
    expect(merge(sc({ table: "todos", id: "a", op: "update", data: { id: "a", title: "y" }, fields: { title: { value: "y", updatedAt: t(3), at: t(3) } } }), undefined, deleted)).toBeNull();
  });

  it("takes the server's record whole when nothing is queued", () => {
    expect(merge(sc({ table: "todos", id: "a", op: "update", data: { id: "a", title: "t" }, fields: { title: { value: "t", updatedAt: t(1), at: t(1) } } }), local, undefined)).toEqual({
      put: { id: "a", title: "t" },
    });
  });
});
