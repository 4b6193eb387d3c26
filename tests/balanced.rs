//! Three replicas on one PostgreSQL behind nginx, configured by the very
//! `deploy/nginx/mana-sync.conf` an operator uses, all on loopback:
//! pushes and pulls go through the balancer, a socket held through it is
//! told of pushes every replica served, and a change stream through it
//! delivers a change within a second (nothing buffers it). Then one
//! replica is stopped (SIGTERM) under a stream of pushes: its sockets
//! close with 1012 and connect again through the balancer, and after a
//! rolling restart of all three no acknowledged change is missing. nginx
//! is Debian's (`apt-get install nginx`, which `bash .ci/run` does).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::process::{ServerProcess, local_token, repository, serve_at};
use common::ws::{Socket, expect_json, send};
use common::{free_port, pg};
use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use serde_json::{Value, json};

fn nginx_binary() -> PathBuf {
    let path = PathBuf::from(std::env::var("NGINX").unwrap_or_else(|_| "/usr/sbin/nginx".to_owned()));
    assert!(
        path.exists(),
        "no nginx at {}: `apt-get install nginx` (bash .ci/run does), or set NGINX",
        path.display()
    );
    path
}

/// nginx in the foreground, killed when dropped.
struct Nginx(Child);

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// nginx on `port` in front of `replicas`, with `deploy/nginx/mana-sync.conf`
/// as it is; its files in `dir`.
async fn nginx(dir: &Path, port: u16, replicas: &[u16]) -> Nginx {
    // As deploy/nginx/nginx.conf names its replicas.
    let servers: String = replicas
        .iter()
        .map(|p| format!("server 127.0.0.1:{p} max_fails=1 fail_timeout=1s;\n"))
        .collect();
    let conf = format!(
        "daemon off;\nmaster_process off;\npid {dir}/nginx.pid;\nerror_log {dir}/error.log warn;\n\
         events {{}}\nhttp {{\n  access_log off;\n  client_body_temp_path {dir}/body;\n  proxy_temp_path {dir}/proxy;\n\
         upstream mana_sync {{\n{servers}keepalive 16;\n}}\n\
         server {{\n  listen 127.0.0.1:{port};\n  include {include};\n}}\n}}\n",
        dir = dir.display(),
        include = repository().join("deploy/nginx/mana-sync.conf").display(),
    );
    std::fs::write(dir.join("nginx.conf"), conf).unwrap();
    let child = Command::new(nginx_binary())
        .arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run nginx");
    let mut nginx = Nginx(child);
    common::process::answered(&mut nginx.0, &format!("http://127.0.0.1:{port}/health")).await;
    nginx
}

/// A replica: its process, port and directory.
struct Replica {
    process: Option<ServerProcess>,
    port: u16,
    dir: PathBuf,
}

/// The replicas' environment: one database, one data directory (so one
/// local signing key: a token is good on every replica), and no per-user
/// rate limit, so that the load below measures failover, not throttling.
fn replica_env(dir: &Path, database_url: &str) -> Vec<(&'static str, String)> {
    vec![
        ("DATABASE_URL", database_url.to_owned()),
        ("DATA_DIR", dir.join("data").display().to_string()),
        ("RUST_LOG", "warn".to_owned()),
        ("PUSH_RATE", "0".to_owned()),
        ("PULL_RATE", "0".to_owned()),
        ("OPEN_RATE", "0".to_owned()),
    ]
}

