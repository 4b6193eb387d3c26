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
});
