//! Running the server: the HTTP application and the background tasks
//! beside it, until the shutdown its lifecycle drives (`lifecycle`).

use std::future::Future;

use anyhow::Context;

use crate::state::AppState;
use crate::{api, fanout, sync};

/// Serves on `listener` until `shutdown` resolves, then shuts down as
/// [`Lifecycle::shut_down`](crate::lifecycle::Lifecycle::shut_down) orders
/// it: drains for `SHUTDOWN_DRAIN` (cut short when `hurry` resolves),
/// closes sockets, lets in-flight requests finish (up to
/// `SHUTDOWN_TIMEOUT`), and stops the background tasks.
pub async fn serve(
    state: AppState,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()>,
    hurry: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let addr = listener.local_addr().context("listener has no address")?;
    let state = fit_connections_to_open_files(state, raise_open_files_limit());
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
    let (hub, notifier, lifecycle) = (state.hub.clone(), state.notifier.clone(), state.lifecycle.clone());
    let drain = state.config.shutdown_drain;
    tracing::info!(%addr, "mana-sync listening");
    // The server returns once it has stopped accepting; the shutdown once
    // the connections it accepted have ended and the last words are out.
    let serving = api::serve(state, listener);
    let shutting = lifecycle.shut_down(shutdown, hurry, drain, timeout, || {
        hub.stats().0 == 0 && notifier.unsent() == 0
    });
    tokio::pin!(serving, shutting);
    let (result, shut) = tokio::select! {
        result = &mut serving => (result, false),
        () = &mut shutting => (serving.await, true),
    };
    // A server that failed before it was told to stop waits for no signal.
    if !shut && (result.is_ok() || lifecycle.is_closing()) {
        shutting.await;
    }
    for task in background {
        task.abort();
    }
    result
}

/// Raises the soft limit on open files to the hard one, and returns it:
/// every connection holds a descriptor, and the soft limit is often as
/// low as 1,024.
fn raise_open_files_limit() -> Option<u64> {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => {
            tracing::debug!(limit, "open files limit");
            Some(limit)
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not raise the open files limit");
            None
        }
    }
}

/// Descriptors kept for what is not a client's connection: the database
/// pool, the listener, the notifier, JWKS fetches, files.
const RESERVED_DESCRIPTORS: u64 = 64;

/// Lowers `MAX_CONNECTIONS` to what the open files limit allows (see
/// [`fitted_connections`]), saying so.
fn fit_connections_to_open_files(mut state: AppState, open_files: Option<u64>) -> AppState {
    let Some(open_files) = open_files else { return state };
    let config = &state.config;
    let fitted = fitted_connections(config.max_connections, config.database_max_connections, open_files);
    if fitted < config.max_connections {
        tracing::warn!(
            max_connections = config.max_connections,
            open_files,
            fitted,
            "MAX_CONNECTIONS is more than the open files limit allows: lowered (raise the limit, e.g. LimitNOFILE or ulimit -n)"
        );
        let mut config = (**config).clone();
        config.max_connections = fitted;
        state.config = std::sync::Arc::new(config);
    }
    state
}

/// The most client connections `open_files` descriptors allow, with the
/// database pool's and [`RESERVED_DESCRIPTORS`] kept aside, and at most
/// `max_connections`: past the limit, accepting fails (the listener backs
/// off) while the database pool and JWKS fetches fail too; under it, a
/// connection over the cap is closed at once and everything else goes on.
fn fitted_connections(max_connections: usize, pool: u32, open_files: u64) -> usize {
    let room = open_files.saturating_sub(RESERVED_DESCRIPTORS + u64::from(pool));
    max_connections.min(usize::try_from(room).unwrap_or(usize::MAX).max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_fit_the_descriptors_left_over() {
        assert_eq!(fitted_connections(10_000, 20, 1_048_576), 10_000);
        assert_eq!(fitted_connections(10_000, 20, 1024), 1024 - 64 - 20);
        assert_eq!(fitted_connections(10_000, 20, 64), 1, "one, rather than none");
    }
}
