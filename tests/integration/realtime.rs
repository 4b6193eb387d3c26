//! WebSocket notifications: the catch-up after auth, notices across
//! replicas (PostgreSQL LISTEN/NOTIFY) and after a lost listener, and the
//! socket's rules (auth, expiry, limits, origins, shutdown).

use crate::common;

use common::app::{Backend, Postgres, Sqlite, both_stores};
use rstest::rstest;
use rstest_reuse::apply;

use std::time::{Duration, Instant};

use common::app::{START, insert, spawn_app};
use common::tokens;
use common::ws::{self, Event};
use serde_json::json;

const SOON: Duration = Duration::from_secs(1);
const QUIET: Duration = Duration::from_millis(400);

/// Asserts that none of `sockets` hears anything within [`QUIET`] (one wait for all).
async fn all_quiet(sockets: Vec<(&str, &mut ws::Socket)>) {
    let heard = futures_util::future::join_all(
        sockets
            .into_iter()
            .map(|(name, socket)| async move { (name, ws::next(socket, QUIET).await) }),
    )
    .await;
    for (name, event) in heard {
        assert_eq!(event, None, "{name} hears nothing more");
    }
}

/// Alice has a record (in `notes`) before any socket connects, so every
/// socket, `/ws` included (it sends nothing to a user without records),
/// gets exactly one catch-up, read before the push (to `todos`). That
/// record is pushed on b, whose hub has it before the answer; a hears of it
/// later, for the laptop only, which pushed it and so is not told.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_on_one_replica_reaches_the_users_other_devices_on_another() {
    let a = spawn_app().await;
    let b = a.spawn_replica(&[]).await;
    b.push_ok("alice", "laptop", START, json!([insert("notes", "n0", json!({}))]))
        .await;
    let mut phone_on_b = ws::authed(&b, "/ws/todo", &tokens::token_for("alice"), Some("phone")).await;
    let mut laptop_on_a = ws::authed(&a, "/ws/todo", &tokens::token_for("alice"), Some("laptop")).await;
    let mut bob_on_b = ws::authed(&b, "/ws/todo", &tokens::token_for("bob"), None).await;
    let mut all_apps_on_b = ws::authed(&b, "/ws", &tokens::token_for("alice"), None).await;
    let alices_catch_up = json!({ "type": "sync-available", "appId": "todo", "tables": ["notes"] });
    for socket in [&mut phone_on_b, &mut laptop_on_a, &mut all_apps_on_b] {
        assert_eq!(ws::catch_up(socket).await, alices_catch_up);
    }
    assert_eq!(ws::catch_up(&mut bob_on_b).await["tables"], json!([]));
    all_quiet(vec![
        ("phone_on_b", &mut phone_on_b),
        ("laptop_on_a", &mut laptop_on_a),
        ("bob_on_b", &mut bob_on_b),
        ("all_apps_on_b", &mut all_apps_on_b),
    ])
    .await;

    let pushed = Instant::now();
    a.push_ok("alice", "laptop", START, json!([insert("todos", "t1", json!({}))]))
        .await;
    let notice = json!({ "type": "sync-available", "appId": "todo", "tables": ["todos"] });
    assert_eq!(ws::expect_json(&mut phone_on_b, SOON).await, notice);
    assert!(pushed.elapsed() < SOON);
    assert_eq!(ws::expect_json(&mut all_apps_on_b, SOON).await, notice);

    // The pushing device is not echoed, another user hears nothing, and
    // each of alice's other devices is told once.
    all_quiet(vec![
        ("laptop_on_a", &mut laptop_on_a),
        ("bob_on_b", &mut bob_on_b),
        ("phone_on_b", &mut phone_on_b),
        ("all_apps_on_b", &mut all_apps_on_b),
    ])
    .await;
}

