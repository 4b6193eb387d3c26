//! A running server per test: its own database, its own JWKS, a random port.
//!
//! Tests that hold for any store apply the [`both_stores`] template and
//! run once per store (`name::store_1_Postgres`, `name::store_2_Sqlite`):
//!
//! ```ignore
//! use common::app::{Backend, Postgres, Sqlite, both_stores};
//! use rstest::rstest;
//! use rstest_reuse::apply;
//!
//! #[apply(both_stores)]
//! async fn name(store: Backend) {
//!     let app = store.spawn().await;
//! ```
//!
//! The template's attributes are expanded where it is applied, so that file
//! needs `rstest`, `Postgres` and `Sqlite` in scope.

use std::collections::HashMap;
use std::sync::Arc;

use mana_sync::config::Config;
use mana_sync::startup;
use mana_sync::state::AppState;
use mana_sync::store::Store;
use reqwest::StatusCode;
use rstest_reuse::template;
use serde_json::{Value, json};
use sqlx::{Connection, PgPool};

use super::pg::{self, TestDatabase};
use super::tokens::{self, JwksServer};

/// The app id the helpers push to.
pub const APP: &str = "todo";
/// The browser origin the test server allows.
pub const ORIGIN: &str = "http://app.example";

/// Which store a test's server uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// A database of its own on the harness's PostgreSQL.
    Postgres,
    /// A SQLite file in a temporary data directory of its own.
    Sqlite,
}

#[allow(unused_imports)]
pub use Backend::{Postgres, Sqlite};

// The dual-store template (see the module docs): one test per store, each
// on a runtime of two workers, as many as the machine has cores.
#[template]
#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
fn both_stores(#[values(Postgres, Sqlite)] store: Backend) {}

impl Backend {
    /// A server on this store with the default test settings.
    pub async fn spawn(self) -> TestApp {
        self.spawn_with(&[]).await
    }

    /// A server on this store with some settings overridden.
    pub async fn spawn_with(self, overrides: &[(&str, &str)]) -> TestApp {
        let storage = match self {
            Backend::Postgres => Storage::Postgres(Arc::new(pg::test_database().await)),
            Backend::Sqlite => Storage::Sqlite(Arc::new(tempfile::tempdir().expect("a temporary data directory"))),
        };
        start(storage, Arc::new(JwksServer::start_default().await), overrides).await
    }
}

/// Where a test server keeps its data; outlives the server when cloned.
#[derive(Clone)]
pub enum Storage {
    Postgres(Arc<TestDatabase>),
    /// The data directory (`DATABASE_URL` unset: the default SQLite file).
    Sqlite(Arc<tempfile::TempDir>),
}

impl Storage {
    /// The variables that point a server (or the binary) at this storage.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        match self {
            Storage::Postgres(db) => vec![("DATABASE_URL", db.app_url.clone())],
            Storage::Sqlite(dir) => vec![
                ("DATABASE_URL", String::new()),
                ("DATA_DIR", dir.path().display().to_string()),
            ],
        }
    }
}

