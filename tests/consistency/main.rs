//! A randomized consistency checker: a seeded schedule of devices of
//! several users editing (inserts, field updates, deletes, with skewed and
//! far-future clocks) against two replicas (processes) on PostgreSQL,
//! through faults: requests lost, responses lost and retried with the same
//! `Idempotency-Key`, requests duplicated, a replica SIGKILLed and
//! restarted, PostgreSQL restarted, the change listener's connection cut;
//! while each device follows its cursor and its socket. Then every device
//! sends what it holds and pulls to the end, and the checker's own fold of
//! the log (`model.rs`) is the judge:
//!
//! - every acknowledged batch is in the log exactly once, and no batch is
//!   partial (each carries a marker row naming its size);
//! - every device, applying answers as the original engine does or as a
//!   correct client does, holds the model's records;
//! - every device's cursor chain delivered each winning write;
//! - no device was sent another user's data, and no request got a 5xx but
//!   a 503.
//!
//! `cargo test --test consistency` runs it for 20 s (part of the suite);
//! `cargo test --test consistency -- --duration 10m` for longer, and
//! `-- --seed N` replays a schedule (the seed is printed first). The
//! schedule is the seed's; the timing of two processes and a database is
//! not, so a replay makes the same choices, not the same interleaving.

#[path = "../common/mod.rs"]
mod common;
mod device;
mod model;
mod replicas;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::pg;
use common::tokens::{self, JwksServer};
use device::{Device, Flavor, World};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use replicas::Replica;

const USERS: usize = 3;
const DEVICES_PER_USER: usize = 4;

struct Options {
    seed: u64,
    duration: Duration,
}

fn options() -> Options {
    let mut options = Options {
        seed: rand::random(),
        duration: Duration::from_secs(20),
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            // What test runners ask of a test binary: its one test.
            "--list" => {
                if !std::env::args().any(|a| a == "--ignored") {
                    println!("consistency: test");
                }
                std::process::exit(0);
            }
            "--seed" => options.seed = args.next().and_then(|s| s.parse().ok()).expect("--seed takes a number"),
            "--duration" => {
                options.duration = args
                    .next()
                    .and_then(|d| duration(&d))
                    .expect("--duration takes 30s or 10m")
            }
            _ => {}
        }
    }
    options
}

/// `90s`, `10m` or `1h`.
fn duration(text: &str) -> Option<Duration> {
    let (number, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit())?);
    let number: u64 = number.parse().ok()?;
    let seconds = match unit {
        "s" => number,
        "m" => number * 60,
        "h" => number * 3600,
        _ => return None,
    };
    Some(Duration::from_secs(seconds))
}

