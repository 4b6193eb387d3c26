//! Pulling: a page of records written once against one of records
//! written a hundred times, a new device's initial sync through every
//! page, and how push and pull cost grows with the data.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use futures_util::StreamExt;

use crate::cluster::Deployment;
use crate::measure::{CpuMeter, Goal, Latencies, Progress, Results};
use crate::push::{Answer, Device};

/// Writes records `0..records` of each device's user, `batch` per push,
/// `concurrency` devices at a time.
pub async fn seed(
    http: &reqwest::Client,
    base: &str,
    devices: &mut [Device],
    records: usize,
    batch: usize,
    label: &str,
) {
    let done = Arc::new(AtomicU64::new(0));
    let _progress = Progress::start(format!("seeding {label}"), "records", done.clone());
    futures_util::stream::iter(devices.iter_mut())
        .for_each_concurrent(16, |device| {
            let done = done.clone();
            async move {
                for first in (0..records).step_by(batch) {
                    let n = batch.min(records - first);
                    if let Err(e) = device.push(http, base, Device::inserts(first, n)).await {
                        panic!("seeding {} failed: {e}", device.user);
                    }
                    done.fetch_add(n as u64, Ordering::Relaxed);
                }
            }
        })
        .await;
}

/// Rewrites every record of the device's user `times` more times.
async fn rewrite(http: &reqwest::Client, base: &str, device: &mut Device, records: usize, times: usize) {
    let done = Arc::new(AtomicU64::new(0));
    let _progress = Progress::start(
        format!("rewriting {records} records {times} times"),
        "changes",
        done.clone(),
    );
    for _ in 0..times * records / 100 {
        let changes = device.updates(100, records);
        device.push(http, base, changes).await.expect("a rewrite");
        done.fetch_add(100, Ordering::Relaxed);
    }
}

/// Does what autovacuum does within its next minute after a bulk load:
/// refreshes the planner's statistics, and clears the index entries of the
/// row versions that updates left behind (a record rewritten 100 times
/// leaves 99 in each of its delta indexes, which a pull from the start
/// steps over until then); then checkpoints.
pub async fn vacuum(deployment: &Deployment) {
    if let Some(url) = &deployment.admin_url {
        let pool = sqlx::PgPool::connect(url).await.expect("connect to VACUUM");
        sqlx::query("VACUUM (ANALYZE)").execute(&pool).await.expect("VACUUM");
        // Its writes are flushed now rather than by a checkpoint that would
        // compete with the measurement's commits for the disk.
        sqlx::query("CHECKPOINT").execute(&pool).await.expect("CHECKPOINT");
        pool.close().await;
    }
}

/// `samples` pulls of the first page since the start by each of
/// `devices`, in turn (so that each sees the same machine), each timed
/// until its last byte and then checked to hold `expect` records.
async fn time_pulls<const N: usize>(
    http: &reqwest::Client,
    base: &str,
    devices: [&Device; N],
    samples: usize,
    expect: usize,
) -> [Latencies; N] {
    let mut latencies = std::array::from_fn(|_| Latencies::default());
    for _ in 0..samples {
        for (device, latencies) in devices.iter().zip(&mut latencies) {
            let sent = Instant::now();
            let body = device
                .pull_body(http, base, "1970-01-01T00:00:00.000Z")
                .await
                .expect("a pull");
            latencies.record(sent.elapsed());
            let page = Answer::parse(&body).expect("a page");
            assert_eq!(page.server_changes.len(), expect, "a page of every record");
        }
    }
    latencies
}

/// Scenario 2: a page of `records` records written once against one of
/// records written 100 times.
pub async fn history(deployment: &Deployment, records: usize, samples: usize, results: &mut Results) {
    let (http, base) = (reqwest::Client::new(), &deployment.replicas[0].base);
    let scenario = format!("pull {records} records ({})", deployment.store);
    let mut once = [Device::new("pull-once", "seed")];
    seed(&http, base, &mut once, records, 100, "records written once").await;
    let mut hundred = [Device::new("pull-hundred", "seed")];
    seed(&http, base, &mut hundred, records, 100, "records to write 100 times").await;
    rewrite(&http, base, &mut hundred[0], records, 99).await;
    vacuum(deployment).await;

    let devices = [&once[0], &hundred[0]];
    time_pulls(&http, base, devices, samples / 10 + 1, records).await;
    let meter = CpuMeter::start(&deployment.pids());
    let [written_once, written_100] = time_pulls(&http, base, devices, samples, records).await;
    let cpu = Some(meter.stop());
    let ratio = written_100.p50() / written_once.p50();
    let p50_goal = Some(Goal::AtMost(5.0));
    results.add(&scenario, "written once: p50", written_once.p50(), "ms", p50_goal, cpu);
    results.add(&scenario, "written once: p99", written_once.p99(), "ms", None, None);
    results.add(
        &scenario,
        "written 100 times: p50",
        written_100.p50(),
        "ms",
        p50_goal,
        None,
    );
    results.add(&scenario, "written 100 times: p99", written_100.p99(), "ms", None, None);
    results.add(
        &scenario,
        "p50 ratio, 100 times / once",
        ratio,
        "x",
        Some(Goal::AtMost(1.2)),
        None,
    );
}

