import { describe, expect, it } from "vitest";

import { backoffDelay } from "../src/backoff.js";
import { TokenSource, decodeClaims } from "../src/token.js";
import { retryAfter } from "../src/transport.js";
import { jwt } from "./helpers.js";

describe("tokens", () => {
  it("keeps a token until a quarter of its life (at most a minute) before expiry, then asks again", async () => {
    let now = 1_000_000_000_000;
    let asked = 0;
    const source = new TokenSource(
      () => jwt({ iat: now / 1000, exp: now / 1000 + 40, n: ++asked }),
      () => now,
    );
    const first = await source.get();
    expect(source.renewalDue).toBe(now + 30_000);
    now += 29_000;
    expect(await source.get()).toBe(first);
    now += 1_000;
    expect(await source.get()).not.toBe(first);
    expect(asked).toBe(2);
    source.invalidate();
    await source.get();
    expect(asked).toBe(3);
  });

  it("asks the app once however many wait", async () => {
    let asked = 0;
    const source = new TokenSource(async () => {
      asked++;
      await new Promise((r) => setTimeout(r, 5));
      return "opaque";
    });
    expect(await Promise.all([source.get(), source.get(), source.get()])).toEqual(["opaque", "opaque", "opaque"]);
    expect(asked).toBe(1);
    expect(source.renewalDue).toBe(Infinity);
  });

  it("reads exp from a JWT and nothing from garbage", () => {
    expect(decodeClaims(jwt({ exp: 5, iat: 1 }))).toEqual({ exp: 5, iat: 1 });
    expect(decodeClaims("not a token")).toBeNull();
    expect(decodeClaims("a.%%%.c")).toBeNull();
  });
});

describe("retry delays", () => {
  it("doubles from the base up to the cap, jittered within the upper half", () => {
    const options = { base: 100, cap: 1000 };
    expect(backoffDelay(0, options, () => 0)).toBe(50);
    expect(backoffDelay(0, options, () => 1)).toBe(100);
    expect(backoffDelay(3, options, () => 1)).toBe(800);
    expect(backoffDelay(10, options, () => 0)).toBe(500);
    expect(backoffDelay(10, options, () => 1)).toBe(1000);
  });

  it("reads Retry-After as seconds or as a date", () => {
    expect(retryAfter("2")).toBe(2000);
    expect(retryAfter(new Date(10_000).toUTCString(), 4_000)).toBe(6000);
    expect(retryAfter(null)).toBeUndefined();
    expect(retryAfter("soon")).toBeUndefined();
  });
});
