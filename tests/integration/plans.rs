//! The plans PostgreSQL runs a push with, as the server runs it: each
//! statement planned once per connection, for any parameters.

use crate::common;

use std::time::{Duration, Instant};

use common::app::{Postgres, START, insert, update};
use serde_json::{Value, json};

/// How often PostgreSQL scanned each index of `sync_records`, once the
/// server's connections have reported at least one scan of the primary key
/// (a backend reports its counts within seconds, when idle).
async fn index_scans(pool: &sqlx::PgPool) -> Vec<(String, i64)> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let scans: Vec<(String, i64)> = sqlx::query_as(
            "SELECT indexrelname::text, idx_scan FROM pg_stat_user_indexes
             WHERE relname = 'sync_records' ORDER BY 1",
        )
        .fetch_all(pool)
        .await
        .unwrap();
        if scans.iter().any(|(name, n)| name == "sync_records_pkey" && *n > 0) {
            return scans;
        }
        assert!(
            Instant::now() < deadline,
            "no scan of the primary key reported: {scans:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A push looks the records it folds into up by primary key, also on a new
/// database whose tables have no statistics yet: there PostgreSQL costed
/// the table's delta index (three of the key's four columns) the same as
/// the key, took it, and filtered the user's whole table for each lookup.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_looks_its_records_up_by_key_before_there_are_statistics() {
    let app = Postgres.spawn().await;
    for batch in 0..3 {
        let inserts: Vec<Value> = (0..100)
            .map(|i| {
                insert(
                    "todos",
                    &format!("r{batch}-{i}"),
                    json!({ "updatedAt": "2024-01-01T10:00:00Z" }),
                )
            })
            .collect();
        app.push_ok("alice", "a", START, Value::Array(inserts)).await;
    }
    let admin = app.admin().await;
    let analyzed: Option<i64> = sqlx::query_scalar(
        "SELECT analyze_count + autoanalyze_count FROM pg_stat_user_tables WHERE relname = 'sync_records'",
    )
    .fetch_optional(&admin)
    .await
    .unwrap();
    assert_eq!(analyzed, Some(0), "the table has no statistics yet");

    let updates: Vec<Value> = (0..10)
        .map(|i| {
            update(
                "todos",
                &format!("r1-{i}"),
                "title",
                json!("new"),
                "2024-01-01T10:00:01Z",
            )
        })
        .collect();
    let answer = app.push_ok("alice", "a", START, Value::Array(updates)).await;
    assert_eq!(answer["serverChanges"].as_array().unwrap().len(), 300, "{answer}");

    let scans = index_scans(&admin).await;
    let by_table = scans
        .iter()
        .find(|(name, _)| name == "sync_records_table_delta_idx")
        .unwrap_or_else(|| panic!("no table delta index: {scans:?}"));
    assert_eq!(by_table.1, 0, "pushes never scan a table's delta index: {scans:?}");
}
