//! Polling: today's web client pulls each collection every few seconds,
//! nearly always finding nothing new. An empty pull must cost next to
//! nothing: its throughput is measured next to `/health`'s on the same
//! replica, with the same client and connections, in the same run.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::cluster::Deployment;
use crate::measure::{CpuMeter, CpuShares, Goal, Progress, Results};
use crate::push::Device;

/// Requests of one kind a second: `connections` connections asking as
/// fast as they are answered for `duration`; any failure ends the run.
async fn rate(
    http: &reqwest::Client,
    requests: Vec<reqwest::RequestBuilder>,
    duration: Duration,
    label: &str,
    servers: &[u32],
) -> (f64, CpuShares) {
    let done = Arc::new(AtomicU64::new(0));
    let progress = Progress::start(label.to_owned(), "requests", done.clone());
    let meter = CpuMeter::start(servers);
    let started = Instant::now();
    let deadline = started + duration;
    let tasks: Vec<_> = requests
        .into_iter()
        .map(|request| {
            let (http, done) = (http.clone(), done.clone());
            let request = request.build().expect("a request");
            tokio::spawn(async move {
                while Instant::now() < deadline {
                    let response = http
                        .execute(request.try_clone().expect("a request without a body"))
                        .await
                        .expect("an answer");
                    let status = response.status();
                    let body = response.bytes().await.expect("a body");
                    assert!(status.is_success(), "{status}: {}", String::from_utf8_lossy(&body));
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("a polling task");
    }
    let per_second = done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();
    let cpu = meter.stop();
    drop(progress);
    (per_second, cpu)
}

/// `/health`, then empty pulls (each connection a device of a user of its
/// own, polling from the cursor its first pull gave it), then `/health`
/// again; the ratio is against the better of the two `/health` runs.
pub async fn empty_pulls(deployment: &Deployment, connections: usize, duration: Duration, results: &mut Results) {
    let replica = &deployment.replicas[0];
    let base = &replica.base;
    let servers: Vec<u32> = replica.pid.into_iter().collect();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(connections)
        .build()
        .expect("an HTTP client");
    let mut devices: Vec<Device> = (0..connections)
        .map(|i| Device::new(format!("poll-{i}"), "tab"))
        .collect();
    let mut polls = Vec::new();
    for device in &mut devices {
        device
            .push(&http, base, Device::inserts(0, 1))
            .await
            .expect("a first push");
        let cursor = device
            .pull(&http, base, "1970-01-01T00:00:00.000Z")
            .await
            .expect("a first pull")
            .synced_until;
        let again = device.pull(&http, base, &cursor).await.expect("a poll");
        assert!(
            again.server_changes.is_empty(),
            "a poll from the latest cursor is empty"
        );
        polls.push(device.pull_request(&http, base, &cursor));
    }
    let health = || (0..connections).map(|_| http.get(format!("{base}/health"))).collect();
    let store = deployment.store;
    let (before, _) = rate(&http, health(), duration, "/health", &servers).await;
    let (pulls, cpu) = rate(&http, polls, duration, "empty pulls", &servers).await;
    let (after, health_cpu) = rate(&http, health(), duration, "/health", &servers).await;
    let health = before.max(after);
    let scenario = format!("polling ({store}, one replica, {connections} connections)");
    results.add(&scenario, "GET /health", health, "requests/s", None, Some(health_cpu));
    results.add(&scenario, "empty pulls", pulls, "requests/s", None, Some(cpu));
    results.add(
        &scenario,
        "empty pulls / /health",
        pulls / health * 100.0,
        "%",
        Some(Goal::AtLeast(50.0)),
        None,
    );
}
