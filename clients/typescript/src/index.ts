/**
 * A typed client for mana-sync's HTTP API.
 *
 * `schema.ts` is generated from `openapi/mana-sync.json` by
 * openapi-typescript (`npm run generate`; `npm run drift` fails when it is
 * out of date), and openapi-fetch turns it into typed calls:
 *
 * ```ts
 * const api = createSyncClient({ baseUrl: "http://localhost:3050", token: () => getJwt() });
 * const { data, error } = await api.GET("/sync/{appId}/pull", {
 *   params: { path: { appId: "todo" }, query: { collection: "todos" } },
 * });
 * ```
 */
import createClient, { type Client, type Middleware } from "openapi-fetch";
import type { components, operations, paths } from "./schema.js";

export type { components, operations, paths };

type Schemas = components["schemas"];
/** A batch of changes pushed by one device. */
export type PushRequest = Schemas["PushRequest"];
/** One change to one record, as a device sends it. */
export type ChangeInput = Schemas["ChangeInput"];
/** A new value for one field, with the time the device wrote it. */
export type FieldChange = Schemas["FieldChange"];
/** One record's folded change since a cursor, as the server sends it. */
export type ServerChange = Schemas["ServerChange"];
/** The answer to a push or a pull. */
export type SyncResponse = Schemas["SyncResponse"];
/** Every error's body: a stable `code` and a readable `message`. */
export type ErrorBody = Schemas["ErrorBody"];
/** Every code an error can carry (`invalid_timestamp`, `busy`, …): a union to switch on. */
export type ErrorCode = Schemas["ErrorCode"];
/** One `changes` event of the change stream (`GET /sync/{appId}/stream`). */
export type ChangeEvent = Schemas["ChangeEvent"];
/** `insert`, `update` or `delete`. */
export type Op = Schemas["Op"];

/** The generated client, typed by the spec's paths. */
export type SyncClient = Client<paths>;

export interface SyncClientOptions {
  /** Where the server answers, e.g. `http://localhost:3050`. */
  baseUrl: string;
  /**
   * The bearer token for each request: a JWT from the auth service (or, in
   * local mode, from `mana-sync token`). Called once per request, so it may
   * return a cached token and renew it when due.
   */
  token: () => string | Promise<string>;
  /** The device's id, sent as `X-Client-Id` (the server then leaves its own pushes out of its socket notices). */
  clientId?: string;
  /** The fetch to use (tests pass their own); the global one by default. */
  fetch?: typeof globalThis.fetch;
}

/** A client that sends the token and the device's id with every request. */
export function createSyncClient(options: SyncClientOptions): SyncClient {
  const client = createClient<paths>({
    baseUrl: options.baseUrl.replace(/\/+$/, ""),
    // Looked up at call time, so that a test (or a service worker) that
    // replaces the global fetch later is still used.
    fetch: (request) => (options.fetch ?? globalThis.fetch)(request),
  });
  client.use(credentials(options));
  return client;
}

function credentials(options: SyncClientOptions): Middleware {
  return {
    async onRequest({ request }) {
      request.headers.set("Authorization", `Bearer ${await options.token()}`);
      if (options.clientId !== undefined) {
        request.headers.set("X-Client-Id", options.clientId);
      }
      return request;
    },
  };
}
