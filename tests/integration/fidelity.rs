//! What the original client and the original service's own flows expect.
//!
//! - A new device pulls exactly what the devices that followed every push
//!   and pull hold, `updatedAt` included (a randomized test that models the
//!   original engine's apply rules).
//! - A write with no time of its own does not beat a later write that has
//!   one (the original service's shell-script flow, run by bash and curl).

use crate::common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::app::{
    APP, Backend, Postgres, START, Sqlite, TestApp, both_stores, change_for, expect_error, insert, push_body, update,
};
use mana_sync::timestamp::Timestamp;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rstest::rstest;
use rstest_reuse::apply;
use serde_json::{Map, Value, json};

/// A device's records, by id, as the original engine keeps them in IndexedDB.
type Records = BTreeMap<String, Map<String, Value>>;

/// A device running the original engine's apply rules.
struct Device {
    name: String,
    /// Offset of this device's clock from the server's, in milliseconds.
    skew_ms: i64,
    cursor: String,
    records: Records,
}

impl Device {
    fn new(name: &str, skew_ms: i64) -> Device {
        Device {
            name: name.to_owned(),
            skew_ms,
            cursor: START.to_owned(),
            records: Records::new(),
        }
    }

    /// `new Date().toISOString()` on this device; on a device whose name
    /// starts with `py-`, Python's `isoformat()` (microseconds, `+00:00`).
    fn now(&self) -> String {
        let now = Timestamp(Timestamp::now().0 + self.skew_ms * 1_000_000);
        if self.name.starts_with("py-") {
            format!("{}+00:00", &now.to_fixed_string()[..26])
        } else {
            now.floor_millis().to_short_string()
        }
    }

    /// Applies an answer's `serverChanges` the way the original engine
    /// does: `put(data)` for an insert; for an update, each field's value
    /// and then `updatedAt` set to the latest of their times (a string
    /// comparison); `deletedAt` for a delete. Then follows the cursor.
    fn apply(&mut self, answer: &Value) {
        for change in answer["serverChanges"].as_array().unwrap() {
            let id = change["id"].as_str().unwrap().to_owned();
            match change["op"].as_str().unwrap() {
                "insert" => {
                    self.records.insert(id, change["data"].as_object().unwrap().clone());
                }
                "update" => {
                    let record = self
                        .records
                        .get_mut(&id)
                        .unwrap_or_else(|| panic!("{}: an update of {id}, which it never got: {change}", self.name));
                    let mut latest = String::new();
                    for (field, written) in change["fields"].as_object().unwrap() {
                        record.insert(field.clone(), written["value"].clone());
                        latest = latest.max(written["updatedAt"].as_str().unwrap().to_owned());
                    }
                    record.insert("updatedAt".to_owned(), Value::String(latest));
                }
                "delete" => {
                    if let Some(record) = self.records.get_mut(&id) {
                        record.insert("deletedAt".to_owned(), change["deletedAt"].clone());
                    }
                }
                other => panic!("unknown op {other}"),
            }
        }
        self.cursor = answer["syncedUntil"].as_str().unwrap().to_owned();
    }

    /// Makes a change locally (as the engine writes IndexedDB first),
    /// pushes it with the cursor as `since`, and applies the answer.
    async fn push(&mut self, app: &TestApp, change: Value) {
        let id = change["id"].as_str().unwrap().to_owned();
        match change["op"].as_str().unwrap() {
            "insert" => {
                self.records.insert(id, change["data"].as_object().unwrap().clone());
            }
            "update" => {
                let record = self.records.get_mut(&id).unwrap();
                for (field, written) in change["fields"].as_object().unwrap() {
                    record.insert(field.clone(), written["value"].clone());
                    record.insert("updatedAt".to_owned(), written["updatedAt"].clone());
                }
            }
            _ => {
                let record = self.records.get_mut(&id).unwrap();
                record.insert("deletedAt".to_owned(), change["deletedAt"].clone());
            }
        }
        let cursor = self.cursor.clone();
        let answer = app.push_ok("alice", &self.name, &cursor, json!([change])).await;
        self.apply(&answer);
    }

