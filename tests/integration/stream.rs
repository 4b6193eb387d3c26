//! The SSE change stream: catch-up, live deltas from any replica, resuming.

use crate::common;

use common::app::{Backend, Postgres, Sqlite, both_stores};
use rstest::rstest;
use rstest_reuse::apply;

use std::time::Duration;

use common::app::{APP, START, TestApp, insert};
use eventsource_stream::Eventsource;
use futures_util::{Stream, StreamExt};
use serde_json::{Value, json};

type Events = std::pin::Pin<Box<dyn Stream<Item = Result<eventsource_stream::Event, String>> + Send>>;

async fn open(app: &TestApp, user: &str, collections: &str, since: &str) -> Events {
    let response = app
        .http
        .get(app.url(&format!("/sync/{APP}/stream")))
        .bearer_auth(common::tokens::token_for(user))
        .query(&[("collections", collections), ("since", since)])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    Box::pin(
        response
            .bytes_stream()
            .eventsource()
            .map(|e| e.map_err(|e| e.to_string())),
    )
}

/// The next event as (name, data), or `None` if none came within `wait`.
async fn next(events: &mut Events, wait: Duration) -> Option<(String, Value)> {
    match tokio::time::timeout(wait, events.next()).await {
        Ok(Some(Ok(event))) => Some((event.event, serde_json::from_str(&event.data).unwrap())),
        Ok(other) => panic!("the stream ended: {other:?}"),
        Err(_) => None,
    }
}

async fn changes(events: &mut Events, wait: Duration) -> Value {
    loop {
        match next(events, wait).await {
            Some((name, data)) if name == "changes" => return data,
            Some(_) => {}
            None => panic!("no changes event within {wait:?}"),
        }
    }
}

fn ids(event: &Value) -> Vec<&str> {
    event["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect()
}

#[apply(both_stores)]
async fn a_stream_gets_exactly_what_is_committed_after_its_cursor_on_any_replica(store: Backend) {
    let a = store.spawn().await;
    let replica = a.another_replica().await;
    let b = replica.as_ref().unwrap_or(&a);
    // Pushed on b, whose hub has it before the answer, so the stream opened
    // next cannot hear of it late (as it could from a's NOTIFY).
    b.push_ok("alice", "d", START, json!([insert("todos", "before", json!({}))]))
        .await;
    let cursor = b.pull_ok("alice", "todos", START, None).await["syncedUntil"]
        .as_str()
        .unwrap()
        .to_owned();

    let mut events = open(b, "alice", "todos,notes", &cursor).await;
    let first = changes(&mut events, Duration::from_secs(5)).await;
    let second = changes(&mut events, Duration::from_secs(5)).await;
    assert_eq!(
        (first["table"].as_str(), second["table"].as_str()),
        (Some("todos"), Some("notes"))
    );
    assert!(
        ids(&first).is_empty() && ids(&second).is_empty(),
        "nothing before the cursor is sent"
    );

    a.push_ok(
        "alice",
        "d",
        START,
        json!([insert("todos", "live", json!({ "title": "x" }))]),
    )
    .await;
    let live = changes(&mut events, Duration::from_secs(1)).await;
    assert_eq!(live["table"], "todos");
    assert_eq!(ids(&live), vec!["live"]);
    assert_eq!(live["changes"][0]["data"]["title"], "x");

    a.push_ok("alice", "d", START, json!([insert("unfollowed", "x", json!({}))]))
        .await;
    a.push_ok("bob", "d", START, json!([insert("todos", "bobs", json!({}))]))
        .await;
    assert!(
        next(&mut events, Duration::from_millis(500))
            .await
            .is_none_or(|(name, _)| name == "heartbeat"),
        "other tables and other users stay silent"
    );
}

#[apply(both_stores)]
async fn a_reconnecting_stream_resumes_from_its_last_cursor_without_gaps(store: Backend) {
    let app = store.spawn().await;
    let mut events = open(&app, "alice", "todos", START).await;
    changes(&mut events, Duration::from_secs(5)).await;
    app.push_ok("alice", "d", START, json!([insert("todos", "seen", json!({}))]))
        .await;
    let seen = changes(&mut events, Duration::from_secs(1)).await;
    assert_eq!(ids(&seen), vec!["seen"]);
    let resume_from = seen["syncedUntil"].as_str().unwrap().to_owned();
    drop(events);

    app.push_ok("alice", "d", START, json!([insert("todos", "while-away", json!({}))]))
        .await;
    let mut events = open(&app, "alice", "todos", &resume_from).await;
    let catch_up = changes(&mut events, Duration::from_secs(5)).await;
    assert_eq!(ids(&catch_up), vec!["while-away"], "exactly the missed change");
}

#[apply(both_stores)]
async fn a_quiet_stream_sends_heartbeats(store: Backend) {
    let app = store.spawn().await;
    let mut events = open(&app, "alice", "todos", START).await;
    changes(&mut events, Duration::from_secs(5)).await;
    let (name, _) = next(&mut events, Duration::from_secs(20))
        .await
        .expect("a heartbeat within 20 s");
    assert_eq!(name, "heartbeat");
}

#[apply(both_stores)]
async fn streams_end_when_the_replica_shuts_down(store: Backend) {
    let app = store.spawn().await;
    let mut events = open(&app, "alice", "todos", START).await;
    changes(&mut events, Duration::from_secs(5)).await;
    let stopping = tokio::spawn(app.stop());
    let ended = tokio::time::timeout(Duration::from_secs(3), events.next())
        .await
        .expect("the stream ends");
    assert!(ended.is_none() || ended.unwrap().is_err());
    tokio::time::timeout(Duration::from_secs(5), stopping)
        .await
        .expect("stops in time")
        .unwrap();
}

#[apply(both_stores)]
async fn a_stream_needs_a_token_and_collections(store: Backend) {
    let app = store.spawn().await;
    let anonymous = app
        .http
        .get(app.url(&format!("/sync/{APP}/stream?collections=todos")))
        .send()
        .await
        .unwrap();
    common::app::expect_error(anonymous, reqwest::StatusCode::UNAUTHORIZED, "unauthorized").await;
    let none = app
        .http
        .get(app.url(&format!("/sync/{APP}/stream?collections=,")))
        .bearer_auth(common::tokens::token_for("alice"))
        .send()
        .await
        .unwrap();
    common::app::expect_error(none, reqwest::StatusCode::BAD_REQUEST, "invalid_name").await;
}

#[apply(both_stores)]
async fn a_stream_ends_when_its_token_expires(store: Backend) {
    // No leeway: the stream ends at `exp` itself.
    let app = store.spawn_with(&[("JWT_LEEWAY", "0s")]).await;
    let token = common::tokens::token_for_with("alice", |c| c["exp"] = json!(common::tokens::now() + 2));
    let response = app
        .http
        .get(app.url(&format!("/sync/{APP}/stream")))
        .bearer_auth(token)
        .query(&[("collections", "todos")])
        .send()
        .await
        .unwrap();
    let mut events: Events = Box::pin(
        response
            .bytes_stream()
            .eventsource()
            .map(|e| e.map_err(|e| e.to_string())),
    );
    changes(&mut events, Duration::from_secs(5)).await;
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(Ok(_)) = events.next().await {}
    })
    .await;
    assert!(ended.is_ok(), "the stream outlived its token");
}

