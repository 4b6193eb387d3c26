//! Whether PostgreSQL can be reached, as a probe sees it every second.
//!
//! While it cannot, requests are answered at once (503, retry shortly)
//! rather than each waiting for a connection that will not come, and a
//! request already waiting is let go as soon as the probe sees the
//! outage. The replica listens from its first moment whatever the
//! database's state: it migrates and starts serving as soon as the
//! database answers, and serves again within a second of its return.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use sqlx::{ConnectOptions, Connection, PgConnection, PgPool};
use tokio::sync::watch;

use super::sql;
use crate::clock::Clock;
use crate::timestamp::Timestamp;

/// How often the database is probed.
const PROBE_EVERY: Duration = Duration::from_secs(1);
/// Longest a probe (connecting included) may take before it counts as failed.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Failed probes in a row before the database counts as down: one slow
/// answer under load is not an outage.
const FAILURES_TO_DOWN: u32 = 2;

/// What the probe last saw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// Not reached yet since start-up, or migrations pending.
    Starting,
    Up,
    Down,
}

/// The database's [`Status`], shared by every clone. Cheap to clone.
#[derive(Clone)]
pub struct Availability {
    status: Arc<watch::Sender<Status>>,
}

impl Default for Availability {
    fn default() -> Self {
        Availability {
            status: Arc::new(watch::Sender::new(Status::Starting)),
        }
    }
}

impl Availability {
    pub fn status(&self) -> Status {
        *self.status.borrow()
    }

    /// Resolves once the database is not (or no longer) up.
    pub async fn lost(&self) {
        let mut status = self.status.subscribe();
        let _ = status.wait_for(|s| *s != Status::Up).await;
    }

    /// Records what was seen, logging each change.
    pub fn set(&self, new: Status) {
        let old = self.status.send_replace(new);
        match (old, new) {
            (Status::Down, Status::Up) => tracing::info!("the database answers again"),
            (Status::Up, Status::Down) => {
                tracing::error!("the database does not answer: requests get 503 until it does")
            }
            _ => {}
        }
    }
}

/// Waits for the database and migrates it (retrying every second at most),
/// then probes it every [`PROBE_EVERY`], for as long as it runs; each
/// probe reads the database's clock too, to keep `clock` to it.
pub async fn watch(pool: PgPool, availability: Availability, clock: Clock) {
    let mut delay = Duration::from_millis(250);
    loop {
        match super::migrate(&pool).await {
            Ok(()) => break,
            Err(e) => {
                tracing::warn!(error = format!("{e:#}"), retry_in = ?delay, "the database is not ready; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(PROBE_EVERY);
            }
        }
    }
    availability.set(Status::Up);
    let options = pool
        .connect_options()
        .as_ref()
        .clone()
        .application_name("mana-sync probe");
    let mut connection: Option<PgConnection> = None;
    let mut failures = 0;
    loop {
        tokio::time::sleep(PROBE_EVERY).await;
        // Boxed as `Send` here: inside a spawned task the compiler cannot
        // prove it of sqlx's connect future otherwise.
        let probe: BoxFuture<'_, sqlx::Result<()>> = Box::pin(async {
            if connection.is_none() {
                connection = Some(options.connect().await?);
            }
            let sent = Timestamp::now();
            let theirs = sql::database_time(connection.as_mut().expect("connected just above")).await?;
            clock.measured(sent, theirs, Timestamp::now());
            Ok(())
        });
        match tokio::time::timeout(PROBE_TIMEOUT, probe).await {
            Ok(Ok(())) => {
                failures = 0;
                availability.set(Status::Up);
            }
            _ => {
                if let Some(lost) = connection.take() {
                    let _ = tokio::time::timeout(PROBE_TIMEOUT, lost.close()).await;
                }
                failures += 1;
                if failures >= FAILURES_TO_DOWN {
                    availability.set(Status::Down);
                }
            }
        }
    }
}
