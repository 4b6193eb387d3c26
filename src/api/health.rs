//! `GET /health`: liveness in the seed's JSON shape, plus a database check;
//! `GET /ready`: readiness for load balancers; `GET /metrics`: Prometheus.

use poem::web::Data;
use poem_openapi::payload::{Json, PlainText};
use poem_openapi::{ApiResponse, Object, OpenApi};

use crate::api::ApiTags;
use crate::state::AppState;

pub struct HealthApi;

/// Liveness and connection statistics.
#[derive(Debug, Object)]
pub struct Health {
    /// `ok`, or `degraded` when the database does not answer or the
    /// replica's change listener is reconnecting (notifications from other
    /// replicas may be missed meanwhile).
    pub status: String,
    /// Always `mana-sync`.
    pub service: String,
    /// The server's time (RFC 3339).
    pub timestamp: String,
    /// Open WebSocket connections on this replica.
    pub connections: u64,
    /// Distinct users with an open WebSocket on this replica.
    pub users: u64,
    /// `ok` or `unreachable`.
    pub database: String,
    /// The store: `postgres`, or `sqlite` (a single process).
    pub store: String,
    /// `listening`, or `reconnecting` while the change listener is down
    /// (always `listening` on `sqlite`, whose fan-out is in-process).
    pub listener: String,
}

/// Whether this replica should receive traffic.
#[derive(Debug, Object)]
pub struct Readiness {
    /// `ready` or `not_ready`.
    pub status: String,
    /// Why not, when not: `shutting down`, `database unreachable`,
    /// `database out of disk space or memory` (a write was refused for it
    /// in the last 30 s), `change listener reconnecting`.
    #[oai(skip_serializing_if_is_none)]
    pub reason: Option<String>,
}

#[derive(ApiResponse)]
pub enum ReadyResponse {
    /// The database answers and the change listener listens.
    #[oai(status = 200)]
    Ready(Json<Readiness>),
    /// Not ready; `reason` says why.
    #[oai(status = 503)]
    NotReady(Json<Readiness>),
}

#[derive(ApiResponse)]
pub enum MetricsResponse {
    /// The Prometheus text format, version 0.0.4.
    #[oai(status = 200, content_type = "text/plain; version=0.0.4; charset=utf-8")]
    Ok(PlainText<String>),
}

#[OpenApi(tag = "ApiTags::Health")]
impl HealthApi {
    /// Liveness
    ///
    /// Always 200 while the process serves requests (so an orchestrator
    /// does not restart replicas for a database outage); `status` and
    /// `database` tell whether the database answers.
    #[oai(path = "/health", method = "get", operation_id = "health")]
    async fn health(&self, state: Data<&AppState>) -> Json<Health> {
        let database_ok = state.store.ping().await;
        let (connections, users) = state.hub.stats();
        let listening = state.hub.is_listening();
        Json(Health {
            status: if database_ok && listening { "ok" } else { "degraded" }.to_owned(),
            service: "mana-sync".to_owned(),
            timestamp: state.clock.now().to_short_string(),
            connections,
            users,
            database: if database_ok { "ok" } else { "unreachable" }.to_owned(),
            store: state.store.kind().to_owned(),
            listener: if listening { "listening" } else { "reconnecting" }.to_owned(),
        })
    }

    /// Readiness
    ///
    /// 200 when the database answers (and has not refused a write for want
    /// of disk space or memory in the last 30 s) and the change listener
    /// listens (so this replica both serves requests and hears other
    /// replicas' pushes);
    /// 503 with the reason otherwise, and from the moment the replica is
    /// told to stop (while it still serves for `SHUTDOWN_DRAIN`). For load
    /// balancers and Kubernetes.
    #[oai(path = "/ready", method = "get", operation_id = "ready")]
    async fn ready(&self, state: Data<&AppState>) -> ReadyResponse {
        let reason = if state.lifecycle.is_draining() {
            Some("shutting down")
        } else if !state.store.ping().await {
            Some("database unreachable")
        } else if state.store.exhaustion().recent() {
            Some("database out of disk space or memory")
        } else if !state.hub.is_listening() {
            Some("change listener reconnecting")
        } else {
            None
        };
        match reason {
            None => ReadyResponse::Ready(Json(Readiness {
                status: "ready".to_owned(),
                reason: None,
            })),
            Some(reason) => ReadyResponse::NotReady(Json(Readiness {
                status: "not_ready".to_owned(),
                reason: Some(reason.to_owned()),
            })),
        }
    }

    /// Prometheus metrics
    ///
    /// This replica's metrics in the Prometheus text format: requests by
    /// route and status, changes appended, records pulled, idempotent
    /// replays, token refusals, sockets and users, notifications, listener
    /// reconnects, fan-out delay and database pool connections.
    #[oai(path = "/metrics", method = "get", operation_id = "metrics")]
    async fn metrics(&self, state: Data<&AppState>) -> MetricsResponse {
        MetricsResponse::Ok(PlainText(state.metrics.render(
            state.hub.stats(),
            state.store.pool_stats(),
            state.clock.offset_nanos(),
        )))
    }
}
