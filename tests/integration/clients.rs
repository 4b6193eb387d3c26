//! The browser clients in `clients/` (an npm workspace, installed with
//! `npm ci --prefix clients`, which `scripts/test` does):
//!
//! - the TypeScript client is what openapi-typescript generates from the
//!   committed spec today (no drift, no warning), both packages type-check
//!   and build, and the Dexie adapter's unit tests pass (vitest with
//!   fake-indexeddb);
//! - the Dexie adapter syncs in headless Chromium (Debian's, driven by
//!   playwright-core) against the release build of the server on SQLite
//!   and on PostgreSQL: `clients/dexie/e2e/`, which prints the latency of
//!   an edit to another device and the time a fresh device takes to
//!   receive 5,000 records.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::process::{ServerProcess, repository, serve};
use common::{free_port, pg};
use serde_json::json;

/// `clients/`, with its packages installed, or a failure that says how.
fn clients() -> PathBuf {
    let clients = repository().join("clients");
    assert!(
        clients.join("node_modules/.package-lock.json").exists(),
        "the clients' npm packages are not installed: run `npm ci --prefix clients` \
         (or `scripts/test`, which does)"
    );
    clients
}

/// Runs `npm run <script>` (with `args`) in `dir` and returns its output,
/// printed so that a failure shows it.
fn npm(dir: &Path, script: &str, env: &[(&str, String)]) -> Output {
    let output = Command::new("npm")
        .args(["run", "--silent", script])
        .current_dir(dir)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("NO_COLOR", "1")
        .env("CI", "true")
        .output()
        .expect("run npm (Node.js 20 or later is needed)");
    println!("{}", String::from_utf8_lossy(&output.stdout));
    eprintln!("{}", String::from_utf8_lossy(&output.stderr));
    output
}

#[test]
fn the_typescript_client_matches_the_spec_and_the_adapter_passes_its_unit_tests() {
    let output = npm(&clients(), "test", &[]);
    assert!(output.status.success(), "`npm test` in clients/ failed: see above");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("src/schema.ts matches openapi/mana-sync.json"),
        "{stdout}"
    );
    assert!(
        stdout.contains("Tests") && stdout.contains("passed") && !stdout.contains("failed"),
        "{stdout}"
    );
}

/// The release build of the server, brought up to date by cargo (a
/// no-op when it is; the target directory is the one this test was built in).
fn release_binary() -> PathBuf {
    let status = common::process::outside_cargo(env!("CARGO"))
        .args(["build", "--release", "--locked", "--bin", "mana-sync"])
        .status()
        .expect("run cargo build --release");
    assert!(status.success(), "cargo build --release failed");
    let target = Path::new(env!("CARGO_BIN_EXE_mana-sync"))
        .ancestors()
        .nth(2)
        .expect("the target directory");
    target.join("release/mana-sync")
}

/// The release server in local mode (its own tokens) with its data in
/// `dir`, on SQLite or, given a URL, PostgreSQL, allowing `origin`.
async fn start(binary: &Path, dir: &Path, database_url: Option<&str>, origin: &str) -> (ServerProcess, String) {
    std::fs::create_dir_all(dir).unwrap();
    let data = dir.join("data").display().to_string();
    let mut env = vec![
        ("DATA_DIR", data.as_str()),
        ("CORS_ORIGINS", origin),
        ("RUST_LOG", "warn"),
    ];
    env.extend(database_url.map(|url| ("DATABASE_URL", url)));
    let (server, port) = serve(binary, dir, &env).await;
    (server, format!("http://127.0.0.1:{port}"))
}

#[test]
fn the_dexie_adapter_syncs_in_chromium_on_both_stores() {
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".to_owned());
    assert!(
        Path::new(&chromium).exists(),
        "no Chromium at {chromium}: `apt-get install chromium` (scripts/test does), or set CHROMIUM"
    );
    let clients = clients();
    let binary = release_binary();
    common::runtime().block_on(async {
        let database = pg::test_database().await;
        let dir = tempfile::tempdir().unwrap();
        let page_port = free_port();
        let origin = format!("http://127.0.0.1:{page_port}");
        let (_sqlite, sqlite_url) = start(&binary, &dir.path().join("sqlite"), None, &origin).await;
        let (_postgres, postgres_url) =
            start(&binary, &dir.path().join("postgres"), Some(&database.app_url), &origin).await;
        let servers = json!([
            { "store": "sqlite", "url": sqlite_url, "dataDir": dir.path().join("sqlite/data") },
            { "store": "postgres", "url": postgres_url, "dataDir": dir.path().join("postgres/data") },
        ]);
        let env = [
            ("MANA_SYNC_SERVERS", servers.to_string()),
            ("MANA_SYNC_BIN", binary.display().to_string()),
            ("MANA_SYNC_PAGE_PORT", page_port.to_string()),
            ("CHROMIUM", chromium),
        ];
        let dexie = clients.join("dexie");
        let output = tokio::task::spawn_blocking(move || npm(&dexie, "e2e", &env))
            .await
            .unwrap();
        if !output.status.success() {
            for store in ["sqlite", "postgres"] {
                let log = std::fs::read_to_string(dir.path().join(store).join("server.log")).unwrap_or_default();
                eprintln!("--- {store} server log ---\n{log}");
            }
        }
        assert!(output.status.success(), "the browser tests failed: see above");
    });
}
