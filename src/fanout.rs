//! Cross-replica fan-out through PostgreSQL NOTIFY/LISTEN.
//!
//! After a push commits, its notice goes at once to this replica's hub and
//! to the replica's [`Notifier`], which NOTIFYs it on a dedicated
//! connection, outside the push transaction: a transaction that NOTIFYs
//! takes a database-wide lock at commit, which would serialise every
//! committing push (see the benchmark). Whatever queues up while a NOTIFY
//! is on its way goes out together in the next one (merged per user, app
//! and device), so a burst costs few round trips; a failed NOTIFY is
//! retried on a new connection, never dropped. Only committed pushes are
//! announced.
//!
//! Each replica's listener, also on its own connection, hands the notices
//! of other replicas to its hub. NOTIFY is lost while it is disconnected,
//! so when it notices a loss (an error, or a ping that goes unanswered on a
//! half-open connection) it reconnects, LISTENs again, and only then tells
//! every local subscriber to pull everything; `/health` reports the
//! replica degraded meanwhile.

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use sqlx::{Executor, PgConnection};

use std::collections::{BTreeMap, BTreeSet};

use crate::hub::{Hub, Notice};

/// The NOTIFY channel.
pub const CHANNEL: &str = "mana_sync_changes";
/// NOTIFY payloads must stay under 8000 bytes; past this a notice names no tables.
const MAX_PAYLOAD: usize = 4000;
/// How often an idle listener checks that its connection still answers.
const PING_EVERY: Duration = Duration::from_secs(5);
const PING_TIMEOUT: Duration = Duration::from_secs(3);

/// A notice's NOTIFY payload (names no tables when they would not fit).
fn payload(notice: &Notice) -> String {
    let payload = serde_json::to_string(notice).expect("a notice serialises");
    if payload.len() <= MAX_PAYLOAD {
        return payload;
    }
    serde_json::to_string(&Notice {
        tables: None,
        ..notice.clone()
    })
    .expect("a notice serialises")
}

/// Announces a batch inside the caller's transaction (PostgreSQL delivers
/// it at commit). The server uses [`Notifier`] instead; this is the
/// in-transaction form the benchmark compares it with.
pub async fn announce_in_transaction(conn: &mut PgConnection, notice: &Notice) -> sqlx::Result<()> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(CHANNEL)
        .bind(payload(notice))
        .execute(conn)
        .await?;
    Ok(())
}

/// Hands committed pushes' notices to the local hub and, through NOTIFY,
/// to every other replica. Cheap to clone.
#[derive(Clone)]
pub struct Notifier {
    hub: Hub,
    replica: String,
    queue: tokio::sync::mpsc::UnboundedSender<Notice>,
}

impl Notifier {
    /// Starts the NOTIFY task on its own connection.
    pub fn start(options: PgConnectOptions, hub: Hub) -> (Notifier, tokio::task::JoinHandle<()>) {
        let (queue, pending) = tokio::sync::mpsc::unbounded_channel();
        let replica = uuid::Uuid::new_v4().simple().to_string();
        let task = tokio::spawn(notify_loop(options, replica.clone(), pending));
        (Notifier { hub, replica, queue }, task)
    }

    /// This replica's id, carried in its notices so its listener skips them.
    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// Announces a committed push.
    pub fn publish(&self, notice: Notice) {
        self.hub.publish(&notice);
        let notice = Notice {
            replica: Some(self.replica.clone()),
            ..notice
        };
        // Only fails when the task is gone, i.e. the process is stopping.
        let _ = self.queue.send(notice);
    }
}

async fn notify_loop(
    options: PgConnectOptions,
    replica: String,
    mut pending: tokio::sync::mpsc::UnboundedReceiver<Notice>,
) {
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .min_connections(0)
        .connect_lazy_with(options.application_name("mana-sync-notifier"));
    let mut backoff = Duration::from_millis(100);
    while let Some(first) = pending.recv().await {
        // Everything queued meanwhile goes in the same round trip, merged.
        let mut merged: BTreeMap<(String, String, String), Option<BTreeSet<String>>> = BTreeMap::new();
        let mut add = |n: Notice| {
            let entry = merged
                .entry((n.user_id, n.app_id, n.client_id))
                .or_insert_with(|| Some(BTreeSet::new()));
            match (entry.as_mut(), n.tables) {
                (Some(set), Some(tables)) => set.extend(tables),
                _ => *entry = None,
            }
        };
        add(first);
        while let Ok(more) = pending.try_recv() {
            add(more);
        }
        let payloads: Vec<String> = merged
            .into_iter()
            .map(|((user_id, app_id, client_id), tables)| {
                payload(&Notice {
                    user_id,
                    app_id,
                    client_id,
                    tables: tables.map(|t| t.into_iter().collect()),
                    replica: Some(replica.clone()),
                })
            })
            .collect();
        loop {
            let sent = sqlx::query("SELECT pg_notify($1, p) FROM UNNEST($2::text[]) AS p")
                .bind(CHANNEL)
                .bind(&payloads)
                .execute(&pool)
                .await;
            match sent {
                Ok(_) => {
                    backoff = Duration::from_millis(100);
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, notices = payloads.len(), "NOTIFY failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

/// Listens until the process ends, reconnecting with backoff.
pub async fn listen_forever(options: PgConnectOptions, hub: Hub, replica: String) {
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
                let reason = receive(&mut listener, &hub, &replica).await;
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
async fn receive(listener: &mut PgListener, hub: &Hub, replica: &str) -> String {
    let mut ping = tokio::time::interval(PING_EVERY);
    ping.tick().await;
    loop {
        tokio::select! {
            received = listener.try_recv() => match received {
                Ok(Some(notification)) => match serde_json::from_str::<Notice>(notification.payload()) {
                    // This replica's own notices were handed to its hub at publish time.
                    Ok(notice) if notice.replica.as_deref() == Some(replica) => {}
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_stay_far_below_the_notify_limit_whatever_the_batch() {
        let long = |i: usize| format!("{i:0>128}");
        let notice = Notice {
            user_id: "u".repeat(256),
            app_id: "a".repeat(128),
            client_id: "c".repeat(256),
            tables: Some((0..500).map(long).collect()),
            replica: Some("r".repeat(32)),
        };
        let sent = payload(&notice);
        assert!(sent.len() <= MAX_PAYLOAD && MAX_PAYLOAD < 8000);
        let back: Notice = serde_json::from_str(&sent).unwrap();
        assert_eq!(back.tables, None, "too many tables to name: all of them");
        assert_eq!(back.user_id, notice.user_id);

        let small = Notice {
            tables: Some(vec!["todos".into()]),
            ..notice
        };
        assert_eq!(serde_json::from_str::<Notice>(&payload(&small)).unwrap(), small);
    }
}
