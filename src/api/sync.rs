//! `POST /sync/{appId}` and `GET /sync/{appId}/pull`.

use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use poem::web::Data;
use poem::web::sse::Event as SseEvent;
use poem_openapi::OpenApi;
use poem_openapi::param::{Header, Path, Query};
use poem_openapi::payload::{EventStream, Json};
use poem_openapi::types::ToJSON;

use crate::api::ApiTags;
use crate::auth::BearerAuth;
use crate::config::{DEFAULT_PULL_LIMIT, MAX_PULL_LIMIT};
use crate::error::{Error, ErrorResponse};
use crate::idempotency;
use crate::protocol::{PushRequest, SyncResponse};
use crate::startup::AppState;
use crate::stream::{self, ChangeEvent};
use crate::sync::{self, Idempotency};
use crate::timestamp::Timestamp;
use crate::validate::{self, Limits};

pub struct SyncApi;

pub struct StreamApi;

#[OpenApi(tag = "ApiTags::Sync")]
impl SyncApi {
    /// Push a batch of changes
    ///
    /// Records the batch in one transaction (all changes or none; the answer
    /// comes only after commit) and answers with the folded delta of every
    /// table of the app since `since`, this device's own winning writes
    /// included. Field-level last-write-wins: each field keeps the value
    /// with the latest timestamp; timestamps more than `MAX_CLOCK_SKEW` in
    /// the future are clamped to the server's time.
    #[oai(path = "/sync/:appId", method = "post", operation_id = "push")]
    async fn push(
        &self,
        state: Data<&AppState>,
        auth: BearerAuth,
        /// The app (1-128 bytes).
        #[oai(name = "appId")]
        app_id: Path<String>,
        /// The device's id; takes precedence over the body's `clientId`.
        #[oai(name = "X-Client-Id")]
        client_id: Header<Option<String>>,
        /// Optional, chosen by the client, unique per batch (1-256 bytes). A
        /// retry with the same key gets the first answer and records nothing
        /// twice (for `IDEMPOTENCY_TTL`, default 24 h); the same key with
        /// different changes is a 422.
        #[oai(name = "Idempotency-Key")]
        idempotency_key: Header<Option<String>>,
        body: Json<PushRequest>,
    ) -> Result<Json<SyncResponse>, ErrorResponse> {
        let user = auth.0;
        validate::name("appId", &app_id)?;
        tracing::Span::current().record("app_id", app_id.as_str());
        // The fingerprint is taken over the changes as sent: validation
        // fills in receive times, which differ between attempts.
        let key = idempotency_key
            .0
            .map(|key| validate::idempotency_key(&key).map(|()| key))
            .transpose()?;
        let sent_changes = key.as_ref().map(|_| body.changes.to_json().unwrap_or_default());
        let limits = Limits {
            max_changes: state.config.max_batch_changes,
            max_clock_skew: state.config.max_clock_skew,
        };
        let batch = validate::push(client_id.0.as_deref(), body.0, Timestamp::now(), limits)?;
        let idempotency = key.zip(sent_changes).map(|(key, changes)| Idempotency {
            fingerprint: idempotency::fingerprint(&app_id, &batch.client_id, &changes),
            key,
            ttl: state.config.idempotency_ttl,
        });
        let response = sync::push(
            &state.store,
            &state.notifier,
            &state.metrics,
            &user.id,
            &app_id,
            &batch,
            idempotency.as_ref(),
            DEFAULT_PULL_LIMIT,
        )
        .await?;
        Ok(Json(response))
    }

    /// Pull one collection's changes
    ///
    /// The folded delta of one collection since `since`: each record changed
    /// after the cursor once, oldest change first. When `hasMore` is true,
    /// call again with the returned `syncedUntil`.
    #[oai(path = "/sync/:appId/pull", method = "get", operation_id = "pull")]
    async fn pull(
        &self,
        state: Data<&AppState>,
        auth: BearerAuth,
        /// The app (1-128 bytes).
        #[oai(name = "appId")]
        app_id: Path<String>,
        /// The collection (table) to pull.
        collection: Query<String>,
        /// A cursor this server returned, or any RFC 3339 timestamp. Defaults to the beginning.
        since: Query<Option<String>>,
        /// Most records to return: 1 to 5000, default 1000.
        #[oai(validator(minimum(value = "1"), maximum(value = "5000")))]
        limit: Query<Option<u32>>,
    ) -> Result<Json<SyncResponse>, ErrorResponse> {
        let user = auth.0;
        validate::name("appId", &app_id)?;
        tracing::Span::current().record("app_id", app_id.as_str());
        validate::name("collection", &collection)?;
        let since = validate::since(since.0.as_deref())?;
        let limit = limit.0.unwrap_or(DEFAULT_PULL_LIMIT).min(MAX_PULL_LIMIT);
        let response = sync::pull(
            &state.store,
            &state.metrics,
            &user.id,
            &app_id,
            &collection,
            since,
            limit,
        )
        .await?;
        Ok(Json(response))
    }
}

#[OpenApi(tag = "ApiTags::Sync")]
impl StreamApi {
    /// Stream changes as they happen
    ///
    /// Server-Sent Events. First a catch-up: for each collection, `event:
    /// changes` with its folded delta since `since` (several events while
    /// `hasMore`). Then, whenever a push on any replica changes one of the
    /// collections, `event: changes` with the delta since that collection's
    /// previous `syncedUntil`. `event: heartbeat` (data `null`) every 15 s.
    /// To resume after a disconnect, reconnect with the smallest
    /// `syncedUntil` received. The stream ends when the bearer token expires
    /// (reconnect with a fresh one) and with the replica's shutdown.
    #[oai(path = "/sync/:appId/stream", method = "get", operation_id = "stream")]
    async fn stream(
        &self,
        state: Data<&AppState>,
        auth: BearerAuth,
        /// The app (1-128 bytes).
        #[oai(name = "appId")]
        app_id: Path<String>,
        /// Comma-separated collections to follow (at least one).
        collections: Query<String>,
        /// A cursor this server returned, or any RFC 3339 timestamp. Defaults to the beginning.
        since: Query<Option<String>>,
    ) -> Result<EventStream<BoxStream<'static, Option<ChangeEvent>>>, ErrorResponse> {
        let user = auth.0;
        validate::name("appId", &app_id)?;
        tracing::Span::current().record("app_id", app_id.as_str());
        let collections: Vec<String> = collections
            .split(',')
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .map(str::to_owned)
            .collect();
        if collections.is_empty() {
            return Err(Error::invalid("invalid_name", "collections must name at least one collection").into());
        }
        for collection in &collections {
            validate::name("collection", collection)?;
        }
        let since = validate::since(since.0.as_deref())?;
        let subscription = state
            .hub
            .subscribe(&user.id, Some(&app_id), None)
            .map_err(Error::from)?;
        let expires = crate::realtime::expiry(&user);
        let events = stream::changes(
            state.clone(),
            user.id,
            app_id.0,
            collections,
            since,
            subscription,
            expires,
        );
        Ok(EventStream::new(events.boxed()).to_event(|item| match item {
            Some(event) => SseEvent::message(event.to_json_string()).event_type("changes"),
            None => SseEvent::message("null").event_type("heartbeat"),
        }))
    }
}
