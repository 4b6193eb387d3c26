//! The one error type of the crate and its mapping to HTTP.
//!
//! Client mistakes carry a stable machine-readable `code` and a human
//! `message` and map to a 4xx status; everything else is an opaque 500
//! whose cause chain is logged, never sent.

use poem::http::StatusCode;
use poem_openapi::{ApiResponse, Object, payload::Json};

use crate::auth::AuthError;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed or breaks a documented limit.
    #[error("{message}")]
    Invalid { code: &'static str, message: String },
    /// The request is well-formed but too large to accept.
    #[error("{message}")]
    TooLarge { code: &'static str, message: String },
    /// The token is missing or unacceptable.
    #[error(transparent)]
    Unauthorized(#[from] AuthError),
    /// The idempotency key was already used for a different request.
    #[error("Idempotency-Key '{0}' was already used for a different request")]
    IdempotencyKeyReused(String),
    /// A stream would exceed a connection limit.
    #[error("{0}")]
    TooManyConnections(&'static str),
    /// The request waited too long for its turn (longer than `LOCK_TIMEOUT`
    /// behind other pushes) or for a database connection (every one in use).
    #[error("the server is busy; retry shortly")]
    Busy,
    /// A server-side fault: logged with its cause chain, answered with a bare 500.
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl Error {
    pub fn invalid(code: &'static str, message: impl Into<String>) -> Error {
        Error::Invalid {
            code,
            message: message.into(),
        }
    }

    pub fn too_large(code: &'static str, message: impl Into<String>) -> Error {
        Error::TooLarge {
            code,
            message: message.into(),
        }
    }
}

impl From<crate::hub::Refusal> for Error {
    fn from(refusal: crate::hub::Refusal) -> Self {
        match refusal {
            crate::hub::Refusal::UserLimit => Error::TooManyConnections("too many connections for this user"),
            crate::hub::Refusal::ServerLimit => Error::TooManyConnections("this replica is full; try again"),
            crate::hub::Refusal::ShuttingDown => Error::TooManyConnections("this replica is shutting down; reconnect"),
        }
    }
}

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        // PostgreSQL's SQLSTATE 55P03 lock_not_available (`lock_timeout`
        // expired), or SQLite's BUSY (its busy timeout expired: another
        // process writes to the file, which the lock file should prevent).
        if let Some("55P03" | "5" | "261" | "517") = e.as_database_error().and_then(|d| d.code()).as_deref() {
            return Error::Busy;
        }
        Error::Internal(anyhow::Error::new(e).context("database error"))
    }
}

/// The body of every error response.
#[derive(Debug, Clone, Object, serde::Deserialize)]
pub struct ErrorBody {
    /// Stable machine-readable error code, e.g. `invalid_timestamp`, `unauthorized`.
    pub code: String,
    /// Human-readable explanation.
    pub message: String,
}

impl ErrorBody {
    fn json(code: &str, message: impl Into<String>) -> Json<ErrorBody> {
        Json(ErrorBody {
            code: code.to_owned(),
            message: message.into(),
        })
    }
}

/// Error responses of the API.
#[derive(Debug, ApiResponse)]
pub enum ErrorResponse {
    /// The request is malformed: bad JSON, wrong types, an unknown `op`, an
    /// empty, oversized or non-printable name, a NUL character, a bad timestamp or cursor.
    #[oai(status = 400)]
    BadRequest(Json<ErrorBody>),
    /// The bearer token is missing, malformed, expired, or not signed by a key of the JWKS.
    #[oai(status = 401)]
    Unauthorized(Json<ErrorBody>),
    /// The body is over the size limit (10 MB by default) or the batch has too many changes.
    #[oai(status = 413)]
    PayloadTooLarge(Json<ErrorBody>),
    /// The `Idempotency-Key` was already used for a different request.
    #[oai(status = 422)]
    Unprocessable(Json<ErrorBody>),
    /// The server is overloaded (this push waited longer than
    /// `LOCK_TIMEOUT` for its turn, or every database connection stayed in
    /// use), or a connection limit is reached; retry after the given seconds.
    #[oai(status = 429)]
    TooManyRequests(Json<ErrorBody>, #[oai(header = "Retry-After")] u32),
    /// A server fault; details are in the server's log, never in the response.
    #[oai(status = 500)]
    Internal(Json<ErrorBody>),
}

impl From<Error> for ErrorResponse {
    fn from(e: Error) -> Self {
        match e {
            Error::Invalid { code, message } => ErrorResponse::BadRequest(ErrorBody::json(code, message)),
            Error::TooLarge { code, message } => ErrorResponse::PayloadTooLarge(ErrorBody::json(code, message)),
            Error::Unauthorized(e) => {
                tracing::debug!(reason = e.reason(), "token rejected: {e}");
                ErrorResponse::Unauthorized(ErrorBody::json("unauthorized", e.to_string()))
            }
            e @ Error::IdempotencyKeyReused(_) => {
                ErrorResponse::Unprocessable(ErrorBody::json("idempotency_key_reused", e.to_string()))
            }
            e @ Error::Busy => ErrorResponse::TooManyRequests(ErrorBody::json("busy", e.to_string()), 1),
            Error::TooManyConnections(message) => {
                ErrorResponse::TooManyRequests(ErrorBody::json("too_many_connections", message), 5)
            }
            Error::Internal(e) => {
                tracing::error!(error = ?e, "request failed");
                ErrorResponse::Internal(ErrorBody::json("internal", "internal server error"))
            }
        }
    }
}

/// Turns an error poem raised itself (no route, bad payload, missing
/// token, body too large...) into the same JSON shape as ours. Responses
/// built by our handlers pass through untouched.
pub async fn json_error(err: poem::Error) -> poem::Response {
    if err.is_from_response() {
        return err.into_response();
    }
    let status = err.status();
    let code = match status {
        StatusCode::BAD_REQUEST => "bad_request",
        StatusCode::UNAUTHORIZED => "unauthorized",
        StatusCode::FORBIDDEN => "forbidden",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::TOO_MANY_REQUESTS => "busy",
        s if s.is_client_error() => "bad_request",
        _ => "internal",
    };
    let message = if status.is_server_error() {
        tracing::error!(error = %err, "request failed");
        "internal server error".to_owned()
    } else {
        err.to_string()
    };
    poem::Response::builder()
        .status(status)
        .content_type("application/json")
        .body(serde_json::json!({ "code": code, "message": message }).to_string())
}
