//! What wraps every request: its span, log line and metrics, CORS, and
//! `Allow` on a 405.
//! (Reading its body is `api::body`'s.)

use poem::http::{Method, StatusCode, header};
use poem::middleware::Cors;
use poem::{Endpoint, IntoResponse, Request, Response};
use tracing::Instrument;

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

/// A 405 says which methods the route answers (`Allow`, as RFC 9110 asks).
pub async fn allow_on_405<E: Endpoint>(ep: E, req: Request) -> poem::Result<Response> {
    let allow = super::allowed_methods(req.uri().path());
    let mut response = ep.call(req).await?.into_response();
    if response.status() == StatusCode::METHOD_NOT_ALLOWED
        && let Some(allow) = allow
    {
        response
            .headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static(allow));
    }
    Ok(response)
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
        // Not a header browsers show a page of another origin unless told:
        // without it a client cannot honour a 429's or 503's wait.
        .expose_header("retry-after")
        .max_age(3600);
    if origins.iter().any(|o| o == "*") {
        cors
    } else {
        cors.allow_origins(origins.iter().map(String::as_str))
    }
}
