//! Many writers (holding their transactions open for random times) and
//! readers following cursors at once: every committed change reaches
//! every reader, and none twice within one cursor chain.

use crate::common;

use common::app::{Backend, Postgres, Sqlite};
use rstest::rstest;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::app::{APP, START, TestApp, insert};
use mana_sync::change_log::{Batch, Change};
use mana_sync::fold::FieldWrite;
use mana_sync::protocol::Op;
use mana_sync::quota::Quotas;
use mana_sync::timestamp::Timestamp;
use rand::Rng;
use serde_json::{Value, json};

const USERS: [&str; 2] = ["alice", "bob"];
const WRITERS_PER_USER: usize = 6;
const BATCHES_PER_WRITER: usize = 8;
const READERS_PER_USER: usize = 2;

type Committed = Arc<Mutex<HashSet<(String, String)>>>;

fn batch(ids: &[String]) -> Batch {
    let changes = ids
        .iter()
        .map(|id| Change {
            table: "todos".into(),
            id: id.clone(),
            op: Op::Insert,
            writes: vec![FieldWrite::timed("title", json!(id), Timestamp::now())],
            provenance: Default::default(),
        })
        .collect();
    Batch {
        client_id: "writer".into(),
        since: mana_sync::cursor::Cursor::START,
        changes,
    }
}

/// Writes through the library, sleeping inside the transaction (with the
/// user's clock locked) before committing; odd writers push over HTTP.
async fn writer(app: Arc<TestApp>, user: &'static str, w: usize, committed: Committed) {
    for b in 0..BATCHES_PER_WRITER {
        let (size, delay) = {
            let mut rng = rand::rng();
            (rng.random_range(1..4), Duration::from_millis(rng.random_range(0..15)))
        };
        let ids: Vec<String> = (0..size).map(|c| format!("{user}-w{w}-b{b}-c{c}")).collect();
        if w.is_multiple_of(2) {
            let mut tx = app.store.begin_write(user).await.unwrap();
            mana_sync::sync::record(&mut tx, user, APP, &batch(&ids), 1000, &Quotas::NONE)
                .await
                .unwrap();
            tokio::time::sleep(delay).await;
            tx.commit().await.unwrap();
        } else {
            tokio::time::sleep(delay).await;
            let changes: Vec<Value> = ids.iter().map(|id| insert("todos", id, json!({}))).collect();
            app.push_ok(user, &format!("w{w}"), START, Value::Array(changes)).await;
        }
        committed
            .lock()
            .unwrap()
            .extend(ids.into_iter().map(|id| (user.to_owned(), id)));
    }
}

/// Follows the cursor until the writers are done and the log is drained.
async fn reader(app: Arc<TestApp>, user: &'static str, done: Arc<AtomicBool>) -> HashSet<String> {
    let mut seen = HashSet::new();
    let mut cursor = START.to_owned();
    loop {
        let finished = done.load(Ordering::SeqCst);
        loop {
            let page = app.pull_ok(user, "todos", &cursor, Some(5)).await;
            for change in page["serverChanges"].as_array().unwrap() {
                let id = change["id"].as_str().unwrap().to_owned();
                assert!(
                    seen.insert(id.clone()),
                    "{user}: {id} delivered twice in one cursor chain"
                );
            }
            let next = page["syncedUntil"].as_str().unwrap().to_owned();
            assert!(
                next >= cursor || page["serverChanges"].as_array().unwrap().is_empty(),
                "cursor went back"
            );
            cursor = next;
            if !page["hasMore"].as_bool().unwrap() {
                break;
            }
        }
        if finished {
            return seen;
        }
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
}

// Not the `both_stores` template: these two tests run on four workers,
// more than it gives, for more interleavings of writers and readers.
#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cursors_never_skip_or_repeat_a_change_under_concurrent_writers(#[values(Postgres, Sqlite)] store: Backend) {
    let app = Arc::new(store.spawn_with(&[("DATABASE_MAX_CONNECTIONS", "30")]).await);
    let committed: Committed = Arc::default();
    let done = Arc::new(AtomicBool::new(false));

    let readers: Vec<_> = USERS
        .iter()
        .flat_map(|&user| (0..READERS_PER_USER).map(move |_| user))
        .map(|user| (user, tokio::spawn(reader(app.clone(), user, done.clone()))))
        .collect();
    let writers: Vec<_> = USERS
        .iter()
        .flat_map(|&user| (0..WRITERS_PER_USER).map(move |w| (user, w)))
        .map(|(user, w)| tokio::spawn(writer(app.clone(), user, w, committed.clone())))
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    done.store(true, Ordering::SeqCst);

    let committed = committed.lock().unwrap().clone();
    assert!(committed.len() >= USERS.len() * WRITERS_PER_USER * BATCHES_PER_WRITER);
    for (user, handle) in readers {
        let seen = handle.await.unwrap();
        let expected: HashSet<String> = committed
            .iter()
            .filter(|(u, _)| u == user)
            .map(|(_, id)| id.clone())
            .collect();
        let missing: Vec<_> = expected.difference(&seen).collect();
        assert!(
            missing.is_empty(),
            "{user}'s reader missed {} committed changes, e.g. {:?}",
            missing.len(),
            missing.first()
        );
        assert_eq!(seen, expected, "{user}'s reader saw exactly the committed changes");
    }
}

