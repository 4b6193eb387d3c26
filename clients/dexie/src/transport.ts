/**
 * Push and pull over the generated client, with every failure sorted by
 * what the engine should do about it.
 */
import {
  createSyncClient,
  type ErrorBody,
  type ErrorCode,
  type PushRequest,
  type SyncClient,
  type SyncResponse,
} from "@mana-sync/client";

import type { TokenSource } from "./token.js";

/**
 * - `network`: no answer (offline, refused, cut, timed out): retry later.
 * - `busy`: 429, 503 or 408: retry after `retryAfterMs` (the server's `Retry-After`) or a backoff.
 * - `server`: another 5xx, or a 4xx that is not the server's answer to this request (a proxy's 403 or 404): retry with a backoff.
 * - `auth`: a 401, or the app gave no token: get a new one, then retry.
 * - `rejected`: the server refused the request itself (400 or 422 with its error body, 413): sent as it is, it will never succeed.
 */
export type FailureKind = "network" | "busy" | "server" | "auth" | "rejected";

export class SyncFailure extends Error {
  constructor(
    readonly kind: FailureKind,
    message: string,
    readonly status?: number,
    readonly retryAfterMs?: number,
    /** The server's code, when the error is the server's own. */
    readonly code?: ErrorCode,
  ) {
    super(message);
    this.name = "SyncFailure";
  }
}

/** Longest wait for an answer: a connection that hangs is given up and retried. */
const REQUEST_TIMEOUT_MS = 30_000;

export class Transport {
  private readonly api: SyncClient;

  constructor(
    url: string,
    private readonly appId: string,
    clientId: string,
    tokens: TokenSource,
    fetch?: typeof globalThis.fetch,
  ) {
    const token = () =>
      tokens.get().catch((e: unknown) => {
        throw new SyncFailure("auth", `no token: ${e instanceof Error ? e.message : String(e)}`);
      });
    this.api = createSyncClient({ baseUrl: url, token, clientId, ...(fetch ? { fetch } : {}) });
  }

  /** `POST /sync/{appId}` under `key`; given up when `signal` aborts. */
  push(body: PushRequest, key: string, signal: AbortSignal): Promise<SyncResponse> {
    return answered(
      this.api.POST("/sync/{appId}", {
        params: { path: { appId: this.appId }, header: { "Idempotency-Key": key } },
        body,
        signal: bounded(signal),
      }),
    );
  }

  /** `GET /sync/{appId}/pull`: one page of `table` since `since`. */
  pull(table: string, since: string | undefined, limit: number, signal: AbortSignal): Promise<SyncResponse> {
    return answered(
      this.api.GET("/sync/{appId}/pull", {
        params: { path: { appId: this.appId }, query: { collection: table, limit, ...(since ? { since } : {}) } },
        signal: bounded(signal),
      }),
    );
  }
}

/** `signal`, or the request timeout, whichever comes first. */
function bounded(signal: AbortSignal): AbortSignal {
  return anySignal([signal, AbortSignal.timeout(REQUEST_TIMEOUT_MS)]);
}

/** Aborts when any of `signals` does (`AbortSignal.any`, where the browser lacks it). */
export function anySignal(signals: AbortSignal[]): AbortSignal {
  if (typeof AbortSignal.any === "function") return AbortSignal.any(signals);
  const controller = new AbortController();
  for (const signal of signals) {
    if (signal.aborted) {
      controller.abort(signal.reason);
      break;
    }
    signal.addEventListener("abort", () => controller.abort(signal.reason), { once: true });
  }
  return controller.signal;
}

async function answered(
  call: Promise<{ data?: SyncResponse; error?: ErrorBody; response: Response }>,
): Promise<SyncResponse> {
  let result;
  try {
    result = await call;
  } catch (e) {
    if (e instanceof SyncFailure) throw e;
    throw new SyncFailure("network", `network: ${e instanceof Error ? e.message : String(e)}`);
  }
  const { data, error, response } = result;
  if (data !== undefined) return data;
  const status = response.status;
  // The server's errors are JSON `{code, message}`; a proxy's are not.
  const own = typeof error === "object" && error !== null && typeof error.code === "string";
  const message = own ? `${status} ${error.code}: ${error.message}` : `${status} ${response.statusText}`;
  const code = own ? error.code : undefined;
  if (status === 401) throw new SyncFailure("auth", message, status, undefined, code);
  if (status === 429 || status === 503 || status === 408) {
    throw new SyncFailure("busy", message, status, retryAfter(response.headers.get("Retry-After")), code);
  }
  if (status === 413 || ((status === 400 || status === 422) && own)) {
    throw new SyncFailure("rejected", message, status, undefined, code);
  }
  throw new SyncFailure("server", message, status, undefined, code);
}

/** `Retry-After` in ms: seconds, or an HTTP date. */
export function retryAfter(header: string | null, now = Date.now()): number | undefined {
  if (header === null) return undefined;
  const seconds = Number(header);
  if (Number.isFinite(seconds)) return Math.max(0, seconds * 1000);
  const date = Date.parse(header);
  return Number.isNaN(date) ? undefined : Math.max(0, date - now);
}
