//! A transaction scoped to one user, and the statements run in it.

use std::collections::HashMap;
use std::time::Duration;

use futures_util::TryStreamExt;
use sqlx::{PgConnection, Sqlite, SqliteConnection, Transaction};

use super::dialect::{Dialect, fault};
use super::postgres;
use super::rows::{NewRow, SavedRow};
use crate::change_log::{Change, RecordKey};
use crate::cursor::Cursor;
use crate::error::{Error, Result};
use crate::fold::{LogEntry, RecordState};
use crate::idempotency::Outcome;
use crate::projection::{Page, PageBuilder, Record};
use crate::quota::{self, Usage};

/// A batch appended to the log, and what its transaction read after.
pub struct Appended {
    /// The position of the batch's first change (the others follow it).
    pub first_seq: i64,
    /// The user's clock after the batch: its last change's position.
    pub clock: i64,
    /// What the user stored before the batch (counted now if the clock
    /// row's counters did not hold).
    pub usage: Usage,
    /// The current states of the records the batch changes (those that
    /// exist), with the bytes each counts for (see [`quota::stored_bytes`]).
    pub states: HashMap<(String, String), (RecordState, i64)>,
    /// The app's other records changed after the cursor, oldest change
    /// first, with their sizes: the page before the batch's own records,
    /// which follow them in log order. Enough of them to fill the page.
    pub earlier: Vec<(Record, i64)>,
}

/// The pages of several tables being filled from one statement's rows.
struct Pages<'a> {
    tables: &'a [(String, Cursor)],
    limit: usize,
    /// What the pages may hold in all.
    budget: i64,
    clock: Option<i64>,
    done: Vec<(String, Page)>,
    /// The table being filled (its index), its page and its bytes.
    filling: Option<(usize, PageBuilder, i64)>,
    /// The page being filled is full: the rest of its table's rows are skipped.
    full: bool,
}

impl<'a> Pages<'a> {
    fn new(tables: &'a [(String, Cursor)], limit: usize, budget: i64) -> Pages<'a> {
        Pages {
            tables,
            limit,
            budget,
            clock: None,
            done: Vec::new(),
            filling: None,
            full: false,
        }
    }

    /// Takes a row; false once no more will be taken (the budget is spent).
    fn offer(&mut self, clock: i64, next: Option<(Record, i64)>) -> bool {
        self.clock = Some(clock);
        let Some((record, size)) = next else { return true };
        let same = |(i, _, _): &(usize, PageBuilder, i64)| self.tables[*i].0 == record.table;
        if !self.filling.as_ref().is_some_and(same) {
            // A new table: the pages before it are done, those in between empty.
            let from = self.close_filling();
            if self.budget <= 0 {
                return false;
            }
            let Some(at) = self.tables[from..].iter().position(|(t, _)| *t == record.table) else {
                return true; // not asked for: cannot happen
            };
            for (table, _) in &self.tables[from..from + at] {
                self.done.push((table.clone(), self.empty()));
            }
            let builder = PageBuilder::new(self.limit, self.budget);
            self.filling = Some((from + at, builder, 0));
            self.full = false;
        }
        if self.full {
            return true;
        }
        let (_, builder, bytes) = self.filling.as_mut().expect("a page being filled");
        if builder.offer(clock, Some((record, size))) {
            *bytes += size;
        } else {
            self.full = true;
        }
        true
    }

    fn empty(&self) -> Page {
        Page {
            clock: self.clock,
            records: Vec::new(),
            has_more: false,
        }
    }

    /// Finishes the page being filled, if any; returns the index of the
    /// first table not done.
    fn close_filling(&mut self) -> usize {
        match self.filling.take() {
            Some((i, builder, bytes)) => {
                self.budget -= bytes;
                let mut page = builder.finish();
                page.clock = self.clock;
                self.done.push((self.tables[i].0.clone(), page));
                i + 1
            }
            None => self.done.len(),
        }
    }

    /// The pages: the last one's table done, the rest empty unless the budget is spent.
    fn finish(mut self) -> Vec<(String, Page)> {
        let from = self.close_filling();
        if self.budget > 0 {
            for (table, _) in &self.tables[from..] {
                let page = self.empty();
                self.done.push((table.clone(), page));
            }
        }
        self.done
    }
}

/// A transaction scoped to one user: it reads and writes only that user's rows.
pub enum Tx {
    Postgres(postgres::PgTx),
    Sqlite(Transaction<'static, Sqlite>),
}

impl Tx {
    /// Appends `changes` to the log at the user's next positions, one row
    /// each, and reads what a push folds and answers with (see
    /// [`Appended`]). The user's pushes are serialised until this
    /// transaction ends, so positions are unique and increase in commit
    /// order. Positions are nanosecond timestamps (the database's clock on
    /// PostgreSQL, one clock for every replica), never going backwards.
    pub async fn append(
        &mut self,
        user_id: &str,
        app_id: &str,
        client_id: &str,
        changes: &[Change],
        since: Cursor,
        limit: usize,
    ) -> Result<Appended> {
        let rows = NewRow::of(changes);
        let mut keys: Vec<(&str, &str)> = changes.iter().map(|c| (c.table.as_str(), c.id.as_str())).collect();
        keys.sort_unstable();
        keys.dedup();
        // The batch's own records are left out of the page below, so as
        // many more are read as it touches.
        let read = (limit + 1 + keys.len()) as i64;
        let appended = dialect!(self, |conn| conn
            .append_batch(user_id, app_id, client_id, &rows, &keys, since, read)
            .await)?;
        let n = changes.len() as i64;
        let usage = match appended.usage {
            Some(usage) => usage,
            None => dialect!(self, |conn| conn.count_usage(user_id).await)?,
        };
        let states = appended
            .states
            .into_iter()
            .map(|(r, size)| {
                let bytes = quota::stored_bytes(&r.table, &r.id, size as usize);
                ((r.table, r.id), (r.state, bytes))
            })
            .collect();
        let earlier = appended
            .page
            .into_iter()
            .filter(|(r, _)| keys.binary_search(&(r.table.as_str(), r.id.as_str())).is_err())
            .collect();
        Ok(Appended {
            first_seq: appended.last_seq - n + 1,
            clock: appended.last_seq,
            usage,
            states,
            earlier,
        })
    }

