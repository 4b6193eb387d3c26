//! WebSockets: `GET /ws/{appId}` (one app, the seed's form) and `GET /ws`
//! (every app of the user).
//!
//! Protocol (JSON text frames):
//! - C→S `{"type":"auth","token":"<jwt>","clientId":"<optional>"}` within 10 s
//!   of connecting, and again at any time with a fresh token.
//! - S→C `{"type":"auth-ok"}`, then at once a `sync-available` naming every
//!   table (a client that reconnected after a gap catches up).
//! - S→C `{"type":"sync-available","appId":"todo","tables":["todos"]}` when
//!   another device of the user pushed, on any replica.
//! - C→S `{"type":"ping"}` → S→C `{"type":"pong"}`.
//! - S→C `{"type":"error","message":"..."}` for anything else.
//!
//! A socket declares its device with `clientId` in `auth` (or `?clientId=`
//! on the URL); that device's own pushes are then not echoed to it.
//!
//! Close codes: 1008 no or bad authentication within 10 s (or more than
//! [`MAX_UNAUTHENTICATED_FRAMES`] frames before it), a different user's
//! token, or too many sockets for the user; 1013 the replica is full; 1012
//! the replica is shutting down (reconnect elsewhere); 4001 the token
//! expired without renewal (authenticate again); 1002 a frame breaking the
//! WebSocket protocol; 1007 a text frame that is not UTF-8; 1009 a message
//! over 64 KiB; 1011 server fault.
//!
//! What the server queues to send is bounded ([`SOCKET_WRITE_BUFFER_BYTES`])
//! and every send has a deadline ([`SEND_TIMEOUT`]): a client that does not
//! read what it is sent, its pongs included, is dropped.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use poem::web::websocket::{CloseCode, Message, WebSocket, WebSocketConfig, WebSocketStream};
use poem::web::{Data, Path, Query};
use poem::{IntoResponse, handler};
use serde::{Deserialize, Serialize};
use tokio::time::{Instant, sleep_until, timeout};

use crate::api::error::{Answer, retry_after};
use crate::error::Error;
use crate::hub::Refusal;
use crate::protocol::MAX_SOCKET_MESSAGE_BYTES;
use crate::state::AppState;
use crate::throttle::Action;
use crate::validate;

/// A socket that has not authenticated by then is closed.
pub const AUTH_TIMEOUT: Duration = Duration::from_secs(10);
/// A send that takes longer means a dead or hopelessly slow client (or
/// one that does not read): drop it.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the server pings a quiet socket (a protocol Ping frame).
const KEEPALIVE: Duration = Duration::from_secs(30);
/// A socket silent for this long (no frame, not even a Pong) is dead: dropped.
const SILENCE_LIMIT: Duration = Duration::from_secs(75);
/// Close code for a token that expired without renewal.
pub const TOKEN_EXPIRED: u16 = 4001;

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
enum ClientMessage {
    Auth {
        token: String,
        #[serde(rename = "clientId")]
        client_id: Option<String>,
    },
    Ping,
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
enum ServerMessage<'a> {
    AuthOk,
    SyncAvailable {
        #[serde(rename = "appId")]
        app_id: &'a str,
        tables: Vec<String>,
    },
    Pong,
    Error {
        message: &'a str,
    },
}

impl ServerMessage<'_> {
    fn frame(&self) -> Message {
        Message::text(serde_json::to_string(self).expect("server messages serialise"))
    }
}

#[derive(Deserialize)]
pub struct SocketParams {
    #[serde(rename = "clientId")]
    client_id: Option<String>,
}

/// `GET /ws/{appId}`: notifications for one app.
#[handler]
pub async fn app_socket(
    Path(app_id): Path<String>,
    Query(params): Query<SocketParams>,
    ws: WebSocket,
    Data(state): Data<&AppState>,
) -> poem::Result<impl IntoResponse> {
    validate::name("appId", &app_id).map_err(Answer::from)?;
    let state = state.clone();

    Ok(limited(ws).on_upgrade(move |socket| session(socket, state, Some(app_id), params.client_id)))
}

/// `GET /ws`: notifications for every app of the user.
#[handler]
pub async fn user_socket(
    Query(params): Query<SocketParams>,
    ws: WebSocket,
    Data(state): Data<&AppState>,
) -> impl IntoResponse {
    let state = state.clone();
    limited(ws).on_upgrade(move |socket| session(socket, state, None, params.client_id))
}

/// A client sends only small messages (`auth`): anything larger, before
/// or after authentication, ends the socket before it is buffered. The
/// read buffer is small too: tungstenite's default (128 KiB, zeroed, so
/// resident) would cost each of thousands of idle sockets that much.
///
/// What waits to be sent is bounded: tungstenite queues a pong for every
/// ping it reads, and with its default (no bound) a client that sends
/// pings and never reads made the server hold each pong (200 MB for a
/// million pings). Writes go out at once (no batching buffer), so the
/// queue holds only what the client has not taken.
fn limited(ws: WebSocket) -> WebSocket {
    ws.config(
        WebSocketConfig::default()
            .read_buffer_size(SOCKET_READ_BUFFER_BYTES)
            .write_buffer_size(0)
            .max_write_buffer_size(SOCKET_WRITE_BUFFER_BYTES)
            .max_message_size(Some(MAX_SOCKET_MESSAGE_BYTES))
            .max_frame_size(Some(MAX_SOCKET_MESSAGE_BYTES)),
    )
}

