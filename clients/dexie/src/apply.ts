/**
 * Applying a server change to the local copy of a record, field by field,
 * without losing a local write the server has not yet seen: a field with
 * a queued write keeps the local value unless the server's value was
 * written later. The queued write still goes out, and the server's fold
 * settles the field on every device alike.
 */
import type { ServerChange } from "@mana-sync/client";

import { instant } from "./clock.js";
import type { PendingRecord } from "./queue.js";

type Row = Record<string, unknown>;

/** What to do with the local record. */
export type Outcome = { put: Row } | { delete: true } | null;

export function merge(change: ServerChange, local: Row | undefined, pending: PendingRecord | undefined): Outcome {
  if (change.op === "delete") {
    // Made again here after the delete (a queued `deletedAt: null`):
    // once pushed, the record is live on the server too.
    const revived = pending?.deleted ? undefined : pending?.fields.get("deletedAt");
    const deletedAt = typeof change.deletedAt === "string" ? instant(change.deletedAt) : Infinity;
    return revived !== undefined && revived >= deletedAt ? null : { delete: true };
  }
  // Deleted here, not yet pushed: the delete wins once pushed (a deleted
  // record stays deleted whatever its other fields do).
  if (pending?.deleted) return null;
  const server = (change.data ?? {}) as Row;
  // An update lists the fields written since the cursor with their times;
  // `data` is the whole record, for a device that lacks it.
  const record: Row = change.data === undefined || change.data === null ? { ...local } : { ...server };
  if (change.data === undefined || change.data === null) {
    for (const [field, { value }] of Object.entries(change.fields ?? {})) record[field] = value;
  }
  for (const [field, localAt] of pending?.fields ?? []) {
    const written = change.fields?.[field]?.at ?? change.fields?.[field]?.updatedAt;
    if (written !== undefined && instant(written) > localAt) continue;
    if (local === undefined) continue;
    if (Object.hasOwn(local, field)) record[field] = local[field];
    else delete record[field];
  }
  record.id = change.id;
  return { put: record };
}
