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
import { mirrorStatus, type Mirror } from "./mirror.js";
import { Rounds, type Counters, type RemoteChange } from "./round.js";
import { LiveSocket } from "./socket.js";
import { StatusStore } from "./status.js";
import { SyncStore, type Rejected } from "./store.js";
import { DELETED, PENDING, STATE } from "./tables.js";
import { TokenSource, type TokenGetter } from "./token.js";
import { SyncFailure, Transport, anySignal } from "./transport.js";

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
  /** Records per pull page (default 1000; at most 5000, the server's limit). */
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
  /**
   * Who makes this app's changes, sent with every push and kept by the
   * server with each change, e.g. `{ kind: "user", principalId }` or
   * `{ kind: "ai", principalId }`.
   */
  actor?: Record<string, unknown>;
  /** How this app's changes come about: `user`, `agent`, `system` or `migration`. */
  origin?: string;
  /**
   * Called with each server change once its page is stored here: its
   * record, the `eventId` of the log entry behind it, and the `actor` and
   * `origin` that entry's writer gave (for "edited by" notices). The
   * server does not send this device its own writes back.
   */
  onRemoteChange?: (change: RemoteChange) => void;
}


/** Counters, for a status page (and the tests). */
export interface SyncStats extends Counters {
  socketsOpened: number;
  tokenRenewals: number;
}

/** The server's largest pull page. */
const MAX_PULL_LIMIT = 5000;

interface Running {
  abort: AbortController;
  done: Promise<void>;
  mirror: Mirror;
  teardown: () => void;
}

interface Waiter {
  resolve: () => void;
  reject: (e: Error) => void;
}

export class SyncEngine {
  readonly status = new StatusStore();
  private readonly counters: Counters = { pushes: 0, pushedChanges: 0, pulls: 0, pulledRecords: 0, retries: 0 };
  private readonly store: SyncStore;
  private readonly rounds: Rounds;
  private readonly tokens: TokenSource;
  private readonly synced: ReadonlySet<string>;
  private readonly wanted = new Set<string>();
  private dirty = false;
  private wake: () => void = () => {};
  private waiters: Waiter[] = [];
  private running: Running | null = null;
  /** Settles when the last `stop()` has finished: a new start waits for it. */
  private stopped: Promise<void> = Promise.resolve();
  private socket: LiveSocket | null = null;

  constructor(
    private readonly db: Dexie,
    private readonly options: SyncOptions,
  ) {
    if (db.isOpen()) throw new Error("syncDexie(db) must be called before the database is opened");
    this.synced = new Set(options.tables);
    const applying = new WeakSet<object>();
    db.use(captureMiddleware(this.synced, new Clock(), applying));
    const provenance = {
      schemaVersion: 1,
      ...(options.actor ? { actor: options.actor } : {}),
      ...(options.origin ? { origin: options.origin } : {}),
    };
    this.store = new SyncStore(db, options.tables, applying, provenance);
    this.tokens = new TokenSource(options.token);
    this.rounds = new Rounds(
      this.store,
      {
        tables: options.tables,
        batchSize: options.batchSize ?? 500,
        pullLimit: Math.min(options.pullLimit ?? 1000, MAX_PULL_LIMIT),
        ...(options.onRemoteChange ? { onRemoteChange: options.onRemoteChange } : {}),
      },
      this.counters,
    );
  }

  /** Starts syncing (in this tab once it leads). Opens the database if needed. */
  start(): void {
    if (this.running !== null) return;
    const { appId, tables } = this.options;
    const name = `mana-sync:${this.db.name}:${appId}`;
    const abort = new AbortController();
    const mirror = mirrorStatus(name, this.status, () => this.want(tables));
    const pending = liveQuery(() => this.db.table(PENDING).count()).subscribe({
      next: (count) => {
        this.status.update({ pending: count });
        if (count > 0) this.kick();
      },
      error: (e) => this.status.update({ state: "error", lastError: String(e) }),
    });
    const done = this.stopped
      .then(() => this.db.open())
      .then(() => {
        this.check();
        const locks = this.options.locks === undefined ? browserLocks() : this.options.locks;
        return elect(locks, name, abort.signal, () => {
          const led = this.lead(abort.signal);
          return () => led;
        });
      })
      .catch((e: unknown) => this.status.update({ state: "error", lastError: String(e) }));
    this.running = {
      abort,
      done,
      mirror,
      teardown: () => {
        pending.unsubscribe();
        mirror.close();
      },
    };
  }

