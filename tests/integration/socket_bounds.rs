//! What a WebSocket can make the server hold or do: a client that sends
//! pings and never reads is cut off (before and after authentication)
//! without the server queueing its pongs; protocol violations close with
//! their code; a user's sockets share one lookup of the user's tables.

use crate::common;

use common::app::{Backend, Postgres, Sqlite, both_stores};
use rstest::rstest;
use rstest_reuse::apply;

use std::time::{Duration, Instant};

use common::app::{START, TestApp, insert, spawn_app};
use common::metrics::{scrape, value};
use common::tokens;
use common::ws::{self, Event};
use futures_util::SinkExt;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// The server's deadline for a send ([`mana_sync::api::realtime::SEND_TIMEOUT`]).
const SEND_TIMEOUT: Duration = Duration::from_secs(5);

/// A client frame (masked, as a client's must be) with the given first
/// byte (FIN, RSV and opcode) and payload.
fn frame(first: u8, payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() < 126);
    let mask = [0x12, 0x34, 0x56, 0x78];
    let mut out = vec![first, 0x80 | payload.len() as u8];
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

/// A protocol Ping with the largest payload a control frame may carry.
fn big_ping() -> Vec<u8> {
    frame(0x89, &[b'p'; 125])
}

/// The TCP connection under a socket, to write frames to it by hand.
fn raw(socket: ws::Socket) -> TcpStream {
    match socket.into_inner() {
        MaybeTlsStream::Plain(tcp) => tcp,
        _ => unreachable!("the tests use plain TCP"),
    }
}

/// Resident memory of this process (the server runs in it), in bytes.
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kb * 1024
}

