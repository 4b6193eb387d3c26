//! WebSockets: how fast a push on one replica reaches the sockets on
//! another, and how many idle sockets one replica holds, in how much memory.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::cluster::{Deployment, Replica};
use crate::common::app::APP;
use crate::common::tokens;
use crate::measure::{CpuMeter, Goal, Latencies, Progress, Results, resident_bytes};
use crate::push::Device;

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// How long a notification may take before it counts as missed.
const NOTIFY_PATIENCE: Duration = Duration::from_secs(10);

/// Opens `/ws/{app}` on `replica` as `user`'s device `client` and reads
/// `auth-ok` and the catch-up that follows it.
async fn open(replica: &Replica, token: &str, client: &str) -> Result<Socket, String> {
    // A small read buffer: ten thousand clients share the machine with the server.
    let config = WebSocketConfig::default().read_buffer_size(4096);
    let (mut socket, _) =
        tokio_tungstenite::connect_async_with_config(replica.ws_url(&format!("/ws/{APP}")), Some(config), true)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
    let auth = json!({ "type": "auth", "token": token, "clientId": client });
    socket
        .send(Message::text(auth.to_string()))
        .await
        .map_err(|e| format!("send auth: {e}"))?;
    for expected in ["auth-ok", "sync-available"] {
        let message = tokio::time::timeout(Duration::from_secs(30), socket.next())
            .await
            .map_err(|_| format!("no {expected} within 30 s"))?;
        match message {
            Some(Ok(Message::Text(text))) if text.contains(expected) => {}
            other => return Err(format!("expected {expected}, got {other:?}")),
        }
    }
    Ok(socket)
}

/// Sockets kept open by their tasks, closed when this is dropped.
#[derive(Default)]
struct Held(Vec<tokio::task::JoinHandle<()>>);

impl Drop for Held {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// Keeps a socket open, answering pings, and reports each `sync-available`
/// as (`index`, when it came); ends when the server closes it.
fn listen(
    mut socket: Socket,
    index: usize,
    heard: mpsc::UnboundedSender<(usize, Instant)>,
    open: Arc<AtomicUsize>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(Ok(message)) = socket.next().await {
            if let Message::Text(text) = message
                && text.contains("sync-available")
                && heard.send((index, Instant::now())).is_err()
            {
                break;
            }
        }
        open.fetch_sub(1, Ordering::Relaxed);
    })
}

/// Opens sockets `range` on `replica`, socket `i` as `user(i)`, 64
/// handshakes at a time, each then kept by [`listen`]. Returns them, how
/// many opened before the first failure, and that failure.
async fn open_many(
    replica: &Replica,
    range: std::ops::Range<usize>,
    user: impl Fn(usize) -> String,
    heard: &mpsc::UnboundedSender<(usize, Instant)>,
    open_now: &Arc<AtomicUsize>,
) -> (Held, usize, Option<String>) {
    let opened = Arc::new(AtomicU64::new(0));
    let _progress = Progress::start(format!("opening sockets {range:?}"), "sockets", opened.clone());
    let tokens: Vec<(usize, String)> = range.map(|i| (i, tokens::token_for(&user(i)))).collect();
    let results: Vec<Result<tokio::task::JoinHandle<()>, String>> = futures_util::stream::iter(tokens)
        .map(|(i, token)| {
            let (heard, open_now, opened) = (heard.clone(), open_now.clone(), opened.clone());
            async move {
                let socket = open(replica, &token, &format!("socket-{i}")).await?;
                open_now.fetch_add(1, Ordering::Relaxed);
                opened.fetch_add(1, Ordering::Relaxed);
                Ok(listen(socket, i, heard, open_now))
            }
        })
        .buffered(64)
        .collect()
        .await;
    let ok = results.iter().take_while(|r| r.is_ok()).count();
    let mut held = Held::default();
    let mut failure = None;
    for result in results {
        match result {
            Ok(task) => held.0.push(task),
            Err(e) => failure = failure.or(Some(e)),
        }
    }
    (held, ok, failure)
}

