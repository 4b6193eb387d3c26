//! How many pushes arriving at once each store takes before it refuses the
//! first (a 429), with the default `LOCK_TIMEOUT` and pool, next to the old
//! default of 5 s. The original client retries a refused push only on its
//! next edit, so every refusal strands a device's changes: a store should
//! make pushes wait their turn and refuse only when truly overloaded.
//!
//! A burst is N pushes of one change each, sent at once on N connections:
//! first all of one user (on PostgreSQL they queue on that user's clock
//! row; on SQLite every push queues for the one writer), then each of a
//! user of its own. N doubles until the first refusal or `--max` (default
//! 4096). Then one user's burst of `--max`/4 with pushes of `--max`/16
//! other users in the middle of it: whether they wait for it. Last, 64
//! devices of one user pushing 5 batches each at once, with every limit
//! at its default. Server, client and database share the machine.
//!
//! `cargo bench --bench absorb` runs it in full (set `TEST_DATABASE_URL` to
//! a PostgreSQL with `fsync` on for production figures: the self-started
//! one runs with `fsync=off`); under `cargo test` it makes one tiny burst
//! per store as a smoke test.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::app::{APP, Backend, Postgres, START, Sqlite, TestApp, insert, push_body};
use serde_json::json;

/// Every per-user limit at its default ("" is the default): the tests'
/// configuration turns them off.
const DEFAULT_LIMITS: [(&str, &str); 6] = [
    ("PUSH_RATE", ""),
    ("PUSH_BYTES_RATE", ""),
    ("PULL_RATE", ""),
    ("MAX_REQUESTS_PER_USER", ""),
    ("ANSWER_BUDGET_PER_USER", ""),
    ("DATABASE_MAX_CONNECTIONS", ""),
];

/// What one burst came to.
struct Burst {
    accepted: usize,
    refused: usize,
    /// Anything else: a failure, never expected.
    failed: usize,
    slowest: Duration,
    elapsed: Duration,
}

/// `n` pushes at once, by one user or by a user each.
async fn burst(app: &TestApp, round: usize, n: usize, one_user: bool) -> Burst {
    let requests: Vec<_> = (0..n)
        .map(|i| {
            let user = if one_user {
                format!("burst-{round}")
            } else {
                format!("burst-{round}-{i}")
            };
            let body = push_body(
                "d",
                START,
                json!([insert("todos", &format!("r{i}"), json!({ "n": i }))]),
            );
            app.http
                .post(app.url(&format!("/sync/{APP}")))
                .bearer_auth(common::tokens::token_for(&user))
                .header("X-Client-Id", "d")
                .json(&body)
        })
        .collect();
    let started = Instant::now();
    let answers = futures_util::future::join_all(requests.into_iter().map(|request| async move {
        let sent = Instant::now();
        let status = request.send().await.map(|r| r.status());
        (status, sent.elapsed())
    }))
    .await;
    let mut failures = std::collections::BTreeMap::<String, usize>::new();
    let mut outcome = Burst {
        accepted: 0,
        refused: 0,
        failed: 0,
        slowest: Duration::ZERO,
        elapsed: started.elapsed(),
    };
    for (status, took) in answers {
        outcome.slowest = outcome.slowest.max(took);
        match status {
            Ok(s) if s.is_success() => outcome.accepted += 1,
            Ok(s) if s.as_u16() == 429 => outcome.refused += 1,
            other => {
                outcome.failed += 1;
                *failures.entry(format!("{other:?}")).or_default() += 1;
            }
        }
    }
    if !failures.is_empty() {
        println!("  failures: {failures:?}");
    }
    outcome
}

