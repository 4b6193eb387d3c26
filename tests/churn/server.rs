//! The server process under churn, and reading its memory.

use super::*;

/// The binary, serving with no configuration in `dir`, killed when dropped.
pub(crate) struct Server {
    pub(crate) child: Child,
    pub(crate) port: u16,
    pub(crate) log: std::path::PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log_text();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("the server's log, last lines first:\n{}", tail.join("\n"));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// Starts `mana-sync` in `dir` with nothing configured but the port and
    /// the limits this test is not about, and waits for `/health`.
    pub(crate) async fn start(dir: &Path, http: &reqwest::Client) -> Server {
        let port = common::free_port();
        let log = dir.join("server.log");
        let child = Command::new(env!("CARGO_BIN_EXE_mana-sync"))
            .env_clear()
            .current_dir(dir)
            .env("PORT", port.to_string())
            .env("RUST_LOG", "warn")
            .env("OPEN_RATE", "0")
            .env("PUSH_RATE", "0")
            .env("PUSH_BYTES_RATE", "0")
            .env("MAX_REQUESTS_PER_USER", "0")
            .env("PULL_RATE", "0")
            .env("MAX_CONNECTIONS_PER_ADDRESS", "5000")
            .env("MAX_SOCKETS_PER_USER", "100")
            .env("MAX_SOCKETS", "4000")
            // One malloc arena (see the module docs), unless the run says otherwise.
            .env(
                "MALLOC_ARENA_MAX",
                std::env::var("MALLOC_ARENA_MAX").unwrap_or_else(|_| "1".to_owned()),
            )
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("run mana-sync");
        let mut server = Server { child, port, log };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = server.child.try_wait().unwrap() {
                panic!("mana-sync exited at start-up ({status}): {}", server.log_text());
            }
            if http.get(server.url("/health")).send().await.is_ok() {
                return server;
            }
            assert!(Instant::now() < deadline, "mana-sync never answered on port {port}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(crate) fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A field of `/proc/<pid>/status` given in kB (`VmRSS`, `VmHWM`).
    pub(crate) fn status_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|line| {
                line.strip_prefix(field)?
                    .strip_prefix(':')?
                    .trim()
                    .strip_suffix(" kB")?
                    .parse()
                    .ok()
            })
            .unwrap_or_else(|| panic!("no {field} in {status}"))
    }

    /// The server's open socket descriptors (the listener and the
    /// runtime's own, plus one per connection).
    pub(crate) fn sockets(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .unwrap()
            .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
            .filter(|target| target.to_string_lossy().starts_with("socket:"))
            .count()
    }

    pub(crate) async fn health(&self, http: &reqwest::Client) -> Value {
        let response = http.get(self.url("/health")).send().await.expect("/health answers");
        assert_eq!(response.status(), StatusCode::OK, "/health");
        response.json().await.unwrap()
    }

    /// Waits until no WebSocket is subscribed and every connection of the
    /// round is closed (as many socket descriptors as when idle).
    pub(crate) async fn wait_until_let_go(&self, http: &reqwest::Client, idle_sockets: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let sockets = self.sockets();
            let health = self.health(http).await;
            if sockets <= idle_sockets && health["connections"] == 0 && health["users"] == 0 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the server still holds {sockets} sockets (idle: {idle_sockets}) and reports {health}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
