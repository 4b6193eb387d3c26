//! Every error code the API answers with: one enum, so the server cannot
//! send a code nobody documented, and the spec declares them as an `enum`
//! that generated clients can switch on.

use poem_openapi::Enum;

/// Stable machine-readable error code: what went wrong, for a program to
/// act on (the status says whether to retry; the message is for people).
/// The README's "Errors" section lists every code with its status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Enum, serde::Serialize, serde::Deserialize)]
#[oai(rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    // 400: input no retry could make acceptable.
    /// 400: a body that is not JSON or not the operation's shape, a
    /// malformed parameter, or a body whose reading failed.
    BadRequest,
    /// 400: an app, table, field, record or client id that is empty, too
    /// long, holds control characters or is not printable ASCII (headers).
    InvalidName,
    /// 400: an `Idempotency-Key` that is empty, too long or not printable ASCII.
    InvalidIdempotencyKey,
    /// 400: a `since` that is not a cursor this server gave.
    InvalidCursor,
    /// 400: a time that is not RFC 3339 (or, for record times, epoch
    /// milliseconds), or a `deletedAt` that is neither a time nor null.
    InvalidTimestamp,
    /// 400: no client id, in neither `X-Client-Id` nor the body's `clientId`.
    MissingClientId,
    /// 400: an insert without `data`.
    MissingData,
    /// 400: an update with neither `fields` nor `data`.
    MissingFields,
    /// 400: a change whose `data.id` differs from its `id`.
    IdMismatch,
    /// 400: a NUL character (`\u0000`) in a name, id, key or string value.
    NulCharacter,
    /// 400: a number with more than 1,000 digits written out, either side of the point.
    NumberOutOfRange,
    /// 400: a `schemaVersion` below 1 or above the highest this server knows.
    UnsupportedSchemaVersion,
    /// 400: an `actor` that takes more than 4 KiB as JSON.
    InvalidActor,
    /// 400: a change stream naming more than 100 collections, or an empty one.
    TooManyCollections,
    // 401 and 403.
    /// 401: no bearer token, or one that is malformed, badly signed,
    /// expired, not yet valid, or for another issuer or audience.
    Unauthorized,
    /// 403: a browser request from an origin `CORS_ORIGINS` does not allow.
    Forbidden,
    // 404, 405, 408, 413, 415.
    /// 404: no such route.
    NotFound,
    /// 405: the route does not take this method.
    MethodNotAllowed,
    /// 408: a body that stopped arriving or came slower than `BODY_MIN_RATE`.
    RequestTimeout,
    /// 413: a body over 10 MB.
    PayloadTooLarge,
    /// 413: a push of more changes than `MAX_BATCH_CHANGES`.
    TooManyChanges,
    /// 415: a body that is not `application/json`.
    UnsupportedMediaType,
    // 422: well-formed, but refused as it stands.
    /// 422: an `Idempotency-Key` already used for a different request.
    IdempotencyKeyReused,
    /// 422: the push would take its user over `MAX_RECORDS_PER_USER`.
    QuotaRecords,
    /// 422: the push would take its user over `MAX_BYTES_PER_USER`.
    QuotaBytes,
    /// 422: the push would give a record more than `MAX_FIELDS_PER_RECORD` fields.
    QuotaFields,
    // 429: this user, slowed down; retry after `Retry-After`.
    /// 429: the user is over a rate limit (pushes, pulls, stream opens, or push bytes).
    RateLimited,
    /// 429: the user holds as many requests in flight, or request bodies,
    /// or answers not yet taken, as one user may.
    TooManyRequests,
    /// 429: opening this stream would pass a connection limit.
    TooManyConnections,
    /// 429: the push waited longer than `LOCK_TIMEOUT` for its turn, or
    /// every database connection stayed in use.
    Busy,
    // 5xx: the server's side; retry after `Retry-After` where given.
    /// 500: a fault of the server, logged with its cause, never described.
    Internal,
    /// 503: the database cannot be reached.
    Unavailable,
    /// 503: the database is out of disk space or memory (`Retry-After: 30`).
    StorageExhausted,
    /// 503: the replica holds `BODY_BUDGET` of bodies or `ANSWER_BUDGET` of answers already.
    Overloaded,
}
