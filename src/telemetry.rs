//! Logs and traces.
//!
//! Logs are human-readable by default, JSON with `LOG_FORMAT=json`, and
//! filtered by `RUST_LOG` (default `info`). Traces go to an OpenTelemetry
//! collector over OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, configured by the standard
//! `OTEL_*` variables (protocol, headers, timeout, service name, resource
//! attributes, sampler, batching); without it no span is exported and the
//! layer is not even installed. Incoming W3C `traceparent`/`tracestate`
//! headers continue the caller's trace.

use std::io::IsTerminal;

use anyhow::Context as _;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

use crate::startup::AppState;

/// Keeps the trace exporter alive; [`Telemetry::shutdown`] flushes it.
#[must_use = "dropping it without shutdown loses the last spans"]
pub struct Telemetry {
    tracer_provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports the spans still buffered (at shutdown).
    pub fn shutdown(self) {
        if let Some(provider) = self.tracer_provider
            && let Err(e) = provider.shutdown()
        {
            eprintln!("mana-sync: flushing spans failed: {e}");
        }
    }
}

/// Installs the global subscriber: logs always, OTLP traces when configured.
pub fn init() -> anyhow::Result<Telemetry> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let logs = if std::env::var("LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json")) {
        logs.json().boxed()
    } else {
        logs.boxed()
    };
    let tracer_provider = tracer_provider()?;
    // The server's own spans are exported whatever `RUST_LOG` lets through
    // to the logs.
    let traces = tracer_provider.as_ref().map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("mana-sync"))
            .with_filter(Targets::new().with_target("mana_sync", LevelFilter::INFO))
    });
    tracing_subscriber::registry()
        .with(logs.with_filter(filter))
        .with(traces)
        .try_init()
        .context("a tracing subscriber is already installed")?;
    Ok(Telemetry { tracer_provider })
}

/// The OTLP pipeline, when an endpoint is configured.
fn tracer_provider() -> anyhow::Result<Option<SdkTracerProvider>> {
    let set = |name: &str| std::env::var(name).is_ok_and(|v| !v.trim().is_empty());
    if !(set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
        || std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.trim().eq_ignore_ascii_case("true"))
        || std::env::var("OTEL_TRACES_EXPORTER").is_ok_and(|v| v.trim() == "none")
    {
        return Ok(None);
    }
    // The exporter speaks plain HTTP/2 or HTTP/1.1 to a collector nearby
    // (a sidecar or node agent), which forwards over TLS.
    for name in ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"] {
        if std::env::var(name).is_ok_and(|v| v.trim().starts_with("https://")) {
            anyhow::bail!(
                "invalid configuration: {name} uses https://, which this build does not speak: \
                 point it at an OpenTelemetry collector over http:// (it forwards over TLS)"
            );
        }
    }
    let (name, protocol) = ["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"]
        .into_iter()
        .find_map(|name| std::env::var(name).ok().map(|v| (name, v.trim().to_owned())))
        .unwrap_or(("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf".to_owned()));
    // The exporters read the endpoint, headers, timeout and compression
    // from the standard variables themselves.
    let exporter = match protocol.as_str() {
        "http/protobuf" => opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .build(),
        "http/json" => opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpJson)
            .build(),
        "grpc" => opentelemetry_otlp::SpanExporter::builder().with_tonic().build(),
        other => anyhow::bail!("invalid configuration: {name}={other:?}: use http/protobuf, http/json or grpc"),
    }
    .context("invalid OTLP exporter configuration (OTEL_EXPORTER_OTLP_*)")?;
    let mut resource = opentelemetry_sdk::Resource::builder();
    let named = set("OTEL_SERVICE_NAME")
        || std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|v| v.contains("service.name="));
    if !named {
        resource = resource.with_service_name("mana-sync");
    }
    // The sampler comes from OTEL_TRACES_SAMPLER(_ARG), batching from OTEL_BSP_*.
    Ok(Some(
        SdkTracerProvider::builder()
            .with_resource(resource.build())
            .with_batch_exporter(exporter)
            .build(),
    ))
}

/// One span and one log line per request: method, route, status, duration,
/// and (once known) the user and app. Never the token or record contents.
/// The span continues the caller's trace (`traceparent`), and the request
/// is counted in the metrics by route and status.
pub async fn log_request<E: poem::Endpoint>(next: E, req: poem::Request) -> poem::Result<poem::Response> {
    use tracing::Instrument;
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let route = crate::startup::route_of(&path).unwrap_or("unmatched");
    let span = tracing::info_span!(
        "request",
        otel.name = format!("{method} {route}"),
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        %method,
        route,
        user_id = tracing::field::Empty,
        app_id = tracing::field::Empty,
    );
    let parent = TraceContextPropagator::new().extract(&HeaderExtractor(req.headers()));
    // Fails only when no trace layer is installed: nothing to continue then.
    let _ = span.set_parent(parent);
    let metrics = req.data::<AppState>().map(|state| state.metrics.clone());
    async move {
        let started = std::time::Instant::now();
        let response = next.get_response(req).await;
        let elapsed = started.elapsed();
        let status = response.status().as_u16();
        let span = tracing::Span::current();
        // OpenTelemetry's HTTP attributes go to the trace only, not the logs.
        span.set_attribute("http.request.method", method.to_string());
        span.set_attribute("http.route", route);
        span.set_attribute("url.path", path);
        span.set_attribute("http.response.status_code", i64::from(status));
        let duration_ms = elapsed.as_secs_f64() * 1e3;
        if response.status().is_server_error() {
            span.record("otel.status_code", "ERROR");
            tracing::error!(status, duration_ms, "request failed");
        } else {
            tracing::info!(status, duration_ms, "request");
        }
        if let Some(metrics) = metrics {
            metrics.request(method.as_str(), route, status, elapsed);
        }
        Ok(response)
    }
    .instrument(span)
    .await
}

/// Reads W3C trace context from request headers.
struct HeaderExtractor<'a>(&'a poem::http::HeaderMap);

impl opentelemetry::propagation::Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}
