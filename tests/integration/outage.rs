//! A database outage is a quick 503 with `Retry-After`, never a 500 or a
//! long hang; the replica listens from its first moment even while the
//! database is down, and serves within seconds of its return; nothing
//! acknowledged is lost. The outage is a proxy cut in front of this test's
//! database, so other tests keep theirs.

use crate::common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::app::{START, Storage, TestApp, insert, push_body, start_without_waiting};
use common::proxy::Proxy;
use common::tokens::JwksServer;
use reqwest::StatusCode;
use serde_json::json;

/// A server on a fresh database reached through a proxy.
async fn behind_a_proxy(cut_first: bool) -> (TestApp, Proxy) {
    let db = common::pg::test_database().await;
    let mut url = url::Url::parse(&db.app_url).unwrap();
    let target = format!("{}:{}", url.host_str().unwrap(), url.port().unwrap())
        .parse()
        .unwrap();
    let proxy = Proxy::start(target).await;
    url.set_port(Some(proxy.port)).unwrap();
    if cut_first {
        proxy.cut();
    }
    let jwks = Arc::new(JwksServer::start_default().await);
    let app = start_without_waiting(Storage::Postgres(Arc::new(db)), jwks, &[("DATABASE_URL", url.as_str())]).await;
    (app, proxy)
}

/// A push of one new record `id`, its status and how long it took.
async fn push(app: &TestApp, id: &str) -> (StatusCode, Duration, reqwest::Response) {
    let started = Instant::now();
    let response = app
        .push(
            "alice",
            "a",
            &push_body("a", START, json!([insert("todos", id, json!({}))])),
        )
        .await;
    (response.status(), started.elapsed(), response)
}

async fn status_of(app: &TestApp, path: &str) -> StatusCode {
    app.http.get(app.url(path)).send().await.unwrap().status()
}

/// Pushes until one is answered 200, within `limit`; returns how long it took.
async fn until_served(app: &TestApp, id: &str, limit: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let (status, _, response) = push(app, id).await;
        match status {
            StatusCode::OK => return started.elapsed(),
            StatusCode::SERVICE_UNAVAILABLE => {}
            other => panic!("a push answered {other}: {}", response.text().await.unwrap()),
        }
        assert!(
            started.elapsed() < limit,
            "not served within {limit:?} of the database's return"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_is_a_quick_503_and_service_resumes_within_seconds() {
    let (app, proxy) = behind_a_proxy(false).await;
    app.wait_until_listening().await;
    let mut acknowledged = Vec::new();
    for i in 0..3 {
        let id = format!("before-{i}");
        assert_eq!(push(&app, &id).await.0, StatusCode::OK);
        acknowledged.push(id);
    }
    proxy.cut();
    // Every push meanwhile is 503 with Retry-After, each answered quickly.
    let started = Instant::now();
    let mut refused = 0;
    while started.elapsed() < Duration::from_secs(6) {
        let (status, took, response) = push(&app, "during").await;
        assert!(took < Duration::from_secs(4), "a push hung for {took:?}");
        match status {
            StatusCode::SERVICE_UNAVAILABLE => {
                assert_eq!(response.headers()["retry-after"], "2");
                let body: serde_json::Value = response.json().await.unwrap();
                assert_eq!(body["code"], "unavailable");
                refused += 1;
            }
            other => panic!(
                "a push during the outage answered {other}: {}",
                response.text().await.unwrap()
            ),
        }
    }
    assert!(refused >= 3, "{refused} pushes refused");
    // Once the outage is seen, refusals are immediate.
    let (_, took, _) = push(&app, "during").await;
    assert!(took < Duration::from_millis(500), "took {took:?}");
    assert_eq!(status_of(&app, "/health").await, StatusCode::OK);
    assert_eq!(status_of(&app, "/ready").await, StatusCode::SERVICE_UNAVAILABLE);
    let pull = app.pull("alice", "todos", START, None).await;
    assert_eq!(pull.status(), StatusCode::SERVICE_UNAVAILABLE);

    proxy.restore().await;
    let took = until_served(&app, "after", Duration::from_secs(5)).await;
    eprintln!("served again {took:?} after the database's return");
    acknowledged.push("after".to_owned());
    // Every acknowledged push is there, and none of the refused ones.
    let page = app.pull_ok("alice", "todos", START, None).await;
    let mut ids: Vec<&str> = page["serverChanges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    ids.sort();
    acknowledged.sort();
    assert_eq!(ids, acknowledged);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn started_while_the_database_is_down_it_listens_and_serves_once_it_is_back() {
    let (app, proxy) = behind_a_proxy(true).await;
    // Listening from the first moment: alive, not ready.
    assert_eq!(status_of(&app, "/health").await, StatusCode::OK);
    assert_eq!(status_of(&app, "/ready").await, StatusCode::SERVICE_UNAVAILABLE);
    let (status, took, response) = push(&app, "early").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(response.headers()["retry-after"], "2");
    assert!(took < Duration::from_millis(500), "took {took:?}");
    tokio::time::sleep(Duration::from_secs(2)).await;

    proxy.restore().await;
    let took = until_served(&app, "first", Duration::from_secs(5)).await;
    eprintln!("served {took:?} after the database came up");
    let deadline = Instant::now() + Duration::from_secs(5);
    while status_of(&app, "/ready").await != StatusCode::OK {
        assert!(Instant::now() < deadline, "/ready never became 200");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let page = app.pull_ok("alice", "todos", START, None).await;
    assert_eq!(page["serverChanges"].as_array().unwrap().len(), 1);
}
