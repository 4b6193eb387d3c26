//! The smoke test of the deployment (`deploy/smoke.sh` runs it on the
//! release build, and `tests/integration/deploy.rs` runs that script): three replicas
//! on one PostgreSQL behind nginx, configured by the very
//! `deploy/nginx/mana-sync.conf` an operator uses, all on loopback.
//! Pushes and pulls go through the balancer, a socket held through it is
//! told of pushes every replica served, and a change stream through it
//! delivers a change within a second (nothing buffers it). Then one
//! replica is stopped (SIGTERM) under a stream of pushes: `/ready` turns
//! 503 first, then its sockets close with 1012 and connect again through
//! the balancer, and after a rolling restart of all three no acknowledged
//! change is missing. Each check prints a `checked:` line. nginx is
//! Debian's (`apt-get install nginx`, which `scripts/test` does).

mod cluster;
use crate::common;

use std::time::{Duration, Instant};

use cluster::{exited, nginx, ready_status, replica_env, replicas, sigterm, sockets_held, start_replica, terminate};
use common::process::local_token;
use common::ws::{Socket, expect_json, send};
use common::{free_port, pg};
use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use serde_json::{Value, json};

fn change(id: &str) -> Value {
    json!({ "clientId": "pusher", "changes": [{ "table": "todos", "id": id, "op": "insert", "data": { "title": id } }] })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "deploy/smoke.sh runs it on the release build (and tests/integration/deploy.rs runs deploy/smoke.sh)"]
