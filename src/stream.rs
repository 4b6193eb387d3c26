//! The change stream behind `GET /sync/{appId}/stream` (Server-Sent Events):
//! a catch-up of each collection's folded delta since the cursor, then new
//! deltas as they are committed on any replica (the hub wakes it), each
//! event carrying its collection's `syncedUntil` so a reconnecting client
//! resumes without a gap, and a heartbeat at least every 30 s. The stream
//! ends when the bearer token expires (reconnect with a fresh one) or the
//! replica shuts down.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use futures_util::Stream;
use poem_openapi::Object;

use crate::config::DEFAULT_PULL_LIMIT;
use crate::cursor::Cursor;
use crate::hub::Subscription;
use crate::protocol::ServerChange;
use crate::startup::AppState;
use crate::sync;

/// How often a quiet stream sends `event: heartbeat`.
pub const HEARTBEAT: Duration = Duration::from_secs(15);

/// `event: changes`: one collection's folded delta.
#[derive(Debug, Clone, Object)]
#[oai(rename_all = "camelCase")]
pub struct ChangeEvent {
    /// The collection.
    pub table: String,
    /// Each record of it changed after the previous event's cursor.
    pub changes: Vec<ServerChange>,
    /// Resume from here (per collection).
    pub synced_until: String,
    /// More is coming at once in further events.
    pub has_more: bool,
}

struct State {
    app: AppState,
    user_id: String,
    app_id: String,
    cursors: BTreeMap<String, Cursor>,
    /// Collections with changes to send.
    due: VecDeque<String>,
    subscription: Subscription,
    heartbeat: tokio::time::Interval,
    /// When the bearer token expires: the stream ends then.
    expires: tokio::time::Instant,
}

/// The stream of events: `Some` is `event: changes`, `None` a heartbeat.
/// It ends when the replica shuts down or the database fails.
pub fn changes(
    app: AppState,
    user_id: String,
    app_id: String,
    collections: Vec<String>,
    since: Cursor,
    subscription: Subscription,
    expires: tokio::time::Instant,
) -> impl Stream<Item = Option<ChangeEvent>> + Send + 'static {
    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    heartbeat.reset();
    let state = State {
        app,
        user_id,
        app_id,
        cursors: collections.iter().map(|c| (c.clone(), since)).collect(),
        due: collections.into_iter().collect(),
        subscription,
        heartbeat,
        expires,
    };
    futures_util::stream::unfold(state, |mut st| async move {
        loop {
            if st.app.hub.is_closing() || tokio::time::Instant::now() >= st.expires {
                return None;
            }
            if let Some(table) = st.due.pop_front() {
                let cursor = st.cursors[&table];
                let page = match sync::pull(
                    &st.app.store,
                    &st.app.metrics,
                    &st.user_id,
                    &st.app_id,
                    &table,
                    cursor,
                    DEFAULT_PULL_LIMIT,
                )
                .await
                {
                    Ok(page) => page,
                    Err(e) => {
                        tracing::error!(error = ?e, "change stream failed; closing it");
                        return None;
                    }
                };
                st.cursors
                    .insert(table.clone(), Cursor::parse(&page.synced_until).unwrap_or(cursor));
                if page.has_more {
                    st.due.push_front(table.clone());
                }
                let event = ChangeEvent {
                    table,
                    changes: page.server_changes,
                    synced_until: page.synced_until,
                    has_more: page.has_more,
                };
                return Some((Some(event), st));
            }
            tokio::select! {
                _ = st.app.hub.closing() => return None,
                _ = tokio::time::sleep_until(st.expires) => return None,
                _ = st.heartbeat.tick() => return Some((None, st)),
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