/// A push that waits for another writer of the same user (a push on
/// another replica, here through its library) folds onto what that writer
/// committed: on PostgreSQL its statement read the record before the other
/// commit, and must read it again. Were it folded onto what it first read,
/// the other writer's title would be lost.
#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_that_waited_for_another_writer_folds_onto_its_writes(#[values(Postgres, Sqlite)] store: Backend) {
    let app = store.spawn().await;
    let first = json!({ "title": "first", "done": false, "updatedAt": "2024-01-01T10:00:00Z" });
    app.push_ok("alice", "a", START, json!([insert("todos", "x", first)]))
        .await;

    // On PostgreSQL the other writer is another replica: one replica's
    // pushes of a user take turns before they reach the database.
    let replica = app.another_replica().await;
    let mut other = replica
        .as_ref()
        .unwrap_or(&app)
        .store
        .begin_write("alice")
        .await
        .unwrap();
    let mut retitle = batch(&["x".to_owned()]);
    retitle.changes[0].op = Op::Update;
    retitle.changes[0].writes = vec![FieldWrite::timed(
        "title",
        json!("from the other writer"),
        Timestamp::parse("2024-01-01T10:00:01Z").unwrap(),
    )];
    mana_sync::sync::record(&mut other, "alice", APP, &retitle, 1000, &Quotas::NONE)
        .await
        .unwrap();
    let done = common::app::update("todos", "x", "done", json!(true), "2024-01-01T10:00:02Z");
    let waiting = app.push_ok("alice", "b", START, json!([done]));
    let commit = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        other.commit().await.unwrap();
    };
    let (answer, ()) = tokio::join!(waiting, commit);

    let expected =
        json!({ "id": "x", "title": "from the other writer", "done": true, "updatedAt": "2024-01-01T10:00:02.000Z" });
    let answered = answer["serverChanges"].as_array().unwrap();
    assert_eq!(answered.len(), 1, "{answer}");
    assert_eq!(answered[0]["data"], expected, "the push's answer");
    let pulled = app.pull_ok("alice", "todos", START, None).await;
    assert_eq!(pulled["serverChanges"][0]["data"], expected, "a pull");
}

/// A device as the old client behaves: it pushes with `since` = its cursor,
/// applies the answer, moves its cursor to `syncedUntil`, pulls one page,
/// and so on, while the other devices do the same.
async fn device(
    app: Arc<TestApp>,
    name: String,
    rounds: usize,
    all_pushed: Arc<tokio::sync::Barrier>,
) -> std::collections::BTreeMap<String, Value> {
    let mut state = std::collections::BTreeMap::new();
    let mut cursor = START.to_owned();
    let apply = |state: &mut std::collections::BTreeMap<String, Value>, page: &Value| {
        for change in page["serverChanges"].as_array().unwrap() {
            let id = change["id"].as_str().unwrap().to_owned();
            match change["op"].as_str().unwrap() {
                "delete" => state.insert(id, json!("deleted")),
                _ => state.insert(id, change["data"].clone()),
            };
        }
        page["syncedUntil"].as_str().unwrap().to_owned()
    };
    for round in 0..rounds {
        let changes: Vec<Value> = {
            let mut rng = rand::rng();
            (0..rng.random_range(1..4))
                .map(|_| {
                    let id = format!("shared-{}", rng.random_range(0..12));
                    let at = format!(
                        "2024-01-01T10:{:02}:{:02}Z",
                        rng.random_range(0..60),
                        rng.random_range(0..60)
                    );
                    match rng.random_range(0..10) {
                        0 => common::app::delete("todos", &id, &at),
                        _ => common::app::update("todos", &id, "title", json!(format!("{name}-{round}")), &at),
                    }
                })
                .collect()
        };
        let pushed = app.push_ok("carol", &name, &cursor, Value::Array(changes)).await;
        cursor = apply(&mut state, &pushed);
        let pulled = app.pull_as("carol", &name, "todos", &cursor, Some(3)).await;
        cursor = apply(&mut state, &pulled);
    }
    // Catch up only once every device has stopped writing.
    all_pushed.wait().await;
    loop {
        let page = app.pull_as("carol", &name, "todos", &cursor, Some(3)).await;
        cursor = apply(&mut state, &page);
        if !page["hasMore"].as_bool().unwrap() {
            return state;
        }
    }
}

#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn devices_editing_the_same_records_concurrently_converge(#[values(Postgres, Sqlite)] store: Backend) {
    let app = Arc::new(store.spawn_with(&[("DATABASE_MAX_CONNECTIONS", "20")]).await);
    let all_pushed = Arc::new(tokio::sync::Barrier::new(4));
    let devices: Vec<_> = (0..4)
        .map(|d| tokio::spawn(device(app.clone(), format!("dev{d}"), 15, all_pushed.clone())))
        .collect();
    let mut states = Vec::new();
    for d in devices {
        states.push(d.await.unwrap());
    }
    let (all, _) = app.pull_all("carol", "todos", START, None).await;
    let server: std::collections::BTreeMap<String, Value> = all
        .iter()
        .map(|c| {
            let id = c["id"].as_str().unwrap().to_owned();
            (
                id,
                if c["op"] == "delete" {
                    json!("deleted")
                } else {
                    c["data"].clone()
                },
            )
        })
        .collect();
    assert!(!server.is_empty());
    for (i, state) in states.iter().enumerate() {
        assert_eq!(state, &server, "device {i} diverged from the server");
    }
}
