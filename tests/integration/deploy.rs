//! What `deploy/` gives an operator, checked here where no Docker engine
//! runs: the Dockerfile passes hadolint (pinned in
//! `tests/deploy/requirements.txt`, installed into `.venv-deploy` by
//! `scripts/test`), and `deploy/init-role.sql` makes a database whose serving
//! role can sync but owns nothing, bypasses no row-level security and
//! cannot change the schema, while the owner role migrates it; and
//! `deploy/smoke.sh` (the load-balanced replicas) passes.

use crate::common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::process::{deploy_tool, repository, serve};
use common::{free_port, pg};
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection};

/// Runs the `.venv-deploy` tool `name` with `args` and the repository
/// file `file` last; its standard output, or a failure that says `fault`
/// with everything the tool printed.
fn check(name: &str, args: &[&str], file: &str, fault: &str) -> Vec<u8> {
    let output = Command::new(deploy_tool(name))
        .args(args)
        .arg(repository().join(file))
        .output()
        .unwrap_or_else(|e| panic!("cannot run {name}: {e}"));
    assert!(
        output.status.success(),
        "{file}: {fault}:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output.stdout
}

#[test]
fn the_dockerfile_passes_hadolint() {
    check(
        "hadolint",
        &["--no-color"],
        "deploy/Dockerfile",
        "hadolint found problems",
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
        "ALTER TABLE sync_records RESET (autovacuum_vacuum_scale_factor)",
        // The migration history: readable (a replica checks nothing is
        // pending), not writable (the next migrate would trust it).
        "DELETE FROM _sqlx_migrations",
        "UPDATE _sqlx_migrations SET checksum = ''",
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) VALUES (1, 'x', true, '', 0)",
    ] {
        let refused = sqlx::raw_sql(ddl).execute(&mut conn).await;
        let code = refused
            .as_ref()
            .err()
            .and_then(|e| e.as_database_error())
            .and_then(|e| e.code().map(|c| c.into_owned()));
        // insufficient_privilege, not any other failure.
        assert_eq!(code.as_deref(), Some("42501"), "{ddl}: {refused:?}");
    }
    let history: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(history as usize, mana_sync::store::postgres::MIGRATOR.iter().count());
    // The update-heavy projection is vacuumed early.
    let options: Vec<String> =
        sqlx::query_scalar("SELECT unnest(reloptions) FROM pg_class WHERE oid = 'sync_records'::regclass")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    assert!(
        options.contains(&"autovacuum_vacuum_scale_factor=0.05".to_owned()),
        "{options:?}"
    );
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

/// `deploy/smoke.sh`, as an operator runs it: the release build behind
/// Debian's nginx (tests/integration/balanced.rs holds its checks). Its output is
/// printed, and every check it promises must have been made.
#[test]
fn the_smoke_script_passes() {
    let output = common::process::outside_cargo("bash")
        .arg("deploy/smoke.sh")
        .output()
        .expect("run deploy/smoke.sh");
    let stdout = String::from_utf8_lossy(&output.stdout);
    println!("{stdout}");
    assert!(
        output.status.success(),
        "deploy/smoke.sh failed:\n{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for check in [
        "then a pull through it returned all 6 records",
        "told of a push served by each of the 3 replicas",
        "a change streamed through nginx",
        "its /ready answered 503 after",
        "its 2 sockets closed with 1012 and connected again through nginx",
        "before and while one replica stopped, 0 missing",
        "rolling restart of all 3 replicas",
        "2 passed",
        "smoke: passed",
    ] {
        assert!(
            stdout.contains(check),
            "deploy/smoke.sh did not check `{check}`:\n{stdout}"
        );
    }
}

/// A YAML file of `deploy/` as JSON (through PyYAML, in `.venv-deploy`).
fn yaml(path: &str) -> Value {
    let script = "import json, sys, yaml; json.dump(yaml.safe_load(open(sys.argv[1])), sys.stdout)";
    serde_json::from_slice(&check("python", &["-c", script], path, "not YAML")).unwrap()
}

#[test]
fn the_compose_file_follows_the_compose_specification() {
    check(
        "check-jsonschema",
        &["--builtin-schema", "vendor.compose-spec"],
        "deploy/docker-compose.yml",
        "breaks the compose specification",
    );
}

/// The compose file's parts agree: nginx balances and Prometheus scrapes
/// exactly its replicas, the replicas' spans go to its collector, which
/// sends them to its Jaeger, only the migration connects as the owner,
/// and Docker waits out the server's shutdown before it kills.
#[test]
fn the_compose_files_parts_name_each_other() {
    let compose = yaml("deploy/docker-compose.yml");
    let services = compose["services"].as_object().unwrap();
    let replicas: Vec<&String> = services.keys().filter(|name| name.starts_with("sync-")).collect();
    assert_eq!(replicas.len(), 3, "{replicas:?}");
    let on_port = |names: &[&String]| -> Vec<String> { names.iter().map(|n| format!("{n}:3050")).collect() };

    let nginx = std::fs::read_to_string(repository().join("deploy/nginx/nginx.conf")).unwrap();
    let upstream: Vec<String> = nginx
        .lines()
        .filter_map(|line| line.trim().strip_prefix("server ")?.split_whitespace().next())
        // `server host:port …;`, not the `server {` block.
        .filter(|address| address.contains(':'))
        .map(str::to_owned)
        .collect();
    assert_eq!(upstream, on_port(&replicas), "nginx.conf's upstream");
    let prometheus = yaml("deploy/prometheus.yml");
    assert_eq!(
        prometheus["scrape_configs"][0]["static_configs"][0]["targets"],
        json!(on_port(&replicas)),
        "prometheus.yml's targets"
    );

    let collector = yaml("deploy/otel-collector.yaml");
    let host = |url: &str| url::Url::parse(&format!("http://{}", url.trim_start_matches("http://"))).unwrap();
    let exported = host(collector["exporters"]["otlp/jaeger"]["endpoint"].as_str().unwrap());
    assert!(
        services.contains_key(exported.host_str().unwrap()),
        "the collector exports to {exported}"
    );
    for name in &replicas {
        let replica = &services[name.as_str()];
        let env = &replica["environment"];
        let endpoint = host(env["OTEL_EXPORTER_OTLP_ENDPOINT"].as_str().unwrap());
        assert!(
            services.contains_key(endpoint.host_str().unwrap()),
            "{name} sends spans to {endpoint}"
        );
        assert_eq!(endpoint.port(), Some(4318), "{name}: the collector's OTLP/HTTP port");
        assert!(
            env["DATABASE_URL"]
                .as_str()
                .unwrap()
                .starts_with("postgres://mana_sync:"),
            "{name}"
        );
        let grace = humantime::parse_duration(replica["stop_grace_period"].as_str().unwrap()).unwrap();
        assert!(
            grace >= Duration::from_secs(45),
            "{name}: Docker kills it after {grace:?}"
        );
    }
    let migrate = &services["migrate"];
    assert_eq!(migrate["command"], json!(["migrate"]));
    assert!(
        migrate["environment"]["DATABASE_URL"]
            .as_str()
            .unwrap()
            .starts_with("postgres://mana_sync_owner:")
    );
}
