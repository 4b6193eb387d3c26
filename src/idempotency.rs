//! Replay of a push's first outcome under its `Idempotency-Key`.
//!
//! Outcomes are kept for `IDEMPOTENCY_TTL`. Expired ones are ignored, and
//! removed by the user's next keyed push, so no cross-user sweep is needed.

use std::time::Duration;

use serde_json::Value;
use sha2::{Digest, Sha256};
use sqlx::PgConnection;

/// A digest of what a key was first used for, to tell a retry from a
/// different request reusing the key. `since` is left out on purpose: a
/// device that pulled between two attempts retries with a newer cursor,
/// and replaying the first answer (with its older cursor) is still safe.
pub fn fingerprint(app_id: &str, client_id: &str, changes: &Value) -> Vec<u8> {
    let mut hash = Sha256::new();
    for part in [app_id, client_id, &changes.to_string()] {
        hash.update((part.len() as u64).to_be_bytes());
        hash.update(part.as_bytes());
    }
    hash.finalize().to_vec()
}

/// The unexpired outcome for a key: (fingerprint, response).
pub async fn find(
    conn: &mut PgConnection,
    user_id: &str,
    key: &str,
    ttl: Duration,
) -> sqlx::Result<Option<(Vec<u8>, Value)>> {
    sqlx::query_as(
        "SELECT request_hash, response FROM sync_idempotency
         WHERE user_id = $1 AND idempotency_key = $2 AND created_at > now() - make_interval(secs => $3)",
    )
    .bind(user_id)
    .bind(key)
    .bind(ttl.as_secs_f64())
    .fetch_optional(conn)
    .await
}

/// Stores an outcome, first dropping the user's expired ones.
pub async fn save(
    conn: &mut PgConnection,
    user_id: &str,
    key: &str,
    fingerprint: &[u8],
    response: &Value,
    ttl: Duration,
) -> sqlx::Result<()> {
    sqlx::query("DELETE FROM sync_idempotency WHERE user_id = $1 AND created_at <= now() - make_interval(secs => $2)")
        .bind(user_id)
        .bind(ttl.as_secs_f64())
        .execute(&mut *conn)
        .await?;
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
