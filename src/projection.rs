//! The projection of the fold (`sync_records`): every record's current
//! field-level state, kept up to date by each push in the same transaction
//! as its log rows, so a pull reads one row per record however long the
//! record's history is. Derived from the log alone: `sync::rebuild`
//! re-derives it.

use crate::cursor::Cursor;
use crate::fold::RecordState;

/// A record of one app with its folded state.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    pub table: String,
    pub id: String,
    pub state: RecordState,
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

impl Page {
    /// No record changed after `cursor`, which the answer keeps.
    pub fn empty(cursor: Cursor) -> Page {
        Page {
            clock: Some(cursor.0),
            records: Vec::new(),
            has_more: false,
        }
    }
}

/// Gathers a page from the records changed after a cursor, offered oldest
/// first with the size of their JSON: at most `limit` records, and no more
/// once their JSON passes `max_bytes` (but always at least one). The store
/// offers one record more than `limit`, to tell whether more follow. The
/// clock and the records come from one snapshot: nothing at or below the
/// clock can commit later, so the clock is a safe cursor for a complete page.
pub struct PageBuilder {
    page: Page,
    bytes: i64,
    limit: usize,
    max_bytes: i64,
}

impl PageBuilder {
    pub fn new(limit: usize, max_bytes: i64) -> PageBuilder {
        PageBuilder {
            page: Page {
                clock: None,
                records: Vec::new(),
                has_more: false,
            },
            bytes: 0,
            limit,
            max_bytes,
        }
    }

    /// Takes the user's clock and the next changed record with its size
    /// (`None`: nothing changed after the cursor). Returns whether the
    /// page wants more.
    pub fn offer(&mut self, clock: i64, next: Option<(Record, i64)>) -> bool {
        self.page.clock = Some(clock);
        let Some((record, size)) = next else { return false };
        self.bytes += size;
        let page = &mut self.page;
        if page.records.len() == self.limit || (!page.records.is_empty() && self.bytes > self.max_bytes) {
            page.has_more = true;
            return false;
        }
        page.records.push(record);
        true
    }

    /// Offers `records` in turn, at `clock`, until the page is full.
    pub fn fill(mut self, clock: i64, records: impl IntoIterator<Item = (Record, i64)>) -> Page {
        self.page.clock = Some(clock);
        for next in records {
            if !self.offer(clock, Some(next)) {
                break;
            }
        }
        self.finish()
    }

    pub fn finish(self) -> Page {
        self.page
    }
}
