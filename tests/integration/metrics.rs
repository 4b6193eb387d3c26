//! `GET /metrics`, scraped and parsed as Prometheus text after known
//! traffic: every counter moved by exactly what the traffic did.

use crate::common;

use std::time::Duration;

use common::app::{Backend, Postgres, START, Sqlite, both_stores, insert, push_body};
use common::metrics::{scrape, value};
use common::{tokens, ws};
use reqwest::StatusCode;
use rstest::rstest;
use rstest_reuse::apply;
use serde_json::json;

#[apply(both_stores)]
async fn counters_move_by_exactly_what_the_traffic_did(store: Backend) {
    let app = store.spawn().await;
    let before = scrape(&app).await;

    let mut phone = ws::authed(&app, "/ws/todo", &tokens::token_for("alice"), Some("phone")).await;
    ws::catch_up(&mut phone).await;
    app.push_ok(
        "alice",
        "laptop",
        START,
        json!([
            insert("todos", "a", json!({})),
            insert("todos", "b", json!({})),
            insert("notes", "c", json!({}))
        ]),
    )
    .await;
    let told = ws::expect_json(&mut phone, Duration::from_secs(5)).await;
    assert_eq!(told["type"], "sync-available");
    let keyed = |key: &'static str| {
        let app = &app;
        async move {
            app.http
                .post(app.url("/sync/todo"))
                .bearer_auth(tokens::token_for("alice"))
                .header("Idempotency-Key", key)
                .json(&push_body("laptop", START, json!([insert("todos", "d", json!({}))])))
                .send()
                .await
                .unwrap()
        }
    };
    assert_eq!(keyed("k").await.status(), StatusCode::OK);
    assert_eq!(keyed("k").await.status(), StatusCode::OK, "the retry is replayed");
    let pulled = app.pull_ok("alice", "todos", START, None).await;
    assert_eq!(pulled["serverChanges"].as_array().unwrap().len(), 3);
    let refused = app
        .http
        .get(app.url("/sync/todo/pull?collection=todos"))
        .bearer_auth("not-a-jwt")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
    for made_up in ["ZZMETHOD0", "ZZMETHOD1"] {
        let method = reqwest::Method::from_bytes(made_up.as_bytes()).unwrap();
        app.http.request(method, app.url("/health")).send().await.unwrap();
    }

    let after = scrape(&app).await;
    let moved = |metric: &str, labels: &[(&str, &str)]| value(&after, metric, labels) - value(&before, metric, labels);
    let push_ok = [("method", "POST"), ("route", "/sync/{appId}"), ("status", "200")];
    assert_eq!(moved("mana_sync_http_requests_total", &push_ok), 3.0, "three pushes");
    assert_eq!(moved("mana_sync_http_request_duration_seconds", &push_ok), 3.0);
    let pull_401 = [("route", "/sync/{appId}/pull"), ("status", "401")];
    assert_eq!(moved("mana_sync_http_requests_total", &pull_401), 1.0);
    assert_eq!(
        moved("mana_sync_changes_appended_total", &[]),
        4.0,
        "3 + 1; the replay appends nothing"
    );
    assert_eq!(moved("mana_sync_idempotent_replays_total", &[]), 1.0);
    // The answers: the first push's 3 records, the keyed push's 4 and its
    // replay's 4 (read afresh), the pull's 3.
    assert_eq!(moved("mana_sync_records_pulled_total", &[]), 3.0 + 4.0 + 4.0 + 3.0);
    assert_eq!(moved("mana_sync_jwt_failures_total", &[("reason", "malformed")]), 1.0);
    assert_eq!(
        value(&after, "mana_sync_connections_total", &[]),
        1.0,
        "the seed's gauge name"
    );
    assert_eq!(value(&after, "mana_sync_users_connected", &[]), 1.0);
    assert!(
        moved("mana_sync_notifications_sent_total", &[]) >= 2.0,
        "catch-up and the push"
    );
    assert!(
        moved("mana_sync_fanout_delay_seconds", &[]) >= 1.0,
        "the push's delay was observed"
    );
    let pool = |state| value(&after, "mana_sync_db_pool_connections", &[("state", state)]);
    assert!(
        pool("in_use") + pool("idle") >= 1.0,
        "the pool's open connections are shown"
    );
    assert_eq!(value(&after, "mana_sync_listener_reconnects_total", &[]), 0.0);
    for metric in [
        "mana_sync_notifications_coalesced_total",
        "mana_sync_notifications_dropped_total",
    ] {
        let exposed =
            after.families.contains_key(metric) || after.families.contains_key(metric.trim_end_matches("_total"));
        assert!(exposed, "{metric} is exposed");
    }

    drop(phone);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while value(&scrape(&app).await, "mana_sync_connections_total", &[]) != 0.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the gauge follows a closed socket"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A notice for a socket that is busy is merged into the one waiting, and
/// counted as coalesced: every notice is either sent or counted so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_notices_for_one_socket_is_counted_as_coalesced() {
    let app = Postgres.spawn().await;
    let mut phone = ws::authed(&app, "/ws/todo", &tokens::token_for("bob"), Some("phone")).await;
    ws::catch_up(&mut phone).await;
    let before = value(&scrape(&app).await, "mana_sync_notifications_coalesced_total", &[]);
    // Pushes published faster than the socket's task takes them.
    let pushes: Vec<_> = (0..20)
        .map(|i| {
            let body = push_body("laptop", START, json!([insert("todos", &format!("t{i}"), json!({}))]));
            let app = &app;
            async move { app.push("bob", "laptop", &body).await }
        })
        .collect();
    for response in futures_util::future::join_all(pushes).await {
        assert_eq!(response.status(), StatusCode::OK);
    }
    let mut messages = 0;
    while ws::next(&mut phone, Duration::from_millis(300)).await.is_some() {
        messages += 1;
    }
    let after = scrape(&app).await;
    let coalesced = value(&after, "mana_sync_notifications_coalesced_total", &[]) - before;
    assert_eq!(
        coalesced + messages as f64,
        20.0,
        "every notice was either sent ({messages}) or merged into one waiting ({coalesced})"
    );
}