/// Doubles the burst until the first refusal; returns the largest burst
/// taken whole.
async fn ramp(store: Backend, lock_timeout: &str, one_user: bool, max: usize, round: &mut usize) -> usize {
    // The defaults but for LOCK_TIMEOUT ("" is the default), pool included.
    let mut settings = DEFAULT_LIMITS.to_vec();
    settings.push(("LOCK_TIMEOUT", lock_timeout));
    let app = store.spawn_with(&settings).await;
    let label = format!(
        "{store:?}, LOCK_TIMEOUT={}, {}",
        humantime::format_duration(app.config.lock_timeout),
        if one_user { "one user" } else { "a user each" }
    );
    let mut taken = 0;
    let mut n = 16.min(max);
    loop {
        *round += 1;
        let b = burst(&app, *round, n, one_user).await;
        println!(
            "{label:<44} burst {n:>5}: {:>5} accepted {:>5} refused {:>3} failed  slowest {:>7.0} ms  {:>6.0} pushes/s",
            b.accepted,
            b.refused,
            b.failed,
            b.slowest.as_secs_f64() * 1e3,
            b.accepted as f64 / b.elapsed.as_secs_f64()
        );
        assert_eq!(b.failed, 0, "a push failed other than by a 429");
        if b.refused > 0 {
            break;
        }
        taken = n;
        if n >= max {
            break;
        }
        n = (n * 2).min(max);
    }
    app.stop().await;
    println!(
        "  → {label}: {} concurrent pushes taken before the first 429{}",
        taken,
        if taken == max { " (the most tried)" } else { "" }
    );
    taken
}

/// The case: `devices` devices of one user each pushing `batches`
/// batches at once (one change each), with the default limits; what was
/// refused.
async fn devices(store: Backend, devices: usize, batches: usize, round: &mut usize) {
    let app = store.spawn_with(&DEFAULT_LIMITS).await;
    *round += 1;
    let user = format!("devices-{round}");
    let requests: Vec<_> = (0..devices * batches)
        .map(|i| {
            let device = format!("d{}", i % devices);
            let body = push_body(
                &device,
                START,
                json!([insert("todos", &format!("r{i}"), json!({ "n": i }))]),
            );
            app.http
                .post(app.url(&format!("/sync/{APP}")))
                .bearer_auth(common::tokens::token_for(&user))
                .header("X-Client-Id", device)
                .json(&body)
        })
        .collect();
    let started = Instant::now();
    let answers = futures_util::future::join_all(requests.into_iter().map(|r| r.send())).await;
    let refused = answers
        .iter()
        .filter(|a| a.as_ref().is_ok_and(|r| r.status().as_u16() == 429))
        .count();
    let failed = answers
        .iter()
        .filter(|a| {
            !a.as_ref()
                .is_ok_and(|r| r.status().is_success() || r.status().as_u16() == 429)
        })
        .count();
    println!(
        "{store:?}: {devices} devices of one user, {batches} pushes each at once ({}): {} accepted, {refused} refused, \
         {failed} failed, all answered in {:.1} s",
        devices * batches,
        devices * batches - refused - failed,
        started.elapsed().as_secs_f64()
    );
    assert_eq!(failed, 0, "a push failed other than by a 429");
    app.stop().await;
}

/// One user's burst of `n` pushes and, starting a moment later, `others`
/// pushes each of a user of its own: whether the others wait for the burst.
async fn crowd(store: Backend, n: usize, others: usize, round: &mut usize) {
    let app = store.spawn_with(&DEFAULT_LIMITS).await;
    *round += 2;
    let one_user = burst(&app, *round - 1, n, true);
    let bystanders = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        burst(&app, *round, others, false).await
    };
    let (one_user, bystanders) = tokio::join!(one_user, bystanders);
    println!(
        "{store:?}: {n} pushes of one user, with {others} of other users sent 100 ms later: \
         the others' slowest answer {:.0} ms ({} refused); the one user's slowest {:.0} ms ({} refused)",
        bystanders.slowest.as_secs_f64() * 1e3,
        bystanders.refused,
        one_user.slowest.as_secs_f64() * 1e3,
        one_user.refused
    );
    assert_eq!(
        one_user.failed + bystanders.failed,
        0,
        "a push failed other than by a 429"
    );
    app.stop().await;
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let max = std::env::args()
        .skip_while(|a| a != "--max")
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(if full { 4096 } else { 4 });
    common::runtime().block_on(async {
        let mut round = 0;
        for store in [Postgres, Sqlite] {
            for lock_timeout in if full { vec!["5s", ""] } else { vec![""] } {
                for one_user in [true, false] {
                    let taken = ramp(store, lock_timeout, one_user, max, &mut round).await;
                    if !full {
                        assert_eq!(taken, max, "a tiny burst is taken whole");
                    }
                }
            }
            crowd(store, (max / 4).max(1), (max / 16).max(1), &mut round).await;
            if full {
                devices(store, 64, 5, &mut round).await;
            }
        }
    });
    if !full {
        println!("absorb smoke run: 1 passed, 0 failed");
    }
}
