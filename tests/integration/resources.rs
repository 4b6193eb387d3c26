//! The database running out of what it needs, and replicas that stop
//! half-way: a full disk is a 503 with `Retry-After` that also turns
//! `/ready` 503, and a replica frozen inside a push holds its user's
//! other replicas only briefly.

use crate::common;

use common::app::{Backend, START, Sqlite, expect_error, insert, push_body};
use mana_sync::store::Store;
use reqwest::StatusCode;
use serde_json::json;

/// A push of one new record `id`.
async fn push(app: &common::app::TestApp, id: &str) -> reqwest::Response {
    let body = push_body(
        "a",
        START,
        json!([insert("todos", id, json!({ "pad": "x".repeat(4000) }))]),
    );
    app.push("alice", "a", &body).await
}

/// SQLite's file may not grow past `max_page_count`: a full disk as the
/// store sees it (`SQLITE_FULL`), on the one writer connection.
async fn set_max_pages(app: &common::app::TestApp, pages: &str) {
    let Store::Sqlite(store) = &app.store else {
        panic!("a SQLite store")
    };
    let (writer, _) = store.pools();
    sqlx::query(sqlx::AssertSqlSafe(format!("PRAGMA max_page_count = {pages}")))
        .execute(writer)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_is_a_503_with_retry_after_and_the_replica_is_not_ready_until_a_write_passes() {
    let app = Sqlite.spawn().await;
    assert_eq!(push(&app, "before").await.status(), StatusCode::OK);
    let pages: i64 = app.count("SELECT page_count FROM pragma_page_count()").await;
    set_max_pages(&app, &pages.to_string()).await;

    let mut full = None;
    for i in 0..50 {
        let response = push(&app, &format!("r{i}")).await;
        if response.status() != StatusCode::OK {
            full = Some(response);
            break;
        }
    }
    let full = full.expect("the file filled up");
    assert_eq!(full.headers()["retry-after"], "30");
    let rows = app.log_rows().await;
    expect_error(full, StatusCode::SERVICE_UNAVAILABLE, "storage_exhausted").await;
    assert_eq!(app.log_rows().await, rows, "nothing of the refused push was written");

    let ready = app.http.get(app.url("/ready")).send().await.unwrap();
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
    let ready: serde_json::Value = ready.json().await.unwrap();
    assert_eq!(ready["reason"], "database out of disk space or memory");

    // Room again: the next push is served, and every acknowledged one is there.
    set_max_pages(&app, "1073741823").await;
    assert_eq!(push(&app, "after").await.status(), StatusCode::OK);
    let pulled = app.pull_ok("alice", "todos", START, None).await;
    assert_eq!(pulled["serverChanges"].as_array().unwrap().len() as i64, rows + 1);
}

/// A replica frozen inside a push (its transaction open, its user's clock
/// row locked) is ended by PostgreSQL after 10 s idle, so the user's push
/// on another replica is served rather than refused after `LOCK_TIMEOUT`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_frozen_inside_a_push_does_not_hold_its_users_other_replicas() {
    let app = Backend::Postgres.spawn_with(&[("LOCK_TIMEOUT", "25s")]).await;
    assert_eq!(push(&app, "before").await.status(), StatusCode::OK);
    let frozen = app.spawn_replica(&[]).await;
    let mut stuck = frozen.store.begin_write("alice").await.unwrap();
    stuck.lock_clock("alice").await.unwrap();

    let response = push(&app, "meanwhile").await;
    assert_eq!(response.status(), StatusCode::OK, "{}", response.text().await.unwrap());
    assert!(
        stuck.rollback().await.is_err(),
        "the frozen transaction was ended by the database"
    );
    assert_eq!(app.log_rows().await, 2);
}
