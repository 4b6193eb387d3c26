//! Rate limits per user: a client over its rate waits its turn, and only
//! a flood beyond the wait is answered 429 with `Retry-After` (sockets:
//! closed 1013 once their burst is spent), without slowing other users; streams follow a bounded number of collections;
//! sockets take only small messages.

use crate::common;

use std::time::Duration;

use common::app::{APP, Backend, Postgres, START, Sqlite, both_stores, expect_error};
use common::metrics::{scrape, value};
use common::ws;
use futures_util::SinkExt;
use reqwest::StatusCode;
use rstest::rstest;
use rstest_reuse::apply;
use serde_json::json;

/// `n` requests sent at once; the answers' statuses, and the first refusal.
async fn at_once(requests: Vec<reqwest::RequestBuilder>) -> (usize, Option<reqwest::Response>) {
    let answers = futures_util::future::join_all(requests.into_iter().map(|r| r.send())).await;
    let mut passed = 0;
    let mut refused = None;
    for answer in answers {
        let answer = answer.expect("an answer");
        match answer.status() {
            StatusCode::OK => passed += 1,
            _ => refused = refused.or(Some(answer)),
        }
    }
    (passed, refused)
}

#[apply(both_stores)]
async fn a_burst_waits_its_turn_and_only_a_flood_is_refused(store: Backend) {
    let app = store
        .spawn_with(&[
            ("PULL_RATE", "4"),
            ("PUSH_RATE", "4"),
            ("OPEN_RATE", "1"),
            ("LOCK_TIMEOUT", "2s"),
        ])
        .await;
    // An honest client over its rate is slowed down, never refused: 30
    // pulls and 30 pushes in a row, past the bucket's 20.
    for i in 0..30 {
        app.pull_ok("alice", "todos", START, None).await;
        let change = common::app::insert("todos", &format!("h{i}"), json!({}));
        app.push_ok("erin", "a", START, json!([change])).await;
    }
    // A flood is refused past the wait: 100 pulls at once (20 at once,
    // then 4 a second for 10 s), 60 pushes (20, then 4 a second for
    // LOCK_TIMEOUT); a refused push writes nothing.
    let pulls = (0..100)
        .map(|_| {
            app.http
                .get(app.url(&format!("/sync/{APP}/pull?collection=todos")))
                .bearer_auth(common::tokens::token_for("bob"))
        })
        .collect();
    let (passed, refused) = at_once(pulls).await;
    assert!((50..80).contains(&passed), "{passed} pulls passed");
    let refused = refused.expect("a pull of the flood is refused");
    let retry_after: u64 = refused.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert_eq!(retry_after, 1, "a token comes back within a second");
    expect_error(refused, StatusCode::TOO_MANY_REQUESTS, "rate_limited").await;
    let pushes = (0..60)
        .map(|i| {
            let change = common::app::insert("todos", &format!("t{i}"), json!({}));
            app.http
                .post(app.url(&format!("/sync/{APP}")))
                .bearer_auth(common::tokens::token_for("carol"))
                .header("X-Client-Id", "a")
                .json(&common::app::push_body("a", START, json!([change])))
        })
        .collect();
    let (written, refused) = at_once(pushes).await;
    assert!((20..40).contains(&written), "{written} pushes passed");
    expect_error(
        refused.expect("a push of the flood is refused"),
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
    )
    .await;
    let page = app.pull_ok("carol", "todos", START, None).await;
    assert_eq!(
        page["serverChanges"].as_array().unwrap().len(),
        written,
        "only accepted pushes are written"
    );
    // Other users are untouched.
    app.pull_ok("dave", "todos", START, None).await;
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
    assert!(value(&scrape, "mana_sync_throttled_total", &[("action", "push")]) >= 1.0);
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
