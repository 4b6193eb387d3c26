//! The sync protocol: its limits, and its wire types as old (Dexie)
//! clients send and read them (camelCase JSON). The types derive
//! poem-openapi's schema traits, so their `///` docs become the OpenAPI
//! schema; nothing here knows of requests, responses or statuses.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::ops::Deref;

use poem_openapi::registry::{MetaSchema, MetaSchemaRef};
use poem_openapi::types::{ParseError, ParseFromJSON, ParseResult, ToJSON, Type};
use poem_openapi::{Enum, Object};
use serde_json::Value;

/// Largest accepted request body (over 10 MB is a 413).
pub const MAX_BODY_BYTES: usize = 10 * 1024 * 1024;
/// Longest app id, table (collection) or field name, in bytes.
pub const MAX_NAME_BYTES: usize = 128;
/// Longest record id, client id, user id or idempotency key, in bytes.
pub const MAX_ID_BYTES: usize = 256;
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

/// How a name or id breaks the protocol's rule for them: 1 to `max` bytes,
/// no control characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadText {
    /// Empty, or longer than the limit.
    Length,
    /// A NUL character, which the database cannot store.
    Nul,
    /// Another control character.
    Control,
}

/// Checks a name or id against the protocol's rule: 1 to `max` bytes, no
/// control characters.
pub fn check_text(value: &str, max: usize) -> Result<(), BadText> {
    if value.is_empty() || value.len() > max {
        Err(BadText::Length)
    } else if value.contains('\0') {
        Err(BadText::Nul)
    } else if value.chars().any(char::is_control) {
        Err(BadText::Control)
    } else {
        Ok(())
    }
}

/// A JSON string, strictly: unlike poem-openapi's `String`, a number or a
/// boolean where a string belongs is a 400, not silently converted.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Text(pub String);

impl Deref for Text {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl Type for Text {
    const IS_REQUIRED: bool = true;
    type RawValueType = Self;
    type RawElementValueType = Self;

    fn name() -> Cow<'static, str> {
        "string".into()
    }

    fn schema_ref() -> MetaSchemaRef {
        MetaSchemaRef::Inline(Box::new(MetaSchema::new("string")))
    }

    fn as_raw_value(&self) -> Option<&Self> {
        Some(self)
    }

    fn raw_element_iter<'a>(&'a self) -> Box<dyn Iterator<Item = &'a Self> + 'a> {
        Box::new(self.as_raw_value().into_iter())
    }
}

impl ParseFromJSON for Text {
    fn parse_from_json(value: Option<Value>) -> ParseResult<Self> {
        match value {
            Some(Value::String(s)) => Ok(Text(s)),
            other => Err(ParseError::expected_type(other.unwrap_or_default())),
        }
    }
}

impl ToJSON for Text {
    fn to_json(&self) -> Option<Value> {
        Some(Value::String(self.0.clone()))
    }
}

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
    pub client_id: Option<Text>,
    /// The cursor (or any RFC 3339 timestamp) the device last synced to;
    /// `serverChanges` holds everything after it. Defaults to the beginning.
    pub since: Option<Text>,
    /// The changes, applied all or nothing, in order.
    pub changes: Vec<ChangeInput>,
}

/// One change to one record.
#[derive(Debug, Clone, Object)]
#[oai(rename_all = "camelCase")]
pub struct ChangeInput {
    /// The collection (IndexedDB table), 1-128 bytes.
    pub table: Text,
    /// The record's id, 1-256 bytes.
    pub id: Text,
    pub op: Op,
    /// `insert`: the record's fields. Their timestamp is `data.updatedAt`,
    /// else `data.createdAt`; without either they are the record's initial
    /// content, which any timed write of a field supersedes.
    pub data: Option<BTreeMap<String, Value>>,
    /// `update`: the changed fields, each with its own timestamp. An update
    /// without `fields` writes `data` like an insert; an update of a record
    /// the server has never seen creates it.
    pub fields: Option<BTreeMap<String, FieldChange>>,
    /// `delete`: when the record was deleted; defaults to the server's receive time.
    pub deleted_at: Option<Text>,
}

/// A new value for one field.
#[derive(Debug, Clone, Object)]
#[oai(rename_all = "camelCase")]
pub struct FieldChange {
    /// The new value (any JSON).
    #[oai(default)]
    pub value: Value,
    /// When the device wrote it (RFC 3339). Defaults to the server's receive time.
    pub updated_at: Option<Text>,
    /// Alias of `updatedAt`, sent by later clients.
    pub at: Option<Text>,
}

/// The folded changes since a cursor.
#[derive(Debug, Clone, Object)]
#[oai(rename_all = "camelCase")]
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

impl SyncResponse {
    /// The response as its JSON (to keep it for an idempotent replay).
    pub fn to_value(&self) -> Value {
        self.to_json().unwrap_or_default()
    }

    /// A response kept by [`SyncResponse::to_value`].
    pub fn from_value(value: Value) -> Result<SyncResponse, String> {
        SyncResponse::parse_from_json(Some(value)).map_err(|e| e.into_message())
    }
}

/// A record that changed since the cursor.
#[derive(Debug, Clone, Object)]
#[oai(rename_all = "camelCase")]
pub struct ServerChange {
    pub table: String,
    pub id: String,
    /// `insert` if the record did not exist at the cursor (or was deleted
    /// and is live again), `delete` if it is now deleted, else `update`.
    pub op: Op,
    /// The whole folded record, `id` included (absent for deletes). A
    /// record written by one change is exactly what it sent; once another
    /// change touched it, `updatedAt` is the latest timestamp of any of its
    /// fields.
    #[oai(skip_serializing_if_is_none)]
    pub data: Option<BTreeMap<String, Value>>,
    /// `update`: the fields written after the cursor, with their winning
    /// value and timestamp. `updatedAt` is listed with the record's own
    /// when it was written after the cursor, or when the record's latest
    /// time is later than every listed field's: a device that sets
    /// `updatedAt` to the latest time of the fields it applies then holds
    /// the record's.
    #[oai(skip_serializing_if_is_none)]
    pub fields: Option<BTreeMap<String, FieldValue>>,
    /// `delete`: when the record was deleted.
    #[oai(skip_serializing_if_is_none)]
    pub deleted_at: Option<Value>,
}

/// The winning value of a field.
#[derive(Debug, Clone, Object)]
#[oai(rename_all = "camelCase")]
pub struct FieldValue {
    pub value: Value,
    /// The winning write's timestamp.
    pub updated_at: String,
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
