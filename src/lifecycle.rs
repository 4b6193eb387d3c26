//! The server's life from its first signal to its exit, in one place.
//!
//! A replica told to stop (SIGTERM or SIGINT) goes through its
//! [`Stage`]s in order, driven by [`Lifecycle::shut_down`]:
//!
//! 1. **Draining**: `/ready` answers 503 while the replica still serves
//!    everything, for `SHUTDOWN_DRAIN`, so that a balancer polling it
//!    sends it no new clients. A second signal cuts this short.
//! 2. **Closing**: no connection is accepted any more; every WebSocket and
//!    change stream is closed (1012, "reconnect": clients go to another
//!    replica) and no new one is opened; each connection finishes the
//!    request it is serving, then closes.
//! 3. **Cut off**, if requests are still in flight after
//!    `SHUTDOWN_TIMEOUT`: their connections are ended.
//! 4. The last words: the sockets' close frames, and the notices of the
//!    last pushes to the other replicas, get up to 5 s more; then the
//!    background tasks stop and the process exits.
//!
//! Everything that acts on shutdown watches the one [`Lifecycle`]: the hub
//! (refuses and closes subscribers), `/ready`, and the HTTP server (stops
//! accepting, closes connections). This module knows nothing of them.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

/// Where the replica is in its life; each stage follows the one before.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    Serving,
    /// Told to stop: still serving, but `/ready` answers 503.
    Draining,
    /// Accepting nothing new; closing sockets; finishing requests in flight.
    Closing,
    /// The grace period for requests in flight is over: connections end now.
    CutOff,
}

/// The replica's stage, and its open connections, shared by all that
/// acts on shutdown. Cheap to clone.
#[derive(Clone)]
pub struct Lifecycle {
    stage: Arc<watch::Sender<Stage>>,
    connections: Arc<watch::Sender<usize>>,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Lifecycle::new()
    }
}

impl Lifecycle {
    pub fn new() -> Lifecycle {
        Lifecycle {
            stage: Arc::new(watch::channel(Stage::Serving).0),
            connections: Arc::new(watch::channel(0).0),
        }
    }

    pub fn stage(&self) -> Stage {
        *self.stage.borrow()
    }

    /// Whether the replica is on its way out (`/ready` answers 503).
    pub fn is_draining(&self) -> bool {
        self.stage() >= Stage::Draining
    }

    /// Whether sockets and streams are being closed (a new one is refused).
    pub fn is_closing(&self) -> bool {
        self.stage() >= Stage::Closing
    }

    /// Resolves once the replica has reached `stage` (at once if it has).
    pub async fn reached(&self, stage: Stage) {
        let mut watching = self.stage.subscribe();
        let _ = watching.wait_for(|now| *now >= stage).await;
    }

    /// Moves on to `stage`; never back. [`Lifecycle::shut_down`] is what
    /// moves a serving replica; this is for what stops otherwise.
    pub fn advance(&self, stage: Stage) {
        self.stage.send_if_modified(|now| {
            let later = stage > *now;
            if later {
                *now = stage;
            }
            later
        });
    }

    /// Counts an accepted connection until the guard is dropped: shutdown
    /// waits for these to finish.
    pub fn connection(&self) -> Connection {
        self.connections.send_modify(|n| *n += 1);
        Connection(self.connections.clone())
    }

