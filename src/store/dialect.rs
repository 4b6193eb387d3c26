//! What a dialect must provide: every statement the store runs on a
//! transaction's connection ([`Dialect`]) or on its pool ([`PoolDialect`]),
//! and which of its errors mean "busy".
//!
//! Each dialect implements [`Dialect`] on its connection type, in its own
//! `sql.rs`, one method per statement that owns its SQL and its binds;
//! `Tx` in `store/mod.rs` hands each call to the dialect in use. A new
//! statement is a new method here, then one in each dialect: the compiler
//! refuses a dialect that lacks it.

use std::future::Future;
use std::time::Duration;

use futures_util::TryStreamExt;
use futures_util::stream::BoxStream;

use crate::cursor::Cursor;
use crate::error::Error;
use crate::projection::Record;
use crate::quota::Usage;
use crate::store::rows::{self, AppendedRows, LogRow, NewRow, OutcomeRow, PageRow, RecordRow, SavedRow, TableRow};

/// The statements of one SQL dialect, on a connection inside a transaction
/// scoped to `user_id` (every statement reads and writes that user's rows
/// only).
pub trait Dialect {
    /// Appends a batch's rows to the log at the user's next positions and
    /// reads, after locking the user's clock (the user's other writes then
    /// wait until the transaction ends), what folding and answering it
    /// needs: the states of the records at `keys` and the app's first
    /// `limit` records changed after `since`.
    #[allow(clippy::too_many_arguments)]
    fn append_batch(
        &mut self,
        user_id: &str,
        app_id: &str,
        client_id: &str,
        rows: &[NewRow<'_>],
        keys: &[(&str, &str)],
        since: Cursor,
        limit: i64,
    ) -> impl Future<Output = sqlx::Result<AppendedRows>> + Send;

    /// Holds off the user's writes until the transaction ends, without
    /// handing out a position.
    fn lock_clock(&mut self, user_id: &str) -> impl Future<Output = sqlx::Result<()>> + Send;

    /// The user's whole log, in order.
    fn replay<'c>(&'c mut self, user_id: &'c str) -> BoxStream<'c, sqlx::Result<LogRow>>;

    /// The projection rows of the given (table, record) keys of one app, those that exist.
    fn load(
        &mut self,
        user_id: &str,
        app_id: &str,
        keys: &[(&str, &str)],
    ) -> impl Future<Output = sqlx::Result<Vec<RecordRow>>> + Send;

    /// What the user stores, counted over the projection (a scan of the
    /// user's records: done once per user, see [`rows::ClockUsage`]).
    fn count_usage(&mut self, user_id: &str) -> impl Future<Output = sqlx::Result<Usage>> + Send;

    /// Sets the user's usage counters, as holding for the clock now.
    fn set_usage(&mut self, user_id: &str, usage: Usage) -> impl Future<Output = sqlx::Result<()>> + Send;

    /// Inserts or replaces the projection rows of records of one app, and
    /// sets the user's usage counters when given (as [`Dialect::set_usage`]).
    fn save(
        &mut self,
        user_id: &str,
        app_id: &str,
        rows: &[SavedRow<'_>],
        usage: Option<Usage>,
    ) -> impl Future<Output = sqlx::Result<()>> + Send;

    /// Deletes the user's whole projection.
    fn clear_records(&mut self, user_id: &str) -> impl Future<Output = sqlx::Result<()>> + Send;

    /// The user's clock with the first `limit` records of one app (of one
    /// table, if given) changed after `since`, oldest change first: one row
    /// per record, or one row without a record when none changed, none when
    /// the user has no clock. Clock and records come from one snapshot, and
    /// no record is later than the clock.
    fn page<'c>(
        &'c mut self,
        user_id: &'c str,
        app_id: &'c str,
        table: Option<&'c str>,
        since: Cursor,
        limit: i64,
    ) -> BoxStream<'c, sqlx::Result<PageRow>>;

    /// The user's clock with, for each of several tables of one app, its
    /// first `limit` records changed after that table's own cursor: rows
    /// in the order of `tables`, each table's oldest change first, and
    /// rows without a record that carry only the clock (none when the user
    /// has no clock). One statement, so one snapshot, for them all.
    fn pages<'c>(
        &'c mut self,
        user_id: &'c str,
        app_id: &'c str,
        tables: &'c [(String, Cursor)],
        limit: i64,
    ) -> BoxStream<'c, sqlx::Result<PageRow>>;

