//! Push and pull over HTTP, on each store: the seed's flow, field-level
//! LWW, cursors and pagination, idempotency, failed and refused pushes.

use crate::common;

use common::app::{Backend, Postgres, Sqlite, both_stores};
use rstest::rstest;
use rstest_reuse::apply;

use common::app::{APP, START, change_for, delete, expect_error, insert, push_body, update};
use reqwest::StatusCode;
use serde_json::{Value, json};

#[apply(both_stores)]
async fn the_seed_flow_insert_update_delete_reaches_another_device(store: Backend) {
    let app = store.spawn().await;

    let pushed = app
        .push_ok(
            "alice",
            "laptop",
            START,
            json!([insert(
                "todos",
                "todo-1",
                json!({ "title": "Buy milk", "updatedAt": "2024-01-01T10:05:00Z" })
            )]),
        )
        .await;
    assert_eq!(pushed["conflicts"], json!([]));
    assert_eq!(pushed["hasMore"], json!(false));

    let first = app.pull_ok("alice", "todos", START, None).await;
    let change = change_for(&first, "todo-1").expect("the other device sees the insert");
    assert_eq!(change["op"], "insert");
    assert_eq!(change["table"], "todos");
    assert_eq!(
        change["data"],
        json!({ "id": "todo-1", "title": "Buy milk", "updatedAt": "2024-01-01T10:05:00Z" })
    );
    let cursor = first["syncedUntil"].as_str().unwrap().to_owned();

    app.push_ok(
        "alice",
        "laptop",
        &cursor,
        json!([update(
            "todos",
            "todo-1",
            "title",
            json!("Buy eggs"),
            "2024-01-01T10:05:30Z"
        )]),
    )
    .await;
    let second = app.pull_ok("alice", "todos", &cursor, None).await;
    let change = change_for(&second, "todo-1").expect("the update arrives");
    assert_eq!(change["op"], "update");
    // The time under both names: the seed's clients read `updatedAt`,
    // today's `at`.
    let at = "2024-01-01T10:05:30.000Z";
    assert_eq!(
        change["fields"],
        json!({ "title": { "value": "Buy eggs", "updatedAt": at, "at": at } })
    );
    assert_eq!(change["data"]["title"], "Buy eggs");
    assert_eq!(change["data"]["id"], "todo-1");
    let cursor = second["syncedUntil"].as_str().unwrap().to_owned();

    assert_eq!(
        app.pull_ok("alice", "todos", &cursor, None).await["serverChanges"],
        json!([]),
        "nothing new since the cursor"
    );

    app.push_ok(
        "alice",
        "laptop",
        &cursor,
        json!([delete("todos", "todo-1", "2024-01-01T10:06:00Z")]),
    )
    .await;
    let third = app.pull_ok("alice", "todos", &cursor, None).await;
    let change = change_for(&third, "todo-1").expect("the delete arrives");
    assert_eq!(change["op"], "delete");
    assert_eq!(change["deletedAt"], "2024-01-01T10:06:00.000Z");

    let anonymous = app
        .http
        .get(app.url(&format!("/sync/{APP}/pull?collection=todos")))
        .send()
        .await
        .unwrap();
    expect_error(anonymous, StatusCode::UNAUTHORIZED, "unauthorized").await;
}

