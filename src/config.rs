//! Configuration, read once from the environment at start-up.
//!
//! A missing or malformed setting stops start-up with one line naming the
//! variable. Every setting is listed in the README.

use std::net::IpAddr;
use std::str::FromStr;
use std::time::Duration;

use secrecy::SecretString;

#[derive(Clone, Debug)]
pub struct Config {
    pub host: IpAddr,
    pub port: u16,
    /// `postgres://…` or `sqlite://path`; `None`: SQLite in `data_dir`.
    /// Secret (it may hold a password): `Debug` prints it redacted.
    pub database_url: Option<SecretString>,
    pub database_max_connections: u32,
    /// The auth service's JWKS; `None` is local mode (see `auth::local`).
    pub jwks_url: Option<String>,
    /// Where local mode keeps its signing key, and the SQLite store its file.
    pub data_dir: std::path::PathBuf,
    /// Least time between two JWKS fetches triggered by an unknown `kid`.
    pub jwks_min_refresh: Duration,
    /// How often the JWKS is re-fetched in the background.
    pub jwks_refresh: Duration,
    pub jwt_issuer: Option<String>,
    pub jwt_audience: Option<String>,
    /// Tolerance for `exp`/`nbf`.
    pub jwt_leeway: Duration,
    /// Allowed browser origins; `*` allows any.
    pub cors_origins: Vec<String>,
    /// Field timestamps further ahead of server time than this are clamped to server time.
    pub max_clock_skew: Duration,
    /// Most changes accepted in one push.
    pub max_batch_changes: usize,
    /// How long a push's outcome is kept for replay under its `Idempotency-Key`.
    pub idempotency_ttl: Duration,
    /// Most outcomes kept per user; past it the oldest are dropped (0: no limit).
    pub idempotency_max_keys: u64,
    /// How often each replica sweeps expired outcomes, of every user.
    pub idempotency_sweep_interval: Duration,
    /// Most records one user may store (0: no limit).
    pub max_records_per_user: u64,
    /// Most bytes of records (table name, id and state) one user may store (0: no limit).
    pub max_bytes_per_user: u64,
    /// Most fields one record may hold (0: no limit).
    pub max_fields_per_record: u64,
    /// Longest a push waits for its turn (behind the user's other pushes on
    /// PostgreSQL, every other push on SQLite) or for a database
    /// connection, before a 429. The original client retries a refused push
    /// only on its next edit, so a push waits rather than being refused
    /// unless the server is truly overloaded.
    pub lock_timeout: Duration,
    /// Most WebSockets and streams one user may hold on one replica.
    pub max_sockets_per_user: usize,
    /// Most WebSockets and streams on one replica.
    pub max_sockets: usize,
    /// Longest wait for in-flight requests at shutdown.
    pub shutdown_timeout: Duration,
    /// How long a replica told to stop keeps serving with `/ready` at 503
    /// before it closes its sockets: the time a balancer polling `/ready`
    /// needs to stop sending it new clients.
    pub shutdown_drain: Duration,
    /// Longest wait for a request's head, from a connection's opening or
    /// the previous response (so also how long a keep-alive connection
    /// may idle).
    pub idle_timeout: Duration,
    /// Longest wait for the next piece of a request body, and the grace
    /// period before [`Config::body_min_rate`] applies.
    pub body_timeout: Duration,
    /// Least average rate, in bytes per second, at which a request body
    /// must arrive once `body_timeout` has passed.
    pub body_min_rate: u64,
    /// Most bytes of request bodies held at once by the replica.
    pub body_budget: usize,
    /// Most bytes of request bodies one user may hold at once on the
    /// replica, counted as they arrive: one user cannot take the whole
    /// [`Config::body_budget`].
    pub body_budget_per_user: usize,
    /// Longest a request body may take to arrive in all, however steadily.
    pub body_deadline: Duration,
    /// Most requests one user may have in flight at once on the replica
    /// (from its head until its answer is sent; streams and sockets are
    /// bounded by `MAX_SOCKETS_PER_USER` instead). 0: no limit.
    pub max_requests_per_user: usize,
    /// Most bytes of answers held at once by the replica (built and not yet
    /// taken by their clients); over it, new requests get 503.
    pub answer_budget: usize,
    /// Most bytes of one user's answers held at once by the replica; over
    /// it, that user's new requests get 429 (0: no limit).
    pub answer_budget_per_user: usize,
    /// Longest the server waits for a client to take the next bytes it
    /// sends (an answer, a stream's event, a socket's message), and the
    /// grace period before [`Config::send_min_rate`] applies.
    pub send_timeout: Duration,
    /// Least average rate, in bytes per second, at which a client must
    /// take what the server sends once `send_timeout` has passed.
    pub send_min_rate: u64,
    /// Bytes of push bodies a second one user may send on one replica (0:
    /// no limit). A push over it waits, up to 10 s, rather than being refused.
    pub push_bytes_rate: u32,
    /// Most TCP connections open at once on the replica.
    pub max_connections: usize,
    /// Most TCP connections open at once from one IP address (0: no limit).
    pub max_connections_per_address: usize,
    /// Pushes a second one user may make on one replica (0: no limit).
    pub push_rate: u32,
    /// Pulls a second one user may make on one replica (0: no limit).
    pub pull_rate: u32,
    /// Streams and sockets a second one user may open on one replica (0: no limit).
    pub open_rate: u32,
}