    /// The (app, table) pairs the user has records in, of one app if given.
    fn tables(
        &mut self,
        user_id: &str,
        app_id: Option<&str>,
    ) -> impl Future<Output = sqlx::Result<Vec<TableRow>>> + Send;

    /// The outcome kept for an idempotency key, if younger than `ttl`.
    fn find_outcome(
        &mut self,
        user_id: &str,
        key: &str,
        ttl: Duration,
    ) -> impl Future<Output = sqlx::Result<Option<OutcomeRow>>> + Send;

    /// Keeps an outcome for an idempotency key (replacing an expired one
    /// under the same key), and returns how many the user keeps at most
    /// (the clock row's `outcomes`, which counts rows swept since).
    fn save_outcome(
        &mut self,
        user_id: &str,
        key: &str,
        fingerprint: &[u8],
        first_seq: i64,
    ) -> impl Future<Output = sqlx::Result<i64>> + Send;

    /// Drops the user's outcomes older than `ttl`, then the oldest but
    /// `keep`, and counts what is left into the clock row's `outcomes`.
    fn trim_outcomes(
        &mut self,
        user_id: &str,
        ttl: Duration,
        keep: u64,
    ) -> impl Future<Output = sqlx::Result<()>> + Send;

    /// Whether the error means the database is busy: a wait for a lock
    /// timed out (`LOCK_TIMEOUT`), so a retry shortly may succeed.
    fn is_busy(e: &sqlx::Error) -> bool;

    /// Whether the error means the database cannot be reached (the
    /// connection broke, the server is down or restarting), so a retry in
    /// a few seconds may succeed.
    fn is_unavailable(e: &sqlx::Error) -> bool;

    /// Whether the error means the database is out of a resource it needs
    /// to write (disk space, memory), which only an operator can give it.
    fn is_exhausted(e: &sqlx::Error) -> bool;
}

/// The statements a dialect runs on its pool, outside any user's
/// transaction. Implemented on each dialect's pool type, in its `sql.rs`.
pub trait PoolDialect {
    /// The connection type whose [`Dialect::is_busy`] reads this pool's errors.
    type Connection: Dialect;

    /// Every user with a clock (maintenance: the one cross-user read).
    fn users(&self) -> impl Future<Output = sqlx::Result<Vec<String>>> + Send;

    /// Deletes up to `batch` outcomes older than `ttl`, of any user,
    /// oldest first (maintenance); returns how many.
    fn sweep_outcomes(&self, ttl: Duration, batch: i64) -> impl Future<Output = sqlx::Result<u64>> + Send;

    /// Whether the database answers.
    fn ping(&self) -> impl Future<Output = sqlx::Result<()>> + Send;
}

/// A database error as the domain sees it: [`Error::Busy`] or
/// [`Error::Unavailable`] when the dialect says so, else a fault.
pub fn fault<D: Dialect>(e: sqlx::Error) -> Error {
    if D::is_busy(&e) {
        return Error::Busy;
    }
    if D::is_exhausted(&e) {
        tracing::error!(error = %e, "the database is out of disk space or memory");
        return Error::Exhausted;
    }
    if D::is_unavailable(&e) {
        tracing::warn!(error = %e, "the database could not be reached");
        return Error::Unavailable;
    }
    Error::Internal(anyhow::Error::new(e).context("database error"))
}

/// The states of the records at `keys` (with their sizes) and the app's
/// first `limit` records changed after `since`, in two statements: what
/// [`Dialect::append_batch`] reads once the clock is locked.
pub async fn read_batch<D: Dialect>(
    conn: &mut D,
    user_id: &str,
    app_id: &str,
    keys: &[(&str, &str)],
    since: Cursor,
    limit: i64,
) -> sqlx::Result<(Vec<(Record, i64)>, Vec<(Record, i64)>)> {
    let decode = |e| sqlx::Error::Decode(Box::new(e));
    let states = conn.load(user_id, app_id, keys).await?;
    let states = states
        .into_iter()
        .map(RecordRow::into_sized)
        .collect::<Result<_, _>>()
        .map_err(decode)?;
    let page: Vec<PageRow> = conn.page(user_id, app_id, None, since, limit).try_collect().await?;
    let page = rows::page_records(page).map_err(decode)?;
    Ok((states, page))
}
