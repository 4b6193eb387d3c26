//! Memory under churn (issue 11): the built binary with no configuration
//! but the limits this test is not about (so SQLite in a temporary
//! directory, and tokens of its own issuing) goes through rounds of 1,000
//! WebSockets opened at once and dropped, half of them authenticated and
//! half not, with a push load during each round of which a random share is
//! cut off mid-flight. Once the server has let go of every socket, its
//! resident memory is sampled: the first round is the warm-up (it sizes
//! the allocator's pools and the runtime's slabs), and no later round may
//! leave the server more than 10% above it. Every acknowledged push must be
//! pulled back, and the server must stay healthy.
//!
//! The server runs with one malloc arena (`MALLOC_ARENA_MAX=1`). glibc
//! gives threads arenas of their own (up to eight per core) and keeps what
//! is freed in each for it, so a round whose sockets land on another
//! worker's arena raises the resident set by up to a round's peak, once per
//! arena, with nothing leaked. Since sockets read through a 4 KiB buffer
//! (tungstenite's default of 128 KiB made 1,000 sockets cost 118 MiB, now
//! 15 MiB) a round's peak is small, and with glibc's default arenas five
//! rounds stayed within 8% (2026-12-02); one arena leaves only the growth
//! this test is about, from round to round (within 5% over five rounds,
//! the database's page caches filling as it grows).
//!
//! `CHURN_SEED=<n>` replays a run's choices (the seed is printed),
//! `CHURN_ROUNDS=<n>` runs more rounds, `MALLOC_ARENA_MAX=<n>` gives the
//! server that many arenas.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::app::{APP, START, insert, push_body};
use common::ws::{Event, Socket};
use futures_util::{SinkExt, StreamExt, stream};
use mana_sync::auth::local::LocalIssuer;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_tungstenite::MaybeTlsStream;
use tokio_tungstenite::tungstenite::Message;

/// Rounds, unless `CHURN_ROUNDS` says otherwise.
const ROUNDS: usize = 5;
const SOCKETS_PER_ROUND: usize = 1000;
/// Fresh users each round, so per-user state (hub entries, limits) churns too.
const USERS_PER_ROUND: usize = 50;
const PUSHES_PER_ROUND: usize = 200;
const CHANGES_PER_PUSH: usize = 3;
/// Most growth of resident memory after a round over the first round's.
const TOLERANCE: f64 = 0.10;
/// WebSocket handshakes in flight at once (all sockets are then held at once).
const HANDSHAKES_AT_ONCE: usize = 100;
const PUSHES_AT_ONCE: usize = 16;
const WAIT: Duration = Duration::from_secs(10);

/// The binary, serving with no configuration in `dir`, killed when dropped.
struct Server {
    child: Child,
    port: u16,
    log: std::path::PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log_text();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("the server's log, last lines first:\n{}", tail.join("\n"));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// Starts `mana-sync` in `dir` with nothing configured but the port and
    /// the limits this test is not about, and waits for `/health`.
    async fn start(dir: &Path, http: &reqwest::Client) -> Server {
        let port = common::free_port();
        let log = dir.join("server.log");
        let child = Command::new(env!("CARGO_BIN_EXE_mana-sync"))
            .env_clear()
            .current_dir(dir)
            .env("PORT", port.to_string())
            .env("RUST_LOG", "warn")
            .env("OPEN_RATE", "0")
            .env("PUSH_RATE", "0")
            .env("PULL_RATE", "0")
            .env("MAX_CONNECTIONS_PER_ADDRESS", "5000")
            .env("MAX_SOCKETS_PER_USER", "100")
            .env("MAX_SOCKETS", "4000")
            // One malloc arena (see the module docs), unless the run says otherwise.
            .env(
                "MALLOC_ARENA_MAX",
                std::env::var("MALLOC_ARENA_MAX").unwrap_or_else(|_| "1".to_owned()),
            )
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("run mana-sync");
        let mut server = Server { child, port, log };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = server.child.try_wait().unwrap() {
                panic!("mana-sync exited at start-up ({status}): {}", server.log_text());
            }
            if http.get(server.url("/health")).send().await.is_ok() {
                return server;
            }
            assert!(Instant::now() < deadline, "mana-sync never answered on port {port}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A field of `/proc/<pid>/status` given in kB (`VmRSS`, `VmHWM`).
    fn status_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|line| {
                line.strip_prefix(field)?
                    .strip_prefix(':')?
                    .trim()
                    .strip_suffix(" kB")?
                    .parse()
                    .ok()
            })
            .unwrap_or_else(|| panic!("no {field} in {status}"))
    }

    /// The server's open socket descriptors (the listener and the
    /// runtime's own, plus one per connection).
    fn sockets(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .unwrap()
            .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
            .filter(|target| target.to_string_lossy().starts_with("socket:"))
            .count()
    }

