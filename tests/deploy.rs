//! What `deploy/` gives an operator, checked here where no Docker engine
//! runs: the Dockerfile passes hadolint (pinned in
//! `tests/deploy/requirements.txt`, installed into `.venv-deploy` by
//! `.ci/run`), and `deploy/init-role.sql` makes a database whose serving
//! role can sync but owns nothing, bypasses no row-level security and
//! cannot change the schema, while the owner role migrates it.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::process::{repository, serve};
use common::{free_port, pg};
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection};

/// A program of `.venv-deploy`, or a failure that says how to get it.
fn linter(name: &str) -> PathBuf {
    let path = repository().join(".venv-deploy/bin").join(name);
    assert!(
        path.exists(),
        "{name} is not installed at {}: run `bash .ci/run` once, or `python3 -m venv .venv-deploy && \
         .venv-deploy/bin/pip install -r tests/deploy/requirements.txt`",
        path.display()
    );
    path
}

#[test]
fn the_dockerfile_passes_hadolint() {
    let output = Command::new(linter("hadolint"))
        .arg("--no-color")
        .arg(repository().join("deploy/Dockerfile"))
        .output()
        .expect("run hadolint");
    assert!(
        output.status.success(),
        "hadolint found problems in deploy/Dockerfile:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Runs `deploy/init-role.sql` with psql as the superuser of `admin`.
fn init_roles(admin: &url::Url) {
    let psql = pg::find_pg_bin_dir()
        .map(|bin| bin.join("psql"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("psql"));
    let output = Command::new(psql)
        .arg(admin.as_str())
        .args([
            "-v",
            "owner_password=owner-secret",
            "-v",
            "app_password=app-secret",
            "-f",
        ])
        .arg(repository().join("deploy/init-role.sql"))
        .output()
        .expect("run psql");
    assert!(
        output.status.success(),
        "init-role.sql failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_role_sql_makes_an_owner_that_migrates_and_a_serving_role_that_only_syncs() {
    let admin: url::Url = pg::server_admin_url().parse().unwrap();
    // Twice: a second run (a restarted database container) changes nothing.
    init_roles(&admin);
    init_roles(&admin);
    let url_as = |user: &str, password: &str| {
        let mut url = admin.clone();
        url.set_username(user).unwrap();
        url.set_password(Some(password)).unwrap();
        url.set_path("/mana_sync");
        url.to_string()
    };
    let (owner, app) = (
        url_as("mana_sync_owner", "owner-secret"),
        url_as("mana_sync", "app-secret"),
    );

    let migrate = Command::new(env!("CARGO_BIN_EXE_mana-sync"))
        .env_clear()
        .env("DATABASE_URL", &owner)
        .arg("migrate")
        .output()
        .unwrap();
    assert!(migrate.status.success(), "migrate as the owner: {migrate:?}");

    // The serving role: no attribute beyond LOGIN, owns no table, and may not change any.
    let mut conn = PgConnection::connect(&app).await.unwrap();
    let (superuser, bypass, owned): (bool, bool, i64) = sqlx::query_as(
        "SELECT rolsuper, rolbypassrls, (SELECT count(*) FROM pg_tables WHERE tableowner = current_user) \
         FROM pg_roles WHERE rolname = current_user",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!((superuser, bypass, owned), (false, false, 0));
    for ddl in [
        "CREATE TABLE intruder (x int)",
        "DROP TABLE sync_changes",
        "TRUNCATE sync_changes",
    ] {
        let refused = sqlx::raw_sql(ddl).execute(&mut conn).await;
        assert!(refused.is_err(), "the serving role ran {ddl}");
    }
    conn.close().await.unwrap();

    // A replica serves as it: a push and a pull through it.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data").display().to_string();
    let (_server, port) = serve(
        std::path::Path::new(env!("CARGO_BIN_EXE_mana-sync")),
        dir.path(),
        &[("DATABASE_URL", app.as_str()), ("DATA_DIR", data.as_str())],
    )
    .await;
    let token = common::process::local_token(dir.path(), "alice");
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    let id = format!("role-{}", free_port());
    let pushed = http
        .post(format!("{base}/sync/todo"))
        .bearer_auth(&token)
        .json(&json!({ "clientId": "c", "changes": [{ "table": "todos", "id": id, "op": "insert", "data": { "title": "x" } }] }))
        .send()
        .await
        .unwrap();
    assert_eq!(pushed.status(), 200, "{:?}", pushed.text().await);
    let pulled: Value = http
        .get(format!("{base}/sync/todo/pull?collection=todos"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let changes = pulled["serverChanges"].as_array().unwrap();
    assert!(changes.iter().any(|c| c["id"] == id.as_str()), "{pulled}");
}
