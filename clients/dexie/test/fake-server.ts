/**
 * An in-memory stand-in for mana-sync's push and pull (field-level
 * last-write-wins, cursors, `hasMore` pages, idempotency keys), as a
 * `fetch`, with scripted failures. The real server is what the browser
 * tests (e2e/) run against; this one lets unit tests script a lost
 * answer or a 429 exactly.
 */
import type { ChangeInput, ErrorBody, ErrorCode, PushRequest, ServerChange, SyncResponse } from "@mana-sync/client";

/** An error body as the server would send it with `status`. */
function errorBody(status: number, message: string): string {
  const codes: Record<number, ErrorCode> = { 400: "bad_request", 408: "request_timeout", 429: "rate_limited", 503: "unavailable" };
  const body: ErrorBody = { code: codes[status] ?? "internal", message };
  return JSON.stringify(body);
}

interface Field {
  value: unknown;
  at: number;
  seq: number;
}

interface Stored {
  table: string;
  id: string;
  created: number;
  touched: number;
  fields: Map<string, Field>;
  /** Who wrote its latest winning field, as the change (or its push) said. */
  actor?: Record<string, unknown>;
  origin?: string;
}

/** What to do to the next request (of method `on`, if given) instead of (or after) answering it. */
export type Fault = { on?: "GET" | "POST" } & (
  | { status: number; retryAfter?: string; body?: string }
  /** The request is processed, but its answer never arrives. */
  | { loseAnswer: true }
  /** The request never arrives. */
  | { network: true }
);

export interface Request {
  method: string;
  path: string;
  query: URLSearchParams;
  headers: Headers;
  body?: PushRequest;
  at: number;
}

const cursor = (seq: number) => String(seq).padStart(12, "0");

export class FakeServer {
  private seq = 0;
  private readonly records = new Map<string, Stored>();
  private readonly outcomes = new Map<string, SyncResponse>();
  /** Every change appended to the log. */
  readonly log: ChangeInput[] = [];
  readonly requests: Request[] = [];
  readonly faults: Fault[] = [];
  /** A push holding a change this refuses is answered 400, as the server refuses a malformed one. */
  refuse: (change: ChangeInput) => boolean = () => false;
  /** Milliseconds before each answer. */
  delay = 0;

  readonly fetch = async (input: RequestInfo | URL, init?: RequestInit): Promise<Response> => {
    const request = new Request(input, init);
    const url = new URL(request.url);
    const body = request.method === "POST" ? await request.json() : undefined;
    this.requests.push({ method: request.method, path: url.pathname, query: url.searchParams, headers: request.headers, body, at: Date.now() });
    const index = this.faults.findIndex((f) => f.on === undefined || f.on === request.method);
    const fault = index < 0 ? undefined : this.faults.splice(index, 1)[0];
    if (fault && "network" in fault) throw new TypeError("Failed to fetch");
    if (fault && "status" in fault) {
      const headers: Record<string, string> = { "content-type": "application/json" };
      if (fault.retryAfter !== undefined) headers["retry-after"] = fault.retryAfter;
      return new Response(fault.body ?? errorBody(fault.status, "scripted"), { status: fault.status, headers });
    }
    if (this.delay > 0) await new Promise((r) => setTimeout(r, this.delay));
    if (request.method === "POST" && body!.changes.some(this.refuse)) {
      return new Response(errorBody(400, "refused"), {
        status: 400,
        headers: { "content-type": "application/json" },
      });
    }
    const answer =
      request.method === "POST"
        ? this.push(body!, request.headers.get("idempotency-key"))
        : this.pull(url.searchParams.get("collection")!, url.searchParams.get("since"), Number(url.searchParams.get("limit") ?? 1000));
    if (fault && "loseAnswer" in fault) throw new TypeError("Failed to fetch");
    return new Response(JSON.stringify(answer), { status: 200, headers: { "content-type": "application/json" } });
  };

  /** Writes as another device would. */
  write(changes: ChangeInput[]): void {
    this.push({ changes }, null);
  }

  record(table: string, id: string): Record<string, unknown> | undefined {
    const stored = this.records.get(`${table}/${id}`);
    return stored && Object.fromEntries([...stored.fields].map(([k, f]) => [k, f.value]));
  }

  private push(body: Pick<PushRequest, "changes" | "since" | "actor" | "origin">, key: string | null): SyncResponse {
    const held = key === null ? undefined : this.outcomes.get(key);
    if (held !== undefined) return held;
    const seq = ++this.seq;
    for (const change of body.changes) {
      this.log.push(change);
      const name = `${change.table}/${change.id}`;
      const stored: Stored = this.records.get(name) ?? { table: change.table, id: change.id, created: seq, touched: seq, fields: new Map() };
      this.records.set(name, stored);
      stored.touched = seq;
      const writes: [string, unknown, string][] =
        change.op === "delete"
          ? [["deletedAt", change.deletedAt, String(change.deletedAt)]]
          : change.fields
            ? Object.entries(change.fields).map(([f, c]) => [f, c.value, c.at ?? c.updatedAt ?? ""])
            : Object.entries(change.data ?? {}).map(([f, v]) => [f, v, String(change.data?.updatedAt ?? "")]);
      for (const [field, value, at] of writes) {
        const ms = Date.parse(at) || 0;
        const old = stored.fields.get(field);
        if (old === undefined || ms >= old.at) {
          stored.fields.set(field, { value, at: ms, seq });
          const actor = change.actor ?? body.actor;
          const origin = change.origin ?? body.origin;
          if (actor) stored.actor = actor;
          else delete stored.actor;
          if (origin) stored.origin = origin;
          else delete stored.origin;
        }
      }
    }
    const answer = this.delta(null, body.since ?? null, 1000);
    if (key !== null) this.outcomes.set(key, answer);
    return answer;
  }

  private pull(table: string, since: string | null, limit: number): SyncResponse {
    return this.delta(table, since, limit);
  }

  private delta(table: string | null, since: string | null, limit: number): SyncResponse {
    const after = since === null || since.includes("T") ? 0 : Number(since);
    const touched = [...this.records.values()]
      .filter((r) => (table === null || r.table === table) && r.touched > after)
      .sort((a, b) => a.touched - b.touched);
    const page = touched.slice(0, limit);
    const hasMore = touched.length > limit;
    const until = hasMore ? page.at(-1)!.touched : this.seq;
    return {
      serverChanges: page.map((r) => this.change(r, after)),
      conflicts: [],
      syncedUntil: cursor(until),
      hasMore,
    };
  }

  private change(r: Stored, after: number): ServerChange {
    const data: Record<string, unknown> = Object.fromEntries([...r.fields].map(([k, f]) => [k, f.value]));
    data.id = r.id;
    // The entry of the latest winning field, as the server names it.
    const entry = {
      eventId: String(Math.max(...[...r.fields.values()].map((f) => f.seq), r.created)),
      schemaVersion: 1,
      ...(r.actor ? { actor: r.actor } : {}),
      ...(r.origin ? { origin: r.origin } : {}),
    };
    if (r.fields.get("deletedAt")?.value != null) {
      return { table: r.table, id: r.id, op: "delete", deletedAt: data.deletedAt, ...entry };
    }
    if (r.created > after) return { table: r.table, id: r.id, op: "insert", data, ...entry };
    const fields = Object.fromEntries(
      [...r.fields].filter(([, f]) => f.seq > after).map(([k, f]) => {
        const at = new Date(f.at).toISOString();
        return [k, { value: f.value, updatedAt: at, at }];
      }),
    );
    return { table: r.table, id: r.id, op: "update", data, fields, ...entry };
  }
}
