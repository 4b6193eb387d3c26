//! Three replicas on one PostgreSQL behind nginx, configured by the very
//! `deploy/nginx/mana-sync.conf` an operator uses, all on loopback:
//! pushes and pulls go through the balancer, a socket held through it is
//! told of pushes every replica served, and a change stream through it
//! delivers a change within a second (nothing buffers it). nginx is
//! Debian's (`apt-get install nginx`, which `bash .ci/run` does).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::process::{ServerProcess, local_token, repository, serve};
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
    let servers: String = replicas.iter().map(|p| format!("server 127.0.0.1:{p};\n")).collect();
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

/// Three replicas of the built server on `database_url`, sharing one data
/// directory (so one local signing key: a token is good on every replica).
async fn replicas(dir: &Path, database_url: &str) -> Vec<(ServerProcess, u16)> {
    let data = dir.join("data").display().to_string();
    let env = [
        ("DATABASE_URL", database_url),
        ("DATA_DIR", data.as_str()),
        ("RUST_LOG", "warn"),
    ];
    let binary = Path::new(env!("CARGO_BIN_EXE_mana-sync"));
    let mut started = Vec::new();
    for i in 0..3 {
        // The first creates the key; the others load it.
        let own = dir.join(format!("replica-{i}"));
        std::fs::create_dir_all(&own).unwrap();
        started.push(serve(binary, &own, &env).await);
    }
    started
}

fn change(id: &str) -> Value {
    json!({ "clientId": "pusher", "changes": [{ "table": "todos", "id": id, "op": "insert", "data": { "title": id } }] })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_behind_nginx_push_pull_notify_and_stream() {
    let database = pg::test_database().await;
    let dir = tempfile::tempdir().unwrap();
    let replicas = replicas(dir.path(), &database.app_url).await;
    let ports: Vec<u16> = replicas.iter().map(|(_, p)| *p).collect();
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
