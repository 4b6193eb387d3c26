//! JWT signing keys, tokens and a JWKS server for tests.
//!
//! The keys are fixed files under `tests/fixtures/` (made once with the
//! `openssl` CLI, see `tests/fixtures/README.md`); public JWKs are derived from
//! them at run time with `jsonwebtoken::jwk::Jwk::from_encoding_key`.
//!
//! Published keys (in [`default_jwks`]): [`TestKey::ed`] (`ed-1`, EdDSA),
//! [`TestKey::rsa`] (`rsa-1`, RS256), [`TestKey::ec`] (`ec-1`, ES256).
//! [`TestKey::foreign`] (`ed-foreign`, EdDSA) is never published: a token
//! it signs must be rejected — also when re-labelled `.with_kid(ED_KID)`.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header};
use serde_json::{Value, json};

/// `iss` of the tokens made here.
pub const ISSUER: &str = "https://auth.mana.test";
/// `aud` of the tokens made here.
pub const AUDIENCE: &str = "mana-sync";

pub const ED_KID: &str = "ed-1";
pub const RSA_KID: &str = "rsa-1";
pub const EC_KID: &str = "ec-1";
pub const FOREIGN_KID: &str = "ed-foreign";

const ED_PEM: &str = include_str!("../fixtures/ed25519.pem");
const ED_PUB_PEM: &str = include_str!("../fixtures/ed25519.pub.pem");
const FOREIGN_PEM: &str = include_str!("../fixtures/ed25519_foreign.pem");
const FOREIGN_PUB_PEM: &str = include_str!("../fixtures/ed25519_foreign.pub.pem");
const RSA_PEM: &str = include_str!("../fixtures/rsa2048.pem");
const RSA_PUB_PEM: &str = include_str!("../fixtures/rsa2048.pub.pem");
const EC_PEM: &str = include_str!("../fixtures/ec_p256.pem");
const EC_PUB_PEM: &str = include_str!("../fixtures/ec_p256.pub.pem");

/// A signing key with the `kid` and `alg` it is published (or not) under.
#[derive(Clone, Debug)]
pub struct TestKey {
    pub kid: String,
    pub alg: Algorithm,
    private_pem: &'static str,
    public_pem: &'static str,
}

impl TestKey {
    /// Ed25519, kid `ed-1`, EdDSA — the default key.
    pub fn ed() -> Self {
        Self::new(ED_KID, Algorithm::EdDSA, ED_PEM, ED_PUB_PEM)
    }

    /// A second Ed25519 key, kid `ed-foreign`, that no JWKS here publishes.
    pub fn foreign() -> Self {
        Self::new(FOREIGN_KID, Algorithm::EdDSA, FOREIGN_PEM, FOREIGN_PUB_PEM)
    }

    /// RSA 2048, kid `rsa-1`, RS256.
    pub fn rsa() -> Self {
        Self::new(RSA_KID, Algorithm::RS256, RSA_PEM, RSA_PUB_PEM)
    }

    /// EC P-256, kid `ec-1`, ES256.
    pub fn ec() -> Self {
        Self::new(EC_KID, Algorithm::ES256, EC_PEM, EC_PUB_PEM)
    }

    fn new(kid: &str, alg: Algorithm, private_pem: &'static str, public_pem: &'static str) -> Self {
        Self {
            kid: kid.to_owned(),
            alg,
            private_pem,
            public_pem,
        }
    }

    /// The same key under another `kid` (e.g. the foreign key posing as `ed-1`,
    /// or a rotated `ed-2`).
    pub fn with_kid(mut self, kid: &str) -> Self {
        self.kid = kid.to_owned();
        self
    }

    /// The same key material announced with another `alg`.
    pub fn with_alg(mut self, alg: Algorithm) -> Self {
        self.alg = alg;
        self
    }