/// A setting that is missing or malformed; its message names the variable.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {name}={value:?}: {reason}")]
pub struct ConfigError {
    pub name: &'static str,
    pub value: String,
    pub reason: String,
}

impl Config {
    pub fn from_env() -> Result<Config, ConfigError> {
        Config::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads every setting through `lookup` (the environment, or a map in tests).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let env = Env(&lookup);
        Ok(Config {
            // Local mode (no JWKS_URL) listens on loopback unless told otherwise.
            host: env.parse(
                "HOST",
                if lookup("JWKS_URL").is_some_and(|v| !v.trim().is_empty()) {
                    "0.0.0.0"
                } else {
                    "127.0.0.1"
                },
            )?,
            port: env.parse("PORT", "3050")?,
            database_url: env.optional("DATABASE_URL").map(SecretString::from),
            database_max_connections: env.parse("DATABASE_MAX_CONNECTIONS", "20")?,
            jwks_url: env.optional("JWKS_URL"),
            data_dir: env.string("DATA_DIR", "./data")?.into(),
            jwks_min_refresh: env.duration("JWKS_MIN_REFRESH_INTERVAL", "30s")?,
            jwks_refresh: env.duration("JWKS_REFRESH_INTERVAL", "10m")?,
            jwt_issuer: env.optional("JWT_ISSUER"),
            jwt_audience: env.optional("JWT_AUDIENCE"),
            jwt_leeway: env.duration("JWT_LEEWAY", "30s")?,
            cors_origins: env
                .string("CORS_ORIGINS", "http://localhost:5173")?
                .split(',')
                .map(|o| o.trim().trim_end_matches('/').to_owned())
                .filter(|o| !o.is_empty())
                .collect(),
            max_clock_skew: env.duration("MAX_CLOCK_SKEW", "5m")?,
            max_batch_changes: env.parse("MAX_BATCH_CHANGES", "5000")?,
            idempotency_ttl: env.duration("IDEMPOTENCY_TTL", "24h")?,
            idempotency_max_keys: env.parse("IDEMPOTENCY_MAX_KEYS", "10000")?,
            idempotency_sweep_interval: env.duration("IDEMPOTENCY_SWEEP_INTERVAL", "1m")?,
            max_records_per_user: env.parse("MAX_RECORDS_PER_USER", "1000000")?,
            max_bytes_per_user: env.parse("MAX_BYTES_PER_USER", "1073741824")?,
            max_fields_per_record: env.parse("MAX_FIELDS_PER_RECORD", "1000")?,
            lock_timeout: env.duration("LOCK_TIMEOUT", "30s")?,
            max_sockets_per_user: env.parse("MAX_SOCKETS_PER_USER", "20")?,
            max_sockets: env.parse("MAX_SOCKETS", "10000")?,
            shutdown_timeout: env.duration("SHUTDOWN_TIMEOUT", "30s")?,
            shutdown_drain: env.duration("SHUTDOWN_DRAIN", "0s")?,
            idle_timeout: env.duration("IDLE_TIMEOUT", "75s")?,
            body_timeout: env.duration("BODY_TIMEOUT", "10s")?,
            body_min_rate: env.parse("BODY_MIN_RATE", "1024")?,
            body_budget: env.parse("BODY_BUDGET", "268435456")?,
            body_budget_per_user: env.parse("BODY_BUDGET_PER_USER", "33554432")?,
            body_deadline: env.duration("BODY_DEADLINE", "3m")?,
            max_requests_per_user: env.parse("MAX_REQUESTS_PER_USER", "16")?,
            answer_budget: env.parse("ANSWER_BUDGET", "268435456")?,
            answer_budget_per_user: env.parse("ANSWER_BUDGET_PER_USER", "33554432")?,
            send_timeout: env.duration("SEND_TIMEOUT", "10s")?,
            send_min_rate: env.parse("SEND_MIN_RATE", "8192")?,
            push_bytes_rate: env.parse("PUSH_BYTES_RATE", "2097152")?,
            max_connections: env.parse("MAX_CONNECTIONS", "10000")?,
            max_connections_per_address: env.parse("MAX_CONNECTIONS_PER_ADDRESS", "1000")?,
            push_rate: env.parse("PUSH_RATE", "20")?,
            pull_rate: env.parse("PULL_RATE", "20")?,
            open_rate: env.parse("OPEN_RATE", "2")?,
        })
    }
}

