/**
 * One round of syncing: push the whole queue, batch by batch, then pull
 * each wanted table page by page until `hasMore` is false. A stuck push
 * does not keep other devices' changes out: the pulls still run, and the
 * push's failure is reported after them.
 */
import type { ServerChange } from "@mana-sync/client";

import type { SyncStore } from "./store.js";
import { SyncFailure, type Transport } from "./transport.js";

/** A server change as `onRemoteChange` is told of it. */
export type RemoteChange = Pick<ServerChange, "table" | "id" | "op" | "eventId" | "schemaVersion" | "actor" | "origin" | "spaceId">;

/** Counters shared with the engine's `stats`. */
export interface Counters {
  pushes: number;
  pushedChanges: number;
  pulls: number;
  pulledRecords: number;
  retries: number;
}

export interface RoundOptions {
  tables: readonly string[];
  batchSize: number;
  pullLimit: number;
  onRemoteChange?: (change: RemoteChange) => void;
}

export class Rounds {
  /** Queue entries per push now: halved to find a refused change, or for a 413. */
  private batchLimit: number;
  /** The most a push may hold without a 413 (as far as known). */
  private sizeLimit: number;

  constructor(
    private readonly store: SyncStore,
    private readonly options: RoundOptions,
    private readonly counters: Counters,
  ) {
    this.batchLimit = options.batchSize;
    this.sizeLimit = options.batchSize;
  }

  /**
   * Pushes, then pulls `wanted` (emptied as pulled; what is left when a
   * pull fails stays wanted). Returns the refusal messages of batches the
   * server refused; throws a failure to retry.
   */
  async run(transport: Transport, clientId: string, wanted: Set<string>, signal: AbortSignal): Promise<string[]> {
    let refused: string[] = [];
    let failure: unknown;
    try {
      refused = await this.push(transport, clientId, wanted, signal);
    } catch (e) {
      failure = e;
    }
    if (!signal.aborted) {
      // Taken before pulling: a notice that comes during a pull asks again.
      const tables = [...wanted];
      wanted.clear();
      for (const [i, table] of tables.entries()) {
        try {
          await this.pull(transport, table, signal);
        } catch (e) {
          for (const t of tables.slice(i)) wanted.add(t);
          throw failure ?? e;
        }
      }
    }
    if (failure !== undefined) throw failure;
    return refused;
  }

  /** Pushes the queue; an answer cut short (`hasMore`) leaves the tables to pull. */
  private async push(transport: Transport, clientId: string, wanted: Set<string>, signal: AbortSignal): Promise<string[]> {
    const refused: string[] = [];
    while (!signal.aborted) {
      const batch = await this.store.nextBatch(clientId, this.batchLimit);
      if (batch === null) break;
      let answer;
      try {
        answer = await transport.push(batch.body, batch.key, signal);
      } catch (e) {
        if (!(e instanceof SyncFailure) || e.kind !== "rejected") throw e;
        if (batch.entries > 1) {
          // Send it in halves: to fit (413), or to find the one change
          // the server refuses and send every other.
          this.batchLimit = Math.ceil(batch.entries / 2);
          if (e.status === 413) this.sizeLimit = this.batchLimit;
          await this.store.unfreeze();
          continue;
        }
        await this.store.reject(batch, e.message);
        refused.push(e.message);
        this.batchLimit = this.sizeLimit;
        continue;
      }
      this.counters.pushes += 1;
      this.counters.pushedChanges += batch.body.changes.length;
      // The answer holds every table's changes since the oldest cursor: all
      // cursors move to it, unless it was cut short (then pull the rest).
      const { tables } = this.options;
      const cursors = answer.hasMore ? {} : Object.fromEntries(tables.map((t) => [t, answer.syncedUntil]));
      await this.store.apply(answer.serverChanges, cursors, batch);
      this.announce(answer.serverChanges);
      if (answer.hasMore) for (const t of tables) wanted.add(t);
    }
    return refused;
  }

  /** Tells the app of applied server changes, with who made them. */
  private announce(changes: readonly ServerChange[]): void {
    const tell = this.options.onRemoteChange;
    if (tell === undefined) return;
    for (const { table, id, op, eventId, schemaVersion, actor, origin, spaceId } of changes) {
      if (!this.options.tables.includes(table)) continue;
      tell({ table, id, op, eventId, schemaVersion, ...(actor ? { actor } : {}), ...(origin ? { origin } : {}), ...(spaceId ? { spaceId } : {}) });
    }
  }

  /** Pulls `table` page by page until the server has no more. */
  private async pull(transport: Transport, table: string, signal: AbortSignal): Promise<void> {
    while (!signal.aborted) {
      const page = await transport.pull(table, await this.store.cursor(table), this.options.pullLimit, signal);
      await this.store.apply(page.serverChanges, { [table]: page.syncedUntil });
      this.announce(page.serverChanges);
      this.counters.pulls += 1;
      this.counters.pulledRecords += page.serverChanges.length;
      if (!page.hasMore) return;
    }
  }
}
