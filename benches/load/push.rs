//! Pushing: a device's batch as the original client sends it, a load of
//! many devices pushing at once, and the ceiling the same rows meet when
//! plain SQL inserts them.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use mana_sync::timestamp::Timestamp;
use serde::Deserialize;
use serde_json::{Value, json};
use sqlx::postgres::PgPoolOptions;

use crate::common::app::APP;
use crate::common::tokens;
use crate::measure::{CpuMeter, CpuShares, Latencies, Progress};

/// The collection every scenario writes.
pub const TABLE: &str = "todos";

/// One device of one user: its token and the cursor it synced to last.
pub struct Device {
    pub user: String,
    pub client: String,
    pub token: String,
    pub cursor: String,
    /// Batches sent so far (which records the next one updates).
    sent: usize,
}

/// What a push or pull answers, as far as a device needs it.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Answer {
    pub server_changes: Vec<serde::de::IgnoredAny>,
    pub synced_until: String,
    pub has_more: bool,
}

impl Device {
    pub fn new(user: impl Into<String>, client: impl Into<String>) -> Device {
        let user = user.into();
        Device {
            token: tokens::token_for(&user),
            user,
            client: client.into(),
            cursor: "1970-01-01T00:00:00.000Z".to_owned(),
            sent: 0,
        }
    }

    /// The next batch of `n` updates of 3 fields each, over `records`
    /// records (`r0`…), stamped now.
    pub fn updates(&mut self, n: usize, records: usize) -> Vec<Value> {
        let at = Timestamp::now().to_short_string();
        let first = self.sent * n;
        self.sent += 1;
        (first..first + n)
            .map(|i| {
                json!({
                    "table": TABLE,
                    "id": format!("r{}", i % records),
                    "op": "update",
                    "fields": {
                        "title": { "value": format!("title {i}"), "updatedAt": at },
                        "done": { "value": i % 2 == 0, "updatedAt": at },
                        "rank": { "value": i, "updatedAt": at },
                    },
                })
            })
            .collect()
    }

    /// Inserts of records `first..first + n`, 3 fields each.
    pub fn inserts(first: usize, n: usize) -> Vec<Value> {
        let at = Timestamp::now().to_short_string();
        (first..first + n)
            .map(|i| {
                json!({
                    "table": TABLE,
                    "id": format!("r{i}"),
                    "op": "insert",
                    "data": { "id": format!("r{i}"), "title": format!("title {i}"), "done": false, "rank": i, "updatedAt": at },
                })
            })
            .collect()
    }

    /// Pushes `changes` to `base` and moves the cursor to the answer's.
    pub async fn push(&mut self, http: &reqwest::Client, base: &str, changes: Vec<Value>) -> Result<Answer, String> {
        let body = json!({ "clientId": self.client, "since": self.cursor, "changes": changes });
        let response = http
            .post(format!("{base}/sync/{APP}"))
            .bearer_auth(&self.token)
            .header("X-Client-Id", &self.client)
            .json(&body)
            .send()
            .await;
        let answer = answer(response).await?;
        self.cursor.clone_from(&answer.synced_until);
        Ok(answer)
    }

    /// Pulls one page of the collection since `since`.
    pub async fn pull(&self, http: &reqwest::Client, base: &str, since: &str) -> Result<Answer, String> {
        Answer::parse(&self.pull_body(http, base, since).await?)
    }

    /// A pull's answer as received, unread: its latency ends with its last byte.
    pub async fn pull_body(&self, http: &reqwest::Client, base: &str, since: &str) -> Result<bytes::Bytes, String> {
        received(self.pull_request(http, base, since).send().await).await
    }

    /// A pull of the collection since `since`, to send.
    pub fn pull_request(&self, http: &reqwest::Client, base: &str, since: &str) -> reqwest::RequestBuilder {
        http.get(format!("{base}/sync/{APP}/pull"))
            .query(&[("collection", TABLE), ("since", since)])
            .bearer_auth(&self.token)
            .header("X-Client-Id", &self.client)
    }
}

impl Answer {
    pub fn parse(body: &[u8]) -> Result<Answer, String> {
        serde_json::from_slice(body).map_err(|e| format!("unreadable answer: {e}"))
    }
}

