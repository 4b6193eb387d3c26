//! Rate limits per user: a runaway client is answered 429 with
//! `Retry-After` (sockets: closed 1013) once its burst is spent, without
//! slowing other users; streams follow a bounded number of collections;
//! sockets take only small messages.

use crate::common;

use std::time::Duration;

use common::app::{APP, Backend, Postgres, START, Sqlite, TestApp, both_stores, expect_error};
use common::metrics::{scrape, value};
use common::ws;
use futures_util::SinkExt;
use reqwest::StatusCode;
use rstest::rstest;
use rstest_reuse::apply;
use serde_json::json;

/// Pulls as `user` until one is refused; returns how many went through.
async fn pulls_until_refused(app: &TestApp, user: &str, most: usize) -> (usize, reqwest::Response) {
    for done in 0..most {
        let response = app.pull(user, "todos", START, None).await;
        if response.status() != StatusCode::OK {
            return (done, response);
        }
    }
    panic!("{most} pulls in a row were all answered");
}

#[apply(both_stores)]
async fn a_runaway_client_is_held_to_its_rate_and_others_are_not(store: Backend) {
    let app = store
        .spawn_with(&[("PULL_RATE", "4"), ("PUSH_RATE", "4"), ("OPEN_RATE", "1")])
        .await;
    // Five seconds' worth pass at once (some refill while they run), then 429.
    let (passed, refused) = pulls_until_refused(&app, "alice", 100).await;
    assert!((20..60).contains(&passed), "{passed} pulls passed");
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry_after: u64 = refused.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert_eq!(retry_after, 1, "a token comes back within a second");
    expect_error(refused, StatusCode::TOO_MANY_REQUESTS, "rate_limited").await;
    // Other users, and alice's pushes, are untouched.
    app.pull_ok("bob", "todos", START, None).await;
    app.push_ok("alice", "a", START, json!([])).await;
    // After the wait, alice pulls again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    app.pull_ok("alice", "todos", START, None).await;
    // Pushes have a bucket of their own; a refused one writes nothing.
    let mut refused_push = None;
    for i in 0..100 {
        let body = common::app::push_body(
            "a",
            START,
            json!([common::app::insert("todos", &format!("t{i}"), json!({}))]),
        );
        let response = app.push("carol", "a", &body).await;
        if response.status() != StatusCode::OK {
            refused_push = Some((i, response));
            break;
        }
    }
    let (written, response) = refused_push.expect("a push is refused");
    expect_error(response, StatusCode::TOO_MANY_REQUESTS, "rate_limited").await;
    let page = app.pull_ok("carol", "todos", START, None).await;
    assert_eq!(
        page["serverChanges"].as_array().unwrap().len(),
        written,
        "only accepted pushes are written"
    );
    // Opening streams and sockets: five at once, then refused.
    let token = common::tokens::token_for("dave");
    let mut sockets = Vec::new();
    for _ in 0..5 {
        let mut socket = ws::authed(&app, &format!("/ws/{APP}"), &token, None).await;
        ws::catch_up(&mut socket).await;
        sockets.push(socket);
    }
    let mut sixth = ws::connect(&app, &format!("/ws/{APP}")).await;
    ws::send(&mut sixth, json!({ "type": "auth", "token": token })).await;
    assert_eq!(ws::expect_close(&mut sixth, Duration::from_secs(5)).await, Some(1013));
    let stream = app
        .http
        .get(app.url(&format!("/sync/{APP}/stream?collections=todos")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    expect_error(stream, StatusCode::TOO_MANY_REQUESTS, "rate_limited").await;
    let scrape = scrape(&app).await;
    assert!(value(&scrape, "mana_sync_throttled_total", &[("action", "pull")]) >= 1.0);
    assert_eq!(value(&scrape, "mana_sync_throttled_total", &[("action", "push")]), 1.0);
    assert_eq!(value(&scrape, "mana_sync_throttled_total", &[("action", "open")]), 2.0);
}

#[apply(both_stores)]
async fn a_stream_follows_at_most_a_hundred_collections(store: Backend) {
    let app = store.spawn().await;
    let token = common::tokens::token_for("alice");
    let many: Vec<String> = (0..101).map(|i| format!("c{i}")).collect();
    let response = app
        .http
        .get(app.url(&format!("/sync/{APP}/stream?collections={}", many.join(","))))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    expect_error(response, StatusCode::BAD_REQUEST, "too_many_collections").await;
    let response = app
        .http
        .get(app.url(&format!("/sync/{APP}/stream?collections={}", many[..100].join(","))))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}

#[apply(both_stores)]
async fn a_socket_takes_only_small_messages(store: Backend) {
    let app = store.spawn().await;
    // Before authentication: a 1 MB frame ends the socket.
    let mut socket = ws::connect(&app, &format!("/ws/{APP}")).await;
    let big = "x".repeat(1024 * 1024);
    let _ = socket
        .send(tokio_tungstenite::tungstenite::Message::text(big.clone()))
        .await;
    assert!(matches!(
        ws::next(&mut socket, Duration::from_secs(5)).await,
        Some(ws::Event::Closed(_))
    ));
    // After it too; an ordinary auth frame is fine.
    let mut socket = ws::authed(&app, &format!("/ws/{APP}"), &common::tokens::token_for("alice"), None).await;
    ws::catch_up(&mut socket).await;
    let _ = socket.send(tokio_tungstenite::tungstenite::Message::text(big)).await;
    assert!(matches!(
        ws::next(&mut socket, Duration::from_secs(5)).await,
        Some(ws::Event::Closed(_))
    ));
    assert_eq!(app.health().await["status"], "ok");
}
