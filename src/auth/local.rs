//! Local mode: when no `JWKS_URL` is configured the server is its own
//! token issuer. On first start it creates an Ed25519 key pair in the data
//! directory (private key file mode 0600), accepts tokens signed by it,
//! publishes the public key at `/.well-known/jwks.json`, and
//! `mana-sync token --sub alice` prints a token signed by it.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use base64::Engine as _;
use ed25519_dalek::SigningKey;
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey, spki::der::pem::LineEnding};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

/// The key file inside the data directory.
pub const KEY_FILE: &str = "local-signing-key.pem";

/// The local issuer's key pair.
pub struct LocalIssuer {
    signing: SigningKey,
    /// The public key, base64url (the JWK's `x`).
    x: String,
    pub kid: String,
}

impl LocalIssuer {
    /// Loads the key from `data_dir`, creating the directory and a new key
    /// (mode 0600) on first use.
    pub fn load_or_create(data_dir: &Path) -> anyhow::Result<LocalIssuer> {
        let path = data_dir.join(KEY_FILE);
        let signing = if path.exists() {
            let pem = std::fs::read_to_string(&path).with_context(|| format!("failed to read {}", path.display()))?;
            SigningKey::from_pkcs8_pem(&pem)
                .with_context(|| format!("{} is not an Ed25519 PKCS#8 key", path.display()))?
        } else {
            crate::config::create_data_dir(data_dir)?;
            let mut seed = [0u8; 32];
            getrandom::fill(&mut seed).map_err(|e| anyhow::anyhow!("no randomness for a key: {e}"))?;
            let signing = SigningKey::from_bytes(&seed);
            let pem = signing
                .to_pkcs8_pem(LineEnding::LF)
                .context("failed to encode the key")?;
            write_private(&path, pem.as_bytes())?;
            tracing::info!(path = %path.display(), "created the local signing key");
            signing
        };
        let x = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(signing.verifying_key().to_bytes());
        Ok(LocalIssuer {
            kid: format!("local-{}", &x[..16]),
            x,
            signing,
        })
    }

    /// The public key as a JWKS document.
    pub fn jwks(&self) -> Value {
        json!({ "keys": [{ "kty": "OKP", "crv": "Ed25519", "x": self.x, "kid": self.kid, "alg": "EdDSA", "use": "sig" }] })
    }

    /// A token for `sub`, valid for `ttl`.
    pub fn token(&self, sub: &str, ttl: Duration) -> anyhow::Result<String> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
        let claims = json!({ "sub": sub, "iat": now, "nbf": now, "exp": now + ttl.as_secs() });
        let pem = self
            .signing
            .to_pkcs8_pem(LineEnding::LF)
            .context("failed to encode the key")?;
        let key = EncodingKey::from_ed_pem(pem.as_bytes())?;
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.kid.clone());
        Ok(jsonwebtoken::encode(&header, &claims, &key)?)
    }
}

#[cfg(unix)]
fn write_private(path: &PathBuf, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("failed to create {}", path.display()))?;
    file.write_all(bytes)?;
    Ok(())
}

#[cfg(not(unix))]
fn write_private(path: &PathBuf, bytes: &[u8]) -> anyhow::Result<()> {
    std::fs::write(path, bytes).with_context(|| format!("failed to create {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_is_created_once_private_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let first = LocalIssuer::load_or_create(&dir.path().join("data")).unwrap();
        let again = LocalIssuer::load_or_create(&dir.path().join("data")).unwrap();
        assert_eq!(first.kid, again.kid);
        assert_eq!(first.jwks(), again.jwks());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("data").join(KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let token = first.token("alice", Duration::from_secs(60)).unwrap();
        let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(first.jwks()["keys"][0].clone()).unwrap();
        let mut validation = jsonwebtoken::Validation::new(Algorithm::EdDSA);
        validation.validate_aud = false;
        let decoded =
            jsonwebtoken::decode::<Value>(&token, &jsonwebtoken::DecodingKey::from_jwk(&jwk).unwrap(), &validation);
        assert_eq!(decoded.unwrap().claims["sub"], "alice");
    }
}
