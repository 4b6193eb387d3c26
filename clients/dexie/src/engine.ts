/**
 * The sync engine: in the leading tab, pushes the queue batch by batch,
 * pulls each table page by page until `hasMore` is false, and pulls again
 * whenever the socket says so (or, while the socket is down, on a timer).
 * Failures are retried with a backoff (the server's `Retry-After` when it
 * gives one); nothing is dropped but a batch the server refuses as
 * malformed, which is kept for the app to look at.
 */
import { liveQuery, type Dexie } from "dexie";

import { backoffDelay, defaultBackoff, sleep, type BackoffOptions } from "./backoff.js";
import { captureMiddleware } from "./capture.js";
import { Clock } from "./clock.js";
import { browserLocks, elect, type Locks } from "./election.js";
import { LiveSocket } from "./socket.js";
import { StatusStore, type SyncStatus } from "./status.js";
import { SyncStore, type Rejected } from "./store.js";
import { PENDING, STATE } from "./tables.js";
import { TokenSource, type TokenGetter } from "./token.js";
import { SyncFailure, Transport } from "./transport.js";

export interface SyncOptions {
  /** The server, e.g. `http://localhost:3050`. */
  url: string;
  /** The app id: `/sync/{appId}`. */
  appId: string;
  /** The tables to sync (each with an inbound string primary key `id`). */
  tables: readonly string[];
  /** The user's JWT; asked again before it expires and after a 401. */
  token: TokenGetter;
  /** Most queued writes per push (default 500). */
  batchSize?: number;
  /** Records per pull page (default 1000; the server allows up to 5000). */
  pullLimit?: number;
  /** How often to pull while the socket is down, in ms (default 30 s). */
  pollInterval?: number;
  /** Retry delays (default: from 0.5 s, doubling, up to 30 s, jittered). */
  backoff?: BackoffOptions;
  /** Open the live socket (default true). */
  live?: boolean;
  /** Tab election; default `navigator.locks`, `null` to always lead. */
  locks?: Locks | null;
  fetch?: typeof globalThis.fetch;
  WebSocket?: typeof globalThis.WebSocket;
}

/** Counters, for a status page (and the tests). */
export interface SyncStats {
  pushes: number;
  pushedChanges: number;
  pulls: number;
  pulledRecords: number;
  retries: number;
  socketsOpened: number;
  tokenRenewals: number;
}

type Message = { status: Partial<SyncStatus> } | { hello: true } | { sync: true };

export class SyncEngine {
  readonly status = new StatusStore();
  private readonly counters = { pushes: 0, pushedChanges: 0, pulls: 0, pulledRecords: 0, retries: 0 };
  private readonly store: SyncStore;
  private readonly tokens: TokenSource;
  private readonly synced: ReadonlySet<string>;
  private readonly wanted = new Set<string>();
  private dirty = false;
  private wake: () => void = () => {};
  private waiters: (() => void)[] = [];
  private running: { abort: AbortController; done: Promise<void>; teardown: () => void } | null = null;
  private channel: BroadcastChannel | null = null;
  private socket: LiveSocket | null = null;
  private batchLimit: number;

  constructor(
    private readonly db: Dexie,
    private readonly options: SyncOptions,
  ) {
    if (db.isOpen()) throw new Error("syncDexie(db) must be called before the database is opened");
    this.synced = new Set(options.tables);
    const applying = new WeakSet<object>();
    db.use(captureMiddleware(this.synced, new Clock(), applying));
    this.store = new SyncStore(db, options.tables, applying);
    this.tokens = new TokenSource(options.token);
    this.batchLimit = options.batchSize ?? 500;
  }