fn stream_reads(scrape: &common::metrics::Scrape) -> f64 {
    common::metrics::value(scrape, "mana_sync_stream_reads_total", &[])
}

/// A stream of 100 collections reads them all in one statement (one
/// transaction) for its catch-up and once more for a push that touches
/// them all, not once per collection; each collection's events are exact.
#[apply(both_stores)]
async fn a_stream_reads_its_due_collections_at_once(store: Backend) {
    let app = store.spawn().await;
    let tables: Vec<String> = (0..100).map(|i| format!("c{i:03}")).collect();
    app.push_ok(
        "alice",
        "d",
        START,
        Value::Array(tables.iter().take(50).map(|t| insert(t, "old", json!({}))).collect()),
    )
    .await;
    let before = common::metrics::scrape(&app).await;
    let mut events = open(&app, "alice", &tables.join(","), START).await;
    let mut caught_up = Vec::new();
    for _ in 0..100 {
        let event = changes(&mut events, Duration::from_secs(5)).await;
        let expected: Vec<&str> = if caught_up.len() < 50 { vec!["old"] } else { vec![] };
        assert_eq!(ids(&event), expected);
        caught_up.push(event["table"].as_str().unwrap().to_owned());
    }
    assert_eq!(caught_up, tables, "every collection, in order");
    let after_catch_up = common::metrics::scrape(&app).await;
    assert_eq!(stream_reads(&after_catch_up) - stream_reads(&before), 1.0);

    app.push_ok(
        "alice",
        "d",
        START,
        Value::Array(tables.iter().map(|t| insert(t, "new", json!({}))).collect()),
    )
    .await;
    let mut told = Vec::new();
    for _ in 0..100 {
        let event = changes(&mut events, Duration::from_secs(5)).await;
        assert_eq!(ids(&event), vec!["new"]);
        told.push(event["table"].as_str().unwrap().to_owned());
    }
    told.sort();
    assert_eq!(told, tables);
    let after_push = common::metrics::scrape(&app).await;
    assert_eq!(stream_reads(&after_push) - stream_reads(&after_catch_up), 1.0);
}

/// A stream over its user's pull rate waits for the bucket: it neither
/// fails nor ends, and gets every change.
#[apply(both_stores)]
async fn a_stream_over_the_pull_rate_waits_rather_than_failing(store: Backend) {
    let app = store.spawn_with(&[("PULL_RATE", "1")]).await;
    let mut events = open(&app, "alice", "todos", START).await;
    changes(&mut events, Duration::from_secs(5)).await;
    // A burst of five reads is allowed; the reads after it wait a second each.
    for i in 0..8 {
        app.push_ok(
            "alice",
            "d",
            START,
            json!([insert("todos", &format!("t{i}"), json!({}))]),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut seen = Vec::new();
    while seen.len() < 8 {
        let event = changes(&mut events, Duration::from_secs(10)).await;
        seen.extend(ids(&event).into_iter().map(str::to_owned));
    }
    assert_eq!(seen, (0..8).map(|i| format!("t{i}")).collect::<Vec<_>>());
    let throttled = common::metrics::value(
        &common::metrics::scrape(&app).await,
        "mana_sync_throttled_total",
        &[("action", "pull")],
    );
    assert!(throttled >= 1.0, "the stream met the pull rate");
}
