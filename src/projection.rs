//! The projection of the fold (`sync_records`): every record's current
//! field-level state, kept up to date by each push in the same transaction
//! as its log rows, so a pull reads one row per record however long the
//! record's history is. Derived from the log alone: `sync::rebuild`
//! re-derives it.

use std::collections::BTreeMap;

use futures_util::{Stream, TryStreamExt};
use sqlx::types::Json;

use crate::fold::{FieldState, RecordState};

/// A page stops once its records' JSON passes this size (it always holds at
/// least one record), so a page of large records cannot exhaust memory.
pub const MAX_PAGE_BYTES: i64 = 8 * 1024 * 1024;

/// A record of one app with its folded state.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    pub table: String,
    pub id: String,
    pub state: RecordState,
}

/// A projection row: (table, record, fields, created, touched).
pub type Row = (String, String, Json<BTreeMap<String, FieldState>>, i64, i64);

/// A projection row as the fold takes it.
pub fn record((table, id, Json(fields), created, touched): Row) -> Record {
    Record {
        table,
        id,
        state: RecordState {
            fields,
            created,
            touched,
        },
    }
}

/// A page of records changed after a cursor, read in one snapshot.
#[derive(Debug)]
pub struct Page {
    /// The user's last committed log position in that snapshot (`None`: the
    /// user has never written anything).
    pub clock: Option<i64>,
    /// Records in log order of their last change.
    pub records: Vec<Record>,
    /// More records changed after the last one here.
    pub has_more: bool,
}

/// A page query's row: the user's clock, then one changed record (all
/// `None` when nothing changed) and the size of its fields' JSON.
pub type PageRow = (
    i64,
    Option<String>,
    Option<String>,
    Option<Json<BTreeMap<String, FieldState>>>,
    Option<i64>,
    Option<i64>,
    Option<i64>,
);

/// Collects a page from rows of records changed after a cursor, oldest
/// first: at most `limit` records, and no more once their JSON passes
/// `max_bytes` (but always at least one). The rows hold one record more
/// than `limit`, to tell whether more follow. The clock and the records
/// come from one snapshot: nothing at or below the clock can commit later,
/// so the clock is a safe cursor for a complete page.
pub async fn collect_page(
    mut rows: impl Stream<Item = sqlx::Result<PageRow>> + Unpin,
    limit: usize,
    max_bytes: i64,
) -> sqlx::Result<Page> {
    let mut page = Page {
        clock: None,
        records: Vec::new(),
        has_more: false,
    };
    let mut bytes = 0;
    while let Some((clock, table, id, fields, created, touched, size)) = rows.try_next().await? {
        page.clock = Some(clock);
        let (Some(table), Some(id), Some(fields), Some(created), Some(touched)) = (table, id, fields, created, touched)
        else {
            break; // the user has a clock but nothing changed after `since`
        };
        bytes += size.unwrap_or(0);
        if page.records.len() == limit || (!page.records.is_empty() && bytes > max_bytes) {
            page.has_more = true;
            break;
        }
        page.records.push(record((table, id, fields, created, touched)));
    }
    Ok(page)
}