    /// Holds off the user's pushes until this transaction ends, without
    /// handing out a position to a change (for maintenance).
    pub async fn lock_clock(&mut self, user_id: &str) -> Result<()> {
        dialect!(self, |conn| conn.lock_clock(user_id).await)
    }

    /// Streams the user's whole log in order, calling `each` per entry;
    /// returns how many there were.
    pub async fn replay(&mut self, user_id: &str, mut each: impl FnMut(RecordKey, LogEntry)) -> Result<u64> {
        dialect!(self, |conn| {
            conn.replay(user_id)
                .try_fold(0, |count, row| {
                    let (key, entry) = row.into_entry();
                    each(key, entry);
                    std::future::ready(Ok(count + 1))
                })
                .await
        })
    }

    /// Writes the given records' state (insert or replace), once `admit`
    /// has accepted the size of each as it will be stored (what a page
    /// counts), and returns those sizes. `admit` may give the user's usage
    /// counters, set in the same round trip.
    pub async fn save(
        &mut self,
        user_id: &str,
        app_id: &str,
        records: &[Record],
        admit: impl FnOnce(&[i64]) -> Result<Option<Usage>>,
    ) -> Result<Vec<i64>> {
        let rows =
            SavedRow::of(records).map_err(|e| Error::Internal(anyhow::Error::new(e).context("a record state")))?;
        let sizes: Vec<i64> = rows.iter().map(|r| r.size() as i64).collect();
        let usage = admit(&sizes)?;
        dialect!(self, |conn| conn.save(user_id, app_id, &rows, usage).await)?;
        Ok(sizes)
    }

    /// What the user stores, counted over the projection (a scan).
    pub async fn count_usage(&mut self, user_id: &str) -> Result<Usage> {
        dialect!(self, |conn| conn.count_usage(user_id).await)
    }

    /// Sets the user's usage counters, as holding for the clock now.
    pub async fn set_usage(&mut self, user_id: &str, usage: Usage) -> Result<()> {
        dialect!(self, |conn| conn.set_usage(user_id, usage).await)
    }

    /// Deletes the user's whole projection (to rebuild it).
    pub async fn clear_records(&mut self, user_id: &str) -> Result<()> {
        dialect!(self, |conn| conn.clear_records(user_id).await)
    }

    /// A page of one app's records (of one table, if given) changed after
    /// `since`; see [`PageBuilder`]. Clock and records come from one
    /// statement, hence one snapshot.
    pub async fn changed_since(
        &mut self,
        user_id: &str,
        app_id: &str,
        table: Option<&str>,
        since: Cursor,
        limit: usize,
        max_bytes: i64,
    ) -> Result<Page> {
        let mut page = PageBuilder::new(limit, max_bytes);
        dialect!(self, |conn| {
            let mut rows = conn.page(user_id, app_id, table, since, limit as i64 + 1);
            loop {
                match rows.try_next().await {
                    Ok(Some(row)) => match row.into_parts() {
                        Ok((clock, record)) => {
                            if !page.offer(clock, record) {
                                break Ok(());
                            }
                        }
                        Err(e) => break Err(sqlx::Error::Decode(Box::new(e))),
                    },
                    Ok(None) => break Ok(()),
                    Err(e) => break Err(e),
                }
            }
        })?;
        Ok(page.finish())
    }

