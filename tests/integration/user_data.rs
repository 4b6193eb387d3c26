//! User data comes back exactly as it was sent: numbers of any size and
//! precision, strings with any escapes, nesting of any depth; and no
//! well-formed change is refused forever for its timestamps (a device
//! retries a refused batch unchanged, so a refusal would block it for good).

use crate::common;

use common::app::{APP, Backend, Postgres, START, Sqlite, TestApp, both_stores, expect_error, expect_json};
use reqwest::StatusCode;
use rstest::rstest;
use rstest_reuse::apply;
use serde_json::Value;

/// Numbers as JSON writes them, each to come back with the same digits.
const NUMBERS: [&str; 10] = [
    "1180591620717411303424123",
    "-98765432109876543210987654321",
    "18446744073709551616",
    "9007199254740993",
    "0.1",
    "1.50",
    "3.14159265358979323846264338327950288",
    "-0.000000000000000000000000001",
    "0",
    "-7",
];

/// Pushes `body` (JSON text, sent as it is) for `user`.
async fn push_text(app: &TestApp, user: &str, body: String) -> reqwest::Response {
    app.http
        .post(app.url(&format!("/sync/{APP}")))
        .bearer_auth(common::tokens::token_for(user))
        .header("Content-Type", "application/json")
        .header("X-Client-Id", "a")
        .body(body)
        .send()
        .await
        .unwrap()
}

/// The record `id` as a new device pulls it.
async fn pulled(app: &TestApp, user: &str, id: &str) -> Value {
    let page = app.pull_ok(user, "things", START, None).await;
    common::app::change_for(&page, id)
        .unwrap_or_else(|| panic!("{id} is pulled: {page}"))
        .clone()
}

#[apply(both_stores)]
async fn numbers_strings_and_nesting_come_back_exactly(store: Backend) {
    let app = store.spawn().await;
    let numbers = NUMBERS.join(", ");
    let deep = format!("{}1{}", "[".repeat(64), "]".repeat(64));
    let text = r#""tab\t quote\" backslash\\ nul-free \u2028 \ud83d\ude00 é 日本""#;
    let body = format!(
        r#"{{"clientId": "a", "changes": [
            {{"table": "things", "id": "n", "op": "insert",
              "data": {{"numbers": [{numbers}], "big": {first}, "text": {text}, "deep": {deep},
                        "nested": {{"a": {{"b": [1.0, {{"c": null}}, true, ""]}}}},
                        "updatedAt": "2024-01-01T10:00:00.000Z"}}}},
            {{"table": "things", "id": "u", "op": "insert", "data": {{"v": 1, "updatedAt": "2024-01-01T10:00:00.000Z"}}}},
            {{"table": "things", "id": "u", "op": "update",
              "fields": {{"v": {{"value": {first}, "updatedAt": "2024-01-01T11:00:00.000Z"}}}}}}
        ]}}"#,
        first = NUMBERS[0],
    );
    expect_json(push_text(&app, "alice", body).await, StatusCode::OK).await;
    let record = pulled(&app, "alice", "n").await;
    let data = &record["data"];
    let sent: Vec<String> = NUMBERS.iter().map(|n| n.to_string()).collect();
    let got: Vec<String> = data["numbers"]
        .as_array()
        .unwrap()
        .iter()
        .map(Value::to_string)
        .collect();
    assert_eq!(got, sent, "every number keeps its digits");
    assert_eq!(data["big"].to_string(), NUMBERS[0]);
    assert_eq!(data["text"], serde_json::from_str::<Value>(text).unwrap());
    assert_eq!(data["deep"].to_string(), deep);
    assert_eq!(data["nested"].to_string(), r#"{"a":{"b":[1.0,{"c":null},true,""]}}"#);
    // A field's value, through the fold, and the delta a device that has
    // seen the insert gets.
    let updated = pulled(&app, "alice", "u").await;
    assert_eq!(updated["data"]["v"].to_string(), NUMBERS[0]);
    let since = {
        let first = app.pull_ok("alice", "things", START, None).await;
        first["syncedUntil"].as_str().unwrap().to_owned()
    };
    let body = format!(
        r#"{{"clientId": "b", "changes": [{{"table": "things", "id": "u", "op": "update",
            "fields": {{"v": {{"value": {}, "updatedAt": "2024-01-01T12:00:00.000Z"}}}}}}]}}"#,
        NUMBERS[1]
    );
    expect_json(push_text(&app, "alice", body).await, StatusCode::OK).await;
    let delta = app.pull_ok("alice", "things", &since, None).await;
    let change = common::app::change_for(&delta, "u").unwrap();
    assert_eq!(change["fields"]["v"]["value"].to_string(), NUMBERS[1], "{change}");
}

