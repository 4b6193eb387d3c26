//! Bearer-token authentication against the auth service's JWKS.
//!
//! Tokens are JWTs signed with EdDSA (Ed25519), as the auth service issues,
//! or RS256/ES256 when the JWKS publishes such keys. The header must name
//! its key (`kid`) and its algorithm must be the key's. Keys are cached: an
//! unknown `kid` triggers at most one JWKS fetch per
//! `JWKS_MIN_REFRESH_INTERVAL` however many requests carry it, and when the
//! JWKS is unreachable, tokens signed by cached keys keep working.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet, KeyAlgorithm, OctetKeyPairType};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::clock::Clock;
use crate::config::Config;
use crate::protocol::{MAX_ID_CHARS, MAX_SUBJECT_BYTES, check_text};

pub mod local;

use self::local::LocalIssuer;

/// The authenticated caller: the token's `sub`. Every read and write is scoped to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    pub id: String,
    /// When the token expires (`exp`, seconds since the epoch).
    pub expires_at: u64,
    /// When the token stops being accepted (`exp` plus `JWT_LEEWAY`, by
    /// the shared clock), as this process's instant.
    valid_until: tokio::time::Instant,
}

/// The furthest ahead a token's end is kept as an instant: a token may
/// say `exp` = 2^64 - 1, which no instant reaches.
const FOREVER: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

impl User {
    /// The instant the user's token stops being accepted (a socket or
    /// stream ends then): the same moment a request with it starts getting
    /// 401, leeway included.
    pub fn expiry(&self) -> tokio::time::Instant {
        self.valid_until
    }
}

/// Why a token was refused. Every variant is a 401.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("the token is not a well-formed JWT")]
    Malformed,
    #[error("the token header has no 'kid'")]
    MissingKid,
    #[error("the token's algorithm {0:?} is not accepted")]
    UnsupportedAlgorithm(Algorithm),
    #[error("no key with kid '{0}' in the JWKS")]
    UnknownKey(String),
    #[error("the token's algorithm does not match its key")]
    AlgorithmMismatch,
    #[error("the token signature is invalid")]
    InvalidSignature,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet")]
    NotYetValid,
    #[error("the token's issuer is not accepted")]
    InvalidIssuer,
    #[error("the token's audience is not accepted")]
    InvalidAudience,
    #[error("the token has no usable 'sub'")]
    InvalidSubject,
    #[error("the token is invalid: {0}")]
    Invalid(String),
}

impl AuthError {
    /// A short label for logs and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Malformed => "malformed",
            AuthError::MissingKid => "missing_kid",
            AuthError::UnsupportedAlgorithm(_) => "unsupported_algorithm",
            AuthError::UnknownKey(_) => "unknown_kid",
            AuthError::AlgorithmMismatch => "algorithm_mismatch",
            AuthError::InvalidSignature => "invalid_signature",
            AuthError::Expired => "expired",
            AuthError::NotYetValid => "not_yet_valid",
            AuthError::InvalidIssuer => "invalid_issuer",
            AuthError::InvalidAudience => "invalid_audience",
            AuthError::InvalidSubject => "invalid_subject",
            AuthError::Invalid(_) => "invalid",
        }
    }
}

/// Algorithms accepted from a JWKS; symmetric (HS*) keys never are.
const ACCEPTED: [Algorithm; 7] = [
    Algorithm::EdDSA,
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::ES256,
    Algorithm::ES384,
];

#[derive(Clone)]
struct VerifyingKey {
    key: DecodingKey,
    alg: Algorithm,
}

/// Verifies bearer tokens. Cheap to clone.
#[derive(Clone)]
pub struct Authenticator {
    inner: Arc<Inner>,
}

struct Inner {
    /// `None`: local mode, the only key is the local issuer's.
    jwks_url: Option<String>,
    local: Option<LocalIssuer>,
    http: reqwest::Client,
    keys: RwLock<HashMap<String, VerifyingKey>>,
    /// When the last fetch was attempted; held while fetching, so concurrent
    /// misses wait for one fetch instead of each starting their own.
    last_fetch: tokio::sync::Mutex<Option<Instant>>,
    min_refresh: Duration,
    issuer: Option<String>,
    audience: Option<String>,
    leeway: Duration,
    clock: Clock,
}

#[derive(Deserialize)]
struct Claims {
    sub: Option<String>,
    exp: u64,
    nbf: Option<u64>,
}

/// Most bytes of a JWKS read: a few dozen keys take a few kilobytes, and
/// a JWKS endpoint gone wrong must not take the replica's memory.
pub const MAX_JWKS_BYTES: usize = 1024 * 1024;

