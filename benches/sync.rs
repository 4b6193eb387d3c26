//! Push and pull latency on both stores (PostgreSQL started like the
//! tests', SQLite in a temporary file), printed as numbers. `cargo bench --bench sync` runs it in full;
//! under `cargo test` (no `--bench` argument) it runs once with tiny sizes
//! as a smoke test.
//!
//! What it shows, on each store: pulling a record updated 10,000 times
//! costs the same as pulling one updated once (the projection), and what a
//! push costs; on PostgreSQL, concurrent commits and cross-replica fan-out;
//! and how long the binary takes from nothing to healthy.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::app::{Postgres, START, Sqlite, TestApp, insert, update};
use mana_sync::store::{Store, Tx};
use serde_json::{Value, json};

struct Sizes {
    history: usize,
    samples: usize,
    batch: usize,
    page: usize,
    writers: usize,
    commits_per_writer: usize,
    cold_starts: usize,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn report(name: &str, mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    let p50 = percentile(&samples, 0.5);
    println!(
        "{name:<48} n={:<5} p50={:>8.3} ms  p99={:>8.3} ms",
        samples.len(),
        p50.as_secs_f64() * 1e3,
        percentile(&samples, 0.99).as_secs_f64() * 1e3
    );
    p50
}

async fn time_pulls(app: &TestApp, user: &str, samples: usize) -> Vec<Duration> {
    let mut out = Vec::with_capacity(samples);
    for _ in 0..samples {
        let started = Instant::now();
        let page = app.pull_ok(user, "todos", START, None).await;
        out.push(started.elapsed());
        assert_eq!(page["serverChanges"].as_array().unwrap().len(), 1);
    }
    out
}

/// One record written once vs one record updated `history` times.
async fn pull_vs_history(app: &TestApp, sizes: &Sizes) {
    app.push_ok(
        "short",
        "d",
        START,
        json!([insert("todos", "r", json!({ "title": "once" }))]),
    )
    .await;
    let mut written = 0;
    let base = 1_704_067_200_000i64; // 2024-01-01, in ms
    while written < sizes.history {
        let n = (sizes.history - written).min(1000);
        let changes: Vec<Value> = (written..written + n)
            .map(|i| {
                let at = mana_sync::timestamp::Timestamp((base + i as i64) * 1_000_000).to_short_string();
                update("todos", "r", "title", json!(format!("v{i}")), &at)
            })
            .collect();
        app.push_ok("long", "d", START, Value::Array(changes)).await;
        written += n;
    }
    analyze(app).await;
    // Warm up both paths.
    time_pulls(app, "short", 10.min(sizes.samples)).await;
    time_pulls(app, "long", 10.min(sizes.samples)).await;
    let once = report(
        "pull, record written once",
        time_pulls(app, "short", sizes.samples).await,
    );
    let many = report(
        &format!("pull, record updated {} times", sizes.history),
        time_pulls(app, "long", sizes.samples).await,
    );
    println!("  ratio (many / once) = {:.2}", many.as_secs_f64() / once.as_secs_f64());
}

/// Gives PostgreSQL's planner statistics, as autovacuum does on a live
/// database (a brand-new table has none, and plans on it can be far off).
/// SQLite's plans for these lookups do not depend on statistics.
async fn analyze(app: &TestApp) {
    if let Store::Postgres(_) = app.store {
        sqlx::query("ANALYZE").execute(&app.admin().await).await.unwrap();
    }
}

/// Pushes as a device does: each push's `since` is the previous answer's
/// `syncedUntil`, so the answer holds just what the push wrote.
async fn push_latency(app: &TestApp, sizes: &Sizes) {
    let mut cursor = START.to_owned();
    for batch in [1, sizes.batch] {
        analyze(app).await;
        let mut samples = Vec::with_capacity(sizes.samples);
        for s in 0..sizes.samples {
            let changes: Vec<Value> = (0..batch)
                .map(|i| insert("todos", &format!("p{batch}-{s}-{i}"), json!({ "title": "x", "n": i })))
                .collect();
            let body = common::app::push_body("d", &cursor, Value::Array(changes));
            let started = Instant::now();
            let response = app.push("pusher", "d", &body).await;
            let answer: Value = response.json().await.unwrap();
            samples.push(started.elapsed());
            assert_eq!(answer["serverChanges"].as_array().unwrap().len(), batch);
            cursor = answer["syncedUntil"].as_str().unwrap().to_owned();
        }
        let p50 = report(&format!("push, {batch} change(s) per batch"), samples);
        println!(
            "  ≈ {:.0} changes/s at p50 on one connection",
            batch as f64 / p50.as_secs_f64()
        );
    }
}

/// A full page: `limit` records in one pull.
async fn pull_page(app: &TestApp, sizes: &Sizes) {
    let changes: Vec<Value> = (0..sizes.page)
        .map(|i| insert("todos", &format!("g{i}"), json!({ "title": "x", "n": i })))
        .collect();
    app.push_ok("pager", "d", START, Value::Array(changes)).await;
    let mut samples = Vec::with_capacity(sizes.samples);
    for _ in 0..sizes.samples.min(50) {
        let started = Instant::now();
        let page = app.pull_ok("pager", "todos", START, Some(sizes.page as u32)).await;
        samples.push(started.elapsed());
        assert_eq!(page["serverChanges"].as_array().unwrap().len(), sizes.page);
    }
    report(&format!("pull, page of {} records", sizes.page), samples);
}

/// Many users committing at once, through the library: without NOTIFY in
/// the transaction (as the server does: its notifier sends them after
/// commit, on its own connection) and with it. A transaction that NOTIFYs
/// takes a database-wide lock at commit; this shows what that costs.
async fn notify_cost(app: &TestApp, sizes: &Sizes) {
    use mana_sync::change_log::{Batch, Change};
    use mana_sync::fold::FieldWrite;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(16)
        .connect(&app.db().app_url)
        .await
        .unwrap();
    let per_writer = sizes.commits_per_writer;
    for announce in [false, true, false, true] {
        let started = Instant::now();
        let writers: Vec<_> = (0..sizes.writers)
            .map(|w| {
                let pool = pool.clone();
                tokio::spawn(async move {
                    let user = format!("writer-{w}");
                    for i in 0..per_writer {
                        let batch = Batch {
                            client_id: "bench".into(),
                            since: mana_sync::cursor::Cursor::START,
                            changes: vec![Change {
                                table: "todos".into(),
                                id: format!("n{i}"),
                                op: mana_sync::protocol::Op::Insert,
                                writes: vec![FieldWrite::timed(
                                    "title",
                                    json!("x"),
                                    mana_sync::timestamp::Timestamp::now(),
                                )],
                                provenance: Default::default(),
                            }],
                        };
                        let tx = mana_sync::store::postgres::begin_for(&pool, &user).await.unwrap();
                        let mut tx = Tx::Postgres(mana_sync::store::postgres::PgTx::new(tx, None));
                        let recorded = mana_sync::sync::record(
                            &mut tx,
                            &user,
                            "todo",
                            &batch,
                            1000,
                            &mana_sync::quota::Quotas::NONE,
                        )
                        .await
                        .unwrap();
                        if announce && let Tx::Postgres(pg) = &mut tx {
                            let notice = mana_sync::sync::notice(&user, "todo", &batch, recorded.first_seq);
                            mana_sync::fanout::announce_in_transaction(pg, &notice).await.unwrap();
                        }
                        tx.commit().await.unwrap();
                    }
                })
            })
            .collect();
        for w in writers {
            w.await.unwrap();
        }
        let commits = sizes.writers * per_writer;
        println!(
            "{:<48} {:>8.0} commits/s ({} writers)",
            if announce {
                "concurrent pushes, NOTIFY in the transaction"
            } else {
                "concurrent pushes, no NOTIFY"
            },
            commits as f64 / started.elapsed().as_secs_f64(),
            sizes.writers
        );
    }
}

/// Push on replica A → `sync-available` on a socket held on replica B.
async fn fan_out_latency(app: &TestApp, sizes: &Sizes) {
    let b = app.spawn_replica(&[]).await;
    let mut socket = common::ws::authed(&b, "/ws/todo", &common::tokens::token_for("fan"), Some("phone")).await;
    common::ws::expect_json(&mut socket, Duration::from_secs(5)).await; // catch-up
    let mut samples = Vec::with_capacity(sizes.samples);
    for i in 0..sizes.samples {
        let body = common::app::push_body("laptop", START, json!([insert("todos", &format!("f{i}"), json!({}))]));
        let started = Instant::now();
        let response = app.push("fan", "laptop", &body).await;
        assert!(response.status().is_success());
        let told = common::ws::expect_json(&mut socket, Duration::from_secs(5)).await;
        samples.push(started.elapsed());
        assert_eq!(told["type"], "sync-available");
    }
    report("push on A → sync-available on B (incl. the push)", samples);
}

/// The binary from start to a healthy `/health`, in an empty directory with
/// no configuration (SQLite and local tokens), as a newcomer runs it.
async fn cold_start(sizes: &Sizes) {
    let mut samples = Vec::with_capacity(sizes.cold_starts);
    for _ in 0..sizes.cold_starts {
        let dir = tempfile::tempdir().unwrap();
        let port = common::free_port();
        let started = Instant::now();
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_mana-sync"))
            .env_clear()
            .env("PORT", port.to_string())
            .current_dir(dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let health = format!("http://127.0.0.1:{port}/health");
        while !reqwest::get(&health).await.is_ok_and(|r| r.status().is_success()) {
            assert!(started.elapsed() < Duration::from_secs(20), "never became healthy");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        samples.push(started.elapsed());
        child.kill().unwrap();
        child.wait().unwrap();
    }
    report("cold start, empty data dir → healthy", samples);
}

/// Push latency of the binary with tracing off (no OTLP endpoint) and on
/// (every span exported to a collector that accepts and discards them).
async fn tracing_overhead(sizes: &Sizes) {
    let sink = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let collector = format!("http://{}", sink.local_addr().unwrap());
    let accept = poem::Route::new().at(
        "/v1/traces",
        poem::post(poem::endpoint::make(|_req: poem::Request| async { "" })),
    );
    tokio::spawn(poem::Server::new_with_acceptor(poem::listener::TcpAcceptor::from_tokio(sink).unwrap()).run(accept));
    for traced in [false, true, false, true] {
        let dir = tempfile::tempdir().unwrap();
        let port = common::free_port();
        let binary = env!("CARGO_BIN_EXE_mana-sync");
        let mut command = std::process::Command::new(binary);
        command
            .env_clear()
            .env("PORT", port.to_string())
            .env("RUST_LOG", "warn")
            // Pushes back to back, as fast as they go: the latency, not the
            // per-user rate limit, is what is measured.
            .env("PUSH_RATE", "0")
            .env("PUSH_BYTES_RATE", "0")
            .current_dir(dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        if traced {
            command.env("OTEL_EXPORTER_OTLP_ENDPOINT", &collector);
        }
        let mut child = command.spawn().unwrap();
        let token = std::process::Command::new(binary)
            .args(["token", "--sub", "bench"])
            .env_clear()
            .current_dir(dir.path())
            .output()
            .unwrap();
        let token = String::from_utf8(token.stdout).unwrap().trim().to_owned();
        let base = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        while !http
            .get(format!("{base}/ready"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut cursor = START.to_owned();
        let mut samples = Vec::with_capacity(sizes.samples);
        for s in 0..sizes.samples + 20 {
            let body = common::app::push_body("d", &cursor, json!([insert("todos", &format!("t{s}"), json!({}))]));
            let started = Instant::now();
            let answer: Value = http
                .post(format!("{base}/sync/todo"))
                .bearer_auth(&token)
                .header("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
                .json(&body)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if s >= 20 {
                samples.push(started.elapsed()); // after a warm-up
            }
            cursor = answer["syncedUntil"].as_str().unwrap().to_owned();
        }
        report(
            if traced {
                "push, 1 change, tracing on (OTLP export)"
            } else {
                "push, 1 change, tracing off"
            },
            samples,
        );
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let sizes = if full {
        Sizes {
            history: 10_000,
            samples: 300,
            batch: 100,
            page: 1000,
            writers: 8,
            commits_per_writer: 200,
            cold_starts: 20,
        }
    } else {
        Sizes {
            history: 20,
            samples: 3,
            batch: 5,
            page: 10,
            writers: 2,
            commits_per_writer: 2,
            cold_starts: 1,
        }
    };
    common::runtime().block_on(async {
        println!("PostgreSQL store");
        let app = Postgres.spawn().await;
        pull_vs_history(&app, &sizes).await;
        push_latency(&app, &sizes).await;
        pull_page(&app, &sizes).await;
        notify_cost(&app, &sizes).await;
        fan_out_latency(&app, &sizes).await;

        println!("SQLite store (a file in a temporary directory, synchronous commits)");
        let app = Sqlite.spawn().await;
        pull_vs_history(&app, &sizes).await;
        push_latency(&app, &sizes).await;
        pull_page(&app, &sizes).await;
        cold_start(&sizes).await;

        println!("The binary on SQLite, as a client sees it");
        tracing_overhead(&sizes).await;
    });
    if !full {
        println!("bench smoke run: 1 passed, 0 failed");
    }
}
