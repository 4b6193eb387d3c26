/**
 * The adapter's reads and writes of the app's database: freezing a batch,
 * acknowledging or rejecting it, and applying a page of server changes
 * with its cursor in one transaction (so a page is applied exactly when
 * its cursor moves).
 */
import type { PushRequest, ServerChange } from "@mana-sync/client";
import type { Dexie, Table } from "dexie";

import { merge } from "./apply.js";
import type { Applying } from "./capture.js";
import { coalesce, pendingRecords, type Batch } from "./queue.js";
import { DELETED, PENDING, STATE, stateKey, type PendingEntry, type Tombstone } from "./tables.js";

/** How many rejected batches are kept for the app to look at. */
const REJECTED_KEPT = 100;

/** A batch the server refused (a 4xx other than 401, 408 and 429), kept for inspection. */
export interface Rejected {
  batch: Batch;
  error: string;
  at: string;
}

/** What every push says of its changes: the schema version, and who made them and how, as the app says. */
export type Provenance = Pick<PushRequest, "schemaVersion" | "actor" | "origin">;

export class SyncStore {
  constructor(
    private readonly db: Dexie,
    private readonly tables: readonly string[],
    private readonly applying: Applying,
    private readonly provenance: Provenance,
  ) {}

  private get pending(): Table<PendingEntry, number> {
    return this.db.table(PENDING);
  }

  private get state(): Table<unknown, string> {
    return this.db.table(STATE);
  }

  /** This device's id, made once and kept. */
  clientId(): Promise<string> {
    return this.db.transaction("rw", this.state, async () => {
      const held = await this.state.get(stateKey.clientId);
      if (typeof held === "string") return held;
      const made = crypto.randomUUID();
      await this.state.put(made, stateKey.clientId);
      return made;
    });
  }

  cursor(table: string): Promise<string | undefined> {
    return this.state.get(stateKey.cursor(table)) as Promise<string | undefined>;
  }

  /** The batch in flight, else a new one of at most `limit` queue entries; `null` when nothing is queued. */
  nextBatch(clientId: string, limit: number): Promise<Batch | null> {
    return this.db.transaction("rw", this.pending, this.state, async () => {
      const held = (await this.state.get(stateKey.inflight)) as Batch | undefined;
      if (held !== undefined) return held;
      const entries = await this.pending.orderBy("seq").limit(limit).toArray();
      const last = entries.at(-1);
      if (last?.seq === undefined) return null;
      // Everything since the oldest cursor comes back with the answer;
      // a table never pulled yet makes that the beginning.
      const cursors = await Promise.all(this.tables.map((t) => this.cursor(t)));
      const since = cursors.includes(undefined) ? undefined : (cursors as string[]).sort()[0];
      const batch: Batch = {
        key: crypto.randomUUID(),
        upTo: last.seq,
        entries: entries.length,
        body: { clientId, changes: coalesce(entries), ...this.provenance, ...(since === undefined ? {} : { since }) },
      };
      await this.state.put(batch, stateKey.inflight);
      return batch;
    });
  }

  /** Forgets the batch in flight without sending it (to send fewer entries at a time). */
  async unfreeze(): Promise<void> {
    await this.state.delete(stateKey.inflight);
  }

  /** Drops a refused batch's entries from the queue, keeping the batch for inspection. */
  reject(batch: Batch, error: string): Promise<void> {
    return this.db.transaction("rw", this.pending, this.state, async () => {
      await this.pending.where("seq").belowOrEqual(batch.upTo).delete();
      await this.state.delete(stateKey.inflight);
      const kept = ((await this.state.get(stateKey.rejected)) as Rejected[] | undefined) ?? [];
      kept.push({ batch, error, at: new Date().toISOString() });
      await this.state.put(kept.slice(-REJECTED_KEPT), stateKey.rejected);
    });
  }

  async rejected(): Promise<Rejected[]> {
    return ((await this.state.get(stateKey.rejected)) as Rejected[] | undefined) ?? [];
  }

  /**
   * Applies `changes` (those of the synced tables), acknowledges `ack`
   * (its entries leave the queue) and moves `cursors` forward, in one
   * transaction. The adapter's own writes are not queued.
   */
  async apply(changes: readonly ServerChange[], cursors: Record<string, string>, ack?: Batch): Promise<void> {
    const byTable = new Map<string, ServerChange[]>();
    for (const change of changes) {
      if (!this.tables.includes(change.table)) continue;
      const list = byTable.get(change.table);
      if (list === undefined) byTable.set(change.table, [change]);
      else list.push(change);
    }
    const scope = [...byTable.keys(), PENDING, STATE, DELETED];
    await this.db.transaction("rw", scope, async (tx) => {
      this.applying.add(tx.idbtrans);
      if (ack !== undefined) {
        await this.pending.where("seq").belowOrEqual(ack.upTo).delete();
        await this.state.delete(stateKey.inflight);
      }
      for (const [table, list] of byTable) await this.applyTable(table, list);
      for (const [table, cursor] of Object.entries(cursors)) {
        const held = await this.cursor(table);
        // Cursors are fixed-width UTC times: ordered as strings.
        if (held === undefined || cursor > held) await this.state.put(cursor, stateKey.cursor(table));
      }
    });
  }

  private async applyTable(table: string, changes: readonly ServerChange[]): Promise<void> {
    const name = (id: string) => JSON.stringify([table, id]);
    // Mostly the queue is empty: then there is nothing to look up in it.
    const queued =
      (await this.pending.count()) === 0
        ? []
        : await this.pending
            .where("[table+key]")
            .anyOf(changes.map((c) => [table, c.id]))
            .toArray();
    queued.sort((a, b) => (a.seq ?? 0) - (b.seq ?? 0));
    const pending = pendingRecords(queued);
    // The local copies a merge reads: of records with queued writes, of
    // changes without the whole record, and of deleted records (whose
    // fields are remembered). A page of new records reads none.
    const read = changes.filter((c) => pending.has(name(c.id)) || c.op === "delete" || !c.data).map((c) => c.id);
    const found = await this.db.table(table).bulkGet(read);
    const locals = new Map(read.map((id, i) => [id, found[i] as Record<string, unknown> | undefined]));
    const puts: Record<string, unknown>[] = [];
    const deletes: string[] = [];
    const graves: Tombstone[] = [];
    for (const change of changes) {
      const local = locals.get(change.id);
      const outcome = merge(change, local, pending.get(name(change.id)));
      if (outcome === null) continue;
      if ("put" in outcome) {
        puts.push(outcome.put);
      } else {
        deletes.push(change.id);
        graves.push({ table, key: change.id, fields: Object.keys(local ?? {}) });
      }
    }
    await this.db.table(table).bulkPut(puts);
    await this.db.table(table).bulkDelete(deletes);
    await this.db.table(DELETED).bulkPut(graves);
  }
}
