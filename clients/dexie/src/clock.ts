/**
 * Field timestamps: wall-clock milliseconds, never going backwards within
 * one page, so that a later write of a field on this device always ranks
 * above an earlier one (the server compares field times, then log order).
 */
export class Clock {
  private last = 0;

  constructor(private readonly now: () => number = Date.now) {}

  /** The next timestamp, as ISO 8601 with milliseconds. */
  stamp(): string {
    this.last = Math.max(this.now(), this.last + 1);
    return new Date(this.last).toISOString();
  }
}

/**
 * Milliseconds since the epoch of an RFC 3339 time as the server writes
 * it (up to nine fractional digits, which `Date.parse` does not promise
 * to read): compared as instants, never as strings.
 */
export function instant(time: string): number {
  return Date.parse(time.replace(/(\.\d{3})\d+/, "$1"));
}
