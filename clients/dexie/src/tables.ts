/**
 * The adapter's own tables, kept in the app's database so that a local
 * write and its queue entry commit in one IndexedDB transaction.
 */

/** The queue of local writes not yet acknowledged by the server. */
export const PENDING = "_manaSyncPending";
/** Cursors, the device's id and the batch in flight, by key. */
export const STATE = "_manaSyncState";
/**
 * Records deleted on this device (here or by a pulled delete), with the
 * fields they had: a record made again under the same id must say it is
 * live (`deletedAt: null`) and clear those fields, or the server keeps it
 * deleted, or brings the old fields back.
 */
export const DELETED = "_manaSyncDeleted";

/**
 * Spread into the app's schema next to its own tables:
 * `db.version(1).stores({ todos: "id, done", ...syncStores })`.
 */
export const syncStores = {
  [PENDING]: "++seq, [table+key]",
  [STATE]: "",
  [DELETED]: "[table+key]",
} as const;

/** A record deleted on this device: its fields when deleted. */
export interface Tombstone {
  table: string;
  key: string;
  fields: string[];
}

/**
 * Fields the server keeps itself: `deletedAt` (a delete writes it) and
 * `updatedAt` (it adds the record's latest write time). A record put
 * without them has not removed them.
 */
export const SERVER_FIELDS: ReadonlySet<string> = new Set(["deletedAt", "updatedAt"]);

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
