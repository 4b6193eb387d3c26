//! Traces: the built binary, pointed at an OTLP receiver started here (a
//! small HTTP server decoding the protobuf or JSON export, or a gRPC
//! collector service, with the opentelemetry-proto types), continues a
//! caller's `traceparent` through a push and exports its spans, flushing
//! them on shutdown.

use crate::common;

use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use poem::web::Data;
use poem::{EndpointExt, Route, handler, post};
use prost::Message;
use rstest::rstest;
use serde_json::json;

/// What the receiver got: spans with their service names, and how each
/// export came (`grpc`, or the HTTP content type).
#[derive(Clone, Default)]
struct Received {
    spans: Arc<Mutex<Vec<(String, Span)>>>,
    formats: Arc<Mutex<Vec<String>>>,
}

/// Keeps every span of an export with its service name.
fn keep(received: &Received, format: &str, request: ExportTraceServiceRequest) {
    received.formats.lock().unwrap().push(format.to_owned());
    let mut received = received.spans.lock().unwrap();
    for resource_spans in request.resource_spans {
        let service = resource_spans
            .resource
            .iter()
            .flat_map(|r| &r.attributes)
            .find(|kv| kv.key == "service.name")
            .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                AnyValue::StringValue(s) => Some(s.clone()),
                _ => None,
            })
            .unwrap_or_default();
        for scope in resource_spans.scope_spans {
            received.extend(scope.spans.into_iter().map(|span| (service.clone(), span)));
        }
    }
}

/// Turns every `{"doubleValue": n}` into `{"stringValue": "n"}`. The
/// server keeps user data's numbers exactly (serde_json's
/// `arbitrary_precision`), and with that feature opentelemetry-proto's
/// flattened `AnyValue` cannot read a JSON number; no assertion here reads
/// a double attribute.
fn doubles_as_strings(json: &mut serde_json::Value) {
    match json {
        serde_json::Value::Object(map) => {
            if let Some(serde_json::Value::Number(n)) = map.get("doubleValue") {
                let text = n.to_string();
                map.remove("doubleValue");
                map.insert("stringValue".to_owned(), serde_json::Value::String(text));
            }
            map.values_mut().for_each(doubles_as_strings);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(doubles_as_strings),
        _ => {}
    }
}

/// OTLP/HTTP `POST /v1/traces`, protobuf or JSON.
#[handler]
async fn export(req: &poem::Request, body: Vec<u8>, received: Data<&Received>) -> poem::Result<()> {
    let bad = |e: String| poem::Error::from_string(e, poem::http::StatusCode::BAD_REQUEST);
    let format = req.content_type().unwrap_or_default();
    let request = if format == "application/json" {
        let mut json: serde_json::Value = serde_json::from_slice(&body).map_err(|e| bad(e.to_string()))?;
        doubles_as_strings(&mut json);
        serde_json::from_value(json).map_err(|e| bad(e.to_string()))?
    } else {
        ExportTraceServiceRequest::decode(body.as_slice()).map_err(|e| bad(e.to_string()))?
    };
    keep(&received, format, request);
    Ok(())
}

/// OTLP/gRPC.
struct Collector(Received);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        keep(&self.0, "grpc", request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// An OTLP receiver for `protocol` on a free port; returns its base URL.
async fn otlp_receiver(protocol: &str, received: Received) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    if protocol == "grpc" {
        let incoming = tonic::transport::server::TcpIncoming::from(listener);
        let service = TraceServiceServer::new(Collector(received));
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(incoming),
        );
    } else {
        let app = Route::new().at("/v1/traces", post(export)).data(received);
        let acceptor = poem::listener::TcpAcceptor::from_tokio(listener).unwrap();
        tokio::spawn(poem::Server::new_with_acceptor(acceptor).run(app));
    }
    url
}

fn attribute(span: &Span, key: &str) -> Option<String> {
    let value = span
        .attributes
        .iter()
        .find(|kv| kv.key == key)?
        .value
        .as_ref()?
        .value
        .as_ref()?;
    Some(match value {
        AnyValue::StringValue(s) => s.clone(),
        AnyValue::IntValue(i) => i.to_string(),
        AnyValue::BoolValue(b) => b.to_string(),
        AnyValue::DoubleValue(d) => d.to_string(),
        other => format!("{other:?}"),
    })
}

