//! Running the server: the HTTP application, the background tasks beside
//! it, and the order of things at shutdown.

use std::future::Future;
use std::time::Duration;

use anyhow::Context;

use crate::state::AppState;
use crate::{api, fanout, sync};

/// Serves on `listener` until `shutdown` resolves, then drains for
/// `SHUTDOWN_DRAIN` (cut short when `hurry` resolves) and lets in-flight
/// requests finish (up to `SHUTDOWN_TIMEOUT`).
pub async fn serve(
    state: AppState,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()>,
    hurry: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let addr = listener.local_addr().context("listener has no address")?;
    raise_open_files_limit();
    let timeout = state.config.shutdown_timeout;
    let mut background = vec![
        state.auth.spawn_refresh(state.config.jwks_refresh),
        state.throttle.spawn_pruning(),
        sync::sweep::spawn(
            state.store.clone(),
            state.metrics.clone(),
            state.config.idempotency_ttl,
            state.config.idempotency_sweep_interval,
        ),
    ];
    match state.store.notify_options() {
        Some(options) => background.push(tokio::spawn(fanout::listen_forever(
            options,
            state.hub.clone(),
            state.notifier.replica().to_owned(),
        ))),
        // One process: its hub hears every push, nothing to listen to.
        None => state.hub.set_listening(true),
    }
    let (hub, notifier) = (state.hub.clone(), state.notifier.clone());
    let closing = hub.clone();
    let drain = state.config.shutdown_drain;
    // On shutdown, `/ready` turns 503 first, and the replica goes on
    // serving for `drain`, so that a balancer polling it sends it no new
    // clients; then sockets and streams are closed (1012), so clients
    // reconnect to another replica, and in-flight requests finish.
    let shutdown = async move {
        shutdown.await;
        closing.drain();
        if !drain.is_zero() {
            tracing::info!(?drain, "draining: /ready answers 503 while this replica still serves");
            tokio::select! {
                () = tokio::time::sleep(drain) => {}
                () = hurry => tracing::info!("asked again: the drain ends now"),
            }
        }
        closing.close_all();
    };
    tracing::info!(%addr, "mana-sync listening");
    let result = api::serve(state, listener, shutdown, timeout).await;
    // Upgraded sockets are not in-flight requests: wait for their close
    // frames; and let the last pushes' notices reach the other replicas.
    let last_words = timeout.min(Duration::from_secs(5));
    settle(last_words, || hub.stats().0 == 0).await;
    settle(last_words, || notifier.unsent() == 0).await;
    for task in background {
        task.abort();
    }
    result
}

/// Raises the soft limit on open files to the hard one: every connection
/// holds a descriptor, and the soft limit is often as low as 1,024.
fn raise_open_files_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::debug!(limit, "open files limit"),
        Err(e) => tracing::warn!(error = %e, "could not raise the open files limit"),
    }
}

/// Waits until `done` holds, checking every 10 ms, for at most `limit`.
async fn settle(limit: Duration, done: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !done() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
