//! The spec is the truth: schemathesis (pinned in
//! `tests/schemathesis/requirements.txt`, installed into `.venv` by
//! `scripts/test`) runs every check it has against the built server, once with a
//! token and once without. It fails on any 5xx, any status the spec does
//! not declare, any body (and any stream event) that does not match its
//! schema, a schema-violating request accepted, and so on; the exceptions
//! it is told of are in `tests/schemathesis/schemathesis.toml`, with why.
//!
//! The server is the zero-configuration one (SQLite, its own tokens) with
//! the per-user rate limits off, so that the requests reach the handlers.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::process::{local_token, repository, serve};

/// `.venv/bin/schemathesis`, or a failure that says how to get it.
fn schemathesis() -> PathBuf {
    let path = repository().join(".venv/bin/schemathesis");
    assert!(
        path.exists(),
        "schemathesis is not installed at {}: run `scripts/test` once, or \
         `python3 -m venv .venv && .venv/bin/pip install -r tests/schemathesis/requirements.txt`",
        path.display()
    );
    path
}

/// Runs schemathesis with every check against the server on `port`,
/// sending `headers`; returns whether it passed, after printing its report.
fn run(port: u16, headers: &[String], examples: u32) -> bool {
    let mut cmd = Command::new(schemathesis());
    cmd.arg("--config-file")
        .arg(repository().join("tests/schemathesis/schemathesis.toml"))
        .arg("run")
        .arg(repository().join("openapi/mana-sync.json"))
        .args(["--url", &format!("http://127.0.0.1:{port}")])
        .args(["--checks", "all"])
        .args(["--max-examples", &examples.to_string()])
        // One worker: two threads of hypothesis parsing lambda sources at
        // once trip a CPython 3.11.7 bug ("AST constructor recursion depth
        // mismatch"), now and then, whatever hypothesis version is pinned.
        .args(["--workers", "1"])
        .args(["--request-timeout", "30"]);
    for header in headers {
        cmd.args(["--header", header]);
    }
    let output = cmd.env("NO_COLOR", "1").output().expect("run schemathesis");
    println!("{}", String::from_utf8_lossy(&output.stdout));
    eprintln!("{}", String::from_utf8_lossy(&output.stderr));
    output.status.success()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_nothing_with_a_token_or_without() {
    let dir = tempfile::tempdir().unwrap();
    let limits_off = [
        ("PUSH_RATE", "0"),
        ("PUSH_BYTES_RATE", "0"),
        ("MAX_REQUESTS_PER_USER", "0"),
        ("PULL_RATE", "0"),
        ("OPEN_RATE", "0"),
        // Schemathesis opens change streams faster than they end: a
        // stream whose client closed its side (its request was whole) is
        // served until its next heartbeat finds the client gone.
        ("MAX_SOCKETS_PER_USER", "1000"),
    ];
    let (_server, port) = serve(Path::new(env!("CARGO_BIN_EXE_mana-sync")), dir.path(), &limits_off).await;
    let bearer = format!("Authorization: Bearer {}", local_token(dir.path(), "schemathesis"));

    let (with, without) = tokio::task::spawn_blocking(move || (run(port, &[bearer], 100), run(port, &[], 20)))
        .await
        .unwrap();
    assert!(with, "schemathesis with a token found failures (its report is above)");
    assert!(
        without,
        "schemathesis without a token found failures (its report is above)"
    );
}
