//! What one user, or a client that stops reading, can hold of a replica:
//! answers a client never takes are dropped at `SEND_TIMEOUT` and counted
//! against `ANSWER_BUDGET` until then; a user has at most
//! `MAX_REQUESTS_PER_USER` requests in flight; a user's push bytes are
//! slowed to `PUSH_BYTES_RATE`, and refused only past a 10 s wait.

use crate::common;

use std::time::{Duration, Instant};

use common::app::{APP, Backend, Postgres, START, Sqlite, TestApp, both_stores, expect_error, insert, push_body};
use common::metrics::{scrape, value};
use reqwest::StatusCode;
use rstest::rstest;
use rstest_reuse::apply;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// The server's socket address.
fn server(app: &TestApp) -> std::net::SocketAddr {
    app.address.trim_start_matches("http://").parse().unwrap()
}

/// Alice's 1,000 records of 8 kB: a pull of them all is an 8 MB answer,
/// more than the kernel's socket buffers hold.
async fn eight_megabytes(app: &TestApp) {
    for batch in 0..4 {
        let changes: Vec<_> = (0..250)
            .map(|i| insert("todos", &format!("r{batch}-{i}"), json!({ "pad": "x".repeat(8000) })))
            .collect();
        app.push_ok("alice", "a", START, json!(changes)).await;
    }
}

/// A connection that asks for alice's whole collection and never reads
/// the answer (its receive buffer kept small).
async fn unread_pull(app: &TestApp) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(server(app)).await.unwrap();
    let request = format!(
        "GET /sync/{APP}/pull?collection=todos&limit=1000 HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {}\r\n\r\n",
        common::tokens::token_for("alice")
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    stream
}

async fn answer_bytes_held(app: &TestApp) -> f64 {
    value(&scrape(app).await, "mana_sync_answer_bytes_held", &[])
}

#[apply(both_stores)]
async fn answers_never_taken_are_dropped_and_bound_what_the_replica_holds(store: Backend) {
    let app = store
        .spawn_with(&[("SEND_TIMEOUT", "3s"), ("ANSWER_BUDGET", "20000000")])
        .await;
    eight_megabytes(&app).await;
    let mut unread = Vec::new();
    for _ in 0..4 {
        unread.push(unread_pull(&app).await);
    }
    // Built, and stuck behind clients that do not read.
    let deadline = Instant::now() + Duration::from_secs(30);
    while answer_bytes_held(&app).await < 20e6 {
        assert!(Instant::now() < deadline, "the answers were built");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Over the budget, other requests are told to come back...
    let refused = app.pull("bob", "todos", START, None).await;
    assert_eq!(refused.headers()["retry-after"], "1");
    expect_error(refused, StatusCode::SERVICE_UNAVAILABLE, "overloaded").await;
    // ...until the clients that do not read are cut off, and their answers dropped.
    let deadline = Instant::now() + Duration::from_secs(20);
    while answer_bytes_held(&app).await > 0.0 {
        assert!(Instant::now() < deadline, "answers never taken are still held");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    app.pull_ok("bob", "todos", START, None).await;
    for mut stream in unread {
        let mut received = 0;
        let mut buf = vec![0u8; 65536];
        loop {
            match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(n)) => received += n,
                Err(_) => panic!("the connection was left open"),
            }
        }
        assert!(received < 8_000_000, "only part of the answer went: {received} bytes");
    }
    let scrape = scrape(&app).await;
    assert_eq!(
        value(&scrape, "mana_sync_requests_shed_total", &[("reason", "answer_budget")]),
        1.0
    );
}

