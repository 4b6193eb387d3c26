//! Prometheus metrics, served at `GET /metrics` in the text format.
//!
//! One [`Metrics`] per server (no global registry), so tests and several
//! servers in one process each count their own. Gauges that describe
//! current state (sockets, users, pool connections) are read when scraped.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: String,
    route: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActionLabels {
    action: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabels {
    limit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolLabels {
    state: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Latencies from 0.25 ms to ~16 s.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_25, 2.0, 17))
}

/// The server's metrics. Cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    request_duration: HistogramFamily<RequestLabels>,
    changes_appended: Counter,
    records_pulled: Counter,
    quiet_pulls: Counter,
    idempotent_replays: Counter,
    outcomes_swept: Counter,
    quota_refusals: Family<LimitLabels, Counter>,
    jwt_failures: Family<ReasonLabels, Counter>,
    connections_refused: Family<ReasonLabels, Counter>,
    requests_shed: Family<ReasonLabels, Counter>,
    throttled: Family<ActionLabels, Counter>,
    connections: Gauge,
    users_connected: Gauge,
    notifications_sent: Counter,
    notifications_coalesced: Counter,
    notifications_dropped: Counter,
    listener_reconnects: Counter,
    table_lookups: Counter,
    stream_reads: Counter,
    fanout_delay: Histogram,
    pool_connections: Family<PoolLabels, Gauge>,
    answer_bytes: Gauge,
    clock_offset: Gauge<f64, std::sync::atomic::AtomicU64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut inner = Inner {
            registry: Registry::with_prefix("mana_sync"),
            requests: Family::default(),
            request_duration: Family::new_with_constructor(latency_histogram),
            changes_appended: Counter::default(),
            records_pulled: Counter::default(),
            quiet_pulls: Counter::default(),
            idempotent_replays: Counter::default(),
            outcomes_swept: Counter::default(),
            quota_refusals: Family::default(),
            jwt_failures: Family::default(),
            connections_refused: Family::default(),
            requests_shed: Family::default(),
            throttled: Family::default(),
            connections: Gauge::default(),
            users_connected: Gauge::default(),
            notifications_sent: Counter::default(),
            notifications_coalesced: Counter::default(),
            notifications_dropped: Counter::default(),
            listener_reconnects: Counter::default(),
            table_lookups: Counter::default(),
            stream_reads: Counter::default(),
            fanout_delay: latency_histogram(),
            pool_connections: Family::default(),
            answer_bytes: Gauge::default(),
            clock_offset: Gauge::default(),
        };
        let registry = &mut inner.registry;
        registry.register(
            "http_requests",
            "HTTP requests by method, route and status",
            inner.requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "HTTP request latency by method, route and status",
            inner.request_duration.clone(),
        );
        registry.register(
            "changes_appended",
            "Changes appended to the change log",
            inner.changes_appended.clone(),
        );
        registry.register(
            "records_pulled",
            "Records returned by pulls, pushes and change streams",
            inner.records_pulled.clone(),
        );
        registry.register(
            "quiet_pulls",
            "Pulls answered without the database: nothing of their collection changed since their cursor, as far as the replica heard",
            inner.quiet_pulls.clone(),
        );
        registry.register(
            "idempotent_replays",
            "Pushes answered from a stored outcome (retries under an Idempotency-Key)",
            inner.idempotent_replays.clone(),
        );
        registry.register(
            "idempotency_outcomes_swept",
            "Expired idempotency outcomes deleted by this replica's sweep",
            inner.outcomes_swept.clone(),
        );
        registry.register(
            "quota_refusals",
            "Pushes refused by a storage quota, by limit (records, bytes, fields)",
            inner.quota_refusals.clone(),
        );
        registry.register("jwt_failures", "Refused tokens by reason", inner.jwt_failures.clone());
        registry.register(
            "connections_refused",
            "TCP connections closed at once, by the limit they met (replica, address)",
            inner.connections_refused.clone(),
        );
        registry.register(
            "throttled",
            "Requests and socket opens refused by a user's rate limit, by action (push, pull, open)",
            inner.throttled.clone(),
        );
        registry.register(
            "requests_shed",
            "Requests refused for the replica's or the user's budgets, by reason (body_budget, answer_budget: 503; user_body_budget, user_requests: 429; slow_body: 408)",
            inner.requests_shed.clone(),
        );
        // The seed's names, kept for its dashboards.
        registry.register(
            "connections_total",
            "Open WebSockets and change streams on this replica",
            inner.connections.clone(),
        );
        registry.register(
            "users_connected",
            "Distinct users with an open WebSocket or change stream on this replica",
            inner.users_connected.clone(),
        );
        registry.register(
            "notifications_sent",
            "Messages sent to sockets (sync-available, catch-ups included) and notices taken by change streams",
            inner.notifications_sent.clone(),
        );
        registry.register(
            "notifications_coalesced",
            "Change notices merged into a message already waiting for the same socket and app",
            inner.notifications_coalesced.clone(),
        );
        registry.register(
            "notifications_dropped",
            "Messages lost with a socket that was gone or too slow to take them",
            inner.notifications_dropped.clone(),
        );
        registry.register(
            "listener_reconnects",
            "Times the cross-replica change listener reconnected",
            inner.listener_reconnects.clone(),
        );
        registry.register(
            "table_lookups",
            "Reads of a user's tables for a notice of every table (one at a time per user and replica, shared by the user's sockets)",
            inner.table_lookups.clone(),
        );
        registry.register(
            "stream_reads",
            "Reads of a change stream's due collections (one statement in one transaction each)",
            inner.stream_reads.clone(),
        );
        registry.register(
            "fanout_delay_seconds",
            "Time from a push's commit to the message sent for it to a socket or stream (any replica)",
            inner.fanout_delay.clone(),
        );
        registry.register(
            "db_pool_connections",
            "Database pool connections by state (in_use, idle)",
            inner.pool_connections.clone(),
        );
        registry.register(
            "answer_bytes_held",
            "Bytes of answers built and not yet taken by their clients (bounded by ANSWER_BUDGET)",
            inner.answer_bytes.clone(),
        );
        registry.register(
            "clock_offset_seconds",
            "How far this host's clock is behind the database's (negative: ahead); corrected, but past 1 s the host's time keeping is broken",
            inner.clock_offset.clone(),
        );
        Metrics { inner: Arc::new(inner) }
    }

    /// Bytes of answers held grew (or shrank, when negative) by `delta`.
    pub fn answer_bytes_held(&self, delta: i64) {
        self.inner.answer_bytes.inc_by(delta);
    }

    /// A request answered.
    pub fn request(&self, method: &str, route: &str, status: u16, elapsed: Duration) {
        let labels = RequestLabels {
            method: method.to_owned(),
            route: route.to_owned(),
            status,
        };
        self.inner
            .request_duration
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
        self.inner.requests.get_or_create(&labels).inc();
    }

    pub fn changes_appended(&self, n: usize) {
        self.inner.changes_appended.inc_by(n as u64);
    }

    /// A pull answered without the database: its collection was quiet.
    pub fn quiet_pull(&self) {
        self.inner.quiet_pulls.inc();
    }

    pub fn records_pulled(&self, n: usize) {
        self.inner.records_pulled.inc_by(n as u64);
    }

    pub fn idempotent_replay(&self) {
        self.inner.idempotent_replays.inc();
    }

    pub fn outcomes_swept(&self, n: u64) {
        self.inner.outcomes_swept.inc_by(n);
    }

    /// A push refused by a quota: `limit` is `records`, `bytes` or `fields`.
    pub fn quota_refused(&self, limit: &'static str) {
        self.inner.quota_refusals.get_or_create(&LimitLabels { limit }).inc();
    }

    pub fn jwt_failure(&self, reason: &'static str) {
        self.inner.jwt_failures.get_or_create(&ReasonLabels { reason }).inc();
    }

    /// A connection closed at once: `reason` is the limit it met.
    pub fn connection_refused(&self, reason: &'static str) {
        self.inner
            .connections_refused
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// A request or socket refused by its user's rate limit.
    pub fn throttled(&self, action: &'static str) {
        self.inner.throttled.get_or_create(&ActionLabels { action }).inc();
    }

    /// A request refused while its body was read.
    pub fn request_shed(&self, reason: &'static str) {
        self.inner.requests_shed.get_or_create(&ReasonLabels { reason }).inc();
    }

    /// A notice handed to a socket or stream, `delay` after its commit.
    pub fn notification_sent(&self, delay: Option<Duration>) {
        self.inner.notifications_sent.inc();
        if let Some(delay) = delay {
            self.inner.fanout_delay.observe(delay.as_secs_f64());
        }
    }

    pub fn notification_coalesced(&self) {
        self.inner.notifications_coalesced.inc();
    }

    pub fn notification_dropped(&self) {
        self.inner.notifications_dropped.inc();
    }

    pub fn table_lookup(&self) {
        self.inner.table_lookups.inc();
    }

    pub fn stream_read(&self) {
        self.inner.stream_reads.inc();
    }

    pub fn listener_reconnected(&self) {
        self.inner.listener_reconnects.inc();
    }

    /// The text exposition, with the current sockets, users, pool state
    /// and clock offset (in nanoseconds).
    pub fn render(&self, (connections, users): (u64, u64), (in_use, idle): (u32, u32), clock_offset: i64) -> String {
        let inner = &self.inner;
        inner.clock_offset.set(clock_offset as f64 / 1e9);
        inner.connections.set(connections as i64);
        inner.users_connected.set(users as i64);
        inner
            .pool_connections
            .get_or_create(&PoolLabels { state: "in_use" })
            .set(in_use.into());
        inner
            .pool_connections
            .get_or_create(&PoolLabels { state: "idle" })
            .set(idle.into());
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &inner.registry)
            .expect("writing to a String cannot fail");
        text
    }
}