pub struct TestApp {
    /// `http://127.0.0.1:<port>`
    pub address: String,
    pub http: reqwest::Client,
    pub storage: Storage,
    /// The server's own store handle (a SQLite file admits no second opener).
    pub store: Store,
    pub jwks: Arc<JwksServer>,
    pub config: Config,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

/// A server on PostgreSQL with the default test settings.
pub async fn spawn_app() -> TestApp {
    spawn_app_with(&[]).await
}

/// A server on PostgreSQL with some settings (environment variable names) overridden.
pub async fn spawn_app_with(overrides: &[(&str, &str)]) -> TestApp {
    Backend::Postgres.spawn_with(overrides).await
}

/// A server on `storage`: the settings it gets, then `overrides` ("" unsets one).
pub async fn start(storage: Storage, jwks: Arc<JwksServer>, overrides: &[(&str, &str)]) -> TestApp {
    let app = start_without_waiting(storage, jwks, overrides).await;
    app.wait_until_listening().await;
    app
}

/// A server on `storage`, listening, without waiting for its database.
pub async fn start_without_waiting(storage: Storage, jwks: Arc<JwksServer>, overrides: &[(&str, &str)]) -> TestApp {
    let config = test_config(&storage, &jwks, overrides);
    let state = AppState::connect(config.clone()).await.expect("the server starts");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a free port");
    let address = format!("http://{}", listener.local_addr().unwrap());
    let store = state.store.clone();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(startup::serve(
        state,
        listener,
        async {
            let _ = rx.await;
        },
        std::future::pending(),
    ));
    TestApp {
        address,
        http: reqwest::Client::new(),
        storage,
        store,
        jwks,
        config,
        shutdown: Some(tx),
        server: Some(server),
    }
}

/// The configuration of a test server on `storage`.
pub fn test_config(storage: &Storage, jwks: &JwksServer, overrides: &[(&str, &str)]) -> Config {
    let mut vars: HashMap<String, String> = HashMap::from([
        ("JWKS_URL".to_owned(), jwks.url.clone()),
        ("JWT_ISSUER".to_owned(), tokens::ISSUER.to_owned()),
        ("JWT_AUDIENCE".to_owned(), tokens::AUDIENCE.to_owned()),
        ("CORS_ORIGINS".to_owned(), ORIGIN.to_owned()),
        ("DATABASE_MAX_CONNECTIONS".to_owned(), "10".to_owned()),
        ("SHUTDOWN_TIMEOUT".to_owned(), "2s".to_owned()),
        // Tests and benchmarks send bursts no honest app sends; the rate
        // limits have tests of their own (tests/integration/throttle.rs).
        ("PUSH_RATE".to_owned(), "0".to_owned()),
        ("PUSH_BYTES_RATE".to_owned(), "0".to_owned()),
        ("MAX_REQUESTS_PER_USER".to_owned(), "0".to_owned()),
        ("ANSWER_BUDGET_PER_USER".to_owned(), "0".to_owned()),
        ("PULL_RATE".to_owned(), "0".to_owned()),
        ("OPEN_RATE".to_owned(), "0".to_owned()),
    ]);
    for (k, v) in storage.env() {
        vars.insert(k.to_owned(), v);
    }
    for (k, v) in overrides {
        vars.insert((*k).to_owned(), (*v).to_owned());
    }
    Config::from_lookup(|name| vars.get(name).cloned()).expect("test configuration is valid")
}

/// A body for `POST /sync/{appId}`.
pub fn push_body(client: &str, since: &str, changes: Value) -> Value {
    json!({ "clientId": client, "since": since, "changes": changes })
}

/// An insert of `data` (which should carry `updatedAt`).
pub fn insert(table: &str, id: &str, data: Value) -> Value {
    let mut data = data;
    data["id"] = json!(id);
    json!({ "table": table, "id": id, "op": "insert", "data": data })
}

/// An update of one field at `at`.
pub fn update(table: &str, id: &str, field: &str, value: Value, at: &str) -> Value {
    json!({ "table": table, "id": id, "op": "update", "fields": { field: { "value": value, "updatedAt": at } } })
}

pub fn delete(table: &str, id: &str, at: &str) -> Value {
    json!({ "table": table, "id": id, "op": "delete", "deletedAt": at })
}

pub const START: &str = "1970-01-01T00:00:00.000Z";

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.address, path)
    }

    /// `POST /sync/todo` as `user` from device `client`.
    pub async fn push(&self, user: &str, client: &str, body: &Value) -> reqwest::Response {
        self.http
            .post(self.url(&format!("/sync/{APP}")))
            .bearer_auth(tokens::token_for(user))
            .header("X-Client-Id", client)
            .json(body)
            .send()
            .await
            .expect("push request")
    }

    /// A push that must succeed; returns the response body.
    pub async fn push_ok(&self, user: &str, client: &str, since: &str, changes: Value) -> Value {
        let response = self.push(user, client, &push_body(client, since, changes)).await;
        expect_json(response, StatusCode::OK).await
    }

    /// `GET /sync/todo/pull` as `user` from a device of its own.
    pub async fn pull(&self, user: &str, collection: &str, since: &str, limit: Option<u32>) -> reqwest::Response {
        self.pull_from(user, "puller", collection, since, limit).await
    }

    /// A pull that must succeed, from device `client`.
    pub async fn pull_as(&self, user: &str, client: &str, collection: &str, since: &str, limit: Option<u32>) -> Value {
        expect_json(
            self.pull_from(user, client, collection, since, limit).await,
            StatusCode::OK,
        )
        .await
    }

    async fn pull_from(
        &self,
        user: &str,
        client: &str,
        collection: &str,
        since: &str,
        limit: Option<u32>,
    ) -> reqwest::Response {
        let mut query = vec![("collection", collection.to_owned()), ("since", since.to_owned())];
        if let Some(limit) = limit {
            query.push(("limit", limit.to_string()));
        }
        self.http
            .get(self.url(&format!("/sync/{APP}/pull")))
            .bearer_auth(tokens::token_for(user))
            .header("X-Client-Id", client)
            .query(&query)
            .send()
            .await
            .expect("pull request")
    }

    pub async fn pull_ok(&self, user: &str, collection: &str, since: &str, limit: Option<u32>) -> Value {
        expect_json(self.pull(user, collection, since, limit).await, StatusCode::OK).await
    }

    /// Follows `hasMore` to the end; returns every change and the final cursor.
    pub async fn pull_all(
        &self,
        user: &str,
        collection: &str,
        since: &str,
        limit: Option<u32>,
    ) -> (Vec<Value>, String) {
        let mut cursor = since.to_owned();
        let mut changes = Vec::new();
        loop {
            let page = self.pull_ok(user, collection, &cursor, limit).await;
            changes.extend(page["serverChanges"].as_array().unwrap().iter().cloned());
            cursor = page["syncedUntil"].as_str().unwrap().to_owned();
            if !page["hasMore"].as_bool().unwrap() {
                return (changes, cursor);
            }
        }
    }

    /// This test's PostgreSQL database (for PostgreSQL-only tests).
    pub fn db(&self) -> &Arc<TestDatabase> {
        match &self.storage {
            Storage::Postgres(db) => db,
            Storage::Sqlite(_) => panic!("a PostgreSQL-only helper used on a SQLite store"),
        }
    }

    /// A superuser pool on this test's database (bypasses RLS): for inspection.
    pub async fn admin(&self) -> PgPool {
        self.db().admin_pool().await
    }

    /// A portable `SELECT count(*) …` over every user's rows.
    pub async fn count(&self, sql: &'static str) -> i64 {
        match &self.store {
            Store::Postgres(_) => sqlx::query_scalar(sql).fetch_one(&self.admin().await).await.unwrap(),
            Store::Sqlite(store) => sqlx::query_scalar(sql).fetch_one(store.reader()).await.unwrap(),
        }
    }

    /// `POST /sync/todo` as `user` from device `client` under an `Idempotency-Key`.
    pub async fn keyed_push(&self, user: &str, client: &str, key: &str, body: &Value) -> reqwest::Response {
        self.http
            .post(self.url(&format!("/sync/{APP}")))
            .bearer_auth(tokens::token_for(user))
            .header("X-Client-Id", client)
            .header("Idempotency-Key", key)
            .json(body)
            .send()
            .await
            .expect("keyed push request")
    }

    /// A portable `SELECT <one bigint>` on this test's database, every user's rows.
    pub async fn scalar(&self, sql: &str) -> i64 {
        let sql = sqlx::AssertSqlSafe(sql.to_owned());
        match &self.store {
            Store::Postgres(_) => sqlx::query_scalar(sql).fetch_one(&self.admin().await).await.unwrap(),
            Store::Sqlite(store) => sqlx::query_scalar(sql).fetch_one(store.reader()).await.unwrap(),
        }
    }

    /// Bytes a table takes on disk, its indexes (and on PostgreSQL its
    /// TOAST) included: `pg_total_relation_size`, or SQLite's `dbstat`.
    pub async fn table_bytes(&self, table: &str) -> i64 {
        match &self.store {
            Store::Postgres(_) => {
                self.scalar(&format!("SELECT pg_total_relation_size('{table}')::bigint"))
                    .await
            }
            Store::Sqlite(_) => {
                self.scalar(&format!(
                    "SELECT coalesce(sum(pgsize), 0) FROM dbstat WHERE name = '{table}' OR name IN
                     (SELECT name FROM sqlite_schema WHERE type = 'index' AND tbl_name = '{table}')"
                ))
                .await
            }
        }
    }

    /// Rows in the change log, all users.
    pub async fn log_rows(&self) -> i64 {
        self.count("SELECT count(*) FROM sync_changes").await
    }

    /// Another replica: a second server on the same database and JWKS.
    pub async fn spawn_replica(&self, overrides: &[(&str, &str)]) -> TestApp {
        start(self.storage.clone(), self.jwks.clone(), overrides).await
    }

    /// Another replica on PostgreSQL; none on SQLite (one process), where
    /// `self` plays its part: `replica.as_ref().unwrap_or(&app)`.
    pub async fn another_replica(&self) -> Option<TestApp> {
        match self.storage {
            Storage::Postgres(_) => Some(self.spawn_replica(&[]).await),
            Storage::Sqlite(_) => None,
        }
    }

    /// `ws://…` for a path of this server.
    pub fn ws_url(&self, path: &str) -> String {
        format!("{}{}", self.address.replacen("http://", "ws://", 1), path)
    }

    /// Backend pids of this test database's connections named `application`
    /// (`mana-sync-listener`, `mana-sync-notifier`, ...).
    pub async fn backends(&self, application: &str) -> Vec<i32> {
        let admin = PgPool::connect(&pg::server_admin_url()).await.unwrap();
        sqlx::query_scalar("SELECT pid FROM pg_stat_activity WHERE application_name = $1 AND datname = $2")
            .bind(application)
            .bind(&self.db().name)
            .fetch_all(&admin)
            .await
            .unwrap()
    }

    /// Terminates those connections; returns how many there were.
    pub async fn terminate(&self, application: &str) -> usize {
        let admin = PgPool::connect(&pg::server_admin_url()).await.unwrap();
        let pids = self.backends(application).await;
        for pid in &pids {
            sqlx::query("SELECT pg_terminate_backend($1)")
                .bind(pid)
                .execute(&admin)
                .await
                .unwrap();
        }
        pids.len()
    }

    /// `GET /health`.
    pub async fn health(&self) -> Value {
        self.http
            .get(self.url("/health"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Makes the database refuse to store record `id` (a trigger raising an
    /// error), so a push containing it fails while being recorded.
    pub async fn refuse_record(&self, id: &str) {
        match &self.store {
            Store::Postgres(_) => {
                let admin = self.admin().await;
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "CREATE FUNCTION refuse_record() RETURNS trigger LANGUAGE plpgsql AS $$
                     BEGIN IF NEW.record_id = '{id}' THEN RAISE EXCEPTION 'refused'; END IF; RETURN NEW; END $$"
                )))
                .execute(&admin)
                .await
                .unwrap();
                sqlx::query(
                    "CREATE TRIGGER refuse_record BEFORE INSERT ON sync_records FOR EACH ROW EXECUTE FUNCTION refuse_record()",
                )
                .execute(&admin)
                .await
                .unwrap();
            }
            Store::Sqlite(store) => {
                let options = sqlx::sqlite::SqliteConnectOptions::new().filename(store.path());
                let mut conn = sqlx::SqliteConnection::connect_with(&options).await.unwrap();
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "CREATE TRIGGER refuse_record BEFORE INSERT ON sync_records WHEN NEW.record_id = '{id}'
                     BEGIN SELECT RAISE(ABORT, 'refused'); END"
                )))
                .execute(&mut conn)
                .await
                .unwrap();
                conn.close().await.unwrap();
            }
        }
    }

    /// Waits (up to 10 s) until `/health` says `ok`: the database answers
    /// and the change listener listens.
    pub async fn wait_until_listening(&self) -> Value {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let health = self.health().await;
            if health["status"] == "ok" {
                return health;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the server never became healthy: {health}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// Stops the server and waits for it to finish.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(server) = self.server.take() {
            server.await.expect("server task").expect("server ran cleanly");
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            server.abort();
        }
    }
}

/// Asserts the status and returns the JSON body.
pub async fn expect_json(response: reqwest::Response, status: StatusCode) -> Value {
    let actual = response.status();
    let text = response.text().await.expect("response body");
    assert_eq!(actual, status, "unexpected status; body: {text}");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("response is not JSON ({e}): {text}"))
}

/// Asserts a JSON error `{code, message}` with this status and code. The
/// message is for people: tests check the status and the stable code only.
pub async fn expect_error(response: reqwest::Response, status: StatusCode, code: &str) {
    let body = expect_json(response, status).await;
    assert_eq!(body["code"], json!(code), "unexpected error body: {body}");
    // A code the server sent is one the spec declares.
    serde_json::from_value::<mana_sync::protocol::ErrorCode>(body["code"].clone())
        .unwrap_or_else(|e| panic!("{code} is no ErrorCode: {e}"));
    assert!(body["message"].is_string(), "an error says what is wrong: {body}");
}

/// The change for record `id` in a response's `serverChanges`.
pub fn change_for<'a>(response: &'a Value, id: &str) -> Option<&'a Value> {
    response["serverChanges"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == json!(id))
}
