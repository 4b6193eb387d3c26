//! The replica's registry of live subscribers (WebSockets and SSE streams)
//! and the fan-out of change notices to them.
//!
//! A notice never waits for a subscriber: it is merged into the
//! subscriber's pending set (the union of tables per app, so a burst of
//! pushes coalesces into one message) and the subscriber's own task is
//! woken to send it. A slow or dead connection therefore delays only
//! itself; its task drops it when a send times out, and the client pulls
//! everything when it reconnects.

mod quiet;
mod tables;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

pub use self::tables::ByApp;

use crate::lifecycle::{Lifecycle, Stage};
use crate::metrics::Metrics;
use crate::telemetry;
use crate::timestamp::Timestamp;

/// Past this many distinct tables pending for one app, a subscriber is
/// simply told "all tables" (bounds the pending set).
const MAX_PENDING_TABLES: usize = 64;

/// What a committed push changed, as carried by NOTIFY between replicas.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notice {
    #[serde(rename = "u")]
    pub user_id: String,
    #[serde(rename = "a")]
    pub app_id: String,
    /// The pushing device, whose own subscribers (when they declared it) are not told.
    #[serde(rename = "c")]
    pub client_id: String,
    /// The tables changed; `None` when too many to list (means "all").
    #[serde(rename = "t")]
    pub tables: Option<Vec<String>>,
    /// The replica that published it (its own listener skips it).
    #[serde(rename = "r", default, skip_serializing_if = "Option::is_none")]
    pub replica: Option<String>,
    /// The push's last log position (absent from replicas of an earlier
    /// release): no table it names changed later than this, as far as it
    /// tells (see `hub::quiet`).
    #[serde(rename = "s", default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<i64>,
    /// When the push committed, in Unix nanoseconds (for the fan-out delay metric).
    #[serde(rename = "at", default, skip_serializing_if = "Option::is_none")]
    pub committed_at: Option<i64>,
    /// The push's W3C `traceparent`, when it is traced: every replica's
    /// fan-out joins the push's trace.
    #[serde(rename = "tp", default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

/// The earlier of two commit times, either of which may be unknown.
pub fn earliest(a: Option<i64>, b: Option<i64>) -> Option<i64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Tables pending for one app: `None` means every table.
pub type Pending = BTreeMap<String, Option<BTreeSet<String>>>;

/// Why a subscription was refused; its message is what the client is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The user already has `MAX_SOCKETS_PER_USER` subscriptions on this replica.
    #[error("too many connections for this user")]
    UserLimit,
    /// The replica already has `MAX_SOCKETS` subscriptions.
    #[error("this replica is full; try another")]
    ServerLimit,
    /// The replica is shutting down.
    #[error("this replica is shutting down; reconnect")]
    ShuttingDown,
}

/// One live subscriber of a user.
pub struct Subscriber {
    id: u64,
    pub user_id: String,
    /// `Some(app)`: only that app's notices; `None`: every app's.
    pub app_id: Option<String>,
    /// The device behind it, if declared: its own pushes are not echoed.
    pub client_id: Option<String>,
    pending: Mutex<Waiting>,
    wake: Notify,
    metrics: Metrics,
}

/// What a subscriber took: the tables per app, and when the oldest of the
/// notices behind them committed.
pub struct Taken {
    pub tables: Pending,
    pub committed_at: Option<i64>,
}

/// What waits for a subscriber: the tables, and when the oldest of the
/// notices behind them committed.
#[derive(Default)]
struct Waiting {
    tables: Pending,
    since: Option<i64>,
}

impl Subscriber {
    /// Waits until something is pending.
    pub async fn changed(&self) {
        self.wake.notified().await;
    }

    /// Takes what is pending (possibly nothing), with the commit time of
    /// the oldest notice behind it (`None` for a catch-up).
    pub fn take(&self) -> Taken {
        let waiting = std::mem::take(&mut *self.pending.lock().expect("pending lock"));
        Taken {
            tables: waiting.tables,
            committed_at: waiting.since,
        }
    }

    /// Counts a message sent for what was taken: the notices behind it
    /// reached the socket (or stream) this long after their commit.
    pub fn sent(&self, taken: &Taken) {
        let delay = taken
            .committed_at
            .map(|at| std::time::Duration::from_nanos(Timestamp::now().0.saturating_sub(at).max(0) as u64));
        self.metrics.notification_sent(delay);
    }

    /// Counts what was taken but could not be sent (the socket is gone or too slow).
    pub fn lost(&self) {
        self.metrics.notification_dropped();
    }

    /// Marks every table of every app this subscriber follows as changed.
    pub fn mark_all(&self) {
        let mut pending = self.pending.lock().expect("pending lock");
        pending.tables.clear();
        pending.tables.insert(self.app_id.clone().unwrap_or_default(), None);
        drop(pending);
        self.wake.notify_one();
    }

