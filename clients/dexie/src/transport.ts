/**
 * Push and pull over the generated client, with every failure sorted by
 * what the engine should do about it.
 */
import { createSyncClient, type PushRequest, type SyncClient, type SyncResponse } from "@mana-sync/client";

import type { TokenSource } from "./token.js";

/**
 * - `network`: no answer (offline, refused, cut): retry later.
 * - `busy`: 429, 503 or 408: retry after `retryAfterMs` (the server's `Retry-After`) or a backoff.
 * - `server`: another 5xx: retry with a backoff.
 * - `auth`: 401: get a new token, then retry.
 * - `rejected`: any other 4xx: the request itself is wrong and will not succeed as it is.
 */
export type FailureKind = "network" | "busy" | "server" | "auth" | "rejected";

export class SyncFailure extends Error {
  constructor(
    readonly kind: FailureKind,
    message: string,
    readonly status?: number,
    readonly retryAfterMs?: number,
  ) {
    super(message);
    this.name = "SyncFailure";
  }
}

export class Transport {
  private readonly api: SyncClient;

  constructor(
    url: string,
    private readonly appId: string,
    clientId: string,
    tokens: TokenSource,
    fetch?: typeof globalThis.fetch,
  ) {
    this.api = createSyncClient({ baseUrl: url, token: () => tokens.get(), clientId, ...(fetch ? { fetch } : {}) });
  }

  /** `POST /sync/{appId}` under `key`. */
  push(body: PushRequest, key: string): Promise<SyncResponse> {
    return answered(
      this.api.POST("/sync/{appId}", {
        params: { path: { appId: this.appId }, header: { "Idempotency-Key": key } },
        body,
      }),
    );
  }

  /** `GET /sync/{appId}/pull`: one page of `table` since `since`. */
  pull(table: string, since: string | undefined, limit: number): Promise<SyncResponse> {
    return answered(
      this.api.GET("/sync/{appId}/pull", {
        params: { path: { appId: this.appId }, query: { collection: table, limit, ...(since ? { since } : {}) } },
      }),
    );
  }
}

async function answered(
  call: Promise<{ data?: SyncResponse; error?: { code: string; message: string }; response: Response }>,
): Promise<SyncResponse> {
  let result;
  try {
    result = await call;
  } catch (e) {
    throw new SyncFailure("network", `network: ${e instanceof Error ? e.message : String(e)}`);
  }
  const { data, error, response } = result;
  if (data !== undefined) return data;
  const status = response.status;
  const message = `${status} ${error?.code ?? ""}: ${error?.message ?? response.statusText}`;
  if (status === 401) throw new SyncFailure("auth", message, status);
  if (status === 429 || status === 503 || status === 408) {
    throw new SyncFailure("busy", message, status, retryAfter(response.headers.get("Retry-After")));
  }
  if (status >= 500) throw new SyncFailure("server", message, status);
  throw new SyncFailure("rejected", message, status);
}

/** `Retry-After` in ms: seconds, or an HTTP date. */
export function retryAfter(header: string | null, now = Date.now()): number | undefined {
  if (header === null) return undefined;
  const seconds = Number(header);
  if (Number.isFinite(seconds)) return Math.max(0, seconds * 1000);
  const date = Date.parse(header);
  return Number.isNaN(date) ? undefined : Math.max(0, date - now);
}