#[apply(both_stores)]
async fn the_catch_up_after_auth_names_every_table(store: Backend) {
    let app = store.spawn().await;
    app.push_ok(
        "alice",
        "a",
        START,
        json!([insert("todos", "t", json!({})), insert("notes", "n", json!({}))]),
    )
    .await;
    let mut socket = ws::authed(&app, "/ws/todo", &tokens::token_for("alice"), None).await;
    assert_eq!(ws::catch_up(&mut socket).await["tables"], json!(["notes", "todos"]));
    let mut fresh_user = ws::authed(&app, "/ws/todo", &tokens::token_for("nobody-yet"), None).await;
    assert_eq!(
        ws::catch_up(&mut fresh_user).await,
        json!({ "type": "sync-available", "appId": "todo", "tables": [] })
    );
}

#[apply(both_stores)]
async fn ping_is_answered_and_unknown_messages_get_an_error(store: Backend) {
    let app = store.spawn().await;
    let mut socket = ws::authed(&app, "/ws/todo", &tokens::token_for("alice"), None).await;
    ws::catch_up(&mut socket).await;
    ws::send(&mut socket, json!({ "type": "ping" })).await;
    assert_eq!(ws::expect_json(&mut socket, SOON).await, json!({ "type": "pong" }));
    ws::send(&mut socket, json!({ "type": "subscribe" })).await;
    assert_eq!(ws::expect_json(&mut socket, SOON).await["type"], "error");
}

#[apply(both_stores)]
async fn a_socket_that_never_authenticates_is_closed_after_10_seconds(store: Backend) {
    let app = store.spawn().await;
    let mut socket = ws::connect(&app, "/ws/todo").await;
    let opened = Instant::now();
    assert_eq!(ws::expect_close(&mut socket, Duration::from_secs(12)).await, Some(1008));
    assert!(
        opened.elapsed() >= Duration::from_secs(9),
        "closed after {:?}",
        opened.elapsed()
    );
}

#[apply(both_stores)]
async fn a_bad_token_is_refused(store: Backend) {
    let app = store.spawn().await;
    let mut socket = ws::connect(&app, "/ws/todo").await;
    ws::send(
        &mut socket,
        json!({ "type": "auth", "token": tokens::foreign_token_for("alice") }),
    )
    .await;
    assert_eq!(ws::expect_json(&mut socket, SOON).await["type"], "error");
    assert_eq!(ws::expect_close(&mut socket, SOON).await, Some(1008));
}

