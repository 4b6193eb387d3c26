//! The PostgreSQL store: connecting, migrations, and per-user
//! transactions under row-level security. Its statements are in [`sql`].

pub mod availability;
pub mod channel;
pub mod sql;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{AssertSqlSafe, ConnectOptions, Connection, PgConnection, PgPool, Postgres, Transaction};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::store::dialect::fault;
use crate::store::turns::{Turn, Turns};

use self::availability::{Availability, Status};

/// The migrations under `migrations/postgres/`, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// The PostgreSQL store: its pool, and the queues in which each user's
/// pushes wait for their turn before they take a connection.
#[derive(Clone)]
pub struct PgStore {
    pub pool: PgPool,
    pub turns: Turns,
    /// Longest wait for a turn (`LOCK_TIMEOUT`).
    pub lock_timeout: Duration,
    /// When a request last got a connection, in milliseconds since `since`
    /// plus [`CONNECTION_WAIT`] (0: never).
    last_connected: Arc<AtomicU64>,
    since: Instant,
    /// Whether the database answers (see [`availability`]).
    pub availability: Availability,
    /// When the database last ran out of disk or memory.
    pub exhaustion: crate::store::Exhaustion,
    /// This process's clock, corrected to the database's by the probe.
    pub clock: crate::clock::Clock,
    /// The probe behind `availability`, once started; ended with the last clone.
    probe: Arc<std::sync::OnceLock<AbortOnDrop>>,
}

/// A task ended when this is dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A transaction of the PostgreSQL store, holding its user's turn (when it
/// writes through [`PgStore`]) until it ends.
pub struct PgTx {
    pub tx: Transaction<'static, Postgres>,
    _turn: Option<Turn>,
}

impl PgTx {
    pub fn new(tx: Transaction<'static, Postgres>, turn: Option<Turn>) -> PgTx {
        PgTx { tx, _turn: turn }
    }
}

impl std::ops::Deref for PgTx {
    type Target = Transaction<'static, Postgres>;

    fn deref(&self) -> &Self::Target {
        &self.tx
    }
}

impl std::ops::DerefMut for PgTx {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.tx
    }
}

/// Longest wait for a pooled connection (or a push's `LOCK_TIMEOUT`, if
/// shorter). A push waits for its turn without one, so pushes of distinct
/// users are all that compete for connections; beyond this, the replica is
/// overloaded or the database does not answer.
const CONNECTION_WAIT: Duration = Duration::from_secs(10);

impl PgStore {
    /// The store `url` names, connecting on demand; see [`wait_until_reachable`].
    pub fn new(url: &str, config: &Config) -> anyhow::Result<PgStore> {
        Ok(PgStore {
            pool: pool(url, config)?,
            turns: Turns::default(),
            lock_timeout: config.lock_timeout,
            last_connected: Arc::default(),
            since: Instant::now(),
            availability: Availability::default(),
            exhaustion: Default::default(),
            clock: Default::default(),
            probe: Arc::default(),
        })
    }

    /// Starts, once, the task that migrates the database as soon as it
    /// answers and then probes it: requests get [`Error::Unavailable`]
    /// until it has migrated, and whenever the probe finds it down.
    pub fn start(&self) {
        self.probe.get_or_init(|| {
            AbortOnDrop(tokio::spawn(availability::watch(
                self.pool.clone(),
                self.availability.clone(),
                self.clock.clone(),
            )))
        });
    }

    /// Waits for `user_id`'s turn, then begins a transaction that writes
    /// the user's data and holds the turn until it ends.
    pub async fn begin_write(&self, user_id: &str) -> Result<PgTx> {
        let turn = self.turns.wait(user_id, self.lock_timeout).await?;
        Ok(PgTx::new(self.begin(user_id).await?, Some(turn)))
    }

    /// Begins a transaction that only reads `user_id`'s data.
    pub async fn begin_read(&self, user_id: &str) -> Result<PgTx> {
        Ok(PgTx::new(self.begin(user_id).await?, None))
    }