#[apply(both_stores)]
async fn the_latest_field_timestamp_wins_even_when_it_arrives_first(store: Backend) {
    let app = store.spawn().await;
    app.push_ok(
        "alice",
        "a",
        START,
        json!([insert(
            "todos",
            "t",
            json!({ "title": "first", "done": false, "updatedAt": "2024-01-01T10:00:00Z" })
        )]),
    )
    .await;
    // B's edit is newer and arrives first; A's older edit of the same field arrives late.
    app.push_ok(
        "alice",
        "b",
        START,
        json!([update("todos", "t", "title", json!("newer"), "2024-01-01T10:05:30Z")]),
    )
    .await;
    let late = app
        .push_ok(
            "alice",
            "a",
            START,
            json!([
                update("todos", "t", "title", json!("older"), "2024-01-01T10:05:00Z"),
                update("todos", "t", "done", json!(true), "2024-01-01T10:05:00Z"),
            ]),
        )
        .await;
    // `updatedAt` is the record's latest field time (the newer title's), as
    // on the devices that applied the updates; no longer the insert's.
    assert_eq!(
        change_for(&late, "t").unwrap()["data"],
        json!({ "id": "t", "title": "newer", "done": true, "updatedAt": "2024-01-01T10:05:30.000Z" })
    );
    let pulled = app.pull_ok("alice", "todos", START, None).await;
    assert_eq!(change_for(&pulled, "t").unwrap()["data"]["title"], "newer");
    assert_eq!(change_for(&pulled, "t").unwrap()["data"]["done"], true);
}

#[apply(both_stores)]
async fn equal_timestamps_are_won_by_the_later_push(store: Backend) {
    let app = store.spawn().await;
    let at = "2024-01-01T10:00:00Z";
    app.push_ok(
        "alice",
        "a",
        START,
        json!([update("todos", "t", "title", json!("from a"), at)]),
    )
    .await;
    app.push_ok(
        "alice",
        "b",
        START,
        json!([update("todos", "t", "title", json!("from b"), at)]),
    )
    .await;
    let pulled = app.pull_ok("alice", "todos", START, None).await;
    assert_eq!(change_for(&pulled, "t").unwrap()["data"]["title"], "from b");
}

/// PROTOCOL.md: the old client applies pulled changes over its unpushed
/// edit; its later push must bring its own winning value back to it.
#[apply(both_stores)]
async fn a_device_gets_its_own_winning_write_back_after_a_pull_overwrote_it(store: Backend) {
    let app = store.spawn().await;
    app.push_ok(
        "alice",
        "a",
        START,
        json!([insert(
            "todos",
            "t",
            json!({ "title": "v0", "updatedAt": "2024-01-01T09:00:00Z" })
        )]),
    )
    .await;
    let a_cursor = app.pull_ok("alice", "todos", START, None).await["syncedUntil"]
        .as_str()
        .unwrap()
        .to_owned();

    // A edits offline at 10:10 (unpushed); B pushes an older edit at 10:00.
    app.push_ok(
        "alice",
        "b",
        START,
        json!([update("todos", "t", "title", json!("from b"), "2024-01-01T10:00:00Z")]),
    )
    .await;
    // A pulls first: its local copy now shows B's value...
    let pulled = app.pull_ok("alice", "todos", &a_cursor, None).await;
    assert_eq!(change_for(&pulled, "t").unwrap()["data"]["title"], "from b");
    let a_cursor = pulled["syncedUntil"].as_str().unwrap().to_owned();
    // ...then pushes its pending edit, which wins: the answer must carry it.
    let pushed = app
        .push_ok(
            "alice",
            "a",
            &a_cursor,
            json!([update("todos", "t", "title", json!("from a"), "2024-01-01T10:10:00Z")]),
        )
        .await;
    let own = change_for(&pushed, "t").expect("the device's own winning write comes back");
    assert_eq!(own["data"]["title"], "from a");
    assert_eq!(own["fields"]["title"]["value"], "from a");
}

#[apply(both_stores)]
async fn a_device_whose_write_lost_is_told_the_winning_value(store: Backend) {
    let app = store.spawn().await;
    app.push_ok(
        "alice",
        "b",
        START,
        json!([update("todos", "t", "title", json!("winner"), "2024-01-01T12:00:00Z")]),
    )
    .await;
    let cursor = app.pull_ok("alice", "todos", START, None).await["syncedUntil"]
        .as_str()
        .unwrap()
        .to_owned();
    let pushed = app
        .push_ok(
            "alice",
            "a",
            &cursor,
            json!([update("todos", "t", "title", json!("loser"), "2024-01-01T11:00:00Z")]),
        )
        .await;
    let change = change_for(&pushed, "t").expect("the record comes back to the losing device");
    assert_eq!(change["data"]["title"], "winner");
    assert_eq!(
        change["fields"]["title"],
        json!({ "value": "winner", "updatedAt": "2024-01-01T12:00:00.000Z", "at": "2024-01-01T12:00:00.000Z" })
    );
}

