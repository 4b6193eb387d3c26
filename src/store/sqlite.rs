//! The SQLite store: one file, one process, nothing to install.
//!
//! Writes go through a pool of one connection, each in a `BEGIN IMMEDIATE`
//! transaction: SQLite has a single writer, and queueing for it in the pool
//! (fairly, for at most `LOCK_TIMEOUT`) beats polling its lock. Reads use
//! their own connections and, in WAL mode, see one snapshot per
//! transaction without waiting for the writer. Commits are synchronous
//! (`synchronous = FULL`): an acknowledged push survives a power cut.
//!
//! A lock file next to the database (`<file>.lock`, holding the owner's
//! pid) keeps a second process off the same file.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use serde_json::{Value, json};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::types::Json;
use sqlx::{Sqlite, SqliteConnection, SqlitePool, Transaction};

use crate::change_log::NewRow;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::projection::{Record, Row};
use crate::timestamp::Timestamp;

/// The migrations under `migrations/sqlite/`, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// The database file in `DATA_DIR` when `DATABASE_URL` is unset.
pub const DEFAULT_FILE: &str = "mana-sync.db";

/// An open SQLite database. Cheap to clone.
#[derive(Clone)]
pub struct SqliteStore {
    writer: SqlitePool,
    reader: SqlitePool,
    path: Arc<PathBuf>,
    /// Held (never read) while any clone lives: the file's owner lock.
    _owner: Arc<File>,
}

impl SqliteStore {
    /// Opens (creating it and its directory if missing) the database
    /// `DATABASE_URL` names (`sqlite://path`), or `DATA_DIR/mana-sync.db`
    /// when it is unset. Fails when another process has the file.
    pub async fn open(url: Option<&str>, config: &Config) -> anyhow::Result<SqliteStore> {
        let options = match url {
            Some(url) => SqliteConnectOptions::from_str(url)
                .with_context(|| format!("invalid configuration: DATABASE_URL={url:?} is not a SQLite URL"))?,
            None => SqliteConnectOptions::new().filename(config.data_dir.join(DEFAULT_FILE)),
        };
        let named = options.get_filename().to_string_lossy();
        // An empty name is a private temporary database per connection, and
        // sqlx names in-memory ones `file:sqlx-in-memory-…`: either loses
        // every acknowledged change.
        anyhow::ensure!(
            !named.is_empty()
                && named != ":memory:"
                && !named.starts_with("file:sqlx-in-memory")
                && !url.is_some_and(|u| u.contains("mode=memory")),
            "invalid configuration: DATABASE_URL={:?} is not a file: an in-memory or temporary database loses \
             every change; name a file (sqlite://path)",
            url.unwrap_or_default()
        );
        let path = create_file(options.get_filename())?;
        let owner = claim(&path)?;
        let options = options
            .filename(&path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(config.lock_timeout);
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(config.lock_timeout)
            .connect_with(options.clone())
            .await
            .with_context(|| format!("failed to open the SQLite database {}", path.display()))?;
        let reader = SqlitePoolOptions::new()
            .max_connections(config.database_max_connections.clamp(1, 8))
            .acquire_timeout(Duration::from_secs(10))
            .connect_lazy_with(options);
        Ok(SqliteStore {
            writer,
            reader,
            path: Arc::new(path),
            _owner: Arc::new(owner),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// (writer, reader) pools.
    pub fn pools(&self) -> (&SqlitePool, &SqlitePool) {
        (&self.writer, &self.reader)
    }

    /// The pool of read-only work.
    pub fn reader(&self) -> &SqlitePool {
        &self.reader
    }

    pub async fn migrate(&self) -> anyhow::Result<()> {
        MIGRATOR
            .run(&self.writer)
            .await
            .with_context(|| format!("failed to apply migrations to {}", self.path.display()))
    }

    /// Begins the (only) write transaction; waiting for it longer than
    /// `LOCK_TIMEOUT` is [`Error::Busy`].
    pub async fn begin_write(&self) -> Result<Transaction<'static, Sqlite>> {
        match self.writer.begin_with("BEGIN IMMEDIATE").await {
            Err(sqlx::Error::PoolTimedOut) => Err(Error::Busy),
            other => Ok(other?),
        }
    }

    /// Begins a read; every reader busy for 10 s is [`Error::Busy`] (the
    /// file is local: a pool that gives no connection is overloaded).
    pub async fn begin_read(&self) -> Result<Transaction<'static, Sqlite>> {
        match self.reader.begin().await {
            Err(sqlx::Error::PoolTimedOut) => Err(Error::Busy),
            other => Ok(other?),
        }
    }
}

/// Creates the database file (and its directory) if missing, readable by
/// this user only (SQLite gives its `-wal` and `-shm` files the same mode),
/// and returns its canonical path, so every name of the file shares one lock.
fn create_file(path: &Path) -> anyhow::Result<PathBuf> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        crate::config::create_data_dir(dir)?;
    }
    let mut options = OpenOptions::new();
    options.create(true).truncate(false).write(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options
        .open(path)
        .with_context(|| format!("failed to create the SQLite database {}", path.display()))?;
    path.canonicalize()
        .with_context(|| format!("failed to resolve {}", path.display()))
}

/// Takes the lock file next to `db` for this process, or explains who has it.
fn claim(db: &Path) -> anyhow::Result<File> {
    let mut name = db.as_os_str().to_owned();
    name.push(".lock");
    let path = PathBuf::from(name);
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("failed to open the lock file {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {
            file.set_len(0)?;
            writeln!(file, "{}", std::process::id())?;
            Ok(file)
        }
        Err(TryLockError::WouldBlock) => {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            let holder = match holder.trim() {
                "" => String::new(),
                pid => format!(" (pid {pid})"),
            };
            anyhow::bail!(
                "another mana-sync process{holder} is using the SQLite database {}. A SQLite store serves one \
                 process: stop the other one, or give this one its own DATA_DIR or DATABASE_URL \
                 (several replicas need PostgreSQL)",
                db.display()
            )
        }
        Err(TryLockError::Error(e)) => Err(e).with_context(|| format!("failed to lock {}", path.display())),
    }
}