/// Takes one notification from each of `n` sockets (a socket's later ones
/// are left), recording how long after `sent(socket)` it came, until none
/// comes for [`NOTIFY_PATIENCE`]. Returns how many sockets heard.
async fn hear_all(
    hearing: &mut mpsc::UnboundedReceiver<(usize, Instant)>,
    n: usize,
    sent: impl Fn(usize) -> Instant,
    latencies: &mut Latencies,
) -> usize {
    let mut told = vec![false; n];
    let mut count = 0;
    while count < n {
        match tokio::time::timeout(NOTIFY_PATIENCE, hearing.recv()).await {
            Ok(Some((i, at))) if !told[i] => {
                told[i] = true;
                count += 1;
                latencies.record(at.saturating_duration_since(sent(i)));
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
    count
}

/// Scenario 5a: `sockets` sockets of one user on replica B; `pushes`
/// pushes of one change, one after another, on replica A. The latency of a
/// socket is from the push being sent until the socket hears of it.
pub async fn one_user(deployment: &Deployment, sockets: usize, pushes: usize, results: &mut Results) {
    let (a, b) = (&deployment.replicas[0], &deployment.replicas[1]);
    let (heard, mut hearing) = mpsc::unbounded_channel();
    let open_now = Arc::new(AtomicUsize::new(0));
    let (_held, opened, failure) = open_many(b, 0..sockets, |_| "fan-one".to_owned(), &heard, &open_now).await;
    assert_eq!(opened, sockets, "every socket opens: {failure:?}");
    let http = reqwest::Client::new();
    let mut pusher = Device::new("fan-one", "pusher");
    let (mut latencies, mut answered) = (Latencies::default(), Latencies::default());
    let mut missed = 0;
    let meter = CpuMeter::start(&deployment.pids());
    for _ in 0..pushes {
        let changes = pusher.updates(1, 10);
        let sent = Instant::now();
        pusher.push(&http, &a.base, changes).await.expect("a push");
        answered.record(sent.elapsed());
        missed += sockets - hear_all(&mut hearing, sockets, |_| sent, &mut latencies).await;
        // Let the sockets settle before the next push.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cpu = Some(meter.stop());
    let scenario = format!("fan-out, {sockets} sockets of one user");
    results.add(
        &scenario,
        "push on A to socket on B: p50",
        latencies.p50(),
        "ms",
        Some(Goal::AtMost(5.0)),
        cpu,
    );
    results.add(
        &scenario,
        "push on A to socket on B: p99",
        latencies.p99(),
        "ms",
        Some(Goal::AtMost(25.0)),
        None,
    );
    // How much of the above the push itself took (its commit is synced).
    results.add(&scenario, "push on A answered: p50", answered.p50(), "ms", None, None);
    results.add(
        &scenario,
        "notifications missed",
        missed as f64,
        "count",
        Some(Goal::AtMost(0.0)),
        None,
    );
}

/// Scenario 5b: a socket each for `users` users on replica B; each user
/// pushes once on replica A, 32 at a time.
pub async fn many_users(deployment: &Deployment, users: usize, results: &mut Results) {
    let (a, b) = (&deployment.replicas[0], &deployment.replicas[1]);
    let (heard, mut hearing) = mpsc::unbounded_channel();
    let open_now = Arc::new(AtomicUsize::new(0));
    let user = |i: usize| format!("fan-many-{i}");
    let (_held, opened, failure) = open_many(b, 0..users, user, &heard, &open_now).await;
    assert_eq!(opened, users, "every socket opens: {failure:?}");
    let http = reqwest::Client::new();
    let origin = Instant::now();
    let sent_at: Arc<Vec<AtomicU64>> = Arc::new((0..users).map(|_| AtomicU64::new(0)).collect());
    let pushed = Arc::new(AtomicU64::new(0));
    let meter = CpuMeter::start(&deployment.pids());
    let pushing = {
        let (sent_at, pushed, base) = (sent_at.clone(), pushed.clone(), a.base.clone());
        tokio::spawn(async move {
            let _progress = Progress::start("each user pushes once".to_owned(), "pushes", pushed.clone());
            futures_util::stream::iter(0..users)
                .for_each_concurrent(32, |i| {
                    let (http, sent_at, pushed, base) = (&http, &sent_at, &pushed, &base);
                    async move {
                        let mut device = Device::new(user(i), "pusher");
                        let changes = device.updates(1, 10);
                        sent_at[i].store(origin.elapsed().as_nanos() as u64, Ordering::Release);
                        device.push(http, base, changes).await.expect("a push");
                        pushed.fetch_add(1, Ordering::Relaxed);
                    }
                })
                .await;
        })
    };
    let mut latencies = Latencies::default();
    let sent = |i: usize| origin + Duration::from_nanos(sent_at[i].load(Ordering::Acquire));
    let count = hear_all(&mut hearing, users, sent, &mut latencies).await;
    pushing.await.expect("the pushes");
    let cpu = Some(meter.stop());
    let scenario = format!("fan-out, {users} sockets of {users} users");
    results.add(
        &scenario,
        "push on A to socket on B: p50",
        latencies.p50(),
        "ms",
        None,
        cpu,
    );
    results.add(
        &scenario,
        "push on A to socket on B: p99",
        latencies.p99(),
        "ms",
        None,
        None,
    );
    results.add(
        &scenario,
        "notifications missed",
        (users - count) as f64,
        "count",
        Some(Goal::AtMost(0.0)),
        None,
    );
}

/// Scenario 6: `idle` idle authenticated sockets (a user each) on a
/// replica of their own: its resident memory per socket; then more,
/// up to `most`, until one fails to open.
pub async fn capacity(replica: &Replica, idle: usize, most: usize, results: &mut Results) {
    let pid = replica.pid.expect("capacity needs a replica the benchmark started");
    let (heard, _hearing) = mpsc::unbounded_channel();
    let open_now = Arc::new(AtomicUsize::new(0));
    let user = |i: usize| format!("idle-{i}");
    // Warm up: what the first sockets allocate once is not per socket.
    let (_warm, warm, _) = open_many(replica, 0..100, user, &heard, &open_now).await;
    assert_eq!(warm, 100, "the first sockets open");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = resident_bytes(pid).expect("the replica runs");
    let (_idle, opened, failure) = open_many(replica, 100..100 + idle, user, &heard, &open_now).await;
    assert_eq!(opened, idle, "{idle} sockets open: {failure:?}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = resident_bytes(pid).expect("the replica runs");
    let per_socket = (after.saturating_sub(before)) as f64 / idle as f64 / 1024.0;
    let scenario = format!("capacity, {idle} idle sockets");
    results.add(
        &scenario,
        "resident memory per socket",
        per_socket,
        "KiB",
        Some(Goal::AtMost(8.0)),
        None,
    );
    results.add(
        &scenario,
        "resident memory in all",
        after as f64 / (1 << 20) as f64,
        "MiB",
        None,
        None,
    );

    let (_more, more, failure) = open_many(replica, 100 + idle..most, user, &heard, &open_now).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let held = open_now.load(Ordering::Relaxed);
    eprintln!(
        "  opened {} sockets in all; first failure: {}",
        100 + idle + more,
        failure.as_deref().unwrap_or("none")
    );
    results.add(
        "capacity, most sockets",
        format!("sockets held (tried {most})"),
        held as f64,
        "sockets",
        Some(Goal::AtLeast(15_000.0)),
        None,
    );
}
