//! Tenant isolation: every read and write is scoped to the token's user,
//! and row-level security holds even for a query that forgets its filter.

use crate::common;

use common::app::{Backend, Postgres, Sqlite, both_stores};
use rstest::rstest;
use rstest_reuse::apply;

use common::app::{START, change_for, insert, spawn_app, update};
use serde_json::json;

#[apply(both_stores)]
async fn another_user_can_neither_read_nor_overwrite_knowing_the_ids(store: Backend) {
    let app = store.spawn().await;
    app.push_ok(
        "alice",
        "a",
        START,
        json!([insert(
            "todos",
            "secret",
            json!({ "title": "alice's", "updatedAt": "2024-01-01T10:00:00Z" })
        )]),
    )
    .await;

    let mallory = app.pull_ok("mallory", "todos", START, None).await;
    assert_eq!(mallory["serverChanges"], json!([]), "mallory sees nothing of alice's");

    let pushed = app
        .push_ok(
            "mallory",
            "m",
            START,
            json!([update(
                "todos",
                "secret",
                "title",
                json!("pwned"),
                "2030-01-01T00:00:00Z"
            )]),
        )
        .await;
    assert_eq!(
        change_for(&pushed, "secret").unwrap()["data"],
        json!({ "id": "secret", "title": "pwned" }),
        "mallory only wrote her own record"
    );

    let alice = app.pull_ok("alice", "todos", START, None).await;
    assert_eq!(change_for(&alice, "secret").unwrap()["data"]["title"], "alice's");
    assert_eq!(alice["serverChanges"].as_array().unwrap().len(), 1);
}

