//! The sync protocol: its limits, and its wire types as old (Dexie)
//! clients send and read them (camelCase JSON). The types derive
//! poem-openapi's schema traits, so their `///` docs become the OpenAPI
//! schema; nothing here knows of requests, responses or statuses.

mod error_code;
mod text;

use std::collections::BTreeMap;

use poem_openapi::{Enum, Object};
use serde_json::Value;

pub use self::error_code::ErrorCode;
pub use self::text::{BadText, HeaderId, Id, Key, Name, NameList, Since, Text, Time, check_text};

/// Largest accepted request body (over 10 MB is a 413).
pub const MAX_BODY_BYTES: usize = 10 * 1024 * 1024;
/// Longest app id, table (collection) or field name, in characters (as
/// JSON Schema's `maxLength` counts them; at most 512 bytes).
pub const MAX_NAME_CHARS: usize = 128;
/// Longest record id, client id or idempotency key, in characters (at most
/// 1 KiB). PostgreSQL's B-tree entries hold at most 2,704 bytes: a record's
/// key (user, app, table, record id) stays below that with these limits and
/// the token subject's [`MAX_SUBJECT_BYTES`].
pub const MAX_ID_CHARS: usize = 256;
/// Longest user id (a token's `sub`), in bytes: it keys every row.
pub const MAX_SUBJECT_BYTES: usize = 256;
/// A page stops once its records' JSON passes this size (it always holds at
/// least one record), so a page of large records cannot exhaust memory.
pub const MAX_PAGE_BYTES: i64 = 8 * 1024 * 1024;
/// Most digits a JSON number in user data may have, written out in full,
/// on either side of the point.
pub const MAX_NUMBER_DIGITS: usize = 1000;
/// Most collections one change stream follows.
pub const MAX_STREAM_COLLECTIONS: usize = 100;
/// Largest WebSocket message (and frame) a client may send: its messages
/// are `auth` frames, a token and a client id.
pub const MAX_SOCKET_MESSAGE_BYTES: usize = 64 * 1024;
/// Records per pull page when the client names no `limit`.
pub const DEFAULT_PULL_LIMIT: u32 = 1000;
/// The largest `limit` a pull may ask for.
pub const MAX_PULL_LIMIT: u32 = 5000;

/// The kind of a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum, serde::Serialize, serde::Deserialize)]
#[oai(rename_all = "lowercase")]
#[serde(rename_all = "lowercase")]
pub enum Op {
    /// A new record; `data` holds its fields.
    Insert,
    /// Some fields of a record changed; `fields` holds them.
    Update,
    /// The record was (soft-)deleted at `deletedAt`.
    Delete,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Insert => "insert",
            Op::Update => "update",
            Op::Delete => "delete",
        }
    }
}

/// A batch of changes pushed by one device.
#[derive(Debug, Clone, Object)]
#[oai(rename_all = "camelCase")]
pub struct PushRequest {
    /// The device's id; the `X-Client-Id` header takes precedence.
    #[oai(nullable)]
    pub client_id: Option<Id>,
    /// The cursor (or any RFC 3339 timestamp) the device last synced to;
    /// `serverChanges` holds everything after it. Defaults to the beginning.
    #[oai(nullable)]
    pub since: Option<Since>,
    /// The changes, applied all or nothing, in order.
    pub changes: Vec<ChangeInput>,
    /// What holds for each change that does not say otherwise. A
    /// `schemaVersion` here (or any field's `at`) marks the device as one
    /// of the later client generation: it is not sent its own winning
    /// writes back.
    #[oai(flatten)]
    pub attribution: Attribution,
}

/// One change to one record.
#[derive(Debug, Clone, Object)]
#[oai(rename_all = "camelCase")]
pub struct ChangeInput {
    /// The collection (IndexedDB table).
    pub table: Name,
    /// The record's id.
    pub id: Id,
    pub op: Op,
    /// `insert`: the record's fields. Their timestamp is `data.updatedAt`,
    /// else `data.createdAt`; without either they are the record's initial
    /// content, which any timed write of a field supersedes.
    #[oai(nullable)]
    pub data: Option<BTreeMap<String, Value>>,
    /// `update`: the changed fields, each with its own timestamp. An update
    /// without `fields` writes `data` like an insert; an update of a record
    /// the server has never seen creates it.
    #[oai(nullable)]
    pub fields: Option<BTreeMap<String, FieldChange>>,
    /// `delete`: when the record was deleted; defaults to
    /// `fields.deletedAt.value`, else to the server's receive time.
    #[oai(nullable)]
    pub deleted_at: Option<Time>,
    /// What the change says of itself; each part it leaves out is its
    /// changeset's.
    #[oai(flatten)]
    pub attribution: Attribution,
}