#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_continues_the_callers_trace_and_its_spans_reach_the_collector(
    #[values("http/protobuf", "http/json", "grpc")] protocol: &str,
) {
    let received = Received::default();
    let endpoint = otlp_receiver(protocol, received.clone()).await;
    let log_file = tempfile::NamedTempFile::new().unwrap();
    let db = common::pg::test_database().await;
    let jwks = common::tokens::JwksServer::start_default().await;
    let port = common::free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_mana-sync"))
        .env("DATABASE_URL", &db.app_url)
        .env("JWKS_URL", &jwks.url)
        .env("HOST", "127.0.0.1")
        .env("PORT", port.to_string())
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)
        // Nothing is exported before shutdown: the flush at exit must send it all.
        .env("OTEL_BSP_SCHEDULE_DELAY", "600000")
        .env_remove("OTEL_SERVICE_NAME")
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
        .env("LOG_FORMAT", "json")
        .env("RUST_LOG", "info")
        .stderr(log_file.reopen().unwrap())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    while !http
        .get(format!("{base}/ready"))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
    {
        assert!(Instant::now() < deadline, "the server never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let token = common::tokens::token_for("alice");
    // A phone listening, so the push's fan-out tells somebody.
    let (mut phone, _) = tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{port}/ws/todo"))
        .await
        .unwrap();
    {
        use futures_util::{SinkExt, StreamExt};
        let auth = json!({ "type": "auth", "token": token, "clientId": "phone" });
        phone
            .send(tokio_tungstenite::tungstenite::Message::text(auth.to_string()))
            .await
            .unwrap();
        phone.next().await.unwrap().unwrap(); // auth-ok
        phone.next().await.unwrap().unwrap(); // the catch-up
    }
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let response = http
        .post(format!("{base}/sync/todo"))
        .bearer_auth(&token)
        .header("traceparent", format!("00-{trace_id}-{caller_span}-01"))
        .json(&json!({
            "clientId": "laptop",
            "changes": [
                { "table": "todos", "id": "t1", "op": "insert", "data": { "title": "secret-title" } },
                { "table": "notes", "id": "n1", "op": "insert", "data": { "body": "y" } },
            ],
        }))
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success(), "{}", response.text().await.unwrap());
    let pull_span = "b7ad6b7169203331";
    let pulled = http
        .get(format!("{base}/sync/todo/pull?collection=todos"))
        .bearer_auth(&token)
        .header("traceparent", format!("00-{trace_id}-{pull_span}-01"))
        .header("tracestate", "vendor=opaque")
        .send()
        .await
        .unwrap();
    assert!(pulled.status().is_success());
    // A malformed traceparent starts a new trace rather than failing.
    let fresh = http
        .get(format!("{base}/sync/todo/pull?collection=notes"))
        .bearer_auth(&token)
        .header("traceparent", "not-a-traceparent")
        .send()
        .await
        .unwrap();
    assert!(fresh.status().is_success());

    // SIGTERM: the spans still buffered are flushed before the exit.
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "clean exit: {status}");

    // One JSON log line for the request: route, status, duration, user
    // and app; never the token or what was written.
    let logs = std::fs::read_to_string(log_file.path()).unwrap();
    assert!(!logs.contains(&token), "a token was logged");
    assert!(!logs.contains("secret-title"), "record contents were logged");
    let lines: Vec<serde_json::Value> = logs
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON log lines"))
        .collect();
    let request = lines
        .iter()
        .find(|l| l["fields"]["message"] == "request" && l["span"]["route"] == "/sync/{appId}")
        .unwrap_or_else(|| panic!("no request line for the push: {logs}"));
    assert_eq!(request["fields"]["status"], 200);
    assert!(request["fields"]["duration_ms"].as_f64().is_some());
    assert_eq!(request["span"]["user_id"], "alice");
    assert_eq!(request["span"]["app_id"], "todo");

    let expected_format = match protocol {
        "http/protobuf" => "application/x-protobuf",
        "http/json" => "application/json",
        _ => "grpc",
    };
    let formats = received.formats.lock().unwrap().clone();
    assert!(
        !formats.is_empty() && formats.iter().all(|f| f == expected_format),
        "{protocol} exports as {expected_format}: {formats:?}"
    );
    let spans = received.spans.lock().unwrap().clone();
    let trace = hex(trace_id);
    let in_trace: Vec<&Span> = spans.iter().map(|(_, s)| s).filter(|s| s.trace_id == trace).collect();
    let names: Vec<&str> = in_trace.iter().map(|s| s.name.as_str()).collect();
    let named = |name: &str| {
        *in_trace
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no {name:?} span in the caller's trace; got {names:?}"))
    };

    let request = named("POST /sync/{appId}");
    assert_eq!(
        request.parent_span_id,
        hex(caller_span),
        "the request continues the caller's span"
    );
    assert_eq!(attribute(request, "http.route").as_deref(), Some("/sync/{appId}"));
    assert_eq!(attribute(request, "http.response.status_code").as_deref(), Some("200"));
    assert_eq!(attribute(request, "user_id").as_deref(), Some("alice"));
    assert_eq!(attribute(request, "app_id").as_deref(), Some("todo"));

    let push = named("sync.push");
    assert_eq!(push.parent_span_id, request.span_id);
    assert_eq!(attribute(push, "changes").as_deref(), Some("2"));
    assert_eq!(attribute(push, "tables").as_deref(), Some("notes,todos"));
    assert_eq!(attribute(push, "records").as_deref(), Some("2"));

    let deliver = named("fanout.deliver");
    assert_eq!(
        deliver.parent_span_id, push.span_id,
        "the fan-out follows the push's commit"
    );
    assert_eq!(attribute(deliver, "told").as_deref(), Some("1"), "the phone was told");

    let pull = named("sync.pull");
    let pull_request = named("GET /sync/{appId}/pull");
    assert_eq!(pull.parent_span_id, pull_request.span_id);
    assert_eq!(pull_request.parent_span_id, hex(pull_span));
    assert_eq!(pull_request.trace_state, "vendor=opaque", "tracestate is carried on");
    assert_eq!(attribute(pull, "table").as_deref(), Some("todos"));
    assert_eq!(attribute(pull, "records").as_deref(), Some("1"));
    let fresh_pull = spans
        .iter()
        .map(|(_, s)| s)
        .find(|s| s.name == "sync.pull" && attribute(s, "table").as_deref() == Some("notes"))
        .expect("the pull with a malformed traceparent is traced too");
    assert_ne!(fresh_pull.trace_id, trace, "in a trace of its own");

    // The NOTIFY, shared by whatever pushes were waiting, links to their traces.
    let notify = spans
        .iter()
        .map(|(_, s)| s)
        .find(|s| s.name == "fanout.notify")
        .expect("a fanout.notify span");
    assert!(
        notify
            .links
            .iter()
            .any(|l| l.trace_id == trace && l.span_id == push.span_id),
        "the NOTIFY links to the push: {:?}",
        notify.links
    );

    let services: Vec<&str> = spans.iter().map(|(service, _)| service.as_str()).collect();
    assert!(services.iter().all(|s| *s == "mana-sync"), "service name: {services:?}");
    let all: Vec<&str> = spans.iter().map(|(_, s)| s.name.as_str()).collect();
    assert!(all.contains(&"jwks.fetch"), "no jwks.fetch span exported; got {all:?}");
}

#[test]
fn a_misconfigured_exporter_stops_start_up_with_the_variable_named() {
    let dir = tempfile::tempdir().unwrap();
    for (name, value) in [
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "carrier-pigeon"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "https://collector.example:4318"),
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_mana-sync"))
            .arg("migrate")
            .current_dir(dir.path())
            .env_clear()
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
            .env(name, value)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{name}={value} must stop start-up");
        assert!(stderr.contains(name), "the error names {name}: {stderr}");
    }
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}
