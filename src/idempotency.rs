//! Replay of a push's first outcome under its `Idempotency-Key`.

use std::time::Duration;

use serde_json::Value;
use sha2::{Digest, Sha256};
use sqlx::{PgConnection, PgPool};

use crate::db;

/// Longest accepted `Idempotency-Key`, in bytes.
pub const MAX_KEY_BYTES: usize = 256;

/// A digest of what a key was first used for, to tell a retry from a
/// different request reusing the key.
pub fn fingerprint(app_id: &str, client_id: &str, body: &Value) -> Vec<u8> {
    let mut hash = Sha256::new();
    for part in [app_id, client_id, &body.to_string()] {
        hash.update((part.len() as u64).to_be_bytes());
        hash.update(part.as_bytes());
    }
    hash.finalize().to_vec()
}

/// The stored outcome for a key: (fingerprint, response).
pub async fn find(conn: &mut PgConnection, user_id: &str, key: &str) -> sqlx::Result<Option<(Vec<u8>, Value)>> {
    sqlx::query_as("SELECT request_hash, response FROM sync_idempotency WHERE user_id = $1 AND idempotency_key = $2")
        .bind(user_id)
        .bind(key)
        .fetch_optional(conn)
        .await
}

pub async fn save(
    conn: &mut PgConnection,
    user_id: &str,
    key: &str,
    fingerprint: &[u8],
    response: &Value,
) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO sync_idempotency (user_id, idempotency_key, request_hash, response) VALUES ($1, $2, $3, $4)
         ON CONFLICT DO NOTHING",
    )
    .bind(user_id)
    .bind(key)
    .bind(fingerprint)
    .bind(response)
    .execute(conn)
    .await?;
    Ok(())
}

/// Forgets outcomes older than `ttl`. Returns how many.
pub async fn prune(pool: &PgPool, ttl: Duration) -> sqlx::Result<u64> {
    let mut tx = db::begin_maintenance(pool).await?;
    let deleted = sqlx::query("DELETE FROM sync_idempotency WHERE created_at < now() - make_interval(secs => $1)")
        .bind(ttl.as_secs_f64())
        .execute(&mut *tx)
        .await?
        .rows_affected();
    tx.commit().await?;
    Ok(deleted)
}

/// Prunes once an hour in the background.
pub fn spawn_pruner(pool: PgPool, ttl: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(3600));
        loop {
            tick.tick().await;
            match prune(&pool, ttl).await {
                Ok(n) if n > 0 => tracing::info!(pruned = n, "expired idempotency keys removed"),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "pruning idempotency keys failed"),
            }
        }
    })
}