#[apply(both_stores)]
async fn an_update_of_an_unknown_record_reaches_other_devices_as_a_full_insert(store: Backend) {
    let app = store.spawn().await;
    app.push_ok(
        "alice",
        "a",
        START,
        json!([{ "table": "todos", "id": "new", "op": "update", "fields": {
        "title": { "value": "made offline", "updatedAt": "2024-01-01T10:00:00Z" },
        "done": { "value": false, "at": "2024-01-01T10:00:01Z" } } }]),
    )
    .await;
    let pulled = app.pull_ok("alice", "todos", START, None).await;
    let change = change_for(&pulled, "new").unwrap();
    assert_eq!(change["op"], "insert");
    assert_eq!(
        change["data"],
        json!({ "id": "new", "title": "made offline", "done": false })
    );
}

#[apply(both_stores)]
async fn pulls_include_the_asking_devices_own_writes(store: Backend) {
    let app = store.spawn().await;
    let pushed = app
        .push_ok(
            "alice",
            "a",
            START,
            json!([insert("todos", "mine", json!({ "title": "x" }))]),
        )
        .await;
    assert!(
        change_for(&pushed, "mine").is_some(),
        "the push answer holds the device's own write"
    );
    let pulled = app.pull_as("alice", "a", "todos", START, None).await;
    assert!(
        change_for(&pulled, "mine").is_some(),
        "the device's own write is in its pull"
    );
}

#[apply(both_stores)]
async fn pagination_collects_every_record_exactly_once(store: Backend) {
    let app = store.spawn().await;
    let changes: Vec<Value> = (0..25)
        .map(|i| insert("todos", &format!("r{i:02}"), json!({ "n": i })))
        .collect();
    app.push_ok("alice", "a", START, Value::Array(changes)).await;
    app.push_ok("alice", "a", START, json!([insert("notes", "other-table", json!({}))]))
        .await;

    let first = app.pull_ok("alice", "todos", START, Some(10)).await;
    assert_eq!(first["serverChanges"].as_array().unwrap().len(), 10);
    assert_eq!(first["hasMore"], true);

    let (all, cursor) = app.pull_all("alice", "todos", START, Some(10)).await;
    let mut ids: Vec<&str> = all.iter().map(|c| c["id"].as_str().unwrap()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 25, "every record once, none from another table");
    assert_eq!(all.len(), 25);
    assert_eq!(
        app.pull_ok("alice", "todos", &cursor, Some(10)).await["serverChanges"],
        json!([])
    );
}

#[apply(both_stores)]
async fn cursors_are_fixed_width_timestamps_that_compare_as_strings(store: Backend) {
    let app = store.spawn().await;
    let mut cursors = Vec::new();
    for i in 0..5 {
        let r = app
            .push_ok(
                "alice",
                "a",
                START,
                json!([insert("todos", &format!("c{i}"), json!({}))]),
            )
            .await;
        cursors.push(r["syncedUntil"].as_str().unwrap().to_owned());
    }
    for pair in cursors.windows(2) {
        assert_eq!(pair[0].len(), "2024-01-01T10:06:15.123456789Z".len());
        assert!(pair[0] < pair[1], "cursors increase as strings: {pair:?}");
        assert!(pair[1].ends_with('Z'));
    }
    // A legacy RFC 3339 timestamp with an offset is accepted as a cursor.
    let legacy = app.pull_ok("alice", "todos", "2000-01-01T01:00:00+01:00", None).await;
    assert_eq!(legacy["serverChanges"].as_array().unwrap().len(), 5);
}

