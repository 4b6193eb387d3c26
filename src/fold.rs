//! Field-level last-write-wins: the fold of the change log.
//!
//! Every accepted change is an immutable log entry that writes some fields
//! of one record, each field with a timestamp. A record's state is the fold
//! of its entries: each field holds the value of the write with the greatest
//! `(timestamp, seq)`, so equal timestamps go to the later log entry. The
//! fold is a per-field maximum, hence commutative: whatever order the
//! entries are applied in, the state is the same. That lets the server keep
//! the fold incrementally (the `sync_records` projection) and rebuild it
//! from the log at any time.
//!
//! Nothing here touches HTTP or SQL.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::cursor::Cursor;
use crate::timestamp::Timestamp;

/// The field a delete writes; a record whose folded `deletedAt` is set is deleted.
pub const DELETED_AT: &str = "deletedAt";

/// One field written by one change, at the change's (already clamped) time.
#[derive(Clone, Debug, PartialEq)]
pub struct FieldWrite {
    pub name: String,
    pub value: Value,
    pub at: Timestamp,
}

/// One log entry as the fold sees it: its position and the fields it writes.
#[derive(Clone, Debug, PartialEq)]
pub struct LogEntry {
    pub seq: i64,
    pub writes: Vec<FieldWrite>,
}

/// The folded state of one field.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FieldState {
    /// The winning value.
    #[serde(rename = "v")]
    pub value: Value,
    /// The winning write's field timestamp (nanoseconds).
    #[serde(rename = "t")]
    pub at: i64,
    /// The winning write's log position.
    #[serde(rename = "s")]
    pub seq: i64,
    /// The last log position that wrote this field, winning or not. A
    /// losing write still makes the field part of the next delta, so the
    /// device that sent it is told the value that beat it.
    #[serde(rename = "w")]
    pub written: i64,
}

/// The folded state of one record.
#[derive(Clone, Debug, PartialEq)]
pub struct RecordState {
    pub fields: BTreeMap<String, FieldState>,
    /// Log position of the record's first entry.
    pub created: i64,
    /// Log position of the record's last entry.
    pub touched: i64,
}

impl Default for RecordState {
    fn default() -> Self {
        RecordState {
            fields: BTreeMap::new(),
            created: i64::MAX,
            touched: i64::MIN,
        }
    }
}

/// What a client must do to bring its copy of a record up to date.
#[derive(Clone, Debug, PartialEq)]
pub enum RecordDelta {
    /// The record did not exist at the cursor: `data` is all of it.
    Insert { data: Map<String, Value> },
    /// `fields` are the fields written after the cursor, with their winning
    /// value and timestamp; `data` is the whole folded record.
    Update {
        data: Map<String, Value>,
        fields: BTreeMap<String, (Value, Timestamp)>,
    },
    /// The record is (soft-)deleted.
    Delete { deleted_at: Value },
}

impl RecordState {
    /// Folds one log entry in. Order-independent: applying the same entries
    /// in any order gives the same state.
    pub fn apply(&mut self, entry: &LogEntry) {
        self.created = self.created.min(entry.seq);
        self.touched = self.touched.max(entry.seq);
        for write in &entry.writes {
            let candidate = FieldState {
                value: write.value.clone(),
                at: write.at.0,
                seq: entry.seq,
                written: entry.seq,
            };
            match self.fields.get_mut(&write.name) {
                None => {
                    self.fields.insert(write.name.clone(), candidate);
                }
                Some(current) => {
                    let written = current.written.max(entry.seq);
                    if (candidate.at, candidate.seq) > (current.at, current.seq) {
                        *current = candidate;
                    }
                    current.written = written;
                }
            }
        }
    }

