//! The binary: configuration errors, waiting for the database, `openapi`,
//! `migrate`, `health` and SIGTERM (also right after start, and with a drain).

use crate::common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn mana_sync() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mana-sync"));
    cmd.env_clear().env("RUST_LOG", "info");
    cmd
}

#[test]
fn a_malformed_setting_stops_start_up_with_one_line_naming_it() {
    let output = mana_sync().env("PORT", "eighty").output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line: {stderr}");
    assert!(lines[0].contains("PORT"), "{stderr}");
}

/// JSON logs, so a retry is known by its fields, not by its wording: a
/// warning that carries `retry_in`.
#[test]
fn an_unreachable_database_is_retried_and_logged_not_fatal() {
    let free_port = common::free_port();
    let mut child = mana_sync()
        .env("DATABASE_URL", format!("postgres://nobody@127.0.0.1:{free_port}/none"))
        .env("PORT", "0")
        .env("HOST", "127.0.0.1")
        .env("LOG_FORMAT", "json")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut retries = 0;
    let started = Instant::now();
    for line in BufReader::new(child.stderr.take().unwrap()).lines() {
        let line: serde_json::Value = serde_json::from_str(&line.unwrap()).expect("JSON log lines");
        if line["level"] == "WARN" && !line["fields"]["retry_in"].is_null() {
            retries += 1;
        }
        if retries >= 2 || started.elapsed() > Duration::from_secs(10) {
            break;
        }
    }
    assert!(
        child.try_wait().unwrap().is_none(),
        "the server is still waiting, not dead"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(retries >= 2, "retries are logged");
}

#[test]
fn openapi_prints_the_committed_document() {
    let output = mana_sync().arg("openapi").output().unwrap();
    assert!(output.status.success());
    let printed: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(printed["info"]["title"], "mana-sync");
}

/// `mana-sync health` (the container's HEALTHCHECK) exits 0 while the
/// server on `PORT` serves, and non-zero, naming the URL, when none does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_says_whether_the_local_server_serves() {
    let dir = tempfile::tempdir().unwrap();
    let binary = std::path::Path::new(env!("CARGO_BIN_EXE_mana-sync"));
    let (server, port) = common::process::serve(binary, dir.path(), &[]).await;
    let check = |port: u16| {
        Command::new(binary)
            .env_clear()
            .current_dir(dir.path())
            .env("PORT", port.to_string())
            .arg("health")
            .output()
            .unwrap()
    };
    assert!(check(port).status.success(), "{:?}", check(port));
    drop(server);
    let refused = check(port);
    assert!(!refused.status.success());
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(said.contains(&format!("127.0.0.1:{port}/health")), "{said}");
}

/// A SIGTERM as soon as the server answers (an orchestrator stopping a
/// pod it just started) shuts it down gracefully: its handler is in place
/// before it serves, so the process exits 0 rather than dying of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_right_after_start_is_a_graceful_shutdown() {
    let binary = std::path::Path::new(env!("CARGO_BIN_EXE_mana-sync"));
    for _ in 0..5 {
        let dir = tempfile::tempdir().unwrap();
        let (mut server, _) = common::process::serve(binary, dir.path(), &[]).await;
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(server.0.id() as i32, libc::SIGTERM) }, 0);
        let status = server.0.wait().unwrap();
        assert!(status.success(), "exited with {status}");
    }
}

