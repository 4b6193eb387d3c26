//! The projection is derived state: rebuilding it from the log gives
//! exactly what pushes maintained incrementally.

use crate::common;

use common::app::{Backend, Postgres, START, Sqlite, TestApp, both_stores, delete, insert, update};
use mana_sync::store::Store;
use rstest::rstest;
use rstest_reuse::apply;
use serde_json::{Value, json};
use sqlx::types::Json;

type Row = (
    String,
    String,
    String,
    String,
    Json<Value>,
    Option<Json<Value>>,
    i64,
    i64,
);

/// Every user's projection.
async fn snapshot(app: &TestApp) -> Vec<Row> {
    const SQL: &str = "SELECT user_id, app_id, table_name, record_id, fields, writers, created_seq, touched_seq
                       FROM sync_records ORDER BY user_id, app_id, table_name, record_id";
    match &app.store {
        Store::Postgres(_) => sqlx::query_as(SQL).fetch_all(&app.admin().await).await.unwrap(),
        Store::Sqlite(store) => sqlx::query_as(SQL).fetch_all(store.reader()).await.unwrap(),
    }
}

#[apply(both_stores)]
async fn a_rebuilt_projection_equals_the_incrementally_maintained_one(store: Backend) {
    let app = store.spawn().await;
    for user in ["alice", "bob"] {
        app.push_ok(
            user,
            "a",
            START,
            json!([
                insert(
                    "todos",
                    "t1",
                    json!({ "title": "one", "updatedAt": "2024-01-01T10:00:00Z" })
                ),
                insert(
                    "notes",
                    "n1",
                    json!({ "body": "hi", "createdAt": "2024-01-01T09:00:00Z" })
                ),
            ]),
        )
        .await;
        // Device b is of the later generation: its changes keep their
        // provenance, which the rebuilt projection must keep too.
        let later = |mut change: Value| {
            change["actor"] = json!({ "kind": "user", "principalId": user });
            change["origin"] = json!("user");
            change["schemaVersion"] = json!(1);
            change
        };
        app.push_ok(
            user,
            "b",
            START,
            json!([
                later(update("todos", "t1", "title", json!("newer"), "2024-01-01T11:00:00Z")),
                update(
                    "todos",
                    "t1",
                    "title",
                    json!("older, arrives late"),
                    "2024-01-01T10:30:00Z"
                ),
                update(
                    "todos",
                    "t2",
                    "title",
                    json!("created by update"),
                    "2024-01-01T10:00:00Z"
                ),
                later(delete("notes", "n1", "2024-01-01T12:00:00Z")),
            ]),
        )
        .await;
    }
    let incremental = snapshot(&app).await;
    assert_eq!(incremental.len(), 6);
    // Each record holds a winning write of b's push, which is in the later
    // form as a whole: each of its changes keeps the device.
    assert!(incremental.iter().all(|row| row.5.is_some()), "{incremental:?}");

    let (users, entries, records) = mana_sync::sync::rebuild(&app.store).await.unwrap();
    assert_eq!((users, entries, records), (2, 12, 6));
    assert_eq!(snapshot(&app).await, incremental, "rebuilt == incremental");
}

#[apply(both_stores)]
async fn the_rebuild_command_restores_a_lost_projection(store: Backend) {
    let app = store.spawn().await;
    app.push_ok(
        "alice",
        "a",
        START,
        json!([insert("todos", "t1", json!({ "title": "kept" }))]),
    )
    .await;
    let before = snapshot(&app).await;
    let mut tx = app.store.begin_write("alice").await.unwrap();
    tx.clear_records("alice").await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(snapshot(&app).await, vec![], "the projection is lost");

    // The command runs with the server stopped (a SQLite file admits one process).
    let (storage, jwks) = (app.storage.clone(), app.jwks.clone());
    app.stop().await;
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_mana-sync"))
        .arg("rebuild")
        .envs(storage.env())
        .env("RUST_LOG", "warn")
        .status()
        .expect("run mana-sync rebuild");
    assert!(status.success());
    let app = common::app::start(storage, jwks, &[]).await;
    assert_eq!(snapshot(&app).await, before);
    let pulled = app.pull_ok("alice", "todos", START, None).await;
    assert_eq!(pulled["serverChanges"][0]["data"]["title"], "kept");
}
