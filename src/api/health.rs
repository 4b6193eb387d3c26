//! `GET /health`: liveness in the seed's JSON shape, plus a database check.

use poem::web::Data;
use poem_openapi::payload::Json;
use poem_openapi::{Object, OpenApi};

use crate::api::ApiTags;
use crate::startup::AppState;
use crate::timestamp::Timestamp;

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
            timestamp: Timestamp::now().to_short_string(),
            connections,
            users,
            database: if database_ok { "ok" } else { "unreachable" }.to_owned(),
            store: state.store.kind().to_owned(),
            listener: if listening { "listening" } else { "reconnecting" }.to_owned(),
        })
    }
}