    fn mark(&self, notice: &Notice) {
        let mut pending = self.pending.lock().expect("pending lock");
        if pending.tables.contains_key(&notice.app_id) {
            // Merged into a message already waiting: one send for both.
            self.metrics.notification_coalesced();
        }
        pending.since = earliest(pending.since, notice.committed_at);
        let tables = &notice.tables;
        let entry = pending
            .tables
            .entry(notice.app_id.clone())
            .or_insert_with(|| Some(BTreeSet::new()));
        match (entry.as_mut(), tables) {
            (Some(set), Some(tables)) => {
                set.extend(tables.iter().cloned());
                if set.len() > MAX_PENDING_TABLES {
                    *entry = None;
                }
            }
            (Some(_), None) => *entry = None,
            (None, _) => {}
        }
        drop(pending);
        self.wake.notify_one();
    }

    fn wants(&self, notice: &Notice) -> bool {
        self.app_id.as_ref().is_none_or(|app| *app == notice.app_id)
            && self.client_id.as_ref().is_none_or(|client| *client != notice.client_id)
    }
}

/// The registry. Cheap to clone.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Mutex<Registry>,
    /// Taken after `registry` when both are.
    lookups: Mutex<tables::Lookups>,
    /// Taken alone.
    quiet: Mutex<quiet::Quiet>,
    next_id: AtomicU64,
    max_per_user: usize,
    max_total: usize,
    listening: AtomicBool,
    /// Subscribers are refused, and told to close, from its `Closing`.
    lifecycle: Lifecycle,
    metrics: Metrics,
}

/// The subscribers by user, and how many there are in all (counted as
/// they come and go: a replica holding ten thousand users must not count
/// them for every socket it opens).
#[derive(Default)]
struct Registry {
    users: HashMap<String, Vec<Arc<Subscriber>>>,
    total: usize,
}

/// A registration; unregisters itself when dropped.
pub struct Subscription {
    hub: Hub,
    pub subscriber: Arc<Subscriber>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if !self.subscriber.pending.lock().expect("pending lock").tables.is_empty() {
            // Gone with a notice still waiting.
            self.subscriber.lost();
        }
        let mut registry = self.hub.inner.registry.lock().expect("hub lock");
        if let Some(list) = registry.users.get_mut(&self.subscriber.user_id) {
            let before = list.len();
            list.retain(|s| s.id != self.subscriber.id);
            let removed = before - list.len();
            if list.is_empty() {
                registry.users.remove(&self.subscriber.user_id);
                let mut lookups = self.hub.inner.lookups.lock().expect("lookups lock");
                lookups.forget(&self.subscriber.user_id);
            }
            registry.total -= removed;
        }
    }
}

impl Hub {
    pub fn new(max_per_user: usize, max_total: usize, metrics: Metrics, lifecycle: Lifecycle) -> Hub {
        Hub {
            inner: Arc::new(Inner {
                registry: Mutex::new(Registry::default()),
                lookups: Mutex::default(),
                quiet: Mutex::default(),
                next_id: AtomicU64::new(1),
                max_per_user,
                max_total,
                listening: AtomicBool::new(false),
                lifecycle,
                metrics,
            }),
        }
    }

    /// Registers a subscriber of `user_id`, within the limits.
    pub fn subscribe(
        &self,
        user_id: &str,
        app_id: Option<&str>,
        client_id: Option<&str>,
    ) -> Result<Subscription, Refusal> {
        if self.inner.lifecycle.is_closing() {
            return Err(Refusal::ShuttingDown);
        }
        let mut registry = self.inner.registry.lock().expect("hub lock");
        if registry.total >= self.inner.max_total {
            return Err(Refusal::ServerLimit);
        }
        let list = registry.users.entry(user_id.to_owned()).or_default();
        if list.len() >= self.inner.max_per_user {
            return Err(Refusal::UserLimit);
        }
        let subscriber = Arc::new(Subscriber {
            id: self.inner.next_id.fetch_add(1, Ordering::Relaxed),
            user_id: user_id.to_owned(),
            app_id: app_id.map(str::to_owned),
            client_id: client_id.map(str::to_owned),
            pending: Mutex::new(Waiting::default()),
            wake: Notify::new(),
            metrics: self.inner.metrics.clone(),
        });
        list.push(subscriber.clone());
        registry.total += 1;
        Ok(Subscription {
            hub: self.clone(),
            subscriber,
        })
    }

