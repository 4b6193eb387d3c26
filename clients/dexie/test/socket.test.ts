import { afterEach, beforeEach, describe, expect, it, vi } from "vitest";

import { LiveSocket, TOKEN_EXPIRED } from "../src/socket.js";
import { TokenSource } from "../src/token.js";
import { jwt } from "./helpers.js";

/** A WebSocket whose server side the test plays. */
class FakeSocket {
  static all: FakeSocket[] = [];
  readonly CONNECTING = 0;
  readonly OPEN = 1;
  readyState = 0;
  sent: Record<string, unknown>[] = [];
  onopen: (() => void) | null = null;
  onmessage: ((e: { data: string }) => void) | null = null;
  onclose: ((e: { code: number }) => void) | null = null;
  onerror: (() => void) | null = null;

  constructor(readonly url: string) {
    FakeSocket.all.push(this);
  }
  open() {
    this.readyState = 1;
    this.onopen?.();
  }
  /** Pings are answered (`silent`: not), as the server does. */
  silent = false;
  send(data: string) {
    const message = JSON.parse(data);
    this.sent.push(message);
    if (message.type === "ping" && !this.silent) queueMicrotask(() => this.say({ type: "pong" }));
  }
  say(message: object) {
    this.onmessage?.({ data: JSON.stringify(message) });
  }
  close() {
    this.serverClose(1000);
  }
  serverClose(code: number) {
    if (this.readyState === 3) return;
    this.readyState = 3;
    this.onclose?.({ code });
  }
}

const flush = () => vi.advanceTimersByTimeAsync(0);

describe("the live socket", () => {
  beforeEach(() => {
    vi.useFakeTimers();
    FakeSocket.all = [];
  });
  afterEach(() => vi.useRealTimers());

  function live(lifetime = 120) {
    let issued = 0;
    const tokens = new TokenSource(() => {
      const now = Math.floor(Date.now() / 1000);
      return jwt({ iat: now, exp: now + lifetime, n: ++issued });
    });
    const notices: [string, string[]][] = [];
    const states: boolean[] = [];
    const socket = new LiveSocket({
      url: "http://sync.test/",
      clientId: "device-1",
      tokens,
      backoff: { base: 1000, cap: 8000 },
      WebSocket: FakeSocket as unknown as typeof WebSocket,
      events: { notice: (app, tables) => notices.push([app, tables]), connected: (l) => states.push(l) },
    });
    return { socket, notices, states, issued: () => issued };
  }

  it("authenticates in-band, passes notices on, and renews its token before expiry on the same connection", async () => {
    const { socket, notices, states, issued } = live(120);
    socket.start();
    const ws = FakeSocket.all[0]!;
    expect(ws.url).toBe("ws://sync.test/ws?clientId=device-1");
    ws.open();
    await flush();
    expect(ws.sent[0]).toMatchObject({ type: "auth", clientId: "device-1" });
    ws.say({ type: "auth-ok" });
    ws.say({ type: "sync-available", appId: "todo", tables: ["todos"] });
    expect(notices).toEqual([["todo", ["todos"]]]);
    expect(states).toEqual([true]);

    // A minute before expiry (a quarter of 120 s is 30 s: renewed at 90 s).
    await vi.advanceTimersByTimeAsync(89_000);
    expect(ws.sent.filter((m) => m.type === "auth")).toHaveLength(1);
    await vi.advanceTimersByTimeAsync(2_000);
    const auths = ws.sent.filter((m) => m.type === "auth");
    expect(auths).toHaveLength(2);
    expect(auths[1]!.token).not.toBe(auths[0]!.token);
    expect(issued()).toBe(2);
    ws.say({ type: "auth-ok" });
    expect(socket.counts).toEqual({ opened: 1, renewed: 1 });
    expect(FakeSocket.all).toHaveLength(1);
    socket.stop();
  });

  it("reconnects after a loss with a growing, jittered delay, and with a new token after 4001", async () => {
    const { socket, states, issued } = live();
    socket.start();
    const delays: number[] = [];
    for (let i = 0; i < 3; i++) {
      const ws = FakeSocket.all.at(-1)!;
      ws.serverClose(1006);
      const closedAt = Date.now();
      const count = FakeSocket.all.length;
      while (FakeSocket.all.length === count) await vi.advanceTimersByTimeAsync(50);
      delays.push(Date.now() - closedAt);
    }
    expect(delays[0]).toBeGreaterThanOrEqual(500);
    expect(delays[0]).toBeLessThanOrEqual(1050);
    expect(delays[2]).toBeGreaterThanOrEqual(2000);
    expect(delays[2]).toBeLessThanOrEqual(4050);

    const ws = FakeSocket.all.at(-1)!;
    ws.open();
    await flush();
    ws.say({ type: "auth-ok" });
    expect(states.at(-1)).toBe(true);
    const before = issued();
    // Lasted 30 s: the backoff starts afresh (one closed sooner would not).
    await vi.advanceTimersByTimeAsync(30_000);
    ws.serverClose(TOKEN_EXPIRED);
    expect(states.at(-1)).toBe(false);
    await vi.advanceTimersByTimeAsync(1000);
    const next = FakeSocket.all.at(-1)!;
    expect(next).not.toBe(ws);
    next.open();
    await flush();
    expect(issued()).toBe(before + 1);
    socket.stop();
  });

  it("closes a connection that stays silent after its ping", async () => {
    const { socket, states } = live();
    socket.start();
    const ws = FakeSocket.all[0]!;
    ws.open();
    await flush();
    ws.say({ type: "auth-ok" });
    ws.silent = true;
    await vi.advanceTimersByTimeAsync(25_000);
    expect(ws.sent.at(-1)).toEqual({ type: "ping" });
    await vi.advanceTimersByTimeAsync(10_000);
    expect(ws.readyState).toBe(3);
    expect(states).toEqual([true, false]);
    socket.stop();
  });
});
