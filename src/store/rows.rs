//! The shapes of the rows the store writes and reads, and how they become
//! the domain's values.

use std::collections::BTreeMap;

use serde_json::Value;
use serde_json::value::RawValue;
use sqlx::types::Json;
use uuid::Uuid;

use crate::change_log::{self, Change, RecordKey};
use crate::fold::{FieldState, LogEntry, RecordState};
use crate::idempotency::Outcome;
use crate::projection::Record;

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
    /// The change's writes are untimed (see [`crate::fold::FieldWrite::untimed`]).
    /// Validation makes a change's writes all timed or all untimed (an
    /// insert's `data` has one time), so the log keeps one flag per row.
    pub untimed: bool,
}

impl NewRow<'_> {
    /// The rows of `changes` at positions `first_seq..`, one each.
    pub fn of(first_seq: i64, changes: &[Change]) -> Vec<NewRow<'_>> {
        (first_seq..)
            .zip(changes)
            .map(|(seq, change)| {
                let (data, stamps) = change_log::columns(&change.writes);
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
            .collect()
    }
}

/// A log row as read back (`sync_changes`).
#[derive(sqlx::FromRow)]
pub struct LogRow {
    pub app_id: String,
    pub table_name: String,
    pub record_id: String,
    pub seq: i64,
    pub data: Json<Value>,
    pub field_timestamps: Json<Value>,
    pub untimed: bool,
}

impl LogRow {
    /// The row as the fold takes it.
    pub fn into_entry(self) -> (RecordKey, LogEntry) {
        let key = RecordKey {
            app_id: self.app_id,
            table: self.table_name,
            id: self.record_id,
        };
        let writes = change_log::writes(self.data.0, &self.field_timestamps.0, self.untimed);
        (key, LogEntry { seq: self.seq, writes })
    }
}

/// A projection row (`sync_records`) of one app.
#[derive(sqlx::FromRow)]
pub struct RecordRow {
    pub table_name: String,
    pub record_id: String,
    pub fields: Json<BTreeMap<String, FieldState>>,
    pub created_seq: i64,
    pub touched_seq: i64,
}

impl From<RecordRow> for Record {
    fn from(row: RecordRow) -> Record {
        Record {
            table: row.table_name,
            id: row.record_id,
            state: RecordState {
                fields: row.fields.0,
                created: row.created_seq,
                touched: row.touched_seq,
            },
        }
    }
}

/// A row of a page: the user's clock, then one changed record (all `None`
/// when nothing changed after the cursor). Its fields come as the JSON
/// text the database sent, whose length is the record's size (asking the
/// database for it would cost it a second pass over every record).
#[derive(sqlx::FromRow)]
pub struct PageRow {
    pub last_seq: i64,
    pub table_name: Option<String>,
    pub record_id: Option<String>,
    pub fields: Option<Json<Box<RawValue>>>,
    pub created_seq: Option<i64>,
    pub touched_seq: Option<i64>,
}

impl PageRow {
    /// The clock, and the record with its size (if the row holds one).
    pub fn into_parts(self) -> Result<(i64, Option<(Record, i64)>), serde_json::Error> {
        let record = match (
            self.table_name,
            self.record_id,
            self.fields,
            self.created_seq,
            self.touched_seq,
        ) {
            (Some(table_name), Some(record_id), Some(fields), Some(created_seq), Some(touched_seq)) => {
                let size = fields.0.get().len() as i64;
                let row = RecordRow {
                    table_name,
                    record_id,
                    fields: Json(serde_json::from_str(fields.0.get())?),
                    created_seq,
                    touched_seq,
                };
                Some((Record::from(row), size))
            }
            _ => None,
        };
        Ok((self.last_seq, record))
    }
}

/// An app and one of its tables (`SELECT DISTINCT app_id, table_name`).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct TableRow {
    pub app_id: String,
    pub table_name: String,
}

/// A kept idempotent outcome (`sync_idempotency`).
#[derive(sqlx::FromRow)]
pub struct OutcomeRow {
    /// The fingerprint of the request it answered.
    pub request_hash: Vec<u8>,
    pub response: Json<Value>,
}

impl From<OutcomeRow> for Outcome {
    fn from(row: OutcomeRow) -> Outcome {
        Outcome {
            fingerprint: row.request_hash,
            response: row.response.0,
        }
    }
}
