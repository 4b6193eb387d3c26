//! CORS, health and the OpenAPI document.

use crate::common;

use common::app::{Backend, Postgres, Sqlite, both_stores};
use rstest::rstest;
use rstest_reuse::apply;

use common::app::{APP, ORIGIN, expect_error, expect_json, spawn_app};
use reqwest::StatusCode;

#[apply(both_stores)]
async fn preflights_from_an_allowed_origin_succeed(store: Backend) {
    let app = store.spawn().await;
    let response = app
        .http
        .request(reqwest::Method::OPTIONS, app.url(&format!("/sync/{APP}")))
        .header("Origin", ORIGIN)
        .header("Access-Control-Request-Method", "POST")
        .header(
            "Access-Control-Request-Headers",
            "authorization, content-type, x-client-id",
        )
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success(), "preflight status {}", response.status());
    let headers = response.headers();
    assert_eq!(headers["access-control-allow-origin"], ORIGIN);
    let allowed = headers["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    for h in ["authorization", "content-type", "x-client-id"] {
        assert!(allowed.contains(h), "{h} missing from {allowed}");
    }
}

#[apply(both_stores)]
async fn errors_carry_the_allow_origin_header_too(store: Backend) {
    let app = store.spawn().await;
    let unauthorized = app
        .http
        .get(app.url(&format!("/sync/{APP}/pull?collection=todos")))
        .header("Origin", ORIGIN)
        .send()
        .await
        .unwrap();
    assert_eq!(unauthorized.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(unauthorized.headers()["access-control-allow-origin"], ORIGIN);
    // A page must be able to read a 429's Retry-After.
    let exposed = unauthorized.headers()["access-control-expose-headers"]
        .to_str()
        .unwrap();
    assert!(exposed.to_ascii_lowercase().contains("retry-after"), "{exposed}");
    let bad = app
        .http
        .post(app.url(&format!("/sync/{APP}")))
        .header("Origin", ORIGIN)
        .bearer_auth(common::tokens::token_for("alice"))
        .header("Content-Type", "application/json")
        .body("{")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    assert_eq!(bad.headers()["access-control-allow-origin"], ORIGIN);
}

#[apply(both_stores)]
async fn other_origins_get_no_allow_origin_header(store: Backend) {
    let app = store.spawn().await;
    let response = app
        .http
        .get(app.url("/health"))
        .header("Origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    assert!(response.headers().get("access-control-allow-origin").is_none());
}

#[apply(both_stores)]
async fn health_has_the_seeds_shape_and_checks_the_database(store: Backend) {
    let app = store.spawn().await;
    let health = expect_json(app.http.get(app.url("/health")).send().await.unwrap(), StatusCode::OK).await;
    assert_eq!(health["status"], "ok");
    assert_eq!(health["service"], "mana-sync");
    assert_eq!(health["database"], "ok");
    assert_eq!(health["listener"], "listening");
    assert!(health["timestamp"].as_str().unwrap().ends_with('Z'));
    assert!(health["connections"].is_u64() && health["users"].is_u64());
}

#[apply(both_stores)]
async fn the_openapi_document_and_docs_page_are_served(store: Backend) {
    let app = store.spawn().await;
    let spec = expect_json(
        app.http.get(app.url("/openapi.json")).send().await.unwrap(),
        StatusCode::OK,
    )
    .await;
    assert!(spec["paths"]["/sync/{appId}"]["post"].is_object());
    assert!(spec["paths"]["/sync/{appId}/pull"]["get"].is_object());
    let docs = app.http.get(app.url("/docs")).send().await.unwrap();
    assert_eq!(docs.status(), StatusCode::OK);
    assert!(docs.text().await.unwrap().to_lowercase().contains("swagger"));
}

/// Regenerate with `cargo run -- openapi > openapi/mana-sync.json`.
#[test]
fn the_committed_openapi_document_matches_the_code() {
    let committed = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi/mana-sync.json"))
        .expect("openapi/mana-sync.json exists");
    let generated = mana_sync::api::spec();
    assert!(
        committed.trim_end() == generated.trim_end(),
        "openapi/mana-sync.json is stale: run `cargo run -- openapi > openapi/mana-sync.json`"
    );
}

/// Every error code is declared in the spec, as the `enum` that
/// `ErrorBody.code` names, and the README's "Errors" table lists exactly
/// those codes, each with its status.
#[test]
fn every_error_code_is_declared_in_the_spec_and_listed_in_the_readme() {
    let spec: serde_json::Value = serde_json::from_str(&mana_sync::api::spec()).unwrap();
    let schemas = &spec["components"]["schemas"];
    let code = &schemas["ErrorBody"]["properties"]["code"];
    assert_eq!(code["$ref"], "#/components/schemas/ErrorCode", "{code}");
    let declared: std::collections::BTreeSet<&str> = schemas["ErrorCode"]["enum"]
        .as_array()
        .expect("ErrorCode is an enum")
        .iter()
        .map(|code| code.as_str().unwrap())
        .collect();
    assert!(
        declared.contains("invalid_timestamp") && declared.len() > 20,
        "{declared:?}"
    );
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let errors = readme.split("\n## Errors\n").nth(1).expect("a README section 'Errors'");
    let errors = errors.split("\n## ").next().unwrap();
    let listed: std::collections::BTreeSet<&str> = errors
        .lines()
        .filter_map(|line| line.strip_prefix("| `")?.split_once("` | "))
        .map(|(code, rest)| {
            let status = rest.split(' ').next().unwrap();
            assert!(
                status.len() == 3 && status.parse::<u16>().is_ok(),
                "{code}: no status in {line}",
                line = rest
            );
            code
        })
        .collect();
    assert_eq!(listed, declared, "the README's error codes differ from the spec's");
}

/// poem-openapi drops the schemas no operation reaches through the keywords
/// it knows, even those a `$ref` it does not know of (`contentSchema`) names.
#[test]
fn every_reference_of_the_openapi_document_names_a_schema_it_holds() {
    fn references<'a>(value: &'a serde_json::Value, found: &mut Vec<&'a str>) {
        match value {
            serde_json::Value::Object(map) => {
                found.extend(map.get("$ref").and_then(serde_json::Value::as_str));
                map.values().for_each(|v| references(v, found));
            }
            serde_json::Value::Array(items) => items.iter().for_each(|v| references(v, found)),
            _ => {}
        }
    }
    let spec: serde_json::Value = serde_json::from_str(&mana_sync::api::spec()).unwrap();
    let mut found = Vec::new();
    references(&spec, &mut found);
    assert!(found.contains(&"#/components/schemas/ChangeEvent"), "{found:?}");
    for reference in found {
        let name = reference.strip_prefix("#/components/schemas/").unwrap_or(reference);
        assert!(
            spec["components"]["schemas"][name].is_object(),
            "{reference} names no schema"
        );
    }
}

#[test]
fn every_operation_and_error_status_is_documented() {
    let spec: serde_json::Value = serde_json::from_str(&mana_sync::api::spec()).unwrap();
    for (path, method) in [
        ("/sync/{appId}", "post"),
        ("/sync/{appId}/pull", "get"),
        ("/health", "get"),
    ] {
        let op = &spec["paths"][path][method];
        assert!(op["summary"].is_string(), "{method} {path} has no summary");
        assert!(op["description"].is_string(), "{method} {path} has no description");
    }
    let push = &spec["paths"]["/sync/{appId}"]["post"];
    for status in ["200", "400", "401", "413", "422", "500"] {
        assert!(push["responses"][status].is_object(), "push does not document {status}");
    }
    for param in push["parameters"].as_array().unwrap() {
        assert!(
            param["description"].is_string(),
            "parameter {} is undocumented",
            param["name"]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_a_database_it_cannot_reach_and_recovers() {
    let app = spawn_app().await;
    let admin = sqlx::PgPool::connect(&common::pg::server_admin_url()).await.unwrap();
    let set_connections = |allowed: bool| {
        let (admin, name) = (admin.clone(), app.db().name.clone());
        async move {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "ALTER DATABASE \"{name}\" WITH ALLOW_CONNECTIONS {allowed}"
            )))
            .execute(&admin)
            .await
            .unwrap();
            if !allowed {
                sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1")
                    .bind(&name)
                    .execute(&admin)
                    .await
                    .unwrap();
            }
        }
    };
    set_connections(false).await;
    let down = expect_json(app.http.get(app.url("/health")).send().await.unwrap(), StatusCode::OK).await;
    assert_eq!(
        (down["status"].as_str(), down["database"].as_str()),
        (Some("degraded"), Some("unreachable"))
    );
    set_connections(true).await;
    let up = app.wait_until_listening().await;
    assert_eq!(
        (up["status"].as_str(), up["database"].as_str()),
        (Some("ok"), Some("ok"))
    );
}

#[apply(both_stores)]
async fn a_wrong_method_is_told_the_allowed_ones_and_a_wrong_body_type_is_a_declared_415(store: Backend) {
    let app = store.spawn().await;
    for (method, path, allow) in [
        (reqwest::Method::PUT, "/sync/todo", "POST"),
        (reqwest::Method::DELETE, "/health", "GET, HEAD"),
        (reqwest::Method::POST, "/sync/todo/pull", "GET, HEAD"),
        (reqwest::Method::POST, "/ws/todo", "GET, HEAD"),
    ] {
        let response = app.http.request(method.clone(), app.url(path)).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
        assert_eq!(response.headers()["allow"], allow, "{method} {path}");
        expect_error(response, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed").await;
    }
    let response = app
        .http
        .post(app.url("/sync/todo"))
        .bearer_auth(common::tokens::token_for("alice"))
        .header("Content-Type", "text/plain")
        .body("hello")
        .send()
        .await
        .unwrap();
    expect_error(response, StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type").await;
    let spec: serde_json::Value = serde_json::from_str(&mana_sync::api::spec()).unwrap();
    assert!(spec["paths"]["/sync/{appId}"]["post"]["responses"]["415"].is_object());
}
