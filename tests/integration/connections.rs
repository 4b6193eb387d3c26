//! Hostile connections cannot hold a replica: a connection that sends no
//! request head in time is closed, a body that trickles in gets a 408, a
//! body is read only once its token is good and only within the replica's
//! budget, connections over the replica's or an address's limit are
//! closed at once while others get in, and running out of file
//! descriptors makes the replica wait, not spin.

use crate::common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::app::{APP, Backend, Postgres, START, Sqlite, TestApp, both_stores};
use common::metrics::{scrape, value};
use rstest::rstest;
use rstest_reuse::apply;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// The server's socket address.
fn server(app: &TestApp) -> SocketAddr {
    app.address.trim_start_matches("http://").parse().unwrap()
}

/// A connection to `app` from the loopback address `from` (127.0.0.x).
async fn connect_from(app: &TestApp, from: &str) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    socket.connect(server(app)).await.unwrap()
}

/// Reads until the server closes the connection (or resets it), at most
/// `limit`; returns what was read and when the connection ended.
async fn read_until_closed(socket: &mut TcpStream, limit: Duration) -> (String, Duration) {
    let started = Instant::now();
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at((started + limit).into(), socket.read(&mut buf)).await {
            Err(_) => panic!("the server kept the connection open for {limit:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => raw.extend_from_slice(&buf[..n]),
        }
    }
    (String::from_utf8_lossy(&raw).into_owned(), started.elapsed())
}

/// Whether the server closed a connection that sent nothing at once
/// (rather than holding it open).
async fn closed_at_once(socket: &mut TcpStream) -> bool {
    let mut buf = [0u8; 64];
    match tokio::time::timeout(Duration::from_millis(300), socket.read(&mut buf)).await {
        Err(_) => false,
        Ok(Ok(0)) | Ok(Err(_)) => true,
        Ok(Ok(_)) => panic!("the server sent something unasked"),
    }
}

/// The status of the next answer on a connection kept alive.
async fn read_status(socket: &mut TcpStream) -> u16 {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while !line.ends_with(b"\r\n") {
        tokio::time::timeout(Duration::from_secs(10), socket.read_exact(&mut byte))
            .await
            .expect("an answer")
            .expect("the connection stays up");
        line.push(byte[0]);
    }
    status_of(&String::from_utf8_lossy(&line))
}

/// The status code of an HTTP answer.
fn status_of(answer: &str) -> u16 {
    answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {answer:?}"))
}

/// The head of a push of `length` bytes, with `authorization` as given.
fn push_head(authorization: &str, length: usize) -> String {
    format!(
        "POST /sync/{APP} HTTP/1.1\r\nHost: localhost\r\n{authorization}X-Client-Id: a\r\n\
         Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    )
}

fn bearer(user: &str) -> String {
    format!("Authorization: Bearer {}\r\n", common::tokens::token_for(user))
}

/// A push body of exactly `length` bytes (one insert, padded with spaces).
fn push_body_of(length: usize) -> Vec<u8> {
    let mut body = json!({ "clientId": "a", "changes": [{ "table": "todos", "id": "t", "op": "insert",
        "data": { "title": "slow", "updatedAt": "2024-01-01T10:00:00Z" } }] })
    .to_string()
    .into_bytes();
    assert!(body.len() <= length);
    body.resize(length, b' ');
    body
}

/// `/health` from `from`, on a connection of its own.
async fn health_from(app: &TestApp, from: &str) -> u16 {
    let mut socket = connect_from(app, from).await;
    socket
        .write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    status_of(&read_until_closed(&mut socket, Duration::from_secs(10)).await.0)
}

#[apply(both_stores)]
async fn a_connection_without_a_request_head_in_time_is_closed(store: Backend) {
    let app = store.spawn_with(&[("IDLE_TIMEOUT", "1s")]).await;
    // Silent from the start.
    let mut silent = TcpStream::connect(server(&app)).await.unwrap();
    let (_, after) = read_until_closed(&mut silent, Duration::from_secs(5)).await;
    assert!(
        after >= Duration::from_millis(900),
        "closed after {after:?}, before the timeout"
    );
    // Headers sent a few bytes at a time, never finished.
    let mut trickling = TcpStream::connect(server(&app)).await.unwrap();
    trickling
        .write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let closed = loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if trickling.write_all(b"X-Slow: a\r\n").await.is_err() {
            break started.elapsed();
        }
        if started.elapsed() > Duration::from_secs(5) {
            let (_, more) = read_until_closed(&mut trickling, Duration::from_secs(1)).await;
            break started.elapsed() + more;
        }
    };
    assert!(closed < Duration::from_secs(6), "trickling headers held for {closed:?}");
    // Idle after an answer (keep-alive): closed too.
    let mut idle = TcpStream::connect(server(&app)).await.unwrap();
    idle.write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let (answer, after) = read_until_closed(&mut idle, Duration::from_secs(5)).await;
    assert_eq!(status_of(&answer), 200);
    assert!(after >= Duration::from_millis(900), "kept alive for {after:?} only");
    // An ordinary client is unaffected.
    assert_eq!(app.health().await["status"], "ok");
}