async fn answer(response: reqwest::Result<reqwest::Response>) -> Result<Answer, String> {
    Answer::parse(&received(response).await?)
}

/// The body of a successful answer.
async fn received(response: reqwest::Result<reqwest::Response>) -> Result<bytes::Bytes, String> {
    let response = response.map_err(|e| format!("request failed: {e}"))?;
    let status = response.status();
    let body = response.bytes().await.map_err(|e| format!("reading the answer: {e}"))?;
    if !status.is_success() {
        return Err(format!("{status}: {}", String::from_utf8_lossy(&body)));
    }
    Ok(body)
}

/// A push load: `clients` connections pushing batches of `batch` updates
/// for `duration`, each for the next of `users` users (one device each, so
/// a device's pushes follow one another as the original client's do).
pub struct Load {
    pub batch: usize,
    pub clients: usize,
    pub users: usize,
    pub duration: Duration,
}

/// What a load achieved.
pub struct Outcome {
    pub changes: u64,
    pub elapsed: Duration,
    pub latencies: Latencies,
    pub cpu: CpuShares,
}

impl Outcome {
    pub fn per_second(&self) -> f64 {
        self.changes as f64 / self.elapsed.as_secs_f64()
    }
}

/// Runs `load` against `base` with users named `<label>-<i>`; any failed
/// push ends the benchmark (a load that loses pushes measures nothing).
pub async fn run(base: &str, load: &Load, label: &str, servers: &[u32]) -> Outcome {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(load.clients)
        .build()
        .expect("an HTTP client");
    let devices: Arc<Vec<tokio::sync::Mutex<Device>>> = Arc::new(
        (0..load.users)
            .map(|u| tokio::sync::Mutex::new(Device::new(format!("{label}-{u}"), "load")))
            .collect(),
    );
    let next = Arc::new(AtomicUsize::new(0));
    let changes = Arc::new(AtomicU64::new(0));
    let progress = Progress::start(label.to_owned(), "changes", changes.clone());
    let meter = CpuMeter::start(servers);
    let started = Instant::now();
    let deadline = started + load.duration;
    let tasks: Vec<_> = (0..load.clients)
        .map(|_| {
            let (http, devices, next, changes) = (http.clone(), devices.clone(), next.clone(), changes.clone());
            let (base, batch) = (base.to_owned(), load.batch);
            tokio::spawn(async move {
                let mut latencies = Latencies::default();
                while Instant::now() < deadline {
                    let mut device = devices[next.fetch_add(1, Ordering::Relaxed) % devices.len()]
                        .lock()
                        .await;
                    let batch_changes = device.updates(batch, 1000);
                    let sent = Instant::now();
                    if let Err(e) = device.push(&http, &base, batch_changes).await {
                        panic!("a push of {} failed: {e}", device.user);
                    }
                    latencies.record(sent.elapsed());
                    changes.fetch_add(batch as u64, Ordering::Relaxed);
                }
                latencies
            })
        })
        .collect();
    let mut latencies = Latencies::default();
    for task in tasks {
        latencies.merge(&task.await.expect("a load task"));
    }
    let elapsed = started.elapsed();
    let cpu = meter.stop();
    drop(progress);
    Outcome {
        changes: changes.load(Ordering::Relaxed),
        elapsed,
        latencies,
        cpu,
    }
}

