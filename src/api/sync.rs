//! `POST /sync/{appId}` (push) and `GET /sync/{appId}/pull` (pull).

use poem::Request;
use poem::web::Data;
use poem_openapi::param::{Header, Path, Query};
use poem_openapi::payload::Json;
use poem_openapi::types::ToJSON;
use poem_openapi::{ApiResponse, OpenApi};

use crate::api::ApiTags;
use crate::api::auth::BearerAuth;
use crate::api::error::{ErrorBody, operation_errors};
use crate::api::serialized::Serialized;
use crate::error::{Error, ErrorCode};
use crate::idempotency;
use crate::protocol::{DEFAULT_PULL_LIMIT, HeaderId, Key, MAX_PULL_LIMIT, Name, PushRequest, Since, SyncResponse};
use crate::quota::Quotas;
use crate::state::AppState;
use crate::sync::{self, Idempotency};
use crate::validate::{self, Limits};

pub struct SyncApi;

/// Refuses a header that is not printable ASCII: poem-openapi would take
/// it as absent, and a client id or idempotency key must never be lost
/// quietly.
fn readable_header(request: &Request, name: &str, code: ErrorCode) -> Result<(), Error> {
    match request.headers().get(name).map(|value| value.to_str()) {
        Some(Err(_)) => Err(Error::invalid(code, format!("{name} must be printable ASCII"))),
        _ => Ok(()),
    }
}

