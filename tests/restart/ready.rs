//! `/ready` follows the database: 503 with the reason while PostgreSQL is
//! down, 200 again once it is back (and the listener listens again).

use crate::common;

use std::time::{Duration, Instant};

use common::app::spawn_app;
use reqwest::StatusCode;
use serde_json::Value;

async fn ready(app: &common::app::TestApp) -> (StatusCode, Value) {
    let response = app.http.get(app.url("/ready")).send().await.unwrap();
    let status = response.status();
    (status, response.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_is_503_while_the_database_is_down_and_200_when_it_is_back() {
    let _turn = crate::one_at_a_time().await;
    let app = spawn_app().await;
    assert_eq!(
        ready(&app).await,
        (StatusCode::OK, serde_json::json!({ "status": "ready" }))
    );

    let restart = tokio::spawn(common::pg::restart_server(Duration::from_secs(3)));
    let deadline = Instant::now() + Duration::from_secs(3);
    let (status, body) = loop {
        let (status, body) = ready(&app).await;
        if status != StatusCode::OK {
            break (status, body);
        }
        assert!(
            Instant::now() < deadline,
            "/ready never noticed the database going away"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["status"], "not_ready");
    let reason = body["reason"].as_str().unwrap();
    assert!(
        ["database unreachable", "change listener reconnecting"].contains(&reason),
        "{reason}"
    );
    // Liveness stays 200 meanwhile: an orchestrator must not restart the replica.
    let health = app.http.get(app.url("/health")).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);

    restart.await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while ready(&app).await.0 != StatusCode::OK {
        assert!(Instant::now() < deadline, "/ready never recovered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let metrics = common::metrics::scrape(&app).await;
    assert!(
        common::metrics::value(&metrics, "mana_sync_listener_reconnects_total", &[]) >= 1.0,
        "the listener's reconnect is counted"
    );
}
