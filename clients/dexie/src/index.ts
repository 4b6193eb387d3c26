/**
 * Sync a Dexie.js database with mana-sync.
 *
 * ```ts
 * const db = new Dexie("todo");
 * db.version(1).stores({ todos: "id, done", ...syncStores });
 * const sync = syncDexie(db, { url: "http://localhost:3050", appId: "todo", tables: ["todos"], token: getJwt });
 * sync.start();
 * sync.status.subscribe((s) => render(s.state, s.pending));
 * ```
 */
import type { Dexie } from "dexie";

import { SyncEngine, type SyncOptions } from "./engine.js";

export { SyncEngine, type SyncOptions, type SyncStats } from "./engine.js";
export type { RemoteChange } from "./round.js";
export type { SyncState, SyncStatus, Observer, Subscription } from "./status.js";
export type { Rejected } from "./store.js";
export type { BackoffOptions } from "./backoff.js";
export type { Locks } from "./election.js";
export { syncStores } from "./tables.js";

/**
 * Records every write to `options.tables` from now on and returns the
 * engine that syncs them; call it before the database is opened, and
 * `start()` the engine once the user is known.
 */
export function syncDexie(db: Dexie, options: SyncOptions): SyncEngine {
  return new SyncEngine(db, options);
}
