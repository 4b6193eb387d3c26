//! The built `mana-sync` binary as a child process: killed when dropped,
//! and waited for until it answers.

use std::process::Child;
use std::time::{Duration, Instant};

/// A server process, killed (SIGKILL) if still running when dropped.
pub struct ServerProcess(pub Child);

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits (up to 30 s) until `url` answers with a success, and returns
/// that answer. Panics if the process exits first.
pub async fn answered(child: &mut Child, url: &str) -> reqwest::Response {
    let deadline = Instant::now() + Duration::from_secs(30);
    let client = reqwest::Client::new();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("mana-sync exited at start-up ({status})");
        }
        if let Ok(response) = client.get(url).send().await
            && response.status().is_success()
        {
            return response;
        }
        assert!(Instant::now() < deadline, "mana-sync never answered {url}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The repository's root (where `Cargo.toml` is).
pub fn repository() -> &'static std::path::Path {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A command in the repository, with the environment cargo gave this test
/// minus the variables cargo sets for a crate (`CARGO_PKG_*`,
/// `CARGO_MANIFEST_DIR`, `OUT_DIR`, …): dependencies' build scripts (ring's,
/// through cc) rerun when these change, so a cargo run from a test would
/// otherwise rebuild them, and a later cargo run from the shell again.
pub fn outside_cargo(program: impl AsRef<std::ffi::OsStr>) -> std::process::Command {
    let mut command = std::process::Command::new(program);
    command.current_dir(repository());
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        let per_crate = [
            "CARGO_PKG_",
            "CARGO_BIN_",
            "CARGO_MANIFEST_",
            "CARGO_CRATE_",
            "CARGO_TARGET_TMPDIR",
            "CARGO_PRIMARY_PACKAGE",
            "CARGO_RUSTC_CURRENT_DIR",
        ]
        .iter()
        .any(|prefix| name.starts_with(prefix));
        if per_crate || name == "OUT_DIR" {
            command.env_remove(name.as_ref());
        }
    }
    command
}

/// A program of `.venv-deploy` (the tools that check `deploy/`, pinned in
/// `tests/deploy/requirements.txt`), or a failure that says how to get it.
pub fn deploy_tool(name: &str) -> std::path::PathBuf {
    let path = repository().join(".venv-deploy/bin").join(name);
    assert!(
        path.exists(),
        "{name} is not installed at {}: run `scripts/test` once, or `python3 -m venv .venv-deploy && \
         .venv-deploy/bin/pip install -r tests/deploy/requirements.txt`",
        path.display()
    );
    path
}

/// `binary` (the server) in `dir` with an empty environment but `PORT` (a
/// free one) and `env`, its log in `dir/server.log`, once `/ready`
/// answers; with the port it listens on.
pub async fn serve(binary: &std::path::Path, dir: &std::path::Path, env: &[(&str, &str)]) -> (ServerProcess, u16) {
    let port = super::free_port();
    (serve_at(binary, dir, port, env).await, port)
}

/// As [`serve`], on `port` (a replica started again where it was); its
/// log appended to `dir/server.log`.
pub async fn serve_at(
    binary: &std::path::Path,
    dir: &std::path::Path,
    port: u16,
    env: &[(&str, &str)],
) -> ServerProcess {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("server.log"))
        .unwrap();
    let child = std::process::Command::new(binary)
        .env_clear()
        .current_dir(dir)
        .env("PORT", port.to_string())
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .expect("run mana-sync");
    let mut server = ServerProcess(child);
    answered(&mut server.0, &format!("http://127.0.0.1:{port}/ready")).await;
    server
}

/// A local-mode token for `sub` from the server's key in `dir/data` (as
/// `mana-sync token` run there prints it).
pub fn local_token(dir: &std::path::Path, sub: &str) -> String {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_mana-sync"))
        .env_clear()
        .current_dir(dir)
        .args(["token", "--sub", sub])
        .output()
        .expect("run mana-sync token");
    assert!(output.status.success(), "mana-sync token failed: {output:?}");
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}
