//! What the load runs against: replicas of the built binary on a
//! PostgreSQL the tests' harness starts (on disk, `fsync` on), one on a
//! SQLite file, or servers already running at given URLs.

use std::process::{Command, Stdio};

use crate::common::free_port;
use crate::common::pg::{self, TestDatabase};
use crate::common::process::{ServerProcess, answered};
use crate::common::tokens::{self, JwksServer};

/// One server the load talks to.
pub struct Replica {
    /// `http://127.0.0.1:<port>`
    pub base: String,
    /// Its process, when the benchmark started it (for memory and CPU).
    pub pid: Option<u32>,
    _process: Option<ServerProcess>,
}

impl Replica {
    pub fn ws_url(&self, path: &str) -> String {
        format!("{}{path}", self.base.replacen("http", "ws", 1))
    }
}

/// Servers on one store.
pub struct Deployment {
    /// `postgres`, `sqlite` or `target`.
    pub store: &'static str,
    pub replicas: Vec<Replica>,
    /// A superuser URL to the database, where known: the raw ceiling is
    /// measured there, and the statistics refreshed after bulk loads.
    pub admin_url: Option<String>,
    _database: Option<TestDatabase>,
    _data_dir: Option<tempfile::TempDir>,
}

impl Deployment {
    pub fn pids(&self) -> Vec<u32> {
        self.replicas.iter().filter_map(|r| r.pid).collect()
    }
}

/// What every started server shares: the key set its tokens are checked
/// against, and a directory for its log.
pub struct Environment {
    pub jwks: JwksServer,
    logs: tempfile::TempDir,
    /// Settings every server gets on top of the benchmark's (`--server-env`).
    settings: Vec<(String, String)>,
}

impl Environment {
    /// Serves the benchmark's key set on `jwks_port` (any free port if
    /// `None`); every server started gets `settings` too.
    pub async fn start(jwks_port: Option<u16>, settings: Vec<(String, String)>) -> Environment {
        Environment {
            settings,
            jwks: JwksServer::start_on(jwks_port.unwrap_or(0), tokens::default_jwks()).await,
            logs: tempfile::Builder::new()
                .prefix("mana-sync-load-")
                .tempdir()
                .expect("a directory for the servers' logs"),
        }
    }

    /// `replicas` servers on one new database of the harness's PostgreSQL.
    pub async fn postgres(&self, replicas: usize) -> Deployment {
        let database = pg::test_database().await;
        let mut started = Vec::new();
        for i in 0..replicas {
            started.push(
                self.spawn(&format!("pg-{i}"), &[("DATABASE_URL", database.app_url.clone())])
                    .await,
            );
        }
        Deployment {
            store: "postgres",
            replicas: started,
            admin_url: Some(database.admin_url.clone()),
            _database: Some(database),
            _data_dir: None,
        }
    }

    /// One server on a SQLite file in a new directory on disk.
    pub async fn sqlite(&self) -> Deployment {
        let dir = tempfile::Builder::new()
            .prefix("mana-sync-load-sqlite-")
            .tempdir()
            .expect("a data directory");
        let replica = self
            .spawn("sqlite", &[("DATA_DIR", dir.path().display().to_string())])
            .await;
        Deployment {
            store: "sqlite",
            replicas: vec![replica],
            admin_url: None,
            _database: None,
            _data_dir: Some(dir),
        }
    }

    /// A server of the built binary, configured as production is, except
    /// for the limits a benchmark exceeds on purpose: one address opens
    /// every connection, one user holds a thousand sockets, and nothing is
    /// rate limited.
    async fn spawn(&self, name: &str, store: &[(&str, String)]) -> Replica {
        let port = free_port();
        let log = self.logs.path().join(format!("{name}.log"));
        let log = std::fs::File::create(&log).expect("a log file");
        let mut command = Command::new(env!("CARGO_BIN_EXE_mana-sync"));
        command
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .envs([
                ("HOST", "127.0.0.1".to_owned()),
                ("PORT", port.to_string()),
                ("JWKS_URL", self.jwks.url.clone()),
                ("JWT_ISSUER", tokens::ISSUER.to_owned()),
                ("JWT_AUDIENCE", tokens::AUDIENCE.to_owned()),
                ("PUSH_RATE", "0".to_owned()),
                ("PUSH_BYTES_RATE", "0".to_owned()),
                ("MAX_REQUESTS_PER_USER", "0".to_owned()),
                ("PULL_RATE", "0".to_owned()),
                ("OPEN_RATE", "0".to_owned()),
                ("MAX_SOCKETS", "30000".to_owned()),
                ("MAX_SOCKETS_PER_USER", "2000".to_owned()),
                ("MAX_CONNECTIONS", "30000".to_owned()),
                ("MAX_CONNECTIONS_PER_ADDRESS", "30000".to_owned()),
            ])
            .envs(store.iter().map(|(k, v)| (*k, v.as_str())))
            .envs(self.settings.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("a log file"))
            .stderr(log);
        let mut child = command.spawn().expect("start mana-sync");
        let base = format!("http://127.0.0.1:{port}");
        answered(&mut child, &format!("{base}/health")).await;
        Replica {
            base,
            pid: Some(child.id()),
            _process: Some(ServerProcess(child)),
        }
    }
}

/// Servers already running at `urls` (their tokens must be checked against
/// the benchmark's key set: see `--jwks-port`).
pub fn targets(urls: &[String], database_url: Option<String>) -> Deployment {
    Deployment {
        store: "target",
        replicas: urls
            .iter()
            .map(|url| Replica {
                base: url.trim_end_matches('/').to_owned(),
                pid: None,
                _process: None,
            })
            .collect(),
        admin_url: database_url,
        _database: None,
        _data_dir: None,
    }
}
