//! The spec makes a working client: openapi-python-client (pinned in
//! `tests/python_client/requirements.txt`, installed into `.venv-client` by
//! `scripts/test`) generates a Python client from `openapi/mana-sync.json`
//! without a single warning (it drops, with only a warning, whatever part
//! of a spec it cannot take), and `tests/python_client/roundtrip.py`
//! syncs through that client with the zero-configuration server: push,
//! pull, cursors, a refused push read as the typed error body.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::process::{local_token, repository, serve};

/// The generated package's name, as `roundtrip.py` imports it.
const PACKAGE: &str = "mana_sync_client";

/// `.venv-client/bin`, or a failure that says how to get it.
fn venv_bin() -> PathBuf {
    let bin = repository().join(".venv-client/bin");
    assert!(
        bin.join("openapi-python-client").exists(),
        "openapi-python-client is not installed in {}: run `scripts/test` once, or `python3 -m venv \
         .venv-client && .venv-client/bin/pip install -r tests/python_client/requirements.txt`",
        bin.display()
    );
    bin
}

/// A program of the virtual environment, with nothing of this process's
/// environment (a developer's PYTHONPATH must not change what runs) but
/// the environment's own programs on PATH.
fn venv_command(bin: &Path, program: &str) -> Command {
    let mut cmd = Command::new(bin.join(program));
    cmd.env_clear().env("PATH", bin);
    cmd
}

fn printed(output: &Output) -> String {
    format!(
        "stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_client_generated_from_the_spec_without_a_warning_syncs() {
    let bin = venv_bin();
    let dir = tempfile::tempdir().unwrap();

    // Its ruff hook (formatting the code) runs from the same environment.
    let generated = venv_command(&bin, "openapi-python-client")
        .current_dir(dir.path())
        .arg("generate")
        .arg("--path")
        .arg(repository().join("openapi/mana-sync.json"))
        .args(["--meta", "none", "--output-path", PACKAGE])
        .output()
        .expect("run openapi-python-client");
    assert!(
        generated.status.success(),
        "openapi-python-client failed\n{}",
        printed(&generated)
    );
    // A clean run says only that; anything else is a warning (a schema or
    // an operation left out of the client) or a failed hook.
    assert!(
        generated.stdout == format!("Generating {PACKAGE}\n").as_bytes() && generated.stderr.is_empty(),
        "openapi-python-client printed more than a clean run does\n{}",
        printed(&generated)
    );

    let (_server, port) = serve(Path::new(env!("CARGO_BIN_EXE_mana-sync")), dir.path(), &[]).await;
    let token = local_token(dir.path(), "alice");

    let roundtrip = venv_command(&bin, "python")
        .env("PYTHONPATH", dir.path())
        .arg(repository().join("tests/python_client/roundtrip.py"))
        .arg(format!("http://127.0.0.1:{port}"))
        .arg(&token)
        .output()
        .expect("run roundtrip.py");
    assert!(
        roundtrip.status.success(),
        "roundtrip.py failed through the generated client\n{}",
        printed(&roundtrip)
    );
}
