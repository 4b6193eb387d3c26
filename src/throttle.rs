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

/// Longest a pull waits for its user's rate before it is refused: today's
/// web client polls every few seconds, and a pull held back that long is
/// answered before its next one.
pub const MAX_PULL_WAIT: Duration = Duration::from_secs(10);

/// Most a waiter's wake-up is spread by.
const MAX_JITTER: Duration = Duration::from_millis(20);

type KeyedLimiter = DefaultKeyedRateLimiter<String>;

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

    fn limiter(&self, action: Action) -> Option<&KeyedLimiter> {
        match action {
            Action::Push => self.push.as_deref(),
            Action::Pull => self.pull.as_deref(),
            Action::Open => self.open.as_deref(),
        }
    }

    /// Takes a token for `user_id`'s `action`, or says how long to wait
    /// ([`Error::RateLimited`]).
    pub fn check(&self, action: Action, user_id: &str) -> Result<(), Error> {
        let Some(limiter) = self.limiter(action) else {
            return Ok(());
        };
        limiter.check_key(&user_id.to_owned()).map_err(|not_until| {
            self.metrics.throttled(action.label());
            Error::RateLimited(not_until.wait_time_from(DefaultClock::default().now()))
        })
    }

    /// Takes a token for `user_id`'s `action`, waiting for it up to
    /// `bound`: an honest client's burst over the rate is slowed down, not
    /// refused (a refusal strands an old client's changes); only a request
    /// that waited `bound` in vain is [`Error::RateLimited`].
    pub async fn wait(&self, action: Action, user_id: &str, bound: Duration) -> Result<(), Error> {
        match self.limiter(action) {
            Some(limiter) => {
                self.take(limiter, user_id, NonZeroU32::MIN, bound, action.label())
                    .await
            }
            None => Ok(()),
        }
    }

    /// Takes `bytes` of `user_id`'s push rate (`PUSH_BYTES_RATE`), waiting
    /// for them up to [`MAX_PUSH_BYTES_WAIT`]; a push that would wait
    /// longer is [`Error::RateLimited`].
    pub async fn push_bytes(&self, user_id: &str, bytes: usize) -> Result<(), Error> {
        let (Some(limiter), Some(n)) = (&self.push_bytes, NonZeroU32::new(bytes.min(MAX_BODY_BYTES) as u32)) else {
            return Ok(());
        };
        self.take(limiter, user_id, n, MAX_PUSH_BYTES_WAIT, "push_bytes").await
    }

    /// Waits until `n` tokens of `user_id`'s bucket are free and takes
    /// them, for at most `bound`: refused at once when the bucket alone
    /// would keep it waiting longer, else after `bound` in vain (other
    /// requests of the user took the tokens first). Waiters wake with a
    /// little jitter, so a burst's requests do not all retry in the same
    /// instant.
    async fn take(
        &self,
        limiter: &KeyedLimiter,
        user_id: &str,
        n: NonZeroU32,
        bound: Duration,
        label: &'static str,
    ) -> Result<(), Error> {
        let key = user_id.to_owned();
        let refused = |wait| {
            self.metrics.throttled(label);
            Err(Error::RateLimited(wait))
        };
        // Never over capacity: every bucket holds at least the largest `n`.
        let Ok(Err(not_until)) = limiter.check_key_n(&key, n) else {
            return Ok(());
        };
        let wait = not_until.wait_time_from(DefaultClock::default().now());
        if wait > bound {
            return refused(wait);
        }
        let jitter = governor::Jitter::up_to(MAX_JITTER);
        match tokio::time::timeout(bound, limiter.until_key_n_ready_with_jitter(&key, n, jitter)).await {
            Ok(_) => Ok(()),
            Err(_) => match limiter.check_key_n(&key, n) {
                Ok(Err(not_until)) => refused(not_until.wait_time_from(DefaultClock::default().now())),
                // Free just now: taken.
                _ => Ok(()),
            },
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