  /** Stops syncing; another tab takes over. Local writes are still queued. */
  async stop(): Promise<void> {
    const running = this.running;
    if (running === null) return this.stopped;
    this.running = null;
    running.abort.abort();
    this.wake();
    this.stopped = running.done.then(() => {
      running.teardown();
      for (const waiter of this.waiters.splice(0)) waiter.reject(new Error("sync stopped"));
    });
    return this.stopped;
  }

  /**
   * Pushes what is queued and pulls every table now; resolves when that is
   * done. In a tab that does not lead, asks the leader and resolves at once.
   */
  sync(): Promise<void> {
    if (this.running === null) return Promise.reject(new Error("sync is not started"));
    if (!this.status.current.leader) {
      this.running.mirror.requestSync();
      return Promise.resolve();
    }
    this.want(this.options.tables);
    return new Promise((resolve, reject) => this.waiters.push({ resolve, reject }));
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
    for (const name of [PENDING, STATE, DELETED]) {
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

  /** This tab's leadership, until `signal` aborts: serves, and serves again if it fails to start. */
  private async lead(signal: AbortSignal): Promise<void> {
    // Not what the previous leader said: this tab has no socket yet.
    this.status.update({ leader: true, connected: false, state: "syncing" });
    try {
      for (let attempt = 0; !signal.aborted; attempt++) {
        try {
          await this.serve(signal);
        } catch (e) {
          this.status.update({ state: "error", lastError: `sync stopped: ${String(e)}` });
          await sleep(backoffDelay(attempt, this.options.backoff), signal);
        }
      }
    } finally {
      this.status.update({ leader: false, connected: false });
    }
  }

  /** The leader's loop: rounds of syncing, as asked for, with retries. */
  private async serve(signal: AbortSignal): Promise<void> {
    const { url, appId, tables } = this.options;
    const clientId = await this.store.clientId();
    const transport = new Transport(url, appId, clientId, this.tokens, this.options.fetch);
    let retryNow = new AbortController();
    const online = () => {
      retryNow.abort();
      socket?.retryNow();
      this.want(tables);
    };
    const offline = () => this.status.update({ state: "offline" });
    const socket =
      this.options.live === false
        ? null
        : new LiveSocket({
            url,
            clientId,
            tokens: this.tokens,
            backoff: this.options.backoff ?? defaultBackoff,
            ...(this.options.WebSocket ? { WebSocket: this.options.WebSocket } : {}),
            events: {
              notice: (app, named) => app === appId && this.want(named.length > 0 ? named : tables),
              connected: (live) => {
                this.status.update({ connected: live });
                // Lost: catch up now, then poll until it is back.
                if (!live) this.want(tables);
              },
            },
          });
    this.socket = socket;
    globalThis.addEventListener?.("online", online);
    globalThis.addEventListener?.("offline", offline);
    socket?.start();
    this.want(tables);
    let attempt = 0;
    try {
      while (!signal.aborted) {
        if (!this.dirty) {
          const polled = socket?.isLive ? Infinity : (this.options.pollInterval ?? 30_000);
          if (await this.idle(signal, Math.min(polled, 2 ** 31 - 1))) this.want(tables);
          continue;
        }
        this.dirty = false;
        const waiters = this.waiters.splice(0);
        this.status.update({ state: "syncing" });
        try {
          const refused = await this.rounds.run(transport, clientId, this.wanted, signal);
          if (signal.aborted) break;
          attempt = 0;
          const lastError = refused.length > 0 ? `push refused: ${refused.at(-1)}` : this.status.current.lastError;
          this.status.update({ state: refused.length > 0 ? "error" : "idle", lastError, lastSyncAt: new Date().toISOString() });
          for (const waiter of waiters) waiter.resolve();
        } catch (e) {
          this.waiters.unshift(...waiters);
          if (signal.aborted) break;
          const failure = e instanceof SyncFailure ? e : new SyncFailure("server", String(e));
          if (failure.kind === "auth") this.tokens.invalidate();
          this.status.update({ state: failure.kind === "network" ? "offline" : "error", lastError: failure.message });
          this.counters.retries += 1;
          this.dirty = true;
          retryNow = new AbortController();
          const delay = failure.retryAfterMs ?? backoffDelay(attempt++, this.options.backoff);
          await sleep(delay, anySignal([signal, retryNow.signal]));
        }
      }
    } finally {
      globalThis.removeEventListener?.("online", online);
      globalThis.removeEventListener?.("offline", offline);
      socket?.stop();
    }
  }
}
