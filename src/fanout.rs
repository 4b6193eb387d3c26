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

use sqlx::PgConnection;
use sqlx::postgres::{PgConnectOptions, PgListener};
use tracing::Instrument;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::hub::{self, Hub, Notice};
use crate::store::postgres::{channel, single_connection};
use crate::telemetry;
use crate::timestamp::Timestamp;

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
    channel::notify(conn, CHANNEL, &payload(notice)).await
}

/// Hands committed pushes' notices to the local hub and, through NOTIFY,
/// to every other replica. Cheap to clone.
#[derive(Clone)]
pub struct Notifier {
    hub: Hub,
    replica: String,
    /// Where notices go to be NOTIFYed (`None`: a single-process store,
    /// where the local hub hears every push).
    queue: Option<tokio::sync::mpsc::UnboundedSender<Notice>>,
    /// Notices published but not yet NOTIFYed.
    unsent: Arc<AtomicUsize>,
}

impl Notifier {
    /// Starts the NOTIFY task on its own connection to `options`; without
    /// them (a SQLite store: one process), notices only go to the local hub.
    pub fn start(options: Option<PgConnectOptions>, hub: Hub) -> Notifier {
        let replica = uuid::Uuid::new_v4().simple().to_string();
        let unsent = Arc::new(AtomicUsize::new(0));
        let queue = options.map(|options| {
            let (queue, pending) = tokio::sync::mpsc::unbounded_channel();
            tokio::spawn(notify_loop(options, replica.clone(), pending, unsent.clone()));
            queue
        });
        Notifier {
            hub,
            replica,
            queue,
            unsent,
        }
    }

    /// This replica's id, carried in its notices so its listener skips them.
    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// Announces a committed push.
    pub fn publish(&self, notice: Notice) {
        let notice = Notice {
            committed_at: Some(Timestamp::now().0),
            traceparent: telemetry::current_traceparent(),
            ..notice
        };
        self.hub.publish(&notice);
        let Some(queue) = &self.queue else { return };
        let notice = Notice {
            replica: Some(self.replica.clone()),
            ..notice
        };
        self.unsent.fetch_add(1, Ordering::SeqCst);
        // Only fails when the task is gone, i.e. the process is stopping.
        let _ = queue.send(notice);
    }

    /// Notices published but not yet NOTIFYed (at shutdown, the last
    /// pushes are waited for, so they still reach the other replicas).
    pub fn unsent(&self) -> usize {
        self.unsent.load(Ordering::SeqCst)
    }
}

/// Longest a NOTIFY round trip may take before its connection is
/// presumed half-open and replaced.
const NOTIFY_TIMEOUT: Duration = Duration::from_secs(5);

type Merged = BTreeMap<(String, String, String), Merging>;

/// Notices of one user, app and device waiting to be NOTIFYed together.
struct Merging {
    /// `None`: every table.
    tables: Option<BTreeSet<String>>,
    /// The latest position among them (`None` when one did not tell).
    seq: Option<i64>,
    /// The earliest commit among them.
    committed_at: Option<i64>,
    /// The traces of the pushes behind them (the first few).
    traceparents: Vec<String>,
}

/// Most traces one NOTIFY links to (and the first carries on).
const MAX_LINKS: usize = 32;

/// Merges a notice into what is waiting to go (one entry per user, app and device).
fn merge(merged: &mut Merged, notice: Notice) {
    let entry = merged
        .entry((notice.user_id, notice.app_id, notice.client_id))
        .or_insert_with(|| Merging {
            tables: Some(BTreeSet::new()),
            seq: notice.seq,
            committed_at: notice.committed_at,
            traceparents: Vec::new(),
        });
    entry.committed_at = hub::earliest(entry.committed_at, notice.committed_at);
    entry.seq = entry.seq.zip(notice.seq).map(|(a, b)| a.max(b));
    if let Some(traceparent) = notice.traceparent
        && entry.traceparents.len() < MAX_LINKS
    {
        entry.traceparents.push(traceparent);
    }
    match (entry.tables.as_mut(), notice.tables) {
        (Some(set), Some(tables)) => set.extend(tables),
        _ => entry.tables = None,
    }
}

async fn notify_loop(
    options: PgConnectOptions,
    replica: String,
    mut queue: tokio::sync::mpsc::UnboundedReceiver<Notice>,
    unsent: Arc<AtomicUsize>,
) {
    let mut pool = single_connection(&options, "mana-sync-notifier");
    let mut backoff = Duration::from_millis(100);
    let mut waiting = Merged::new();
    let mut taken = 0;
    loop {
        if waiting.is_empty() {
            match queue.recv().await {
                Some(notice) => {
                    merge(&mut waiting, notice);
                    taken += 1;
                }
                None => return,
            }
        }
        // Everything queued meanwhile goes in the same round trip, merged.
        while let Ok(notice) = queue.try_recv() {
            merge(&mut waiting, notice);
            taken += 1;
        }
        let payloads: Vec<String> = waiting
            .iter()
            .map(|((user_id, app_id, client_id), merging)| {
                payload(&Notice {
                    user_id: user_id.clone(),
                    app_id: app_id.clone(),
                    client_id: client_id.clone(),
                    tables: merging.tables.as_ref().map(|t| t.iter().cloned().collect()),
                    replica: Some(replica.clone()),
                    seq: merging.seq,
                    committed_at: merging.committed_at,
                    traceparent: merging.traceparents.first().cloned(),
                })
            })
            .collect();
        // One NOTIFY for many pushes: linked to each of their traces.
        let span = tracing::info_span!("fanout.notify", notices = taken, payloads = payloads.len());
        for traceparent in waiting.values().flat_map(|m| &m.traceparents).take(MAX_LINKS) {
            telemetry::link_trace(&span, traceparent);
        }
        let sent = tokio::time::timeout(NOTIFY_TIMEOUT, channel::notify_all(&pool, CHANNEL, &payloads))
            .instrument(span)
            .await;
        match sent {
            Ok(Ok(_)) => {
                waiting.clear();
                unsent.fetch_sub(taken, Ordering::SeqCst);
                taken = 0;
                backoff = Duration::from_millis(100);
            }
            failed => {
                let error = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => "timed out".to_owned(),
                };
                tracing::warn!(%error, retry_in = ?backoff, notices = payloads.len(), "NOTIFY failed; retrying on a new connection");
                pool = single_connection(&options, "mana-sync-notifier");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Listens until the process ends, reconnecting with backoff.
pub async fn listen_forever(options: PgConnectOptions, hub: Hub, replica: String) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let pool = single_connection(&options, "mana-sync-listener");
        // It does not reconnect by itself: this loop does, knowing notices may have been lost.
        match channel::listen(&pool, CHANNEL).await {
            Ok(mut listener) => {
                hub.set_listening(true);
                backoff = Duration::from_millis(100);
                // Whatever was published before this LISTEN took effect is
                // lost to this replica: every local socket pulls.
                hub.publish_everything();
                let reason = receive(&mut listener, &hub, &replica).await;
                hub.set_listening(false);
                hub.metrics().listener_reconnected();
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
                match tokio::time::timeout(PING_TIMEOUT, channel::ping_listener(listener)).await {
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
            seq: Some(i64::MAX),
            committed_at: Some(i64::MAX),
            traceparent: Some(format!("00-{}-{}-01", "a".repeat(32), "b".repeat(16))),
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
