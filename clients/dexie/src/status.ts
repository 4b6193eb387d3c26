/**
 * The sync status, observable. `subscribe` follows the ES Observable
 * shape Dexie's `liveQuery` has (so it works with the same UI bindings),
 * and takes a plain function too.
 */

/**
 * - `idle`: nothing to do, or waiting for the next change.
 * - `syncing`: pushing or pulling.
 * - `offline`: the server cannot be reached; retrying.
 * - `error`: the last attempt failed (see `lastError`); retrying, unless the server refused the data itself.
 */
export type SyncState = "idle" | "syncing" | "offline" | "error";

export interface SyncStatus {
  state: SyncState;
  /** Local writes not yet acknowledged by the server. */
  pending: number;
  /** What went wrong last, if anything did. */
  lastError: string | null;
  /** When a sync last completed (ISO 8601). */
  lastSyncAt: string | null;
  /** The live socket is open and authenticated. */
  connected: boolean;
  /** This tab is the one that syncs. */
  leader: boolean;
}

export type Observer<T> = ((value: T) => void) | { next?: (value: T) => void };

export interface Subscription {
  unsubscribe(): void;
}

export class StatusStore {
  private value: SyncStatus = {
    state: "idle",
    pending: 0,
    lastError: null,
    lastSyncAt: null,
    connected: false,
    leader: false,
  };
  private readonly observers = new Set<(value: SyncStatus) => void>();

  get current(): SyncStatus {
    return this.value;
  }

  update(patch: Partial<SyncStatus>): void {
    const next = { ...this.value, ...patch };
    const changed = (Object.keys(next) as (keyof SyncStatus)[]).some((k) => next[k] !== this.value[k]);
    if (!changed) return;
    this.value = next;
    for (const observer of this.observers) observer(next);
  }

  /** Calls `observer` with the current status, then at every change. */
  subscribe(observer: Observer<SyncStatus>): Subscription {
    const next = typeof observer === "function" ? observer : (v: SyncStatus) => observer.next?.(v);
    this.observers.add(next);
    next(this.value);
    return { unsubscribe: () => this.observers.delete(next) };
  }

  [Symbol.for("observable")](): StatusStore {
    return this;
  }
}