#[apply(both_stores)]
async fn timestamps_anywhere_in_rfc_3339s_range_are_accepted(store: Backend) {
    let app = store.spawn().await;
    // Year 9999 is in the future like any other: clamped, not refused.
    let body = r#"{"clientId": "a", "changes": [
        {"table": "things", "id": "far", "op": "insert", "data": {"v": 1, "updatedAt": "2024-01-01T10:00:00.000Z"}},
        {"table": "things", "id": "far", "op": "update",
         "fields": {"v": {"value": 2, "updatedAt": "9999-12-31T23:59:59.999Z"}}},
        {"table": "things", "id": "old", "op": "insert", "data": {"v": 1, "updatedAt": "0001-01-01T00:00:00Z"}},
        {"table": "things", "id": "old", "op": "update",
         "fields": {"v": {"value": 2, "updatedAt": "1000-01-01T00:00:00Z"}}},
        {"table": "things", "id": "gone", "op": "delete", "deletedAt": "9999-01-01T00:00:00Z"}
    ]}"#;
    expect_json(push_text(&app, "alice", body.to_owned()).await, StatusCode::OK).await;
    let far = pulled(&app, "alice", "far").await;
    assert_eq!(far["data"]["v"], 2, "the later write wins: {far}");
    let old = pulled(&app, "alice", "old").await;
    assert_eq!(old["data"]["v"], 2, "{old}");
    // A later device edit, an hour ahead of now at most, beats the clamped one.
    let soon = mana_sync::timestamp::Timestamp(mana_sync::timestamp::Timestamp::now().0 + 60_000_000_000);
    let body = format!(
        r#"{{"clientId": "b", "changes": [{{"table": "things", "id": "far", "op": "update",
            "fields": {{"v": {{"value": 3, "updatedAt": "{}"}}}}}}]}}"#,
        soon.to_short_string()
    );
    expect_json(push_text(&app, "alice", body).await, StatusCode::OK).await;
    assert_eq!(pulled(&app, "alice", "far").await["data"]["v"], 3);
    // Cursors of any year: before the log, or after it.
    for since in [
        "0001-01-01T00:00:00Z",
        "9999-12-31T23:59:59Z",
        "1600-06-01T00:00:00+02:00",
    ] {
        let response = app.pull("alice", "things", since, None).await;
        expect_json(response, StatusCode::OK).await;
    }
    // What is not a timestamp at all is still refused, naming the change.
    let body = r#"{"clientId": "a", "changes": [
        {"table": "things", "id": "x", "op": "insert", "data": {"v": 1}},
        {"table": "things", "id": "x", "op": "update", "fields": {"v": {"value": 2, "updatedAt": "yesterday"}}}
    ]}"#;
    let refused = push_text(&app, "alice", body.to_owned()).await;
    let body = expect_json(refused, StatusCode::BAD_REQUEST).await;
    assert_eq!(body["code"], "invalid_timestamp");
    assert!(body["message"].as_str().unwrap().contains("changes[1]"), "{body}");
    expect_error(
        app.pull("alice", "things", "soon", None).await,
        StatusCode::BAD_REQUEST,
        "invalid_cursor",
    )
    .await;
}

#[apply(both_stores)]
async fn numbers_in_exponent_form_keep_their_value_and_absurd_ones_are_refused(store: Backend) {
    let app = store.spawn().await;
    let forms = ["1e2", "1E-7", "1.0e+2", "12345678901234567890e-5", "-2.5e3"];
    let body = format!(
        r#"{{"clientId": "a", "changes": [{{"table": "things", "id": "e", "op": "insert",
            "data": {{"v": [{}], "updatedAt": "2024-01-01T10:00:00.000Z"}}}}]}}"#,
        forms.join(", ")
    );
    expect_json(push_text(&app, "alice", body).await, StatusCode::OK).await;
    let record = pulled(&app, "alice", "e").await;
    // The spelling may change (PostgreSQL writes exponents out: 1e2 comes
    // back 100); the value, digit for digit, is the one sent.
    let got: Vec<String> = record["data"]["v"]
        .as_array()
        .unwrap()
        .iter()
        .map(Value::to_string)
        .collect();
    let expected = ["100", "0.0000001", "100", "123456789012345.67890", "-2500"];
    for ((sent, got), value) in forms.iter().zip(&got).zip(expected) {
        assert_eq!(exact(got), exact(sent), "{sent} came back as {got}");
        assert_eq!(exact(got), exact(value), "{sent} came back as {got}");
    }
    // A number that written out would have more than 1,000 digits is
    // refused before anything is written, naming the change.
    let body = r#"{"clientId": "a", "changes": [
        {"table": "things", "id": "x", "op": "insert", "data": {"v": 1}},
        {"table": "things", "id": "y", "op": "insert", "data": {"v": [1e100000]}}
    ]}"#;
    let refused = expect_json(push_text(&app, "alice", body.to_owned()).await, StatusCode::BAD_REQUEST).await;
    assert_eq!(refused["code"], "number_out_of_range");
    assert!(
        refused["message"].as_str().unwrap().starts_with("changes[1]"),
        "{refused}"
    );
    let page = app.pull_ok("alice", "things", START, None).await;
    assert!(
        common::app::change_for(&page, "x").is_none(),
        "nothing of the batch is written"
    );
}

/// A decimal number's exact value as (digits, power of ten), normalised,
/// to compare two spellings of one number without rounding.
fn exact(text: &str) -> (bool, String, i64) {
    let (mantissa, exponent) = match text.to_lowercase().split_once('e') {
        Some((m, e)) => (m.to_owned(), e.trim_start_matches('+').parse::<i64>().unwrap()),
        None => (text.to_owned(), 0),
    };
    let negative = mantissa.starts_with('-');
    let mantissa = mantissa.trim_start_matches('-');
    let (whole, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits = format!("{whole}{fraction}");
    let mut power = exponent - fraction.len() as i64;
    let mut digits = digits.trim_start_matches('0').to_owned();
    while digits.ends_with('0') {
        digits.pop();
        power += 1;
    }
    if digits.is_empty() {
        return (false, String::new(), 0);
    }
    (negative, digits, power)
}