    async fn pull(&mut self, app: &TestApp) {
        let cursor = self.cursor.clone();
        let answer = app.pull_as("alice", &self.name, "todos", &cursor, None).await;
        self.apply(&answer);
    }

    /// The records it shows: those not deleted.
    fn live(&self) -> Records {
        let mut live = self.records.clone();
        live.retain(|_, r| r.get("deletedAt").is_none_or(Value::is_null));
        live
    }
}

/// A random local change by `device`: a new record (its data stamped with
/// `updatedAt`, or only `createdAt`, or with no time at all), an edit of
/// one to three fields (sometimes with `updatedAt` among them), or a delete.
fn random_change(rng: &mut StdRng, device: &Device, next_id: &mut usize) -> Value {
    let live: Vec<String> = device.live().into_keys().collect();
    let now = device.now();
    let roll = rng.random_range(0..10);
    if live.is_empty() || roll < 3 {
        *next_id += 1;
        let id = format!("todo-{next_id}");
        let mut data = json!({ "id": id, "title": format!("t{}", rng.random_range(0..100)), "done": false });
        match rng.random_range(0..5) {
            0 => {}
            1 => data["createdAt"] = json!(now),
            _ => data["updatedAt"] = json!(now),
        }
        return json!({ "table": "todos", "id": id, "op": "insert", "data": data });
    }
    let id = &live[rng.random_range(0..live.len())];
    if roll == 9 {
        return json!({ "table": "todos", "id": id, "op": "delete", "deletedAt": now });
    }
    let mut fields = Map::new();
    for _ in 0..rng.random_range(1..=3) {
        let (field, value) = match rng.random_range(0..4) {
            0 => ("title", json!(format!("t{}", rng.random_range(0..100)))),
            1 => ("done", json!(rng.random_bool(0.5))),
            2 => ("rank", json!(rng.random_range(0..10))),
            _ => ("updatedAt", json!(now)),
        };
        fields.insert(field.to_owned(), json!({ "value": value, "updatedAt": now }));
    }
    json!({ "table": "todos", "id": id, "op": "update", "fields": fields })
}

#[apply(both_stores)]
async fn a_new_device_pulls_byte_for_byte_what_the_devices_that_followed_hold(store: Backend) {
    let seed: u64 = std::env::var("FIDELITY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("FIDELITY_SEED={seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let app = store.spawn().await;
    // Clocks a few seconds apart, as devices' are: edits arrive out of time order.
    let mut devices: Vec<Device> = ["phone", "laptop", "py-script"]
        .iter()
        .map(|name| Device::new(name, rng.random_range(-3000..3000)))
        .collect();
    let mut next_id = 0;
    for _ in 0..120 {
        let device = rng.random_range(0..devices.len());
        if rng.random_bool(0.3) {
            devices[device].pull(&app).await;
        } else {
            let change = random_change(&mut rng, &devices[device], &mut next_id);
            devices[device].push(&app, change).await;
        }
    }
    let mut fresh = Device::new("new-device", 0);
    fresh.pull(&app).await;
    assert!(fresh.records.len() > 3, "the run made records: {:?}", fresh.records);
    assert!(
        fresh.records.values().all(|r| r.get("deletedAt").is_none()),
        "a new device holds no deleted record"
    );
    for device in &mut devices {
        device.pull(&app).await;
        assert_eq!(
            device.live(),
            fresh.records,
            "{} differs from a new device (FIDELITY_SEED={seed})",
            device.name
        );
    }
}

/// The original service's end-to-end script: an insert with no time of its
/// own, then, within the same second, an update stamped by `date -u` (whole
/// seconds, so earlier than the insert's receive time), then a pull.
#[apply(both_stores)]
async fn the_original_shell_flow_shows_the_update(store: Backend) {
    let app = store.spawn().await;
    const FLOW: &str = r#"
        set -euo pipefail
        # Whole seconds, taken before the insert: the update is stamped in the insert's second.
        NOW=$(date -u +%Y-%m-%dT%H:%M:%SZ)
        curl -sf -X POST "$URL/sync/$APP" -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json' \
          -H 'X-Client-Id: test-script' \
          -d '{"clientId":"test-script","changes":[{"table":"todos","id":"e2e-1","op":"insert","data":{"id":"e2e-1","title":"Buy milk","completed":false}}]}' >/dev/null
        curl -sf -X POST "$URL/sync/$APP" -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json' \
          -H 'X-Client-Id: test-script' \
          -d "{\"clientId\":\"test-script\",\"changes\":[{\"table\":\"todos\",\"id\":\"e2e-1\",\"op\":\"update\",\"fields\":{\"title\":{\"value\":\"Buy oat milk\",\"updatedAt\":\"$NOW\"},\"completed\":{\"value\":true,\"updatedAt\":\"$NOW\"}}}]}" >/dev/null
        curl -sf "$URL/sync/$APP/pull?collection=todos&since=1970-01-01T00:00:00.000Z" -H "Authorization: Bearer $TOKEN" \
          -H 'X-Client-Id: other-device'
    "#;
    let (url, token) = (app.address.clone(), common::tokens::token_for("alice"));
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new("bash")
            .args(["-c", FLOW])
            .env("URL", url)
            .env("APP", APP)
            .env("TOKEN", token)
            .output()
            .expect("bash runs")
    })
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "the flow failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let pulled: Value = serde_json::from_slice(&output.stdout).expect("the pull answers JSON");
    let record = &change_for(&pulled, "e2e-1").expect("the record is pulled")["data"];
    assert_eq!(record["title"], "Buy oat milk", "{pulled}");
    assert_eq!(record["completed"], true, "{pulled}");
}