/// Scenario 3: a new device of a user with `records` records pulls every
/// page (the server's default page size, as the original client asks).
pub async fn initial_sync(deployment: &Deployment, records: usize, results: &mut Results) {
    let (http, base) = (reqwest::Client::new(), &deployment.replicas[0].base);
    let mut owner = [Device::new("initial", "seed")];
    seed(&http, base, &mut owner, records, 1000, "one user's records").await;
    vacuum(deployment).await;
    let mut rates = Vec::new();
    let mut pages = Latencies::default();
    let meter = CpuMeter::start(&deployment.pids());
    for run in 0..3 {
        let device = Device::new("initial", format!("new-{run}"));
        let started = Instant::now();
        let (mut since, mut pulled) = (device.cursor.clone(), 0);
        loop {
            let sent = Instant::now();
            let page = device.pull(&http, base, &since).await.expect("a page");
            pages.record(sent.elapsed());
            pulled += page.server_changes.len();
            since = page.synced_until;
            if !page.has_more {
                break;
            }
        }
        assert_eq!(pulled, records, "the initial sync brings every record");
        rates.push(records as f64 / started.elapsed().as_secs_f64());
    }
    let cpu = Some(meter.stop());
    rates.sort_by(f64::total_cmp);
    let scenario = format!("initial sync, {records} records ({})", deployment.store);
    results.add(
        &scenario,
        "records/s (median of 3)",
        rates[1],
        "records/s",
        Some(Goal::AtLeast(100_000.0)),
        cpu,
    );
    results.add(&scenario, "page p50", pages.p50(), "ms", None, None);
    results.add(&scenario, "page p99", pages.p99(), "ms", None, None);
}

/// The cost of a device's sync round at one size: it pushes 10 updates,
/// then pulls what changed since its cursor before the push.
async fn sync_rounds(
    http: &reqwest::Client,
    base: &str,
    devices: &mut [Device],
    samples: usize,
) -> (Latencies, Latencies) {
    let (mut pushes, mut pulls) = (Latencies::default(), Latencies::default());
    for i in 0..samples {
        let device = &mut devices[(i * 7919) % devices.len()];
        let before = device.cursor.clone();
        let changes = device.updates(10, 100);
        let sent = Instant::now();
        device.push(http, base, changes).await.expect("a push");
        pushes.record(sent.elapsed());
        let sent = Instant::now();
        let page = device.pull(http, base, &before).await.expect("a pull");
        pulls.record(sent.elapsed());
        assert!(page.server_changes.len() >= 10, "the pull brings the pushed records");
    }
    (pushes, pulls)
}

/// Scenario 4: push and pull p50 with `small` and then `large` records in
/// the database, spread over users of 100 records each, and in one user's
/// account.
pub async fn growth(deployment: &Deployment, small: usize, large: usize, samples: usize, results: &mut Results) {
    let (http, base) = (reqwest::Client::new(), &deployment.replicas[0].base);
    let mut spread: Vec<Device> = Vec::new();
    let mut one = [Device::new("growth-one", "seed")];
    let mut p50s = Vec::new();
    for (size, step) in [(small, 0), (large, 1)] {
        let users = size / 100;
        let mut added: Vec<Device> = (spread.len()..users)
            .map(|u| Device::new(format!("growth-{u}"), "seed"))
            .collect();
        seed(
            &http,
            base,
            &mut added,
            100,
            100,
            &format!("{size} records over {users} users"),
        )
        .await;
        spread.extend(added);
        let have = if step == 0 { 0 } else { small };
        grow_one(&http, base, &mut one[0], have, size).await;
        vacuum(deployment).await;
        let meter = CpuMeter::start(&deployment.pids());
        let spread_p = sync_rounds(&http, base, &mut spread, samples).await;
        let one_p = sync_rounds(&http, base, &mut one, samples).await;
        p50s.push((spread_p.0.p50(), spread_p.1.p50(), one_p.0.p50(), one_p.1.p50()));
        let cpu = Some(meter.stop());
        let scenario = format!("growth, {size} records ({})", deployment.store);
        results.add(
            &scenario,
            "spread over users: push p50",
            spread_p.0.p50(),
            "ms",
            None,
            cpu,
        );
        results.add(
            &scenario,
            "spread over users: pull p50",
            spread_p.1.p50(),
            "ms",
            None,
            None,
        );
        results.add(&scenario, "one user: push p50", one_p.0.p50(), "ms", None, None);
        results.add(&scenario, "one user: pull p50", one_p.1.p50(), "ms", None, None);
    }
    let scenario = format!("growth, {large} / {small} records ({})", deployment.store);
    let goal = Some(Goal::AtMost(1.2));
    let (a, b) = (p50s[0], p50s[1]);
    results.add(
        &scenario,
        "spread over users: push p50 ratio",
        b.0 / a.0,
        "x",
        goal,
        None,
    );
    results.add(
        &scenario,
        "spread over users: pull p50 ratio",
        b.1 / a.1,
        "x",
        goal,
        None,
    );
    results.add(&scenario, "one user: push p50 ratio", b.2 / a.2, "x", goal, None);
    results.add(&scenario, "one user: pull p50 ratio", b.3 / a.3, "x", goal, None);
}

/// Inserts records `have..size` of one user, 1,000 per push.
async fn grow_one(http: &reqwest::Client, base: &str, device: &mut Device, have: usize, size: usize) {
    let done = Arc::new(AtomicU64::new(0));
    let _progress = Progress::start(format!("seeding {size} records of one user"), "records", done.clone());
    for first in (have..size).step_by(1000) {
        let n = 1000.min(size - first);
        device
            .push(http, base, Device::inserts(first, n))
            .await
            .expect("seeding one user");
        done.fetch_add(n as u64, Ordering::Relaxed);
    }
}
