//! A newcomer's first run: the built binary in an empty directory with no
//! environment but `PORT` (so SQLite in `./data`, local tokens, loopback;
//! a free port rather than the default 3050, which may be taken), driven by
//! the README's own three lines, then stopped and started again with its
//! data intact. A second process on the same data is refused.

use crate::common;

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Instant;

use common::process::answered;
use serde_json::Value;

/// `mana-sync` in `dir` with an empty environment.
fn mana_sync(dir: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mana-sync"));
    cmd.env_clear().current_dir(dir);
    cmd
}

/// A server process, killed if the test ends early.
struct Server(Child);

/// Where the server of [`Server::start`] on `port` answers.
fn address(port: u16) -> String {
    format!("http://127.0.0.1:{port}")
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Server {
    /// Starts `mana-sync` in `dir` on `port` and waits until `/health` says `ok`.
    async fn start(dir: &Path, port: u16, log: &Path) -> Server {
        let log = std::fs::File::create(log).unwrap();
        let child = mana_sync(dir)
            .env("PORT", port.to_string())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("run mana-sync");
        let mut server = Server(child);
        let health: Value = answered(&mut server.0, &format!("{}/health", address(port)))
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(health["status"], "ok", "{health}");
        assert_eq!(health["store"], "sqlite", "no DATABASE_URL: SQLite");
        server
    }

    /// SIGTERM, and the exit status.
    fn stop(mut self) -> std::process::ExitStatus {
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        self.0.wait().unwrap()
    }
}

/// The README's three lines, run by bash in `dir`, with `cargo run -q
/// --release --` standing for the binary this test built and `port` for the
/// default 3050 their two `curl`s name.
fn readme_lines(dir: &Path, port: u16) -> Output {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let block = readme
        .split("<!-- zero-config: these three lines are run by tests/integration/zero_config.rs -->")
        .nth(1)
        .and_then(|rest| rest.split("```sh\n").nth(1))
        .and_then(|rest| rest.split("```").next())
        .expect("the README's zero-config block");
    assert_eq!(block.lines().count(), 3, "three lines: {block}");
    assert_eq!(
        block.matches("localhost:3050/").count(),
        2,
        "both curls name the default port: {block}"
    );
    let script = block
        .replace("cargo run -q --release --", env!("CARGO_BIN_EXE_mana-sync"))
        .replace("localhost:3050/", &format!("localhost:{port}/"));
    Command::new("bash")
        .args(["-euo", "pipefail", "-c", &format!("{script}\necho\necho \"$TOKEN\"")])
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .current_dir(dir)
        .output()
        .expect("run bash")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_runs_with_no_configuration_and_keeps_its_data_across_restarts() {
    let port = common::free_port();
    let dir = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let server = Server::start(dir.path(), port, &logs.path().join("first.log")).await;
    let cold_start = started.elapsed();
    let log = std::fs::read_to_string(logs.path().join("first.log")).unwrap();
    assert!(log.contains("SQLite"), "start-up names the store: {log}");
    assert!(log.contains("LOCAL MODE"), "start-up names the mode: {log}");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |path: &str| std::fs::metadata(dir.path().join(path)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode("data"), 0o700, "the data directory is its owner's alone");
        for file in [
            "data/mana-sync.db",
            "data/mana-sync.db-wal",
            "data/local-signing-key.pem",
        ] {
            assert_eq!(mode(file), 0o600, "{file} is its owner's alone");
        }
    }

    // The README's token, push and pull, exactly as written.
    let output = readme_lines(dir.path(), port);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the README's lines fail: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // curl prints the two answers back to back, then the script the token.
    let (answers, token) = stdout.trim_end().rsplit_once('\n').expect("answers, then the token");
    let answers: Vec<Value> = serde_json::Deserializer::from_str(answers)
        .into_iter()
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("the push and the pull answer JSON ({e}): {answers}"));
    let [pushed, pulled] = &answers[..] else {
        panic!("two answers: {answers:?}")
    };
    assert_eq!(pushed["serverChanges"][0]["data"]["title"], "Buy milk", "{pushed}");
    assert_eq!(pulled["serverChanges"][0]["id"], "t1", "{pulled}");

    // The data is this process's alone: a second process is refused while
    // it runs (and `rebuild` runs once it is gone, `serve` starts below).
    let rebuild = || mana_sync(dir.path()).arg("rebuild").output().unwrap();
    for second in [
        mana_sync(dir.path()).arg("serve").env("PORT", "0").output().unwrap(),
        rebuild(),
    ] {
        assert!(
            !second.status.success(),
            "a second mana-sync must be refused: {}",
            String::from_utf8_lossy(&second.stderr)
        );
    }

    assert!(server.stop().success(), "SIGTERM is a clean exit");
    let alone = rebuild();
    assert!(
        alone.status.success(),
        "with the server gone, the data is free again: {}",
        String::from_utf8_lossy(&alone.stderr)
    );
    let server = Server::start(dir.path(), port, &logs.path().join("second.log")).await;
    let pulled: Value = reqwest::Client::new()
        .get(format!("{}/sync/todo/pull?collection=todos", address(port)))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        pulled["serverChanges"][0]["data"]["title"], "Buy milk",
        "the data and the signing key survive a restart: {pulled}"
    );
    assert!(server.stop().success());
    eprintln!("cold start from an empty directory to a healthy server: {cold_start:?} (debug build)");
}

#[test]
fn database_url_picks_the_store_and_names_what_it_cannot_use() {
    let dir = tempfile::tempdir().unwrap();
    let migrate = |url: &str| {
        mana_sync(dir.path())
            .arg("migrate")
            .env("DATABASE_URL", url)
            .output()
            .unwrap()
    };

    let file = dir.path().join("nested/dir/app.db");
    let output = migrate(&format!("sqlite://{}", file.display()));
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(file.exists(), "sqlite://path creates the file and its directories");

    // In memory, no file at all, or no store it knows: start-up stops, and
    // its error names the variable (the contract of a start-up error).
    for url in [
        "sqlite::memory:",
        "sqlite://",
        "sqlite://%3Amemory%3A",
        "mysql://root:secret@localhost/db",
    ] {
        let output = migrate(url);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{url} is refused");
        assert!(
            stderr.contains("DATABASE_URL"),
            "{url}: the error names the variable: {stderr}"
        );
        assert!(
            !stderr.contains("secret"),
            "a DATABASE_URL's password is never echoed: {stderr}"
        );
    }
}