/// What a change says of itself, on the change or on its changeset (for
/// each change that does not say otherwise). Kept in the log with the
/// change, and sent back with the record while the change holds its
/// latest winning field.
#[derive(Debug, Clone, Default, Object)]
#[oai(rename_all = "camelCase")]
pub struct Attribution {
    /// The schema version the change was written in (missing: 1); above
    /// the highest this server knows (1): a 400
    /// `unsupported_schema_version`.
    #[oai(nullable)]
    pub schema_version: Option<i64>,
    /// Who made the change: any JSON object (at most 4 KiB), e.g.
    /// `{"kind": "user", "principalId": "..."}`.
    #[oai(nullable)]
    pub actor: Option<BTreeMap<String, Value>>,
    /// How the change came about: `user`, `agent`, `system`, `migration`.
    #[oai(nullable)]
    pub origin: Option<Name>,
    /// The space the record belongs to.
    #[oai(nullable)]
    pub space_id: Option<Id>,
}

/// A new value for one field.
#[derive(Debug, Clone, Object)]
#[oai(rename_all = "camelCase")]
pub struct FieldChange {
    /// The new value (any JSON).
    #[oai(default)]
    pub value: Value,
    /// When the device wrote it (RFC 3339). Defaults to the server's receive time.
    #[oai(nullable)]
    pub updated_at: Option<Time>,
    /// Alias of `updatedAt`, sent by later clients.
    #[oai(nullable)]
    pub at: Option<Time>,
}

/// The folded changes since a cursor.
// Written by serde (`api::serialized`): its form is kept the schema's.
#[derive(Debug, Clone, Object, serde::Serialize)]
#[oai(rename_all = "camelCase")]
#[serde(rename_all = "camelCase")]
pub struct SyncResponse {
    /// Each record changed after `since` (by any device, including the
    /// asking one), once, in log order.
    pub server_changes: Vec<ServerChange>,
    /// Always empty: the server resolves every conflict by field-level last-write-wins.
    pub conflicts: Vec<Value>,
    /// The cursor to send as `since` next time. When `hasMore` is true it
    /// stops at the last record sent.
    pub synced_until: String,
    /// More changes remain after `syncedUntil`: call again with it.
    pub has_more: bool,
}

/// A record that changed since the cursor. Its `op` is `insert` if the
/// record did not exist at the cursor (or was deleted and is live again),
/// `delete` if it is now deleted, else `update`.
#[derive(Debug, Clone, Object, serde::Serialize)]
#[oai(rename_all = "camelCase")]
#[serde(rename_all = "camelCase")]
pub struct ServerChange {
    pub table: String,
    pub id: String,
    // Its meaning is in the struct's doc: a `///` here would make the field
    // `allOf: [Op, {description}]`, which client generators (openapi-python-client)
    // cannot take, where a plain `$ref` they can.
    pub op: Op,
    /// The whole folded record, `id` included (absent for deletes). A
    /// record written by one change is exactly what it sent; once another
    /// change touched it, `updatedAt` is the latest timestamp of any of its
    /// fields.
    #[oai(skip_serializing_if_is_none)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<BTreeMap<String, Value>>,
    /// `update`: the fields written after the cursor, with their winning
    /// value and timestamp. `updatedAt` is listed with the record's own
    /// when it was written after the cursor, or when the record's latest
    /// time is later than every listed field's: a device that sets
    /// `updatedAt` to the latest time of the fields it applies then holds
    /// the record's.
    #[oai(skip_serializing_if_is_none)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fields: Option<BTreeMap<String, FieldValue>>,
    /// `delete`: when the record was deleted.
    #[oai(skip_serializing_if_is_none)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deleted_at: Option<Value>,
    /// The log entry that wrote the record's latest winning field (of
    /// those sent in `fields`, for an update): its position in the user's
    /// log, a decimal string.
    pub event_id: String,
    /// That entry's schema version (1 when it named none).
    pub schema_version: i64,
    /// That entry's `actor`, when it gave one.
    #[oai(skip_serializing_if_is_none)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub actor: Option<BTreeMap<String, Value>>,
    /// That entry's `origin`, when it gave one.
    #[oai(skip_serializing_if_is_none)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
    /// That entry's `spaceId`, when it gave one.
    #[oai(skip_serializing_if_is_none)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub space_id: Option<String>,
}

/// The winning value of a field.
#[derive(Debug, Clone, Object, serde::Serialize)]
#[oai(rename_all = "camelCase")]
#[serde(rename_all = "camelCase")]
pub struct FieldValue {
    pub value: Value,
    /// The winning write's timestamp (what the seed's clients read).
    pub updated_at: String,
    /// The same timestamp, under the name later clients read: they apply
    /// a field only when its `at` is at least their own copy's.
    pub at: String,
}

impl FieldValue {
    /// `value`, written at `at` (RFC 3339), under both names.
    pub fn new(value: Value, at: String) -> FieldValue {
        FieldValue {
            value,
            updated_at: at.clone(),
            at,
        }
    }
}

/// `event: changes` of the change stream: one collection's folded delta.
#[derive(Debug, Clone, Object)]
#[oai(rename_all = "camelCase")]
pub struct ChangeEvent {
    /// The collection.
    pub table: String,
    /// Each record of it changed after the previous event's cursor.
    pub changes: Vec<ServerChange>,
    /// Resume from here (per collection).
    pub synced_until: String,
    /// More is coming at once in further events.
    pub has_more: bool,
}
