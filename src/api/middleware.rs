//! What wraps every request: its span, log line and metrics; CORS; the
//! body limit; and `Connection: close` on an answer given before the body
//! was read.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use poem::http::{Method, header};
use poem::middleware::Cors;
use poem::{Endpoint, IntoResponse, Request, Response};
use tracing::Instrument;

use crate::protocol::MAX_BODY_BYTES;
use crate::state::AppState;
use crate::telemetry;

/// One span and one log line per request: method, route, status, duration,
/// and (once known) the user and app. Never the token or record contents.
/// The span continues the caller's trace (`traceparent`), and the request
/// is counted in the metrics by route and status.
pub async fn log_request<E: Endpoint>(next: E, req: Request) -> poem::Result<Response> {
    // Only the standard methods become labels and span names; anything
    // else is `_OTHER` (OpenTelemetry's HTTP conventions), so a client
    // cannot mint new series.
    const METHODS: [&str; 9] = [
        "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
    ];
    let method = METHODS
        .into_iter()
        .find(|m| *m == req.method().as_str())
        .unwrap_or("_OTHER");
    let path = req.uri().path().to_owned();
    let route = super::route_of(&path).unwrap_or("unmatched");
    let span = tracing::info_span!(
        "request",
        otel.name = if method == "_OTHER" { format!("HTTP {route}") } else { format!("{method} {route}") },
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        %method,
        route,
        user_id = tracing::field::Empty,
        app_id = tracing::field::Empty,
    );
    telemetry::continue_from(&span, &opentelemetry_http::HeaderExtractor(req.headers()));
    let metrics = req.data::<AppState>().map(|state| state.metrics.clone());
    async move {
        let started = std::time::Instant::now();
        let response = next.get_response(req).await;
        let elapsed = started.elapsed();
        let status = response.status().as_u16();
        let span = tracing::Span::current();
        telemetry::record_http(&span, method, route, path, status);
        let duration_ms = elapsed.as_secs_f64() * 1e3;
        if response.status().is_server_error() {
            span.record("otel.status_code", "ERROR");
            tracing::error!(status, duration_ms, "request failed");
        } else {
            tracing::info!(status, duration_ms, "request");
        }
        if let Some(metrics) = metrics {
            metrics.request(method, route, status, elapsed);
        }
        Ok(response)
    }
    .instrument(span)
    .await
}

/// CORS for browser pages on the allowed origins (`*` allows any).
pub fn cors(origins: &[String]) -> Cors {
    let cors = Cors::new()
        .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
        .allow_headers([
            "authorization",
            "content-type",
            "x-client-id",
            "idempotency-key",
            "traceparent",
            "tracestate",
        ])
        .max_age(3600);
    if origins.iter().any(|o| o == "*") {
        cors
    } else {
        cors.allow_origins(origins.iter().map(String::as_str))
    }
}

/// Set once a request's body has been read in full (by [`limit_body`]).
#[derive(Clone, Default)]
struct BodyRead(Arc<AtomicBool>);

/// An answer given before the request's body was read in full (a 413, a
/// refused origin) says `Connection: close`: the rest of the body is never
/// read, so the connection cannot carry another request. The lingering
/// close (`api::listener`) then lets the answer arrive while the client is
/// still sending.
pub async fn close_if_body_unread<E: Endpoint>(ep: E, mut req: Request) -> poem::Result<Response> {
    let has_body = req.headers().contains_key(header::TRANSFER_ENCODING)
        || req
            .headers()
            .get(header::CONTENT_LENGTH)
            .is_some_and(|n| n.as_bytes() != b"0");
    let read = BodyRead::default();
    req.extensions_mut().insert(read.clone());
    let mut response = ep.call(req).await?.into_response();
    if has_body && !read.0.load(Ordering::Relaxed) {
        response
            .headers_mut()
            .insert(header::CONNECTION, header::HeaderValue::from_static("close"));
    }
    Ok(response)
}

/// Reads the body up to the limit, so an oversized one is a 413 whether or
/// not it declares its length.
pub async fn limit_body(mut req: Request) -> poem::Result<Request> {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES) {
        return Err(too_large());
    }
    let body = req
        .take_body()
        .into_bytes_limit(MAX_BODY_BYTES)
        .await
        .map_err(|e| match e {
            poem::error::ReadBodyError::PayloadTooLarge => too_large(),
            other => other.into(),
        })?;
    req.set_body(body);
    if let Some(read) = req.extensions().get::<BodyRead>() {
        read.0.store(true, Ordering::Relaxed);
    }
    Ok(req)
}

fn too_large() -> poem::Error {
    poem::Error::from_string(
        format!(
            "the request body is over the {} MB limit",
            MAX_BODY_BYTES / (1024 * 1024)
        ),
        poem::http::StatusCode::PAYLOAD_TOO_LARGE,
    )
}