    /// [`begin_for`] on the pool, at once [`Error::Unavailable`] while the
    /// database is not up, and let go as soon as it is seen going down.
    async fn begin(&self, user_id: &str) -> Result<Transaction<'static, Postgres>> {
        if self.availability.status() != Status::Up {
            return Err(Error::Unavailable);
        }
        tokio::select! {
            begun = self.connect(user_id) => begun,
            () = self.availability.lost() => Err(Error::Unavailable),
        }
    }

    /// [`begin_for`] on the pool. A pool that gives no connection in time,
    /// although requests got connections up to [`CONNECTION_WAIT`] before
    /// this one asked or since, is overloaded ([`Error::Busy`], a 429); one
    /// that gave none for longer is failing to reach the database
    /// ([`Error::Unavailable`]).
    async fn connect(&self, user_id: &str) -> Result<Transaction<'static, Postgres>> {
        let now = || self.since.elapsed().as_millis() as u64 + CONNECTION_WAIT.as_millis() as u64;
        let asked = now();
        match begin_for(&self.pool, user_id).await {
            Ok(tx) => {
                self.last_connected.fetch_max(now(), Ordering::Relaxed);
                Ok(tx)
            }
            Err(sqlx::Error::PoolTimedOut)
                if self.last_connected.load(Ordering::Relaxed) + CONNECTION_WAIT.as_millis() as u64 >= asked =>
            {
                Err(Error::Busy)
            }
            Err(e) => Err(fault::<PgConnection>(e)),
        }
    }
}

/// A pool that connects on demand; see [`wait_until_reachable`].
fn pool(url: &str, config: &Config) -> anyhow::Result<PgPool> {
    let options: PgConnectOptions = url.parse().context("invalid DATABASE_URL")?;
    // A push waits for the user's clock row (pushes of the same user on
    // other replicas) only so long, then 429.
    let lock_timeout = format!("{}ms", config.lock_timeout.as_millis());
    Ok(PgPoolOptions::new()
        .max_connections(config.database_max_connections)
        // Tested when released instead (sqlx always does); see [`begin_for`].
        .test_before_acquire(false)
        .acquire_timeout(config.lock_timeout.min(CONNECTION_WAIT))
        .connect_lazy_with(options.application_name("mana-sync").options([
            ("lock_timeout", lock_timeout.as_str()),
            // Every statement is prepared once per connection and should be
            // planned once too: left to choose, PostgreSQL kept planning the
            // push's statement anew for each execution (0.4 ms, twice its
            // run time), as plans made for the parameters look cheaper. Each
            // statement's plan is one whatever its parameters (the indexes
            // are made so), and the tests and the load benchmark run with it.
            ("plan_cache_mode", "force_generic_plan"),
            // A replica that stops mid-push (frozen, partitioned, paused
            // by its host) must not hold its user's clock row, and so the
            // user's pushes on every other replica, for longer than this:
            // the server ends such a transaction (rolled back: nothing of
            // it was acknowledged). A push never idles inside its
            // transaction; it runs its statements back to back.
            ("idle_in_transaction_session_timeout", IDLE_IN_TRANSACTION),
            // A peer that vanished without closing (a partition, a host
            // gone) is found by the server within about half a minute,
            // whether its connection idles (keepalives) or has answers
            // unacknowledged (`tcp_user_timeout`), rather than after the
            // kernel's two hours.
            ("tcp_keepalives_idle", "10"),
            ("tcp_keepalives_interval", "5"),
            ("tcp_keepalives_count", "3"),
            ("tcp_user_timeout", "30000"),
        ])))
}

/// How long PostgreSQL lets a transaction of a replica sit idle before it
/// ends it (`idle_in_transaction_session_timeout`): well within the
/// default `LOCK_TIMEOUT` (30 s), so a push on another replica waiting
/// behind a frozen one gets its turn instead of a 429.
const IDLE_IN_TRANSACTION: &str = "10s";

