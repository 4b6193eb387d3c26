//! Cursors: positions in a user's change log.
//!
//! A cursor is the log position (`seq`) of the last change a client has
//! seen. Positions are nanosecond UTC timestamps handed out under a per-user
//! lock, so they are unique per user and increase in commit order: "every
//! change after cursor C" is exactly `seq > C`, whatever the number of
//! concurrent writers and replicas. On the wire a cursor is the fixed-width
//! timestamp form, so old clients that compare cursors as strings (and
//! against `new Date().toISOString()`) still order them correctly, and any
//! RFC 3339 timestamp a legacy client holds is accepted as a cursor.

use std::fmt;

use crate::timestamp::{Timestamp, TimestampError};

/// A log position: every change with `seq > cursor` is after it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cursor(pub i64);

impl Cursor {
    /// Before everything: where a new client starts.
    pub const START: Cursor = Cursor(0);

    /// Accepts a cursor this server returned or any RFC 3339 timestamp.
    pub fn parse(s: &str) -> Result<Cursor, TimestampError> {
        // Anything before the epoch means "from the start"; no log position is negative.
        Timestamp::parse(s).map(|t| Cursor(t.0.max(0)))
    }
}

impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&Timestamp(self.0).to_fixed_string())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn accepts_legacy_timestamps_and_its_own_cursors() {
        assert_eq!(Cursor::parse("1970-01-01T00:00:00.000Z").unwrap(), Cursor::START);
        let c = Cursor(1_704_103_575_123_456_789);
        assert_eq!(c.to_string(), "2024-01-01T10:06:15.123456789Z");
        assert_eq!(Cursor::parse(&c.to_string()).unwrap(), c);
        assert_eq!(Cursor::parse("1960-01-01T00:00:00Z").unwrap(), Cursor::START);
    }

    proptest! {
        /// Old clients take the smallest of their cursors by string comparison.
        #[test]
        fn string_order_of_cursors_is_their_log_order(a in 0i64..i64::MAX / 2, b in 0i64..i64::MAX / 2) {
            let (sa, sb) = (Cursor(a).to_string(), Cursor(b).to_string());
            prop_assert_eq!(sa.len(), sb.len());
            prop_assert_eq!(sa.cmp(&sb), a.cmp(&b));
        }

        /// ...and against `new Date().toISOString()`: a cursor sorts before a
        /// browser timestamp whenever it is in an earlier millisecond.
        #[test]
        fn cursors_sort_before_later_browser_timestamps(c in 0i64..i64::MAX / 2, ms in 0i64..i64::MAX / 2_000_000) {
            let browser = Timestamp(ms * 1_000_000).to_short_string();
            let cursor = Cursor(c).to_string();
            if c / 1_000_000 < ms {
                prop_assert!(cursor < browser);
            } else if c / 1_000_000 > ms {
                prop_assert!(cursor > browser);
            }
        }
    }
}