/// The most a socket queues to send: past it, tungstenite keeps only the
/// latest pong, and a message is refused (the socket ends). Every message
/// the server sends is far smaller ([`notices::NOTICE_NAMES_BYTES`]
/// bounds the largest), and each send waits until the message is written.
pub const SOCKET_WRITE_BUFFER_BYTES: usize = 128 * 1024;

/// Frames a client may send before it authenticates (an honest one sends
/// `auth`, perhaps after a `ping` or two): past it the socket is closed
/// with 1008, so an unauthenticated socket costs a bounded amount of work.
pub const MAX_UNAUTHENTICATED_FRAMES: u32 = 16;

/// What a socket reads at a time, and keeps allocated (zeroed, so
/// resident) while it waits. A client's frames are small: `ping`, and an
/// `auth` of a kilobyte or two, which takes a few reads (tungstenite
/// makes room for a whole frame once it has read its header).
const SOCKET_READ_BUFFER_BYTES: usize = 512;

mod notices;

use self::notices::notify;

type Sink = futures_util::stream::SplitSink<WebSocketStream, Message>;

async fn send(sink: &mut Sink, message: Message) -> bool {
    matches!(timeout(SEND_TIMEOUT, sink.send(message)).await, Ok(Ok(())))
}

/// Writes out what is queued: after a client's Ping, the pong tungstenite
/// queued for it. A client that does not take it within [`SEND_TIMEOUT`]
/// does not read: false, and the socket is dropped (no close frame could
/// reach it).
async fn flushed(sink: &mut Sink) -> bool {
    matches!(timeout(SEND_TIMEOUT, sink.flush()).await, Ok(Ok(())))
}

/// The close code for a frame that could not be read because the client
/// broke the protocol; `None` when the connection itself failed (nothing
/// can be sent then). poem hands tungstenite's errors over as I/O errors
/// of kind `Other` carrying only their text, so the text decides.
fn violation(error: &std::io::Error) -> Option<CloseCode> {
    if error.kind() != std::io::ErrorKind::Other {
        return None;
    }
    let text = error.to_string();
    if text.starts_with("Space limit exceeded") {
        Some(CloseCode::Size)
    } else if text.starts_with("WebSocket protocol error") {
        Some(CloseCode::Protocol)
    } else if text.starts_with("UTF-8 encoding error") {
        Some(CloseCode::Invalid)
    } else {
        None
    }
}

/// Ends a socket whose frame could not be read: with the code saying why,
/// when the client broke the protocol.
async fn broken(sink: &mut Sink, error: &std::io::Error) {
    if let Some(code) = violation(error) {
        let reason = match code {
            CloseCode::Size => "message too big",
            CloseCode::Invalid => "text is not UTF-8",
            _ => "protocol error",
        };
        close(sink, code, reason).await;
    }
}

async fn close(sink: &mut Sink, code: CloseCode, reason: &str) {
    let _ = timeout(SEND_TIMEOUT, sink.send(Message::close_with(code, reason))).await;
}

/// Closes a socket the hub refused (or no longer holds), with the code
/// that tells the client what to do.
async fn refuse(sink: &mut Sink, refusal: Refusal) {
    let code = match refusal {
        Refusal::UserLimit => CloseCode::Policy,
        Refusal::ServerLimit => CloseCode::Again,
        Refusal::ShuttingDown => CloseCode::Restart,
    };
    close(sink, code, &refusal.to_string()).await
}

