//! A WebSocket client for the tests (tokio-tungstenite).

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use super::app::TestApp;

pub type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// What the server sent next.
#[derive(Debug, PartialEq)]
pub enum Event {
    Json(Value),
    Closed(Option<u16>),
}

pub async fn connect(app: &TestApp, path: &str) -> Socket {
    tokio_tungstenite::connect_async(app.ws_url(path))
        .await
        .expect("WebSocket handshake")
        .0
}

pub async fn send(socket: &mut Socket, message: Value) {
    socket.send(Message::text(message.to_string())).await.expect("send");
}

/// The next JSON message or close, skipping protocol pings; `None` on timeout.
pub async fn next(socket: &mut Socket, wait: Duration) -> Option<Event> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, socket.next()).await {
            Err(_) => return None,
            Ok(None) | Ok(Some(Err(_))) => return Some(Event::Closed(None)),
            Ok(Some(Ok(Message::Text(text)))) => return Some(Event::Json(serde_json::from_str(&text).unwrap())),
            Ok(Some(Ok(Message::Close(frame)))) => return Some(Event::Closed(frame.map(|f| u16::from(f.code)))),
            Ok(Some(Ok(_))) => {}
        }
    }
}

/// The next JSON message, which must come within `wait`.
pub async fn expect_json(socket: &mut Socket, wait: Duration) -> Value {
    match next(socket, wait).await {
        Some(Event::Json(v)) => v,
        other => panic!("expected a message, got {other:?}"),
    }
}

/// The close code, which must come within `wait` (messages before it are skipped).
pub async fn expect_close(socket: &mut Socket, wait: Duration) -> Option<u16> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match next(socket, deadline - tokio::time::Instant::now()).await {
            Some(Event::Closed(code)) => return code,
            Some(Event::Json(_)) => {}
            None => panic!("the socket was not closed within {wait:?}"),
        }
    }
}

/// Connects, authenticates (optionally declaring a client id) and reads
/// `auth-ok`, nothing more: the catch-up that follows it is the caller's
/// to read ([`catch_up`]).
pub async fn authed(app: &TestApp, path: &str, token: &str, client_id: Option<&str>) -> Socket {
    let mut socket = connect(app, path).await;
    let mut auth = json!({ "type": "auth", "token": token });
    if let Some(client) = client_id {
        auth["clientId"] = json!(client);
    }
    send(&mut socket, auth).await;
    assert_eq!(
        expect_json(&mut socket, Duration::from_secs(5)).await["type"],
        "auth-ok"
    );
    socket
}

/// Reads the catch-up `sync-available` that the server sends right after
/// `auth-ok`. `/ws/{appId}` always sends one (naming no tables for a user
/// without records); `/ws` sends one per app the user has records in, so
/// none for a user without any.
pub async fn catch_up(socket: &mut Socket) -> Value {
    let message = expect_json(socket, Duration::from_secs(5)).await;
    assert_eq!(
        message["type"], "sync-available",
        "a catch-up follows auth-ok: {message}"
    );
    message
}

/// After notices may have been lost (listener down): `socket` (alice's, on
/// app `todo`, which has a `todos` table) is told to pull every table within
/// `wait`, the replica listens again, and a later push is notified.
pub async fn told_to_pull_then_notified_again(app: &TestApp, socket: &mut Socket, wait: Duration) {
    let told = expect_json(socket, wait).await;
    assert_eq!(
        told,
        json!({ "type": "sync-available", "appId": "todo", "tables": ["todos"] })
    );
    app.wait_until_listening().await;
    let later = json!([super::app::insert("notes", "later", json!({}))]);
    app.push_ok("alice", "laptop", super::app::START, later).await;
    assert_eq!(
        expect_json(socket, Duration::from_secs(1)).await["tables"],
        json!(["notes"])
    );
}
