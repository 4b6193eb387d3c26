//! What every request handler shares: the one application state.

use std::sync::Arc;

use crate::auth::{AuthError, Authenticator, User};
use crate::clock::Clock;
use crate::config::Config;
use crate::fanout::Notifier;
use crate::hub::Hub;
use crate::lifecycle::Lifecycle;
use crate::metrics::Metrics;
use crate::store::Store;
use crate::throttle::Throttle;

/// The server's shared state. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub store: Store,
    pub auth: Authenticator,
    pub hub: Hub,
    pub notifier: Notifier,
    pub metrics: Metrics,
    pub throttle: Throttle,
    /// The time every replica shares (receive times, token checks).
    pub clock: Clock,
    /// Where the replica is in its life (shutting down or not).
    pub lifecycle: Lifecycle,
}

impl AppState {
    /// Opens the store (PostgreSQL is migrated in the background as soon
    /// as it answers; until then requests get 503), and loads the JWKS.
    pub async fn connect(config: Config) -> anyhow::Result<AppState> {
        let store = Store::open(&config).await?;
        store.start().await?;
        tracing::info!(store = store.kind(), "storing in {}", store.describe());
        let clock = store.clock().clone();
        let auth = Authenticator::new(&config, clock.clone())?;
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
        // The JWKS is fetched in the background from the start (see
        // `startup`): a slow or unreachable auth service does not hold up
        // start-up, and the first token waits for that one fetch only.
        let metrics = Metrics::new();
        let lifecycle = Lifecycle::new();
        let hub = Hub::new(
            config.max_sockets_per_user,
            config.max_sockets,
            metrics.clone(),
            lifecycle.clone(),
        );
        let notifier = Notifier::start(store.notify_options(), hub.clone());
        let throttle = Throttle::new(&config, metrics.clone());
        Ok(AppState {
            throttle,
            clock,
            config: Arc::new(config),
            store,
            auth,
            hub,
            notifier,
            metrics,
            lifecycle,
        })
    }

    /// Checks a bearer token, counting refusals by reason.
    pub async fn verify(&self, token: &str) -> Result<User, AuthError> {
        let verified = self.auth.verify(token).await;
        if let Err(e) = &verified {
            self.metrics.jwt_failure(e.reason());
        }
        verified
    }
}