async fn three_replicas_behind_nginx_push_pull_notify_and_stream() {
    let database = pg::test_database().await;
    let dir = tempfile::tempdir().unwrap();
    let replicas = replicas(dir.path(), &replica_env(dir.path(), &database.app_url)).await;
    let ports: Vec<u16> = replicas.iter().map(|r| r.port).collect();
    let lb_port = free_port();
    let _nginx = nginx(dir.path(), lb_port, &ports).await;
    let lb = format!("http://127.0.0.1:{lb_port}");
    // Minted from the replicas' data directory (`dir/data`), as they check it.
    let token = local_token(dir.path(), "alice");
    let http = reqwest::Client::new();

    // Push and pull through the balancer (round robin: every replica serves some).
    for n in 0..6 {
        let pushed = http
            .post(format!("{lb}/sync/todo"))
            .bearer_auth(&token)
            .json(&change(&format!("lb-{n}")))
            .send()
            .await
            .unwrap();
        assert_eq!(pushed.status(), 200);
    }
    let pulled: Value = http
        .get(format!("{lb}/sync/todo/pull?collection=todos"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(pulled["serverChanges"].as_array().unwrap().len(), 6, "{pulled}");
    println!("checked: 6 pushes through nginx, then a pull through it returned all 6 records");
    let metrics = http.get(format!("{lb}/metrics")).send().await.unwrap();
    assert_eq!(metrics.status(), 404, "/metrics is not served through the balancer");
    let body: Value = metrics.json().await.expect("a JSON error");
    assert_eq!(body["code"], "not_found");

    // A socket through the balancer hears of a push on each replica.
    let (mut socket, _) = tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{lb_port}/ws"))
        .await
        .expect("a WebSocket through nginx");
    send(
        &mut socket,
        json!({ "type": "auth", "token": token, "clientId": "listener" }),
    )
    .await;
    assert_eq!(
        expect_json(&mut socket, Duration::from_secs(5)).await["type"],
        "auth-ok"
    );
    assert_eq!(
        expect_json(&mut socket, Duration::from_secs(5)).await["type"],
        "sync-available"
    );
    for (i, port) in ports.iter().enumerate() {
        let pushed = http
            .post(format!("http://127.0.0.1:{port}/sync/todo"))
            .bearer_auth(&token)
            .json(&change(&format!("replica-{i}")))
            .send()
            .await
            .unwrap();
        assert_eq!(pushed.status(), 200);
        notified(&mut socket, i).await;
    }
    println!("checked: a socket held through nginx was told of a push served by each of the 3 replicas");

    // A change stream through the balancer: the change arrives within a second.
    let response = http
        .get(format!("{lb}/sync/todo/stream"))
        .bearer_auth(&token)
        .query(&[
            ("collections", "todos"),
            ("since", pulled["syncedUntil"].as_str().unwrap()),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut events = Box::pin(response.bytes_stream().eventsource());
    // What the replicas were pushed above comes first.
    let first = tokio::time::timeout(Duration::from_secs(5), events.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first.event, "changes");
    let pushed_at = Instant::now();
    let pushed = http
        .post(format!("{lb}/sync/todo"))
        .bearer_auth(&token)
        .json(&change("streamed"))
        .send()
        .await
        .unwrap();
    assert_eq!(pushed.status(), 200);
    loop {
        let event = tokio::time::timeout(
            Duration::from_secs(1).saturating_sub(pushed_at.elapsed()),
            events.next(),
        )
        .await
        .expect("the change came through nginx within a second")
        .unwrap()
        .unwrap();
        if event.event == "changes" && event.data.contains("streamed") {
            break;
        }
    }
    println!(
        "checked: a change streamed through nginx {:?} after its push (limit 1 s: nothing buffers it)",
        pushed_at.elapsed()
    );
}

/// The socket is told to pull `todos` (the push on replica `i`).
async fn notified(socket: &mut Socket, i: usize) {
    let notice = expect_json(socket, Duration::from_secs(5)).await;
    assert_eq!(notice["type"], "sync-available", "replica {i}: {notice}");
    assert_eq!(notice["tables"], json!(["todos"]), "replica {i}: {notice}");
}

/// The ids of the pushes acknowledged so far, in order.
type Acknowledged = std::sync::Arc<std::sync::Mutex<Vec<String>>>;

/// Pushes one change after another through the balancer until `stop`,
/// each under its own `Idempotency-Key`, sent again after any failure (a
/// replica going away) until acknowledged, adding each acknowledged id to
/// `acknowledged`; returns how many were sent again.
async fn pushing(
    lb: String,
    token: String,
    stop: tokio::sync::watch::Receiver<bool>,
    acknowledged: Acknowledged,
) -> u32 {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let mut retries = 0;
    for n in 0.. {
        if *stop.borrow() {
            break;
        }
        let id = format!("load-{n}");
        let given_up = Instant::now() + Duration::from_secs(60);
        loop {
            let answer = http
                .post(format!("{lb}/sync/todo"))
                .bearer_auth(&token)
                .header("Idempotency-Key", &id)
                .json(&change(&id))
                .send()
                .await;
            match answer {
                Ok(a) if a.status() == 200 => break,
                // Failover takes a few seconds; a minute of refusals is a fault.
                answer => assert!(Instant::now() < given_up, "{id} refused for a minute: {answer:?}"),
            }
            retries += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        acknowledged.lock().unwrap().push(id);
    }
    retries
}

/// The ids of `acknowledged` that a pull through the balancer does not find.
async fn missing(http: &reqwest::Client, lb: &str, token: &str, acknowledged: &[String]) -> Vec<String> {
    let stored = pulled_ids(http, lb, token).await;
    acknowledged
        .iter()
        .filter(|id| !stored.contains(*id))
        .cloned()
        .collect()
}

/// Every record id of `todos` through the balancer, page after page.
async fn pulled_ids(http: &reqwest::Client, lb: &str, token: &str) -> std::collections::HashSet<String> {
    let mut ids = std::collections::HashSet::new();
    let mut since = "1970-01-01T00:00:00.000Z".to_owned();
    loop {
        let page: Value = http
            .get(format!("{lb}/sync/todo/pull"))
            .bearer_auth(token)
            .query(&[("collection", "todos"), ("since", since.as_str())])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        for change in page["serverChanges"].as_array().unwrap() {
            ids.insert(change["id"].as_str().unwrap().to_owned());
        }
        since = page["syncedUntil"].as_str().unwrap().to_owned();
        if page["hasMore"] != true {
            return ids;
        }
    }
}

/// A socket through the balancer, authenticated.
async fn socket_through(lb_port: u16, token: &str) -> Socket {
    let (mut socket, _) = tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{lb_port}/ws"))
        .await
        .expect("a WebSocket through nginx");
    send(&mut socket, json!({ "type": "auth", "token": token })).await;
    assert_eq!(
        expect_json(&mut socket, Duration::from_secs(5)).await["type"],
        "auth-ok"
    );
    socket
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "deploy/smoke.sh runs it on the release build (and tests/integration/deploy.rs runs deploy/smoke.sh)"]
async fn a_replica_stopped_and_a_rolling_restart_under_load_lose_nothing() {
    let database = pg::test_database().await;
    let dir = tempfile::tempdir().unwrap();
    let env = replica_env(dir.path(), &database.app_url);
    let mut replicas = replicas(dir.path(), &env).await;
    let ports: Vec<u16> = replicas.iter().map(|r| r.port).collect();
    let lb_port = free_port();
    let _nginx = nginx(dir.path(), lb_port, &ports).await;
    let lb = format!("http://127.0.0.1:{lb_port}");
    let token = local_token(dir.path(), "alice");
    let http = reqwest::Client::new();

    let (stop, stopped) = tokio::sync::watch::channel(false);
    let acknowledged = Acknowledged::default();
    let load = tokio::spawn(pushing(lb.clone(), token.clone(), stopped, acknowledged.clone()));
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Sockets through the balancer, until the first replica holds two of
    // them (its gauge says which ones it took).
    let (mut on_first, mut elsewhere) = (Vec::new(), Vec::new());
    while on_first.len() < 2 {
        assert!(elsewhere.len() < 30, "nginx sent no socket to the first replica");
        let socket = socket_through(lb_port, &token).await;
        if sockets_held(ports[0]).await > on_first.len() as u64 {
            on_first.push(socket);
        } else {
            elsewhere.push(socket);
        }
    }

    // Stop the first replica: its /ready turns 503 while it still holds
    // its sockets; they close with 1012 only after the drain.
    let signalled = Instant::now();
    let process = sigterm(&mut replicas[0]);
    let closes: Vec<_> = on_first
        .into_iter()
        .map(|mut socket| {
            tokio::spawn(async move {
                let code = common::ws::expect_close(&mut socket, Duration::from_secs(30)).await;
                (code, Instant::now())
            })
        })
        .collect();
    while ready_status(&http, ports[0]).await != 503 {
        assert!(signalled.elapsed() < Duration::from_secs(5), "/ready never turned 503");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let not_ready = Instant::now();
    let mut first_close = None;
    for close in closes {
        let (code, at) = close.await.unwrap();
        assert_eq!(code, Some(1012), "the stopping replica's socket closes with 1012");
        assert!(at > not_ready, "/ready turned 503 before the sockets closed");
        first_close = Some(first_close.map_or(at, |f: Instant| f.min(at)));
    }
    exited(process, ports[0]).await;
    println!(
        "checked: SIGTERM to one replica: its /ready answered 503 after {:?}, {:?} before its sockets closed",
        not_ready - signalled,
        first_close.unwrap() - not_ready
    );
    // The clients connect again through the balancer: the others take them.
    let _again = [
        socket_through(lb_port, &token).await,
        socket_through(lb_port, &token).await,
    ];
    let others = sockets_held(ports[1]).await + sockets_held(ports[2]).await;
    assert_eq!(
        others,
        elsewhere.len() as u64 + 2,
        "the other replicas hold their sockets and the two that came back"
    );
    println!(
        "checked: its 2 sockets closed with 1012 and connected again through nginx to the others, whose {} stayed open",
        elsewhere.len()
    );
    let so_far = acknowledged.lock().unwrap().clone();
    let lost = missing(&http, &lb, &token, &so_far).await;
    println!(
        "checked: {} pushes acknowledged through nginx before and while one replica stopped, {} missing",
        so_far.len(),
        lost.len()
    );
    assert!(lost.is_empty(), "acknowledged but lost: {lost:?}");
    let first = &mut replicas[0];
    first.process = Some(start_replica(&first.dir, first.port, &env).await);

    // A rolling restart of all three, one after the other, under the same
    // load: each back and ready (and past nginx's fail_timeout) before the next goes.
    for replica in replicas.iter_mut() {
        terminate(replica).await;
        replica.process = Some(start_replica(&replica.dir, replica.port, &env).await);
        tokio::time::sleep(Duration::from_millis(1200)).await;
    }

    stop.send(true).unwrap();
    let retries = load.await.unwrap();
    let acknowledged = acknowledged.lock().unwrap().clone();
    let lost = missing(&http, &lb, &token, &acknowledged).await;
    println!(
        "checked: {} pushes acknowledged through nginx across the stop and a rolling restart of all 3 replicas ({retries} sent again), {} missing",
        acknowledged.len(),
        lost.len()
    );
    assert!(acknowledged.len() > 50, "the load ran: {}", acknowledged.len());
    assert!(lost.is_empty(), "acknowledged but lost: {lost:?}");
}
