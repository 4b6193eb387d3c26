import { describe, expect, it } from "vitest";

import { PENDING, type PendingEntry } from "../src/tables.js";
import { database } from "./helpers.js";

async function queued(db: ReturnType<typeof database>["db"]): Promise<PendingEntry[]> {
  return db.table(PENDING).orderBy("seq").toArray();
}

describe("recording local writes", () => {
  it("queues a new record whole, then only the fields that changed, each timed", async () => {
    const { db } = database();
    await db.open();
    await db.todos.add({ id: "a", title: "milk", done: false });
    await db.todos.update("a", { done: true });
    await db.todos.put({ id: "a", title: "milk", done: true });
    const entries = await queued(db);
    expect(entries).toHaveLength(2);
    const [created, updated] = entries;
    expect(created).toMatchObject({ table: "todos", key: "a", op: "put", created: true });
    expect(Object.keys(created!.fields!)).toEqual(["title", "done"]);
    expect(created!.fields!.title!.value).toBe("milk");
    expect(updated).toMatchObject({ op: "put", created: false });
    expect(Object.keys(updated!.fields!)).toEqual(["done"]);
    expect(updated!.fields!.done!.value).toBe(true);
    expect(Date.parse(updated!.fields!.done!.at)).toBeGreaterThan(Date.parse(created!.fields!.title!.at));
  });

  it("queues deletes, by key, by range and by clear, only of records that existed", async () => {
    const { db } = database();
    await db.open();
    await db.todos.bulkAdd([
      { id: "a", title: "1" },
      { id: "b", title: "2" },
      { id: "c", title: "3" },
      { id: "d", title: "4" },
    ]);
    await db.todos.delete("a");
    await db.todos.delete("missing");
    await db.todos.where("id").between("b", "c", true, true).delete();
    await db.todos.clear();
    const deletes = (await queued(db)).filter((e) => e.op === "delete").map((e) => e.key);
    expect(deletes.sort()).toEqual(["a", "b", "c", "d"]);
  });

  it("sends a removed field as null", async () => {
    const { db } = database();
    await db.open();
    await db.todos.add({ id: "a", title: "x", note: "n" });
    await db.todos.put({ id: "a", title: "x" });
    const last = (await queued(db)).at(-1)!;
    expect(last.fields).toEqual({ note: { value: null, at: expect.any(String) } });
  });

  it("queues nothing for a write that rolls back, nor for other tables", async () => {
    const { db } = database();
    await db.open();
    await expect(
      db.transaction("rw", db.todos, async () => {
        await db.todos.add({ id: "a", title: "x" });
        throw new Error("changed my mind");
      }),
    ).rejects.toThrow("changed my mind");
    await db.table("notes").add({ id: "n", text: "not synced" });
    expect(await queued(db)).toEqual([]);
    expect(await db.todos.count()).toBe(0);
  });

  it("queues writes made in a transaction the app scoped to its own tables", async () => {
    const { db } = database();
    await db.open();
    await db.transaction("rw", db.todos, db.table("notes"), async () => {
      await db.todos.add({ id: "a", title: "x" });
      await db.todos.update("a", { title: "y" });
    });
    expect(await queued(db)).toHaveLength(2);
  });

  it("makes a record deleted here live again, clearing the fields it had", async () => {
    const { db } = database();
    await db.open();
    await db.todos.add({ id: "a", title: "old", note: "secret" });
    await db.todos.delete("a");
    await db.todos.add({ id: "a", title: "new" });
    const again = (await queued(db)).at(-1)!;
    expect(again).toMatchObject({ op: "put", created: true });
    expect(Object.fromEntries(Object.entries(again.fields!).map(([k, v]) => [k, v.value]))).toEqual({
      title: "new",
      note: null,
      deletedAt: null,
    });
    // Once live again, a later edit is an ordinary one.
    await db.todos.update("a", { title: "newer" });
    expect(Object.keys((await queued(db)).at(-1)!.fields!)).toEqual(["title"]);
  });

  it("sees a changed Date, and does not re-send what is already null or kept by the server", async () => {
    const { db } = database();
    await db.open();
    await db.todos.add({ id: "a", title: "x", due: new Date("2026-01-01"), gone: null, updatedAt: "2026-01-01T00:00:00.000Z" });
    await db.todos.update("a", { due: new Date("2026-02-01") });
    await db.todos.put({ id: "a", title: "x", due: new Date("2026-02-01") });
    const entries = await queued(db);
    expect(entries).toHaveLength(2);
    expect(Object.keys(entries[1]!.fields!)).toEqual(["due"]);
  });

  it("refuses a record whose id is not a string", async () => {
    const { db } = database();
    await db.open();
    await expect(db.todos.add({ id: 5 as unknown as string, title: "x" })).rejects.toThrow("must be a string");
    expect(await db.todos.count()).toBe(0);
  });
});