/// The old client: push `since` = the smallest cursor, then every
/// collection's cursor = the push's `syncedUntil`; one page per trigger,
/// `hasMore` ignored. Nothing may be lost.
#[apply(both_stores)]
async fn the_old_clients_cursor_bookkeeping_loses_nothing(store: Backend) {
    let app = store.spawn().await;
    // Another device writes more than one page across two tables.
    let many: Vec<Value> = (0..1200u32)
        .map(|i| {
            insert(
                if i.is_multiple_of(2) { "todos" } else { "notes" },
                &format!("b{i}"),
                json!({ "n": i }),
            )
        })
        .collect();
    app.push_ok("alice", "other", START, Value::Array(many)).await;

    let mut cursors = [("todos", START.to_owned()), ("notes", START.to_owned())];
    let mut seen = std::collections::HashSet::new();
    for round in 0..4 {
        let since = cursors.iter().map(|(_, c)| c.clone()).min().unwrap();
        let changes = json!([insert("todos", &format!("a{round}"), json!({}))]);
        let pushed = app.push_ok("alice", "old", &since, changes).await;
        for c in pushed["serverChanges"].as_array().unwrap() {
            seen.insert(c["id"].as_str().unwrap().to_owned());
        }
        let until = pushed["syncedUntil"].as_str().unwrap().to_owned();
        for (_, c) in cursors.iter_mut() {
            *c = until.clone();
        }
        for (table, cursor) in cursors.iter_mut() {
            let page = app.pull_ok("alice", table, cursor, None).await;
            for c in page["serverChanges"].as_array().unwrap() {
                seen.insert(c["id"].as_str().unwrap().to_owned());
            }
            *cursor = page["syncedUntil"].as_str().unwrap().to_owned();
        }
    }
    for i in 0..1200 {
        assert!(seen.contains(&format!("b{i}")), "b{i} was lost");
    }
    for round in 0..4 {
        assert!(seen.contains(&format!("a{round}")));
    }
}

#[apply(both_stores)]
async fn a_retried_push_with_the_same_idempotency_key_records_nothing_twice(store: Backend) {
    let app = store.spawn().await;
    let body = push_body("a", START, json!([insert("todos", "once", json!({ "title": "x" }))]));
    let send = |key: &'static str, body: Value| {
        let app = &app;
        async move {
            app.http
                .post(app.url(&format!("/sync/{APP}")))
                .bearer_auth(common::tokens::token_for("alice"))
                .header("X-Client-Id", "a")
                .header("Idempotency-Key", key)
                .json(&body)
                .send()
                .await
                .unwrap()
        }
    };
    let first = common::app::expect_json(send("k-1", body.clone()).await, StatusCode::OK).await;
    app.push_ok("alice", "b", START, json!([insert("todos", "between", json!({}))]))
        .await;
    // A retry is answered afresh (the outcome kept is only the batch's
    // position): the batch's change, and what came since.
    let retry = common::app::expect_json(send("k-1", body.clone()).await, StatusCode::OK).await;
    assert_eq!(
        change_for(&retry, "once"),
        change_for(&first, "once"),
        "the batch's change"
    );
    assert!(change_for(&retry, "between").is_some(), "and what came since: {retry}");
    let mut newer = body.clone();
    newer["since"] = retry["syncedUntil"].clone();
    let after_a_pull = common::app::expect_json(send("k-1", newer).await, StatusCode::OK).await;
    assert_eq!(
        change_for(&after_a_pull, "once"),
        change_for(&first, "once"),
        "a retry with a newer cursor is still the same batch, and answered with it"
    );
    assert_eq!(app.log_rows().await, 2, "the retried change is recorded once");

    let other = push_body("a", START, json!([insert("todos", "different", json!({}))]));
    expect_error(
        send("k-1", other).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "idempotency_key_reused",
    )
    .await;
    assert_eq!(app.log_rows().await, 2);
}

