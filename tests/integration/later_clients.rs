//! The original's later web client (PROTOCOL.md, "The later client
//! generation"): what it says of a change comes back with the record, its
//! delete form is understood, and it is not sent its own winning writes,
//! while the seed's engine beside it still is.

use crate::common;

use common::app::{Backend, Postgres, START, Sqlite, TestApp, both_stores, change_for, expect_error, insert};
use reqwest::StatusCode;
use rstest::rstest;
use rstest_reuse::apply;
use serde_json::{Value, json};

/// A field update as today's client sends it: the time as `at`, and who
/// made it.
fn todays_update(id: &str, field: &str, value: Value, at: &str, who: &str) -> Value {
    json!({
        "table": "todos", "id": id, "op": "update", "schemaVersion": 1,
        "fields": { field: { "value": value, "at": at } },
        "actor": { "kind": "user", "principalId": who }, "origin": "user"
    })
}

/// A pull of `todos` from the beginning by device `client`.
async fn pulled(app: &TestApp, client: &str) -> Value {
    app.pull_as("alice", client, "todos", START, None).await
}

#[apply(both_stores)]
async fn a_changes_provenance_comes_back_with_the_record(store: Backend) {
    let app = store.spawn().await;
    let mut created = insert(
        "todos",
        "t1",
        json!({ "title": "a", "done": false, "updatedAt": "2024-01-01T10:00:00.000Z" }),
    );
    created["spaceId"] = json!("space-1");
    let pushed = app
        .push(
            "alice",
            "tab-1",
            &json!({
                "clientId": "tab-1", "since": START, "schemaVersion": 1,
                "actor": { "kind": "ai", "principalId": "agent-7" }, "origin": "agent", "futureKey": [1],
                "changes": [created]
            }),
        )
        .await;
    let pushed = common::app::expect_json(pushed, StatusCode::OK).await;
    assert_eq!(
        pushed["serverChanges"],
        json!([]),
        "its own record is not sent back to it"
    );

    let other = pulled(&app, "phone").await;
    let change = change_for(&other, "t1").unwrap();
    assert_eq!(change["actor"], json!({ "kind": "ai", "principalId": "agent-7" }));
    assert_eq!(
        (&change["origin"], &change["spaceId"], &change["schemaVersion"]),
        (&json!("agent"), &json!("space-1"), &json!(1))
    );
    let event = change["eventId"].as_str().expect("eventId is a string").to_owned();

    // The latest winning field decides: bob's edit now names bob's entry.
    let answer = app
        .push_ok(
            "alice",
            "tab-2",
            START,
            json!([todays_update(
                "t1",
                "done",
                json!(true),
                "2024-01-01T11:00:00.000Z",
                "bob"
            )]),
        )
        .await;
    let change = change_for(&answer, "t1").expect("tab-2 is sent tab-1's insert");
    assert_eq!(change["op"], "insert");
    assert_eq!(change["data"]["done"], json!(true));
    assert_eq!(change["actor"]["principalId"], "bob");
    assert_eq!(change["origin"], "user");
    assert!(change.get("spaceId").is_none(), "absent, never null: {change}");
    assert_ne!(change["eventId"].as_str().unwrap(), event);

    // A seed-form change says nothing of itself but its entry and version 1.
    app.push_ok(
        "alice",
        "laptop",
        START,
        json!([insert("todos", "t2", json!({ "title": "old" }))]),
    )
    .await;
    let change = change_for(&pulled(&app, "phone").await, "t2").unwrap().clone();
    assert_eq!(change["schemaVersion"], json!(1));
    assert!(change["eventId"].as_str().is_some_and(|id| !id.is_empty()));
    for absent in ["actor", "origin", "spaceId"] {
        assert!(change.get(absent).is_none(), "{absent} of {change}");
    }
}

