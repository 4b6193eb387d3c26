//! The balanced topology's parts on loopback: Debian's nginx with
//! `deploy/nginx/mana-sync.conf` as it is, and replicas of the server (the
//! release build when `deploy/smoke.sh` runs these tests).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::common::free_port;
use crate::common::process::{ServerProcess, answered, repository, serve_at};

fn nginx_binary() -> PathBuf {
    let path = PathBuf::from(std::env::var("NGINX").unwrap_or_else(|_| "/usr/sbin/nginx".to_owned()));
    assert!(
        path.exists(),
        "no nginx at {}: `apt-get install nginx` (scripts/test does), or set NGINX",
        path.display()
    );
    path
}

/// nginx in the foreground, killed when dropped.
pub struct Nginx(Child);

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// nginx on `port` in front of `replicas`, with `deploy/nginx/mana-sync.conf`
/// as it is; its files in `dir`.
pub async fn nginx(dir: &Path, port: u16, replicas: &[u16]) -> Nginx {
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
    answered(&mut nginx.0, &format!("http://127.0.0.1:{port}/health")).await;
    nginx
}

/// A replica: its process, port and directory.
pub struct Replica {
    pub process: Option<ServerProcess>,
    pub port: u16,
    pub dir: PathBuf,
}

/// The replicas' environment: one database, one data directory (so one
/// local signing key: a token is good on every replica), three seconds of
/// drain at shutdown (`/ready` at 503 first: time enough to see it on a
/// busy machine), and no per-user rate limit,
/// so that the load measures failover, not throttling.
pub fn replica_env(dir: &Path, database_url: &str) -> Vec<(&'static str, String)> {
    vec![
        ("DATABASE_URL", database_url.to_owned()),
        ("DATA_DIR", dir.join("data").display().to_string()),
        ("RUST_LOG", "warn".to_owned()),
        ("SHUTDOWN_DRAIN", "3s".to_owned()),
        ("PUSH_RATE", "0".to_owned()),
        ("PUSH_BYTES_RATE", "0".to_owned()),
        ("MAX_REQUESTS_PER_USER", "0".to_owned()),
        ("PULL_RATE", "0".to_owned()),
        ("OPEN_RATE", "0".to_owned()),
        // Behind a balancer every connection comes from its address.
        ("MAX_CONNECTIONS_PER_ADDRESS", "0".to_owned()),
    ]
}

/// The server the replicas run: `MANA_SYNC_BIN` (deploy/smoke.sh sets the
/// release build), or the one built with these tests.
pub fn server_binary() -> PathBuf {
    std::env::var_os("MANA_SYNC_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_mana-sync")))
}

pub async fn start_replica(dir: &Path, port: u16, env: &[(&'static str, String)]) -> ServerProcess {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    serve_at(&server_binary(), dir, port, &env).await
}

/// Three replicas; the first creates the key, the others load it.
pub async fn replicas(dir: &Path, env: &[(&'static str, String)]) -> Vec<Replica> {
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

/// Sends SIGTERM; the process, to wait for with [`exited`].
pub fn sigterm(replica: &mut Replica) -> ServerProcess {
    let process = replica.process.take().expect("a running replica");
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(process.0.id() as i32, libc::SIGTERM) }, 0);
    process
}

/// Waits for a stopped replica's exit, which must be a clean one.
pub async fn exited(mut process: ServerProcess, port: u16) {
    let status = tokio::task::spawn_blocking(move || process.0.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "replica on {port} exited with {status}");
}

/// SIGTERM, then the exit (after the drain, within the shutdown timeout).
pub async fn terminate(replica: &mut Replica) {
    let process = sigterm(replica);
    exited(process, replica.port).await;
}

/// How many sockets and streams the replica on `port` holds (its gauge).
pub async fn sockets_held(port: u16) -> u64 {
    let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix("mana_sync_connections_total "))
        .expect("the replica reports its sockets")
        .trim()
        .parse()
        .unwrap()
}

/// The status of the replica's own `/ready`.
pub async fn ready_status(http: &reqwest::Client, port: u16) -> u16 {
    http.get(format!("http://127.0.0.1:{port}/ready"))
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}
