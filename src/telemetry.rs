//! Logging: human-readable by default, JSON with `LOG_FORMAT=json`,
//! filtered by `RUST_LOG` (default `info`).

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    if std::env::var("LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json")) {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// One span and one log line per request: method, path, status, duration,
/// and (once known) the user and app. Never the token or record contents.
pub async fn log_request<E: poem::Endpoint>(next: E, req: poem::Request) -> poem::Result<poem::Response> {
    use tracing::Instrument;
    let span = tracing::info_span!(
        "request",
        method = %req.method(),
        path = %req.uri().path(),
        user_id = tracing::field::Empty,
        app_id = tracing::field::Empty,
    );
    async move {
        let started = std::time::Instant::now();
        let response = next.get_response(req).await;
        let status = response.status().as_u16();
        let duration_ms = started.elapsed().as_secs_f64() * 1e3;
        if response.status().is_server_error() {
            tracing::error!(status, duration_ms, "request failed");
        } else {
            tracing::info!(status, duration_ms, "request");
        }
        Ok(response)
    }
    .instrument(span)
    .await
}
