//! Everything HTTP: the operations of the OpenAPI spec (one poem-openapi
//! struct per area), the WebSocket and SSE endpoints, the bearer
//! extractor, the mapping of errors to statuses, the middleware, and the
//! connection handling. [`app`] puts them together.

pub mod admission;
pub mod auth;
pub mod body;
pub mod error;
pub mod gate;
pub mod health;
pub mod listener;
pub mod middleware;
pub mod realtime;
pub mod serialized;
pub mod server;
pub mod sse;
pub mod stream;
pub mod sync;

use std::sync::OnceLock;

use anyhow::Context;
use poem::endpoint::{BoxEndpoint, make_sync};
use poem::middleware::CatchPanic;
use poem::web::{Data, Html, Json};
use poem::{EndpointExt, Response, Route, get};
use poem_openapi::{OpenApi, OpenApiService, Tags};

use crate::state::AppState;

use self::error::json_error;
use self::gate::Gate;
use self::health::HealthApi;
use self::listener::{ConnectionLimits, Listener};
use self::stream::StreamApi;
use self::sync::SyncApi;

#[derive(Tags)]
pub enum ApiTags {
    /// Pushing and pulling changes.
    Sync,
    /// Liveness and status.
    Health,
}

/// Every operation of the spec.
type Operations = (SyncApi, StreamApi, HealthApi);

/// The OpenAPI service: every operation of the server.
pub fn openapi() -> OpenApiService<Operations, ()> {
    OpenApiService::new((SyncApi, StreamApi, HealthApi), "mana-sync", env!("CARGO_PKG_VERSION")).description(
        "Sync server for local-first apps. Devices push field-level changes and pull \
         what other devices changed, folded by field-level last-write-wins. Every error \
         is JSON `{code, message}`.",
    )
}

/// The spec as served at `/openapi.json` and committed at
/// `openapi/mana-sync.json`: poem-openapi's, with what its schema type
/// cannot say added (the stream's event data). Keys come out sorted.
pub fn spec() -> String {
    let mut spec: serde_json::Value = serde_json::from_str(&openapi().spec()).expect("poem-openapi writes valid JSON");
    sse::declare_event_data(&mut spec);
    serde_json::to_string_pretty(&spec).expect("a JSON value serializes")
}

/// The interactive page at `/docs`, showing [`spec`].
fn docs() -> String {
    let api = openapi();
    api.swagger_ui_html().replacen(&api.spec(), &spec(), 1)
}

/// The routes [`app`] mounts outside the OpenAPI service, as templates.
const OTHER_ROUTES: [&str; 4] = ["/openapi.json", "/.well-known/jwks.json", "/ws", "/ws/{appId}"];

/// The whole HTTP application for `state`, boxed: its middleware's nested
/// types would otherwise overflow the compiler's query depth in the
/// serving loop's future.
pub fn app(state: AppState) -> BoxEndpoint<'static, Response> {
    let (spec, docs) = (spec(), Html(docs()));
    let cors = middleware::cors(&state.config.cors_origins);
    let gate = Gate::new(&state.config, state.metrics.clone());
    Route::new()
        .at(
            "/openapi.json",
            make_sync(move |_| Response::builder().content_type("application/json").body(spec.clone())),
        )
        .at("/.well-known/jwks.json", get(local_jwks))
        .at("/ws", get(realtime::user_socket))
        .at("/ws/:appId", get(realtime::app_socket))
        .at("/docs", make_sync(move |_| docs.clone()))
        .nest("/", openapi())
        .around(move |ep, req| {
            let gate = gate.clone();
            async move { gate.call(&ep, req).await }
        })
        .catch_all_error(json_error)
        .with(cors)
        .catch_all_error(json_error)
        .with(CatchPanic::new().with_handler(error::panicked))
        .around(body::close_if_body_unread)
        .around(middleware::allow_on_405)
        .around(middleware::log_request)
        .data(state)
        .boxed()
}

/// Every route as a template, with the methods it answers (its `Allow`).
fn routes() -> &'static [(String, String)] {
    static ROUTES: OnceLock<Vec<(String, String)>> = OnceLock::new();
    ROUTES.get_or_init(|| {
        let operations = Operations::meta().into_iter().flat_map(|api| api.paths).map(|path| {
            let mut methods: Vec<String> = path.operations.iter().map(|op| op.method.to_string()).collect();
            if methods.iter().any(|m| m == "GET") {
                methods.push("HEAD".to_owned()); // poem answers HEAD with GET's handler
            }
            (path.path, methods.join(", "))
        });
        operations
            .chain(OTHER_ROUTES.map(|route| (route.to_owned(), "GET, HEAD".to_owned())))
            .chain([("/docs".to_owned(), "GET, HEAD".to_owned())])
            .collect()
    })
}

/// The route a request path falls under (`/sync/todo` → `/sync/{appId}`),
/// with the methods it answers.
fn route(path: &str) -> Option<&'static (String, String)> {
    if path == "/docs" || path.starts_with("/docs/") {
        return routes().iter().find(|(template, _)| template == "/docs");
    }
    let segments: Vec<&str> = path.split('/').collect();
    routes().iter().find(|(route, _)| {
        let template: Vec<&str> = route.split('/').collect();
        template.len() == segments.len()
            && template
                .iter()
                .zip(&segments)
                .all(|(t, s)| t == s || (t.starts_with('{') && !s.is_empty()))
    })
}

/// The route template a request path falls under (`/sync/todo` →
/// `/sync/{appId}`), for span names and metric labels: never the path
/// itself, whose ids would make them unbounded. `None`: no route.
pub fn route_of(path: &str) -> Option<&'static str> {
    route(path).map(|(template, _)| template.as_str())
}

/// The methods the route of `path` answers, as an `Allow` header says them.
pub fn allowed_methods(path: &str) -> Option<&'static str> {
    route(path).map(|(_, allow)| allow.as_str())
}

/// `GET /.well-known/jwks.json`: in local mode, the key tokens are signed with.
#[poem::handler]
fn local_jwks(Data(state): Data<&AppState>) -> poem::Result<Json<serde_json::Value>> {
    match state.auth.local() {
        Some(issuer) => Ok(Json(issuer.jwks())),
        None => Err(poem::Error::from_status(poem::http::StatusCode::NOT_FOUND)),
    }
}

/// Serves [`app`] on `listener`, within the connection limits of the
/// configuration, until the state's lifecycle closes it.
pub async fn serve(state: AppState, listener: tokio::net::TcpListener) -> anyhow::Result<()> {
    let config = &state.config;
    let limits = ConnectionLimits {
        total: config.max_connections,
        per_address: config.max_connections_per_address,
        send_timeout: config.send_timeout,
        send_min_rate: config.send_min_rate,
    };
    let idle_timeout = config.idle_timeout;
    let listener = Listener::new(listener, limits, state.metrics.clone());
    let lifecycle = state.lifecycle.clone();
    server::run(listener, app(state), idle_timeout, lifecycle)
        .await
        .context("server failed")
}