    /// Folds a whole history.
    pub fn fold<'a>(entries: impl IntoIterator<Item = &'a LogEntry>) -> RecordState {
        let mut state = RecordState::default();
        for entry in entries {
            state.apply(entry);
        }
        state
    }

    pub fn is_deleted(&self) -> bool {
        self.fields.get(DELETED_AT).is_some_and(|f| !f.value.is_null())
    }

    /// The record as a client stores it: every folded field plus `id`.
    pub fn data(&self, id: &str) -> Map<String, Value> {
        let mut data: Map<String, Value> = self
            .fields
            .iter()
            .map(|(name, f)| (name.clone(), f.value.clone()))
            .collect();
        data.insert("id".to_owned(), Value::String(id.to_owned()));
        data
    }

    /// The delta since `since`, or `None` when nothing was written after it.
    pub fn delta_since(&self, id: &str, since: Cursor) -> Option<RecordDelta> {
        if self.touched <= since.0 {
            return None;
        }
        if self.is_deleted() {
            return Some(RecordDelta::Delete {
                deleted_at: self.fields[DELETED_AT].value.clone(),
            });
        }
        let data = self.data(id);
        if self.created > since.0 {
            return Some(RecordDelta::Insert { data });
        }
        let fields = self
            .fields
            .iter()
            .filter(|(_, f)| f.written > since.0)
            .map(|(name, f)| (name.clone(), (f.value.clone(), Timestamp(f.at))))
            .collect();
        Some(RecordDelta::Update { data, fields })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

    fn entry(seq: i64, writes: &[(&str, Value, i64)]) -> LogEntry {
        LogEntry {
            seq,
            writes: writes
                .iter()
                .map(|(name, value, at)| FieldWrite {
                    name: (*name).to_owned(),
                    value: value.clone(),
                    at: Timestamp(*at),
                })
                .collect(),
        }
    }

    fn values(state: &RecordState) -> BTreeMap<String, Value> {
        state.fields.iter().map(|(k, f)| (k.clone(), f.value.clone())).collect()
    }

    #[test]
    fn later_field_timestamp_wins_whatever_the_arrival_order() {
        let a = entry(1, &[("title", json!("Buy milk"), 500)]);
        let b = entry(2, &[("title", json!("Buy eggs"), 530), ("done", json!(false), 530)]);
        let late_old = entry(3, &[("title", json!("stale"), 100), ("done", json!(true), 600)]);
        let state = RecordState::fold([&a, &b, &late_old]);
        assert_eq!(state.fields["title"].value, json!("Buy eggs"));
        assert_eq!(state.fields["done"].value, json!(true));
        assert_eq!(
            state.fields["title"].written, 3,
            "a losing write still marks the field written"
        );
    }

    #[test]
    fn equal_timestamps_go_to_the_later_log_entry() {
        let a = entry(7, &[("title", json!("first"), 500)]);
        let b = entry(9, &[("title", json!("second"), 500)]);
        assert_eq!(RecordState::fold([&b, &a]).fields["title"].value, json!("second"));
    }

    #[test]
    fn delta_distinguishes_insert_update_and_delete() {
        let created = entry(10, &[("title", json!("a"), 100), ("done", json!(false), 100)]);
        let edited = entry(20, &[("done", json!(true), 200)]);
        let state = RecordState::fold([&created, &edited]);
        assert_eq!(state.delta_since("r1", Cursor(20)), None);
        match state.delta_since("r1", Cursor(5)).unwrap() {
            RecordDelta::Insert { data } => assert_eq!(
                data,
                json!({"id": "r1", "title": "a", "done": true})
                    .as_object()
                    .unwrap()
                    .clone()
            ),
            other => panic!("expected insert, got {other:?}"),
        }
        match state.delta_since("r1", Cursor(10)).unwrap() {
            RecordDelta::Update { data, fields } => {
                assert_eq!(fields.keys().collect::<Vec<_>>(), vec!["done"]);
                assert_eq!(data["title"], json!("a"));
                assert_eq!(data["id"], json!("r1"));
            }
            other => panic!("expected update, got {other:?}"),
        }
        let deleted = entry(30, &[(DELETED_AT, json!("2024-01-01T00:00:00.000Z"), 300)]);
        let state = RecordState::fold([&created, &edited, &deleted]);
        assert!(state.is_deleted());
        assert_eq!(
            state.delta_since("r1", Cursor(25)),
            Some(RecordDelta::Delete {
                deleted_at: json!("2024-01-01T00:00:00.000Z")
            })
        );
    }

    fn arb_history() -> impl Strategy<Value = Vec<LogEntry>> {
        let field = prop::sample::select(vec!["title", "done", "rank", DELETED_AT]);
        let write = (field, prop::option::of(0i64..5), 0i64..6);
        prop::collection::vec(prop::collection::vec(write, 1..4), 1..12).prop_map(|entries| {
            entries
                .into_iter()
                .enumerate()
                .map(|(i, writes)| LogEntry {
                    seq: (i as i64 + 1) * 10,
                    writes: writes
                        .into_iter()
                        .map(|(name, v, at)| FieldWrite {
                            name: name.to_owned(),
                            value: v.map_or(Value::Null, |v| json!(v)),
                            at: Timestamp(at),
                        })
                        .collect(),
                })
                .collect()
        })
    }

    proptest! {
        #[test]
        fn any_permutation_of_the_log_folds_to_the_same_state(
            (history, order) in arb_history().prop_flat_map(|h| {
                let n = h.len();
                (Just(h), Just((0..n).collect::<Vec<_>>()).prop_shuffle())
            })
        ) {
            let in_order = RecordState::fold(&history);
            let shuffled = RecordState::fold(order.iter().map(|&i| &history[i]));
            prop_assert_eq!(in_order, shuffled);
        }

        /// A client holding the state at C that applies the delta since C
        /// (put `data`, or merge `fields` into what it had) holds the state now.
        #[test]
        fn delta_since_a_cursor_brings_the_state_at_that_cursor_up_to_date(
            history in arb_history(), cut in 0usize..12
        ) {
            let cut = cut.min(history.len());
            let since = Cursor(cut as i64 * 10);
            let now = RecordState::fold(&history);
            let then = RecordState::fold(&history[..cut]);
            let mut client = if cut == 0 { None } else { Some(values(&then)) };
            match now.delta_since("r", since) {
                None => prop_assert_eq!(client.clone(), Some(values(&now))),
                Some(RecordDelta::Delete { .. }) => prop_assert!(now.is_deleted()),
                Some(RecordDelta::Insert { data }) => {
                    prop_assert!(client.is_none());
                    client = Some(data.into_iter().filter(|(k, _)| k != "id").collect());
                    prop_assert_eq!(client, Some(values(&now)));
                }
                Some(RecordDelta::Update { data, fields }) => {
                    let mut merged = client.clone().expect("an update is only sent for a record the client had");
                    for (name, (value, _)) in fields {
                        merged.insert(name, value);
                    }
                    prop_assert_eq!(&merged, &values(&now));
                    let put: BTreeMap<_, _> = data.into_iter().filter(|(k, _)| k != "id").collect();
                    prop_assert_eq!(put, values(&now));
                }
            }
        }
    }
}
