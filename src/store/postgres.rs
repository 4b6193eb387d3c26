//! The PostgreSQL store: connecting, migrations, per-user transactions
//! under row-level security, and the SQL of the log, the projection and
//! idempotent outcomes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::types::Json;
use sqlx::{ConnectOptions, Connection, PgConnection, PgPool, Postgres, Transaction};

use crate::change_log::NewRow;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::fold::FieldState;
use crate::projection::{Record, Row};
use crate::store::turns::{Turn, Turns};

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
        })
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

    /// [`begin_for`] on the pool. A pool that gives no connection in time,
    /// although requests got connections up to [`CONNECTION_WAIT`] before
    /// this one asked or since, is overloaded ([`Error::Busy`], a 429); one
    /// that gave none for longer is failing to reach the database (a fault,
    /// not something to retry in a second).
    async fn begin(&self, user_id: &str) -> Result<Transaction<'static, Postgres>> {
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
            Err(e) => Err(e.into()),
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
        .acquire_timeout(config.lock_timeout.min(CONNECTION_WAIT))
        .connect_lazy_with(
            options
                .application_name("mana-sync")
                .options([("lock_timeout", lock_timeout)]),
        ))
}

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
pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    let mut conn = pool
        .acquire()
        .await
        .context("failed to connect to DATABASE_URL")?
        .detach();
    sqlx::query("SET lock_timeout = 0").execute(&mut conn).await?;
    MIGRATOR
        .run(&mut conn)
        .await
        .context("failed to apply database migrations")?;
    warn_if_rls_bypassed(pool).await
}

/// Warns when row-level security cannot protect anything: superusers and
/// BYPASSRLS roles ignore it.
async fn warn_if_rls_bypassed(pool: &PgPool) -> anyhow::Result<()> {
    let bypass: bool = sqlx::query_scalar("SELECT rolsuper OR rolbypassrls FROM pg_roles WHERE rolname = current_user")
        .fetch_one(pool)
        .await
        .context("failed to read the database role")?;
    if bypass {
        tracing::warn!(
            "DATABASE_URL connects as a superuser or BYPASSRLS role: row-level security is not enforced (see SECURITY.md)"
        );
    }
    Ok(())
}

/// Begins a transaction scoped to one user: row-level security lets it see
/// and write only that user's rows (the setting is transaction-local, so it
/// never leaks to the pooled connection's next user).
pub async fn begin_for(pool: &PgPool, user_id: &str) -> sqlx::Result<Transaction<'static, Postgres>> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT set_config('mana_sync.user_id', $1, true)")
        .bind(user_id)
        .execute(&mut *tx)
        .await?;
    Ok(tx)
}

/// Every user with a clock, in a maintenance transaction: it may list the
/// users (their clock rows) and nothing else of anyone's.
pub async fn users(pool: &PgPool) -> sqlx::Result<Vec<String>> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT set_config('mana_sync.maintenance', 'on', true)")
        .execute(&mut *tx)
        .await?;
    let users = sqlx::query_scalar("SELECT user_id FROM sync_clocks ORDER BY user_id")
        .fetch_all(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(users)
}

/// Advances the user's clock by `n` and returns its new value. The clock
/// row stays locked until the transaction ends.
pub async fn reserve(conn: &mut PgConnection, user_id: &str, n: i64) -> sqlx::Result<i64> {
    sqlx::query_scalar(
        "INSERT INTO sync_clocks (user_id, last_seq)
         VALUES ($1, (EXTRACT(EPOCH FROM clock_timestamp()) * 1000000)::bigint * 1000 + $2 - 1)
         ON CONFLICT (user_id) DO UPDATE SET last_seq = GREATEST(sync_clocks.last_seq + $2, EXCLUDED.last_seq)
         RETURNING last_seq",
    )
    .bind(user_id)
    .bind(n)
    .fetch_one(conn)
    .await
}

pub async fn lock_clock(conn: &mut PgConnection, user_id: &str) -> sqlx::Result<()> {
    sqlx::query("SELECT 1 FROM sync_clocks WHERE user_id = $1 FOR UPDATE")
        .bind(user_id)
        .execute(conn)
        .await?;
    Ok(())
}

pub async fn append(
    conn: &mut PgConnection,
    user_id: &str,
    app_id: &str,
    client_id: &str,
    rows: &[NewRow<'_>],
) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO sync_changes (id, seq, app_id, table_name, record_id, user_id, op, data, field_timestamps, untimed, client_id)
         SELECT u.id, u.seq, $1, u.table_name, u.record_id, $2, u.op, u.data, u.stamps, u.untimed, $3
         FROM UNNEST($4::uuid[], $5::bigint[], $6::text[], $7::text[], $8::text[], $9::jsonb[], $10::jsonb[], $11::bool[])
           AS u(id, seq, table_name, record_id, op, data, stamps, untimed)",
    )
    .bind(app_id)
    .bind(user_id)
    .bind(client_id)
    .bind(rows.iter().map(|r| r.id).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.seq).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.table).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.record_id).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.op).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| &r.data).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| &r.stamps).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.untimed).collect::<Vec<_>>())
    .execute(conn)
    .await?;
    Ok(())
}

