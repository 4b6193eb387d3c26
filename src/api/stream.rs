//! `GET /sync/{appId}/stream`: Server-Sent Events. A catch-up of each
//! collection's folded delta since the cursor, then new deltas as they are
//! committed on any replica (the hub wakes the stream), each event
//! carrying its collection's `syncedUntil` so a reconnecting client
//! resumes without a gap, and a heartbeat every 15 s ([`HEARTBEAT`]). The
//! stream ends when the bearer token expires (reconnect with a
//! fresh one) or the replica shuts down.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use poem::web::Data;
use poem_openapi::param::{Path, Query};
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, OpenApi};

use crate::api::ApiTags;
use crate::api::auth::BearerAuth;
use crate::api::error::{Answer, ErrorBody, operation_errors};
use crate::api::sse::{ChangeStream, StreamEvent};
use crate::cursor::Cursor;
use crate::error::Error;
use crate::hub::Subscription;
use crate::protocol::{ChangeEvent, DEFAULT_PULL_LIMIT, Name, NameList, Since};
use crate::state::AppState;
use crate::throttle::Action;
use crate::{sync, validate};

pub struct StreamApi;

/// Why a change stream was refused.
#[derive(Debug, ApiResponse)]
pub enum StreamError {
    /// A bad `appId`, `collections` (or more than 100) or `since`.
    #[oai(status = 400)]
    BadRequest(Json<ErrorBody>),
    /// The bearer token is missing, malformed, expired, or not signed by a key of the JWKS.
    #[oai(status = 401)]
    Unauthorized(Json<ErrorBody>),
    /// The user opened too many streams and sockets lately (`OPEN_RATE`),
    /// the user or the replica has as many as allowed
    /// (`MAX_SOCKETS_PER_USER`, `MAX_SOCKETS`), or the replica is shutting
    /// down; retry after the given seconds.
    #[oai(status = 429)]
    TooManyRequests(Json<ErrorBody>, #[oai(header = "Retry-After")] u32),
    /// A server fault; details are in the server's log, never in the response.
    #[oai(status = 500)]
    Internal(Json<ErrorBody>),
    /// The database cannot be reached; retry after the given seconds.
    #[oai(status = 503)]
    ServiceUnavailable(Json<ErrorBody>, #[oai(header = "Retry-After")] u32),
}

operation_errors!(StreamError);

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
        /// The app.
        #[oai(name = "appId")]
        app_id: Path<Name>,
        /// The collections to follow, comma-separated (`todos,lists`).
        collections: Query<NameList>,
        /// A cursor this server returned, or any RFC 3339 timestamp. Defaults to the beginning.
        since: Query<Option<Since>>,
    ) -> Result<ChangeStream, StreamError> {
        let user = auth.0;
        state.throttle.check(Action::Open, &user.id)?;
        let app_id = String::from(app_id.0);
        validate::name("appId", &app_id)?;
        tracing::Span::current().record("app_id", app_id.as_str());
        let collections = validate::collections(collections.0.0)?;
        let since = validate::since(since.0.as_deref())?;
        let subscription = state
            .hub
            .subscribe(&user.id, Some(&app_id), None)
            .map_err(Answer::from)?;
        let expires = user.expiry();
        let events = changes(
            state.clone(),
            user.id,
            app_id,
            collections,
            since,
            subscription,
            expires,
        );
        Ok(ChangeStream(events.boxed()))
    }
}

/// How often a quiet stream sends `event: heartbeat`.
pub const HEARTBEAT: Duration = Duration::from_secs(15);

struct State {
    app: AppState,
    user_id: String,
    app_id: String,
    cursors: BTreeMap<String, Cursor>,
    /// Collections with changes to send.
    due: VecDeque<String>,
    /// Events read and not yet sent.
    ready: VecDeque<ChangeEvent>,
    subscription: Subscription,
    heartbeat: tokio::time::Interval,
    /// When the bearer token expires: the stream ends then.
    expires: tokio::time::Instant,
}

