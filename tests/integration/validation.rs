//! Every client mistake of PROTOCOL.md gets a JSON 4xx, and nothing is written.

use crate::common;

use common::app::{Backend, Postgres, Sqlite, both_stores};
use rstest::rstest;
use rstest_reuse::apply;

use common::app::{APP, START, TestApp, expect_error, insert, push_body};
use reqwest::StatusCode;
use serde_json::{Value, json};

async fn post_raw(app: &TestApp, body: impl Into<reqwest::Body>) -> reqwest::Response {
    app.http
        .post(app.url(&format!("/sync/{APP}")))
        .bearer_auth(common::tokens::token_for("alice"))
        .header("X-Client-Id", "a")
        .header("Content-Type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap()
}

async fn rejected(app: &TestApp, body: Value, status: StatusCode, code: &str) {
    let response = app.push("alice", "a", &body).await;
    expect_error(response, status, code).await;
    assert_eq!(app.log_rows().await, 0, "nothing is written for {body}");
}

#[apply(both_stores)]
async fn malformed_json_and_wrong_types_are_400(store: Backend) {
    let app = store.spawn().await;
    expect_error(
        post_raw(&app, "{\"changes\": [").await,
        StatusCode::BAD_REQUEST,
        "bad_request",
    )
    .await;
    rejected(
        &app,
        json!({ "clientId": "a", "changes": "all of them" }),
        StatusCode::BAD_REQUEST,
        "bad_request",
    )
    .await;
    rejected(
        &app,
        json!({ "clientId": "a", "changes": [{ "table": 5, "id": "x", "op": "insert", "data": {} }] }),
        StatusCode::BAD_REQUEST,
        "bad_request",
    )
    .await;
    rejected(
        &app,
        json!({ "clientId": "a", "changes": [{ "table": "t", "id": "x", "op": "insert", "data": [] }] }),
        StatusCode::BAD_REQUEST,
        "bad_request",
    )
    .await;
    rejected(
        &app,
        json!({ "clientId": "a", "changes": [{ "table": "t", "id": "x", "op": "update", "fields": { "f": 1 } }] }),
        StatusCode::BAD_REQUEST,
        "bad_request",
    )
    .await;
}

#[apply(both_stores)]
async fn an_unknown_op_is_400(store: Backend) {
    let app = store.spawn().await;
    rejected(
        &app,
        push_body(
            "a",
            START,
            json!([{ "table": "t", "id": "x", "op": "upsert", "data": {} }]),
        ),
        StatusCode::BAD_REQUEST,
        "bad_request",
    )
    .await;
}

#[apply(both_stores)]
async fn empty_oversized_and_control_character_names_are_400(store: Backend) {
    let app = store.spawn().await;
    let long_table = "t".repeat(129);
    let long_id = "i".repeat(257);
    for (table, id) in [
        ("", "x"),
        (long_table.as_str(), "x"),
        ("t", ""),
        ("t", long_id.as_str()),
        ("t\n", "x"),
    ] {
        rejected(
            &app,
            push_body("a", START, json!([{ "table": table, "id": id, "op": "delete" }])),
            StatusCode::BAD_REQUEST,
            "invalid_name",
        )
        .await;
    }
    let long_app = "a".repeat(129);
    let response = app
        .http
        .post(app.url(&format!("/sync/{long_app}")))
        .bearer_auth(common::tokens::token_for("alice"))
        .json(&push_body("a", START, json!([])))
        .send()
        .await
        .unwrap();
    expect_error(response, StatusCode::BAD_REQUEST, "invalid_name").await;
}

#[apply(both_stores)]
async fn nul_characters_anywhere_are_400_not_500(store: Backend) {
    let app = store.spawn().await;
    for data in [
        json!({ "title": "a\u{0}b" }),
        json!({ "nested": { "k": ["\u{0}"] } }),
        json!({ "bad\u{0}key": 1 }),
    ] {
        rejected(
            &app,
            push_body("a", START, json!([insert("todos", "x", data)])),
            StatusCode::BAD_REQUEST,
            "nul_character",
        )
        .await;
    }
    rejected(
        &app,
        push_body(
            "a",
            START,
            json!([{ "table": "todos", "id": "x\u{0}", "op": "delete" }]),
        ),
        StatusCode::BAD_REQUEST,
        "nul_character",
    )
    .await;
    // Raw escaped form, exactly as a browser's JSON.stringify sends it.
    expect_error(
        post_raw(
            &app,
            r#"{"clientId":"a","changes":[{"table":"todos","id":"x","op":"insert","data":{"title":"\u0000"}}]}"#,
        )
        .await,
        StatusCode::BAD_REQUEST,
        "nul_character",
    )
    .await;
    assert_eq!(app.log_rows().await, 0);
}

#[apply(both_stores)]
async fn a_body_declared_over_10_mb_is_413_before_it_is_sent(store: Backend) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = store.spawn().await;
    let mut socket = tokio::net::TcpStream::connect(app.address.trim_start_matches("http://"))
        .await
        .unwrap();
    let head = format!(
        "POST /sync/{APP} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        common::tokens::token_for("alice"),
        10 * 1024 * 1024 + 1
    );
    socket.write_all(head.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&response).contains("payload_too_large") {
        let n = tokio::time::timeout(std::time::Duration::from_secs(10), socket.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(
            n > 0,
            "connection closed without a 413: {}",
            String::from_utf8_lossy(&response)
        );
        response.extend_from_slice(&buf[..n]);
    }
    assert!(String::from_utf8_lossy(&response).starts_with("HTTP/1.1 413"));
    assert_eq!(app.log_rows().await, 0);
}

#[apply(both_stores)]
async fn a_streamed_body_over_10_mb_is_413(store: Backend) {
    let app = store.spawn().await;
    let body = vec![b' '; 10 * 1024 * 1024 + 1];
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = body.chunks(256 * 1024).map(|c| Ok(c.to_vec())).collect();
    let streamed = reqwest::Body::wrap_stream(futures_util::stream::iter(chunks));
    expect_error(
        post_raw(&app, streamed).await,
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
    )
    .await;
    assert_eq!(app.log_rows().await, 0);
}

#[apply(both_stores)]
async fn too_many_changes_in_one_batch_is_413(store: Backend) {
    let app = store.spawn_with(&[("MAX_BATCH_CHANGES", "10")]).await;
    let changes: Vec<Value> = (0..11).map(|i| insert("todos", &format!("r{i}"), json!({}))).collect();
    rejected(
        &app,
        push_body("a", START, Value::Array(changes)),
        StatusCode::PAYLOAD_TOO_LARGE,
        "too_many_changes",
    )
    .await;
}

#[apply(both_stores)]
async fn bad_timestamps_and_cursors_are_400(store: Backend) {
    let app = store.spawn().await;
    rejected(
        &app,
        push_body("a", "last tuesday", json!([insert("todos", "x", json!({}))])),
        StatusCode::BAD_REQUEST,
        "invalid_cursor",
    )
    .await;
    rejected(
        &app,
        push_body(
            "a",
            START,
            json!([insert("todos", "x", json!({ "updatedAt": "2024-13-45T00:00:00Z" }))]),
        ),
        StatusCode::BAD_REQUEST,
        "invalid_timestamp",
    )
    .await;
    rejected(
        &app,
        push_body(
            "a",
            START,
            json!([{ "table": "t", "id": "x", "op": "delete", "deletedAt": "soon" }]),
        ),
        StatusCode::BAD_REQUEST,
        "invalid_timestamp",
    )
    .await;
    expect_error(
        app.pull("alice", "todos", "garbage", None).await,
        StatusCode::BAD_REQUEST,
        "invalid_cursor",
    )
    .await;
}

#[apply(both_stores)]
async fn pull_parameters_out_of_bounds_are_400(store: Backend) {
    let app = store.spawn().await;
    expect_error(
        app.pull("alice", "todos", START, Some(0)).await,
        StatusCode::BAD_REQUEST,
        "bad_request",
    )
    .await;
    expect_error(
        app.pull("alice", "todos", START, Some(5001)).await,
        StatusCode::BAD_REQUEST,
        "bad_request",
    )
    .await;
    expect_error(
        app.pull("alice", "", START, None).await,
        StatusCode::BAD_REQUEST,
        "invalid_name",
    )
    .await;
    let no_collection = app
        .http
        .get(app.url(&format!("/sync/{APP}/pull")))
        .bearer_auth(common::tokens::token_for("alice"))
        .send()
        .await
        .unwrap();
    expect_error(no_collection, StatusCode::BAD_REQUEST, "bad_request").await;
}

#[apply(both_stores)]
async fn a_push_without_a_client_id_is_400(store: Backend) {
    let app = store.spawn().await;
    let response = app
        .http
        .post(app.url(&format!("/sync/{APP}")))
        .bearer_auth(common::tokens::token_for("alice"))
        .json(&json!({ "changes": [insert("todos", "x", json!({}))] }))
        .send()
        .await
        .unwrap();
    expect_error(response, StatusCode::BAD_REQUEST, "missing_client_id").await;
    assert_eq!(app.log_rows().await, 0);
}

#[apply(both_stores)]
async fn unknown_routes_and_methods_answer_json(store: Backend) {
    let app = store.spawn().await;
    let missing = app.http.get(app.url("/nope")).send().await.unwrap();
    expect_error(missing, StatusCode::NOT_FOUND, "not_found").await;
    let wrong_method = app.http.delete(app.url(&format!("/sync/{APP}"))).send().await.unwrap();
    assert!(wrong_method.status().is_client_error());
    let body: Value = wrong_method.json().await.expect("JSON error body");
    assert!(body["code"].is_string() && body["message"].is_string());
}