pub async fn load(
    conn: &mut PgConnection,
    user_id: &str,
    app_id: &str,
    keys: &[(&str, &str)],
) -> sqlx::Result<Vec<Row>> {
    let (tables, ids): (Vec<&str>, Vec<&str>) = keys.iter().copied().unzip();
    sqlx::query_as(
        // One primary-key probe per key: the LIMIT keeps the planner from
        // turning this into a hash join over all of the user's records.
        "SELECT r.table_name, r.record_id, r.fields, r.created_seq, r.touched_seq
         FROM UNNEST($3::text[], $4::text[]) AS k(table_name, record_id)
         CROSS JOIN LATERAL (
           SELECT * FROM sync_records r
           WHERE r.user_id = $1 AND r.app_id = $2 AND r.table_name = k.table_name AND r.record_id = k.record_id
           LIMIT 1) r",
    )
    .bind(user_id)
    .bind(app_id)
    .bind(tables)
    .bind(ids)
    .fetch_all(conn)
    .await
}

pub async fn save(conn: &mut PgConnection, user_id: &str, app_id: &str, records: &[Record]) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO sync_records (user_id, app_id, table_name, record_id, fields, created_seq, touched_seq)
         SELECT $1, $2, u.table_name, u.record_id, u.fields, u.created_seq, u.touched_seq
         FROM UNNEST($3::text[], $4::text[], $5::jsonb[], $6::bigint[], $7::bigint[])
           AS u(table_name, record_id, fields, created_seq, touched_seq)
         ON CONFLICT (user_id, app_id, table_name, record_id) DO UPDATE
         SET fields = EXCLUDED.fields, created_seq = EXCLUDED.created_seq, touched_seq = EXCLUDED.touched_seq",
    )
    .bind(user_id)
    .bind(app_id)
    .bind(records.iter().map(|r| r.table.as_str()).collect::<Vec<_>>())
    .bind(records.iter().map(|r| r.id.as_str()).collect::<Vec<_>>())
    .bind(
        records
            .iter()
            .map(|r| Json(&r.state.fields))
            .collect::<Vec<Json<&BTreeMap<String, FieldState>>>>(),
    )
    .bind(records.iter().map(|r| r.state.created).collect::<Vec<_>>())
    .bind(records.iter().map(|r| r.state.touched).collect::<Vec<_>>())
    .execute(conn)
    .await?;
    Ok(())
}

/// A page of one table (parameters: user, app, since, how many, table):
/// the user's clock with the records changed after `since`, oldest first
/// (one row with nulls when none). The bound by the clock keeps out records
/// committed after the clock was read. A statement per case rather than
/// `table IS NULL OR ...`, so each keeps a plan that walks its own index in
/// touched_seq order.
pub const PAGE_OF_TABLE: &str = "SELECT c.last_seq, r.table_name, r.record_id, r.fields, r.created_seq, r.touched_seq,
                    octet_length(r.fields::text)::bigint
             FROM sync_clocks c LEFT JOIN LATERAL (
               SELECT * FROM sync_records r
               WHERE r.user_id = c.user_id AND r.app_id = $2 AND r.table_name = $5
                 AND r.touched_seq > $3 AND r.touched_seq <= c.last_seq
               ORDER BY r.touched_seq LIMIT $4) r ON true
             WHERE c.user_id = $1";
/// A page of a whole app (parameters: user, app, since, how many).
pub const PAGE_OF_APP: &str = "SELECT c.last_seq, r.table_name, r.record_id, r.fields, r.created_seq, r.touched_seq,
                    octet_length(r.fields::text)::bigint
             FROM sync_clocks c LEFT JOIN LATERAL (
               SELECT * FROM sync_records r
               WHERE r.user_id = c.user_id AND r.app_id = $2
                 AND r.touched_seq > $3 AND r.touched_seq <= c.last_seq
               ORDER BY r.touched_seq LIMIT $4) r ON true
             WHERE c.user_id = $1";

/// Idempotent outcomes (parameters: user, key, then the TTL in seconds):
/// the unexpired one for a key, as (fingerprint, response).
pub const FIND_OUTCOME: &str = "SELECT request_hash, response FROM sync_idempotency
     WHERE user_id = $1 AND idempotency_key = $2 AND created_at > now() - make_interval(secs => $3)";
/// Drops a user's expired outcomes (parameters: user, TTL in seconds).
pub const EXPIRE_OUTCOMES: &str =
    "DELETE FROM sync_idempotency WHERE user_id = $1 AND created_at <= now() - make_interval(secs => $2)";
/// Keeps an outcome (parameters: user, key, fingerprint, response).
pub const SAVE_OUTCOME: &str = "INSERT INTO sync_idempotency (user_id, idempotency_key, request_hash, response)
     VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING";