#[apply(both_stores)]
async fn a_later_device_gets_no_echo_and_the_seeds_engine_still_does(store: Backend) {
    let app = store.spawn().await;
    let base = app
        .push_ok(
            "alice",
            "laptop",
            START,
            json!([insert(
                "todos",
                "t1",
                json!({ "title": "a", "done": false, "updatedAt": "2024-01-01T10:00:00.000Z" })
            )]),
        )
        .await;
    let cursor = base["syncedUntil"].as_str().unwrap().to_owned();

    // Today's client edits the title; the seed's engine edits `done`.
    let answer = app
        .push_ok(
            "alice",
            "tab",
            &cursor,
            json!([todays_update(
                "t1",
                "title",
                json!("mine"),
                "2024-01-01T11:00:00.000Z",
                "ann"
            )]),
        )
        .await;
    // Its own title is not echoed: only the record's `updatedAt`, the
    // server's, which the title moved.
    let fields = &change_for(&answer, "t1").expect("t1's updatedAt")["fields"];
    assert_eq!(
        fields.as_object().unwrap().keys().collect::<Vec<_>>(),
        vec!["updatedAt"],
        "{answer}"
    );
    assert_eq!(fields["updatedAt"]["value"], "2024-01-01T11:00:00.000Z");
    let answer = app
        .push_ok(
            "alice",
            "laptop",
            &cursor,
            json!([common::app::update(
                "todos",
                "t1",
                "done",
                json!(true),
                "2024-01-01T11:30:00.000Z"
            )]),
        )
        .await;
    let fields = &change_for(&answer, "t1").expect("the seed's engine gets its echo")["fields"];
    assert_eq!(fields["done"]["value"], json!(true));
    assert_eq!(fields["title"]["at"], "2024-01-01T11:00:00.000Z");

    // Pulls: the tab gets the laptop's `done`, not its own title; the
    // laptop gets both; a device that never pushed gets both.
    let for_tab = app.pull_as("alice", "tab", "todos", &cursor, None).await;
    let fields = change_for(&for_tab, "t1").unwrap()["fields"]
        .as_object()
        .unwrap()
        .clone();
    assert_eq!(fields.keys().collect::<Vec<_>>(), vec!["done"], "{for_tab}");
    assert_eq!(fields["done"]["at"], "2024-01-01T11:30:00.000Z");
    for device in ["laptop", "new-phone"] {
        let answer = app.pull_as("alice", device, "todos", &cursor, None).await;
        let fields = change_for(&answer, "t1").unwrap()["fields"]
            .as_object()
            .unwrap()
            .clone();
        assert!(
            fields.contains_key("title") && fields.contains_key("done"),
            "{device}: {answer}"
        );
    }
    // Once another device's write beats the tab's, the tab is sent it.
    app.push_ok(
        "alice",
        "laptop",
        &cursor,
        json!([common::app::update(
            "todos",
            "t1",
            "title",
            json!("theirs"),
            "2024-01-01T12:00:00.000Z"
        )]),
    )
    .await;
    let for_tab = app.pull_as("alice", "tab", "todos", &cursor, None).await;
    assert_eq!(
        change_for(&for_tab, "t1").unwrap()["fields"]["title"]["value"],
        "theirs"
    );

    // Today's delete form: `deletedAt` plus `fields.deletedAt`; not echoed.
    let delete = json!({
        "table": "todos", "id": "t1", "op": "delete", "schemaVersion": 1, "deletedAt": "2024-01-01T13:00:00.000Z",
        "fields": { "deletedAt": { "value": "2024-01-01T13:00:00.000Z", "at": "2024-01-01T13:00:00.000Z" } }
    });
    let answer = app.push_ok("alice", "tab", &cursor, json!([delete])).await;
    assert!(change_for(&answer, "t1").is_none());
    let answer = app.pull_as("alice", "laptop", "todos", &cursor, None).await;
    assert_eq!(
        change_for(&answer, "t1").unwrap()["deletedAt"],
        "2024-01-01T13:00:00.000Z"
    );
}

#[apply(both_stores)]
async fn a_schema_version_the_server_does_not_know_writes_nothing(store: Backend) {
    let app = store.spawn().await;
    let body = json!({
        "clientId": "tab", "schemaVersion": 2,
        "changes": [{ "table": "todos", "id": "t1", "op": "insert", "data": { "title": "a" } }]
    });
    expect_error(
        app.push("alice", "tab", &body).await,
        StatusCode::BAD_REQUEST,
        "unsupported_schema_version",
    )
    .await;
    let body = json!({
        "clientId": "tab", "actor": "not an object",
        "changes": [{ "table": "todos", "id": "t1", "op": "insert", "data": { "title": "a" } }]
    });
    expect_error(
        app.push("alice", "tab", &body).await,
        StatusCode::BAD_REQUEST,
        "bad_request",
    )
    .await;
    assert_eq!(app.log_rows().await, 0);
}