/// One user's answers that are not taken hold only that user's share:
/// the user's new requests get 429, other users are served.
#[apply(both_stores)]
async fn one_users_answers_not_taken_hold_only_a_share(store: Backend) {
    let app = store
        .spawn_with(&[("SEND_TIMEOUT", "3s"), ("ANSWER_BUDGET_PER_USER", "20000000")])
        .await;
    eight_megabytes(&app).await;
    let mut unread = Vec::new();
    for _ in 0..3 {
        unread.push(unread_pull(&app).await);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while answer_bytes_held(&app).await < 20e6 {
        assert!(Instant::now() < deadline, "the answers were built");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let refused = app.pull("alice", "todos", START, None).await;
    expect_error(refused, StatusCode::TOO_MANY_REQUESTS, "too_many_requests").await;
    app.pull_ok("bob", "todos", START, None).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while answer_bytes_held(&app).await > 0.0 {
        assert!(Instant::now() < deadline, "answers never taken are still held");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    app.pull_ok("alice", "todos", START, Some(1)).await;
    assert_eq!(
        value(
            &scrape(&app).await,
            "mana_sync_requests_shed_total",
            &[("reason", "user_answer_budget")]
        ),
        1.0
    );
    drop(unread);
}

/// A client that takes its answer slowly but steadily, faster than
/// `SEND_MIN_RATE`, gets all of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_on_pace_gets_its_whole_answer() {
    let app = Sqlite
        .spawn_with(&[("SEND_TIMEOUT", "1s"), ("SEND_MIN_RATE", "1000")])
        .await;
    app.push_ok(
        "alice",
        "a",
        START,
        json!([insert("todos", "big", json!({ "pad": "x".repeat(400_000) }))]),
    )
    .await;
    let mut stream = unread_pull(&app).await;
    let mut received = Vec::new();
    let mut buf = vec![0u8; 32768];
    // 32 kB every 200 ms: 160 kB/s, slow against loopback, well over the floor.
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        match stream.read(&mut buf).await.unwrap() {
            0 => break,
            n => received.extend_from_slice(&buf[..n]),
        }
        if complete(&received) {
            break;
        }
    }
    let text = String::from_utf8_lossy(&received);
    assert!(text.starts_with("HTTP/1.1 200"), "{}", &text[..100.min(text.len())]);
    assert!(text.contains(&"x".repeat(400_000)), "the whole answer arrived");
}

/// Whether `raw` holds a whole HTTP answer (head and `Content-Length` bytes).
fn complete(raw: &[u8]) -> bool {
    let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&raw[..end]).to_lowercase();
    let length: usize = head
        .lines()
        .find_map(|line| line.strip_prefix("content-length: "))
        .and_then(|n| n.trim().parse().ok())
        .expect("an answer of known length");
    raw.len() >= end + 4 + length
}

/// One user's requests in flight are bounded; over it a request waits
/// briefly, then gets a 429, while other users go on.
#[apply(both_stores)]
async fn a_user_has_only_so_many_requests_in_flight(store: Backend) {
    let app = store.spawn_with(&[("MAX_REQUESTS_PER_USER", "2")]).await;
    // Two pushes whose bodies have not finished arriving hold alice's two slots.
    let mut holders = Vec::new();
    for _ in 0..2 {
        let mut socket = TcpStream::connect(server(&app)).await.unwrap();
        let head = format!(
            "POST /sync/{APP} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {}\r\n\
             Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"clientId\"",
            common::tokens::token_for("alice")
        );
        socket.write_all(head.as_bytes()).await.unwrap();
        holders.push(socket);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let refused = app.pull("alice", "todos", START, None).await;
    expect_error(refused, StatusCode::TOO_MANY_REQUESTS, "too_many_requests").await;
    app.pull_ok("bob", "todos", START, None).await;
    drop(holders);
    tokio::time::sleep(Duration::from_millis(200)).await;
    app.pull_ok("alice", "todos", START, None).await;
    assert_eq!(
        value(
            &scrape(&app).await,
            "mana_sync_requests_shed_total",
            &[("reason", "user_requests")]
        ),
        1.0
    );
}

/// A push of `bytes` bytes by alice (one record padded to the size).
fn push_of(id: &str, bytes: usize) -> serde_json::Value {
    push_body(
        "a",
        START,
        json!([insert("todos", id, json!({ "pad": "x".repeat(bytes) }))]),
    )
}

/// Past its byte rate a user's pushes are slowed, and refused only when
/// the wait would pass 10 s; nothing refused is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_users_push_bytes_are_slowed_then_refused() {
    let app = Sqlite.spawn_with(&[("PUSH_BYTES_RATE", "50000")]).await;
    // The bucket holds one body of the largest size (10 MiB).
    assert_eq!(
        app.push("alice", "a", &push_of("one", 10_400_000)).await.status(),
        StatusCode::OK
    );
    // A few hundred kB over: it waits a few seconds, then goes through.
    let started = Instant::now();
    assert_eq!(
        app.push("alice", "a", &push_of("two", 500_000)).await.status(),
        StatusCode::OK
    );
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "slowed: {:?}",
        started.elapsed()
    );
    // A megabyte over: twenty seconds' wait is too long; refused before its body is read.
    let refused = app.push("alice", "a", &push_of("three", 1_000_000)).await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    let wait: u64 = refused.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(wait > 10, "{wait}");
    expect_error(refused, StatusCode::TOO_MANY_REQUESTS, "rate_limited").await;
    // Other users are not slowed.
    let started = Instant::now();
    assert_eq!(
        app.push("bob", "a", &push_of("b", 1_000_000)).await.status(),
        StatusCode::OK
    );
    assert!(started.elapsed() < Duration::from_millis(1500));
    assert_eq!(app.log_rows().await, 3);
    assert_eq!(
        value(
            &scrape(&app).await,
            "mana_sync_throttled_total",
            &[("action", "push_bytes")]
        ),
        1.0
    );
}
