//! The test support can restart the local PostgreSQL (`pg::restart_server`).

use crate::common;

use std::time::{Duration, Instant};

use common::pg;
use sqlx::postgres::PgPoolOptions;
use sqlx::{AssertSqlSafe, PgPool};

/// `SELECT 1` on `pool`, retried while the server comes back (up to 10 s).
async fn select_one_retrying(pool: &PgPool) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(pool).await {
            Ok(v) => return v,
            Err(e) if Instant::now() >= deadline => panic!("SELECT 1 after the restart: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_server_keeps_data_and_accepts_new_connections() {
    let _turn = crate::one_at_a_time().await;
    // With TEST_DATABASE_URL (an external server) restart_server panics with
    // the reason: the test needs the local cluster. It never skips silently.
    let db = pg::test_database().await;

    let admin = db.admin_pool().await;
    sqlx::query("CREATE TABLE restart_probe (id int PRIMARY KEY, note text NOT NULL)")
        .execute(&admin)
        .await
        .unwrap();
    sqlx::query("INSERT INTO restart_probe VALUES (1, 'before the restart')")
        .execute(&admin)
        .await
        .unwrap();
    sqlx::query(AssertSqlSafe(format!(
        "GRANT SELECT ON restart_probe TO {}",
        pg::APP_ROLE
    )))
    .execute(&admin)
    .await
    .unwrap();
    admin.close().await;

    // A pool with a live connection that the restart will break.
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(5))
        .connect(&db.app_url)
        .await
        .unwrap();
    assert_eq!(
        sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(&pool).await.unwrap(),
        1
    );

    let started = Instant::now();
    pg::restart_server(Duration::from_millis(500)).await;
    let took = started.elapsed();
    eprintln!("restart_server(500ms) took {took:?}");
    assert!(took >= Duration::from_millis(500), "restart returned after {took:?}");

    // The old pool recovers once its broken connection is discarded.
    assert_eq!(select_one_retrying(&pool).await, 1);

    // A fresh pool works, and the data committed before the restart is there.
    let fresh = db.app_pool().await;
    assert_eq!(select_one_retrying(&fresh).await, 1);
    let note: String = sqlx::query_scalar("SELECT note FROM restart_probe WHERE id = 1")
        .fetch_one(&fresh)
        .await
        .unwrap();
    assert_eq!(note, "before the restart");

    // Restarting again (no downtime) works too.
    let started = Instant::now();
    pg::restart_server(Duration::ZERO).await;
    eprintln!("restart_server(0) took {:?}", started.elapsed());
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM restart_probe")
        .fetch_one(&db.admin_pool().await)
        .await
        .unwrap();
    assert_eq!(rows, 1);

    pool.close().await;
    fresh.close().await;
}
