//! Replay of a push's first outcome under its `Idempotency-Key`.
//!
//! Outcomes are kept for `IDEMPOTENCY_TTL`. Expired ones are ignored, and
//! removed by the user's next keyed push, so no cross-user sweep is needed
//! (see `store::Tx::save_outcome`).

use serde_json::Value;
use sha2::{Digest, Sha256};

/// The first outcome kept under a key.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// The [`fingerprint`] of the request it answered.
    pub fingerprint: Vec<u8>,
    /// The answer, as its JSON.
    pub response: Value,
}

/// A digest of what a key was first used for, to tell a retry from a
/// different request reusing the key. `since` is left out on purpose: a
/// device that pulled between two attempts retries with a newer cursor,
/// and replaying the first answer (with its older cursor) is still safe.
pub fn fingerprint(app_id: &str, client_id: &str, changes: &Value) -> Vec<u8> {
    let mut hash = Sha256::new();
    for part in [app_id, client_id, &changes.to_string()] {
        hash.update((part.len() as u64).to_be_bytes());
        hash.update(part.as_bytes());
    }
    hash.finalize().to_vec()
}