/// Reads the due collections, as many as fit a page, in one statement
/// and one transaction, and queues their events; the others stay due. A
/// collection with more to read is due again after them.
async fn read_due(st: &mut State) -> crate::error::Result<()> {
    let due: Vec<(String, Cursor)> = st
        .due
        .drain(..)
        .map(|t| {
            let cursor = st.cursors[&t];
            (t, cursor)
        })
        .collect();
    st.app.metrics.stream_read();
    let pages = sync::pull_each(
        &st.app.store,
        &st.app.metrics,
        &st.user_id,
        &st.app_id,
        &due,
        DEFAULT_PULL_LIMIT,
        // A stream names no device: it is sent every device's writes.
        None,
    )
    .await?;
    let read = pages.len();
    let mut more = Vec::new();
    for (table, page) in pages {
        let cursor = st.cursors[&table];
        st.cursors
            .insert(table.clone(), Cursor::parse(&page.synced_until).unwrap_or(cursor));
        if page.has_more {
            more.push(table.clone());
        }
        st.ready.push_back(ChangeEvent {
            table,
            changes: page.server_changes,
            synced_until: page.synced_until,
            has_more: page.has_more,
        });
    }
    st.due.extend(due.into_iter().skip(read).map(|(t, _)| t));
    st.due.extend(more);
    Ok(())
}

/// The stream of events. It ends when the replica shuts down or the database fails.
fn changes(
    app: AppState,
    user_id: String,
    app_id: String,
    collections: Vec<String>,
    since: Cursor,
    subscription: Subscription,
    expires: tokio::time::Instant,
) -> impl Stream<Item = StreamEvent> + Send + 'static {
    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    heartbeat.reset();
    let state = State {
        app,
        user_id,
        app_id,
        cursors: collections.iter().map(|c| (c.clone(), since)).collect(),
        due: collections.into_iter().collect(),
        ready: VecDeque::new(),
        subscription,
        heartbeat,
        expires,
    };
    futures_util::stream::unfold(state, |mut st| async move {
        loop {
            if st.app.lifecycle.is_closing() || tokio::time::Instant::now() >= st.expires {
                return None;
            }
            if let Some(event) = st.ready.pop_front() {
                return Some((StreamEvent::Changes(event), st));
            }
            if !st.due.is_empty() {
                // Every read counts against the user's pull rate; over it,
                // the stream waits for the bucket rather than failing.
                if let Err(Error::RateLimited(wait)) = st.app.throttle.check(Action::Pull, &st.user_id) {
                    tokio::select! {
                        _ = st.app.hub.closing() => return None,
                        _ = tokio::time::sleep_until(st.expires) => return None,
                        _ = tokio::time::sleep(wait) => continue,
                    }
                }
                if let Err(e) = read_due(&mut st).await {
                    tracing::error!(error = ?e, "change stream failed; closing it");
                    return None;
                }
                continue;
            }
            tokio::select! {
                _ = st.app.hub.closing() => return None,
                _ = tokio::time::sleep_until(st.expires) => return None,
                _ = st.heartbeat.tick() => return Some((StreamEvent::Heartbeat, st)),
                _ = st.subscription.subscriber.changed() => {
                    let taken = st.subscription.subscriber.take();
                    if !taken.tables.is_empty() {
                        // The stream pulls what the notice names and sends it next.
                        st.subscription.subscriber.sent(&taken);
                    }
                    for (app, tables) in taken.tables {
                        if app != st.app_id && !app.is_empty() {
                            continue;
                        }
                        for table in st.cursors.keys() {
                            let named = tables.as_ref().is_none_or(|t| t.contains(table));
                            if named && !st.due.contains(table) {
                                st.due.push_back(table.clone());
                            }
                        }
                    }
                }
            }
        }
    })
}
