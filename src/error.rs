//! The domain's one error type.
//!
//! Client mistakes carry a stable machine-readable `code` and a human
//! `message`; everything else is [`Error::Internal`], whose cause chain is
//! logged, never sent. Which HTTP status each becomes is decided in one
//! place, `api::error`.

pub use crate::protocol::ErrorCode;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed or breaks a documented limit.
    #[error("{message}")]
    Invalid { code: ErrorCode, message: String },
    /// The request is well-formed but too large to accept.
    #[error("{message}")]
    TooLarge { code: ErrorCode, message: String },
    /// The push would take its user over a storage quota (`limit`: records,
    /// bytes or fields); nothing was recorded.
    #[error("{message}")]
    OverQuota {
        code: ErrorCode,
        limit: &'static str,
        message: String,
    },
    /// The idempotency key was already used for a different request.
    #[error("Idempotency-Key '{0}' was already used for a different request")]
    IdempotencyKeyReused(String),
    /// The request waited too long for its turn (longer than `LOCK_TIMEOUT`
    /// behind other pushes) or for a database connection (every one in use).
    #[error("the server is busy; retry shortly")]
    Busy,
    /// The database cannot be reached (down, restarting, or not yet
    /// migrated at start-up); nothing was recorded.
    #[error("the database cannot be reached; retry shortly")]
    Unavailable,
    /// The database refused a write for want of a resource (its disk is
    /// full, or it is out of memory); nothing was recorded, and a retry at
    /// once would fail the same way.
    #[error("the database is out of disk space or memory; retry later")]
    Exhausted,
    /// The user went over a rate limit; the next attempt is allowed after this long.
    #[error("too many requests from this user; retry after the given time")]
    RateLimited(std::time::Duration),
    /// A server-side fault: logged with its cause chain, answered with a bare 500.
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl Error {
    pub fn invalid(code: ErrorCode, message: impl Into<String>) -> Error {
        Error::Invalid {
            code,
            message: message.into(),
        }
    }

    pub fn too_large(code: ErrorCode, message: impl Into<String>) -> Error {
        Error::TooLarge {
            code,
            message: message.into(),
        }
    }
}
