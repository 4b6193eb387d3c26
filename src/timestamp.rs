//! Instants as the protocol exchanges them: RFC 3339 strings on the wire,
//! nanoseconds since the Unix epoch inside (compared as instants, never as
//! strings).

use std::fmt;

use time::{OffsetDateTime, format_description::well_known::Rfc3339, macros::format_description};

/// An instant with nanosecond precision, as nanoseconds since 1970-01-01T00:00:00Z.
///
/// `i64` nanoseconds cover the years 1677 to 2262. Times outside that span
/// are saturated to its ends when parsed: any RFC 3339 time is accepted,
/// and future times are clamped anyway (see `validate`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(pub i64);

/// Why a string is not an acceptable timestamp.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TimestampError {
    #[error("'{0}' is not an RFC 3339 timestamp (for example 2024-01-01T10:00:00.000Z)")]
    Malformed(String),
}

impl Timestamp {
    pub const EPOCH: Timestamp = Timestamp(0);

    pub fn now() -> Timestamp {
        Timestamp::from_datetime(OffsetDateTime::now_utc()).expect("the system clock is within i64 nanoseconds")
    }

    /// The instant at millisecond precision (rounded down): the precision
    /// browsers stamp with (`Date.toISOString()`). Field times are kept at
    /// it, so every time the server writes has their fixed-width form and a
    /// plain string comparison of two of them stays in order.
    pub fn floor_millis(self) -> Timestamp {
        // Saturating: the first microsecond of the range has no millisecond below it.
        Timestamp(self.0.saturating_sub(self.0.rem_euclid(1_000_000)))
    }

    /// The earliest and latest instants a [`Timestamp`] holds.
    pub const MIN: Timestamp = Timestamp(i64::MIN);
    pub const MAX: Timestamp = Timestamp(i64::MAX);

    /// Parses any RFC 3339 form (any offset, any number of fractional
    /// digits, years 0000 to 9999); a time beyond the years 1677 to 2262 is
    /// the nearest end of that span.
    pub fn parse(s: &str) -> Result<Timestamp, TimestampError> {
        let dt = OffsetDateTime::parse(s, &Rfc3339).map_err(|_| TimestampError::Malformed(s.to_owned()))?;
        let nanos = dt.unix_timestamp_nanos();
        Ok(Timestamp(nanos.clamp(i64::MIN.into(), i64::MAX.into()) as i64))
    }

    fn from_datetime(dt: OffsetDateTime) -> Option<Timestamp> {
        i64::try_from(dt.unix_timestamp_nanos()).ok().map(Timestamp)
    }

    fn datetime(self) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp_nanos(i128::from(self.0)).expect("i64 nanoseconds are always in range")
    }

    /// Fixed-width UTC form with nine fractional digits, e.g.
    /// `2024-01-01T10:06:15.123456789Z`. Fixed width keeps a plain string
    /// comparison of two such values in instant order, which old clients rely on.
    pub fn to_fixed_string(self) -> String {
        self.datetime()
            .format(format_description!(
                "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:9]Z"
            ))
            .expect("formatting a UTC instant cannot fail")
    }

    /// The shortest exact form: milliseconds when the instant has no finer
    /// part (as browsers' `toISOString()` writes), else nanoseconds.
    pub fn to_short_string(self) -> String {
        if self.0.rem_euclid(1_000_000) == 0 {
            self.datetime()
                .format(format_description!(
                    "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
                ))
                .expect("formatting a UTC instant cannot fail")
        } else {
            self.to_fixed_string()
        }
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_short_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_any_offset_and_precision_as_the_same_instant() {
        let a = Timestamp::parse("2024-01-01T10:00:00Z").unwrap();
        let b = Timestamp::parse("2024-01-01T12:00:00.000000+02:00").unwrap();
        let c = Timestamp::parse("2024-01-01T10:00:00.000000000Z").unwrap();
        assert_eq!(a, b);
        assert_eq!(a, c);
        assert!(Timestamp::parse("2024-01-01T10:00:00.001Z").unwrap() > a);
    }

    #[test]
    fn rejects_what_is_not_rfc_3339() {
        assert!(matches!(
            Timestamp::parse("yesterday"),
            Err(TimestampError::Malformed(_))
        ));
        assert!(matches!(
            Timestamp::parse("2024-01-01"),
            Err(TimestampError::Malformed(_))
        ));
    }

    #[test]
    fn times_beyond_the_span_saturate() {
        assert_eq!(Timestamp::parse("9999-12-31T23:59:59.999Z"), Ok(Timestamp::MAX));
        assert_eq!(Timestamp::parse("0000-01-01T00:00:00Z"), Ok(Timestamp::MIN));
        assert_eq!(Timestamp::parse("1600-06-01T00:00:00+02:00"), Ok(Timestamp::MIN));
        assert_eq!(
            Timestamp::parse("2262-04-11T23:47:16.854775807Z"),
            Ok(Timestamp::MAX),
            "the last instant itself"
        );
        assert!(Timestamp::MAX.to_fixed_string().starts_with("2262-"));
        assert!(Timestamp::MIN.to_fixed_string().starts_with("1677-"));
    }

    #[test]
    fn fixed_form_is_fixed_width_and_round_trips() {
        let t = Timestamp::parse("2024-01-01T10:06:15.123456789Z").unwrap();
        assert_eq!(t.to_fixed_string(), "2024-01-01T10:06:15.123456789Z");
        assert_eq!(Timestamp::EPOCH.to_fixed_string(), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(Timestamp::parse(&t.to_fixed_string()).unwrap(), t);
    }

    #[test]
    fn short_form_uses_milliseconds_when_exact() {
        let t = Timestamp::parse("2024-01-01T10:05:00Z").unwrap();
        assert_eq!(t.to_short_string(), "2024-01-01T10:05:00.000Z");
        let fine = Timestamp(t.0 + 1);
        assert_eq!(fine.to_short_string(), "2024-01-01T10:05:00.000000001Z");
        assert_eq!(fine.floor_millis(), t);
        assert_eq!(
            Timestamp(-1).floor_millis(),
            Timestamp(-1_000_000),
            "rounds down before 1970 too"
        );
        assert_eq!(
            Timestamp(i64::MIN + 308).floor_millis(),
            Timestamp(i64::MIN),
            "never wraps"
        );
    }
}