    /// Hands a notice to the user's subscribers on this replica; returns how many.
    pub fn publish(&self, notice: &Notice) -> usize {
        // Before any socket is told, so that the pull it makes sees the change.
        self.inner.quiet.lock().expect("quiet lock").heard(
            &notice.user_id,
            &notice.app_id,
            notice.tables.as_deref(),
            notice.seq,
        );
        let registry = self.inner.registry.lock().expect("hub lock");
        let Some(list) = registry.users.get(&notice.user_id) else {
            return 0; // nobody here to tell: no span either
        };
        // Even when none of them is told (the pushing device's own socket):
        // a later catch-up must name the tables.
        self.inner.lookups.lock().expect("lookups lock").learn(
            &notice.user_id,
            &notice.app_id,
            notice.tables.as_deref(),
        );
        if !list.iter().any(|s| s.wants(notice)) {
            return 0;
        }
        let span = tracing::info_span!("fanout.deliver", app_id = %notice.app_id, told = tracing::field::Empty);
        if let Some(traceparent) = &notice.traceparent {
            telemetry::continue_trace(&span, traceparent);
        }
        let _entered = span.enter();
        let told = list
            .iter()
            .filter(|s| s.wants(notice))
            .inspect(|subscriber| subscriber.mark(notice))
            .count();
        span.record("told", told);
        told
    }

    /// Tells every local subscriber to pull everything: notices may have
    /// been lost (the listener was disconnected).
    pub fn publish_everything(&self) {
        self.inner.quiet.lock().expect("quiet lock").forget_all();
        let registry = self.inner.registry.lock().expect("hub lock");
        self.inner.lookups.lock().expect("lookups lock").forget_all();
        for subscriber in registry.users.values().flatten() {
            subscriber.mark_all();
        }
    }

    /// The tables `user_id` has, by app: what a notice of every table
    /// names. The user's subscribers share one `lookup` (counted in
    /// `table_lookups`): those that ask while it runs await it, those that
    /// ask later reuse its answer until a notice may have added a table
    /// (see [`tables`]). While the listener is down notices may be lost, so
    /// a finished answer is not reused then.
    pub async fn tables<F, Fut, E>(&self, user_id: &str, lookup: F) -> Result<Arc<ByApp>, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<ByApp, E>>,
    {
        let shared = {
            let registry = self.inner.registry.lock().expect("hub lock");
            if registry.users.contains_key(user_id) {
                let mut lookups = self.inner.lookups.lock().expect("lookups lock");
                lookups.get(user_id, !self.is_listening())
            } else {
                // Nobody to share it with, and nobody to forget it when done.
                tables::Lookup::default()
            }
        };
        let answer = shared
            .get_or_try_init(|| async {
                self.inner.metrics.table_lookup();
                lookup().await.map(Arc::new)
            })
            .await?;
        Ok(answer.clone())
    }

    /// (subscriptions, distinct users) on this replica.
    pub fn stats(&self) -> (u64, u64) {
        let registry = self.inner.registry.lock().expect("hub lock");
        (registry.total as u64, registry.users.len() as u64)
    }

    /// The replica's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// Whether this replica's listener currently receives notices.
    pub fn is_listening(&self) -> bool {
        self.inner.listening.load(Ordering::SeqCst)
    }

    pub fn set_listening(&self, listening: bool) {
        self.inner.listening.store(listening, Ordering::SeqCst);
        // Notices may be lost from here (or were, before now).
        self.inner.quiet.lock().expect("quiet lock").forget_all();
    }

    /// Nothing of `table` changed after `since`, as far as this replica
    /// knows from what it heard while listening (see [`quiet`]): a pull
    /// may be answered without the database.
    pub fn is_quiet(&self, user_id: &str, app_id: &str, table: &str, since: i64) -> bool {
        self.is_listening()
            && self
                .inner
                .quiet
                .lock()
                .expect("quiet lock")
                .is_quiet(user_id, app_id, table, since)
    }

    /// What a read about to start must hand back to [`Hub::learned`]:
    /// `None` while not listening (nothing learned then holds).
    pub fn quiet_epoch(&self) -> Option<u64> {
        self.is_listening()
            .then(|| self.inner.quiet.lock().expect("quiet lock").epoch())
    }

    /// A complete read begun in `epoch` found nothing of `table` after `bound`.
    pub fn learned(&self, epoch: u64, user_id: &str, app_id: &str, table: &str, bound: i64) {
        self.inner
            .quiet
            .lock()
            .expect("quiet lock")
            .learned(epoch, user_id, app_id, table, bound);
    }

    /// Resolves once every subscriber is to close (the replica is
    /// shutting down: its lifecycle is `Closing`).
    pub async fn closing(&self) {
        self.inner.lifecycle.reached(Stage::Closing).await;
    }
}

#[cfg(test)]
mod tests;
