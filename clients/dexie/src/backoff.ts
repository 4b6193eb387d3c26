/** Retry delays: exponential, capped, with jitter so that many devices
 * coming back at once do not retry in step. */
export interface BackoffOptions {
  /** The first delay's upper bound, in ms. */
  base: number;
  /** The largest delay, in ms. */
  cap: number;
}

export const defaultBackoff: BackoffOptions = { base: 500, cap: 30_000 };

/**
 * The delay before retry number `attempt` (0 for the first): uniformly
 * random in the upper half of `min(cap, base · 2^attempt)` ("equal
 * jitter": spread out, but never a hot retry loop).
 */
export function backoffDelay(attempt: number, options: BackoffOptions = defaultBackoff, random = Math.random): number {
  const ceiling = Math.min(options.cap, options.base * 2 ** Math.min(attempt, 30));
  return ceiling / 2 + random() * (ceiling / 2);
}

/** Resolves after `ms`, or at once when `signal` aborts. */
export function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    if (signal?.aborted) return resolve();
    const timer = setTimeout(done, ms);
    signal?.addEventListener("abort", done, { once: true });
    function done() {
      clearTimeout(timer);
      signal?.removeEventListener("abort", done);
      resolve();
    }
  });
}
