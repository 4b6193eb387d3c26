/**
 * The unified WebSocket (`GET /ws`): told "sync available" as soon as
 * another device of the user pushes, on any replica. It reconnects after
 * any loss with a backoff, renews its token in-band before expiry (the
 * server closes a socket whose token expires with 4001), and notices a
 * dead connection by its own pings.
 */
import { backoffDelay, type BackoffOptions } from "./backoff.js";
import type { TokenSource } from "./token.js";

/** The server's close code for an expired token. */
export const TOKEN_EXPIRED = 4001;
/** A quiet socket is pinged this often... */
const PING_EVERY_MS = 25_000;
/** ...and given up when nothing came back for this long. */
const SILENCE_LIMIT_MS = 10_000;
/**
 * A connection that lasted this long starts the backoff afresh when lost;
 * one closed sooner (accepted, then closed: a token the server takes but
 * finds expired) counts as one more failure.
 */
const STABLE_AFTER_MS = 30_000;

export interface SocketEvents {
  /** `sync-available` for `appId`; `tables` may be empty (then: all). */
  notice(appId: string, tables: string[]): void;
  /** Authenticated (true) or lost (false). */
  connected(live: boolean): void;
}

export interface SocketOptions {
  url: string;
  clientId: string;
  tokens: TokenSource;
  events: SocketEvents;
  backoff: BackoffOptions;
  WebSocket?: typeof globalThis.WebSocket;
}

export class LiveSocket {
  private socket: WebSocket | null = null;
  private live = false;
  private liveSince = 0;
  private attempt = 0;
  private stopped = true;
  private timers = new Set<ReturnType<typeof setTimeout>>();
  private renewal: ReturnType<typeof setTimeout> | undefined;
  private silence: ReturnType<typeof setTimeout> | undefined;
  /** Connections opened, and in-band renewals that the server accepted: for tests and the status page. */
  readonly counts = { opened: 0, renewed: 0 };

  constructor(private readonly options: SocketOptions) {}

  start(): void {
    if (!this.stopped) return;
    this.stopped = false;
    this.connect();
  }

  stop(): void {
    this.stopped = true;
    for (const timer of this.timers) clearTimeout(timer);
    this.timers.clear();
    this.drop();
  }

  /** Reconnect now, skipping the backoff (the browser came back online). */
  retryNow(): void {
    if (this.stopped || this.socket !== null) return;
    for (const timer of this.timers) clearTimeout(timer);
    this.timers.clear();
    this.attempt = 0;
    this.connect();
  }

  get isLive(): boolean {
    return this.live;
  }

  private connect(): void {
    const Impl = this.options.WebSocket ?? globalThis.WebSocket;
    // Relative to the server's URL, which may have a path (behind a proxy).
    const url = new URL("ws", this.options.url.endsWith("/") ? this.options.url : `${this.options.url}/`);
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    url.searchParams.set("clientId", this.options.clientId);
    let socket: WebSocket;
    try {
      socket = new Impl(url.href);
    } catch {
      return this.reconnect();
    }
    this.socket = socket;
    this.counts.opened += 1;
    socket.onopen = () => void this.authenticate(socket);
    socket.onmessage = (event) => this.received(socket, event);
    socket.onclose = (event) => this.closed(socket, event.code);
    // An error is followed by a close, which does the work.
    socket.onerror = () => {};
  }

  private async authenticate(socket: WebSocket): Promise<void> {
    try {
      const token = await this.options.tokens.get();
      if (socket === this.socket && socket.readyState === socket.OPEN) {
        socket.send(JSON.stringify({ type: "auth", token, clientId: this.options.clientId }));
        this.listen(socket);
      }
    } catch {
      // The app could not give a token: try again later.
      if (socket === this.socket) socket.close();
    }
  }

  private received(socket: WebSocket, event: MessageEvent): void {
    if (socket !== this.socket) return;
    this.listen(socket);
    let message: { type?: string; appId?: string; tables?: string[] };
    try {
      message = JSON.parse(String(event.data));
    } catch {
      return;
    }
    switch (message.type) {
      case "auth-ok":
        if (this.live) {
          this.counts.renewed += 1;
        } else {
          this.live = true;
          this.liveSince = Date.now();
          this.options.events.connected(true);
        }
        this.scheduleRenewal(socket);
        break;
      case "sync-available":
        this.options.events.notice(message.appId ?? "", message.tables ?? []);
        break;
    }
  }

  /** Something came: the connection lives. Ping it if it stays quiet. */
  private listen(socket: WebSocket): void {
    clearTimeout(this.silence);
    this.silence = setTimeout(() => {
      if (socket !== this.socket) return;
      socket.send(JSON.stringify({ type: "ping" }));
      // Given up at once: a half-open connection's close event may take minutes.
      this.silence = setTimeout(() => this.closed(socket, 1006), SILENCE_LIMIT_MS);
    }, PING_EVERY_MS);
  }

  /** Sends a fresh token before the current one expires. */
  private scheduleRenewal(socket: WebSocket): void {
    clearTimeout(this.renewal);
    const due = this.options.tokens.renewalDue;
    if (!Number.isFinite(due)) return;
    // At least a second: an app that hands back the same token (its own
    // cache not yet renewed) must not make this a tight loop.
    this.renewal = setTimeout(() => void this.authenticate(socket), Math.max(1000, due - Date.now() + 50));
  }

  private closed(socket: WebSocket, code: number): void {
    if (socket !== this.socket) return;
    // Refused or expired: the next connection asks for a new token.
    if (code === TOKEN_EXPIRED || code === 1008) this.options.tokens.invalidate();
    if (this.live && Date.now() - this.liveSince >= STABLE_AFTER_MS) this.attempt = 0;
    this.drop();
    this.reconnect(code === 1012 ? 0 : undefined);
  }

  private drop(): void {
    clearTimeout(this.renewal);
    clearTimeout(this.silence);
    const socket = this.socket;
    this.socket = null;
    if (socket !== null) {
      socket.onopen = socket.onmessage = socket.onclose = socket.onerror = null;
      if (socket.readyState === socket.OPEN || socket.readyState === socket.CONNECTING) socket.close();
    }
    if (this.live) {
      this.live = false;
      this.options.events.connected(false);
    }
  }

  /** Connects again after a backoff (a replica restarting, 1012: sooner, still jittered). */
  private reconnect(attempt = this.attempt++): void {
    if (this.stopped) return;
    const timer = setTimeout(() => {
      this.timers.delete(timer);
      if (!this.stopped) this.connect();
    }, backoffDelay(attempt, this.options.backoff));
    this.timers.add(timer);
  }
}
