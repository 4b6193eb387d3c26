import { Dexie } from "dexie";

import { syncDexie, syncStores, type SyncEngine, type SyncOptions } from "../src/index.js";

export interface Todo {
  id: string;
  title: string;
  done?: boolean;
  [field: string]: unknown;
}

export type TodoDb = Dexie & { todos: Dexie.Table<Todo, string> };

let made = 0;

/** A fresh database (its own name) with the adapter installed, not yet started. */
export function database(options: Partial<SyncOptions> = {}, name = `test-${++made}-${Math.random()}`): {
  db: TodoDb;
  engine: SyncEngine;
} {
  const db = new Dexie(name) as TodoDb;
  db.version(1).stores({ todos: "id", notes: "id", ...syncStores });
  const engine = syncDexie(db, {
    url: "http://sync.test",
    appId: "todo",
    tables: ["todos"],
    token: () => "token",
    live: false,
    locks: null,
    backoff: { base: 5, cap: 20 },
    ...options,
  });
  return { db, engine };
}

/** Waits until `check` holds (polling), or fails after `ms`. */
export async function eventually(check: () => boolean | Promise<boolean>, ms = 2000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error("timed out waiting for a condition");
    await new Promise((r) => setTimeout(r, 5));
  }
}

/** An unsigned JWT with the given claims (only the server verifies). */
export function jwt(claims: Record<string, unknown>): string {
  const part = (o: object) => btoa(JSON.stringify(o)).replace(/=+$/, "").replace(/\+/g, "-").replace(/\//g, "_");
  return `${part({ alg: "EdDSA" })}.${part(claims)}.sig`;
}