/// The raw limit: `connections` connections inserting `rows` rows per
/// transaction, the same rows a push of 3-field updates appends, into a
/// copy of `sync_changes` (its indexes, no row-level security), for
/// `duration`. Returns rows per second.
pub async fn ceiling(admin_url: &str, rows: usize, connections: usize, duration: Duration) -> (f64, CpuShares) {
    let pool = PgPoolOptions::new()
        .max_connections(connections as u32)
        .connect(admin_url)
        .await
        .expect("connect for the ceiling");
    sqlx::query("CREATE TABLE IF NOT EXISTS load_ceiling (LIKE sync_changes INCLUDING ALL)")
        .execute(&pool)
        .await
        .expect("create the ceiling's table");
    let inserted = Arc::new(AtomicU64::new(0));
    let progress = Progress::start(
        format!("ceiling, {rows} rows/tx, {connections} connections"),
        "rows",
        inserted.clone(),
    );
    let meter = CpuMeter::start(&[]);
    let started = Instant::now();
    let deadline = started + duration;
    let tasks: Vec<_> = (0..connections)
        .map(|c| {
            let (pool, inserted) = (pool.clone(), inserted.clone());
            tokio::spawn(async move {
                let user = format!("ceiling-{}-{c}", uuid::Uuid::now_v7().simple());
                let mut seq = 0i64;
                while Instant::now() < deadline {
                    let at = Timestamp::now().to_short_string();
                    let seqs: Vec<i64> = (seq..seq + rows as i64).collect();
                    seq += rows as i64;
                    let ids: Vec<uuid::Uuid> = seqs.iter().map(|_| uuid::Uuid::now_v7()).collect();
                    let records: Vec<String> = seqs.iter().map(|s| format!("r{}", s % 1000)).collect();
                    let data: Vec<Value> = seqs
                        .iter()
                        .map(|s| json!({ "title": format!("title {s}"), "done": s % 2 == 0, "rank": s }))
                        .collect();
                    let stamps: Vec<Value> = seqs
                        .iter()
                        .map(|_| json!({ "title": at, "done": at, "rank": at }))
                        .collect();
                    sqlx::query(
                        "INSERT INTO load_ceiling (id, seq, app_id, table_name, record_id, user_id, op, data, field_timestamps, untimed, client_id)
                         SELECT u.id, u.seq, 'todo', 'todos', u.record_id, $1, 'update', u.data, u.stamps, false, 'load'
                         FROM UNNEST($2::uuid[], $3::bigint[], $4::text[], $5::jsonb[], $6::jsonb[])
                           AS u(id, seq, record_id, data, stamps)",
                    )
                    .bind(&user)
                    .bind(ids)
                    .bind(seqs)
                    .bind(records)
                    .bind(data)
                    .bind(stamps)
                    .execute(&pool)
                    .await
                    .expect("a ceiling insert");
                    inserted.fetch_add(rows as u64, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("a ceiling task");
    }
    let rate = inserted.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();
    let cpu = meter.stop();
    drop(progress);
    pool.close().await;
    (rate, cpu)
}

/// The statements PostgreSQL ran since `reset` (pg_stat_statements must
/// be preloaded: `--statements`), by total time, as calls per push and
/// mean time each: what a push costs the database, round trip by round trip.
pub struct Statements {
    pool: sqlx::PgPool,
}

impl Statements {
    pub async fn reset(admin_url: &str) -> Statements {
        let pool = sqlx::PgPool::connect(admin_url)
            .await
            .expect("connect for pg_stat_statements");
        sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            .execute(&pool)
            .await
            .expect("pg_stat_statements (run with --statements)");
        sqlx::query("SELECT pg_stat_statements_reset()")
            .execute(&pool)
            .await
            .expect("reset pg_stat_statements");
        Statements { pool }
    }

    /// Prints the statements run since the reset, `pushes` pushes in all.
    pub async fn print(self, pushes: u64) {
        let rows: Vec<(String, i64, f64, i64)> = sqlx::query_as(
            "SELECT regexp_replace(query, '\\s+', ' ', 'g'), calls, total_exec_time, rows
             FROM pg_stat_statements WHERE calls > 0 AND query NOT LIKE '%pg_stat_statements%'
             ORDER BY total_exec_time DESC LIMIT 15",
        )
        .fetch_all(&self.pool)
        .await
        .expect("read pg_stat_statements");
        let total: f64 = rows.iter().map(|r| r.2).sum();
        eprintln!("  statements, {pushes} pushes: calls/push, mean µs, share of execution time");
        for (query, calls, time, _rows) in rows {
            let query: String = query.chars().take(110).collect();
            eprintln!(
                "  {:>6.2} {:>8.1} {:>5.1}%  {query}",
                calls as f64 / pushes.max(1) as f64,
                time * 1e3 / calls as f64,
                time / total * 100.0
            );
        }
        self.pool.close().await;
    }
}
