//! The append-only change log (`sync_changes`): the changes a push
//! appends, and how their writes are kept in a log row's columns. The rows
//! and the SQL are in `store`.

use serde_json::{Map, Value};

use crate::cursor::Cursor;
use crate::fold::FieldWrite;
use crate::protocol::Op;
use crate::provenance::Provenance;
use crate::timestamp::Timestamp;

/// A validated push: ready to append.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub client_id: String,
    pub since: Cursor,
    pub changes: Vec<Change>,
}

impl Batch {
    /// The distinct tables the batch changes, in order.
    pub fn tables(&self) -> std::collections::BTreeSet<&str> {
        self.changes.iter().map(|c| c.table.as_str()).collect()
    }
}

/// One validated change: the fields it writes at their effective times,
/// and what it says of itself.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub table: String,
    pub id: String,
    pub op: Op,
    pub writes: Vec<FieldWrite>,
    pub provenance: Provenance,
}

/// A change's writes as the log stores them: `{field: value}` and
/// `{field: "<RFC 3339>"}`.
pub fn columns(writes: &[FieldWrite]) -> (Value, Value) {
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
pub fn writes(data: Value, times: &Value, untimed: bool) -> Vec<FieldWrite> {
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