impl Authenticator {
    /// Verifies against the JWKS at `JWKS_URL`, or, without one, against
    /// the local issuer's key (created in `DATA_DIR` on first start);
    /// `exp` and `nbf` by `clock`, the time every replica shares.
    pub fn new(config: &Config, clock: Clock) -> anyhow::Result<Authenticator> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .expect("the HTTP client's TLS backend initialises");
        let local = match &config.jwks_url {
            Some(_) => None,
            None => Some(LocalIssuer::load_or_create(&config.data_dir)?),
        };
        let keys = match &local {
            Some(issuer) => verifying_keys(&serde_json::from_value(issuer.jwks()).expect("the local JWKS parses")),
            None => HashMap::new(),
        };
        Ok(Authenticator {
            inner: Arc::new(Inner {
                jwks_url: config.jwks_url.clone(),
                local,
                http,
                keys: RwLock::new(keys),
                last_fetch: tokio::sync::Mutex::new(None),
                min_refresh: config.jwks_min_refresh,
                issuer: config.jwt_issuer.clone(),
                audience: config.jwt_audience.clone(),
                leeway: config.jwt_leeway,
                clock,
            }),
        })
    }

    /// The local issuer, in local mode.
    pub fn local(&self) -> Option<&LocalIssuer> {
        self.inner.local.as_ref()
    }

    /// Checks a token and returns its user.
    pub async fn verify(&self, token: &str) -> Result<User, AuthError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::Malformed)?;
        let kid = header.kid.ok_or(AuthError::MissingKid)?;
        if !ACCEPTED.contains(&header.alg) {
            return Err(AuthError::UnsupportedAlgorithm(header.alg));
        }
        let key = self.key(&kid).await?;
        if key.alg != header.alg {
            return Err(AuthError::AlgorithmMismatch);
        }
        let mut validation = Validation::new(key.alg);
        // `exp` and `nbf` are checked below, by the shared clock rather
        // than this host's.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        // A configured issuer or audience must be present, not merely match when present.
        let mut required = vec!["exp", "sub"];
        match &self.inner.issuer {
            Some(iss) => {
                validation.set_issuer(&[iss]);
                required.push("iss");
            }
            None => validation.iss = None,
        }
        match &self.inner.audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);
        let claims = jsonwebtoken::decode::<Claims>(token, &key.key, &validation)
            .map_err(classify)?
            .claims;
        let now = self.inner.clock.unix_seconds();
        let leeway = self.inner.leeway.as_secs();
        let valid_for = claims.exp.saturating_add(leeway).checked_sub(now);
        if valid_for.is_none_or(|left| left == 0) {
            return Err(AuthError::Expired);
        }
        if claims.nbf.is_some_and(|nbf| nbf > now.saturating_add(leeway)) {
            return Err(AuthError::NotYetValid);
        }
        let valid_for = Duration::from_secs(valid_for.unwrap_or(0)).min(FOREVER);
        match claims.sub {
            Some(sub) if sub.len() <= MAX_SUBJECT_BYTES && check_text(&sub, MAX_ID_CHARS).is_ok() => Ok(User {
                id: sub,
                expires_at: claims.exp,
                valid_until: tokio::time::Instant::now() + valid_for,
            }),
            _ => Err(AuthError::InvalidSubject),
        }
    }

    async fn key(&self, kid: &str) -> Result<VerifyingKey, AuthError> {
        if let Some(key) = self.cached(kid) {
            return Ok(key);
        }
        self.refresh(false).await;
        self.cached(kid).ok_or_else(|| AuthError::UnknownKey(kid.to_owned()))
    }

    fn cached(&self, kid: &str) -> Option<VerifyingKey> {
        self.inner.keys.read().expect("key cache lock").get(kid).cloned()
    }

    /// Fetches the JWKS unless one was fetched within the minimum interval
    /// (`force` ignores the interval). A failed fetch keeps the cached keys.
    pub async fn refresh(&self, force: bool) {
        let Some(url) = &self.inner.jwks_url else { return };
        let mut last = self.inner.last_fetch.lock().await;
        if !force && last.is_some_and(|at| at.elapsed() < self.inner.min_refresh) {
            return;
        }
        *last = Some(Instant::now());
        match self.fetch(url).await {
            // An empty set is far likelier a fault of the auth service than
            // the revocation of every key: keep what we have.
            Ok(keys) if keys.is_empty() => {
                tracing::warn!(url = %url, "JWKS has no usable keys; keeping cached keys")
            }
            Ok(keys) => {
                tracing::debug!(keys = keys.len(), url = %url, "JWKS fetched");
                *self.inner.keys.write().expect("key cache lock") = keys;
            }
            Err(e) => tracing::warn!(error = ?e, url = %url, "JWKS fetch failed; keeping cached keys"),
        }
    }

    // The URL is left out: it may carry credentials.
    #[tracing::instrument(name = "jwks.fetch", skip_all, fields(keys = tracing::field::Empty), err)]
    async fn fetch(&self, url: &str) -> anyhow::Result<HashMap<String, VerifyingKey>> {
        let response = self.inner.http.get(url).send().await?.error_for_status()?;
        // Read within a bound, whatever the declared length says.
        let body = http_body_util::Limited::new(reqwest::Body::from(response), MAX_JWKS_BYTES)
            .collect()
            .await
            .map_err(|e| anyhow::anyhow!("the JWKS could not be read within {MAX_JWKS_BYTES} bytes: {e}"))?
            .to_bytes();
        let set: JwkSet = serde_json::from_slice(&body)?;
        let keys = verifying_keys(&set);
        tracing::Span::current().record("keys", keys.len());
        Ok(keys)
    }

    /// Fetches the JWKS at once, then again every `interval`, so rotated
    /// keys are known before the first token signed by them arrives.
    pub fn spawn_refresh(&self, interval: Duration) -> tokio::task::JoinHandle<()> {
        let auth = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            loop {
                tick.tick().await;
                auth.refresh(true).await;
            }
        })
    }
}

