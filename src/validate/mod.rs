//! Turns a pushed batch into log entries, or says exactly what is wrong
//! with it. Everything is checked before anything is written; what a
//! store can keep of a JSON value is [`value`]'s.

mod value;

use std::time::Duration;

use serde_json::Value;

use crate::change_log::{Batch, Change};
use crate::cursor::Cursor;
use crate::error::{Error, Result};
use crate::fold::{DELETED_AT, FieldWrite, UPDATED_AT};
use crate::protocol::{
    BadText, ChangeInput, MAX_ID_CHARS, MAX_NAME_CHARS, MAX_STREAM_COLLECTIONS, Op, PushRequest, check_text,
};
use crate::timestamp::Timestamp;

use self::value::{nul, storable};

/// The rules a push is checked against.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_changes: usize,
    pub max_clock_skew: Duration,
}

/// Checks a name (app id, table, field): 1-128 characters, no control characters.
pub fn name(what: &str, value: &str) -> Result<()> {
    bounded(what, value, MAX_NAME_CHARS)
}

/// Checks an id (record, client): 1-256 characters, no control characters.
pub fn id(what: &str, value: &str) -> Result<()> {
    bounded(what, value, MAX_ID_CHARS)
}

fn bounded(what: &str, value: &str, max: usize) -> Result<()> {
    match check_text(value, max) {
        Ok(()) => Ok(()),
        Err(BadText::Length) => Err(Error::invalid(
            "invalid_name",
            format!("{what} must be 1 to {max} characters long"),
        )),
        Err(BadText::Nul) => Err(nul(what)),
        Err(BadText::Control) => Err(Error::invalid(
            "invalid_name",
            format!("{what} must not contain control characters"),
        )),
    }
}

pub fn idempotency_key(key: &str) -> Result<()> {
    if check_text(key, MAX_ID_CHARS).is_err() {
        return Err(Error::invalid(
            "invalid_idempotency_key",
            format!("Idempotency-Key must be 1 to {MAX_ID_CHARS} characters without control characters"),
        ));
    }
    Ok(())
}

/// Checks the collections a stream follows: 1 to
/// [`MAX_STREAM_COLLECTIONS`] names, each a valid name.
pub fn collections(names: Vec<String>) -> Result<Vec<String>> {
    if names.len() > MAX_STREAM_COLLECTIONS {
        return Err(Error::invalid(
            "too_many_collections",
            format!("a stream follows at most {MAX_STREAM_COLLECTIONS} collections"),
        ));
    }
    for collection in &names {
        name("collection", collection)?;
    }
    Ok(names)
}

/// Parses a cursor parameter (`since`), defaulting to the beginning.
pub fn since(value: Option<&str>) -> Result<Cursor> {
    match value {
        None | Some("") => Ok(Cursor::START),
        Some(s) => Cursor::parse(s).map_err(|e| Error::invalid("invalid_cursor", format!("since: {e}"))),
    }
}

/// Checks a whole push and resolves every write's effective timestamp.
/// `now` is the server's receive time (taken at millisecond precision, see
/// [`Timestamp::floor_millis`]): the time of an update or delete that gives
/// none, and what a timestamp further ahead than `max_clock_skew` is
/// clamped to. An insert's `data` without a time is untimed (see
/// [`FieldWrite::untimed`]).
pub fn push(header_client_id: Option<&str>, request: PushRequest, now: Timestamp, limits: Limits) -> Result<Batch> {
    let now = now.floor_millis();
    // Both are checked when both are sent, as the spec declares each.
    let header_client_id = header_client_id.filter(|c| !c.is_empty());
    if let Some(sent) = header_client_id {
        id("X-Client-Id", sent)?;
    }
    if let Some(sent) = request.client_id.as_deref() {
        id("clientId", sent)?;
    }
    let client_id = header_client_id
        .or(request.client_id.as_deref())
        .ok_or_else(|| {
            Error::invalid(
                "missing_client_id",
                "send the device id in X-Client-Id (or the body's clientId)",
            )
        })?
        .to_owned();
    if request.changes.len() > limits.max_changes {
        return Err(Error::too_large(
            "too_many_changes",
            format!(
                "a push may hold at most {} changes; got {} (send them in several pushes)",
                limits.max_changes,
                request.changes.len()
            ),
        ));
    }
    let since = since(request.since.as_deref())?;
    let latest = Timestamp(
        now.0
            .saturating_add(i64::try_from(limits.max_clock_skew.as_nanos()).unwrap_or(i64::MAX)),
    );
    let clock = Clock { now, latest };
    let changes = request
        .changes
        .into_iter()
        .enumerate()
        .map(|(i, change)| self::change(change, clock).map_err(|e| at_index(i, e)))
        .collect::<Result<_>>()?;
    Ok(Batch {
        client_id,
        since,
        changes,
    })
}