pub async fn users(pool: &SqlitePool) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar("SELECT user_id FROM sync_clocks ORDER BY user_id")
        .fetch_all(pool)
        .await
}

/// Advances the user's clock by `n` and returns its new value. The write
/// transaction excludes every other writer until it ends.
pub async fn reserve(conn: &mut SqliteConnection, user_id: &str, n: i64) -> sqlx::Result<i64> {
    sqlx::query_scalar(
        "INSERT INTO sync_clocks (user_id, last_seq) VALUES (?1, ?3 + ?2 - 1)
         ON CONFLICT (user_id) DO UPDATE SET last_seq = max(sync_clocks.last_seq + ?2, excluded.last_seq)
         RETURNING last_seq",
    )
    .bind(user_id)
    .bind(n)
    .bind(Timestamp::now().0)
    .fetch_one(conn)
    .await
}

/// Nothing to do: a write transaction already excludes every other writer.
pub async fn lock_clock(_conn: &mut SqliteConnection, _user_id: &str) -> sqlx::Result<()> {
    Ok(())
}

pub async fn append(
    conn: &mut SqliteConnection,
    user_id: &str,
    app_id: &str,
    client_id: &str,
    rows: &[NewRow<'_>],
) -> sqlx::Result<()> {
    // One statement over a JSON array of rows: no limit on bound
    // parameters, one round trip to the connection's thread.
    let rows: Vec<Value> = rows
        .iter()
        .map(|r| {
            json!([
                r.id.to_string(),
                r.seq,
                r.table,
                r.record_id,
                r.op,
                r.data,
                r.stamps,
                r.untimed
            ])
        })
        .collect();
    sqlx::query(
        "INSERT INTO sync_changes (id, seq, app_id, table_name, record_id, user_id, op, data, field_timestamps, untimed, client_id)
         SELECT j.value ->> 0, j.value ->> 1, ?1, j.value ->> 2, j.value ->> 3, ?2, j.value ->> 4,
                j.value ->> 5, j.value ->> 6, j.value ->> 7, ?3
         FROM json_each(?4) AS j",
    )
    .bind(app_id)
    .bind(user_id)
    .bind(client_id)
    .bind(Json(rows))
    .execute(conn)
    .await?;
    Ok(())
}

pub async fn load(
    conn: &mut SqliteConnection,
    user_id: &str,
    app_id: &str,
    keys: &[(&str, &str)],
) -> sqlx::Result<Vec<Row>> {
    // CROSS JOIN keeps the keys as the outer loop: one primary-key probe each.
    sqlx::query_as(
        "SELECT r.table_name, r.record_id, r.fields, r.created_seq, r.touched_seq
         FROM json_each(?3) AS k CROSS JOIN sync_records r
         WHERE r.user_id = ?1 AND r.app_id = ?2 AND r.table_name = k.value ->> 0 AND r.record_id = k.value ->> 1",
    )
    .bind(user_id)
    .bind(app_id)
    .bind(Json(keys))
    .fetch_all(conn)
    .await
}

pub async fn save(conn: &mut SqliteConnection, user_id: &str, app_id: &str, records: &[Record]) -> sqlx::Result<()> {
    let rows: Vec<Value> = records
        .iter()
        .map(|r| json!([r.table, r.id, r.state.fields, r.state.created, r.state.touched]))
        .collect();
    // `WHERE true` tells SQLite's parser the ON CONFLICT is the upsert's.
    sqlx::query(
        "INSERT INTO sync_records (user_id, app_id, table_name, record_id, fields, created_seq, touched_seq)
         SELECT ?1, ?2, j.value ->> 0, j.value ->> 1, j.value ->> 2, j.value ->> 3, j.value ->> 4
         FROM json_each(?3) AS j WHERE true
         ON CONFLICT (user_id, app_id, table_name, record_id) DO UPDATE
         SET fields = excluded.fields, created_seq = excluded.created_seq, touched_seq = excluded.touched_seq",
    )
    .bind(user_id)
    .bind(app_id)
    .bind(Json(rows))
    .execute(conn)
    .await?;
    Ok(())
}

/// A page of one table (parameters: user, app, since, how many, table):
/// the user's clock with the records changed after `since`, oldest first
/// (one row with nulls when none). Writers are serialised and a read sees
/// one snapshot, so every record it sees is at or below the clock it sees.
/// A statement per case rather than `?5 IS NULL OR ...`, so each searches
/// its own index in touched_seq order.
pub const PAGE_OF_TABLE: &str = "SELECT c.last_seq, r.table_name, r.record_id, r.fields, r.created_seq, r.touched_seq,
                    length(CAST(r.fields AS BLOB))
             FROM sync_clocks c LEFT JOIN (
               SELECT * FROM sync_records
               WHERE user_id = ?1 AND app_id = ?2 AND table_name = ?5 AND touched_seq > ?3
               ORDER BY touched_seq LIMIT ?4) r ON r.touched_seq <= c.last_seq
             WHERE c.user_id = ?1
             ORDER BY r.touched_seq";
/// A page of a whole app (parameters: user, app, since, how many).
pub const PAGE_OF_APP: &str = "SELECT c.last_seq, r.table_name, r.record_id, r.fields, r.created_seq, r.touched_seq,
                    length(CAST(r.fields AS BLOB))
             FROM sync_clocks c LEFT JOIN (
               SELECT * FROM sync_records
               WHERE user_id = ?1 AND app_id = ?2 AND touched_seq > ?3
               ORDER BY touched_seq LIMIT ?4) r ON r.touched_seq <= c.last_seq
             WHERE c.user_id = ?1
             ORDER BY r.touched_seq";

/// Idempotent outcomes (parameters: user, key, then the TTL in seconds):
/// the unexpired one for a key, as (fingerprint, response). `created_at` is
/// in Unix milliseconds, from SQLite's clock.
pub const FIND_OUTCOME: &str = "SELECT request_hash, response FROM sync_idempotency
     WHERE user_id = ?1 AND idempotency_key = ?2 AND created_at > unixepoch('subsec') * 1000 - ?3 * 1000";
/// Drops a user's expired outcomes (parameters: user, TTL in seconds).
pub const EXPIRE_OUTCOMES: &str =
    "DELETE FROM sync_idempotency WHERE user_id = ?1 AND created_at <= unixepoch('subsec') * 1000 - ?2 * 1000";
/// Keeps an outcome (parameters: user, key, fingerprint, response).
pub const SAVE_OUTCOME: &str =
    "INSERT INTO sync_idempotency (user_id, idempotency_key, request_hash, response, created_at)
     VALUES (?1, ?2, ?3, ?4, CAST(unixepoch('subsec') * 1000 AS INTEGER)) ON CONFLICT DO NOTHING";