    pub fn private_pem(&self) -> &'static str {
        self.private_pem
    }

    /// The public key as SPKI PEM.
    pub fn public_pem(&self) -> &'static str {
        self.public_pem
    }

    pub fn encoding_key(&self) -> EncodingKey {
        let pem = self.private_pem.as_bytes();
        match self.alg {
            Algorithm::EdDSA => EncodingKey::from_ed_pem(pem),
            Algorithm::RS256 | Algorithm::RS384 | Algorithm::RS512 => EncodingKey::from_rsa_pem(pem),
            Algorithm::PS256 | Algorithm::PS384 | Algorithm::PS512 => EncodingKey::from_rsa_pem(pem),
            Algorithm::ES256 | Algorithm::ES384 => EncodingKey::from_ec_pem(pem),
            other => panic!("no test key for {other:?}"),
        }
        .unwrap_or_else(|e| panic!("load test key {}: {e}", self.kid))
    }

    /// The public JWK (`kty`, `crv`/`x`/`y` or `n`/`e`) with `kid`, `alg`
    /// and `use: sig`.
    pub fn public_jwk(&self) -> Value {
        let jwk = Jwk::from_encoding_key(&self.encoding_key(), self.alg)
            .unwrap_or_else(|e| panic!("JWK of test key {}: {e}", self.kid));
        let mut v = serde_json::to_value(jwk).expect("serialise JWK");
        let obj = v.as_object_mut().expect("JWK is an object");
        obj.retain(|_, val| !val.is_null());
        obj.insert("kid".into(), json!(self.kid));
        obj.insert("alg".into(), json!(alg_name(self.alg)));
        obj.insert("use".into(), json!("sig"));
        v
    }

    /// Verification key built from [`Self::public_jwk`].
    pub fn decoding_key(&self) -> DecodingKey {
        let jwk: Jwk = serde_json::from_value(self.public_jwk()).expect("parse JWK");
        DecodingKey::from_jwk(&jwk).expect("decoding key from JWK")
    }

    /// Signs `claims` with header `{alg, kid, typ: JWT}`.
    pub fn sign(&self, claims: &Value) -> String {
        sign(self, claims)
    }
}

/// The JOSE name of an algorithm (`EdDSA`, `RS256`, `ES256`, ...).
pub fn alg_name(alg: Algorithm) -> String {
    serde_json::to_value(alg)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .expect("alg name")
}

/// `{"keys": [...]}` with the public JWK of each key.
pub fn jwks_json<'a>(keys: impl IntoIterator<Item = &'a TestKey>) -> Value {
    json!({ "keys": keys.into_iter().map(TestKey::public_jwk).collect::<Vec<_>>() })
}

/// The published set: ed-1, rsa-1, ec-1 (not the foreign key).
pub fn default_jwks() -> Value {
    jwks_json(&[TestKey::ed(), TestKey::rsa(), TestKey::ec()])
}

/// Signs `claims` with `key`, header `{alg, kid, typ: JWT}`.
pub fn sign(key: &TestKey, claims: &Value) -> String {
    let mut header = Header::new(key.alg);
    header.kid = Some(key.kid.clone());
    sign_with_header(key, header, claims)
}

/// Signs with `key`'s private key under an arbitrary header (whose `alg`
/// must match the key family).
pub fn sign_with_header(key: &TestKey, header: Header, claims: &Value) -> String {
    jsonwebtoken::encode(&header, claims, &key.encoding_key())
        .unwrap_or_else(|e| panic!("sign test token with {}: {e}", key.kid))
}

/// Signs with `key` but no `kid` in the header.
pub fn sign_without_kid(key: &TestKey, claims: &Value) -> String {
    sign_with_header(key, Header::new(key.alg), claims)
}

/// HS256 token keyed by `secret` (e.g. a public key's bytes — the
/// algorithm-confusion attack), with header `kid`.
pub fn sign_hs256(secret: &[u8], kid: Option<&str>, claims: &Value) -> String {
    let mut header = Header::new(Algorithm::HS256);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, &EncodingKey::from_secret(secret)).expect("sign HS256")
}

/// An unsigned `alg: none` token (empty signature) with header `kid`.
pub fn unsigned_token(kid: Option<&str>, claims: &Value) -> String {
    let mut header = json!({ "alg": "none", "typ": "JWT" });
    if let Some(kid) = kid {
        header["kid"] = json!(kid);
    }
    format!(
        "{}.{}.",
        b64url(header.to_string().as_bytes()),
        b64url(claims.to_string().as_bytes())
    )
}

