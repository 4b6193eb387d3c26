/**
 * One tab of an origin syncs a database at a time: the holder of a Web
 * Lock named after it. The others only record their writes (into the
 * shared queue) and see what the leader applies through IndexedDB. When
 * the leader's tab closes the browser releases its lock and the next tab
 * in line takes over.
 */

/** The part of the Web Locks API used here (`navigator.locks`). */
export interface Locks {
  request(name: string, options: { signal?: AbortSignal }, callback: () => Promise<void>): Promise<unknown>;
}

/** The browser's lock manager, if it has one. */
export function browserLocks(): Locks | null {
  const locks = (globalThis.navigator as { locks?: Locks } | undefined)?.locks;
  return locks ?? null;
}

/**
 * Runs `lead` while this tab holds the lock `name`, until `signal` aborts.
 * `lead` returns a function that ends its leadership. With no lock
 * manager (an old browser) the tab leads at once, alone.
 */
export async function elect(
  locks: Locks | null,
  name: string,
  signal: AbortSignal,
  lead: () => () => Promise<void>,
): Promise<void> {
  const hold = async () => {
    if (signal.aborted) return;
    const resign = lead();
    await new Promise<void>((resolve) => signal.addEventListener("abort", () => resolve(), { once: true }));
    await resign();
  };
  if (locks === null) return hold();
  try {
    await locks.request(name, { signal }, hold);
  } catch (e) {
    // Aborted while waiting in line: not an error.
    if (!signal.aborted) throw e;
  }
}
