//! The sweep of expired idempotency outcomes, of every user, which every
//! replica runs: an account that stops pushing keeps none for longer than
//! `IDEMPOTENCY_TTL` and one `IDEMPOTENCY_SWEEP_INTERVAL`.

use std::time::Duration;

use crate::error::Result;
use crate::metrics::Metrics;
use crate::store::Store;

/// Outcomes deleted per statement: each is a short transaction, so the
/// sweep never holds many row locks, nor a PostgreSQL connection for long.
const BATCH: i64 = 1000;

/// Sweeps every `every`, from one `every` after now, for ever.
pub fn spawn(store: Store, metrics: Metrics, ttl: Duration, every: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            match sweep(&store, &metrics, ttl).await {
                Ok(0) => {}
                Ok(swept) => tracing::debug!(swept, "expired idempotency outcomes swept"),
                // An outage: the next sweep catches up.
                Err(e) => tracing::warn!(error = %e, "the sweep of expired idempotency outcomes failed"),
            }
        }
    })
}

/// Deletes every outcome older than `ttl`, in batches; returns how many.
pub async fn sweep(store: &Store, metrics: &Metrics, ttl: Duration) -> Result<u64> {
    let mut total = 0;
    loop {
        let swept = store.sweep_outcomes(ttl, BATCH).await?;
        metrics.outcomes_swept(swept);
        total += swept;
        if swept < BATCH as u64 {
            return Ok(total);
        }
        tokio::task::yield_now().await;
    }
}
