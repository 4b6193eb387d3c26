//! Replicas as real processes, so that a fault can SIGKILL one.

use std::fs::OpenOptions;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

/// One `mana-sync` process on a fixed port, restartable.
pub struct Replica {
    pub port: u16,
    env: Vec<(String, String)>,
    log: PathBuf,
    child: Option<Child>,
}

impl Replica {
    /// Starts it and waits until it is ready.
    pub async fn start(port: u16, env: Vec<(String, String)>, log: PathBuf) -> Replica {
        let mut replica = Replica {
            port,
            env,
            log,
            child: None,
        };
        replica.restart().await;
        replica
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// SIGKILL: no shutdown, no drain, whatever it was doing.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the process (again) on the same port and waits for `/ready`.
    pub async fn restart(&mut self) {
        self.kill();
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("replica log");
        let child = Command::new(env!("CARGO_BIN_EXE_mana-sync"))
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("PORT", self.port.to_string())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("run mana-sync");
        let ready = self.url("/ready");
        super::common::process::answered(self.child.insert(child), &ready).await;
    }

    /// What it logged, across restarts.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}
