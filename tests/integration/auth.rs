//! Bearer tokens checked against the JWKS: algorithms, claims, key cache.

use crate::common;

use common::app::{Backend, Postgres, Sqlite, both_stores};
use rstest::rstest;
use rstest_reuse::apply;

use std::time::Duration;

use common::app::{APP, expect_error, expect_json};
use common::tokens::{self, TestKey};
use reqwest::StatusCode;
use serde_json::json;

async fn pull_with(app: &common::app::TestApp, token: &str) -> reqwest::Response {
    app.http
        .get(app.url(&format!("/sync/{APP}/pull?collection=todos")))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
}

#[apply(both_stores)]
async fn every_kind_of_bad_token_is_a_json_401(store: Backend) {
    let app = store.spawn().await;
    let no_header = app
        .http
        .get(app.url(&format!("/sync/{APP}/pull?collection=todos")))
        .send()
        .await
        .unwrap();
    expect_error(no_header, StatusCode::UNAUTHORIZED, "unauthorized").await;
    let cases = [
        ("garbage", "not.a.jwt".to_owned()),
        ("expired", tokens::expired_token_for("alice")),
        ("not yet valid", tokens::not_yet_valid_token_for("alice")),
        ("wrong issuer", tokens::wrong_issuer_token_for("alice")),
        ("wrong audience", tokens::wrong_audience_token_for("alice")),
        ("no kid", tokens::no_kid_token_for("alice")),
        ("unknown kid", tokens::unknown_kid_token_for("alice")),
        ("foreign key", tokens::foreign_token_for("alice")),
        ("forged kid", tokens::forged_token_for("alice")),
        (
            "unsigned",
            tokens::unsigned_token(Some(tokens::ED_KID), &tokens::claims_for("alice")),
        ),
        (
            "hs256",
            tokens::sign_hs256(b"secret", Some(tokens::ED_KID), &tokens::claims_for("alice")),
        ),
        (
            "no sub",
            tokens::token_for_with("alice", |c| {
                c.as_object_mut().unwrap().remove("sub");
            }),
        ),
        ("empty sub", tokens::token_for_with("", |_| {})),
        (
            "no iss",
            tokens::token_for_with("alice", |c| {
                c.as_object_mut().unwrap().remove("iss");
            }),
        ),
        (
            "no aud",
            tokens::token_for_with("alice", |c| {
                c.as_object_mut().unwrap().remove("aud");
            }),
        ),
        (
            "no exp",
            tokens::token_for_with("alice", |c| {
                c.as_object_mut().unwrap().remove("exp");
            }),
        ),
    ];
    for (what, token) in cases {
        let response = pull_with(&app, &token).await;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{what} must be refused");
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["code"], "unauthorized", "{what}: {body}");
    }
}

#[apply(both_stores)]
async fn eddsa_rs256_and_es256_keys_of_the_jwks_are_accepted(store: Backend) {
    let app = store.spawn().await;
    for key in [TestKey::ed(), TestKey::rsa(), TestKey::ec()] {
        let token = tokens::sign(&key, &tokens::claims_for("alice"));
        expect_json(pull_with(&app, &token).await, StatusCode::OK).await;
    }
}

#[apply(both_stores)]
async fn a_small_clock_difference_is_tolerated(store: Backend) {
    let app = store.spawn().await;
    let token = tokens::token_for_with("alice", |c| c["exp"] = json!(tokens::now() - 5));
    expect_json(pull_with(&app, &token).await, StatusCode::OK).await;
}

#[apply(both_stores)]
async fn unknown_kids_trigger_at_most_one_jwks_fetch_per_interval(store: Backend) {
    let app = store.spawn_with(&[("JWKS_MIN_REFRESH_INTERVAL", "1s")]).await;
    // Let the interval since the start-up fetch pass, so a miss may fetch.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    app.jwks.reset_hits();
    let burst = || {
        let requests = (0..20).map(|i| {
            let token = tokens::sign(
                &TestKey::ed().with_kid(&format!("new-{i}")),
                &tokens::claims_for("alice"),
            );
            let app = &app;
            async move { pull_with(app, &token).await.status() }
        });
        futures_util::future::join_all(requests)
    };
    let statuses = burst().await;
    assert!(statuses.iter().all(|s| *s == StatusCode::UNAUTHORIZED));
    assert_eq!(app.jwks.hits(), 1, "20 concurrent unknown kids cause exactly one fetch");
    burst().await;
    assert_eq!(app.jwks.hits(), 1, "no second fetch within the interval");
}

#[apply(both_stores)]
async fn an_empty_key_set_does_not_log_everyone_out(store: Backend) {
    let app = store.spawn_with(&[("JWKS_REFRESH_INTERVAL", "100ms")]).await;
    app.jwks.set_keys(serde_json::json!({ "keys": [] }));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(app.jwks.hits() >= 2, "the empty set was fetched");
    expect_json(pull_with(&app, &tokens::token_for("alice")).await, StatusCode::OK).await;
}

#[apply(both_stores)]
async fn a_rotated_key_is_picked_up_on_its_first_token(store: Backend) {
    let app = store.spawn_with(&[("JWKS_MIN_REFRESH_INTERVAL", "0s")]).await;
    let rotated = TestKey::ed().with_kid("ed-2");
    let token = tokens::sign(&rotated, &tokens::claims_for("alice"));
    expect_error(pull_with(&app, &token).await, StatusCode::UNAUTHORIZED, "unauthorized").await;
    app.jwks.set_keys(tokens::jwks_json([&TestKey::ed(), &rotated]));
    expect_json(pull_with(&app, &token).await, StatusCode::OK).await;
}

