//! Pulls of a collection that has not changed since their cursor are
//! answered without the database (today's web client polls every
//! collection every few seconds, nearly always in vain), and never miss a
//! change: a notice raises what the replica knows, and when notices may
//! have been lost the replica forgets it all.

use crate::common;

use std::time::{Duration, Instant};

use common::app::{Backend, Postgres, START, Sqlite, TestApp, both_stores, change_for, insert};
use common::metrics::{scrape, value};
use common::proxy::Proxy;
use rstest::rstest;
use rstest_reuse::apply;
use serde_json::{Value, json};

async fn quiet_pulls(app: &TestApp) -> f64 {
    value(&scrape(app).await, "mana_sync_quiet_pulls_total", &[])
}

/// Pulls `todos` on `app` from `since` until `id` arrives (at most 10 s);
/// every answer keeps or moves the cursor, never past `id` unseen.
async fn until_seen(app: &TestApp, since: &str, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let answer = app.pull_as("alice", "phone", "todos", since, None).await;
        if change_for(&answer, id).is_some() {
            return answer;
        }
        assert_eq!(
            answer["syncedUntil"], since,
            "an answer without {id} keeps the cursor where it was"
        );
        assert!(Instant::now() < deadline, "{id} never arrived");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[apply(both_stores)]
async fn a_quiet_collection_is_answered_without_the_database_until_it_changes(store: Backend) {
    let app = store.spawn().await;
    app.push_ok(
        "alice",
        "laptop",
        START,
        json!([insert("todos", "t0", json!({ "n": 0 }))]),
    )
    .await;
    let first = app.pull_as("alice", "phone", "todos", START, None).await;
    let cursor = first["syncedUntil"].as_str().unwrap().to_owned();
    let before = quiet_pulls(&app).await;
    for _ in 0..3 {
        let answer = app.pull_as("alice", "phone", "todos", &cursor, None).await;
        assert_eq!(answer["serverChanges"], json!([]));
        assert_eq!(answer["syncedUntil"], cursor.as_str());
        assert_eq!(answer["hasMore"], false);
    }
    assert_eq!(
        quiet_pulls(&app).await - before,
        3.0,
        "answered from what the replica knows"
    );
    // Another collection, and another user, are their own.
    let other = app.pull_as("alice", "phone", "notes", &cursor, None).await;
    assert_eq!(other["serverChanges"], json!([]));
    // A push to the collection: the next pull reads it at once.
    app.push_ok(
        "alice",
        "laptop",
        &cursor,
        json!([insert("todos", "t1", json!({ "n": 1 }))]),
    )
    .await;
    let answer = app.pull_as("alice", "phone", "todos", &cursor, None).await;
    assert!(change_for(&answer, "t1").is_some(), "{answer}");
    let pushes_elsewhere = app.pull_as("alice", "phone", "notes", &cursor, None).await;
    assert_eq!(pushes_elsewhere["serverChanges"], json!([]));
}

#[tokio::test]
async fn a_replica_hears_other_replicas_and_forgets_what_it_knew_when_notices_may_be_lost() {
    let a = Postgres.spawn().await;
    // b reaches the database through a proxy that the test cuts.
    let mut url = url::Url::parse(&a.db().app_url).unwrap();
    let target = format!("{}:{}", url.host_str().unwrap(), url.port().unwrap());
    let proxy = Proxy::start(target.parse().unwrap()).await;
    url.set_port(Some(proxy.port)).unwrap();
    let b = a.spawn_replica(&[("DATABASE_URL", url.as_str())]).await;
    b.wait_until_listening().await;
    a.push_ok("alice", "laptop", START, json!([insert("todos", "t0", json!({}))]))
        .await;
    let cursor = until_seen(&b, START, "t0").await["syncedUntil"]
        .as_str()
        .unwrap()
        .to_owned();
    b.pull_as("alice", "phone", "todos", &cursor, None).await;
    let before = quiet_pulls(&b).await;
    b.pull_as("alice", "phone", "todos", &cursor, None).await;
    assert_eq!(quiet_pulls(&b).await - before, 1.0, "b knows todos is quiet");

    // A push on a reaches b through its listener.
    a.push_ok("alice", "laptop", &cursor, json!([insert("todos", "t1", json!({}))]))
        .await;
    until_seen(&b, &cursor, "t1").await;

    // b loses its database, the listener's connection with it, while a
    // push's notice goes out: once b listens again it must not take todos
    // for quiet.
    let cursor = b.pull_as("alice", "phone", "todos", &cursor, None).await["syncedUntil"]
        .as_str()
        .unwrap()
        .to_owned();
    b.pull_as("alice", "phone", "todos", &cursor, None).await;
    proxy.cut();
    tokio::time::sleep(Duration::from_millis(300)).await;
    a.push_ok("alice", "laptop", &cursor, json!([insert("todos", "t2", json!({}))]))
        .await;
    proxy.restore().await;
    b.wait_until_listening().await;
    until_seen(&b, &cursor, "t2").await;
}