/// The keys of a JWKS we accept, by `kid` (a key without one cannot be named by a token).
fn verifying_keys(set: &JwkSet) -> HashMap<String, VerifyingKey> {
    set.keys
        .iter()
        .filter_map(|jwk| match verifying_key(jwk) {
            Some(key) => Some((jwk.common.key_id.clone()?, key)),
            None => {
                tracing::debug!(kid = ?jwk.common.key_id, "skipping a JWK of an unsupported type");
                None
            }
        })
        .collect()
}

/// The key and algorithm a JWK stands for, if it is one we accept.
fn verifying_key(jwk: &Jwk) -> Option<VerifyingKey> {
    let implied = match &jwk.algorithm {
        AlgorithmParameters::OctetKeyPair(p)
            if p.key_type == OctetKeyPairType::OctetKeyPair && p.curve == EllipticCurve::Ed25519 =>
        {
            Algorithm::EdDSA
        }
        AlgorithmParameters::RSA(_) => Algorithm::RS256,
        AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => Algorithm::ES256,
        AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P384 => Algorithm::ES384,
        _ => return None,
    };
    let alg = match jwk.common.key_algorithm {
        None => implied,
        Some(KeyAlgorithm::EdDSA) => Algorithm::EdDSA,
        Some(KeyAlgorithm::RS256) => Algorithm::RS256,
        Some(KeyAlgorithm::RS384) => Algorithm::RS384,
        Some(KeyAlgorithm::RS512) => Algorithm::RS512,
        Some(KeyAlgorithm::PS256) => Algorithm::PS256,
        Some(KeyAlgorithm::ES256) => Algorithm::ES256,
        Some(KeyAlgorithm::ES384) => Algorithm::ES384,
        Some(_) => return None,
    };
    if !ACCEPTED.contains(&alg) || alg.family() != implied.family() {
        return None;
    }
    Some(VerifyingKey {
        key: DecodingKey::from_jwk(jwk).ok()?,
        alg,
    })
}

fn classify(e: jsonwebtoken::errors::Error) -> AuthError {
    use jsonwebtoken::errors::ErrorKind;
    match e.kind() {
        ErrorKind::InvalidSignature => AuthError::InvalidSignature,
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::ImmatureSignature => AuthError::NotYetValid,
        ErrorKind::InvalidIssuer => AuthError::InvalidIssuer,
        ErrorKind::InvalidAudience => AuthError::InvalidAudience,
        ErrorKind::MissingRequiredClaim(c) if c == "sub" => AuthError::InvalidSubject,
        ErrorKind::MissingRequiredClaim(c) if c == "iss" => AuthError::InvalidIssuer,
        ErrorKind::MissingRequiredClaim(c) if c == "aud" => AuthError::InvalidAudience,
        ErrorKind::InvalidToken | ErrorKind::Base64(_) | ErrorKind::Json(_) | ErrorKind::Utf8(_) => {
            AuthError::Malformed
        }
        other => AuthError::Invalid(format!("{other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::timestamp::Timestamp;

    /// A local-mode authenticator whose shared clock is `ahead` of this host's.
    fn authenticator(dir: &std::path::Path, ahead: Duration) -> (Authenticator, LocalIssuer) {
        let config = Config::from_lookup(|name| match name {
            "DATA_DIR" => Some(dir.display().to_string()),
            "JWT_LEEWAY" => Some("30s".to_owned()),
            _ => None,
        })
        .unwrap();
        let clock = Clock::default();
        let now = Timestamp::now();
        clock.measured(now, Timestamp(now.0 + ahead.as_nanos() as i64), now);
        let auth = Authenticator::new(&config, clock).unwrap();
        (auth, LocalIssuer::load_or_create(dir).unwrap())
    }

    /// A replica whose own clock is ten minutes slow still refuses a token
    /// that expired by the shared clock, and its sockets end with it.
    #[tokio::test]
    async fn tokens_are_checked_by_the_shared_clock() {
        let dir = tempfile::tempdir().unwrap();
        let (auth, issuer) = authenticator(dir.path(), Duration::from_secs(600));
        let nine_minutes = issuer.token("alice", Duration::from_secs(540)).unwrap();
        assert!(matches!(auth.verify(&nine_minutes).await, Err(AuthError::Expired)));
        let eleven_minutes = issuer.token("alice", Duration::from_secs(660)).unwrap();
        let user = auth.verify(&eleven_minutes).await.unwrap();
        let left = user.expiry() - tokio::time::Instant::now();
        // 60 s left by the shared clock, plus the 30 s leeway.
        assert!(
            left > Duration::from_secs(60) && left <= Duration::from_secs(90),
            "{left:?}"
        );
    }
}
