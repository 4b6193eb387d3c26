//! An answer given before the request was read in full (a body over the
//! limit, a refused origin) reaches a client that writes its whole request
//! before it reads anything, as Python's urllib and requests and many
//! mobile HTTP stacks do: the server closes lingering instead of resetting
//! the connection under the answer.

use crate::common;

use std::time::Duration;

use common::app::{APP, Backend, ORIGIN, Postgres, Sqlite, TestApp, both_stores};
use rstest::rstest;
use rstest_reuse::apply;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Over the 10 MB limit, like the 11 MB upload.
const ELEVEN_MB: usize = 11 * 1024 * 1024;

/// An answer as the client read it.
struct Answer {
    status: u16,
    /// Header lines, lower-cased.
    headers: Vec<String>,
    body: Value,
}

/// Writes `head` and all of `body`, and only then reads the answer, to the
/// end of the connection. Panics if the server breaks the connection.
async fn send_all_then_read(app: &TestApp, head: String, body: &[u8]) -> Answer {
    let mut socket = tokio::net::TcpStream::connect(app.address.trim_start_matches("http://"))
        .await
        .unwrap();
    let exchange = async {
        socket.write_all(head.as_bytes()).await.expect("the head is sent");
        socket
            .write_all(body)
            .await
            .expect("the whole body is sent without a broken pipe");
        let mut raw = Vec::new();
        socket
            .read_to_end(&mut raw)
            .await
            .expect("the answer is read without a reset");
        raw
    };
    let raw = tokio::time::timeout(Duration::from_secs(30), exchange)
        .await
        .expect("the exchange ends");
    let text = String::from_utf8(raw).expect("the answer is text");
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP answer");
    let mut lines = head.lines();
    let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    Answer {
        status,
        headers: lines.map(str::to_lowercase).collect(),
        body: serde_json::from_str(body).unwrap_or_else(|e| panic!("the body is not JSON ({e}): {body}")),
    }
}

/// A push's request head, with `extra` header lines.
fn push_head(extra: &str) -> String {
    format!(
        "POST /sync/{APP} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {}\r\nX-Client-Id: a\r\n\
         Content-Type: application/json\r\n{extra}\r\n",
        common::tokens::token_for("alice"),
    )
}

/// A JSON push of a little over `size` bytes: one insert with a long title.
fn push_of(size: usize) -> Vec<u8> {
    json!({ "clientId": "a", "changes": [{ "table": "todos", "id": "big", "op": "insert",
        "data": { "title": "x".repeat(size), "updatedAt": "2024-01-01T10:00:00Z" } }] })
    .to_string()
    .into_bytes()
}

fn assert_too_large(answer: &Answer) {
    assert_eq!(answer.status, 413, "{}", answer.body);
    assert_eq!(answer.body["code"], "payload_too_large");
    assert!(
        answer.headers.iter().any(|h| h == "connection: close"),
        "the connection is announced closed: {:?}",
        answer.headers
    );
}

#[apply(both_stores)]
async fn an_11_mb_body_sent_whole_before_reading_gets_the_413(store: Backend) {
    let app = store.spawn().await;
    let body = push_of(ELEVEN_MB);
    // Its length declared: refused before a byte of it is read.
    let declared = send_all_then_read(&app, push_head(&format!("Content-Length: {}\r\n", body.len())), &body).await;
    assert_too_large(&declared);
    // Chunked: refused once 10 MB have been read.
    let mut chunked = Vec::new();
    for chunk in body.chunks(64 * 1024) {
        chunked.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        chunked.extend_from_slice(chunk);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let streamed = send_all_then_read(&app, push_head("Transfer-Encoding: chunked\r\n"), &chunked).await;
    assert_too_large(&streamed);
    assert_eq!(app.log_rows().await, 0, "nothing is written");
    // The server goes on serving.
    app.push_ok("alice", "a", common::app::START, json!([])).await;
}

#[apply(both_stores)]
async fn any_early_refusal_of_a_request_with_a_body_reaches_the_client(store: Backend) {
    let app = store.spawn().await;
    // A page of an origin that is not allowed: refused before the body is read.
    let large = push_of(ELEVEN_MB);
    let refused = send_all_then_read(
        &app,
        push_head(&format!(
            "Origin: http://elsewhere.example\r\nContent-Length: {}\r\n",
            large.len()
        )),
        &large,
    )
    .await;
    assert_eq!(refused.status, 403, "{}", refused.body);
    assert_eq!(refused.body["code"], "forbidden");
    assert!(
        refused.headers.iter().any(|h| h == "connection: close"),
        "{:?}",
        refused.headers
    );
    let body = push_of(4 * 1024 * 1024);
    // The allowed origin gets its push recorded, on the same kind of exchange.
    let accepted = send_all_then_read(
        &app,
        push_head(&format!(
            "Origin: {ORIGIN}\r\nConnection: close\r\nContent-Length: {}\r\n",
            body.len()
        )),
        &body,
    )
    .await;
    assert_eq!(accepted.status, 200, "{}", accepted.body);
    assert_eq!(app.log_rows().await, 1, "only the allowed push is written");
}