/// The rule behind the flow, both ways round and through a rebuild: an
/// insert's data without a time ranks below any timed write of a field,
/// however early that write's time; a delete without `deletedAt` deletes at
/// the receive time.
#[apply(both_stores)]
async fn untimed_data_yields_to_timed_writes_and_survives_a_rebuild(store: Backend) {
    let app = store.spawn().await;
    let an_hour_ago = Timestamp(Timestamp::now().0 - 3_600_000_000_000).to_short_string();
    let untimed = |id: &str, title: &str| json!({ "table": "todos", "id": id, "op": "insert", "data": { "title": title, "note": "kept" } });
    let edit = |id: &str| update("todos", id, "title", json!("edited"), &an_hour_ago);
    // Insert first, then the (earlier-stamped) edit; and the edit first, then the insert.
    app.push_ok("alice", "a", START, json!([untimed("first", "draft")]))
        .await;
    app.push_ok("alice", "b", START, json!([edit("first")])).await;
    app.push_ok("alice", "b", START, json!([edit("second")])).await;
    app.push_ok("alice", "a", START, json!([untimed("second", "draft")]))
        .await;
    app.push_ok("alice", "a", START, json!([untimed("gone", "draft")]))
        .await;
    app.push_ok(
        "alice",
        "a",
        START,
        json!([{ "table": "todos", "id": "gone", "op": "delete" }]),
    )
    .await;
    let check = |pulled: &Value| {
        for id in ["first", "second"] {
            let data = &change_for(pulled, id).unwrap()["data"];
            assert_eq!(data["title"], "edited", "{id}: {pulled}");
            assert_eq!(data["note"], "kept", "{id}: {pulled}");
        }
        let gone = change_for(pulled, "gone").unwrap();
        assert_eq!(gone["op"], "delete", "{pulled}");
    };
    let before = app.pull_ok("alice", "todos", START, None).await;
    check(&before);
    mana_sync::sync::rebuild(&app.store).await.unwrap();
    let after = app.pull_ok("alice", "todos", START, None).await;
    check(&after);
    assert_eq!(
        before["serverChanges"], after["serverChanges"],
        "the rebuild changes nothing"
    );
}

