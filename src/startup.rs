//! Building the application from a config and running it on a listener.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use poem::http::{Method, header};
use poem::listener::TcpAcceptor;
use poem::middleware::Cors;
use poem::{Endpoint, EndpointExt, IntoEndpoint, IntoResponse, Request, Response, Route, Server, get};
use poem_openapi::OpenApiService;

use crate::api::health::HealthApi;
use crate::api::sync::{StreamApi, SyncApi};
use crate::auth::Authenticator;
use crate::config::{Config, MAX_BODY_BYTES};
use crate::error::json_error;
use crate::fanout::{self, Notifier};
use crate::hub::Hub;
use crate::listener::Listener;
use crate::metrics::Metrics;
use crate::store::Store;
use crate::{realtime, telemetry};

/// What every request handler shares. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub store: Store,
    pub auth: Authenticator,
    pub hub: Hub,
    pub notifier: Notifier,
    pub metrics: Metrics,
}

impl AppState {
    /// Opens the store (waiting until PostgreSQL answers), migrates, and
    /// loads the JWKS.
    pub async fn connect(config: Config) -> anyhow::Result<AppState> {
        let store = Store::open(&config).await?;
        store.prepare(None).await?;
        tracing::info!(store = store.kind(), "storing in {}", store.describe());
        let auth = Authenticator::new(&config)?;
        match &config.jwks_url {
            Some(url) => tracing::info!(jwks_url = %url, "tokens are checked against the JWKS"),
            None => tracing::warn!(
                data_dir = %config.data_dir.display(),
                "LOCAL MODE: no JWKS_URL, so this server issues and accepts its own tokens (`mana-sync token --sub <user>`)"
            ),
        }
        if config.jwks_url.is_none() && !config.host.is_loopback() {
            tracing::warn!(host = %config.host, "LOCAL MODE ON A NON-LOOPBACK ADDRESS: anyone who can reach it and holds a local token gets in");
        }
        auth.refresh(true).await;
        let metrics = Metrics::new();
        let hub = Hub::new(config.max_sockets_per_user, config.max_sockets, metrics.clone());
        let notifier = Notifier::start(store.notify_options(), hub.clone());
        Ok(AppState {
            config: Arc::new(config),
            store,
            auth,
            hub,
            notifier,
            metrics,
        })
    }
}

impl AppState {
    /// Checks a bearer token, counting refusals by reason.
    pub async fn verify(&self, token: &str) -> Result<crate::auth::User, crate::auth::AuthError> {
        let verified = self.auth.verify(token).await;
        if let Err(e) = &verified {
            self.metrics.jwt_failure(e.reason());
        }
        verified
    }
}

/// The OpenAPI service: every operation of the server.
pub fn openapi() -> OpenApiService<(SyncApi, StreamApi, HealthApi), ()> {
    OpenApiService::new((SyncApi, StreamApi, HealthApi), "mana-sync", env!("CARGO_PKG_VERSION")).description(
        "Sync server for local-first apps. Devices push field-level changes and pull \
         what other devices changed, folded by field-level last-write-wins. Every error \
         is JSON `{code, message}`.",
    )
}

/// The route template a request path falls under (`/sync/todo` →
/// `/sync/{appId}`), for span names and metric labels: never the path
/// itself, whose ids would make them unbounded. `None`: no route.
pub fn route_of(path: &str) -> Option<&'static str> {
    static ROUTES: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    let routes = ROUTES.get_or_init(|| {
        let spec: serde_json::Value = serde_json::from_str(&spec()).expect("the spec is JSON");
        let mut routes: Vec<String> = spec["paths"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(p, _)| p.clone())
            .collect();
        // The routes `app` mounts outside the OpenAPI service.
        routes.extend(["/openapi.json", "/.well-known/jwks.json", "/ws", "/ws/{appId}"].map(String::from));
        routes
    });
    if path == "/docs" || path.starts_with("/docs/") {
        return Some("/docs");
    }
    let segments: Vec<&str> = path.split('/').collect();
    routes.iter().map(String::as_str).find(|route| {
        let template: Vec<&str> = route.split('/').collect();
        template.len() == segments.len()
            && template
                .iter()
                .zip(&segments)
                .all(|(t, s)| t == s || (t.starts_with('{') && !s.is_empty()))
    })
}