#[apply(both_stores)]
async fn a_body_that_trickles_in_gets_a_408_and_writes_nothing(store: Backend) {
    let app = store
        .spawn_with(&[("BODY_TIMEOUT", "1s"), ("BODY_MIN_RATE", "1000")])
        .await;
    // 50 bytes a second, where 1,000 are asked for after the first second.
    let body = push_body_of(4000);
    let mut socket = TcpStream::connect(server(&app)).await.unwrap();
    socket
        .write_all(push_head(&bearer("alice"), body.len()).as_bytes())
        .await
        .unwrap();
    let writing = async {
        for piece in body.chunks(10) {
            if socket.write_all(piece).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(4), writing).await;
    let (answer, _) = read_until_closed(&mut socket, Duration::from_secs(5)).await;
    assert_eq!(status_of(&answer), 408, "{answer}");
    assert!(answer.contains("\"code\":\"request_timeout\""), "{answer}");
    assert!(answer.to_lowercase().contains("connection: close"), "{answer}");
    // A pause longer than BODY_TIMEOUT, however fast the rest.
    let mut paused = TcpStream::connect(server(&app)).await.unwrap();
    paused
        .write_all(push_head(&bearer("alice"), body.len()).as_bytes())
        .await
        .unwrap();
    paused.write_all(&body[..100]).await.unwrap();
    let (answer, after) = read_until_closed(&mut paused, Duration::from_secs(5)).await;
    assert_eq!(status_of(&answer), 408, "{answer}");
    assert!(after < Duration::from_secs(3), "answered after {after:?}");
    assert_eq!(app.log_rows().await, 0, "nothing is written");
    let scrape = scrape(&app).await;
    assert_eq!(
        value(&scrape, "mana_sync_requests_shed_total", &[("reason", "slow_body")]),
        2.0
    );
    // A body at an honest pace goes through.
    app.push_ok(
        "alice",
        "a",
        START,
        json!([common::app::insert("todos", "t", json!({ "title": "ok" }))]),
    )
    .await;
}

#[apply(both_stores)]
async fn a_body_is_not_read_before_its_token_is_checked(store: Backend) {
    let app = store.spawn().await;
    for authorization in [String::new(), "Authorization: Bearer not-a-token\r\n".to_owned()] {
        // A 9.9 MB body declared, not a byte of it sent: the answer comes all the same.
        let mut socket = TcpStream::connect(server(&app)).await.unwrap();
        socket
            .write_all(push_head(&authorization, 9_900_000).as_bytes())
            .await
            .unwrap();
        let (answer, after) = read_until_closed(&mut socket, Duration::from_secs(5)).await;
        assert_eq!(status_of(&answer), 401, "{answer}");
        assert!(answer.contains("\"code\":\"unauthorized\""), "{answer}");
        assert!(answer.to_lowercase().contains("connection: close"), "{answer}");
        assert!(after < Duration::from_secs(2), "answered after {after:?}");
    }
    // The refused token is counted once, as before.
    let scrape = scrape(&app).await;
    assert_eq!(
        value(&scrape, "mana_sync_jwt_failures_total", &[("reason", "malformed")]),
        1.0
    );
    assert_eq!(app.log_rows().await, 0);
}

#[apply(both_stores)]
async fn bodies_over_the_budget_get_a_503_with_retry_after(store: Backend) {
    let app = store.spawn_with(&[("BODY_BUDGET", "100000")]).await;
    // One push holds 80 kB of the budget while its body is still coming
    // (what has arrived counts, not what is declared).
    let held = push_body_of(90_000);
    let mut holder = TcpStream::connect(server(&app)).await.unwrap();
    holder
        .write_all(push_head(&bearer("alice"), held.len()).as_bytes())
        .await
        .unwrap();
    holder.write_all(&held[..80_000]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Another, of 30 kB, does not fit beside it.
    let mut other = TcpStream::connect(server(&app)).await.unwrap();
    let body = push_body_of(30_000);
    other
        .write_all(push_head(&bearer("bob"), body.len()).as_bytes())
        .await
        .unwrap();
    let _ = other.write_all(&body).await;
    let (answer, _) = read_until_closed(&mut other, Duration::from_secs(5)).await;
    assert_eq!(status_of(&answer), 503, "{answer}");
    assert!(answer.contains("\"code\":\"overloaded\""), "{answer}");
    assert!(answer.to_lowercase().contains("retry-after: 1"), "{answer}");
    // Once the first body is in, its share is given back.
    holder.write_all(&held[80_000..]).await.unwrap();
    assert_eq!(read_status(&mut holder).await, 200);
    let mut again = TcpStream::connect(server(&app)).await.unwrap();
    again
        .write_all(push_head(&bearer("bob"), body.len()).as_bytes())
        .await
        .unwrap();
    again.write_all(&body).await.unwrap();
    assert_eq!(read_status(&mut again).await, 200);
    let scrape = scrape(&app).await;
    assert_eq!(
        value(&scrape, "mana_sync_requests_shed_total", &[("reason", "body_budget")]),
        1.0
    );
}

/// One user holds at most `BODY_BUDGET_PER_USER` of bodies, counted as
/// they arrive: slow bodies declaring 10 MB each hold only what they sent,
/// and one user's bodies over its share get a 429 while other users'
/// pushes go on.
#[apply(both_stores)]
async fn one_user_holds_only_a_share_of_the_body_budget(store: Backend) {
    let app = store
        .spawn_with(&[("BODY_BUDGET", "200000"), ("BODY_BUDGET_PER_USER", "50000")])
        .await;
    // Twenty bodies declaring 10 MB each, a few bytes sent: they hold next to nothing.
    let mut declared = Vec::new();
    for _ in 0..20 {
        let mut socket = TcpStream::connect(server(&app)).await.unwrap();
        socket
            .write_all(push_head(&bearer("mallory"), 10_000_000).as_bytes())
            .await
            .unwrap();
        socket.write_all(b"{\"clientId\"").await.unwrap();
        declared.push(socket);
    }
    let held = push_body_of(45_000);
    let mut holder = TcpStream::connect(server(&app)).await.unwrap();
    holder
        .write_all(push_head(&bearer("alice"), held.len()).as_bytes())
        .await
        .unwrap();
    holder.write_all(&held[..40_000]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Alice's second body does not fit in her share...
    let body = push_body_of(30_000);
    let mut second = TcpStream::connect(server(&app)).await.unwrap();
    second
        .write_all(push_head(&bearer("alice"), body.len()).as_bytes())
        .await
        .unwrap();
    let _ = second.write_all(&body).await;
    let (answer, _) = read_until_closed(&mut second, Duration::from_secs(5)).await;
    assert_eq!(status_of(&answer), 429, "{answer}");
    assert!(answer.contains("\"code\":\"too_many_requests\""), "{answer}");
    // ...while Bob's does, beside hers and Mallory's.
    let mut bob = TcpStream::connect(server(&app)).await.unwrap();
    bob.write_all(push_head(&bearer("bob"), body.len()).as_bytes())
        .await
        .unwrap();
    bob.write_all(&body).await.unwrap();
    assert_eq!(read_status(&mut bob).await, 200);
    holder.write_all(&held[40_000..]).await.unwrap();
    assert_eq!(read_status(&mut holder).await, 200);
    let scrape = scrape(&app).await;
    assert_eq!(
        value(
            &scrape,
            "mana_sync_requests_shed_total",
            &[("reason", "user_body_budget")]
        ),
        1.0
    );
    drop(declared);
}

/// A body that keeps coming, but too slowly to be done within
/// `BODY_DEADLINE`, is cut there with a 408.
#[apply(both_stores)]
async fn a_body_must_arrive_within_its_deadline_however_steady(store: Backend) {
    let app = store
        .spawn_with(&[("BODY_DEADLINE", "2s"), ("BODY_TIMEOUT", "1s"), ("BODY_MIN_RATE", "1")])
        .await;
    let body = push_body_of(2_000);
    let mut socket = TcpStream::connect(server(&app)).await.unwrap();
    socket
        .write_all(push_head(&bearer("alice"), body.len()).as_bytes())
        .await
        .unwrap();
    // A piece every half second: never a pause of BODY_TIMEOUT, always over BODY_MIN_RATE.
    let started = Instant::now();
    let mut sent = 0;
    let answer = loop {
        let mut buf = [0u8; 4096];
        tokio::select! {
            read = socket.read(&mut buf) => break String::from_utf8_lossy(&buf[..read.unwrap()]).into_owned(),
            _ = tokio::time::sleep(Duration::from_millis(500)) => {
                socket.write_all(&body[sent..sent + 10]).await.unwrap();
                sent += 10;
            }
        }
    };
    assert_eq!(status_of(&answer), 408, "{answer}");
    assert!(started.elapsed() < Duration::from_secs(5), "cut at its deadline");
    assert!(sent < body.len());
    assert_eq!(app.log_rows().await, 0);
}

#[apply(both_stores)]
async fn connections_over_a_limit_are_closed_at_once_and_other_addresses_get_in(store: Backend) {
    let app = store
        .spawn_with(&[("MAX_CONNECTIONS", "8"), ("MAX_CONNECTIONS_PER_ADDRESS", "3")])
        .await;
    // Three idle connections from one address (the harness's own client
    // uses 127.0.0.1): the fourth is closed at once.
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(connect_from(&app, "127.0.0.5").await);
    }
    for socket in &mut held {
        assert!(!closed_at_once(socket).await, "within the limit, a connection is kept");
    }
    let mut fourth = connect_from(&app, "127.0.0.5").await;
    assert!(closed_at_once(&mut fourth).await, "over the address's limit");
    // Another address still gets in.
    assert_eq!(health_from(&app, "127.0.0.2").await, 200);
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Connections from ever new addresses fill the replica: one is closed at once.
    let mut refused = false;
    for n in 10..20 {
        let mut socket = connect_from(&app, &format!("127.0.0.{n}")).await;
        if closed_at_once(&mut socket).await {
            refused = true;
            break;
        }
        held.push(socket);
    }
    assert!(
        refused,
        "the replica's limit of 8 held {} connections and more",
        held.len()
    );
    assert!(held.len() <= 8, "{} connections held", held.len());
    // Closing them lets new ones in.
    drop(held);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(health_from(&app, "127.0.0.5").await, 200);
    let scrape = scrape(&app).await;
    assert_eq!(
        value(&scrape, "mana_sync_connections_refused_total", &[("reason", "address")]),
        1.0
    );
    assert_eq!(
        value(&scrape, "mana_sync_connections_refused_total", &[("reason", "replica")]),
        1.0
    );
}

/// CPU time (user + system) the process `pid` has used, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The fields after the command name, which is in parentheses.
    let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// With few descriptors, the server fits `MAX_CONNECTIONS` to them (and
/// says so) rather than run out: connections over the cap are closed at
/// once, nothing spins, and it serves again when they go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_file_descriptors_the_server_waits_rather_than_spins() {
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let port = common::free_port();
    let log = std::fs::File::create(dir.path().join("log")).unwrap();
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_mana-sync"));
    command
        .env_clear()
        .current_dir(dir.path())
        .env("PORT", port.to_string())
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(log);
    // 64 descriptors, soft and hard: the server cannot raise it.
    unsafe {
        command.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 64,
                rlim_max: 64,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    struct Killed(std::process::Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let server = Killed(command.spawn().unwrap());
    let pid = server.0.id();
    let url = format!("http://127.0.0.1:{port}/health");
    let deadline = Instant::now() + Duration::from_secs(20);
    while reqwest::get(&url).await.is_err() {
        assert!(Instant::now() < deadline, "the server never answered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // More connections than descriptors: the kernel completes them, the server cannot accept them all.
    let mut held = Vec::new();
    for _ in 0..100 {
        held.push(TcpStream::connect(("127.0.0.1", port)).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = cpu_ticks(pid);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let used = cpu_ticks(pid) - before;
    // Spinning on accept burns a core (about 200 ticks in 2 s).
    assert!(
        used < 40,
        "the server used {used} ticks of CPU in 2 s while out of descriptors"
    );
    let log = std::fs::read_to_string(dir.path().join("log")).unwrap();
    assert!(
        log.contains("MAX_CONNECTIONS is more than the open files limit allows"),
        "{log}"
    );
    // Given its descriptors back, it serves again.
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(response) = reqwest::get(&url).await {
            assert_eq!(response.status(), 200);
            break;
        }
        assert!(Instant::now() < deadline, "the server did not recover");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A client that sends its request and then closes its sending side (a
/// half-close) still gets its answer, and its push is applied.
#[apply(both_stores)]
async fn a_request_followed_by_the_clients_fin_is_answered(store: Backend) {
    let app = store.spawn().await;
    let body = push_body_of(300);
    let mut socket = TcpStream::connect(server(&app)).await.unwrap();
    socket
        .write_all(push_head(&bearer("alice"), body.len()).as_bytes())
        .await
        .unwrap();
    socket.write_all(&body).await.unwrap();
    socket.shutdown().await.unwrap();
    let (answer, _) = read_until_closed(&mut socket, Duration::from_secs(5)).await;
    assert_eq!(status_of(&answer), 200, "{answer}");
    assert_eq!(app.log_rows().await, 1);
}
