//! What a change says of itself (schema version, actor, origin, space),
//! checked, and taken from its changeset where it says nothing.

use serde_json::Value;

use super::names::{id, name};
use super::value::storable;
use crate::error::{Error, ErrorCode, Result};
use crate::protocol::{Attribution, ChangeInput};
use crate::provenance::{MAX_SCHEMA_VERSION, Provenance};

/// Most bytes an `actor` may take as JSON: it is kept with every change
/// and sent with every record it wrote last.
pub const MAX_ACTOR_BYTES: usize = 4096;

/// The checked provenance of a change that says `change` within a
/// changeset that says `changeset`, pushed by `client` (`Some` when the
/// push is in the later form).
pub(super) fn provenance(change: &Attribution, changeset: &Attribution, client: Option<&str>) -> Result<Provenance> {
    let mut provenance = Provenance {
        client: client.map(str::to_owned),
        ..Provenance::default()
    };
    if let Some(version) = change.schema_version.or(changeset.schema_version) {
        if !(1..=MAX_SCHEMA_VERSION).contains(&version) {
            return Err(Error::invalid(
                ErrorCode::UnsupportedSchemaVersion,
                format!("schemaVersion {version} is not one this server knows (1 to {MAX_SCHEMA_VERSION})"),
            ));
        }
        provenance.schema_version = version;
    }
    if let Some(actor) = change.actor.as_ref().or(changeset.actor.as_ref()) {
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
    if let Some(origin) = change.origin.as_ref().or(changeset.origin.as_ref()) {
        name("origin", origin)?;
        provenance.origin = Some(String::from(origin.clone()));
    }
    if let Some(space_id) = change.space_id.as_ref().or(changeset.space_id.as_ref()) {
        id("spaceId", space_id)?;
        provenance.space_id = Some(String::from(space_id.clone()));
    }
    Ok(provenance)
}

/// The push is in the later client generation's form: it names a schema
/// version, or a field's time as `at`. Such a device keeps its own field
/// times, and its own writes are not echoed to it.
pub(super) fn later_form(changeset: &Attribution, changes: &[ChangeInput]) -> bool {
    changeset.schema_version.is_some()
        || changes.iter().any(|change| {
            change.attribution.schema_version.is_some()
                || change
                    .fields
                    .as_ref()
                    .is_some_and(|fields| fields.values().any(|f| f.at.is_some()))
        })
}