  /** Starts syncing (in this tab once it leads). Opens the database if needed. */
  start(): void {
    if (this.running !== null) return;
    const abort = new AbortController();
    const channel = typeof BroadcastChannel === "function" ? new BroadcastChannel(`mana-sync:${this.db.name}`) : null;
    const pending = liveQuery(() => this.db.table(PENDING).count()).subscribe({
      next: (count) => {
        this.status.update({ pending: count });
        if (count > 0) this.kick();
      },
      error: (e) => this.status.update({ state: "error", lastError: String(e) }),
    });
    // Followers show the leader's status; a new follower asks for it.
    const mirrored = this.status.subscribe((s) => {
      if (s.leader) this.post(channel, { status: shared(s) });
    });
    if (channel !== null) {
      channel.onmessage = ({ data }: MessageEvent<Message>) => {
        if ("status" in data && !this.status.current.leader) this.status.update(data.status);
        if ("hello" in data && this.status.current.leader) this.post(channel, { status: shared(this.status.current) });
        if ("sync" in data) this.want(this.options.tables);
      };
      this.post(channel, { hello: true });
    }
    const done = this.db
      .open()
      .then(() => {
        this.check();
        const locks = this.options.locks === undefined ? browserLocks() : this.options.locks;
        return elect(locks, `mana-sync:${this.db.name}:${this.options.appId}`, abort.signal, () => {
          const led = this.lead(abort.signal);
          return () => led;
        });
      })
      .catch((e: unknown) => this.status.update({ state: "error", lastError: String(e) }));
    this.running = {
      abort,
      done,
      teardown: () => {
        pending.unsubscribe();
        mirrored.unsubscribe();
        channel?.close();
      },
    };
    this.channel = channel;
  }

  /** Stops syncing; another tab takes over. Local writes are still queued. */
  async stop(): Promise<void> {
    const running = this.running;
    if (running === null) return;
    this.running = null;
    running.abort.abort();
    this.wake();
    await running.done.catch(() => {});
    running.teardown();
  }

  /**
   * Pushes what is queued and pulls every table now; resolves when that is
   * done (at once in a tab that does not lead: the leader is asked).
   */
  sync(): Promise<void> {
    if (!this.status.current.leader) {
      this.post(this.channel, { sync: true });
      return Promise.resolve();
    }
    this.want(this.options.tables);
    return new Promise((resolve) => this.waiters.push(resolve));
  }

  /** The batches the server refused as malformed (their changes were not recorded). */
  rejected(): Promise<Rejected[]> {
    return this.store.rejected();
  }

  get stats(): SyncStats {
    return {
      ...this.counters,
      socketsOpened: this.socket?.counts.opened ?? 0,
      tokenRenewals: this.socket?.counts.renewed ?? 0,
    };
  }

  /** The schema must hold the adapter's tables and give each synced table an `id` key. */
  private check(): void {
    for (const name of [PENDING, STATE]) {
      if (!this.db.tables.some((t) => t.name === name)) {
        throw new Error(`the database has no ${name} table: add ...syncStores to its stores()`);
      }
    }
    for (const name of this.options.tables) {
      const table = this.db.tables.find((t) => t.name === name);
      if (table?.schema.primKey.keyPath !== "id" || table.schema.primKey.auto) {
        throw new Error(`synced table ${name} needs the primary key "id" (inbound, not auto-incremented)`);
      }
    }
  }

  private post(channel: BroadcastChannel | null, message: Message): void {
    channel?.postMessage(message);
  }

  private want(tables: Iterable<string>): void {
    for (const t of tables) if (this.synced.has(t)) this.wanted.add(t);
    this.kick();
  }

  private kick(): void {
    this.dirty = true;
    this.wake();
  }

  /** Waits for a kick, `ms` or the end; returns whether it timed out. */
  private idle(signal: AbortSignal, ms: number): Promise<boolean> {
    if (this.dirty || signal.aborted) return Promise.resolve(false);
    return new Promise((resolve) => {
      const timer = setTimeout(() => finish(true), ms);
      this.wake = () => finish(false);
      function finish(timedOut: boolean) {
        clearTimeout(timer);
        resolve(timedOut);
      }
    });
  }

