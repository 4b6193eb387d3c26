//! Figures for issue 25's findings 2 and 5, against a server binary
//! (`MANA_SYNC_BIN`, by default this build's): run with
//! `cargo test --test integration measure_bounds:: -- --ignored --nocapture`, once per
//! binary to compare. They print what they measure and assert nothing
//! about it; they are not part of the suite.

use crate::common;

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::app::{START, insert};
use common::process::{ServerProcess, answered, outside_cargo};
use common::tokens::{self, JwksServer};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::MaybeTlsStream;
use tokio_tungstenite::tungstenite::Message;

fn binary() -> String {
    std::env::var("MANA_SYNC_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_mana-sync").to_owned())
}

/// The server binary on `storage` (`DATABASE_URL`, `DATA_DIR`), answering at the returned address.
async fn server(jwks: &JwksServer, storage: &[(&str, String)]) -> (ServerProcess, String) {
    let port = common::free_port();
    let mut command = outside_cargo(binary());
    command
        .env_clear()
        .env("HOST", "127.0.0.1")
        .env("PORT", port.to_string())
        .env("JWKS_URL", &jwks.url)
        .env("JWT_ISSUER", tokens::ISSUER)
        .env("JWT_AUDIENCE", tokens::AUDIENCE)
        .env("PUSH_RATE", "0")
        .env("PULL_RATE", "0")
        .env("OPEN_RATE", "0")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (k, v) in storage {
        command.env(k, v);
    }
    let mut child: Child = command.spawn().unwrap();
    let address = format!("127.0.0.1:{port}");
    answered(&mut child, &format!("http://{address}/health")).await;
    (ServerProcess(child), address)
}