    /// Pages of several tables of one app, each changed after its own
    /// cursor, from one statement (one snapshot): in the order of
    /// `tables`, as many of them as fit `max_bytes` in all (always the
    /// first; the page that meets the bound is cut short, `has_more`, and
    /// the tables after it are left out, for another read).
    pub async fn changed_since_each(
        &mut self,
        user_id: &str,
        app_id: &str,
        tables: &[(String, Cursor)],
        limit: usize,
        max_bytes: i64,
    ) -> Result<Vec<(String, Page)>> {
        let mut pages = Pages::new(tables, limit, max_bytes);
        dialect!(self, |conn| {
            let mut rows = conn.pages(user_id, app_id, tables, limit as i64 + 1);
            loop {
                match rows.try_next().await {
                    Ok(Some(row)) => match row.into_parts() {
                        Ok((clock, record)) => {
                            if !pages.offer(clock, record) {
                                break Ok(());
                            }
                        }
                        Err(e) => break Err(sqlx::Error::Decode(Box::new(e))),
                    },
                    Ok(None) => break Ok(()),
                    Err(e) => break Err(e),
                }
            }
        })?;
        Ok(pages.finish())
    }

    /// The unexpired outcome stored for an idempotency key.
    pub async fn find_outcome(&mut self, user_id: &str, key: &str, ttl: Duration) -> Result<Option<Outcome>> {
        let found = dialect!(self, |conn| conn.find_outcome(user_id, key, ttl).await)?;
        Ok(found.map(Outcome::from))
    }

    /// Keeps a batch's outcome for replay. Past `max_keys` outcomes (0: no
    /// limit) the user's are counted again, without the expired ones, and
    /// the oldest dropped down to nine tenths of `max_keys`, so that a
    /// user at the cap pays for that count once per tenth of it.
    pub async fn save_outcome(
        &mut self,
        user_id: &str,
        key: &str,
        fingerprint: &[u8],
        first_seq: i64,
        ttl: Duration,
        max_keys: u64,
    ) -> Result<()> {
        let kept = dialect!(self, |conn| conn
            .save_outcome(user_id, key, fingerprint, first_seq)
            .await)?;
        if max_keys > 0 && kept > i64::try_from(max_keys).unwrap_or(i64::MAX) {
            let keep = (max_keys - max_keys / 10).max(1);
            dialect!(self, |conn| conn.trim_outcomes(user_id, ttl, keep).await)?;
        }
        Ok(())
    }

    pub async fn commit(self) -> Result<()> {
        match self {
            Tx::Postgres(tx) => tx.tx.commit().await.map_err(fault::<PgConnection>),
            Tx::Sqlite(tx) => tx.commit().await.map_err(fault::<SqliteConnection>),
        }
    }

    pub async fn rollback(self) -> Result<()> {
        match self {
            Tx::Postgres(tx) => tx.tx.rollback().await.map_err(fault::<PgConnection>),
            Tx::Sqlite(tx) => tx.rollback().await.map_err(fault::<SqliteConnection>),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(table: &str, id: &str, touched: i64) -> Option<(Record, i64)> {
        let state = RecordState {
            touched,
            ..RecordState::default()
        };
        let record = Record {
            table: table.to_owned(),
            id: id.to_owned(),
            state,
        };
        Some((record, 4))
    }

    /// (table, ids, has_more) of each page.
    fn read(budget: i64, rows: Vec<Option<(Record, i64)>>) -> Vec<(String, Vec<String>, bool)> {
        let tables: Vec<(String, Cursor)> = ["a", "b", "c"].iter().map(|t| (t.to_string(), Cursor::START)).collect();
        let mut pages = Pages::new(&tables, 2, budget);
        for next in rows {
            if !pages.offer(9, next) {
                break;
            }
        }
        pages
            .finish()
            .into_iter()
            .map(|(t, p)| {
                assert_eq!(p.clock, Some(9));
                (t, p.records.into_iter().map(|r| r.id).collect(), p.has_more)
            })
            .collect()
    }

    fn rows() -> Vec<Option<(Record, i64)>> {
        vec![
            None,
            row("a", "a1", 1),
            row("a", "a2", 2),
            row("a", "a3", 3),
            row("c", "c1", 4),
        ]
    }

    fn page(table: &str, ids: &[&str], more: bool) -> (String, Vec<String>, bool) {
        (table.to_owned(), ids.iter().map(|s| s.to_string()).collect(), more)
    }

    #[test]
    fn pages_of_several_tables_keep_each_tables_limit_and_share_one_byte_budget() {
        // Room for all: each table's limit, an empty page for a table without changes.
        assert_eq!(
            read(100, rows()),
            vec![
                page("a", &["a1", "a2"], true),
                page("b", &[], false),
                page("c", &["c1"], false)
            ]
        );
        // The budget cuts the first page short; what is left starts the next
        // (a page always takes its first record).
        assert_eq!(
            read(6, rows()),
            vec![
                page("a", &["a1"], true),
                page("b", &[], false),
                page("c", &["c1"], false)
            ]
        );
        // Spent: the tables after the page that spent it are left for later.
        assert_eq!(read(4, rows()), vec![page("a", &["a1"], true)]);
        // A user without a clock: empty pages for all.
        let none: Vec<_> = ["a", "b", "c"].iter().map(|t| (t.to_string(), Cursor::START)).collect();
        let pages = Pages::new(&none, 2, 100).finish();
        assert_eq!(pages.len(), 3);
        assert!(pages.iter().all(|(_, p)| p.clock.is_none() && p.records.is_empty()));
    }
}
