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
//! pid) keeps a second process off the same file. The statements are in
//! [`sql`].

pub mod sql;

use std::fs::{File, OpenOptions, TryLockError};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{ConnectOptions, Connection, Sqlite, SqliteConnection, SqlitePool, Transaction};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::store::dialect::fault;

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
    /// When the file last could not grow (the disk is full).
    pub exhaustion: crate::store::Exhaustion,
    /// The process's own clock: one process, nothing to agree with.
    pub clock: crate::clock::Clock,
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
        // Opened once outside the pool, so that start-up (creating the
        // file, switching it to WAL) is not bound by the pool's wait of
        // LOCK_TIMEOUT, which is a push's.
        options
            .connect()
            .await
            .with_context(|| format!("failed to open the SQLite database {}", path.display()))?
            .close()
            .await?;
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(config.lock_timeout)
            .connect_lazy_with(options.clone());
        let reader = SqlitePoolOptions::new()
            .max_connections(config.database_max_connections.clamp(1, 8))
            .acquire_timeout(Duration::from_secs(10))
            .connect_lazy_with(options);
        Ok(SqliteStore {
            writer,
            reader,
            path: Arc::new(path),
            exhaustion: Default::default(),
            clock: Default::default(),
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

    /// Applies pending migrations, on a connection of its own (not bound
    /// by the writer pool's wait of LOCK_TIMEOUT).
    pub async fn migrate(&self) -> anyhow::Result<()> {
        let mut conn = self.writer.connect_options().connect().await?;
        MIGRATOR
            .run(&mut conn)
            .await
            .with_context(|| format!("failed to apply migrations to {}", self.path.display()))?;
        conn.close().await?;
        Ok(())
    }

    /// Begins the (only) write transaction; waiting for it longer than
    /// `LOCK_TIMEOUT` is [`Error::Busy`].
    pub async fn begin_write(&self) -> Result<Transaction<'static, Sqlite>> {
        match sql::begin_immediate(&self.writer).await {
            Err(sqlx::Error::PoolTimedOut) => Err(Error::Busy),
            other => other.map_err(fault::<SqliteConnection>),
        }
    }

    /// Begins a read; every reader busy for 10 s is [`Error::Busy`] (the
    /// file is local: a pool that gives no connection is overloaded).
    pub async fn begin_read(&self) -> Result<Transaction<'static, Sqlite>> {
        match self.reader.begin().await {
            Err(sqlx::Error::PoolTimedOut) => Err(Error::Busy),
            other => other.map_err(fault::<SqliteConnection>),
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