fn rss_of(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

fn ping_frame() -> Vec<u8> {
    let mask = [1u8, 2, 3, 4];
    let mut out = vec![0x89, 0x80 | 125];
    out.extend_from_slice(&mask);
    out.extend((0..125).map(|i| b'p' ^ mask[i % 4]));
    out
}

/// Finding 2: a socket that never authenticates and never reads, sent
/// up to a million 125-byte pings within 9 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn measure_unauthenticated_ping_flood() {
    let jwks = JwksServer::start_default().await;
    for sockets in [1usize, 4] {
        // A fresh server each time: an allocator keeps what it was given.
        let dir = tempfile::tempdir().unwrap();
        let (server, address) = server(&jwks, &[("DATA_DIR", dir.path().display().to_string())]).await;
        let pid = server.0.id();
        let before = rss_of(pid);
        let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(before));
        let sampler = {
            let peak = peak.clone();
            tokio::spawn(async move {
                loop {
                    peak.fetch_max(rss_of(pid), std::sync::atomic::Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        };
        let started = Instant::now();
        let floods = (0..sockets).map(|_| {
            let address = address.clone();
            async move {
                let (socket, _) = tokio_tungstenite::connect_async(format!("ws://{address}/ws"))
                    .await
                    .unwrap();
                let MaybeTlsStream::Plain(mut tcp) = socket.into_inner() else {
                    unreachable!()
                };
                let batch: Vec<u8> = std::iter::repeat_n(ping_frame(), 1000).flatten().collect();
                let deadline = tokio::time::Instant::now() + Duration::from_secs(9);
                let mut sent = 0;
                let mut cut = None;
                while sent < 1_000_000 {
                    match tokio::time::timeout_at(deadline, tcp.write_all(&batch)).await {
                        Ok(Ok(())) => sent += 1000,
                        Ok(Err(_)) => {
                            cut = Some(started.elapsed());
                            break;
                        }
                        Err(_) => break,
                    }
                }
                (sent, cut, tcp)
            }
        });
        let results = futures_util::future::join_all(floods).await;
        let after = rss_of(pid);
        sampler.abort();
        let peak = peak.load(std::sync::atomic::Ordering::Relaxed);
        for (sent, cut, _) in &results {
            println!("{sockets} socket(s): {sent} pings written, cut by the server: {cut:?}");
        }
        println!(
            "{sockets} socket(s): server RSS {} MB before, {} MB peak, {} MB after ({:?})",
            before >> 20,
            peak >> 20,
            after >> 20,
            started.elapsed()
        );
        drop(results);
        drop(server);
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Finding 5: user B's push latency while user A (many records, 20
/// sockets) pushes batches touching 65 tables ("all tables").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn measure_push_latency_under_all_table_notices() {
    let records: i64 = std::env::var("RECORDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(200_000);
    let jwks = JwksServer::start_default().await;
    let db = common::pg::test_database().await;
    let (_server, address) = server(&jwks, &[("DATABASE_URL", db.app_url.clone())]).await;
    let http = reqwest::Client::new();
    let push = {
        let http = http.clone();
        let url = format!("http://{address}/sync/todo");
        move |user: &'static str, client: &'static str, since: String, changes: Value| {
            let http = http.clone();
            let url = url.clone();
            async move {
                let response = http
                    .post(url)
                    .bearer_auth(tokens::token_for(user))
                    .json(&common::app::push_body(client, &since, changes))
                    .send()
                    .await
                    .unwrap();
                assert!(response.status().is_success(), "{}", response.status());
                let answer: Value = response.json().await.unwrap();
                answer["syncedUntil"].as_str().unwrap().to_owned()
            }
        }
    };
    // Each pushes from its last cursor, as a client does, so answers stay small.
    let alice_since = push(
        "alice",
        "laptop",
        START.to_owned(),
        json!([insert("seed", "s", json!({}))]),
    )
    .await;
    let bob_since = push(
        "bob",
        "phone",
        START.to_owned(),
        json!([insert("todos", "b", json!({}))]),
    )
    .await;
    let admin = db.admin_pool().await;
    sqlx::query(
        "INSERT INTO sync_records (user_id, app_id, table_name, record_id, fields, created_seq, touched_seq)
         SELECT 'alice', 'todo', 'bulk_' || (i % 10), 'r' || i, '{}'::jsonb, i, i FROM generate_series(1, $1) i",
    )
    .bind(records)
    .execute(&admin)
    .await
    .unwrap();
    sqlx::query("ANALYZE sync_records").execute(&admin).await.unwrap();

    let bob = |n: usize| {
        let push = push.clone();
        let mut since = bob_since.clone();
        async move {
            let mut latencies = Vec::new();
            for i in 0..n {
                let started = Instant::now();
                since = push(
                    "bob",
                    "phone",
                    since,
                    json!([insert("todos", &format!("b{i}"), json!({ "n": i }))]),
                )
                .await;
                latencies.push(started.elapsed());
            }
            latencies.sort();
            latencies
        }
    };
    let quiet = bob(100).await;
    println!(
        "bob alone: p50 {:?} p99 {:?}",
        percentile(&quiet, 0.5),
        percentile(&quiet, 0.99)
    );

    let mut sockets = Vec::new();
    for i in 0..20 {
        let (mut socket, _) = tokio_tungstenite::connect_async(format!("ws://{address}/ws/todo?clientId=phone{i}"))
            .await
            .unwrap();
        socket
            .send(Message::text(
                json!({ "type": "auth", "token": tokens::token_for("alice") }).to_string(),
            ))
            .await
            .unwrap();
        sockets.push(tokio::spawn(async move {
            let mut messages = 0u64;
            while let Some(Ok(_)) = socket.next().await {
                messages += 1;
            }
            messages
        }));
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let alice = {
        let stop = stop.clone();
        let push = push.clone();
        let mut since = alice_since;
        tokio::spawn(async move {
            let mut pushes = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let changes: Vec<Value> = (0..65)
                    .map(|t| insert(&format!("t{t:02}"), &format!("r{pushes}"), json!({})))
                    .collect();
                since = push("alice", "laptop", since, Value::Array(changes)).await;
                pushes += 1;
            }
            pushes
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let busy = bob(200).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let pushes = alice.await.unwrap();
    let metrics = http
        .get(format!("http://{address}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let lookups = metrics
        .lines()
        .find(|l| l.starts_with("mana_sync_table_lookups_total"))
        .unwrap_or("mana_sync_table_lookups_total (not counted by this build)");
    println!(
        "with alice ({records} records, 20 sockets, {pushes} pushes of 65 tables): bob p50 {:?} p99 {:?}; {lookups}",
        percentile(&busy, 0.5),
        percentile(&busy, 0.99)
    );
    for socket in sockets {
        socket.abort();
    }
}

/// Finding 5, streams: database transactions for one push touching 100
/// collections while 20 streams follow them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn measure_stream_transactions_per_push() {
    use eventsource_stream::Eventsource;
    let jwks = JwksServer::start_default().await;
    let db = common::pg::test_database().await;
    let (_server, address) = server(&jwks, &[("DATABASE_URL", db.app_url.clone())]).await;
    let http = reqwest::Client::new();
    let tables: Vec<String> = (0..100).map(|i| format!("c{i:03}")).collect();
    let push = |changes: Value| {
        let http = http.clone();
        let url = format!("http://{address}/sync/todo");
        async move {
            let response = http
                .post(url)
                .bearer_auth(tokens::token_for("alice"))
                .json(&common::app::push_body("laptop", START, changes))
                .send()
                .await
                .unwrap();
            assert!(response.status().is_success());
        }
    };
    push(Value::Array(tables.iter().map(|t| insert(t, "a", json!({}))).collect())).await;
    let events = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut streams = Vec::new();
    for _ in 0..20 {
        let response = http
            .get(format!("http://{address}/sync/todo/stream"))
            .bearer_auth(tokens::token_for("alice"))
            .query(&[("collections", tables.join(","))])
            .send()
            .await
            .unwrap();
        assert!(response.status().is_success());
        let events = events.clone();
        streams.push(tokio::spawn(async move {
            let mut stream = response.bytes_stream().eventsource();
            while let Some(Ok(event)) = stream.next().await {
                if event.event == "changes" {
                    events.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }));
    }
    let admin = db.admin_pool().await;
    let transactions = || {
        let admin = admin.clone();
        let name = db.name.clone();
        async move {
            // Backends report their counts at most every second, idle ones within 10 s.
            tokio::time::sleep(Duration::from_secs(12)).await;
            let (n,): (i64,) =
                sqlx::query_as("SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = $1")
                    .bind(name)
                    .fetch_one(&admin)
                    .await
                    .unwrap();
            n
        }
    };
    let start = transactions().await;
    let caught_up = events.load(std::sync::atomic::Ordering::Relaxed);
    let quiet = transactions().await;
    push(Value::Array(tables.iter().map(|t| insert(t, "b", json!({}))).collect())).await;
    let pushed = transactions().await;
    let told = events.load(std::sync::atomic::Ordering::Relaxed) - caught_up;
    println!(
        "20 streams x 100 collections: {caught_up} catch-up events; idle 12 s: {} transactions; \
         one push of 100 tables: {} transactions (less the idle count), {told} events",
        quiet - start,
        (pushed - quiet) - (quiet - start),
    );
    for stream in streams {
        stream.abort();
    }
}
