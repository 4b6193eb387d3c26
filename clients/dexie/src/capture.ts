/**
 * Recording local writes: a DBCore middleware on the synced tables that,
 * in the same IndexedDB transaction as each write, queues what changed,
 * field by field, each field with the time it was written. Since the
 * queue commits with the write or not at all, no acknowledged local write
 * is ever missing from it.
 */
import type { DBCore, DBCoreMutateRequest, DBCoreMutateResponse, DBCoreTable, Middleware } from "dexie";

import type { Clock } from "./clock.js";
import { DELETED, PENDING, SERVER_FIELDS, type FieldWrite, type PendingEntry, type Tombstone } from "./tables.js";

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
          // A write to a synced table needs the queue and the deleted
          // records in its transaction.
          const widened =
            mode === "readwrite" && stores.some((s) => synced.has(s))
              ? [...new Set([...stores, PENDING, DELETED])]
              : stores;
          return down.transaction(widened, mode, options);
        },
        table(name) {
          const table = down.table(name);
          if (!synced.has(name)) return table;
          const queue = down.table(PENDING);
          const deleted = down.table(DELETED);
          return {
            ...table,
            mutate: (req) => (applying.has(req.trans) ? table.mutate(req) : recorded(table, queue, deleted, req, clock)),
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
  deleted: DBCoreTable,
  req: DBCoreMutateRequest,
  clock: Clock,
): Promise<DBCoreMutateResponse> {
  const trans = req.trans;
  const write = (keys: unknown[]) => {
    const bad = keys.find((k) => typeof k !== "string");
    if (bad !== undefined) {
      throw new TypeError(`${table.name}: a synced record's id must be a string, not ${typeof bad} ${String(bad)}`);
    }
    const ids = keys as string[];
    const tombstones = ids.map((key) => [table.name, key]);
    return table.getMany({ trans, keys: ids }).then((before: (Row | undefined)[]) =>
      deleted.getMany({ trans, keys: tombstones }).then((graves: (Tombstone | undefined)[]) =>
        table.mutate(req).then((response) => {
          const at = clock.stamp();
          const entries: PendingEntry[] = [];
          const buried: Tombstone[] = [];
          const revived: unknown[] = [];
          ids.forEach((key, i) => {
            if (response.failures[i] !== undefined) return;
            const old = before[i];
            if (req.type === "add" || req.type === "put") {
              const entry = written(table.name, key, old, req.values[i] as Row, at, graves[i]);
              if (entry !== null) entries.push(entry);
              if (graves[i] !== undefined) revived.push(tombstones[i]);
            } else if (old !== undefined) {
              entries.push({ table: table.name, key, op: "delete", at });
              buried.push({ table: table.name, key, fields: Object.keys(old) });
            }
          });
          return Promise.all([
            entries.length > 0 ? queue.mutate({ type: "add", trans, values: entries }) : null,
            buried.length > 0 ? deleted.mutate({ type: "put", trans, values: buried }) : null,
            revived.length > 0 ? deleted.mutate({ type: "delete", trans, keys: revived }) : null,
          ]).then(() => response);
        }),
      ),
    );
  };
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
        .query({ trans, query: { index: table.schema.primaryKey, range: req.range }, values: false })
        .then(({ result }) => write(result));
  }
}

/**
 * The queue entry for writing `after` over `before`: every field of a new
 * record, else only the fields whose value changed (a removed field is
 * sent as `null`: the protocol has no field removal; `deletedAt` and
 * `updatedAt`, which the server keeps, are not removed by leaving them
 * out). A record made again after a delete (`grave`) says it is live and
 * clears the fields it had then. `null` when nothing changed.
 */
export function written(
  table: string,
  key: string,
  before: Row | undefined,
  after: Row,
  at: string,
  grave?: Tombstone,
): PendingEntry | null {
  const fields: Record<string, FieldWrite> = {};
  const names = new Set([...Object.keys(after), ...(before ? Object.keys(before) : [])]);
  names.delete("id");
  for (const name of names) {
    if (!Object.hasOwn(after, name) && SERVER_FIELDS.has(name)) continue;
    if (before === undefined || !sameValue(before[name] ?? null, after[name] ?? null)) {
      fields[name] = { value: after[name] ?? null, at };
    }
  }
  if (before === undefined && grave !== undefined) {
    for (const name of grave.fields) {
      if (name !== "id" && !SERVER_FIELDS.has(name) && !Object.hasOwn(after, name)) fields[name] = { value: null, at };
    }
    if (!Object.hasOwn(after, "deletedAt")) fields.deletedAt = { value: null, at };
  }
  if (before !== undefined && Object.keys(fields).length === 0) return null;
  return { table, key, op: "put", at, fields, created: before === undefined };
}

/**
 * Deep equality of two field values as they go on the wire: plain objects
 * and arrays member by member, anything else (a `Date`, say) by its JSON.
 */
export function sameValue(a: unknown, b: unknown): boolean {
  if (a === b) return true;
  if (typeof a !== "object" || typeof b !== "object" || a === null || b === null) return false;
  if (!plain(a) || !plain(b)) return JSON.stringify(a) === JSON.stringify(b);
  if (Array.isArray(a) !== Array.isArray(b)) return false;
  const ak = Object.keys(a);
  const bk = Object.keys(b);
  if (ak.length !== bk.length) return false;
  return ak.every((k) => Object.hasOwn(b, k) && sameValue((a as Row)[k], (b as Row)[k]));
}

function plain(value: object): boolean {
  const proto = Object.getPrototypeOf(value);
  return proto === Object.prototype || proto === Array.prototype || proto === null;
}