fn main() {
    let options = options();
    println!(
        "consistency: seed {} for {:?} (replay: cargo test --test consistency -- --seed {} --duration {}s)",
        options.seed,
        options.duration,
        options.seed,
        options.duration.as_secs()
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(check(options));
}

async fn check(options: Options) {
    let db = pg::test_database().await;
    let jwks = JwksServer::start_default().await;
    let dir = tempfile::tempdir().unwrap();
    let env = vec![
        ("DATABASE_URL".to_owned(), db.app_url.clone()),
        ("JWKS_URL".to_owned(), jwks.url.clone()),
        ("JWT_ISSUER".to_owned(), tokens::ISSUER.to_owned()),
        ("JWT_AUDIENCE".to_owned(), tokens::AUDIENCE.to_owned()),
        ("HOST".to_owned(), "127.0.0.1".to_owned()),
        ("DATABASE_MAX_CONNECTIONS".to_owned(), "8".to_owned()),
        ("PUSH_RATE".to_owned(), "0".to_owned()),
        ("PUSH_BYTES_RATE".to_owned(), "0".to_owned()),
        ("MAX_REQUESTS_PER_USER".to_owned(), "0".to_owned()),
        ("PULL_RATE".to_owned(), "0".to_owned()),
        ("OPEN_RATE".to_owned(), "0".to_owned()),
        ("RUST_LOG".to_owned(), "warn".to_owned()),
    ];
    let mut replicas = Vec::new();
    for i in 0..2 {
        let log = dir.path().join(format!("replica-{i}.log"));
        replicas.push(Replica::start(common::free_port(), env.clone(), log).await);
    }
    let world = Arc::new(World {
        ports: replicas.iter().map(|r| r.port).collect(),
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(20))
            .build()
            .unwrap(),
        acked: Default::default(),
        failures: Default::default(),
        stats: Default::default(),
    });

    let mut rng = StdRng::seed_from_u64(options.seed);
    let until = tokio::time::Instant::now() + options.duration;
    let mut running = Vec::new();
    for u in 0..USERS {
        let user = format!("user{u}");
        for d in 0..DEVICES_PER_USER {
            let flavor = if d % 2 == 0 { Flavor::Original } else { Flavor::Correct };
            let device = Device::new(&user, d, flavor, tokens::token_for(&user), rng.random());
            running.push(tokio::spawn(device.run(world.clone(), until)));
        }
    }
    let faults = inflict_faults(&mut replicas, &db, StdRng::seed_from_u64(rng.random()), until).await;
    let mut devices = Vec::new();
    for device in running {
        devices.push(device.await.expect("a device panicked"));
    }

    // The end: everything still pending is sent, then everyone pulls.
    for device in &mut devices {
        device.flush(&world).await;
    }
    for device in &mut devices {
        let mut pulled = false;
        for _ in 0..100 {
            pulled = device.pull(&world).await;
            if pulled {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(pulled, "{} could not pull at the end", device.name);
    }

    let log = model::log(&db.admin_pool().await).await;
    let batches = model::batches(&log);
    let users = model::fold(&log);
    let acked = world.acked.lock().unwrap().clone();

    for (key, rows) in &acked {
        match batches.logged.get(key) {
            Some(1) if batches.rows[key] == *rows => {}
            times => world.fail(format!("acknowledged batch {key} is in the log {times:?} times")),
        }
    }
    for (key, times) in &batches.logged {
        if *times != 1 {
            world.fail(format!("batch {key} is in the log {times} times"));
        }
    }
    for malformed in &batches.malformed {
        world.fail(format!("a partial batch: {malformed}"));
    }
    let mut compared = 0;
    for device in &devices {
        let expected = users.get(&device.user).cloned().unwrap_or_default();
        let held: std::collections::BTreeMap<_, _> = device
            .records
            .iter()
            .filter(|(_, r)| r.get("deletedAt").is_none_or(serde_json::Value::is_null))
            .map(|(id, r)| (id.clone(), model::comparable(r.clone())))
            .collect();
        if held != expected {
            let differ: Vec<_> = expected
                .keys()
                .chain(held.keys())
                .filter(|id| expected.get(*id) != held.get(*id))
                .take(3)
                .map(|id| format!("{id}: model {:?}, device {:?}", expected.get(id), held.get(id)))
                .collect();
            world.fail(format!(
                "{} ({:?}) did not converge: {differ:?}",
                device.name, device.flavor
            ));
        }
        for record in expected.values() {
            if let Some(title) = record.get("title").and_then(|t| t.as_str())
                && !device.seen.contains(title)
            {
                world.fail(format!("{}'s cursor chain never delivered {title}", device.name));
            }
        }
        compared += held.len();
    }
    for (i, replica) in replicas.iter().enumerate() {
        if replica.log().contains("panicked") {
            world.fail(format!("replica {i} panicked:\n{}", replica.log()));
        }
    }

    let s = &world.stats;
    let lost: usize = acked.keys().filter(|k| batches.logged.get(*k) != Some(&1)).count();
    println!(
        "consistency: seed {}: {} devices of {USERS} users made {} changes in {} acknowledged batches \
         ({} rows logged, {lost} acknowledged batches missing or doubled), {} pulls, {} socket notices; \
         faults: {} lost requests, {} lost responses retried, {} duplicated requests, {} refused (503/429), \
         {} unreachable, {} socket drops, {faults}; {compared} live records compared, device by device",
        options.seed,
        devices.len(),
        s.changes.load(Ordering::Relaxed),
        acked.len(),
        log.len(),
        s.pulls.load(Ordering::Relaxed),
        s.notices.load(Ordering::Relaxed),
        s.lost_requests.load(Ordering::Relaxed),
        s.lost_responses.load(Ordering::Relaxed),
        s.duplicates.load(Ordering::Relaxed),
        s.refused.load(Ordering::Relaxed),
        s.unreachable.load(Ordering::Relaxed),
        s.socket_drops.load(Ordering::Relaxed),
    );
    let failures = world.failures.lock().unwrap();
    assert!(
        failures.is_empty(),
        "seed {}: {} failures, the first: {}",
        options.seed,
        failures.len(),
        failures[0]
    );
    assert!(acked.len() > 10, "so few batches acknowledged that nothing was tested");
}

/// Until `until`: every 1 to 3 s, one fault among a replica SIGKILLed (and
/// restarted a moment later), PostgreSQL restarted, and the listener's
/// connection cut. Returns what it did, for the report; leaves every
/// replica running.
async fn inflict_faults(
    replicas: &mut [Replica],
    db: &pg::TestDatabase,
    mut rng: StdRng,
    until: tokio::time::Instant,
) -> String {
    let (mut kills, mut restarts, mut cuts) = (0, 0, 0);
    let admin = sqlx::PgPool::connect(&pg::server_admin_url()).await.unwrap();
    loop {
        let pause = Duration::from_millis(rng.random_range(1000..3000));
        if tokio::time::Instant::now() + pause >= until {
            tokio::time::sleep_until(until).await;
            break;
        }
        tokio::time::sleep(pause).await;
        match rng.random_range(0..3) {
            0 => {
                kills += 1;
                let i = rng.random_range(0..replicas.len());
                replicas[i].kill();
                tokio::time::sleep(Duration::from_millis(rng.random_range(100..800))).await;
                replicas[i].restart().await;
            }
            1 => {
                restarts += 1;
                pg::restart_server(Duration::from_millis(rng.random_range(100..800))).await;
            }
            _ => {
                cuts += 1;
                let _ = sqlx::query(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                     WHERE application_name = 'mana-sync-listener' AND datname = $1",
                )
                .bind(&db.name)
                .execute(&admin)
                .await;
            }
        }
    }
    format!("{kills} replicas SIGKILLed, {restarts} PostgreSQL restarts, {cuts} listener cuts")
}