/// Quotes and backslashes in a user id (a token's `sub`) neither break
/// out of nor blur its scope (PostgreSQL writes the id into the statement
/// that begins each transaction).
#[apply(both_stores)]
async fn user_ids_with_quotes_and_backslashes_are_users_like_any_other(store: Backend) {
    let app = store.spawn().await;
    let users = [
        "o'brien",
        r"back\slash",
        r"o\'brien",
        r"x'); SELECT set_config('mana_sync.user_id', 'alice', true); --",
        "alice",
    ];
    for (i, user) in users.iter().enumerate() {
        let record = json!({ "title": format!("of {user}"), "updatedAt": "2024-01-01T10:00:00Z" });
        app.push_ok(user, "d", START, json!([insert("todos", &format!("r{i}"), record)]))
            .await;
    }
    for (i, user) in users.iter().enumerate() {
        let pulled = app.pull_ok(user, "todos", START, None).await;
        assert_eq!(
            pulled["serverChanges"].as_array().unwrap().len(),
            1,
            "{user} sees only their own record"
        );
        assert_eq!(
            change_for(&pulled, &format!("r{i}")).unwrap()["data"]["title"],
            format!("of {user}")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_level_security_hides_other_users_rows_from_unfiltered_queries() {
    let app = spawn_app().await;
    app.push_ok(
        "alice",
        "a",
        START,
        json!([insert("todos", "a1", json!({})), insert("todos", "a2", json!({}))]),
    )
    .await;
    app.push_ok("bob", "b", START, json!([insert("todos", "b1", json!({}))]))
        .await;

    let pool = app.db().app_pool().await;
    let count_as = |user: Option<&'static str>| {
        let pool = pool.clone();
        async move {
            let mut tx = match user {
                Some(u) => mana_sync::store::postgres::begin_for(&pool, u).await.unwrap(),
                None => pool.begin().await.unwrap(),
            };
            let changes: i64 = sqlx::query_scalar("SELECT count(*) FROM sync_changes")
                .fetch_one(&mut *tx)
                .await
                .unwrap();
            let records: i64 = sqlx::query_scalar("SELECT count(*) FROM sync_records")
                .fetch_one(&mut *tx)
                .await
                .unwrap();
            let clocks: i64 = sqlx::query_scalar("SELECT count(*) FROM sync_clocks")
                .fetch_one(&mut *tx)
                .await
                .unwrap();
            (changes, records, clocks)
        }
    };
    assert_eq!(count_as(Some("alice")).await, (2, 2, 1));
    assert_eq!(count_as(Some("bob")).await, (1, 1, 1));
    assert_eq!(count_as(None).await, (0, 0, 0), "an unscoped query sees nothing");

    // Writing another user's rows is refused by the policy.
    let mut tx = mana_sync::store::postgres::begin_for(&pool, "bob").await.unwrap();
    let forged = sqlx::query(
        "INSERT INTO sync_records (user_id, app_id, table_name, record_id, fields, created_seq, touched_seq)
         VALUES ('alice', 'todo', 'todos', 'x', '{}', 1, 1)",
    )
    .execute(&mut *tx)
    .await;
    let refused = forged.expect_err("bob cannot insert a row for alice");
    assert_eq!(
        refused.as_database_error().and_then(|e| e.code()).as_deref(),
        Some("42501"),
        "refused by the policy (insufficient_privilege): {refused}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_change_log_cannot_be_rewritten_by_the_server_role() {
    let app = spawn_app().await;
    app.push_ok(
        "alice",
        "a",
        START,
        json!([insert("todos", "a1", json!({ "title": "original" }))]),
    )
    .await;
    let pool = app.db().app_pool().await;
    let mut tx = mana_sync::store::postgres::begin_for(&pool, "alice").await.unwrap();
    let updated = sqlx::query("UPDATE sync_changes SET data = '{}'")
        .execute(&mut *tx)
        .await
        .unwrap()
        .rows_affected();
    let deleted = sqlx::query("DELETE FROM sync_changes")
        .execute(&mut *tx)
        .await
        .unwrap()
        .rows_affected();
    assert_eq!((updated, deleted), (0, 0), "the log is append-only");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_maintenance_setting_only_lists_users_and_opens_no_data() {
    let app = spawn_app().await;
    app.push_ok("alice", "a", START, json!([insert("todos", "a1", json!({}))]))
        .await;
    let pool = app.db().app_pool().await;
    let mut tx = mana_sync::store::postgres::begin_for(&pool, "bob").await.unwrap();
    sqlx::query("SELECT set_config('mana_sync.maintenance', 'on', true)")
        .execute(&mut *tx)
        .await
        .unwrap();
    let users: Vec<String> = sqlx::query_scalar("SELECT user_id FROM sync_clocks")
        .fetch_all(&mut *tx)
        .await
        .unwrap();
    assert_eq!(
        users,
        vec!["alice".to_owned()],
        "the list of users is visible to maintenance"
    );
    for table in ["sync_changes", "sync_records", "sync_idempotency"] {
        let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        assert_eq!(n, 0, "{table} stays closed");
    }
    let touched = sqlx::query("UPDATE sync_clocks SET last_seq = 0")
        .execute(&mut *tx)
        .await
        .unwrap()
        .rows_affected();
    assert_eq!(touched, 0, "alice's clock cannot be written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outcome_sweep_sees_and_deletes_expired_outcomes_only() {
    let app = spawn_app().await;
    for key in ["old", "new"] {
        let body = common::app::push_body("a", START, json!([insert("todos", key, json!({}))]));
        assert!(app.keyed_push("alice", "a", key, &body).await.status().is_success());
    }
    let admin = app.admin().await;
    sqlx::query("UPDATE sync_idempotency SET created_at = now() - interval '2 hours' WHERE idempotency_key = 'old'")
        .execute(&admin)
        .await
        .unwrap();
    let pool = app.db().app_pool().await;
    let mut tx = mana_sync::store::postgres::begin_for(&pool, "bob").await.unwrap();
    sqlx::query(
        "SELECT set_config('mana_sync.maintenance', 'on', true), set_config('mana_sync.outcome_ttl', '3600', true)",
    )
    .execute(&mut *tx)
    .await
    .unwrap();
    let seen: Vec<String> = sqlx::query_scalar("SELECT idempotency_key FROM sync_idempotency")
        .fetch_all(&mut *tx)
        .await
        .unwrap();
    assert_eq!(seen, vec!["old".to_owned()], "only the expired outcome is visible");
    let deleted = sqlx::query("DELETE FROM sync_idempotency")
        .execute(&mut *tx)
        .await
        .unwrap()
        .rows_affected();
    assert_eq!(deleted, 1, "only the expired outcome can be deleted");
    for table in ["sync_changes", "sync_records"] {
        let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        assert_eq!(n, 0, "{table} stays closed");
    }
    let updated = sqlx::query("UPDATE sync_idempotency SET first_seq = 0")
        .execute(&mut *tx)
        .await
        .unwrap()
        .rows_affected();
    assert_eq!(updated, 0, "no outcome can be rewritten");
    tx.commit().await.unwrap();
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM sync_idempotency")
        .fetch_one(&admin)
        .await
        .unwrap();
    assert_eq!(left, 1);
}
