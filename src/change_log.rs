//! The append-only change log (`sync_changes`): the changes a push
//! appends, how a change becomes log rows and a log row becomes a fold
//! entry. The SQL is in `store`.

use serde_json::{Map, Value};
use sqlx::types::Json;
use uuid::Uuid;

use crate::cursor::Cursor;
use crate::fold::{FieldWrite, LogEntry};
use crate::protocol::Op;
use crate::timestamp::Timestamp;

/// A validated push: ready to append.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub client_id: String,
    pub since: Cursor,
    pub changes: Vec<Change>,
}

/// One validated change: the fields it writes at their effective times.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub table: String,
    pub id: String,
    pub op: Op,
    pub writes: Vec<FieldWrite>,
}

/// One log row about to be appended.
pub struct NewRow<'a> {
    pub id: Uuid,
    pub seq: i64,
    pub table: &'a str,
    pub record_id: &'a str,
    pub op: &'a str,
    /// `{field: value}`
    pub data: Value,
    /// `{field: "<RFC 3339>"}`
    pub stamps: Value,
    /// The change's writes are untimed (see [`FieldWrite::untimed`]).
    /// Validation makes a change's writes all timed or all untimed (an
    /// insert's `data` has one time), so the log keeps one flag per row.
    pub untimed: bool,
}

/// The rows of `changes` at positions `first_seq..`, one each.
pub fn new_rows(first_seq: i64, changes: &[Change]) -> impl Iterator<Item = NewRow<'_>> {
    (first_seq..).zip(changes).map(|(seq, change)| {
        let (data, stamps) = columns(&change.writes);
        NewRow {
            id: Uuid::now_v7(),
            seq,
            table: &change.table,
            record_id: &change.id,
            op: change.op.as_str(),
            data,
            stamps,
            untimed: change.writes.iter().any(|w| w.untimed),
        }
    })
}

/// A change's writes as the log stores them: `{field: value}` and
/// `{field: "<RFC 3339>"}`.
fn columns(writes: &[FieldWrite]) -> (Value, Value) {
    let mut values = Map::with_capacity(writes.len());
    let mut times = Map::with_capacity(writes.len());
    for w in writes {
        values.insert(w.name.clone(), w.value.clone());
        times.insert(w.name.clone(), Value::String(w.at.to_fixed_string()));
    }
    (Value::Object(values), Value::Object(times))
}

/// The inverse of [`columns`]. A field without a readable timestamp is
/// taken untimed at the epoch (it then loses to any other write) rather
/// than failing a whole rebuild.
fn writes(data: Value, times: &Value, untimed: bool) -> Vec<FieldWrite> {
    let Value::Object(values) = data else { return Vec::new() };
    values
        .into_iter()
        .map(|(name, value)| {
            let at = times
                .get(&name)
                .and_then(Value::as_str)
                .and_then(|s| Timestamp::parse(s).ok());
            FieldWrite {
                name,
                value,
                at: at.unwrap_or(Timestamp::EPOCH),
                untimed: untimed || at.is_none(),
            }
        })
        .collect()
}

/// One record's key in the log.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RecordKey {
    pub app_id: String,
    pub table: String,
    pub id: String,
}

/// A log row as read back: (app, table, record, seq, data, timestamps, untimed).
pub type LogRow = (String, String, String, i64, Json<Value>, Json<Value>, bool);

/// A log row as the fold takes it.
pub fn entry((app_id, table, id, seq, Json(data), Json(times), untimed): LogRow) -> (RecordKey, LogEntry) {
    (
        RecordKey { app_id, table, id },
        LogEntry {
            seq,
            writes: writes(data, &times, untimed),
        },
    )
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn log_columns_round_trip_to_the_same_writes() {
        let mut original = vec![
            FieldWrite::timed("title", json!("x"), Timestamp(1_704_103_575_123_456_789)),
            FieldWrite::timed("tags", json!(["a", {"b": null}]), Timestamp(5)),
        ];
        for untimed in [false, true] {
            for write in &mut original {
                write.untimed = untimed;
            }
            let (data, times) = columns(&original);
            let mut back = writes(data, &times, untimed);
            back.sort_by(|a, b| b.name.cmp(&a.name));
            assert_eq!(back, original);
        }
    }
}