/// Creates a data directory (and its parents) if missing, readable by
/// this user only: it holds the signing key and the SQLite database.
pub fn create_data_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder
        .create(dir)
        .map_err(|e| anyhow::anyhow!("failed to create the data directory {}: {e}", dir.display()))
}

struct Env<'a, F>(&'a F);

impl<F: Fn(&str) -> Option<String>> Env<'_, F> {
    fn optional(&self, name: &str) -> Option<String> {
        (self.0)(name).map(|v| v.trim().to_owned()).filter(|v| !v.is_empty())
    }

    fn string(&self, name: &'static str, default: &str) -> Result<String, ConfigError> {
        Ok(self.optional(name).unwrap_or_else(|| default.to_owned()))
    }

    fn parse<T: FromStr>(&self, name: &'static str, default: &str) -> Result<T, ConfigError>
    where
        T::Err: std::fmt::Display,
    {
        let value = self.string(name, default)?;
        value.parse().map_err(|e: T::Err| ConfigError {
            name,
            value,
            reason: e.to_string(),
        })
    }

    fn duration(&self, name: &'static str, default: &str) -> Result<Duration, ConfigError> {
        let value = self.string(name, default)?;
        humantime::parse_duration(&value).map_err(|e| ConfigError {
            name,
            value,
            reason: format!("{e} (use e.g. 30s, 5m, 24h)"),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn config(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let vars: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Config::from_lookup(|name| vars.get(name).cloned())
    }

    #[test]
    fn debug_does_not_print_the_database_password() {
        let c = config(&[("DATABASE_URL", "postgres://mana:hunter2@db/mana")]).unwrap();
        let printed = format!("{c:?}");
        assert!(!printed.contains("hunter2"), "{printed}");
        assert!(printed.contains("database_url"), "{printed}");
    }

    #[test]
    fn defaults_are_the_seed_services() {
        let c = config(&[]).unwrap();
        assert_eq!(c.port, 3050);
        assert_eq!(c.jwks_url, None, "no JWKS_URL: local mode");
        assert!(c.database_url.is_none(), "no DATABASE_URL: SQLite in DATA_DIR");
        assert_eq!(c.data_dir, std::path::PathBuf::from("./data"));
        assert!(c.host.is_loopback(), "local mode listens on loopback");
        let remote = config(&[("JWKS_URL", "https://auth.example/jwks")]).unwrap();
        assert!(remote.host.is_unspecified());
        assert_eq!(c.max_clock_skew, Duration::from_secs(300));
    }

    #[test]
    fn a_malformed_setting_is_reported_by_name() {
        let e = config(&[("PORT", "eighty")]).unwrap_err();
        assert_eq!(e.name, "PORT");
        assert!(
            e.to_string().starts_with("invalid configuration: PORT=\"eighty\""),
            "{e}"
        );
        assert_eq!(
            config(&[("MAX_CLOCK_SKEW", "soon")]).unwrap_err().name,
            "MAX_CLOCK_SKEW"
        );
    }

    #[test]
    fn cors_origins_are_split_and_trimmed() {
        let c = config(&[("CORS_ORIGINS", "https://a.example, https://b.example/ ,")]).unwrap();
        assert_eq!(c.cors_origins, vec!["https://a.example", "https://b.example"]);
    }
}