async fn session(socket: WebSocketStream, state: AppState, app_id: Option<String>, declared: Option<String>) {
    let (mut sink, mut stream) = socket.split();
    let hub = state.hub.clone();

    // Authentication, within AUTH_TIMEOUT.
    // Every failed send ends the socket: a client that does not read is
    // not answered further.
    let deadline = Instant::now() + AUTH_TIMEOUT;
    let mut frames = 0;
    let (mut user, client_id) = loop {
        tokio::select! {
            _ = sleep_until(deadline) => return close(&mut sink, CloseCode::Policy, "authentication timeout").await,
            _ = hub.closing() => return refuse(&mut sink, Refusal::ShuttingDown).await,
            message = stream.next() => {
                frames += 1;
                if frames > MAX_UNAUTHENTICATED_FRAMES && matches!(message, Some(Ok(_))) {
                    return close(&mut sink, CloseCode::Policy, "too many messages before authentication").await;
                }
                match message {
                    Some(Ok(Message::Text(text))) => match serde_json::from_str::<ClientMessage>(&text) {
                        Ok(ClientMessage::Auth { token, client_id }) => match Box::pin(state.verify(&token)).await {
                            Ok(user) => break (user, client_id.or_else(|| declared.clone())),
                            Err(e) => {
                                if send(&mut sink, ServerMessage::Error { message: &e.to_string() }.frame()).await {
                                    close(&mut sink, CloseCode::Policy, "invalid token").await;
                                }
                                return;
                            }
                        },
                        Ok(ClientMessage::Ping) => {
                            if !send(&mut sink, ServerMessage::Pong.frame()).await {
                                return;
                            }
                        }
                        Err(_) => {
                            let hint = ServerMessage::Error { message: "authenticate first: {\"type\":\"auth\",\"token\":\"<jwt>\"}" };
                            if !send(&mut sink, hint.frame()).await {
                                return;
                            }
                        }
                    },
                    Some(Ok(Message::Ping(_))) => {
                        if !flushed(&mut sink).await {
                            return;
                        }
                    }
                    Some(Ok(Message::Close(_))) | None => return,
                    Some(Err(e)) => return broken(&mut sink, &e).await,
                    Some(Ok(_)) => {}
                }
            }
        }
    };

    if let Err(Error::RateLimited(wait)) = state.throttle.check(Action::Open, &user.id) {
        let reason = format!("too many sockets opened; retry in {} s", retry_after(wait));
        return close(&mut sink, CloseCode::Again, &reason).await;
    }
    let subscription = match hub.subscribe(&user.id, app_id.as_deref(), client_id.as_deref()) {
        Ok(s) => s,
        Err(refusal) => return refuse(&mut sink, refusal).await,
    };
    if !send(&mut sink, ServerMessage::AuthOk.frame()).await {
        return;
    }
    // The client may have missed notices while it was away.
    subscription.subscriber.mark_all();
    let mut keepalive = tokio::time::interval(KEEPALIVE);
    keepalive.reset();
    let mut heard = Instant::now();
    // Made once, not at every turn of the loop: a notice then wakes the
    // socket without setting a new timer and watch for it.
    let closing = hub.closing();
    let expiry = sleep_until(user.expiry());
    tokio::pin!(closing, expiry);

    loop {
        tokio::select! {
            _ = keepalive.tick() => {
                // A half-open connection would otherwise hold a slot of the
                // user's socket limit until its token expires.
                if heard.elapsed() > SILENCE_LIMIT || !send(&mut sink, Message::ping(Vec::new())).await {
                    return;
                }
            }
            () = &mut closing => return refuse(&mut sink, Refusal::ShuttingDown).await,
            () = &mut expiry => return close(&mut sink, CloseCode::from(TOKEN_EXPIRED), "token expired").await,
            _ = subscription.subscriber.changed() => {
                if !Box::pin(notify(&mut sink, &state, &subscription)).await {
                    return;
                }
            }
            message = stream.next() => match message.inspect(|_| heard = Instant::now()) {
                Some(Ok(Message::Text(text))) => match serde_json::from_str::<ClientMessage>(&text) {
                    Ok(ClientMessage::Auth { token, .. }) => match Box::pin(state.verify(&token)).await {
                        Ok(renewed) if renewed.id == user.id => {
                            user = renewed;
                            expiry.as_mut().reset(user.expiry());
                            if !send(&mut sink, ServerMessage::AuthOk.frame()).await {
                                return;
                            }
                        }
                        Ok(_) => return close(&mut sink, CloseCode::Policy, "a socket cannot change user").await,
                        Err(e) => {
                            // The current token stays valid until it expires.
                            if !send(&mut sink, ServerMessage::Error { message: &e.to_string() }.frame()).await {
                                return;
                            }
                        }
                    },
                    Ok(ClientMessage::Ping) => {
                        if !send(&mut sink, ServerMessage::Pong.frame()).await {
                            return;
                        }
                    }
                    Err(_) => {
                        if !send(&mut sink, ServerMessage::Error { message: "unknown message; expected auth or ping" }.frame()).await {
                            return;
                        }
                    }
                },
                Some(Ok(Message::Ping(_))) => {
                    if !flushed(&mut sink).await {
                        return;
                    }
                }
                Some(Ok(Message::Close(_))) | None => return,
                Some(Err(e)) => return broken(&mut sink, &e).await,
                Some(Ok(_)) => {}
            },
        }
    }
}

#[cfg(test)]
mod tests {
    /// The size of what `f` returns: here, a future's state, which its
    /// task keeps allocated for as long as the socket is open.
    fn returned_size<F: Fn(A, B, C, D) -> R, A, B, C, D, R>(_: F) -> usize {
        std::mem::size_of::<R>()
    }

    /// An idle socket costs little more than its session's state, so the
    /// rare, large awaits (token checks, table lookups) are boxed: inline,
    /// they made every session 17 KB.
    #[test]
    fn an_idle_session_is_small() {
        let size = returned_size(super::session);
        assert!(size < 4096, "a session's state takes {size} bytes");
    }
}
