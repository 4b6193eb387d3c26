//! Storage: one seam, two implementations.
//!
//! [`Store`] is where the log, the projection and idempotent outcomes
//! live: PostgreSQL (`postgres://…`, production, any number of replicas)
//! or SQLite (`sqlite://path`, or no `DATABASE_URL` at all: a file in
//! `DATA_DIR`; one process, zero setup). Each dialect is a module of small
//! SQL functions with the same names and shapes; everything above them
//! (the fold, cursors, validation, push and pull, rebuild) is written once
//! against [`Store`] and [`Tx`], which hand each call to the dialect in use.

pub mod postgres;
pub mod sqlite;
pub mod turns;

use std::collections::HashMap;
use std::time::Duration;

use futures_util::TryStreamExt;
use serde_json::Value;
use sqlx::postgres::PgConnectOptions;
use sqlx::types::Json;
use sqlx::{Sqlite, Transaction};

use crate::change_log::Change;
use crate::change_log::{self, RecordKey};
use crate::config::Config;
use crate::cursor::Cursor;
use crate::error::Result;
use crate::fold::{LogEntry, RecordState};
use crate::projection::{self, Page, Record};

/// The database behind the server. Cheap to clone.
#[derive(Clone)]
pub enum Store {
    Postgres(postgres::PgStore),
    Sqlite(sqlite::SqliteStore),
}

/// A transaction scoped to one user: it reads and writes only that user's rows.
pub enum Tx {
    Postgres(postgres::PgTx),
    Sqlite(Transaction<'static, Sqlite>),
}

/// Runs `$body` with `$conn` bound to the transaction's connection and
/// `$sql` to its dialect module: one body serves both stores. SQL that both
/// dialects read alike is written once, in the body (`$1`-style parameters
/// work on both).
macro_rules! dialect {
    ($tx:expr, |$conn:ident, $sql:ident| $body:expr) => {
        match $tx {
            Tx::Postgres(tx) => {
                #[allow(unused_imports)]
                use crate::store::postgres as $sql;
                let $conn: &mut sqlx::PgConnection = &mut *tx;
                $body
            }
            Tx::Sqlite(tx) => {
                #[allow(unused_imports)]
                use crate::store::sqlite as $sql;
                let $conn: &mut sqlx::SqliteConnection = &mut *tx;
                $body
            }
        }
    };
    ($tx:expr, |$conn:ident| $body:expr) => {
        dialect!($tx, |$conn, _dialect| $body)
    };
}

impl Store {
    /// The store `DATABASE_URL` names (`postgres://…` or `sqlite://path`), or
    /// SQLite in `DATA_DIR` when it is unset. PostgreSQL connects lazily (see
    /// [`Store::prepare`]); SQLite opens its file now and refuses it when
    /// another process has it.
    pub async fn open(config: &Config) -> anyhow::Result<Store> {
        match config.database_url.as_deref() {
            None => Ok(Store::Sqlite(sqlite::SqliteStore::open(None, config).await?)),
            Some(url) if url.starts_with("sqlite:") => {
                Ok(Store::Sqlite(sqlite::SqliteStore::open(Some(url), config).await?))
            }
            Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
                Ok(Store::Postgres(postgres::PgStore::new(url, config)?))
            }
            // The URL is not echoed: it may hold a password.
            Some(_) => anyhow::bail!(
                "invalid configuration: DATABASE_URL must be postgres://… or sqlite://path (or unset: SQLite in DATA_DIR)"
            ),
        }
    }

    /// Makes the store ready to serve: waits for PostgreSQL to answer (up to
    /// `deadline`, or for ever), then applies pending migrations.
    pub async fn prepare(&self, deadline: Option<Duration>) -> anyhow::Result<()> {
        match self {
            Store::Postgres(store) => {
                postgres::wait_until_reachable(&store.pool, deadline).await?;
                postgres::migrate(&store.pool).await
            }
            Store::Sqlite(store) => store.migrate().await,
        }
    }

    /// What start-up logs: which store, and what it allows.
    pub fn describe(&self) -> String {
        match self {
            Store::Postgres(store) => {
                let options = store.pool.connect_options();
                format!(
                    "PostgreSQL database {:?} on {}:{} (replicas fan out through NOTIFY)",
                    options.get_database().unwrap_or_default(),
                    options.get_host(),
                    options.get_port()
                )
            }
            Store::Sqlite(store) => format!(
                "SQLite file {} (one process; fan-out in-process)",
                store.path().display()
            ),
        }
    }

