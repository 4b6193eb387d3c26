//! Connecting to PostgreSQL, migrations, and per-user transactions.

use std::time::Duration;

use anyhow::Context;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgConnection, PgPool, Postgres, Transaction};

use crate::config::Config;

/// The migrations under `migrations/`, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// A pool that connects on demand; see [`wait_until_reachable`].
pub fn pool(config: &Config) -> anyhow::Result<PgPool> {
    let options: PgConnectOptions = config.database_url.parse().context("invalid DATABASE_URL")?;
    // A push waits for the user's clock row only so long (then 429), so
    // one user's pile of pushes cannot hold every pooled connection.
    let lock_timeout = format!("{}ms", config.lock_timeout.as_millis());
    Ok(PgPoolOptions::new()
        .max_connections(config.database_max_connections)
        .acquire_timeout(Duration::from_secs(10))
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

/// Applies pending migrations. Replicas starting together queue on the
/// migrator's advisory lock without the pool's `lock_timeout`, on a
/// connection that is then closed rather than returned to the pool.
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
        .context("failed to apply database migrations")
}

/// Warns when row-level security cannot protect anything: superusers and
/// BYPASSRLS roles ignore it.
pub async fn warn_if_rls_bypassed(pool: &PgPool) -> anyhow::Result<()> {
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
/// and write only that user's rows.
pub async fn begin_for(pool: &PgPool, user_id: &str) -> sqlx::Result<Transaction<'static, Postgres>> {
    let mut tx = pool.begin().await?;
    scope_to_user(&mut tx, user_id).await?;
    Ok(tx)
}

/// Scopes the current transaction to one user (transaction-local, so it
/// never leaks to the pooled connection's next user).
async fn scope_to_user(conn: &mut PgConnection, user_id: &str) -> sqlx::Result<()> {
    sqlx::query("SELECT set_config('mana_sync.user_id', $1, true)")
        .bind(user_id)
        .execute(conn)
        .await?;
    Ok(())
}

/// Begins a maintenance transaction: it may list the users (their clock
/// rows) and nothing else of anyone's.
pub async fn begin_maintenance(pool: &PgPool) -> sqlx::Result<Transaction<'static, Postgres>> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT set_config('mana_sync.maintenance', 'on', true)")
        .execute(&mut *tx)
        .await?;
    Ok(tx)
}
