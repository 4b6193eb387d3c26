//! Per-user rate limits on this replica: a token bucket (governor's GCRA)
//! per user for pushes, pulls, and opening streams and sockets.
//!
//! The rates are generous: an honest app never meets them, while a
//! runaway tab (the original engine pulls every few milliseconds when an
//! app leaves out `pullInterval`) is held to them without slowing anyone
//! else. Each bucket holds five seconds' worth, so a burst after a
//! reconnect passes. The limits are per replica: behind a load balancer
//! spreading one user over `n` replicas, that user gets up to `n` times
//! the rate.

use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::config::Config;
use crate::error::Error;
use crate::metrics::Metrics;
use crate::protocol::MAX_BODY_BYTES;

/// What a user does that is rate-limited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Push,
    Pull,
    /// Opening a change stream or a WebSocket.
    Open,
}

impl Action {
    fn label(self) -> &'static str {
        match self {
            Action::Push => "push",
            Action::Pull => "pull",
            Action::Open => "open",
        }
    }
}

/// The replica's per-user buckets. Cheap to clone.
#[derive(Clone)]
pub struct Throttle {
    push: Option<std::sync::Arc<DefaultKeyedRateLimiter<String>>>,
    pull: Option<std::sync::Arc<DefaultKeyedRateLimiter<String>>>,
    open: Option<std::sync::Arc<DefaultKeyedRateLimiter<String>>>,
    /// Bytes of push bodies.
    push_bytes: Option<std::sync::Arc<DefaultKeyedRateLimiter<String>>>,
    metrics: Metrics,
}

/// Longest a push waits for its bytes to fit its user's rate before it is
/// refused: an honest client's burst is slowed, not refused.
pub const MAX_PUSH_BYTES_WAIT: Duration = Duration::from_secs(10);

/// A keyed limiter of `per_second` a user, with five seconds' burst; none for 0.
fn limiter(per_second: u32) -> Option<std::sync::Arc<DefaultKeyedRateLimiter<String>>> {
    let rate = NonZeroU32::new(per_second)?;
    let burst = NonZeroU32::new(per_second.saturating_mul(5)).unwrap_or(rate);
    Some(std::sync::Arc::new(RateLimiter::keyed(
        Quota::per_second(rate).allow_burst(burst),
    )))
}

impl Throttle {
    pub fn new(config: &Config, metrics: Metrics) -> Throttle {
        Throttle {
            push: limiter(config.push_rate),
            pull: limiter(config.pull_rate),
            open: limiter(config.open_rate),
            push_bytes: NonZeroU32::new(config.push_bytes_rate).map(|rate| {
                // The bucket holds five seconds' worth, and at least one
                // body of the largest size, which could never pass otherwise.
                let burst = rate.saturating_mul(NonZeroU32::new(5).expect("5 is not 0"));
                let body = NonZeroU32::new(MAX_BODY_BYTES as u32).expect("the body limit is not 0");
                std::sync::Arc::new(RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst.max(body))))
            }),
            metrics,
        }
    }

    /// Takes a token for `user_id`'s `action`, or says how long to wait
    /// ([`Error::RateLimited`]).
    pub fn check(&self, action: Action, user_id: &str) -> Result<(), Error> {
        let limiter = match action {
            Action::Push => &self.push,
            Action::Pull => &self.pull,
            Action::Open => &self.open,
        };
        let Some(limiter) = limiter else {
            return Ok(());
        };
        limiter.check_key(&user_id.to_owned()).map_err(|not_until| {
            self.metrics.throttled(action.label());
            Error::RateLimited(not_until.wait_time_from(DefaultClock::default().now()))
        })
    }

    /// Takes `bytes` of `user_id`'s push rate (`PUSH_BYTES_RATE`), waiting
    /// for them up to [`MAX_PUSH_BYTES_WAIT`]; a push that would wait
    /// longer is [`Error::RateLimited`].
    pub async fn push_bytes(&self, user_id: &str, bytes: usize) -> Result<(), Error> {
        let (Some(limiter), Some(n)) = (&self.push_bytes, NonZeroU32::new(bytes.min(MAX_BODY_BYTES) as u32)) else {
            return Ok(());
        };
        let key = user_id.to_owned();
        let deadline = tokio::time::Instant::now() + MAX_PUSH_BYTES_WAIT;
        loop {
            // Never over capacity: the bucket holds a body of the largest size.
            let Ok(Err(not_until)) = limiter.check_key_n(&key, n) else {
                return Ok(());
            };
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            if tokio::time::Instant::now() + wait > deadline {
                self.metrics.throttled("push_bytes");
                return Err(Error::RateLimited(wait));
            }
            tokio::time::sleep(wait).await;
        }
    }

    /// Forgets, every minute, the users whose buckets are full again, so
    /// memory follows the users active in the last few seconds.
    pub fn spawn_pruning(&self) -> tokio::task::JoinHandle<()> {
        let limiters: Vec<_> = [&self.push, &self.pull, &self.open, &self.push_bytes]
            .into_iter()
            .flatten()
            .cloned()
            .collect();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(60));
            loop {
                every.tick().await;
                for limiter in &limiters {
                    limiter.retain_recent();
                    limiter.shrink_to_fit();
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn throttle(vars: &[(&str, &str)]) -> Throttle {
        let config =
            Config::from_lookup(|name| vars.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string())).unwrap();
        Throttle::new(&config, Metrics::new())
    }

    #[test]
    fn a_user_gets_five_seconds_of_burst_then_waits_and_others_are_untouched() {
        let throttle = throttle(&[("PULL_RATE", "2")]);
        for _ in 0..10 {
            throttle.check(Action::Pull, "alice").unwrap();
        }
        match throttle.check(Action::Pull, "alice") {
            Err(Error::RateLimited(wait)) => assert!(wait <= Duration::from_millis(500), "{wait:?}"),
            other => panic!("the eleventh pull in a row is limited: {other:?}"),
        }
        throttle.check(Action::Pull, "bob").unwrap();
        throttle.check(Action::Push, "alice").unwrap();
    }

    #[test]
    fn a_rate_of_zero_is_no_limit() {
        let throttle = throttle(&[("PUSH_RATE", "0")]);
        for _ in 0..10_000 {
            throttle.check(Action::Push, "alice").unwrap();
        }
    }
}