/// Unix time now, in seconds.
pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64
}

/// Valid claims for `sub`: `iss` [`ISSUER`], `aud` [`AUDIENCE`], `iat` now,
/// `nbf` now - 1, `exp` now + 3600.
pub fn claims_for(sub: &str) -> Value {
    let now = now();
    json!({ "sub": sub, "iss": ISSUER, "aud": AUDIENCE, "iat": now, "nbf": now - 1, "exp": now + 3600 })
}

/// A valid EdDSA token (kid `ed-1`) for `sub`.
pub fn token_for(sub: &str) -> String {
    sign(&TestKey::ed(), &claims_for(sub))
}

/// An EdDSA (`ed-1`) token for `sub` with its claims edited first, e.g.
/// `token_for_with("u", |c| c["iss"] = json!("evil"))` or removing a claim
/// with `c.as_object_mut().unwrap().remove("exp")`.
pub fn token_for_with(sub: &str, edit: impl FnOnce(&mut Value)) -> String {
    let mut claims = claims_for(sub);
    edit(&mut claims);
    sign(&TestKey::ed(), &claims)
}

/// Expired an hour ago (far beyond any leeway).
pub fn expired_token_for(sub: &str) -> String {
    token_for_with(sub, |c| {
        c["iat"] = json!(now() - 7200);
        c["nbf"] = json!(now() - 7200);
        c["exp"] = json!(now() - 3600);
    })
}

/// Not valid until an hour from now.
pub fn not_yet_valid_token_for(sub: &str) -> String {
    token_for_with(sub, |c| {
        c["nbf"] = json!(now() + 3600);
        c["exp"] = json!(now() + 7200);
    })
}

pub fn wrong_issuer_token_for(sub: &str) -> String {
    token_for_with(sub, |c| c["iss"] = json!("https://evil.example"))
}

pub fn wrong_audience_token_for(sub: &str) -> String {
    token_for_with(sub, |c| c["aud"] = json!("some-other-service"))
}

/// Signed by the right key, but without `kid`.
pub fn no_kid_token_for(sub: &str) -> String {
    sign_without_kid(&TestKey::ed(), &claims_for(sub))
}

/// Signed by a published key under a `kid` no JWKS has.
pub fn unknown_kid_token_for(sub: &str) -> String {
    sign(&TestKey::ed().with_kid("no-such-kid"), &claims_for(sub))
}

/// Signed by the unpublished foreign key under its own kid `ed-foreign`.
pub fn foreign_token_for(sub: &str) -> String {
    sign(&TestKey::foreign(), &claims_for(sub))
}

/// Signed by the unpublished foreign key, claiming to be `ed-1`.
pub fn forged_token_for(sub: &str) -> String {
    sign(&TestKey::foreign().with_kid(ED_KID), &claims_for(sub))
}

