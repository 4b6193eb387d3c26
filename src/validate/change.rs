//! One change of a push, checked and turned into field writes.

use serde_json::Value;

use super::clock::Clock;
use super::names::{id, name};
use super::value::storable;
use crate::change_log::Change;
use crate::error::{Error, ErrorCode, Result};
use crate::fold::{DELETED_AT, FieldWrite, UPDATED_AT};
use crate::protocol::{ChangeInput, Op};
use crate::provenance::Provenance;
use crate::timestamp::Timestamp;

pub(super) fn change(input: ChangeInput, clock: Clock, provenance: Provenance) -> Result<Change> {
    name("table", &input.table)?;
    id("id", &input.id)?;
    let writes = match input.op {
        Op::Insert => {
            let data = input
                .data
                .ok_or_else(|| Error::invalid(ErrorCode::MissingData, "an insert needs 'data'"))?;
            data_writes(&input.id, data, clock)?
        }
        Op::Update => match (input.fields, input.data) {
            (Some(fields), _) => fields
                .into_iter()
                .filter(|(field, _)| field != "id")
                .map(|(field, change)| {
                    let what = format!("fields.{field}.updatedAt");
                    let at = clock.resolve(&what, change.updated_at.as_deref().or(change.at.as_deref()))?;
                    field_write(field, change.value, at, false)
                })
                .collect::<Result<_>>()?,
            (None, Some(data)) => data_writes(&input.id, data, clock)?,
            (None, None) => {
                return Err(Error::invalid(
                    ErrorCode::MissingFields,
                    "an update needs 'fields' (or 'data')",
                ));
            }
        },
        Op::Delete => {
            // Today's web client sends the time again as `fields.deletedAt`:
            // the same, when `deletedAt` is missing.
            let also = input
                .fields
                .as_ref()
                .and_then(|fields| fields.get(DELETED_AT))
                .and_then(|f| f.value.as_str().or(f.at.as_deref()).or(f.updated_at.as_deref()));
            let at = clock.resolve("deletedAt", input.deleted_at.as_deref().or(also))?;
            vec![FieldWrite::timed(DELETED_AT, Value::String(at.to_short_string()), at)]
        }
    };
    Ok(Change {
        table: input.table.0,
        id: input.id.0,
        op: input.op,
        writes,
        provenance,
    })
}

/// The writes of a whole record: every field of `data` at its
/// `updatedAt`, else `createdAt`, else untimed at the receive time (a
/// record's initial content, which any timed write of a field supersedes).
fn data_writes(
    record_id: &str,
    data: std::collections::BTreeMap<String, Value>,
    clock: Clock,
) -> Result<Vec<FieldWrite>> {
    if data.get("id").is_some_and(|given| given.as_str() != Some(record_id)) {
        return Err(Error::invalid(
            ErrorCode::IdMismatch,
            "data.id must equal the change's id",
        ));
    }
    // Only the timestamp that is used is checked: a record whose
    // `createdAt` no one reads must not be refused for its form.
    let (at, untimed) = match [UPDATED_AT, "createdAt"]
        .into_iter()
        .find(|f| data.get(*f).is_some_and(|v| !v.is_null()))
    {
        Some(field) => (clock.resolve_value(&format!("data.{field}"), &data[field])?, false),
        None => (clock.now, true),
    };
    data.into_iter()
        .filter(|(field, _)| field != "id")
        .map(|(field, value)| field_write(field, value, at, untimed))
        .collect()
}

/// One checked field write. `deletedAt` decides whether a record is
/// deleted, so it must be a timestamp or null, never just any value.
fn field_write(name: String, value: Value, at: Timestamp, untimed: bool) -> Result<FieldWrite> {
    self::name("field name", &name)?;
    storable(&name, &value)?;
    if name == DELETED_AT && !value.is_null() {
        match value.as_str().map(Timestamp::parse) {
            Some(Ok(_)) => {}
            _ => {
                return Err(Error::invalid(
                    ErrorCode::InvalidTimestamp,
                    "deletedAt must be an RFC 3339 timestamp or null",
                ));
            }
        }
    }
    Ok(FieldWrite {
        name,
        value,
        at,
        untimed,
    })
}
