//! NOTIFY and LISTEN between replicas: the statements the fan-out runs.

use sqlx::postgres::PgListener;
use sqlx::{Executor, PgConnection, PgPool};

/// NOTIFYs each payload on `channel`, in one round trip.
pub async fn notify_all(pool: &PgPool, channel: &str, payloads: &[String]) -> sqlx::Result<()> {
    sqlx::query("SELECT pg_notify($1, p) FROM UNNEST($2::text[]) AS p")
        .bind(channel)
        .bind(payloads)
        .execute(pool)
        .await?;
    Ok(())
}

/// NOTIFYs one payload on `channel` inside the caller's transaction
/// (delivered at its commit).
pub async fn notify(conn: &mut PgConnection, channel: &str, payload: &str) -> sqlx::Result<()> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(channel)
        .bind(payload)
        .execute(conn)
        .await?;
    Ok(())
}

/// A listener on `channel`, on a connection of `pool`, that does not
/// reconnect by itself (so its owner knows when notices may have been lost).
pub async fn listen(pool: &PgPool, channel: &str) -> sqlx::Result<PgListener> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.eager_reconnect(false);
    listener.listen(channel).await?;
    Ok(listener)
}

/// Whether a listener's connection still answers (a half-open one does not).
pub async fn ping_listener(listener: &mut PgListener) -> sqlx::Result<()> {
    listener.execute("SELECT 1").await?;
    Ok(())
}
