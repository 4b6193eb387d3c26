//! Replay of a push under its `Idempotency-Key`.
//!
//! What is kept of a push is small and the same size whatever the answer
//! was: the request's [`fingerprint`] and the batch's first log position.
//! A retry records nothing and is answered afresh from the projection
//! ([`replay_since`]), which still holds the batch's changes (or what
//! later changes made of its records). A push that records nothing (an
//! empty batch) keeps nothing: answering it again is all a replay would do.
//!
//! Outcomes are kept for `IDEMPOTENCY_TTL`, at most `IDEMPOTENCY_MAX_KEYS`
//! per user (past it the oldest are dropped: a retry comes within minutes,
//! and one whose outcome is gone is recorded again, which the fold makes
//! harmless, rather than refused), and every replica sweeps expired ones
//! of every user every `IDEMPOTENCY_SWEEP_INTERVAL`.

use sha2::{Digest, Sha256};

use crate::cursor::Cursor;

/// What is kept under a key.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// The [`fingerprint`] of the request it answered.
    pub fingerprint: Vec<u8>,
    /// The log position of the batch's first change (`None`: kept by an
    /// earlier release, which did not record it).
    pub first_seq: Option<i64>,
}

/// A digest of what a key was first used for, to tell a retry from a
/// different request reusing the key. `since` is left out on purpose: a
/// device that pulled between two attempts retries with a newer cursor.
pub fn fingerprint(app_id: &str, client_id: &str, changes: &serde_json::Value) -> Vec<u8> {
    let mut hash = Sha256::new();
    for part in [app_id, client_id, &changes.to_string()] {
        hash.update((part.len() as u64).to_be_bytes());
        hash.update(part.as_bytes());
    }
    hash.finalize().to_vec()
}

/// The cursor a replay answers since: the retry's own, or just before the
/// batch if that is older, so the answer holds the batch's changes
/// whatever the device pulled in between (and anything else it has not
/// seen). An outcome of unknown position is answered since the start.
pub fn replay_since(outcome: &Outcome, since: Cursor) -> Cursor {
    match outcome.first_seq {
        Some(first) => since.min(Cursor(first.saturating_sub(1).max(0))),
        None => Cursor::START,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replay_answers_from_before_the_batch_or_the_older_cursor() {
        let outcome = Outcome {
            fingerprint: vec![],
            first_seq: Some(100),
        };
        assert_eq!(replay_since(&outcome, Cursor(500)), Cursor(99), "pulled past the batch");
        assert_eq!(replay_since(&outcome, Cursor(20)), Cursor(20));
        let legacy = Outcome {
            fingerprint: vec![],
            first_seq: None,
        };
        assert_eq!(replay_since(&legacy, Cursor(500)), Cursor::START);
    }
}