/// The spec as served at `/openapi.json` and committed at `openapi/mana-sync.json`.
pub fn spec() -> String {
    openapi().spec()
}

/// The whole HTTP application for `state`.
pub fn app(state: AppState) -> impl Endpoint<Output = Response> {
    let api = openapi();
    let (spec, docs) = (api.spec_endpoint(), api.swagger_ui());
    let cors = cors(&state.config.cors_origins);
    Route::new()
        .at("/openapi.json", spec)
        .at("/.well-known/jwks.json", get(local_jwks))
        .at("/ws", get(realtime::user_socket))
        .at("/ws/:appId", get(realtime::app_socket))
        .nest("/docs", docs)
        .nest("/", api)
        .around(|ep, req| async move { ep.call(limit_body(req).await?).await })
        .catch_all_error(json_error)
        .with(cors)
        .catch_all_error(json_error)
        .around(close_if_body_unread)
        .around(telemetry::log_request)
        .data(state)
        .into_endpoint()
}

/// `GET /.well-known/jwks.json`: in local mode, the key tokens are signed with.
#[poem::handler]
fn local_jwks(poem::web::Data(state): poem::web::Data<&AppState>) -> poem::Result<poem::web::Json<serde_json::Value>> {
    match state.auth.local() {
        Some(issuer) => Ok(poem::web::Json(issuer.jwks())),
        None => Err(poem::Error::from_status(poem::http::StatusCode::NOT_FOUND)),
    }
}

/// Set once a request's body has been read in full (by [`limit_body`]).
#[derive(Clone, Default)]
struct BodyRead(Arc<AtomicBool>);

/// An answer given before the request's body was read in full (a 413, a
/// refused origin) says `Connection: close`: the rest of the body is never
/// read, so the connection cannot carry another request. The lingering
/// close (`listener`) then lets the answer arrive while the client is
/// still sending.
async fn close_if_body_unread<E: Endpoint>(ep: E, mut req: Request) -> poem::Result<Response> {
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
async fn limit_body(mut req: Request) -> poem::Result<Request> {
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

/// CORS for browser pages on the allowed origins (`*` allows any).
fn cors(origins: &[String]) -> Cors {
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

/// Serves on `listener` until `shutdown` resolves, then lets in-flight
/// requests finish (up to `SHUTDOWN_TIMEOUT`).
pub async fn serve(
    state: AppState,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let addr = listener.local_addr().context("listener has no address")?;
    let timeout = state.config.shutdown_timeout;
    let mut background = vec![state.auth.spawn_refresh(state.config.jwks_refresh)];
    match state.store.notify_options() {
        Some(options) => background.push(tokio::spawn(fanout::listen_forever(
            options,
            state.hub.clone(),
            state.notifier.replica().to_owned(),
        ))),
        // One process: its hub hears every push, nothing to listen to.
        None => state.hub.set_listening(true),
    }
    let hub = state.hub.clone();
    let drained = hub.clone();
    let notifier = state.notifier.clone();
    // On shutdown, sockets and streams are closed (1012) at once, so
    // clients reconnect to another replica, and in-flight requests finish.
    let shutdown = async move {
        shutdown.await;
        hub.close_all();
    };
    tracing::info!(%addr, "mana-sync listening");
    let result = Server::new_with_acceptor(Listener::new(TcpAcceptor::from_tokio(listener)?))
        .run_with_graceful_shutdown(app(state), shutdown, Some(timeout))
        .await
        .context("server failed");
    // Upgraded sockets are not in-flight requests: wait for their close
    // frames; and let the last pushes' notices reach the other replicas.
    let last_words = timeout.min(std::time::Duration::from_secs(5));
    drained.drained(last_words).await;
    notifier.flushed(last_words).await;
    for task in background {
        task.abort();
    }
    result
}