  /** The leader's loop, until `signal` aborts. */
  private async lead(signal: AbortSignal): Promise<void> {
    this.status.update({ leader: true });
    const { url, appId, tables } = this.options;
    const clientId = await this.store.clientId();
    const transport = new Transport(url, appId, clientId, this.tokens, this.options.fetch);
    const retryNow = { controller: new AbortController() };
    const online = () => {
      retryNow.controller.abort();
      this.socket?.retryNow();
      this.want(tables);
    };
    const offline = () => this.status.update({ state: "offline" });
    globalThis.addEventListener?.("online", online);
    globalThis.addEventListener?.("offline", offline);
    if (this.options.live !== false) {
      this.socket = new LiveSocket({
        url,
        clientId,
        tokens: this.tokens,
        backoff: this.options.backoff ?? defaultBackoff,
        ...(this.options.WebSocket ? { WebSocket: this.options.WebSocket } : {}),
        events: {
          notice: (app, named) => app === appId && this.want(named.length > 0 ? named : tables),
          connected: (live) => this.status.update({ connected: live }),
        },
      });
      this.socket.start();
    }
    this.want(tables);
    let attempt = 0;
    try {
      while (!signal.aborted) {
        if (!this.dirty) {
          const polled = this.socket?.isLive ? Infinity : (this.options.pollInterval ?? 30_000);
          if (await this.idle(signal, Math.min(polled, 2 ** 31 - 1))) this.want(tables);
          continue;
        }
        this.dirty = false;
        const waiters = this.waiters.splice(0);
        this.status.update({ state: "syncing" });
        try {
          const refused = await this.cycle(transport, clientId);
          attempt = 0;
          this.status.update({ state: refused ? "error" : "idle", lastSyncAt: new Date().toISOString() });
          for (const resolve of waiters) resolve();
        } catch (e) {
          if (signal.aborted) break;
          this.waiters.unshift(...waiters);
          const failure = e instanceof SyncFailure ? e : new SyncFailure("server", String(e));
          if (failure.kind === "auth") this.tokens.invalidate();
          this.status.update({ state: failure.kind === "network" ? "offline" : "error", lastError: failure.message });
          this.counters.retries += 1;
          this.dirty = true;
          retryNow.controller = new AbortController();
          const delay = failure.retryAfterMs ?? backoffDelay(attempt++, this.options.backoff);
          await sleep(delay, AbortSignal.any([signal, retryNow.controller.signal]));
        }
      }
    } finally {
      globalThis.removeEventListener?.("online", online);
      globalThis.removeEventListener?.("offline", offline);
      this.socket?.stop();
      this.status.update({ leader: false, connected: false });
    }
  }

  /** Pushes the whole queue, then pulls the wanted tables. Returns whether a batch was refused. */
  private async cycle(transport: Transport, clientId: string): Promise<boolean> {
    let refused = false;
    for (;;) {
      const batch = await this.store.nextBatch(clientId, this.batchLimit);
      if (batch === null) break;
      let answer;
      try {
        answer = await transport.push(batch.body, batch.key);
      } catch (e) {
        if (!(e instanceof SyncFailure) || e.kind !== "rejected") throw e;
        if (e.status === 413 && batch.entries > 1) {
          // Too large: send it in halves.
          this.batchLimit = Math.ceil(batch.entries / 2);
          await this.store.unfreeze();
          continue;
        }
        await this.store.reject(batch, e.message);
        this.status.update({ lastError: `push refused: ${e.message}` });
        refused = true;
        continue;
      }
      this.batchLimit = this.options.batchSize ?? 500;
      this.counters.pushes += 1;
      this.counters.pushedChanges += batch.body.changes.length;
      // The answer holds every table's changes since the oldest cursor: all
      // cursors move to it, unless it was cut short (then pull the rest).
      const cursors = answer.hasMore ? {} : Object.fromEntries(this.options.tables.map((t) => [t, answer.syncedUntil]));
      await this.store.apply(answer.serverChanges, cursors, batch);
      if (answer.hasMore) this.want(this.options.tables);
    }
    // Taken before pulling: a notice that comes during a pull asks again.
    const tables = [...this.wanted];
    this.wanted.clear();
    for (const [i, table] of tables.entries()) {
      try {
        await this.pull(transport, table);
      } catch (e) {
        for (const t of tables.slice(i)) this.wanted.add(t);
        throw e;
      }
    }
    return refused;
  }

  /** Pulls `table` page by page until the server has no more. */
  private async pull(transport: Transport, table: string): Promise<void> {
    const limit = this.options.pullLimit ?? 1000;
    for (;;) {
      const page = await transport.pull(table, await this.store.cursor(table), limit);
      await this.store.apply(page.serverChanges, { [table]: page.syncedUntil });
      this.counters.pulls += 1;
      this.counters.pulledRecords += page.serverChanges.length;
      if (!page.hasMore) return;
    }
  }
}

/** What followers take from the leader's status: not its pending count (each tab counts the shared queue) nor its role. */
function shared({ state, lastError, lastSyncAt, connected }: SyncStatus): Partial<SyncStatus> {
  return { state, lastError, lastSyncAt, connected };
}
