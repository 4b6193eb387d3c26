//! The shapes of the rows the store writes and reads, and how they become
//! the domain's values.

use std::collections::BTreeMap;

use serde_json::Value;
use sqlx::types::Json;
use uuid::Uuid;

use crate::change_log::{self, Change, RecordKey};
use crate::fold::{FieldState, LogEntry, RecordState};
use crate::idempotency::Outcome;
use crate::projection::Record;

/// One log row about to be appended. The rows of a batch take consecutive
/// positions in their order, from the first the clock hands out.
pub struct NewRow<'a> {
    pub id: Uuid,
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
    /// The rows of `changes`, one each, in order.
    pub fn of(changes: &[Change]) -> Vec<NewRow<'_>> {
        changes
            .iter()
            .map(|change| {
                let (data, stamps) = change_log::columns(&change.writes);
                NewRow {
                    id: Uuid::now_v7(),
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

/// A projection row about to be written: a record's state as the JSON
/// text stored (whose length a page counts).
pub struct SavedRow<'a> {
    pub table: &'a str,
    pub record_id: &'a str,
    pub fields: String,
    pub created_seq: i64,
    pub touched_seq: i64,
}

impl SavedRow<'_> {
    pub fn of(records: &[Record]) -> Result<Vec<SavedRow<'_>>, serde_json::Error> {
        records
            .iter()
            .map(|r| {
                Ok(SavedRow {
                    table: &r.table,
                    record_id: &r.id,
                    fields: serde_json::to_string(&r.state.fields)?,
                    created_seq: r.state.created,
                    touched_seq: r.state.touched,
                })
            })
            .collect()
    }
}

/// What appending a batch reads back in the same transaction, after the
/// user's clock is locked (see [`crate::store::dialect::Dialect::append_batch`]).
pub struct Appended {
    /// The clock after the batch: the batch's last position.
    pub last_seq: i64,
    /// The current states of the batch's records (of those that exist).
    pub states: Vec<Record>,
    /// The app's records changed after the cursor, oldest change first,
    /// with their sizes; the batch's records among them in their state
    /// before it.
    pub page: Vec<(Record, i64)>,
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
/// text stored, whose length is the record's size (asking the database for
/// it would cost it a second pass over every record), as text rather than
/// JSON so that it is parsed once, into the state, not first checked.
#[derive(sqlx::FromRow)]
pub struct PageRow {
    pub last_seq: i64,
    pub table_name: Option<String>,
    pub record_id: Option<String>,
    pub fields: Option<String>,
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
                let size = fields.len() as i64;
                let row = RecordRow {
                    table_name,
                    record_id,
                    fields: Json(serde_json::from_str(&fields)?),
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

/// The records of a page's rows, with their sizes.
pub fn page_records(rows: Vec<PageRow>) -> Result<Vec<(Record, i64)>, serde_json::Error> {
    let mut records = Vec::with_capacity(rows.len());
    for row in rows {
        records.extend(row.into_parts()?.1);
    }
    Ok(records)
}

/// A row of PostgreSQL's statement that appends a batch (see
/// [`Appended`]): the clock, whether the statement's snapshot is current,
/// and a record (or none).
#[derive(sqlx::FromRow)]
pub struct BatchRow {
    /// Nothing of the user's committed between the statement's snapshot
    /// and its locking the clock, so what it read is current.
    pub fresh: bool,
    /// `true`: a state of one of the batch's records; `false`: a record of
    /// the page; `NULL`: neither (the row carries only the clock).
    pub loaded: Option<bool>,
    #[sqlx(flatten)]
    pub row: PageRow,
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
