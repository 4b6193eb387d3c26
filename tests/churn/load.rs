//! The churn itself: sockets opened and let go in every way, pushes cut
//! off at every point.

use super::*;

/// What a WebSocket does once open.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Opening {
    /// Authenticates as the real clients do, reads `auth-ok` and the catch-up.
    Authenticated,
    /// Sends nothing.
    Silent,
    /// Sends a frame that is not a message (answered with an error).
    Junk,
    /// Sends an `auth` with a token that is not one (answered, then closed by the server).
    BadToken,
}

/// How the client lets a WebSocket go.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Ending {
    /// A close frame, and the server's close read back.
    CloseFrame,
    /// The TCP stream dropped (FIN).
    Dropped,
    /// The TCP stream reset (RST).
    Reset,
}

/// One push of the load and how it is cut off.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Cut {
    /// Not: the answer is awaited, and must be a 200.
    None,
    /// The request is dropped after this long, answered or not.
    After(Duration),
    /// Half the body is sent, then the connection closed (reset if true):
    /// never recorded.
    HalfBody { reset: bool },
    /// The whole request is sent, then the connection closed (reset if
    /// true) without reading the answer.
    Unread { reset: bool },
}

pub(crate) struct Push {
    pub(crate) user: usize,
    pub(crate) ids: Vec<String>,
    pub(crate) cut: Cut,
}

/// A push of the load and what became of it.
pub(crate) struct Pushed {
    pub(crate) user: usize,
    pub(crate) ids: Vec<String>,
    pub(crate) outcome: Outcome,
}

/// What became of a push.
pub(crate) enum Outcome {
    Acknowledged,
    /// Cut off before its answer: it may or may not have been recorded.
    Unknown,
    /// Cut off before its body was whole: it must not have been recorded.
    NeverWhole,
}

pub(crate) async fn open(url: &str, opening: Opening, token: &str, device: usize) -> Socket {
    let (mut socket, _) = tokio_tungstenite::connect_async(url)
        .await
        .unwrap_or_else(|e| panic!("socket {device} ({opening:?}): handshake: {e}"));
    let message = match opening {
        Opening::Authenticated => json!({ "type": "auth", "token": token, "clientId": format!("device-{device}") }),
        Opening::Silent => return socket,
        Opening::Junk => json!("hello?"),
        Opening::BadToken => json!({ "type": "auth", "token": "not.a.token" }),
    };
    socket
        .send(Message::text(message.to_string()))
        .await
        .unwrap_or_else(|e| panic!("socket {device} ({opening:?}): send: {e}"));
    let expected: &[&str] = match opening {
        Opening::Authenticated => &["auth-ok", "sync-available"],
        _ => &["error"],
    };
    for kind in expected {
        let answer = match common::ws::next(&mut socket, WAIT).await {
            Some(Event::Json(answer)) => answer,
            other => panic!("socket {device} ({opening:?}): expected {kind}, got {other:?}"),
        };
        assert_eq!(answer["type"], *kind, "socket {device} ({opening:?}): {answer}");
    }
    socket
}

pub(crate) async fn end(mut socket: Socket, ending: Ending) {
    match ending {
        Ending::CloseFrame => {
            // The server may have closed first (a bad token): then this fails.
            if socket.close(None).await.is_ok() {
                while let Some(Event::Json(_)) = common::ws::next(&mut socket, WAIT).await {}
            }
        }
        Ending::Dropped => drop(socket),
        Ending::Reset => {
            if let MaybeTlsStream::Plain(tcp) = socket.get_ref() {
                tcp.set_zero_linger().unwrap();
            }
            drop(socket)
        }
    }
}

pub(crate) async fn push(server: &Server, http: &reqwest::Client, token: &str, push: &Push) -> Outcome {
    let changes: Vec<Value> = push
        .ids
        .iter()
        .map(|id| {
            insert(
                "todos",
                id,
                json!({ "title": "churn", "updatedAt": "2026-01-01T10:00:00.000Z" }),
            )
        })
        .collect();
    let body = push_body("churner", START, json!(changes));
    let request = || {
        http.post(server.url(&format!("/sync/{APP}")))
            .bearer_auth(token)
            .json(&body)
            .send()
    };
    match push.cut {
        Cut::None => {
            let response = request().await.expect("push answered");
            let status = response.status();
            let answer = response.text().await.unwrap();
            assert_eq!(status, StatusCode::OK, "push: {answer}");
            Outcome::Acknowledged
        }
        Cut::After(wait) => match tokio::time::timeout(wait, request()).await {
            Ok(response) => {
                let response = response.expect("push answered");
                assert_eq!(response.status(), StatusCode::OK, "push");
                Outcome::Acknowledged
            }
            Err(_) => Outcome::Unknown,
        },
        Cut::HalfBody { reset } => {
            let body = body.to_string();
            send_and_close(server.port, token, &body, body.len() / 2, reset).await;
            Outcome::NeverWhole
        }
        Cut::Unread { reset } => {
            let body = body.to_string();
            send_and_close(server.port, token, &body, body.len(), reset).await;
            Outcome::Unknown
        }
    }
}

/// Writes a push request announcing all of `body` but holding only its
/// first `sent` bytes, then closes the connection (FIN, or RST if `reset`).
pub(crate) async fn send_and_close(port: u16, token: &str, body: &str, sent: usize, reset: bool) {
    let request = format!(
        "POST /sync/{APP} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{}",
        body.len(),
        &body[..sent]
    );
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    tcp.write_all(request.as_bytes()).await.unwrap();
    if reset {
        tcp.set_zero_linger().unwrap();
    } else {
        tcp.shutdown().await.unwrap();
    }
}

/// Every record id of `user`'s `todos`, pulled page by page.
pub(crate) async fn pulled_ids(server: &Server, http: &reqwest::Client, token: &str) -> HashSet<String> {
    let mut ids = HashSet::new();
    let mut cursor = START.to_owned();
    loop {
        let response = http
            .get(server.url(&format!("/sync/{APP}/pull")))
            .bearer_auth(token)
            .query(&[("collection", "todos"), ("since", &cursor), ("limit", "5000")])
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "pull");
        let page: Value = response.json().await.unwrap();
        for change in page["serverChanges"].as_array().unwrap() {
            ids.insert(change["id"].as_str().unwrap().to_owned());
        }
        cursor = page["syncedUntil"].as_str().unwrap().to_owned();
        if page["hasMore"] != true {
            return ids;
        }
    }
}