/// The original client retries a refused push only on its next edit, so a
/// push waits its turn: here behind another push stuck for 6 s, longer than
/// the old default of 5 s, with the default `LOCK_TIMEOUT`.
#[apply(both_stores)]
async fn a_push_waits_its_turn_rather_than_being_refused(store: Backend) {
    let app = store.spawn_with(&[("LOCK_TIMEOUT", "")]).await;
    assert!(app.config.lock_timeout > Duration::from_secs(6));
    app.push_ok("alice", "a", START, json!([insert("todos", "first", json!({}))]))
        .await;
    let mut stuck = app.store.begin_write("alice").await.unwrap();
    stuck.lock_clock("alice").await.unwrap();
    let started = Instant::now();
    let waiting = app.push_ok("alice", "b", START, json!([insert("todos", "second", json!({}))]));
    let release = async {
        tokio::time::sleep(Duration::from_secs(6)).await;
        stuck.rollback().await.unwrap();
    };
    let (answer, ()) = tokio::join!(waiting, release);
    assert!(started.elapsed() >= Duration::from_secs(6), "it waited");
    assert!(change_for(&answer, "second").is_some(), "{answer}");
    assert_eq!(app.log_rows().await, 2);
}

/// Refused only when truly overloaded, and then as a 429 with
/// `Retry-After` (never a 500), writing nothing: here 200 pushes of as
/// many users at once on one database connection (PostgreSQL) or the one
/// writer (SQLite), none waiting more than 100 ms.
#[apply(both_stores)]
async fn a_push_that_gets_no_connection_in_time_is_told_to_retry(store: Backend) {
    let app = store
        .spawn_with(&[("LOCK_TIMEOUT", "100ms"), ("DATABASE_MAX_CONNECTIONS", "1")])
        .await;
    let pushes = (0..200).map(|i| {
        let body = push_body("a", START, json!([insert("todos", "t", json!({}))]));
        let app = &app;
        async move { app.push(&format!("user-{i}"), "a", &body).await }
    });
    let (mut accepted, mut refused) = (0, 0);
    for response in futures_util::future::join_all(pushes).await {
        match response.status().as_u16() {
            200 => accepted += 1,
            429 => {
                assert_eq!(response.headers()["retry-after"], "1");
                expect_error(response, reqwest::StatusCode::TOO_MANY_REQUESTS, "busy").await;
                refused += 1;
            }
            other => panic!("a push answered {other}: {}", response.text().await.unwrap()),
        }
    }
    assert!(accepted > 0 && refused > 0, "{accepted} accepted, {refused} refused");
    assert_eq!(app.log_rows().await, accepted, "a refused push writes nothing");
}

/// On PostgreSQL a user's waiting pushes hold no database connection: a
/// pile of them, more than the pool, stuck behind one of theirs, leaves
/// other users' pushes going.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_users_pile_of_pushes_does_not_hold_up_other_users() {
    let app = Postgres.spawn().await;
    assert_eq!(app.config.database_max_connections, 10);
    let mut stuck = app.store.begin_write("alice").await.unwrap();
    stuck.lock_clock("alice").await.unwrap(); // holds her clock row too
    let pile: Vec<_> = (0..30)
        .map(|i| {
            let body = push_body("a", START, json!([insert("todos", &format!("a{i}"), json!({}))]));
            let (http, url) = (app.http.clone(), app.url(&format!("/sync/{APP}")));
            tokio::spawn(async move {
                http.post(url)
                    .bearer_auth(common::tokens::token_for("alice"))
                    .json(&body)
                    .send()
                    .await
                    .unwrap()
                    .status()
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    app.push_ok("bob", "b", START, json!([insert("todos", "b", json!({}))]))
        .await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "bob waited {:?} for alice's pile",
        started.elapsed()
    );
    assert!(
        pile.iter().all(|p| !p.is_finished()),
        "alice's pushes still wait for their turn"
    );
    stuck.rollback().await.unwrap();
    for push in pile {
        assert_eq!(push.await.unwrap(), reqwest::StatusCode::OK);
    }
    assert_eq!(app.log_rows().await, 31);
}
