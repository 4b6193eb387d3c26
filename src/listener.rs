//! Cross-replica fan-out: every committed push NOTIFYs one channel, and
//! each replica's listener hands what it hears to its hub.
//!
//! The listener runs on a dedicated connection (never one of the request
//! pool's). NOTIFY is lost while it is disconnected, so when it notices a
//! loss (an error, or a ping that goes unanswered on a half-open
//! connection) it reconnects, LISTENs again, and only then tells every
//! local subscriber to pull everything; `/health` reports the replica
//! degraded meanwhile.

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use sqlx::{Executor, PgConnection};

use crate::hub::{Hub, Notice};

/// The NOTIFY channel.
pub const CHANNEL: &str = "mana_sync_changes";
/// NOTIFY payloads must stay under 8000 bytes; past this a notice names no tables.
const MAX_PAYLOAD: usize = 4000;
/// How often an idle listener checks that its connection still answers.
const PING_EVERY: Duration = Duration::from_secs(5);
const PING_TIMEOUT: Duration = Duration::from_secs(3);

/// Announces a batch, inside the pushing transaction: PostgreSQL delivers
/// it at commit, and never for a rolled-back batch.
pub async fn announce(conn: &mut PgConnection, notice: &Notice) -> sqlx::Result<()> {
    let mut payload = serde_json::to_string(notice).expect("a notice serialises");
    if payload.len() > MAX_PAYLOAD {
        let all_tables = Notice {
            tables: None,
            ..notice.clone()
        };
        payload = serde_json::to_string(&all_tables).expect("a notice serialises");
    }
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(CHANNEL)
        .bind(payload)
        .execute(conn)
        .await?;
    Ok(())
}

/// Listens until the process ends, reconnecting with backoff.
pub async fn run(options: PgConnectOptions, hub: Hub) {
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .min_connections(0)
        .connect_lazy_with(options.application_name("mana-sync-listener"));
    let mut backoff = Duration::from_millis(100);
    let mut first = true;
    loop {
        match listen(&pool).await {
            Ok(mut listener) => {
                hub.set_listening(true);
                backoff = Duration::from_millis(100);
                if !first {
                    tracing::info!("listener reconnected; telling every local socket to pull");
                    hub.publish_everything();
                }
                first = false;
                let reason = receive(&mut listener, &hub).await;
                hub.set_listening(false);
                tracing::warn!(%reason, "listener lost its connection; reconnecting");
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "listener cannot connect");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}

async fn listen(pool: &sqlx::PgPool) -> sqlx::Result<PgListener> {
    let mut listener = PgListener::connect_with(pool).await?;
    // We reconnect ourselves, so that we know when notices may have been lost.
    listener.eager_reconnect(false);
    listener.listen(CHANNEL).await?;
    Ok(listener)
}

/// Hands notices to the hub until the connection fails; returns why.
async fn receive(listener: &mut PgListener, hub: &Hub) -> String {
    let mut ping = tokio::time::interval(PING_EVERY);
    ping.tick().await;
    loop {
        tokio::select! {
            received = listener.try_recv() => match received {
                Ok(Some(notification)) => match serde_json::from_str::<Notice>(notification.payload()) {
                    Ok(notice) => {
                        let told = hub.publish(&notice);
                        tracing::debug!(user_id = %notice.user_id, app_id = %notice.app_id, told, "notice fanned out");
                    }
                    Err(e) => tracing::warn!(error = %e, "ignoring a malformed notice"),
                },
                Ok(None) => return "connection closed".to_owned(),
                Err(e) => return e.to_string(),
            },
            _ = ping.tick() => {
                match tokio::time::timeout(PING_TIMEOUT, listener.execute("SELECT 1")).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return format!("ping failed: {e}"),
                    Err(_) => return "ping timed out (half-open connection)".to_owned(),
                }
            }
        }
    }
}
