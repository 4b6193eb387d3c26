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
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

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

/// A standard `OTEL_*` variable; empty counts as unset, as the spec says.
fn otel_var(name: &str) -> Option<String> {
    std::env::var(name)
        .ok()
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
}

/// The OTLP pipeline, when an endpoint is configured.
fn tracer_provider() -> anyhow::Result<Option<SdkTracerProvider>> {
    let endpoint = ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"]
        .into_iter()
        .find_map(|name| otel_var(name).map(|value| (name, value)));
    let exporters = otel_var("OTEL_TRACES_EXPORTER").unwrap_or_else(|| "otlp".to_owned());
    let Some((endpoint_name, endpoint)) = endpoint else {
        return Ok(None);
    };
    if otel_var("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
        return Ok(None);
    }
    if !exporters.split(',').any(|e| e.trim() == "otlp") {
        // `none`, or only exporters this server does not have (`console`, `zipkin`).
        if exporters != "none" {
            eprintln!("mana-sync: OTEL_TRACES_EXPORTER={exporters:?}: only `otlp` is supported; not exporting traces");
        }
        return Ok(None);
    }
    // The exporter speaks plain HTTP to a collector nearby (a sidecar or
    // node agent), which forwards over TLS.
    if endpoint.starts_with("https://") {
        anyhow::bail!(
            "invalid configuration: {endpoint_name} uses https://, which this build does not speak: \
             point it at an OpenTelemetry collector over http:// (it forwards over TLS)"
        );
    }
    let (name, protocol) = ["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"]
        .into_iter()
        .find_map(|name| otel_var(name).map(|value| (name, value)))
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
    let named = otel_var("OTEL_SERVICE_NAME").is_some()
        || otel_var("OTEL_RESOURCE_ATTRIBUTES").is_some_and(|attributes| {
            attributes
                .split(',')
                .any(|pair| pair.split('=').next().is_some_and(|key| key.trim() == "service.name"))
        });
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

/// The current span's W3C `traceparent`, to carry it across a queue or to
/// another replica (`None` when no trace is being recorded).
pub fn current_traceparent() -> Option<String> {
    let mut carrier = std::collections::HashMap::new();
    TraceContextPropagator::new().inject_context(&tracing::Span::current().context(), &mut carrier);
    carrier.remove("traceparent")
}

/// The trace context a carried `traceparent` names.
fn carried(traceparent: &str) -> opentelemetry::Context {
    let carrier = std::collections::HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
    TraceContextPropagator::new().extract(&carrier)
}

/// Makes `span` (not yet entered) a child of the trace `carrier` names
/// (W3C `traceparent` and `tracestate`, e.g. a request's headers).
pub fn continue_from(span: &tracing::Span, carrier: &dyn Extractor) {
    // Fails only when no trace layer is installed: nothing to continue then.
    let _ = span.set_parent(TraceContextPropagator::new().extract(carrier));
}

/// Sets OpenTelemetry's HTTP server attributes on a request's span: they
/// go to the trace only, not the logs.
pub fn record_http(span: &tracing::Span, method: &'static str, route: &'static str, path: String, status: u16) {
    span.set_attribute("http.request.method", method);
    span.set_attribute("http.route", route);
    span.set_attribute("url.path", path);
    span.set_attribute("http.response.status_code", i64::from(status));
}

/// Makes `span` (not yet entered) a child of a carried `traceparent`.
pub fn continue_trace(span: &tracing::Span, traceparent: &str) {
    let _ = span.set_parent(carried(traceparent));
}

/// Links `span` to the trace a carried `traceparent` names.
pub fn link_trace(span: &tracing::Span, traceparent: &str) {
    use opentelemetry::trace::TraceContextExt as _;
    let context = carried(traceparent);
    let linked = context.span().span_context().clone();
    if linked.is_valid() {
        span.add_link(linked);
    }
}