/// Why a push was refused.
#[derive(Debug, ApiResponse)]
pub enum PushError {
    /// The request is malformed: bad JSON, wrong types, an unknown `op`, an
    /// empty, oversized or non-printable name, a NUL character, a bad
    /// timestamp or cursor, a missing client id or a bad `Idempotency-Key`.
    #[oai(status = 400)]
    BadRequest(Json<ErrorBody>),
    /// The bearer token is missing, malformed, expired, or not signed by a key of the JWKS.
    #[oai(status = 401)]
    Unauthorized(Json<ErrorBody>),
    /// The body is over the size limit (10 MB) or the batch has more than
    /// `MAX_BATCH_CHANGES` changes.
    #[oai(status = 413)]
    PayloadTooLarge(Json<ErrorBody>),
    /// The body stopped arriving for `BODY_TIMEOUT`, or came slower than
    /// `BODY_MIN_RATE` bytes a second. Nothing was recorded.
    #[oai(status = 408)]
    RequestTimeout(Json<ErrorBody>),
    /// The body is not `application/json`.
    #[oai(status = 415)]
    UnsupportedMediaType(Json<ErrorBody>),
    /// The `Idempotency-Key` was already used for a different request
    /// (`idempotency_key_reused`), or the push would take the user over a
    /// storage quota, named by its code: `quota_records`
    /// (`MAX_RECORDS_PER_USER` records stored), `quota_bytes`
    /// (`MAX_BYTES_PER_USER` bytes of records stored) or `quota_fields`
    /// (`MAX_FIELDS_PER_RECORD` fields in one record). Nothing was
    /// recorded. A batch that only deletes records that exist is never
    /// refused by a quota, nor is a push that does not grow what the limit
    /// counts.
    #[oai(status = 422)]
    Unprocessable(Json<ErrorBody>),
    /// Too many pushes or bytes from this user: a push over `PUSH_RATE`
    /// waits for its turn, and is refused only when it waited
    /// `LOCK_TIMEOUT` in vain, or `PUSH_BYTES_RATE` would make it wait
    /// more than 10 s (`rate_limited`); too many of the user's requests in flight or bytes
    /// of bodies arriving at once (`MAX_REQUESTS_PER_USER`,
    /// `BODY_BUDGET_PER_USER`: `too_many_requests`), or the server is
    /// overloaded: this push waited longer than `LOCK_TIMEOUT` for its
    /// turn, or every database connection stayed in use (`busy`). Nothing
    /// was recorded; retry after the given seconds.
    #[oai(status = 429)]
    TooManyRequests(Json<ErrorBody>, #[oai(header = "Retry-After")] u32),
    /// A server fault; details are in the server's log, never in the response.
    #[oai(status = 500)]
    Internal(Json<ErrorBody>),
    /// The database cannot be reached (`unavailable`) or is out of disk
    /// space or memory (`storage_exhausted`), or the replica holds as many
    /// request bodies, or answers its clients have not yet taken, as its
    /// `BODY_BUDGET` and `ANSWER_BUDGET` allow (`overloaded`). Nothing was
    /// recorded; retry after the given seconds.
    #[oai(status = 503)]
    ServiceUnavailable(Json<ErrorBody>, #[oai(header = "Retry-After")] u32),
}

operation_errors!(PushError, PayloadTooLarge, RequestTimeout, Unprocessable);

/// Why a pull was refused.
#[derive(Debug, ApiResponse)]
pub enum PullError {
    /// A bad `appId`, `collection`, `since` or `limit`.
    #[oai(status = 400)]
    BadRequest(Json<ErrorBody>),
    /// The bearer token is missing, malformed, expired, or not signed by a key of the JWKS.
    #[oai(status = 401)]
    Unauthorized(Json<ErrorBody>),
    /// Too many pulls from this user (a pull over `PULL_RATE` waits for
    /// its turn, up to 10 s: `rate_limited`), too
    /// many of the user's requests in flight (`MAX_REQUESTS_PER_USER`:
    /// `too_many_requests`), or the server is overloaded (every database
    /// connection stayed in use: `busy`); retry after the given seconds.
    #[oai(status = 429)]
    TooManyRequests(Json<ErrorBody>, #[oai(header = "Retry-After")] u32),
    /// A server fault; details are in the server's log, never in the response.
    #[oai(status = 500)]
    Internal(Json<ErrorBody>),
    /// The database cannot be reached, or the replica holds as many
    /// answers its clients have not yet taken as `ANSWER_BUDGET` allows;
    /// retry after the given seconds.
    #[oai(status = 503)]
    ServiceUnavailable(Json<ErrorBody>, #[oai(header = "Retry-After")] u32),
}

operation_errors!(PullError);

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
    #[allow(clippy::too_many_arguments)] // each is a part of the request the spec declares
    async fn push(
        &self,
        state: Data<&AppState>,
        auth: BearerAuth,
        /// The app.
        #[oai(name = "appId")]
        app_id: Path<Name>,
        /// The device's id; takes precedence over the body's `clientId`.
        #[oai(name = "X-Client-Id")]
        client_id: Header<Option<HeaderId>>,
        /// Optional, chosen by the client, unique per batch. A
        /// retry with the same key records nothing twice (for
        /// `IDEMPOTENCY_TTL`, default 24 h, among the user's last
        /// `IDEMPOTENCY_MAX_KEYS` keys) and is answered with everything
        /// since its `since`, the batch's changes included; the same key
        /// with different changes is a 422.
        #[oai(name = "Idempotency-Key")]
        idempotency_key: Header<Option<Key>>,
        body: Json<PushRequest>,
        request: &Request,
    ) -> Result<Serialized<SyncResponse>, PushError> {
        // Its rate was checked before its body was read (`api::gate`).
        let user = auth.0;
        for (name, code) in [
            ("X-Client-Id", ErrorCode::InvalidName),
            ("Idempotency-Key", ErrorCode::InvalidIdempotencyKey),
        ] {
            readable_header(request, name, code)?;
        }
        let app_id = String::from(app_id.0);
        validate::name("appId", &app_id)?;
        tracing::Span::current().record("app_id", app_id.as_str());
        // The fingerprint is taken over the changes as sent: validation
        // fills in receive times, which differ between attempts.
        let key = idempotency_key
            .0
            .map(|key| validate::idempotency_key(&key).map(|()| String::from(key)))
            .transpose()?;
        let sent_changes = key.as_ref().map(|_| body.changes.to_json().unwrap_or_default());
        let limits = Limits {
            max_changes: state.config.max_batch_changes,
            max_clock_skew: state.config.max_clock_skew,
        };
        let batch = validate::push(client_id.0.as_deref(), body.0, state.clock.now(), limits)?;
        let idempotency = key.zip(sent_changes).map(|(key, changes)| Idempotency {
            fingerprint: idempotency::fingerprint(&app_id, &batch.client_id, &changes),
            key,
            ttl: state.config.idempotency_ttl,
            max_keys: state.config.idempotency_max_keys,
        });
        let pushed = sync::push(
            &state.store,
            &state.notifier,
            &state.metrics,
            &Quotas::of(&state.config),
            &user.id,
            &app_id,
            &batch,
            idempotency.as_ref(),
            DEFAULT_PULL_LIMIT,
        )
        .await;
        Ok(Serialized(state.store.exhaustion().note(pushed)?))
    }

    /// Pull one collection's changes
    ///
    /// The folded delta of one collection since `since`: each record changed
    /// after the cursor once, oldest change first. When `hasMore` is true,
    /// call again with the returned `syncedUntil`. A device that has pushed
    /// in the later form (`schemaVersion`, or a field's `at`) and names
    /// itself in `X-Client-Id` is not sent the fields it wrote itself that
    /// still win; every other device is.
    #[oai(path = "/sync/:appId/pull", method = "get", operation_id = "pull")]
    #[allow(clippy::too_many_arguments)] // each is a part of the request the spec declares
    async fn pull(
        &self,
        state: Data<&AppState>,
        auth: BearerAuth,
        /// The app.
        #[oai(name = "appId")]
        app_id: Path<Name>,
        /// The collection (table) to pull.
        collection: Query<Name>,
        /// A cursor this server returned, or any RFC 3339 timestamp. Defaults to the beginning.
        since: Query<Option<Since>>,
        /// Most records to return: 1 to 5000, default 1000.
        #[oai(validator(minimum(value = "1"), maximum(value = "5000")))]
        limit: Query<Option<u32>>,
        /// The device's id, as it sends it with its pushes.
        #[oai(name = "X-Client-Id")]
        client_id: Header<Option<HeaderId>>,
        request: &Request,
    ) -> Result<Serialized<SyncResponse>, PullError> {
        // Its rate was waited for before it ran (`api::gate`).
        let user = auth.0;
        readable_header(request, "X-Client-Id", ErrorCode::InvalidName)?;
        let asking = client_id.0.as_deref().filter(|c| !c.is_empty());
        if let Some(asking) = asking {
            validate::id("X-Client-Id", asking)?;
        }
        let app_id = String::from(app_id.0);
        validate::name("appId", &app_id)?;
        tracing::Span::current().record("app_id", app_id.as_str());
        validate::name("collection", &collection)?;
        let since = validate::since(since.0.as_deref())?;
        let limit = limit.0.unwrap_or(DEFAULT_PULL_LIMIT).min(MAX_PULL_LIMIT);
        let pull = sync::Pull {
            user_id: &user.id,
            app_id: &app_id,
            table: &collection,
            since,
            limit,
            asking,
        };
        let response = sync::pull(&state.store, &state.metrics, &state.hub, pull).await?;
        Ok(Serialized(response))
    }
}
