//! The one place where errors become HTTP answers.
//!
//! Every error is JSON `{code, message}`. [`Answer`] maps the domain's
//! [`Error`], a refused token and a refused subscription to a status; each
//! operation's own error type (declared beside it, with
//! [`operation_errors!`]) lists in the spec exactly the statuses that
//! operation can give. [`json_error`] gives poem's own refusals (no route,
//! a malformed parameter or body, a body over the limit) the same shape.

use poem::http::StatusCode;
use poem_openapi::{ApiResponse, Object, payload::Json};

use crate::auth::AuthError;
use crate::error::{Error, ErrorCode};
use crate::hub::Refusal;
use crate::protocol::MAX_BODY_BYTES;

/// The body of every error response.
#[derive(Debug, Clone, Object, serde::Deserialize)]
pub struct ErrorBody {
    // No `///` here: the enum's own description says what the code is,
    // and a field's description beside a `$ref` makes poem-openapi wrap
    // it in `allOf`, which openapi-python-client cannot read.
    pub code: ErrorCode,
    /// Human-readable explanation.
    pub message: String,
}

fn body(code: ErrorCode, message: impl Into<String>) -> Json<ErrorBody> {
    Json(ErrorBody {
        code,
        message: message.into(),
    })
}

/// An error as the API answers it, whatever the operation.
#[derive(Debug, ApiResponse)]
pub enum Answer {
    #[oai(status = 400)]
    BadRequest(Json<ErrorBody>),
    #[oai(status = 401)]
    Unauthorized(Json<ErrorBody>),
    #[oai(status = 413)]
    PayloadTooLarge(Json<ErrorBody>),
    #[oai(status = 408)]
    RequestTimeout(Json<ErrorBody>),
    #[oai(status = 422)]
    Unprocessable(Json<ErrorBody>),
    #[oai(status = 429)]
    TooManyRequests(Json<ErrorBody>, #[oai(header = "Retry-After")] u32),
    #[oai(status = 500)]
    Internal(Json<ErrorBody>),
    #[oai(status = 503)]
    ServiceUnavailable(Json<ErrorBody>, #[oai(header = "Retry-After")] u32),
}

impl From<Error> for Answer {
    fn from(e: Error) -> Self {
        match e {
            Error::Invalid { code, message } => Answer::BadRequest(body(code, message)),
            Error::TooLarge { code, message } => Answer::PayloadTooLarge(body(code, message)),
            Error::OverQuota { code, message, .. } => Answer::Unprocessable(body(code, message)),
            e @ Error::IdempotencyKeyReused(_) => {
                Answer::Unprocessable(body(ErrorCode::IdempotencyKeyReused, e.to_string()))
            }
            e @ Error::Busy => Answer::TooManyRequests(body(ErrorCode::Busy, e.to_string()), 1),
            e @ Error::Unavailable => Answer::ServiceUnavailable(body(ErrorCode::Unavailable, e.to_string()), 2),
            e @ Error::Exhausted => {
                Answer::ServiceUnavailable(body(ErrorCode::StorageExhausted, e.to_string()), EXHAUSTED_RETRY_AFTER)
            }
            e @ Error::RateLimited(wait) => {
                Answer::TooManyRequests(body(ErrorCode::RateLimited, e.to_string()), retry_after(wait))
            }
            Error::Internal(e) => {
                tracing::error!(error = ?e, "request failed");
                Answer::Internal(internal())
            }
        }
    }
}

impl From<&AuthError> for Answer {
    fn from(e: &AuthError) -> Self {
        tracing::debug!(reason = e.reason(), "token rejected: {e}");
        Answer::Unauthorized(body(ErrorCode::Unauthorized, e.to_string()))
    }
}

impl From<Refusal> for Answer {
    fn from(refusal: Refusal) -> Self {
        Answer::TooManyRequests(body(ErrorCode::TooManyConnections, refusal.to_string()), 5)
    }
}

impl Answer {
    /// A request with a body but no bearer token.
    pub fn missing_token() -> Answer {
        Answer::Unauthorized(body(ErrorCode::Unauthorized, "a bearer token is required"))
    }

    /// A body over [`MAX_BODY_BYTES`], declared or found while reading.
    pub fn body_too_large() -> Answer {
        Answer::PayloadTooLarge(body(
            ErrorCode::PayloadTooLarge,
            format!(
                "the request body is over the {} MB limit",
                MAX_BODY_BYTES / (1024 * 1024)
            ),
        ))
    }

    /// A body that stopped arriving, or came slower than `min_rate` bytes a second.
    pub fn body_too_slow(min_rate: u64) -> Answer {
        Answer::RequestTimeout(body(
            ErrorCode::RequestTimeout,
            format!("the request body came too slowly (less than {min_rate} bytes a second, or a long pause)"),
        ))
    }

    /// A body whose reading failed (the client went away, or broke the framing).
    pub fn body_unreadable(e: &std::io::Error) -> Answer {
        Answer::BadRequest(body(
            ErrorCode::BadRequest,
            format!("the request body could not be read: {e}"),
        ))
    }

    /// The replica holds as many request bodies, or answers not yet taken,
    /// as its budgets allow.
    pub fn overloaded() -> Answer {
        Answer::ServiceUnavailable(
            body(
                ErrorCode::Overloaded,
                "the server is handling too many requests at once; retry shortly",
            ),
            1,
        )
    }

    /// The user holds as much of the replica (`what`: requests in flight,
    /// request bodies) as one user may.
    pub fn user_over_share(what: &str) -> Answer {
        Answer::TooManyRequests(
            body(
                ErrorCode::TooManyRequests,
                format!("this user holds as many {what} at once as one user may; retry shortly"),
            ),
            1,
        )
    }

    /// The body of a 500 for an operation whose error type has no place
    /// for this answer: a fault of the server (its spec tells clients
    /// nothing of it), logged as such.
    pub fn unlisted(self, operation: &str) -> Json<ErrorBody> {
        if !matches!(self, Answer::Internal(_)) {
            tracing::error!(operation, answer = ?self, "an operation gave an error its spec does not list");
        }
        internal()
    }
}

/// How long a client is asked to wait after the database ran out of disk
/// or memory: freeing either takes an operator, not a moment.
const EXHAUSTED_RETRY_AFTER: u32 = 30;

/// Whole seconds for `Retry-After`, rounded up (at least 1).
pub fn retry_after(wait: std::time::Duration) -> u32 {
    u32::try_from(wait.as_secs() + u64::from(wait.subsec_nanos() > 0))
        .unwrap_or(u32::MAX)
        .max(1)
}

/// What a request whose handler panicked gets: a 500 like any server
/// fault, rather than a connection closed without an answer. The panic
/// itself is printed by the panic hook.
pub fn panicked(_: Box<dyn std::any::Any + Send + 'static>) -> poem::Response {
    tracing::error!("a request handler panicked");
    json_response(
        StatusCode::INTERNAL_SERVER_ERROR,
        ErrorCode::Internal,
        "internal server error",
    )
}

fn internal() -> Json<ErrorBody> {
    body(ErrorCode::Internal, "internal server error")
}

/// Declares how `$operation`'s error type (an `ApiResponse` enum with
/// variants `BadRequest`, `Unauthorized`, `TooManyRequests`, `Internal`
/// and `ServiceUnavailable`, plus the `$extra` ones with a body alone, named as in
/// [`Answer`]) is made
/// from an [`Answer`] and, through it, from an [`Error`], so `?` works in
/// the operation.
macro_rules! operation_errors {
    ($operation:ident $(, $extra:ident)*) => {
        impl From<$crate::api::error::Answer> for $operation {
            fn from(answer: $crate::api::error::Answer) -> Self {
                use $crate::api::error::Answer;
                match answer {
                    Answer::BadRequest(body) => $operation::BadRequest(body),
                    Answer::Unauthorized(body) => $operation::Unauthorized(body),
                    Answer::TooManyRequests(body, retry_after) => $operation::TooManyRequests(body, retry_after),
                    Answer::ServiceUnavailable(body, retry_after) => $operation::ServiceUnavailable(body, retry_after),
                    $(Answer::$extra(body) => $operation::$extra(body),)*
                    other => $operation::Internal(other.unlisted(stringify!($operation))),
                }
            }
        }

        impl From<$crate::error::Error> for $operation {
            fn from(e: $crate::error::Error) -> Self {
                $crate::api::error::Answer::from(e).into()
            }
        }
    };
}
pub(crate) use operation_errors;

/// Turns an error poem raised itself (no route, bad payload, missing
/// token, body too large...) into the same JSON shape as ours. Responses
/// built by our handlers pass through untouched.
pub async fn json_error(err: poem::Error) -> poem::Response {
    if err.is_from_response() {
        return err.into_response();
    }
    let status = err.status();
    let code = match status {
        StatusCode::BAD_REQUEST => ErrorCode::BadRequest,
        StatusCode::UNAUTHORIZED => ErrorCode::Unauthorized,
        StatusCode::FORBIDDEN => ErrorCode::Forbidden,
        StatusCode::NOT_FOUND => ErrorCode::NotFound,
        StatusCode::METHOD_NOT_ALLOWED => ErrorCode::MethodNotAllowed,
        StatusCode::PAYLOAD_TOO_LARGE => ErrorCode::PayloadTooLarge,
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ErrorCode::UnsupportedMediaType,
        StatusCode::TOO_MANY_REQUESTS => ErrorCode::Busy,
        s if s.is_client_error() => ErrorCode::BadRequest,
        _ => ErrorCode::Internal,
    };
    let message = if status.is_server_error() {
        tracing::error!(error = %err, "request failed");
        "internal server error".to_owned()
    } else {
        err.to_string()
    };
    json_response(status, code, &message)
}

/// `{code, message}` with `status`, built outside poem-openapi.
fn json_response(status: StatusCode, code: ErrorCode, message: &str) -> poem::Response {
    poem::Response::builder()
        .status(status)
        .content_type("application/json")
        .body(serde_json::json!({ "code": code, "message": message }).to_string())
}