async fn start_replica(dir: &Path, port: u16, env: &[(&'static str, String)]) -> ServerProcess {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    serve_at(Path::new(env!("CARGO_BIN_EXE_mana-sync")), dir, port, &env).await
}

/// Three replicas of the built server; the first creates the key, the others load it.
async fn replicas(dir: &Path, env: &[(&'static str, String)]) -> Vec<Replica> {
    let mut started = Vec::new();
    for i in 0..3 {
        let own = dir.join(format!("replica-{i}"));
        std::fs::create_dir_all(&own).unwrap();
        let port = free_port();
        let process = start_replica(&own, port, env).await;
        started.push(Replica {
            process: Some(process),
            port,
            dir: own,
        });
    }
    started
}

/// SIGTERM, then the exit (within the shutdown timeout).
fn terminate(replica: &mut Replica) {
    let mut process = replica.process.take().expect("a running replica");
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(process.0.id() as i32, libc::SIGTERM) }, 0);
    let status = process.0.wait().unwrap();
    assert!(status.success(), "replica on {} exited with {status}", replica.port);
}

fn change(id: &str) -> Value {
    json!({ "clientId": "pusher", "changes": [{ "table": "todos", "id": id, "op": "insert", "data": { "title": id } }] })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
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
    println!("a change streamed through nginx in {:?}", pushed_at.elapsed());
}

/// The socket is told to pull `todos` (the push on replica `i`).
async fn notified(socket: &mut Socket, i: usize) {
    let notice = expect_json(socket, Duration::from_secs(5)).await;
    assert_eq!(notice["type"], "sync-available", "replica {i}: {notice}");
    assert_eq!(notice["tables"], json!(["todos"]), "replica {i}: {notice}");
}

/// Pushes one change after another through the balancer until `stop`,
/// each under its own `Idempotency-Key`, sent again after any failure (a
/// replica going away) until acknowledged; returns the acknowledged ids.
async fn pushing(lb: String, token: String, stop: tokio::sync::watch::Receiver<bool>) -> (Vec<String>, u32) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let (mut acknowledged, mut retries) = (Vec::new(), 0);
    for n in 0.. {
        if *stop.borrow() {
            break;
        }
        let id = format!("load-{n}");
        loop {
            let answer = http
                .post(format!("{lb}/sync/todo"))
                .bearer_auth(&token)
                .header("Idempotency-Key", &id)
                .json(&change(&id))
                .send()
                .await;
            if answer.is_ok_and(|a| a.status() == 200) {
                break;
            }
            retries += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        acknowledged.push(id);
    }
    (acknowledged, retries)
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
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

    let (stop, stopped) = tokio::sync::watch::channel(false);
    let load = tokio::spawn(pushing(lb.clone(), token.clone(), stopped));
    tokio::time::sleep(Duration::from_millis(300)).await;

    // A socket on the first replica: closed with 1012 when it stops.
    let (mut socket, _) = tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{}/ws", ports[0]))
        .await
        .unwrap();
    send(&mut socket, json!({ "type": "auth", "token": token })).await;
    assert_eq!(
        expect_json(&mut socket, Duration::from_secs(5)).await["type"],
        "auth-ok"
    );
    let first = &mut replicas[0];
    let closing = tokio::spawn(async move { common::ws::expect_close(&mut socket, Duration::from_secs(30)).await });
    terminate(first);
    assert_eq!(
        closing.await.unwrap(),
        Some(1012),
        "the stopping replica's socket closes with 1012"
    );
    // The client connects again through the balancer: another replica takes it.
    let (mut again, _) = tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{lb_port}/ws"))
        .await
        .expect("a socket through nginx while a replica is down");
    send(&mut again, json!({ "type": "auth", "token": token })).await;
    assert_eq!(expect_json(&mut again, Duration::from_secs(5)).await["type"], "auth-ok");
    let first = &mut replicas[0];
    first.process = Some(start_replica(&first.dir, first.port, &env).await);

    // A rolling restart of all three, one after the other, under the same
    // load: each back and ready (and past nginx's fail_timeout) before the next goes.
    for replica in replicas.iter_mut() {
        terminate(replica);
        replica.process = Some(start_replica(&replica.dir, replica.port, &env).await);
        tokio::time::sleep(Duration::from_millis(1200)).await;
    }

    stop.send(true).unwrap();
    let (acknowledged, retries) = load.await.unwrap();
    let stored = pulled_ids(&reqwest::Client::new(), &lb, &token).await;
    let missing: Vec<&String> = acknowledged.iter().filter(|id| !stored.contains(*id)).collect();
    println!(
        "{} pushes acknowledged through nginx across a stop and a rolling restart ({retries} sent again), {} missing",
        acknowledged.len(),
        missing.len()
    );
    assert!(acknowledged.len() > 50, "the load ran: {}", acknowledged.len());
    assert!(missing.is_empty(), "acknowledged but lost: {missing:?}");
}