    async fn health(&self, http: &reqwest::Client) -> Value {
        let response = http.get(self.url("/health")).send().await.expect("/health answers");
        assert_eq!(response.status(), StatusCode::OK, "/health");
        response.json().await.unwrap()
    }

    /// Waits until no WebSocket is subscribed and every connection of the
    /// round is closed (as many socket descriptors as when idle).
    async fn wait_until_let_go(&self, http: &reqwest::Client, idle_sockets: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let sockets = self.sockets();
            let health = self.health(http).await;
            if sockets <= idle_sockets && health["connections"] == 0 && health["users"] == 0 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the server still holds {sockets} sockets (idle: {idle_sockets}) and reports {health}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// What a WebSocket does once open.
#[derive(Clone, Copy, Debug)]
enum Opening {
    /// Authenticates as the real clients do, reads `auth-ok` and the catch-up.
    Authenticated,
    /// Sends nothing.
    Silent,
    /// Sends a frame that is not a message (answered with an error).
    Junk,
    /// Sends an `auth` with a token that is not one (answered, then closed by the server).
    BadToken,
}

/// How the client lets a WebSocket go.
#[derive(Clone, Copy, Debug)]
enum Ending {
    /// A close frame, and the server's close read back.
    CloseFrame,
    /// The TCP stream dropped (FIN).
    Dropped,
    /// The TCP stream reset (RST).
    Reset,
}

/// One push of the load and how it is cut off.
#[derive(Clone, Copy, Debug)]
enum Cut {
    /// Not: the answer is awaited, and must be a 200.
    None,
    /// The request is dropped after this long, answered or not.
    After(Duration),
    /// Half the body is sent, then the connection closed (reset if true):
    /// never recorded.
    HalfBody { reset: bool },
    /// The whole request is sent, then the connection closed (reset if
    /// true) without reading the answer.
    Unread { reset: bool },
}

struct Push {
    user: usize,
    ids: Vec<String>,
    cut: Cut,
}

/// A push of the load and what became of it.
struct Pushed {
    user: usize,
    ids: Vec<String>,
    outcome: Outcome,
}

/// What became of a push.
enum Outcome {
    Acknowledged,
    /// Cut off before its answer: it may or may not have been recorded.
    Unknown,
    /// Cut off before its body was whole: it must not have been recorded.
    NeverWhole,
}

async fn open(url: &str, opening: Opening, token: &str, device: usize) -> Socket {
    let (mut socket, _) = tokio_tungstenite::connect_async(url)
        .await
        .unwrap_or_else(|e| panic!("socket {device} ({opening:?}): handshake: {e}"));
    let message = match opening {
        Opening::Authenticated => json!({ "type": "auth", "token": token, "clientId": format!("device-{device}") }),
        Opening::Silent => return socket,
        Opening::Junk => json!("hello?"),
        Opening::BadToken => json!({ "type": "auth", "token": "not.a.token" }),
    };
    socket
        .send(Message::text(message.to_string()))
        .await
        .unwrap_or_else(|e| panic!("socket {device} ({opening:?}): send: {e}"));
    let expected: &[&str] = match opening {
        Opening::Authenticated => &["auth-ok", "sync-available"],
        _ => &["error"],
    };
    for kind in expected {
        let answer = match common::ws::next(&mut socket, WAIT).await {
            Some(Event::Json(answer)) => answer,
            other => panic!("socket {device} ({opening:?}): expected {kind}, got {other:?}"),
        };
        assert_eq!(answer["type"], *kind, "socket {device} ({opening:?}): {answer}");
    }
    socket
}

async fn end(mut socket: Socket, ending: Ending) {
    match ending {
        Ending::CloseFrame => {
            // The server may have closed first (a bad token): then this fails.
            if socket.close(None).await.is_ok() {
                while let Some(Event::Json(_)) = common::ws::next(&mut socket, WAIT).await {}
            }
        }
        Ending::Dropped => drop(socket),
        Ending::Reset => {
            if let MaybeTlsStream::Plain(tcp) = socket.get_ref() {
                tcp.set_zero_linger().unwrap();
            }
            drop(socket)
        }
    }
}

async fn push(server: &Server, http: &reqwest::Client, token: &str, push: &Push) -> Outcome {
    let changes: Vec<Value> = push
        .ids
        .iter()
        .map(|id| {
            insert(
                "todos",
                id,
                json!({ "title": "churn", "updatedAt": "2026-01-01T10:00:00.000Z" }),
            )
        })
        .collect();
    let body = push_body("churner", START, json!(changes));
    let request = || {
        http.post(server.url(&format!("/sync/{APP}")))
            .bearer_auth(token)
            .json(&body)
            .send()
    };
    match push.cut {
        Cut::None => {
            let response = request().await.expect("push answered");
            let status = response.status();
            let answer = response.text().await.unwrap();
            assert_eq!(status, StatusCode::OK, "push: {answer}");
            Outcome::Acknowledged
        }
        Cut::After(wait) => match tokio::time::timeout(wait, request()).await {
            Ok(response) => {
                let response = response.expect("push answered");
                assert_eq!(response.status(), StatusCode::OK, "push");
                Outcome::Acknowledged
            }
            Err(_) => Outcome::Unknown,
        },
        Cut::HalfBody { reset } => {
            let body = body.to_string();
            send_and_close(server.port, token, &body, body.len() / 2, reset).await;
            Outcome::NeverWhole
        }
        Cut::Unread { reset } => {
            let body = body.to_string();
            send_and_close(server.port, token, &body, body.len(), reset).await;
            Outcome::Unknown
        }
    }
}

/// Writes a push request announcing all of `body` but holding only its
/// first `sent` bytes, then closes the connection (FIN, or RST if `reset`).
async fn send_and_close(port: u16, token: &str, body: &str, sent: usize, reset: bool) {
    let request = format!(
        "POST /sync/{APP} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{}",
        body.len(),
        &body[..sent]
    );
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    tcp.write_all(request.as_bytes()).await.unwrap();
    if reset {
        tcp.set_zero_linger().unwrap();
    } else {
        tcp.shutdown().await.unwrap();
    }
}

/// Every record id of `user`'s `todos`, pulled page by page.
async fn pulled_ids(server: &Server, http: &reqwest::Client, token: &str) -> HashSet<String> {
    let mut ids = HashSet::new();
    let mut cursor = START.to_owned();
    loop {
        let response = http
            .get(server.url(&format!("/sync/{APP}/pull")))
            .bearer_auth(token)
            .query(&[("collection", "todos"), ("since", &cursor), ("limit", "5000")])
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "pull");
        let page: Value = response.json().await.unwrap();
        for change in page["serverChanges"].as_array().unwrap() {
            ids.insert(change["id"].as_str().unwrap().to_owned());
        }
        cursor = page["syncedUntil"].as_str().unwrap().to_owned();
        if page["hasMore"] != true {
            return ids;
        }
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rounds_of_socket_and_push_churn_leave_resident_memory_where_the_first_left_it() {
    let seed: u64 = std::env::var("CHURN_SEED")
        .ok()
        .map(|s| s.parse().expect("CHURN_SEED is a number"))
        .unwrap_or_else(rand::random);
    eprintln!("churn: CHURN_SEED={seed}");
    let mut rng = StdRng::seed_from_u64(seed);

    let dir = tempfile::tempdir().unwrap();
    // No pooled connections: each request's connection closes after it, so
    // an idle server holds no connection of the test's.
    let http = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    let mut server = Server::start(dir.path(), &http).await;
    // The key the server created: `mana-sync token` signs with it too.
    let issuer = LocalIssuer::load_or_create(&dir.path().join("data")).unwrap();
    let ws_url = format!("ws://127.0.0.1:{}/ws/{APP}", server.port);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let idle_sockets = server.sockets();
    let started_kib = server.status_kib("VmRSS");
    let started = Instant::now();

    let mut samples = Vec::new();
    // Per round: its users' tokens, and each push's ids and outcome.
    let mut pushed: Vec<(Vec<String>, Vec<Pushed>)> = Vec::new();
    let rounds = std::env::var("CHURN_ROUNDS").map_or(ROUNDS, |n| n.parse().expect("CHURN_ROUNDS is a number"));
    assert!(rounds >= 2, "CHURN_ROUNDS: the first round and at least one more");
    for round in 0..rounds {
        let round_started = Instant::now();
        let tokens: Vec<String> = (0..USERS_PER_ROUND)
            .map(|u| {
                issuer
                    .token(&format!("churn-{round}-{u}"), Duration::from_secs(3600))
                    .unwrap()
            })
            .collect();

        // 1,000 sockets, every other one authenticated (10 per user).
        let plan: Vec<(usize, Opening, Ending)> = (0..SOCKETS_PER_ROUND)
            .map(|n| {
                let opening = if n % 2 == 0 {
                    Opening::Authenticated
                } else {
                    [Opening::Silent, Opening::Junk, Opening::BadToken][rng.random_range(0..3)]
                };
                let ending = [Ending::CloseFrame, Ending::Dropped, Ending::Reset][rng.random_range(0..3)];
                (n, opening, ending)
            })
            .collect();
        let sockets: Vec<(Socket, Ending)> = stream::iter(&plan)
            .map(|&(n, opening, ending)| {
                let (ws_url, token) = (&ws_url, &tokens[(n / 2) % USERS_PER_ROUND]);
                async move { (open(ws_url, opening, token, n).await, ending) }
            })
            .buffer_unordered(HANDSHAKES_AT_ONCE)
            .collect()
            .await;
        let opened = round_started.elapsed();
        let health = server.health(&http).await;
        assert_eq!(
            health["connections"],
            SOCKETS_PER_ROUND / 2,
            "every authenticated socket is held at once: {health}"
        );
        assert_eq!(health["users"], USERS_PER_ROUND, "{health}");

        // The push load, to the users whose sockets are open (and not read).
        let pushes: Vec<Push> = (0..PUSHES_PER_ROUND)
            .map(|p| Push {
                user: rng.random_range(0..USERS_PER_ROUND),
                ids: (0..CHANGES_PER_PUSH).map(|c| format!("r{round}-p{p}-c{c}")).collect(),
                cut: match rng.random_range(0..10) {
                    0..5 => Cut::None,
                    5..8 => Cut::After(Duration::from_millis(rng.random_range(0..300))),
                    8 => Cut::HalfBody {
                        reset: rng.random_bool(0.5),
                    },
                    _ => Cut::Unread {
                        reset: rng.random_bool(0.5),
                    },
                },
            })
            .collect();
        let outcomes: Vec<Pushed> = stream::iter(pushes)
            .map(|p| {
                let (server, http, token) = (&server, &http, &tokens[p.user]);
                async move {
                    let outcome = push(server, http, token, &p).await;
                    Pushed {
                        user: p.user,
                        ids: p.ids,
                        outcome,
                    }
                }
            })
            .buffer_unordered(PUSHES_AT_ONCE)
            .collect()
            .await;

        stream::iter(sockets)
            .for_each_concurrent(HANDSHAKES_AT_ONCE, |(socket, ending)| end(socket, ending))
            .await;
        server.wait_until_let_go(&http, idle_sockets).await;
        let let_go = round_started.elapsed();
        tokio::time::sleep(Duration::from_millis(250)).await;
        let rss = server.status_kib("VmRSS");
        eprintln!(
            "churn: round {} (opened in {opened:.1?}, let go after {let_go:.1?}): VmRSS {:.1} MiB, peak {:.1} MiB",
            round + 1,
            mib(rss),
            mib(server.status_kib("VmHWM")),
        );
        samples.push(rss);
        pushed.push((tokens, outcomes));
    }

    // Nothing acknowledged is lost; nothing sent by halves is recorded.
    let (mut acknowledged, mut unknown, mut unknown_recorded, mut halves) = (0, 0, 0, 0);
    for (tokens, outcomes) in &pushed {
        for (user, token) in tokens.iter().enumerate() {
            let present = pulled_ids(&server, &http, token).await;
            for Pushed { ids, outcome, .. } in outcomes.iter().filter(|p| p.user == user) {
                let recorded = ids.iter().filter(|id| present.contains(*id)).count();
                match outcome {
                    Outcome::Acknowledged => {
                        acknowledged += 1;
                        assert_eq!(recorded, ids.len(), "an acknowledged push is lost: {ids:?}");
                    }
                    Outcome::Unknown => {
                        unknown += 1;
                        assert!(recorded == 0 || recorded == ids.len(), "half a push recorded: {ids:?}");
                        unknown_recorded += usize::from(recorded > 0);
                    }
                    Outcome::NeverWhole => {
                        halves += 1;
                        assert_eq!(
                            recorded, 0,
                            "a push whose body never arrived whole is recorded: {ids:?}"
                        );
                    }
                }
            }
        }
    }
    let health = server.health(&http).await;
    assert_eq!(health["status"], "ok", "{health}");
    assert!(
        server.child.try_wait().unwrap().is_none(),
        "the server is still running"
    );
    let log = server.log_text();
    assert!(!log.contains("panicked"), "the server panicked: {log}");

    let baseline = samples[0];
    let worst = *samples[1..].iter().max().unwrap();
    let ratio = |kib: u64| kib as f64 / baseline as f64;
    let listed: Vec<String> = samples.iter().map(|&kib| format!("{:.1}", mib(kib))).collect();
    eprintln!(
        "churn: VmRSS idle {:.1} MiB; after each round [{}] MiB; last/first {:.3}, worst/first {:.3}",
        mib(started_kib),
        listed.join(", "),
        ratio(*samples.last().unwrap()),
        ratio(worst),
    );
    eprintln!(
        "churn: {} pushes acknowledged (all pulled back), {unknown} cut off ({unknown_recorded} recorded anyway), \
         {halves} sent by halves (none recorded); {:.1?} in all",
        acknowledged,
        started.elapsed()
    );
    assert!(
        ratio(worst) <= 1.0 + TOLERANCE,
        "resident memory grows under churn: {:.1} MiB after round 1, up to {:.1} MiB later (seed {seed}; samples {listed:?} MiB)",
        mib(baseline),
        mib(worst)
    );
}