    /// `postgres` or `sqlite`.
    pub fn kind(&self) -> &'static str {
        match self {
            Store::Postgres(_) => "postgres",
            Store::Sqlite(_) => "sqlite",
        }
    }

    /// Where other replicas are told of pushes (PostgreSQL only: a SQLite
    /// store serves one process, whose hub hears every push itself).
    pub fn notify_options(&self) -> Option<PgConnectOptions> {
        match self {
            Store::Postgres(store) => Some(store.pool.connect_options().as_ref().clone()),
            Store::Sqlite(_) => None,
        }
    }

    /// Begins a transaction that writes `user_id`'s data. On PostgreSQL the
    /// user's writes on this replica take turns first (see [`turns`]), and
    /// the first write of the user's clock then serialises them with other
    /// replicas'; SQLite takes its single write lock now. Waiting longer
    /// than `LOCK_TIMEOUT` is [`Error::Busy`].
    ///
    /// [`Error::Busy`]: crate::error::Error::Busy
    pub async fn begin_write(&self, user_id: &str) -> Result<Tx> {
        match self {
            Store::Postgres(store) => Ok(Tx::Postgres(store.begin_write(user_id).await?)),
            Store::Sqlite(store) => Ok(Tx::Sqlite(store.begin_write().await?)),
        }
    }

    /// Begins a transaction that only reads `user_id`'s data, from one snapshot.
    pub async fn begin_read(&self, user_id: &str) -> Result<Tx> {
        match self {
            Store::Postgres(store) => Ok(Tx::Postgres(store.begin_read(user_id).await?)),
            Store::Sqlite(store) => Ok(Tx::Sqlite(store.begin_read().await?)),
        }
    }

    /// Every user who ever wrote (maintenance: the one cross-user read).
    pub async fn users(&self) -> sqlx::Result<Vec<String>> {
        match self {
            Store::Postgres(store) => postgres::users(&store.pool).await,
            Store::Sqlite(store) => sqlite::users(store.reader()).await,
        }
    }

    /// The (app, table) pairs a user has records in, of one app if given:
    /// what "pull everything" names.
    pub async fn tables(&self, user_id: &str, app_id: Option<&str>) -> Result<Vec<(String, String)>> {
        let mut tx = self.begin_read(user_id).await?;
        let tables = dialect!(&mut tx, |conn| {
            sqlx::query_as(
                "SELECT DISTINCT app_id, table_name FROM sync_records
                 WHERE user_id = $1 AND (CAST($2 AS TEXT) IS NULL OR app_id = $2) ORDER BY 1, 2",
            )
            .bind(user_id)
            .bind(app_id)
            .fetch_all(conn)
            .await?
        });
        tx.commit().await?;
        Ok(tables)
    }

    /// Pool connections (in use, idle).
    pub fn pool_stats(&self) -> (u32, u32) {
        let stats = |pool_size: u32, idle: usize| (pool_size.saturating_sub(idle as u32), idle as u32);
        match self {
            Store::Postgres(store) => stats(store.pool.size(), store.pool.num_idle()),
            Store::Sqlite(store) => {
                let (writer, reader) = store.pools();
                let (a, b) = (
                    stats(writer.size(), writer.num_idle()),
                    stats(reader.size(), reader.num_idle()),
                );
                (a.0 + b.0, a.1 + b.1)
            }
        }
    }

    /// Whether the database answers within 2 s. A pool whose connections
    /// are all busy counts as answering (they are live, and a ping would
    /// only queue behind them): under load a replica stays ready.
    pub async fn ping(&self) -> bool {
        let ping = async {
            match self {
                Store::Postgres(store) => {
                    saturated(&store.pool) || sqlx::query("SELECT 1").execute(&store.pool).await.is_ok()
                }
                Store::Sqlite(store) => {
                    saturated(store.reader()) || sqlx::query("SELECT 1").execute(store.reader()).await.is_ok()
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(2), ping)
            .await
            .unwrap_or(false)
    }
}

/// Every connection the pool may open is open and in use.
fn saturated<DB: sqlx::Database>(pool: &sqlx::Pool<DB>) -> bool {
    pool.num_idle() == 0 && pool.size() >= pool.options().get_max_connections()
}

impl Tx {
    /// Reserves `n` consecutive log positions for the user and returns the
    /// first. The user's pushes are serialised until this transaction ends,
    /// so positions are unique and increase in commit order. Positions are
    /// nanosecond timestamps (the database's clock on PostgreSQL, one clock
    /// for every replica), never going backwards.
    pub async fn reserve(&mut self, user_id: &str, n: i64) -> sqlx::Result<i64> {
        let last = dialect!(self, |conn, sql| sql::reserve(conn, user_id, n).await?);
        Ok(last - n + 1)
    }

    /// Holds off the user's pushes until this transaction ends, without
    /// advancing the clock (for maintenance).
    pub async fn lock_clock(&mut self, user_id: &str) -> sqlx::Result<()> {
        dialect!(self, |conn, sql| sql::lock_clock(conn, user_id).await)
    }

    /// Appends `changes` to the log at positions `first_seq..`, one row each.
    pub async fn append(
        &mut self,
        user_id: &str,
        app_id: &str,
        client_id: &str,
        first_seq: i64,
        changes: &[Change],
    ) -> sqlx::Result<()> {
        let rows: Vec<change_log::NewRow> = change_log::new_rows(first_seq, changes).collect();
        dialect!(self, |conn, sql| sql::append(conn, user_id, app_id, client_id, &rows)
            .await)
    }

    /// Streams the user's whole log in order, calling `each` per entry;
    /// returns how many there were.
    pub async fn replay(&mut self, user_id: &str, mut each: impl FnMut(RecordKey, LogEntry)) -> sqlx::Result<u64> {
        dialect!(self, |conn| {
            let mut rows = sqlx::query_as::<_, change_log::LogRow>(
                "SELECT app_id, table_name, record_id, seq, data, field_timestamps, untimed
                 FROM sync_changes WHERE user_id = $1 ORDER BY seq",
            )
            .bind(user_id)
            .fetch(conn);
            let mut count = 0;
            while let Some(row) = rows.try_next().await? {
                let (key, entry) = change_log::entry(row);
                each(key, entry);
                count += 1;
            }
            Ok(count)
        })
    }

    /// The current state of the given records of one app (those that exist).
    pub async fn load(
        &mut self,
        user_id: &str,
        app_id: &str,
        keys: &[(&str, &str)],
    ) -> sqlx::Result<HashMap<(String, String), RecordState>> {
        let rows = dialect!(self, |conn, sql| sql::load(conn, user_id, app_id, keys).await?);
        Ok(rows
            .into_iter()
            .map(projection::record)
            .map(|r| ((r.table, r.id), r.state))
            .collect())
    }

    /// Writes the given records' state (insert or replace).
    pub async fn save(&mut self, user_id: &str, app_id: &str, records: &[Record]) -> sqlx::Result<()> {
        dialect!(self, |conn, sql| sql::save(conn, user_id, app_id, records).await)
    }

    /// Deletes the user's whole projection (to rebuild it).
    pub async fn clear_records(&mut self, user_id: &str) -> sqlx::Result<()> {
        dialect!(self, |conn| {
            sqlx::query("DELETE FROM sync_records WHERE user_id = $1")
                .bind(user_id)
                .execute(conn)
                .await?;
            Ok(())
        })
    }

    /// A page of one app's records (of one table, if given) changed after
    /// `since`; see [`projection::collect_page`]. Clock and records come from
    /// one statement, hence one snapshot.
    pub async fn changed_since(
        &mut self,
        user_id: &str,
        app_id: &str,
        table: Option<&str>,
        since: Cursor,
        limit: usize,
        max_bytes: i64,
    ) -> sqlx::Result<Page> {
        dialect!(self, |conn, sql| {
            let statement = if table.is_some() {
                sql::PAGE_OF_TABLE
            } else {
                sql::PAGE_OF_APP
            };
            let mut query = sqlx::query_as(statement)
                .bind(user_id)
                .bind(app_id)
                .bind(since.0)
                .bind(limit as i64 + 1);
            if let Some(table) = table {
                query = query.bind(table);
            }
            projection::collect_page(query.fetch(conn), limit, max_bytes).await
        })
    }

    /// The unexpired outcome stored for an idempotency key: (fingerprint, response).
    pub async fn find_outcome(
        &mut self,
        user_id: &str,
        key: &str,
        ttl: Duration,
    ) -> sqlx::Result<Option<(Vec<u8>, Value)>> {
        let found: Option<(Vec<u8>, Json<Value>)> = dialect!(self, |conn, sql| {
            sqlx::query_as(sql::FIND_OUTCOME)
                .bind(user_id)
                .bind(key)
                .bind(ttl.as_secs_f64())
                .fetch_optional(conn)
                .await?
        });
        Ok(found.map(|(fingerprint, Json(response))| (fingerprint, response)))
    }

    /// Stores an outcome for replay, first dropping the user's expired ones
    /// (so no cross-user sweep is needed).
    pub async fn save_outcome(
        &mut self,
        user_id: &str,
        key: &str,
        fingerprint: &[u8],
        response: &Value,
        ttl: Duration,
    ) -> sqlx::Result<()> {
        dialect!(self, |conn, sql| {
            sqlx::query(sql::EXPIRE_OUTCOMES)
                .bind(user_id)
                .bind(ttl.as_secs_f64())
                .execute(&mut *conn)
                .await?;
            sqlx::query(sql::SAVE_OUTCOME)
                .bind(user_id)
                .bind(key)
                .bind(fingerprint)
                .bind(Json(response))
                .execute(conn)
                .await?;
            Ok(())
        })
    }

    pub async fn commit(self) -> sqlx::Result<()> {
        match self {
            Tx::Postgres(tx) => tx.tx.commit().await,
            Tx::Sqlite(tx) => tx.commit().await,
        }
    }

    pub async fn rollback(self) -> sqlx::Result<()> {
        match self {
            Tx::Postgres(tx) => tx.tx.rollback().await,
            Tx::Sqlite(tx) => tx.rollback().await,
        }
    }
}
