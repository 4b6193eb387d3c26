//! What a change says of itself (schema version, actor, origin, space),
//! checked, and inherited from its changeset where it names none.

use std::collections::BTreeMap;

use serde_json::Value;

use super::names::{id, name};
use super::value::storable;
use crate::error::{Error, ErrorCode, Result};
use crate::protocol::{ChangeInput, Id, Name};
use crate::provenance::{MAX_SCHEMA_VERSION, Provenance};

/// Most bytes an `actor` may take as JSON: it is kept with every change
/// and sent with every record it wrote last.
pub const MAX_ACTOR_BYTES: usize = 4096;

/// What a change's four parts are, as sent at either level.
pub(super) struct Parts<'a> {
    pub schema_version: Option<i64>,
    pub actor: Option<&'a BTreeMap<String, Value>>,
    pub origin: Option<&'a Name>,
    pub space_id: Option<&'a Id>,
}

impl<'a> Parts<'a> {
    pub fn of_change(change: &'a ChangeInput) -> Parts<'a> {
        Parts {
            schema_version: change.schema_version,
            actor: change.actor.as_ref(),
            origin: change.origin.as_ref(),
            space_id: change.space_id.as_ref(),
        }
    }

    /// Each part as the change gives it, else as its changeset does.
    pub fn or(self, changeset: &Parts<'a>) -> Parts<'a> {
        Parts {
            schema_version: self.schema_version.or(changeset.schema_version),
            actor: self.actor.or(changeset.actor),
            origin: self.origin.or(changeset.origin),
            space_id: self.space_id.or(changeset.space_id),
        }
    }

    /// The checked provenance of a change pushed by `client` (`Some` when
    /// the push is in the later form).
    pub fn check(self, client: Option<&str>) -> Result<Provenance> {
        let mut provenance = Provenance {
            client: client.map(str::to_owned),
            ..Provenance::default()
        };
        if let Some(version) = self.schema_version {
            if !(1..=MAX_SCHEMA_VERSION).contains(&version) {
                return Err(Error::invalid(
                    ErrorCode::UnsupportedSchemaVersion,
                    format!("schemaVersion {version} is not one this server knows (1 to {MAX_SCHEMA_VERSION})"),
                ));
            }
            provenance.schema_version = version;
        }
        if let Some(actor) = self.actor {
            let value = Value::Object(actor.clone().into_iter().collect());
            storable("actor", &value)?;
            if value.to_string().len() > MAX_ACTOR_BYTES {
                return Err(Error::invalid(
                    ErrorCode::InvalidActor,
                    format!("actor may take at most {MAX_ACTOR_BYTES} bytes as JSON"),
                ));
            }
            provenance.actor = Some(actor.clone());
        }
        if let Some(origin) = self.origin {
            name("origin", origin)?;
            provenance.origin = Some(String::from(origin.clone()));
        }
        if let Some(space_id) = self.space_id {
            id("spaceId", space_id)?;
            provenance.space_id = Some(String::from(space_id.clone()));
        }
        Ok(provenance)
    }
}

/// The push is in the later client generation's form: it names a schema
/// version, or a field's time as `at`. Such a device keeps its own field
/// times, and its own writes are not echoed to it.
pub(super) fn later_form(changeset: &Parts, changes: &[ChangeInput]) -> bool {
    changeset.schema_version.is_some()
        || changes.iter().any(|change| {
            change.schema_version.is_some()
                || change
                    .fields
                    .as_ref()
                    .is_some_and(|fields| fields.values().any(|f| f.at.is_some()))
        })
}