#[apply(both_stores)]
async fn a_jwks_outage_does_not_stop_tokens_signed_by_cached_keys(store: Backend) {
    let app = store
        .spawn_with(&[("JWKS_MIN_REFRESH_INTERVAL", "0s"), ("JWKS_REFRESH_INTERVAL", "100ms")])
        .await;
    app.jwks.set_failing(true);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let hits_during_outage = app.jwks.hits();
    expect_json(pull_with(&app, &tokens::token_for("alice")).await, StatusCode::OK).await;
    // An unknown kid during the outage still fails cleanly (401, not 500).
    expect_error(
        pull_with(&app, &tokens::unknown_kid_token_for("alice")).await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    )
    .await;
    assert!(
        hits_during_outage >= 2,
        "refreshes were attempted (and failed) during the outage: {hits_during_outage}"
    );
}

/// A token inside its leeway is as good on a stream and a socket as on
/// HTTP: it is accepted by all three, and none ends before the leeway does.
#[apply(both_stores)]
async fn the_leeway_is_the_same_on_http_streams_and_sockets(store: Backend) {
    let app = store.spawn_with(&[("JWT_LEEWAY", "30s")]).await;
    let lapsed = tokens::token_for_with("alice", |c| c["exp"] = json!(tokens::now() - 5));
    expect_json(pull_with(&app, &lapsed).await, StatusCode::OK).await;
    let mut socket = common::ws::authed(&app, "/ws/todo", &lapsed, None).await;
    common::ws::catch_up(&mut socket).await;
    let stream = app
        .http
        .get(app.url(&format!("/sync/{APP}/stream")))
        .bearer_auth(&lapsed)
        .query(&[("collections", "todos")])
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), StatusCode::OK);
    let mut body = stream.bytes_stream();
    tokio::time::sleep(Duration::from_secs(2)).await;
    use futures_util::StreamExt;
    let first = tokio::time::timeout(Duration::from_secs(1), body.next()).await;
    assert!(
        matches!(first, Ok(Some(Ok(_)))),
        "the stream is still open within the leeway: {first:?}"
    );
    common::ws::send(&mut socket, json!({ "type": "ping" })).await;
    assert_eq!(
        common::ws::expect_json(&mut socket, Duration::from_secs(2)).await,
        json!({ "type": "pong" }),
        "the socket is still open within the leeway"
    );
}

/// `exp` at the largest number a token can carry is a token that never
/// expires, not a crash: a pull, a stream and a socket all take it.
#[apply(both_stores)]
async fn a_token_that_never_expires_is_served_everywhere(store: Backend) {
    let app = store.spawn().await;
    let forever = tokens::token_for_with("alice", |c| c["exp"] = json!(u64::MAX));
    expect_json(pull_with(&app, &forever).await, StatusCode::OK).await;
    let mut socket = common::ws::authed(&app, "/ws/todo", &forever, None).await;
    common::ws::catch_up(&mut socket).await;
    let stream = app
        .http
        .get(app.url(&format!("/sync/{APP}/stream")))
        .bearer_auth(&forever)
        .query(&[("collections", "todos")])
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), StatusCode::OK);
    use futures_util::StreamExt;
    let first = tokio::time::timeout(Duration::from_secs(5), stream.bytes_stream().next()).await;
    assert!(matches!(first, Ok(Some(Ok(_)))), "the stream serves: {first:?}");
}

/// A JWKS answer over a megabyte is not read (cached keys keep working),
/// and a slow auth service does not hold up start-up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_jwks_is_refused_and_a_slow_one_does_not_hold_up_start_up() {
    let jwks = std::sync::Arc::new(tokens::JwksServer::start_default().await);
    jwks.set_delay(Duration::from_secs(3));
    let started = std::time::Instant::now();
    let app = common::app::start(
        common::app::Storage::Sqlite(std::sync::Arc::new(tempfile::tempdir().unwrap())),
        jwks.clone(),
        &[("JWKS_MIN_REFRESH_INTERVAL", "0s")],
    )
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "started in {:?}",
        started.elapsed()
    );
    // The first token waits for the one fetch under way.
    expect_json(pull_with(&app, &tokens::token_for("alice")).await, StatusCode::OK).await;
    jwks.set_delay(Duration::ZERO);

    let rotated = TestKey::ed().with_kid("ed-2");
    let mut huge = tokens::jwks_json([&TestKey::ed(), &rotated]);
    huge["padding"] = json!("x".repeat(2 * 1024 * 1024));
    jwks.set_raw_body(Some(&huge.to_string()));
    let token = tokens::sign(&rotated, &tokens::claims_for("alice"));
    expect_error(pull_with(&app, &token).await, StatusCode::UNAUTHORIZED, "unauthorized").await;
    expect_json(pull_with(&app, &tokens::token_for("alice")).await, StatusCode::OK).await;
    jwks.set_raw_body(None);
    jwks.set_keys(tokens::jwks_json([&TestKey::ed(), &rotated]));
    expect_json(pull_with(&app, &token).await, StatusCode::OK).await;
}