/// Writes pings in batches without reading anything, until the server
/// cuts the connection (a write fails) or `limit` passes; returns how
/// many were written and whether the server cut it.
async fn flood_pings(tcp: &mut TcpStream, limit: Duration) -> (usize, bool) {
    let batch: Vec<u8> = std::iter::repeat_n(big_ping(), 1000).flatten().collect();
    let deadline = tokio::time::Instant::now() + limit;
    let mut sent = 0;
    loop {
        match tokio::time::timeout_at(deadline, tcp.write_all(&batch)).await {
            Ok(Ok(())) => sent += 1000,
            Ok(Err(_)) => return (sent, true),
            Err(_) => return (sent, false),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_that_sends_pings_before_auth_gets_a_few_answers_then_1008() {
    let app = spawn_app().await;
    let mut socket = ws::connect(&app, "/ws").await;
    // Text pings and protocol pings, none of whose answers are read while
    // sending: the 16 allowed before `auth`, and one more. (No more than
    // that: a connection closed with data unread is reset, and the client
    // may lose what it was sent.)
    for _ in 0..8 {
        socket
            .feed(Message::text(json!({ "type": "ping" }).to_string()))
            .await
            .unwrap();
        socket.feed(Message::Ping(vec![b'p'; 125].into())).await.unwrap();
    }
    socket
        .feed(Message::text(json!({ "type": "ping" }).to_string()))
        .await
        .unwrap();
    socket.flush().await.unwrap();
    let mut pongs = 0;
    let code = loop {
        match ws::next(&mut socket, Duration::from_secs(5)).await {
            Some(Event::Json(message)) => {
                assert_eq!(message, json!({ "type": "pong" }));
                pongs += 1;
            }
            Some(Event::Closed(code)) => break code,
            None => panic!("the socket was neither answered nor closed"),
        }
    };
    assert_eq!(code, Some(1008), "closed for talking without authenticating");
    assert_eq!(pongs, 8, "the pings before the limit are answered");
}

/// A client that sends pings and never reads, once authenticated (it is
/// then past the frame limit of an unauthenticated one): the server stops
/// reading once its pongs cannot be written, and drops the connection
/// within the send deadline; meanwhile it holds none of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ping_flood_that_never_reads_its_pongs_is_cut_without_growing_the_server() {
    let app = spawn_app().await;
    // (A user without records gets no catch-up on `/ws`.)
    let mut tcp = raw(ws::authed(&app, "/ws", &tokens::token_for("alice"), None).await);
    let before = rss();
    let started = Instant::now();
    // The kernel's buffers (both ends) take a few MB of pongs; past them
    // the server stops reading and, SEND_TIMEOUT later, drops the socket.
    let (sent, cut) = flood_pings(&mut tcp, 6 * SEND_TIMEOUT).await;
    let grown = rss().saturating_sub(before);
    assert!(cut, "the server kept a socket that does not read ({sent} pings sent)");
    assert!(
        started.elapsed() < 4 * SEND_TIMEOUT,
        "cut after {:?}",
        started.elapsed()
    );
    // Unbounded, each ping cost the server its 127-byte pong.
    assert!(grown < 24 << 20, "the server grew {grown} bytes for {sent} pings");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unauthenticated_flood_is_cut_at_once() {
    let app = spawn_app().await;
    let mut tcp = raw(ws::connect(&app, "/ws").await);
    let started = Instant::now();
    let (sent, cut) = flood_pings(&mut tcp, 3 * SEND_TIMEOUT).await;
    assert!(cut, "the server kept the socket ({sent} pings sent)");
    // Well before the 10 s given to authenticate.
    assert!(
        started.elapsed() < 2 * SEND_TIMEOUT,
        "cut after {:?}",
        started.elapsed()
    );
}

/// Reads the server's close frame from a raw connection: its code.
async fn close_code(tcp: TcpStream) -> Option<u16> {
    let mut socket = WebSocketStream::from_raw_socket(MaybeTlsStream::Plain(tcp), Role::Client, None).await;
    ws::expect_close(&mut socket, Duration::from_secs(5)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_violations_close_with_their_code_before_and_after_auth() {
    let app = spawn_app().await;
    // The header of a 65 KiB text frame (its payload would not be read: a
    // connection closed with data unread is reset, losing the close frame).
    let mut too_big = vec![0x81, 0x80 | 127];
    too_big.extend_from_slice(&(65u64 * 1024).to_be_bytes());
    too_big.extend_from_slice(&[0, 0, 0, 0]);

    let mut tcp = raw(ws::connect(&app, "/ws").await);
    tcp.write_all(&too_big).await.unwrap();
    assert_eq!(close_code(tcp).await, Some(1009));

    // (A user without records gets no catch-up on `/ws`.)
    let mut tcp = raw(ws::authed(&app, "/ws", &tokens::token_for("alice"), None).await);
    tcp.write_all(&too_big).await.unwrap();
    assert_eq!(close_code(tcp).await, Some(1009));

    // A frame with a reserved bit set (no extension was agreed).
    let mut tcp = raw(ws::connect(&app, "/ws").await);
    tcp.write_all(&frame(0xC1, b"x")).await.unwrap();
    assert_eq!(close_code(tcp).await, Some(1002));

    // A fragmented control frame, after auth.
    let mut tcp = raw(ws::authed(&app, "/ws", &tokens::token_for("alice"), None).await);
    tcp.write_all(&frame(0x09, b"x")).await.unwrap();
    assert_eq!(close_code(tcp).await, Some(1002));

    // Text that is not UTF-8.
    let mut tcp = raw(ws::connect(&app, "/ws").await);
    tcp.write_all(&frame(0x81, &[0xff, 0xfe])).await.unwrap();
    assert_eq!(close_code(tcp).await, Some(1007));

    // A connection that just goes away gets nothing (and nothing breaks).
    let mut tcp = raw(ws::connect(&app, "/ws").await);
    tcp.write_all(&frame(0x81, b"{")).await.unwrap();
    drop(tcp);
    let mut check = ws::connect(&app, "/ws").await;
    ws::send(&mut check, json!({ "type": "ping" })).await;
    assert_eq!(
        ws::expect_json(&mut check, Duration::from_secs(5)).await["type"],
        "pong"
    );
}

fn lookups(scrape: &common::metrics::Scrape) -> f64 {
    value(scrape, "mana_sync_table_lookups_total", &[])
}

/// Alice's sockets on `app`, each with its catch-up read.
async fn sockets(app: &TestApp, n: usize) -> Vec<ws::Socket> {
    let mut sockets = Vec::new();
    for i in 0..n {
        let client = format!("phone-{i}");
        let mut socket = ws::authed(app, "/ws/todo", &tokens::token_for("alice"), Some(&client)).await;
        let catch_up = ws::catch_up(&mut socket).await;
        assert_eq!(catch_up["tables"], json!(["lists", "notes", "todos"]));
        sockets.push(socket);
    }
    sockets
}

/// The tables one socket is told of, over however many messages, until quiet.
async fn told(socket: &mut ws::Socket) -> Vec<String> {
    let mut tables = Vec::new();
    let mut wait = Duration::from_secs(5);
    while let Some(event) = ws::next(socket, wait).await {
        wait = Duration::from_millis(500);
        let Event::Json(message) = event else {
            panic!("closed: {event:?}")
        };
        assert_eq!(message["type"], "sync-available");
        tables.extend(
            message["tables"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t.as_str().unwrap().to_owned()),
        );
    }
    tables.sort();
    tables.dedup();
    tables
}

/// N sockets of one user cost one lookup of the user's tables, not N: at
/// their catch-ups, and when a push names more tables than are tracked.
#[apply(both_stores)]
async fn a_users_sockets_share_one_lookup_of_the_users_tables(store: Backend) {
    const N: usize = 8;
    let app = store.spawn().await;
    app.push_ok(
        "alice",
        "laptop",
        START,
        json!([
            insert("todos", "t", json!({})),
            insert("notes", "n", json!({})),
            insert("lists", "l", json!({}))
        ]),
    )
    .await;
    let start = scrape(&app).await;
    let mut phones = sockets(&app, N).await;
    let caught_up = scrape(&app).await;
    assert_eq!(lookups(&caught_up) - lookups(&start), 1.0, "{N} catch-ups, one lookup");

    // 65 tables: past the 64 a socket tracks, so "all tables".
    let many: Vec<Value> = (0..65)
        .map(|i| insert(&format!("table_{i:02}"), "r", json!({})))
        .collect();
    app.push_ok("alice", "laptop", START, Value::Array(many)).await;
    for phone in &mut phones {
        assert_eq!(told(phone).await.len(), 68, "every table is named");
    }
    let after = scrape(&app).await;
    // The push named its tables, so the shared answer learnt them: at most
    // one lookup for all the sockets.
    assert!(lookups(&after) - lookups(&caught_up) <= 1.0);
}

/// The same across replicas, where a notice too long for NOTIFY names no
/// table: every socket on the other replica must be told all of them, and
/// one lookup there serves them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notice_of_every_table_from_another_replica_costs_one_lookup() {
    const N: usize = 8;
    let a = spawn_app().await;
    let b = a.spawn_replica(&[]).await;
    a.push_ok(
        "alice",
        "laptop",
        START,
        json!([
            insert("todos", "t", json!({})),
            insert("notes", "n", json!({})),
            insert("lists", "l", json!({}))
        ]),
    )
    .await;
    let mut phones = sockets(&b, N).await;
    b.wait_until_listening().await;
    let before = scrape(&b).await;
    // Long names: the NOTIFY cannot list them (4000 bytes), so it names none.
    let many: Vec<Value> = (0..70)
        .map(|i| insert(&format!("{}_{i:02}", "t".repeat(60)), "r", json!({})))
        .collect();
    a.push_ok("alice", "laptop", START, Value::Array(many)).await;
    for phone in &mut phones {
        assert_eq!(told(phone).await.len(), 73, "every table is named");
    }
    let after = scrape(&b).await;
    assert_eq!(lookups(&after) - lookups(&before), 1.0, "{N} sockets, one lookup");
}