/// `mana-sync migrate` as the serving role, which may not create tables,
/// fails on a new database and changes nothing; as the owner it migrates,
/// again and again; afterwards the serving role finds nothing pending and
/// succeeds too (what each replica does at start-up).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_needs_the_owner_once_and_is_idempotent() {
    let db = common::pg::empty_database().await;
    let migrate_as = |url: &str| {
        mana_sync()
            .arg("migrate")
            .env("DATABASE_URL", url)
            .stderr(Stdio::null())
            .status()
            .unwrap()
    };
    let admin = db.admin_pool().await;
    let tables = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
            .fetch_one(&admin)
            .await
            .unwrap()
    };

    assert!(!migrate_as(&db.app_url).success(), "the serving role cannot migrate");
    assert_eq!(tables().await, 0, "and nothing was created");

    for url in [&db.owner_url, &db.owner_url, &db.app_url] {
        assert!(migrate_as(url).success());
    }
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success")
        .fetch_one(&admin)
        .await
        .unwrap();
    assert_eq!(applied as usize, mana_sync::store::postgres::MIGRATOR.iter().count());
    assert!(tables().await >= 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_sockets_with_1012_and_exits_in_time() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    let db = common::pg::test_database().await;
    let jwks = common::tokens::JwksServer::start_default().await;
    let port = common::free_port();
    let mut child = mana_sync()
        .env("DATABASE_URL", &db.app_url)
        .env("JWKS_URL", &jwks.url)
        .env("HOST", "127.0.0.1")
        .env("PORT", port.to_string())
        .env("SHUTDOWN_TIMEOUT", "5s")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("ws://127.0.0.1:{port}/ws/todo");
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut socket = loop {
        match tokio_tungstenite::connect_async(&url).await {
            Ok((socket, _)) => break socket,
            Err(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(e) => panic!("the server did not come up: {e}"),
        }
    };
    let auth = serde_json::json!({ "type": "auth", "token": common::tokens::token_for("alice") });
    socket.send(Message::text(auth.to_string())).await.unwrap();
    socket.next().await.unwrap().unwrap(); // auth-ok

    let signalled = Instant::now();
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let code = loop {
        match tokio::time::timeout(Duration::from_secs(5), socket.next())
            .await
            .expect("closed in time")
        {
            Some(Ok(Message::Close(frame))) => break frame.map(|f| u16::from(f.code)),
            Some(Ok(_)) => {}
            other => panic!("no close frame: {other:?}"),
        }
    };
    assert_eq!(code, Some(1012));
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "clean exit: {status}");
    assert!(
        signalled.elapsed() < Duration::from_secs(7),
        "exited after {:?}",
        signalled.elapsed()
    );
}

/// With `SHUTDOWN_DRAIN`, a SIGTERM turns `/ready` 503 at once while the
/// replica goes on serving, new connections and sockets included; a second
/// signal ends the drain: its sockets close with 1012 and it exits, long
/// before the drain would have ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_keeps_serving_with_ready_at_503_until_a_second_signal() {
    let dir = tempfile::tempdir().unwrap();
    let binary = std::path::Path::new(env!("CARGO_BIN_EXE_mana-sync"));
    let (mut server, port) = common::process::serve(binary, dir.path(), &[("SHUTDOWN_DRAIN", "60s")]).await;
    let token = common::process::local_token(dir.path(), "alice");
    let (mut socket, _) = tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{port}/ws"))
        .await
        .unwrap();
    common::ws::send(&mut socket, serde_json::json!({ "type": "auth", "token": token })).await;
    let ok = common::ws::expect_json(&mut socket, Duration::from_secs(5)).await;
    assert_eq!(ok["type"], "auth-ok");
    let sigterm = |server: &common::process::ServerProcess| {
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(server.0.id() as i32, libc::SIGTERM) }, 0);
    };

    let signalled = Instant::now();
    sigterm(&server);
    let base = format!("http://127.0.0.1:{port}");
    // Each request on a connection of its own: new ones are still accepted.
    let fresh = || reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    while fresh().get(format!("{base}/ready")).send().await.unwrap().status() != 503 {
        assert!(signalled.elapsed() < Duration::from_secs(10), "/ready still 200");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let pushed = fresh()
        .post(format!("{base}/sync/todo"))
        .bearer_auth(&token)
        .json(&serde_json::json!({ "clientId": "c", "changes": [{ "table": "todos", "id": "t", "op": "insert", "data": { "title": "x" } }] }))
        .send()
        .await
        .unwrap();
    assert_eq!(pushed.status(), 200, "a push while draining");
    let (mut late, _) = tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{port}/ws"))
        .await
        .expect("a socket opened while draining");
    common::ws::send(&mut late, serde_json::json!({ "type": "auth", "token": token })).await;
    assert_eq!(
        common::ws::expect_json(&mut late, Duration::from_secs(5)).await["type"],
        "auth-ok"
    );
    // The first socket stays open (told of the push meanwhile).
    let quiet_until = tokio::time::Instant::now() + Duration::from_millis(500);
    while let Some(event) = common::ws::next(&mut socket, quiet_until - tokio::time::Instant::now()).await {
        assert!(
            matches!(event, common::ws::Event::Json(_)),
            "the socket was closed during the drain: {event:?}"
        );
    }

    sigterm(&server);
    for socket in [&mut socket, &mut late] {
        assert_eq!(
            common::ws::expect_close(socket, Duration::from_secs(10)).await,
            Some(1012)
        );
    }
    let status = tokio::task::spawn_blocking(move || server.0.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "clean exit: {status}");
    assert!(
        signalled.elapsed() < Duration::from_secs(30),
        "the second signal did not end the drain: exited after {:?}",
        signalled.elapsed()
    );
}