#[apply(both_stores)]
async fn a_far_future_timestamp_is_clamped_and_cannot_win_forever(store: Backend) {
    let app = store.spawn().await;
    app.push_ok(
        "alice",
        "bad-clock",
        START,
        json!([update(
            "todos",
            "t",
            "title",
            json!("from the future"),
            "2099-01-01T00:00:00Z"
        )]),
    )
    .await;
    let now = mana_sync::timestamp::Timestamp::now();
    let later = mana_sync::timestamp::Timestamp(now.0 + 60_000_000_000).to_short_string();
    app.push_ok(
        "alice",
        "good-clock",
        START,
        json!([update("todos", "t", "title", json!("a minute later"), &later)]),
    )
    .await;
    let pulled = app.pull_ok("alice", "todos", START, None).await;
    assert_eq!(change_for(&pulled, "t").unwrap()["data"]["title"], "a minute later");
}

/// A failure in the middle of recording (here a trigger that refuses one
/// record) rolls the whole batch back.
#[apply(both_stores)]
async fn a_batch_that_fails_while_being_recorded_leaves_nothing_behind(store: Backend) {
    let app = store.spawn().await;
    app.refuse_record("boom").await;
    let response = app
        .push(
            "alice",
            "a",
            &push_body(
                "a",
                START,
                json!([
                    insert("todos", "fine-1", json!({})),
                    insert("todos", "boom", json!({})),
                    insert("todos", "fine-2", json!({})),
                ]),
            ),
        )
        .await;
    expect_error(response, StatusCode::INTERNAL_SERVER_ERROR, "internal").await;
    assert_eq!(app.log_rows().await, 0, "no log row of the failed batch survives");
    assert_eq!(app.count("SELECT count(*) FROM sync_records").await, 0);
}

#[apply(both_stores)]
async fn a_push_is_all_or_nothing(store: Backend) {
    let app = store.spawn().await;
    let response = app
        .push("alice", "a", &push_body("a", START, json!([
            insert("todos", "good", json!({})),
            { "table": "todos", "id": "bad", "op": "update", "fields": { "x": { "value": 1, "updatedAt": "not a time" } } },
        ])))
        .await;
    expect_error(response, StatusCode::BAD_REQUEST, "invalid_timestamp").await;
    assert_eq!(app.log_rows().await, 0);
}

#[apply(both_stores)]
async fn a_page_of_large_records_stops_at_the_byte_budget_without_losing_any(store: Backend) {
    let app = store.spawn().await;
    let blob = "x".repeat(200 * 1024);
    for part in 0..3 {
        let changes: Vec<Value> = (0..16)
            .map(|i| insert("todos", &format!("big-{part}-{i}"), json!({ "blob": blob })))
            .collect();
        app.push_ok("alice", "a", START, Value::Array(changes)).await;
    }
    let first = app.pull_ok("alice", "todos", START, None).await;
    let sent = first["serverChanges"].as_array().unwrap().len();
    assert!(
        first["hasMore"].as_bool().unwrap() && sent < 48,
        "a 9.6 MB page is cut ({sent} records sent)"
    );
    let (all, _) = app.pull_all("alice", "todos", START, None).await;
    assert_eq!(all.len(), 48, "following the cursor collects every record");
}

#[apply(both_stores)]
async fn a_push_waiting_too_long_for_another_push_of_the_same_user_is_told_to_retry(store: Backend) {
    let app = store.spawn_with(&[("LOCK_TIMEOUT", "200ms")]).await;
    app.push_ok("alice", "a", START, json!([insert("todos", "first", json!({}))]))
        .await;
    // Another push of alice's, stuck inside its transaction.
    let mut stuck = app.store.begin_write("alice").await.unwrap();
    stuck.lock_clock("alice").await.unwrap();

    let response = app
        .push(
            "alice",
            "b",
            &push_body("b", START, json!([insert("todos", "second", json!({}))])),
        )
        .await;
    assert_eq!(response.headers()["retry-after"], "1");
    expect_error(response, StatusCode::TOO_MANY_REQUESTS, "busy").await;
    if store == Postgres {
        // (SQLite has one writer: there, other users wait too.)
        app.push_ok("bob", "c", START, json!([insert("todos", "other-user", json!({}))]))
            .await;
    }
    stuck.rollback().await.unwrap();
    app.push_ok("alice", "b", START, json!([insert("todos", "second", json!({}))]))
        .await;
}
