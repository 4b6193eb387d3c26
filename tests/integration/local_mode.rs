//! Local mode (no JWKS_URL): the server issues and accepts its own tokens.

use crate::common;

use common::app::{Backend, Postgres, Sqlite, both_stores};
use rstest::rstest;
use rstest_reuse::apply;

use std::process::Command;

use common::app::{APP, START, expect_error, expect_json, insert, push_body};
use reqwest::StatusCode;
use serde_json::json;

fn token_from_cli(data_dir: &std::path::Path, extra: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mana-sync"));
    cmd.env_clear()
        .env("DATA_DIR", data_dir)
        .args(["token", "--sub", "alice", "--ttl", "1h"]);
    for (k, v) in extra {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

#[apply(both_stores)]
async fn a_token_from_the_cli_is_accepted_and_no_other_key_is(store: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let output = token_from_cli(dir.path(), &[]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let token = String::from_utf8(output.stdout).unwrap().trim().to_owned();

    let data_dir = dir.path().to_str().unwrap();
    let app = store
        .spawn_with(&[
            ("JWKS_URL", ""),
            ("DATA_DIR", data_dir),
            ("JWT_ISSUER", ""),
            ("JWT_AUDIENCE", ""),
        ])
        .await;
    assert!(app.config.host.is_loopback());
    let push = |token: String| {
        let app = &app;
        async move {
            app.http
                .post(app.url(&format!("/sync/{APP}")))
                .bearer_auth(token)
                .json(&push_body("cli", START, json!([insert("todos", "t", json!({}))])))
                .send()
                .await
                .unwrap()
        }
    };
    expect_json(push(token.clone()).await, StatusCode::OK).await;
    expect_error(
        push(common::tokens::token_for("alice")).await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    )
    .await;

    let jwks = expect_json(
        app.http.get(app.url("/.well-known/jwks.json")).send().await.unwrap(),
        StatusCode::OK,
    )
    .await;
    let kid = jsonwebtoken::decode_header(&token).unwrap().kid.unwrap();
    assert_eq!(jwks["keys"][0]["kid"], json!(kid));
    assert_eq!(jwks["keys"][0]["crv"], "Ed25519");
}

#[test]
fn the_token_command_refuses_to_run_against_an_auth_service() {
    let dir = tempfile::tempdir().unwrap();
    let output = token_from_cli(dir.path(), &[("JWKS_URL", "https://auth.example/jwks")]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("JWKS_URL"));
}

#[apply(both_stores)]
async fn with_a_jwks_url_there_is_no_local_key(store: Backend) {
    let app = store.spawn().await;
    let response = app.http.get(app.url("/.well-known/jwks.json")).send().await.unwrap();
    expect_error(response, StatusCode::NOT_FOUND, "not_found").await;
}