#[apply(both_stores)]
async fn an_expired_token_closes_the_socket_unless_renewed(store: Backend) {
    // No leeway: the socket closes at `exp` itself.
    let app = store.spawn_with(&[("JWT_LEEWAY", "0s")]).await;
    let short = |secs: i64| tokens::token_for_with("alice", |c| c["exp"] = json!(tokens::now() + secs));
    let mut lapsing = ws::authed(&app, "/ws/todo", &short(2), None).await;
    let mut renewed = ws::authed(&app, "/ws/todo", &short(2), None).await;
    ws::catch_up(&mut lapsing).await;
    ws::catch_up(&mut renewed).await;
    ws::send(
        &mut renewed,
        json!({ "type": "auth", "token": tokens::token_for("alice") }),
    )
    .await;
    assert_eq!(ws::expect_json(&mut renewed, SOON).await["type"], "auth-ok");

    assert_eq!(ws::expect_close(&mut lapsing, Duration::from_secs(5)).await, Some(4001));
    ws::send(&mut renewed, json!({ "type": "ping" })).await;
    assert_eq!(
        ws::expect_json(&mut renewed, SOON).await,
        json!({ "type": "pong" }),
        "the renewed socket stays open"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_listener_tells_every_socket_to_pull_and_notices_resume() {
    let app = spawn_app().await;
    app.push_ok("alice", "a", START, json!([insert("todos", "t", json!({}))]))
        .await;
    let mut socket = ws::authed(&app, "/ws/todo", &tokens::token_for("alice"), Some("phone")).await;
    ws::catch_up(&mut socket).await;

    assert_eq!(app.terminate("mana-sync-listener").await, 1, "one listener connection");

    common::ws::told_to_pull_then_notified_again(&app, &mut socket, Duration::from_secs(5)).await;
}

#[apply(both_stores)]
async fn a_user_over_the_socket_limit_is_refused_with_a_reason(store: Backend) {
    let app = store.spawn_with(&[("MAX_SOCKETS_PER_USER", "2")]).await;
    let _one = ws::authed(&app, "/ws/todo", &tokens::token_for("alice"), None).await;
    let _two = ws::authed(&app, "/ws", &tokens::token_for("alice"), None).await;
    let mut three = ws::connect(&app, "/ws/todo").await;
    ws::send(
        &mut three,
        json!({ "type": "auth", "token": tokens::token_for("alice") }),
    )
    .await;
    assert_eq!(ws::expect_close(&mut three, SOON).await, Some(1008));
    let _bob = ws::authed(&app, "/ws/todo", &tokens::token_for("bob"), None).await;
    let health = app.health().await;
    assert_eq!(
        (health["connections"].as_u64(), health["users"].as_u64()),
        (Some(3), Some(2))
    );
}

#[apply(both_stores)]
async fn shutting_down_closes_sockets_with_1012(store: Backend) {
    let app = store.spawn().await;
    let mut socket = ws::authed(&app, "/ws/todo", &tokens::token_for("alice"), None).await;
    ws::catch_up(&mut socket).await;
    let stopping = tokio::spawn(app.stop());
    assert_eq!(ws::expect_close(&mut socket, Duration::from_secs(3)).await, Some(1012));
    tokio::time::timeout(Duration::from_secs(5), stopping)
        .await
        .expect("the server stops in time")
        .unwrap();
}

/// A socket whose client never reads cannot slow pushes or other sockets:
/// the reader hears of every table, in at most one notification per push.
#[apply(both_stores)]
async fn a_burst_of_pushes_is_never_held_up_by_a_socket_that_does_not_read(store: Backend) {
    let app = store.spawn().await;
    let _stalled = ws::authed(&app, "/ws/todo", &tokens::token_for("alice"), None).await;
    let mut reader = ws::authed(&app, "/ws/todo", &tokens::token_for("alice"), Some("reader")).await;
    ws::catch_up(&mut reader).await;
    let started = Instant::now();
    for i in 0..100 {
        let table = format!("t{}", i % 3);
        app.push_ok(
            "alice",
            "burst",
            START,
            json!([insert(&table, &format!("r{i}"), json!({ "pad": "x".repeat(2000) }))]),
        )
        .await;
    }
    let pushing = started.elapsed();
    assert!(pushing < Duration::from_secs(20), "100 pushes took {pushing:?}");
    let mut messages = 0;
    let mut tables = std::collections::BTreeSet::new();
    while let Some(Event::Json(message)) = ws::next(&mut reader, QUIET).await {
        messages += 1;
        for t in message["tables"].as_array().unwrap() {
            tables.insert(t.as_str().unwrap().to_owned());
        }
    }
    assert_eq!(tables.len(), 3, "every table was named");
    assert!((1..=100).contains(&messages), "{messages} notifications for 100 pushes");
}

#[apply(both_stores)]
async fn a_failed_push_notifies_nobody_and_a_local_push_notifies_once(store: Backend) {
    let a = store.spawn().await;
    let replica = a.another_replica().await;
    let b = replica.as_ref().unwrap_or(&a);
    let mut on_a = ws::authed(&a, "/ws/todo", &tokens::token_for("alice"), Some("phone")).await;
    let mut on_b = ws::authed(b, "/ws/todo", &tokens::token_for("alice"), Some("tablet")).await;
    ws::catch_up(&mut on_a).await;
    ws::catch_up(&mut on_b).await;

    a.refuse_record("boom").await;
    let failed = a
        .push(
            "alice",
            "laptop",
            &common::app::push_body("laptop", START, json!([insert("todos", "boom", json!({}))])),
        )
        .await;
    assert_eq!(failed.status(), 500);
    assert_eq!(
        ws::next(&mut on_a, QUIET).await,
        None,
        "a rolled-back push is not announced"
    );
    assert_eq!(ws::next(&mut on_b, QUIET).await, None);

    a.push_ok("alice", "laptop", START, json!([insert("todos", "fine", json!({}))]))
        .await;
    assert_eq!(ws::expect_json(&mut on_a, SOON).await["tables"], json!(["todos"]));
    assert_eq!(ws::expect_json(&mut on_b, SOON).await["tables"], json!(["todos"]));
    assert_eq!(
        ws::next(&mut on_a, QUIET).await,
        None,
        "the pushing replica's own NOTIFY is not delivered twice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_notifier_connection_delays_no_notice() {
    let a = spawn_app().await;
    let b = a.spawn_replica(&[]).await;
    let mut on_b = ws::authed(&b, "/ws/todo", &tokens::token_for("alice"), None).await;
    ws::catch_up(&mut on_b).await;
    a.push_ok("alice", "laptop", START, json!([insert("todos", "one", json!({}))]))
        .await;
    ws::expect_json(&mut on_b, SOON).await;

    assert!(
        a.terminate("mana-sync-notifier").await > 0,
        "the notifier had a connection"
    );
    a.push_ok("alice", "laptop", START, json!([insert("notes", "two", json!({}))]))
        .await;
    assert_eq!(
        ws::expect_json(&mut on_b, Duration::from_secs(3)).await["tables"],
        json!(["notes"])
    );
}

#[apply(both_stores)]
async fn websocket_upgrades_from_other_origins_are_refused(store: Backend) {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let app = store.spawn().await;
    let upgrade = |origin: &'static str| {
        let mut request = app.ws_url("/ws/todo").into_client_request().unwrap();
        request.headers_mut().insert("Origin", origin.parse().unwrap());
        tokio_tungstenite::connect_async(request)
    };
    let refused = upgrade("https://evil.example").await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => assert_eq!(response.status(), 403),
        other => panic!("expected a 403, got {:?}", other.map(|_| "an open socket")),
    }
    assert!(
        upgrade(common::app::ORIGIN).await.is_ok(),
        "the allowed origin may connect"
    );
}

/// A listener whose connection stops answering without closing (here its
/// backend is frozen with SIGSTOP) is detected by its ping, replaced, and
/// every socket is told to pull.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_open_listener_connection_is_detected_and_replaced() {
    assert!(
        common::pg::is_local_cluster(),
        "this test freezes a PostgreSQL backend and needs the self-started cluster: unset TEST_DATABASE_URL"
    );
    let app = spawn_app().await;
    app.push_ok("alice", "a", START, json!([insert("todos", "t", json!({}))]))
        .await;
    let mut socket = ws::authed(&app, "/ws/todo", &tokens::token_for("alice"), Some("phone")).await;
    ws::catch_up(&mut socket).await;

    let [pid] = app.backends("mana-sync-listener").await[..] else {
        panic!("expected exactly one listener connection")
    };
    // SAFETY: kill(2) on a PostgreSQL backend of our own test cluster.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);

    ws::told_to_pull_then_notified_again(&app, &mut socket, Duration::from_secs(15)).await;
    let listeners: Vec<i32> = app
        .backends("mana-sync-listener")
        .await
        .into_iter()
        .filter(|p| *p != pid)
        .collect();
    assert_eq!(listeners.len(), 1, "a new listener connection replaced the frozen one");

    // SAFETY: as above; let the frozen backend go.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let admin = sqlx::PgPool::connect(&common::pg::server_admin_url()).await.unwrap();
    let _ = sqlx::query("SELECT pg_terminate_backend($1)")
        .bind(pid)
        .execute(&admin)
        .await;
}
