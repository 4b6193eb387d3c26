//! A push's clock: every time a client sends, resolved against the
//! receive time and clamped where it runs ahead.

use serde_json::Value;

use crate::error::{Error, ErrorCode, Result};
use crate::timestamp::Timestamp;

#[derive(Clone, Copy)]
pub(super) struct Clock {
    /// The receive time, floored to the millisecond.
    pub now: Timestamp,
    /// The latest time taken as sent: `now` plus the allowed skew.
    pub latest: Timestamp,
}

impl Clock {
    /// The effective time of a client timestamp: parsed, and clamped to
    /// `now` when further in the future than the allowed skew.
    pub fn resolve(self, what: &str, value: Option<&str>) -> Result<Timestamp> {
        let Some(value) = value else { return Ok(self.now) };
        let at =
            Timestamp::parse(value).map_err(|e| Error::invalid(ErrorCode::InvalidTimestamp, format!("{what}: {e}")))?;
        Ok(self.clamp(at))
    }

    /// The one place client times are clamped: a time further ahead than
    /// the allowed skew becomes the receive time (`now`); any other is
    /// floored to the millisecond. Field times are kept in milliseconds,
    /// the precision of every client's clock (JavaScript's `Date`): finer
    /// digits would make a device that compares times as strings, or as
    /// `Date`s, pick another latest time than the server (`…00.001Z` sorts
    /// after `…00.0015Z`). Writes within one millisecond go to the later
    /// log entry.
    fn clamp(self, at: Timestamp) -> Timestamp {
        if at > self.latest { self.now } else { at.floor_millis() }
    }

    /// A record's own timestamp field: an RFC 3339 string, or a number of
    /// milliseconds since the epoch (`Date.now()`), as apps store them.
    pub fn resolve_value(self, what: &str, value: &Value) -> Result<Timestamp> {
        match value {
            Value::String(s) => self.resolve(what, Some(s)),
            Value::Number(n) => {
                let nanos = n
                    .as_f64()
                    .map(|ms| ms * 1e6)
                    .filter(|ns| ns.is_finite() && ns.abs() < i64::MAX as f64);
                let at = nanos.map(|ns| Timestamp(ns as i64)).ok_or_else(|| {
                    Error::invalid(
                        ErrorCode::InvalidTimestamp,
                        format!("{what}: {n} is not a time in milliseconds"),
                    )
                })?;
                Ok(self.clamp(at))
            }
            _ => Err(Error::invalid(
                ErrorCode::InvalidTimestamp,
                format!("{what} must be an RFC 3339 string or epoch milliseconds"),
            )),
        }
    }
}