fn b64url(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

// ---------------------------------------------------------------------------
// JWKS server
// ---------------------------------------------------------------------------

struct JwksState {
    jwks: RwLock<Value>,
    raw_body: RwLock<Option<String>>,
    cache_control: RwLock<Option<String>>,
    failing: AtomicBool,
    delay_ms: AtomicU64,
    hits: Arc<AtomicUsize>,
}

/// A JWKS endpoint on 127.0.0.1 (a random port) for the current tokio
/// runtime. Serves `GET /jwks` (and `/.well-known/jwks.json`), counts every
/// request in `hits`, and can rotate keys, fail (503), stall or serve junk.
/// Stops (closing its connections) when dropped.
pub struct JwksServer {
    /// `http://127.0.0.1:<port>/jwks`
    pub url: String,
    /// `http://127.0.0.1:<port>`
    pub base_url: String,
    /// Requests received (any path, failing or not).
    pub hits: Arc<AtomicUsize>,
    state: Arc<JwksState>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

#[poem::handler]
async fn serve_jwks(poem::web::Data(state): poem::web::Data<&Arc<JwksState>>) -> poem::Response {
    use poem::http::{StatusCode, header};
    state.hits.fetch_add(1, Ordering::SeqCst);
    let delay = state.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    if state.failing.load(Ordering::SeqCst) {
        return poem::Response::builder()
            .status(StatusCode::SERVICE_UNAVAILABLE)
            .body("JWKS temporarily unavailable");
    }
    let body = match state.raw_body.read().unwrap().clone() {
        Some(raw) => raw,
        None => state.jwks.read().unwrap().to_string(),
    };
    let mut resp = poem::Response::builder()
        .status(StatusCode::OK)
        .content_type("application/json");
    if let Some(cc) = state.cache_control.read().unwrap().clone() {
        resp = resp.header(header::CACHE_CONTROL, cc);
    }
    resp.body(body)
}

#[poem::handler]
async fn not_found(poem::web::Data(state): poem::web::Data<&Arc<JwksState>>) -> poem::Response {
    state.hits.fetch_add(1, Ordering::SeqCst);
    poem::Response::builder()
        .status(poem::http::StatusCode::NOT_FOUND)
        .finish()
}

impl JwksServer {
    /// Starts serving `jwks` (a `{"keys": [...]}` document).
    pub async fn start(jwks: Value) -> Self {
        Self::start_on(0, jwks).await
    }

    /// Starts serving `jwks` on 127.0.0.1:`port` (0: any free port).
    pub async fn start_on(port: u16, jwks: Value) -> Self {
        use poem::EndpointExt as _;

        let hits = Arc::new(AtomicUsize::new(0));
        let state = Arc::new(JwksState {
            jwks: RwLock::new(jwks),
            raw_body: RwLock::new(None),
            cache_control: RwLock::new(None),
            failing: AtomicBool::new(false),
            delay_ms: AtomicU64::new(0),
            hits: hits.clone(),
        });
        let app = poem::Route::new()
            .at("/jwks", poem::get(serve_jwks))
            .at("/.well-known/jwks.json", poem::get(serve_jwks))
            .at("/*", not_found)
            .data(state.clone());
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("bind JWKS server");
        let addr = listener.local_addr().expect("JWKS server address");
        let acceptor = poem::listener::TcpAcceptor::from_tokio(listener).expect("JWKS acceptor");
        let (shutdown, stop) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            // On drop: stop accepting and cut open (keep-alive) connections at once.
            let stop = async move {
                let _ = stop.await;
            };
            let _ = poem::Server::new_with_acceptor(acceptor)
                .run_with_graceful_shutdown(app, stop, Some(Duration::ZERO))
                .await;
        });
        let base_url = format!("http://{addr}");
        Self {
            url: format!("{base_url}/jwks"),
            base_url,
            hits,
            state,
            shutdown: Some(shutdown),
        }
    }

    /// Serves [`default_jwks`] (ed-1, rsa-1, ec-1).
    pub async fn start_default() -> Self {
        Self::start(default_jwks()).await
    }

    /// Replaces the served key set (key rotation).
    pub fn set_keys(&self, jwks: Value) {
        *self.state.jwks.write().unwrap() = jwks;
    }

    /// While true, every request gets `503 Service Unavailable`.
    pub fn set_failing(&self, failing: bool) {
        self.state.failing.store(failing, Ordering::SeqCst);
    }

    /// Delays every response (to test fetch timeouts / slow IdPs).
    pub fn set_delay(&self, delay: Duration) {
        self.state.delay_ms.store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// Serves this body verbatim instead of the key set (`None` to undo).
    pub fn set_raw_body(&self, body: Option<&str>) {
        *self.state.raw_body.write().unwrap() = body.map(str::to_owned);
    }

    /// Adds a `Cache-Control` header to JWKS responses (`None` to undo).
    pub fn set_cache_control(&self, value: Option<&str>) {
        *self.state.cache_control.write().unwrap() = value.map(str::to_owned);
    }

    /// Requests received so far.
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    pub fn reset_hits(&self) {
        self.hits.store(0, Ordering::SeqCst);
    }
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}