/// Waits for the database, retrying with exponential backoff (capped at
/// 30 s) and logging every failed attempt, until `deadline` passes.
pub async fn wait_until_reachable(pool: &PgPool, deadline: Option<Duration>) -> anyhow::Result<()> {
    let started = tokio::time::Instant::now();
    let mut delay = Duration::from_millis(250);
    let options = pool.connect_options();
    loop {
        // One plain connection attempt each time: the pool's own acquire
        // would keep retrying silently until its timeout.
        match options.connect().await {
            Ok(conn) => {
                let _ = conn.close().await;
                return Ok(());
            }
            Err(e) => {
                if deadline.is_some_and(|d| started.elapsed() >= d) {
                    return Err(e).context("failed to connect to DATABASE_URL");
                }
                tracing::warn!(error = %e, retry_in = ?delay, "database unreachable; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// Applies pending migrations, then warns if row-level security cannot
/// protect anything. Replicas starting together queue on the migrator's
/// advisory lock without the pool's `lock_timeout`, on a connection that is
/// then closed rather than returned to the pool.
///
/// When every migration is already applied nothing is run, so a serving role
/// that may not create tables (SECURITY.md) starts; pending migrations need
/// the owner (`mana-sync migrate` as the owner role).
pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    let mut conn = pool
        .acquire()
        .await
        .context("failed to connect to DATABASE_URL")?
        .detach();
    if !up_to_date(&mut conn).await {
        sql::no_lock_timeout(&mut conn).await?;
        // `run_direct` is what `run` does on an acquired connection; called
        // directly, the future is `Send` where the compiler cannot prove it
        // of `run`'s `Acquire` bound (sqlx's own note), so it can run in a task.
        MIGRATOR
            .run_direct(None, &mut conn, false)
            .await
            .context("failed to apply database migrations (they need a role that may create tables: run `mana-sync migrate` as the database owner)")?;
    }
    warn_if_rls_bypassed(pool).await
}

/// Whether every migration of this build is applied, unchanged. Any doubt
/// (no migrations table, one that cannot be read) says no, and the migrator
/// then decides, with its own errors.
async fn up_to_date(conn: &mut PgConnection) -> bool {
    use sqlx::migrate::Migrate as _;
    let Ok(applied) = conn.list_applied_migrations(&MIGRATOR.table_name).await else {
        return false;
    };
    let applied: HashMap<i64, &[u8]> = applied.iter().map(|m| (m.version, &*m.checksum)).collect();
    MIGRATOR
        .iter()
        .filter(|m| !m.migration_type.is_down_migration())
        .all(|m| applied.get(&m.version) == Some(&&*m.checksum))
}

/// Warns when row-level security cannot protect anything: superusers and
/// BYPASSRLS roles ignore it.
async fn warn_if_rls_bypassed(pool: &PgPool) -> anyhow::Result<()> {
    let bypass = sql::bypasses_rls(pool)
        .await
        .context("failed to read the database role")?;
    if bypass {
        tracing::warn!(
            "DATABASE_URL connects as a superuser or BYPASSRLS role: row-level security is not enforced (see SECURITY.md)"
        );
    }
    Ok(())
}

/// Begins a transaction scoped to one user (see [`sql::begin_scoped`]).
///
/// The pool tests a connection when it is given back, not again when it
/// is taken (a round trip per request saved), so an idle connection that
/// died since (the database restarted, or ended it) fails here: a failed
/// `BEGIN` wrote nothing, so another connection is tried, up to one more
/// than the pool holds.
pub async fn begin_for(pool: &PgPool, user_id: &str) -> sqlx::Result<Transaction<'static, Postgres>> {
    let begin = sql::begin_scoped(user_id)?;
    let mut attempts = pool.options().get_max_connections() + 1;
    loop {
        match pool.begin_with(AssertSqlSafe(begin.clone())).await {
            Err(e) if attempts > 1 && connection_lost(&e) => attempts -= 1,
            begun => return begun,
        }
    }
}

/// The connection broke (an I/O error, a connection exception, or the
/// server ended it): the request may be retried on another.
fn connection_lost(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) => true,
        sqlx::Error::Database(d) => d.code().is_some_and(|c| c.starts_with("08") || c == "57P01"),
        _ => false,
    }
}

/// A pool of one connection, made afresh after each failure by its owner
/// (the fan-out's notifier and listener): a connection lost half-open can
/// stay stuck for minutes in its old pool's only slot.
pub fn single_connection(options: &PgConnectOptions, name: &str) -> PgPool {
    PgPoolOptions::new()
        .max_connections(1)
        .min_connections(0)
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy_with(options.clone().application_name(name))
}
