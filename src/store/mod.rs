//! Storage: one seam, two implementations.
//!
//! [`Store`] is where the log, the projection and idempotent outcomes
//! live: PostgreSQL (`postgres://…`, production, any number of replicas)
//! or SQLite (`sqlite://path`, or no `DATABASE_URL` at all: a file in
//! `DATA_DIR`; one process, zero setup). Every statement both dialects
//! run is a method of [`Dialect`] (in a user's transaction) or
//! [`PoolDialect`] (on the pool), implemented by each dialect in its
//! `sql.rs`; what only one dialect does (setting up a connection, and
//! PostgreSQL's NOTIFY and LISTEN in `postgres/channel.rs`) is a free
//! function of its module. The row shapes are
//! in [`rows`]. Everything above (push and pull, rebuild) is
//! written once against [`Store`] and [`Tx`], which hand each call to the
//! dialect in use and return the domain's errors.

pub mod dialect;
pub mod postgres;
pub mod rows;
pub mod sqlite;
pub mod turns;

use std::time::Duration;

use secrecy::ExposeSecret;
use sqlx::postgres::PgConnectOptions;

use self::dialect::{Dialect, PoolDialect, fault};
use self::rows::TableRow;
use crate::config::Config;
use crate::error::Result;

/// The database behind the server. Cheap to clone.
#[derive(Clone)]
pub enum Store {
    Postgres(postgres::PgStore),
    Sqlite(sqlite::SqliteStore),
}

/// Runs `$call` with `$conn` bound to the transaction's connection, whose
/// type implements [`Dialect`] for its database, and maps its errors as
/// that dialect says: one line serves both stores.
macro_rules! dialect {
    ($tx:expr, |$conn:ident| $call:expr) => {
        match $tx {
            Tx::Postgres(tx) => {
                let $conn: &mut sqlx::PgConnection = &mut *tx;
                $call.map_err(fault::<sqlx::PgConnection>)
            }
            Tx::Sqlite(tx) => {
                let $conn: &mut sqlx::SqliteConnection = &mut *tx;
                $call.map_err(fault::<sqlx::SqliteConnection>)
            }
        }
    };
}

/// Runs `$call` with `$pool` bound to the store's pool (SQLite's readers),
/// whose type implements [`PoolDialect`], and maps its errors as that
/// dialect says.
macro_rules! pooled {
    ($store:expr, |$pool:ident| $call:expr) => {
        match $store {
            Store::Postgres(store) => {
                let $pool = &store.pool;
                $call.map_err(fault::<<sqlx::PgPool as PoolDialect>::Connection>)
            }
            Store::Sqlite(store) => {
                let $pool = store.reader();
                $call.map_err(fault::<<sqlx::SqlitePool as PoolDialect>::Connection>)
            }
        }
    };
}

mod tx;

pub use self::tx::{Appended, Tx};

