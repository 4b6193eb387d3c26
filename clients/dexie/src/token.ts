/**
 * The bearer token: asked of the app when first needed, kept while valid,
 * asked again before it expires (so that a request or a socket never
 * carries an expired one) or when the server refused it.
 */
export type TokenGetter = () => string | Promise<string>;

/** How long before expiry a token is renewed: a quarter of its life, at most a minute. */
const MAX_RENEW_AHEAD_MS = 60_000;

export class TokenSource {
  private token: string | null = null;
  private renewAt = 0;
  private expiresAt = Infinity;
  private pending: Promise<string> | null = null;

  constructor(
    private readonly getter: TokenGetter,
    private readonly now: () => number = Date.now,
  ) {}

  /** A token valid for a while yet. */
  async get(): Promise<string> {
    if (this.token !== null && this.now() < this.renewAt) return this.token;
    // One request to the app at a time, however many callers wait.
    this.pending ??= this.fetch().finally(() => {
      this.pending = null;
    });
    return this.pending;
  }

  /** Forget the token (the server refused it): the next `get` asks the app. */
  invalidate(): void {
    this.token = null;
  }

  /** When the current token should be renewed (ms since the epoch; Infinity if it never expires). */
  get renewalDue(): number {
    return this.renewAt;
  }

  /** When the current token expires (ms since the epoch). */
  get expiry(): number {
    return this.expiresAt;
  }

  private async fetch(): Promise<string> {
    const token = await this.getter();
    const claims = decodeClaims(token);
    const now = this.now();
    if (claims?.exp !== undefined) {
      this.expiresAt = claims.exp * 1000;
      const issued = claims.iat !== undefined ? claims.iat * 1000 : now;
      const ahead = Math.min(MAX_RENEW_AHEAD_MS, Math.max(0, (this.expiresAt - issued) / 4));
      this.renewAt = this.expiresAt - ahead;
    } else {
      this.expiresAt = Infinity;
      this.renewAt = Infinity;
    }
    this.token = token;
    return token;
  }
}

/** The `exp` and `iat` claims of a JWT (not verified: only the server can). */
export function decodeClaims(token: string): { exp?: number; iat?: number } | null {
  const payload = token.split(".")[1];
  if (payload === undefined) return null;
  try {
    const base64 = payload.replace(/-/g, "+").replace(/_/g, "/");
    const json = JSON.parse(atob(base64.padEnd(base64.length + ((4 - (base64.length % 4)) % 4), "=")));
    return {
      exp: typeof json.exp === "number" ? json.exp : undefined,
      iat: typeof json.iat === "number" ? json.iat : undefined,
    };
  } catch {
    return null;
  }
}