    /// Shuts the replica down, in the order of the module's docs: from
    /// `stop` (the first signal) through the drain (`drain`, or until
    /// `hurry`, the second signal) and the close, to the end of the
    /// requests in flight (`grace` at most), and then waits up to 5 s more
    /// (at most `grace`) for `quiet` (sockets closed, notices sent).
    pub async fn shut_down(
        &self,
        stop: impl Future<Output = ()>,
        hurry: impl Future<Output = ()>,
        drain: Duration,
        grace: Duration,
        quiet: impl Fn() -> bool,
    ) {
        stop.await;
        self.advance(Stage::Draining);
        if !drain.is_zero() {
            tracing::info!(?drain, "draining: /ready answers 503 while this replica still serves");
            tokio::select! {
                () = tokio::time::sleep(drain) => {}
                () = hurry => tracing::info!("asked again: the drain ends now"),
            }
        }
        self.advance(Stage::Closing);
        let mut open = self.connections.subscribe();
        if tokio::time::timeout(grace, open.wait_for(|n| *n == 0)).await.is_err() {
            tracing::warn!(
                ?grace,
                "requests still in flight at the end of the grace period were cut off"
            );
            self.advance(Stage::CutOff);
        }
        // Upgraded sockets are not connections in flight: wait for their
        // close frames, and for the last pushes' notices.
        let deadline = tokio::time::Instant::now() + grace.min(LAST_WORDS);
        while !quiet() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// The longest wait for the last words after requests have finished.
const LAST_WORDS: Duration = Duration::from_secs(5);

/// An open connection, counted by its [`Lifecycle`] until dropped.
pub struct Connection(Arc<watch::Sender<usize>>);

impl Drop for Connection {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

/// SIGINT and SIGTERM, counted: the first asks for a graceful shutdown,
/// a second cuts its drain short. The handlers are installed when this is
/// made, not when first awaited: a SIGTERM that comes as soon as the
/// server answers (an orchestrator stopping a pod it just started) must
/// still shut it down gracefully, not kill it.
#[derive(Clone)]
pub struct Signals(watch::Receiver<u32>);

impl Signals {
    /// Installs the handlers (in a task of the current runtime).
    pub fn install() -> Signals {
        #[cfg(unix)]
        let mut signals = {
            use tokio::signal::unix::{SignalKind, signal};
            [SignalKind::interrupt(), SignalKind::terminate()].map(|kind| signal(kind).ok())
        };
        let (count, counted) = watch::channel(0);
        tokio::spawn(async move {
            loop {
                #[cfg(unix)]
                {
                    let [interrupt, terminate] = &mut signals;
                    tokio::select! {
                        _ = received(interrupt.as_mut()) => {},
                        _ = received(terminate.as_mut()) => {},
                    }
                }
                #[cfg(not(unix))]
                let _ = tokio::signal::ctrl_c().await;
                count.send_modify(|n| *n += 1);
                tracing::info!(signals = *count.borrow(), "shutdown signal received");
            }
        });
        Signals(counted)
    }

    /// Resolves once `n` signals have come.
    pub fn nth(&self, n: u32) -> impl Future<Output = ()> + use<> {
        let mut counted = self.0.clone();
        async move {
            let _ = counted.wait_for(|count| *count >= n).await;
        }
    }
}

/// The next delivery of `signal` (never, if its handler could not be installed).
#[cfg(unix)]
async fn received(signal: Option<&mut tokio::signal::unix::Signal>) {
    match signal {
        Some(signal) => {
            signal.recv().await;
        }
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quiet() -> bool {
        true
    }

    #[tokio::test]
    async fn the_stages_follow_each_other_and_wait_for_connections() {
        let life = Lifecycle::new();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let connection = life.connection();
        let shutting = tokio::spawn({
            let life = life.clone();
            async move {
                let stop = async {
                    let _ = stopped.await;
                };
                let drain = Duration::from_millis(10);
                life.shut_down(stop, std::future::pending(), drain, Duration::from_secs(600), quiet)
                    .await
            }
        });
        tokio::task::yield_now().await;
        assert_eq!(life.stage(), Stage::Serving);
        stop.send(()).unwrap();
        life.reached(Stage::Draining).await;
        life.reached(Stage::Closing).await;
        assert!(life.is_draining() && life.is_closing());
        assert!(!shutting.is_finished(), "a connection is still open");
        drop(connection);
        shutting.await.unwrap();
        assert_eq!(life.stage(), Stage::Closing, "nothing was cut off");
    }

    #[tokio::test]
    async fn a_second_signal_ends_the_drain_and_the_grace_period_ends_requests() {
        let life = Lifecycle::new();
        let _held = life.connection();
        // An hour's drain, ended by the second signal; a request that
        // never ends, cut off after the grace period. The timeout only
        // keeps a broken shutdown from hanging the test.
        let shutting = life.shut_down(
            std::future::ready(()),
            std::future::ready(()),
            Duration::from_secs(3600),
            Duration::from_millis(50),
            quiet,
        );
        tokio::time::timeout(Duration::from_secs(60), shutting)
            .await
            .expect("the shutdown ended");
        assert_eq!(life.stage(), Stage::CutOff);
    }

    #[tokio::test]
    async fn a_stage_never_goes_back() {
        let life = Lifecycle::new();
        life.advance(Stage::Closing);
        life.advance(Stage::Draining);
        assert_eq!(life.stage(), Stage::Closing);
        life.reached(Stage::Draining).await;
    }
}