#[derive(Clone, Copy)]
struct Clock {
    now: Timestamp,
    latest: Timestamp,
}

impl Clock {
    /// The effective time of a client timestamp: parsed, and clamped to
    /// `now` when further in the future than the allowed skew.
    fn resolve(self, what: &str, value: Option<&str>) -> Result<Timestamp> {
        let Some(value) = value else { return Ok(self.now) };
        let at = Timestamp::parse(value).map_err(|e| Error::invalid("invalid_timestamp", format!("{what}: {e}")))?;
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
    fn resolve_value(self, what: &str, value: &Value) -> Result<Timestamp> {
        match value {
            Value::String(s) => self.resolve(what, Some(s)),
            Value::Number(n) => {
                let nanos = n
                    .as_f64()
                    .map(|ms| ms * 1e6)
                    .filter(|ns| ns.is_finite() && ns.abs() < i64::MAX as f64);
                let at = nanos.map(|ns| Timestamp(ns as i64)).ok_or_else(|| {
                    Error::invalid(
                        "invalid_timestamp",
                        format!("{what}: {n} is not a time in milliseconds"),
                    )
                })?;
                Ok(self.clamp(at))
            }
            _ => Err(Error::invalid(
                "invalid_timestamp",
                format!("{what} must be an RFC 3339 string or epoch milliseconds"),
            )),
        }
    }
}

fn at_index(i: usize, e: Error) -> Error {
    match e {
        Error::Invalid { code, message } => Error::Invalid {
            code,
            message: format!("changes[{i}]: {message}"),
        },
        other => other,
    }
}

fn change(input: ChangeInput, clock: Clock) -> Result<Change> {
    name("table", &input.table)?;
    id("id", &input.id)?;
    let writes = match input.op {
        Op::Insert => {
            let data = input
                .data
                .ok_or_else(|| Error::invalid("missing_data", "an insert needs 'data'"))?;
            data_writes(&input.id, data, clock)?
        }
        Op::Update => match (input.fields, input.data) {
            (Some(fields), _) => fields
                .into_iter()
                .filter(|(field, _)| field != "id")
                .map(|(field, change)| {
                    let what = format!("fields.{field}.updatedAt");
                    let at = clock.resolve(&what, change.updated_at.as_deref().or(change.at.as_deref()))?;
                    field_write(field, change.value, at, false)
                })
                .collect::<Result<_>>()?,
            (None, Some(data)) => data_writes(&input.id, data, clock)?,
            (None, None) => return Err(Error::invalid("missing_fields", "an update needs 'fields' (or 'data')")),
        },
        Op::Delete => {
            let at = clock.resolve("deletedAt", input.deleted_at.as_deref())?;
            vec![FieldWrite::timed(DELETED_AT, Value::String(at.to_short_string()), at)]
        }
    };
    Ok(Change {
        table: input.table.0,
        id: input.id.0,
        op: input.op,
        writes,
    })
}

/// The writes of a whole record: every field of `data` at its
/// `updatedAt`, else `createdAt`, else untimed at the receive time (a
/// record's initial content, which any timed write of a field supersedes).
fn data_writes(
    record_id: &str,
    data: std::collections::BTreeMap<String, Value>,
    clock: Clock,
) -> Result<Vec<FieldWrite>> {
    if data.get("id").is_some_and(|given| given.as_str() != Some(record_id)) {
        return Err(Error::invalid("id_mismatch", "data.id must equal the change's id"));
    }
    // Only the timestamp that is used is checked: a record whose
    // `createdAt` no one reads must not be refused for its form.
    let (at, untimed) = match [UPDATED_AT, "createdAt"]
        .into_iter()
        .find(|f| data.get(*f).is_some_and(|v| !v.is_null()))
    {
        Some(field) => (clock.resolve_value(&format!("data.{field}"), &data[field])?, false),
        None => (clock.now, true),
    };
    data.into_iter()
        .filter(|(field, _)| field != "id")
        .map(|(field, value)| field_write(field, value, at, untimed))
        .collect()
}

/// One checked field write. `deletedAt` decides whether a record is
/// deleted, so it must be a timestamp or null, never just any value.
fn field_write(name: String, value: Value, at: Timestamp, untimed: bool) -> Result<FieldWrite> {
    self::name("field name", &name)?;
    storable(&name, &value)?;
    if name == DELETED_AT && !value.is_null() {
        match value.as_str().map(Timestamp::parse) {
            Some(Ok(_)) => {}
            _ => {
                return Err(Error::invalid(
                    "invalid_timestamp",
                    "deletedAt must be an RFC 3339 timestamp or null",
                ));
            }
        }
    }
    Ok(FieldWrite {
        name,
        value,
        at,
        untimed,
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const LIMITS: Limits = Limits {
        max_changes: 3,
        max_clock_skew: Duration::from_secs(300),
    };

    fn now() -> Timestamp {
        Timestamp::parse("2024-01-01T12:00:00Z").unwrap()
    }

    fn request(changes: Value) -> PushRequest {
        use poem_openapi::types::ParseFromJSON;
        PushRequest::parse_from_json(Some(json!({ "clientId": "dev-1", "changes": changes }))).unwrap()
    }

    fn code(result: Result<Batch>) -> &'static str {
        match result {
            Err(Error::Invalid { code, .. } | Error::TooLarge { code, .. }) => code,
            other => panic!("expected a client error, got {other:?}"),
        }
    }

    #[test]
    fn insert_fields_take_updated_at_else_created_at_else_now() {
        let batch = push(None, request(json!([
            { "table": "todos", "id": "a", "op": "insert", "data": { "id": "a", "title": "x", "updatedAt": "2024-01-01T10:00:00Z", "createdAt": "2023-01-01T00:00:00Z" } },
            { "table": "todos", "id": "b", "op": "insert", "data": { "title": "y", "createdAt": "2023-01-01T00:00:00Z" } },
            { "table": "todos", "id": "c", "op": "insert", "data": { "title": "z" } }
        ])), now(), LIMITS).unwrap();
        let first = |i: usize| (batch.changes[i].writes[0].at, batch.changes[i].writes[0].untimed);
        assert_eq!(first(0), (Timestamp::parse("2024-01-01T10:00:00Z").unwrap(), false));
        assert_eq!(first(1), (Timestamp::parse("2023-01-01T00:00:00Z").unwrap(), false));
        assert_eq!(first(2), (now(), true), "no time: untimed, at the receive time");
        assert!(
            batch.changes[0].writes.iter().all(|w| w.name != "id"),
            "id is the record key, not a field"
        );
    }

    #[test]
    fn the_at_alias_and_future_clamp_apply_to_field_changes() {
        let batch = push(
            Some("header-dev"),
            request(json!([
                { "table": "todos", "id": "a", "op": "update", "fields": {
                    "title": { "value": "x", "at": "2024-01-01T11:00:00+01:00" },
                    "done": { "value": true, "updatedAt": "2030-01-01T00:00:00Z" } } }
            ])),
            now(),
            LIMITS,
        )
        .unwrap();
        assert_eq!(batch.client_id, "header-dev");
        let w = &batch.changes[0].writes;
        assert_eq!(
            w.iter().find(|w| w.name == "title").unwrap().at,
            Timestamp::parse("2024-01-01T10:00:00Z").unwrap()
        );
        assert_eq!(
            w.iter().find(|w| w.name == "done").unwrap().at,
            now(),
            "a far-future timestamp is clamped"
        );
    }

    #[test]
    fn record_timestamps_may_be_epoch_milliseconds_and_only_the_used_one_is_checked() {
        let batch = push(None, request(json!([
            { "table": "todos", "id": "a", "op": "insert", "data": { "updatedAt": 1_704_103_200_000i64, "createdAt": "not read" } },
            { "table": "todos", "id": "b", "op": "insert", "data": { "deletedAt": null, "createdAt": "2024-01-01T10:00:00Z" } }
        ])), now(), LIMITS).unwrap();
        let ten = Timestamp::parse("2024-01-01T10:00:00Z").unwrap();
        assert_eq!(batch.changes[0].writes[0].at, ten);
        assert_eq!(batch.changes[1].writes[0].at, ten);
    }

    #[test]
    fn a_delete_writes_deleted_at() {
        let batch = push(
            None,
            request(json!([
                { "table": "todos", "id": "a", "op": "delete", "deletedAt": "2024-01-01T10:06:00Z" }
            ])),
            now(),
            LIMITS,
        )
        .unwrap();
        assert_eq!(
            batch.changes[0].writes,
            vec![FieldWrite::timed(
                DELETED_AT,
                json!("2024-01-01T10:06:00.000Z"),
                Timestamp::parse("2024-01-01T10:06:00Z").unwrap()
            )]
        );
    }

    #[test]
    fn explicit_changes_without_a_time_take_the_receive_time_in_milliseconds() {
        let received = Timestamp(now().0 + 123_456_789);
        let batch = push(
            None,
            request(json!([
                { "table": "t", "id": "a", "op": "update", "fields": { "title": { "value": "x" } } },
                { "table": "t", "id": "a", "op": "delete" }
            ])),
            received,
            LIMITS,
        )
        .unwrap();
        let ms = Timestamp(now().0 + 123_000_000);
        assert_eq!(
            batch.changes[0].writes,
            vec![FieldWrite::timed("title", json!("x"), ms)]
        );
        assert_eq!(
            batch.changes[1].writes,
            vec![FieldWrite::timed(DELETED_AT, json!("2024-01-01T12:00:00.123Z"), ms)]
        );
    }

    #[test]
    fn bad_input_is_named() {
        let one = |c: Value| push(None, request(json!([c])), now(), LIMITS);
        assert_eq!(
            code(one(json!({ "table": "", "id": "a", "op": "delete" }))),
            "invalid_name"
        );
        assert_eq!(
            code(one(json!({ "table": "t".repeat(129), "id": "a", "op": "delete" }))),
            "invalid_name"
        );
        assert_eq!(
            code(one(json!({ "table": "t", "id": "a\u{0}", "op": "delete" }))),
            "nul_character"
        );
        assert_eq!(
            code(one(
                json!({ "table": "t", "id": "a", "op": "insert", "data": { "x": ["ok", "bad\u{0}"] } })
            )),
            "nul_character"
        );
        assert_eq!(
            code(one(
                json!({ "table": "t", "id": "a", "op": "insert", "data": { "updatedAt": "yesterday" } })
            )),
            "invalid_timestamp"
        );
        assert_eq!(
            code(one(
                json!({ "table": "t", "id": "a", "op": "insert", "data": { "id": "b" } })
            )),
            "id_mismatch"
        );
        assert_eq!(
            code(one(json!({ "table": "t", "id": "a", "op": "insert" }))),
            "missing_data"
        );
        assert_eq!(
            code(one(json!({ "table": "t", "id": "a", "op": "update" }))),
            "missing_fields"
        );
        assert_eq!(
            code(one(
                json!({ "table": "t", "id": "a", "op": "delete", "deletedAt": "5" })
            )),
            "invalid_timestamp"
        );
        let four = json!([{ "table": "t", "id": "a", "op": "delete" }, { "table": "t", "id": "a", "op": "delete" }, { "table": "t", "id": "a", "op": "delete" }, { "table": "t", "id": "a", "op": "delete" }]);
        assert_eq!(code(push(None, request(four), now(), LIMITS)), "too_many_changes");
        let mut anonymous = request(json!([]));
        anonymous.client_id = None;
        assert_eq!(code(push(None, anonymous, now(), LIMITS)), "missing_client_id");
    }
}
