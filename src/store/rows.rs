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
use crate::provenance::Provenance;
use crate::quota::Usage;

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
    /// The change's provenance (`None`: it has none to keep).
    pub meta: Option<Value>,
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
                    meta: change.provenance.stored(),
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
    /// The provenance of the entries whose writes win (`None`: none kept).
    pub writers: Option<String>,
    pub created_seq: i64,
    pub touched_seq: i64,
}

impl SavedRow<'_> {
    /// What the row takes, as the quota and a page count it.
    pub fn size(&self) -> usize {
        self.fields.len() + self.writers.as_ref().map_or(0, String::len)
    }
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
                    writers: (!r.state.writers.is_empty())
                        .then(|| serde_json::to_string(&r.state.writers))
                        .transpose()?,
                    created_seq: r.state.created,
                    touched_seq: r.state.touched,
                })
            })
            .collect()
    }
}

/// What appending a batch reads back in the same transaction, after the
/// user's clock is locked (see [`crate::store::dialect::Dialect::append_batch`]).
pub struct AppendedRows {
    /// The clock after the batch: the batch's last position.
    pub last_seq: i64,
    /// What the user stored before the batch, when the clock row's
    /// counters hold (see [`ClockUsage`]).
    pub usage: Option<Usage>,
    /// The current states of the batch's records (of those that exist),
    /// with their sizes.
    pub states: Vec<(Record, i64)>,
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
    pub meta: Option<Json<Provenance>>,
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
        let provenance = self.meta.map(|m| m.0).unwrap_or_default();
        (
            key,
            LogEntry {
                seq: self.seq,
                writes,
                provenance,
            },
        )
    }
}

/// A projection row (`sync_records`) of one app. Its fields come as the
/// JSON text stored, whose length is the record's size (asking the
/// database for it would cost it a second pass over every record), as
/// text rather than JSON so that it is parsed once, into the state, not
/// first checked.
#[derive(sqlx::FromRow)]
pub struct RecordRow {
    pub table_name: String,
    pub record_id: String,
    pub fields: String,
    pub writers: Option<String>,
    pub created_seq: i64,
    pub touched_seq: i64,
}

impl RecordRow {
    /// The record, and the length of its state as stored.
    pub fn into_sized(self) -> Result<(Record, i64), serde_json::Error> {
        let size = (self.fields.len() + self.writers.as_ref().map_or(0, String::len)) as i64;
        let fields: BTreeMap<String, FieldState> = serde_json::from_str(&self.fields)?;
        let writers = match &self.writers {
            Some(writers) => serde_json::from_str(writers)?,
            None => BTreeMap::new(),
        };
        let record = Record {
            table: self.table_name,
            id: self.record_id,
            state: RecordState {
                fields,
                created: self.created_seq,
                touched: self.touched_seq,
                writers,
            },
        };
        Ok((record, size))
    }
}

/// A row of a page: the user's clock, then one changed record (all `None`
/// when nothing changed after the cursor), its fields as in [`RecordRow`].
#[derive(sqlx::FromRow)]
pub struct PageRow {
    pub last_seq: i64,
    pub table_name: Option<String>,
    pub record_id: Option<String>,
    pub fields: Option<String>,
    pub writers: Option<String>,
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
            (Some(table_name), Some(record_id), Some(fields), Some(created_seq), Some(touched_seq)) => Some(
                RecordRow {
                    table_name,
                    record_id,
                    fields,
                    writers: self.writers,
                    created_seq,
                    touched_seq,
                }
                .into_sized()?,
            ),
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

/// The usage counters of a user's clock row as a push locks it. They hold
/// for the clock at `counted_seq`: when the clock was elsewhere before the
/// push (`previous_seq`), a push of the previous release or a user from
/// before the counters moved it, and the user's records are counted again.
#[derive(sqlx::FromRow)]
pub struct ClockUsage {
    /// The counters hold.
    pub counted: bool,
    pub records: i64,
    pub bytes: i64,
}

impl ClockUsage {
    pub fn usage(&self) -> Option<Usage> {
        self.counted.then_some(Usage {
            records: self.records,
            bytes: self.bytes,
        })
    }
}

/// A row of PostgreSQL's statement that appends a batch (see
/// [`AppendedRows`]): the clock, whether the statement's snapshot is current,
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
    pub usage: ClockUsage,
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
    /// The batch's first position (`None`: kept by an earlier release).
    pub first_seq: Option<i64>,
}

impl From<OutcomeRow> for Outcome {
    fn from(row: OutcomeRow) -> Outcome {
        Outcome {
            fingerprint: row.request_hash,
            first_seq: row.first_seq,
        }
    }
}

/// What a user stores, as counted (`count(*)` and the sum of the bytes).
#[derive(sqlx::FromRow)]
pub struct UsageRow {
    pub records: i64,
    pub bytes: i64,
}

impl From<UsageRow> for Usage {
    fn from(row: UsageRow) -> Usage {
        Usage {
            records: row.records,
            bytes: row.bytes,
        }
    }
}