impl Store {
    /// The store `DATABASE_URL` names (`postgres://…` or `sqlite://path`), or
    /// SQLite in `DATA_DIR` when it is unset. PostgreSQL connects lazily (see
    /// [`Store::prepare`]); SQLite opens its file now and refuses it when
    /// another process has it.
    pub async fn open(config: &Config) -> anyhow::Result<Store> {
        match config.database_url.as_ref().map(ExposeSecret::expose_secret) {
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
                postgres::migrate(&store.pool).await?;
                store.availability.set(postgres::availability::Status::Up);
                Ok(())
            }
            Store::Sqlite(store) => store.migrate().await,
        }
    }

    /// Makes the store ready to serve without waiting for PostgreSQL: it is
    /// migrated in the background as soon as it answers, and requests get
    /// [`Error::Unavailable`] until then (and during outages). SQLite, a
    /// local file, is migrated now.
    ///
    /// [`Error::Unavailable`]: crate::error::Error::Unavailable
    pub async fn start(&self) -> anyhow::Result<()> {
        match self {
            Store::Postgres(store) => {
                store.start();
                Ok(())
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
    pub async fn users(&self) -> Result<Vec<String>> {
        pooled!(self, |pool| pool.users().await)
    }

    /// Deletes up to `batch` outcomes older than `ttl`, of any user, oldest
    /// first; returns how many (maintenance, like [`Store::users`]). On
    /// SQLite through the writer, where writes queue.
    pub async fn sweep_outcomes(&self, ttl: Duration, batch: i64) -> Result<u64> {
        match self {
            Store::Postgres(store) => store
                .pool
                .sweep_outcomes(ttl, batch)
                .await
                .map_err(fault::<sqlx::PgConnection>),
            Store::Sqlite(store) => store
                .pools()
                .0
                .sweep_outcomes(ttl, batch)
                .await
                .map_err(fault::<sqlx::SqliteConnection>),
        }
    }

    /// The (app, table) pairs a user has records in, of one app if given:
    /// what "pull everything" names.
    pub async fn tables(&self, user_id: &str, app_id: Option<&str>) -> Result<Vec<TableRow>> {
        let mut tx = self.begin_read(user_id).await?;
        let tables = dialect!(&mut tx, |conn| conn.tables(user_id, app_id).await)?;
        tx.commit().await?;
        Ok(tables)
    }

    /// The time every replica shares: on PostgreSQL, this process's clock
    /// corrected to the database's by its probe (see [`crate::clock`]).
    pub fn clock(&self) -> &crate::clock::Clock {
        match self {
            Store::Postgres(store) => &store.clock,
            Store::Sqlite(store) => &store.clock,
        }
    }

    /// Where the store notes that its database ran out of disk or memory.
    pub fn exhaustion(&self) -> &Exhaustion {
        match self {
            Store::Postgres(store) => &store.exhaustion,
            Store::Sqlite(store) => &store.exhaustion,
        }
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

    /// Whether the database answers within 2 s (on PostgreSQL, only if its
    /// probe does not already know it down or not yet migrated; see
    /// [`postgres::availability`]). A pool whose connections are all busy
    /// counts as answering (they are live, and a ping would only queue
    /// behind them): under load a replica stays ready.
    pub async fn ping(&self) -> bool {
        if let Store::Postgres(store) = self
            && store.availability.status() != postgres::availability::Status::Up
        {
            return false;
        }
        let ping = async { pooled!(self, |pool| if saturated(pool) { Ok(()) } else { pool.ping().await }).is_ok() };
        tokio::time::timeout(Duration::from_secs(2), ping)
            .await
            .unwrap_or(false)
    }
}

/// How long after the database last refused a write for want of disk or
/// memory the replica says it is not ready (`/ready` 503): long enough for
/// a balancer or Kubernetes to see it, after which the next write tries again.
pub const EXHAUSTED_FOR: Duration = Duration::from_secs(30);

/// When the database last refused a write for want of disk space or
/// memory ([`Error::Exhausted`]). Cheap to clone.
///
/// [`Error::Exhausted`]: crate::error::Error::Exhausted
#[derive(Clone, Default)]
pub struct Exhaustion(std::sync::Arc<std::sync::Mutex<Option<std::time::Instant>>>);

impl Exhaustion {
    /// Notes `result`'s error if it is [`Error::Exhausted`](crate::error::Error::Exhausted), and passes it on.
    pub fn note<T>(&self, result: Result<T>) -> Result<T> {
        if let Err(crate::error::Error::Exhausted) = &result {
            *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(std::time::Instant::now());
        }
        result
    }

    /// Whether the database ran out within the last [`EXHAUSTED_FOR`].
    pub fn recent(&self) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|at| at.elapsed() < EXHAUSTED_FOR)
    }
}

/// Every connection the pool may open is open and in use.
fn saturated<DB: sqlx::Database>(pool: &sqlx::Pool<DB>) -> bool {
    pool.num_idle() == 0 && pool.size() >= pool.options().get_max_connections()
}
