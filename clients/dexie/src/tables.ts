/**
 * The adapter's own tables, kept in the app's database so that a local
 * write and its queue entry commit in one IndexedDB transaction.
 */

/** The queue of local writes not yet acknowledged by the server. */
export const PENDING = "_manaSyncPending";
/** Cursors, the device's id and the batch in flight, by key. */
export const STATE = "_manaSyncState";

/**
 * Spread into the app's schema next to its own tables:
 * `db.version(1).stores({ todos: "id, done", ...syncStores })`.
 */
export const syncStores = {
  [PENDING]: "++seq, [table+key]",
  [STATE]: "",
} as const;

/** One field's new value and when this device wrote it (ISO 8601). */
export interface FieldWrite {
  value: unknown;
  at: string;
}

/** One local write of one record, as queued. */
export interface PendingEntry {
  /** Queue order (auto-incremented). */
  seq?: number;
  table: string;
  key: string;
  /** `put`: `fields` were written; `delete`: the record was deleted at `at`. */
  op: "put" | "delete";
  at: string;
  /** The changed fields only (every field when the record was created). */
  fields?: Record<string, FieldWrite>;
  /** The record did not exist on this device before this write. */
  created?: boolean;
}

/** Keys of the rows of [`STATE`]. */
export const stateKey = {
  clientId: "clientId",
  inflight: "inflight",
  rejected: "rejected",
  cursor: (table: string) => `cursor:${table}`,
};
