/**
 * Recording local writes: a DBCore middleware on the synced tables that,
 * in the same IndexedDB transaction as each write, queues what changed,
 * field by field, each field with the time it was written. Since the
 * queue commits with the write or not at all, no acknowledged local write
 * is ever missing from it.
 */
import type { DBCore, DBCoreMutateRequest, DBCoreMutateResponse, DBCoreTable, Middleware } from "dexie";

import type { Clock } from "./clock.js";
import { PENDING, type FieldWrite, type PendingEntry } from "./tables.js";

/** Transactions in which the adapter applies server changes: not recorded. */
export type Applying = WeakSet<object>;

type Row = Record<string, unknown>;

export function captureMiddleware(synced: ReadonlySet<string>, clock: Clock, applying: Applying): Middleware<DBCore> {
  return {
    stack: "dbcore",
    name: "ManaSyncCapture",
    create(down) {
      return {
        ...down,
        transaction(stores, mode, options) {
          // A write to a synced table needs the queue in its transaction.
          const widened =
            mode === "readwrite" && stores.some((s) => synced.has(s)) && !stores.includes(PENDING)
              ? [...stores, PENDING]
              : stores;
          return down.transaction(widened, mode, options);
        },
        table(name) {
          const table = down.table(name);
          if (!synced.has(name)) return table;
          const queue = down.table(PENDING);
          return {
            ...table,
            mutate: (req) => (applying.has(req.trans) ? table.mutate(req) : recorded(table, queue, req, clock)),
          };
        },
      };
    },
  };
}

/**
 * Written with `.then` on the promises DBCore returns, not `async`/`await`:
 * those are Dexie's own promises, which carry the transaction's context
 * (its zone) to the next step; a native `await` would lose it.
 */
function recorded(
  table: DBCoreTable,
  queue: DBCoreTable,
  req: DBCoreMutateRequest,
  clock: Clock,
): Promise<DBCoreMutateResponse> {
  const write = (keys: unknown[]) =>
    table.getMany({ trans: req.trans, keys }).then((before: (Row | undefined)[]) =>
      table.mutate(req).then((response) => {
        const at = clock.stamp();
        const entries: PendingEntry[] = [];
        keys.forEach((key, i) => {
          if (response.failures[i] !== undefined) return;
          const entry =
            req.type === "add" || req.type === "put"
              ? written(table.name, key, before[i], req.values[i] as Row, at)
              : before[i] !== undefined
                ? { table: table.name, key: String(key), op: "delete" as const, at }
                : null;
          if (entry !== null) entries.push(entry);
        });
        if (entries.length === 0) return response;
        return queue.mutate({ type: "add", trans: req.trans, values: entries }).then(() => response);
      }),
    );
  switch (req.type) {
    case "add":
    case "put": {
      const extract = table.schema.primaryKey.extractKey;
      if (extract === null) throw new Error(`${table.name}: a synced table needs an inbound primary key ("id")`);
      return write(req.keys ?? req.values.map((v) => extract(v)));
    }
    case "delete":
      return write(req.keys);
    case "deleteRange":
      // `clear()` and `where(...).delete()`: list the keys first, so that
      // each deleted record is queued as a delete.
      return table
        .query({ trans: req.trans, query: { index: table.schema.primaryKey, range: req.range }, values: false })
        .then(({ result }) => write(result));
  }
}

/**
 * The queue entry for writing `after` over `before`: every field of a new
 * record, else only the fields whose value changed (a removed field is
 * sent as `null`: the protocol has no field removal). `null` when nothing
 * changed.
 */
export function written(table: string, key: unknown, before: Row | undefined, after: Row, at: string): PendingEntry | null {
  const fields: Record<string, FieldWrite> = {};
  const names = new Set([...Object.keys(after), ...(before ? Object.keys(before) : [])]);
  names.delete("id");
  for (const name of names) {
    if (before === undefined || !sameValue(before[name], after[name])) {
      fields[name] = { value: after[name] ?? null, at };
    }
  }
  if (before !== undefined && Object.keys(fields).length === 0) return null;
  return { table, key: String(key), op: "put", at, fields, created: before === undefined };
}

/** Deep equality of two JSON values (what a field can hold on the wire). */
export function sameValue(a: unknown, b: unknown): boolean {
  if (a === b) return true;
  if (typeof a !== "object" || typeof b !== "object" || a === null || b === null) return false;
  if (Array.isArray(a) !== Array.isArray(b)) return false;
  const ak = Object.keys(a);
  const bk = Object.keys(b);
  if (ak.length !== bk.length) return false;
  return ak.every((k) => Object.hasOwn(b, k) && sameValue((a as Row)[k], (b as Row)[k]));
}
