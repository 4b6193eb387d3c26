//! The projection is derived state: rebuilding it from the log gives
//! exactly what pushes maintained incrementally.

mod common;

use common::app::{START, delete, insert, spawn_app, update};
use serde_json::{Value, json};

async fn snapshot(pool: &sqlx::PgPool) -> Vec<(String, String, String, String, Value, i64, i64)> {
    sqlx::query_as(
        "SELECT user_id, app_id, table_name, record_id, fields, created_seq, touched_seq
         FROM sync_records ORDER BY user_id, app_id, table_name, record_id",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuilt_projection_equals_the_incrementally_maintained_one() {
    let app = spawn_app().await;
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
        app.push_ok(
            user,
            "b",
            START,
            json!([
                update("todos", "t1", "title", json!("newer"), "2024-01-01T11:00:00Z"),
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
                delete("notes", "n1", "2024-01-01T12:00:00Z"),
            ]),
        )
        .await;
    }
    let admin = app.admin().await;
    let incremental = snapshot(&admin).await;
    assert_eq!(incremental.len(), 6);

    let (users, entries, records) = mana_sync::projection::rebuild(&app.db.app_pool().await).await.unwrap();
    assert_eq!((users, entries, records), (2, 12, 6));
    assert_eq!(snapshot(&admin).await, incremental, "rebuilt == incremental");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rebuild_command_restores_a_lost_projection() {
    let app = spawn_app().await;
    app.push_ok(
        "alice",
        "a",
        START,
        json!([insert("todos", "t1", json!({ "title": "kept" }))]),
    )
    .await;
    let admin = app.admin().await;
    let before = snapshot(&admin).await;
    sqlx::query("DELETE FROM sync_records").execute(&admin).await.unwrap();

    let status = std::process::Command::new(env!("CARGO_BIN_EXE_mana-sync"))
        .arg("rebuild")
        .env("DATABASE_URL", &app.db.app_url)
        .env("RUST_LOG", "warn")
        .status()
        .expect("run mana-sync rebuild");
    assert!(status.success());
    assert_eq!(snapshot(&admin).await, before);
    let pulled = app.pull_ok("alice", "todos", START, None).await;
    assert_eq!(pulled["serverChanges"][0]["data"]["title"], "kept");
}
