/**
 * Turning queued local writes into push batches. A batch is frozen (its
 * changes, its cursor and its `Idempotency-Key` stored) before it is
 * first sent, and sent again unchanged until the server answers it: a
 * retry after a lost answer is then recognised by the server and recorded
 * once. Writes made meanwhile queue behind it.
 */
import type { ChangeInput, PushRequest } from "@mana-sync/client";

import type { FieldWrite, PendingEntry } from "./tables.js";

/** A push as stored until the server answers it. */
export interface Batch {
  /** The `Idempotency-Key`: the same for every attempt. */
  key: string;
  /** The last queue entry it holds (`seq`). */
  upTo: number;
  /** How many queue entries it holds. */
  entries: number;
  body: PushRequest;
}

type Step = { kind: "fields"; fields: Record<string, FieldWrite> } | { kind: "delete"; at: string };

/**
 * The changes that carry `entries` (in queue order): one `update` per run
 * of writes to a record, holding each field's latest write, and a
 * `delete` for each delete. A new record goes as an `update` with every
 * field timed (the server creates a record it has never seen): an
 * `insert`'s `data` would take one time for all fields. Each field's time
 * goes as `at`, as the original's web client of today sends it: the
 * server then knows this device keeps its own field times, and does not
 * send its own winning writes back.
 */
export function coalesce(entries: readonly PendingEntry[]): ChangeInput[] {
  const records = new Map<string, { table: string; id: string; steps: Step[] }>();
  for (const entry of entries) {
    const name = JSON.stringify([entry.table, entry.key]);
    let record = records.get(name);
    if (record === undefined) {
      record = { table: entry.table, id: entry.key, steps: [] };
      records.set(name, record);
    }
    const last = record.steps.at(-1);
    if (entry.op === "delete") {
      if (last?.kind !== "delete") record.steps.push({ kind: "delete", at: entry.at });
      continue;
    }
    const fields = { ...entry.fields };
    if (last?.kind === "fields") {
      for (const [field, write] of Object.entries(fields)) {
        const held = last.fields[field];
        // The later write wins, as on the server (ties: queue order).
        if (held === undefined || held.at <= write.at) last.fields[field] = write;
      }
    } else {
      record.steps.push({ kind: "fields", fields });
    }
  }
  const changes: ChangeInput[] = [];
  for (const { table, id, steps } of records.values()) {
    for (const step of steps) {
      changes.push(
        step.kind === "delete"
          ? { table, id, op: "delete", deletedAt: step.at }
          : {
              table,
              id,
              op: "update",
              fields: Object.fromEntries(
                Object.entries(step.fields).map(([field, { value, at }]) => [field, { value, at }]),
              ),
            },
      );
    }
  }
  return changes;
}

/** What is still queued for one record after a batch: the state a server change must not overwrite. */
export interface PendingRecord {
  /** The last queued write deletes the record. */
  deleted: boolean;
  /** Each field's latest queued write time (ms); `deletedAt`'s is when the record was made again. */
  fields: Map<string, number>;
}

/** Queued writes by record (`JSON.stringify([table, key])`), in queue order. */
export function pendingRecords(entries: readonly PendingEntry[]): Map<string, PendingRecord> {
  const records = new Map<string, PendingRecord>();
  for (const entry of entries) {
    const name = JSON.stringify([entry.table, entry.key]);
    const record = records.get(name) ?? { deleted: false, fields: new Map<string, number>() };
    records.set(name, record);
    record.deleted = entry.op === "delete";
    for (const [field, { at }] of Object.entries(entry.fields ?? {})) {
      record.fields.set(field, Math.max(record.fields.get(field) ?? 0, Date.parse(at)));
    }
  }
  return records;
}
