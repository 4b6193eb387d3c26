//! A full PostgreSQL restart: the listener comes back and sockets are told
//! to pull.

use crate::common;

use std::time::Duration;

use common::app::{START, insert, spawn_app};
use common::tokens;
use common::ws;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_database_restart_sockets_are_told_to_pull_and_notices_resume() {
    let _turn = crate::one_at_a_time().await;
    let app = spawn_app().await;
    app.push_ok("alice", "a", START, json!([insert("todos", "t", json!({}))]))
        .await;
    let mut socket = ws::authed(&app, "/ws/todo", &tokens::token_for("alice"), Some("phone")).await;
    ws::catch_up(&mut socket).await;

    common::pg::restart_server(Duration::from_millis(500)).await;

    ws::told_to_pull_then_notified_again(&app, &mut socket, Duration::from_secs(15)).await;
}
