//! What a change says of itself besides the fields it writes: the schema
//! version it was written in, who made it (`actor`), how (`origin`), in
//! which space, and, for a device of the later client generation, which
//! device pushed it. The log keeps it with each entry (`sync_changes.meta`)
//! and the projection with each record while one of the entry's writes
//! wins (`sync_records.writers`); a server change carries that of the
//! entry that wrote the record's latest winning field.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

use serde_json::Value;

/// The schema version of a change that names none.
pub const DEFAULT_SCHEMA_VERSION: i64 = 1;
/// The highest schema version this server knows; a change above it is refused.
pub const MAX_SCHEMA_VERSION: i64 = 1;

/// A change's provenance, stored as a JSON object with the wire's names,
/// each left out at its default (most changes of the seed's clients have
/// none, and are stored as nothing at all).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Provenance {
    #[serde(
        default = "default_schema_version",
        skip_serializing_if = "is_default_schema_version"
    )]
    pub schema_version: i64,
    /// Who made the change: any JSON object the client sends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<BTreeMap<String, Value>>,
    /// How the change came about (`user`, `agent`, `system`, `migration`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub space_id: Option<String>,
    /// The device that pushed the change, kept only when it pushed in the
    /// later client generation's form: such a device keeps its own field
    /// times and is not sent its own winning writes back (an echo would
    /// pass them off as the server's). The seed's engine needs the echo,
    /// and its changes carry no device here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
}

fn default_schema_version() -> i64 {
    DEFAULT_SCHEMA_VERSION
}

fn is_default_schema_version(version: &i64) -> bool {
    *version == DEFAULT_SCHEMA_VERSION
}

impl Default for Provenance {
    fn default() -> Self {
        Provenance {
            schema_version: DEFAULT_SCHEMA_VERSION,
            actor: None,
            origin: None,
            space_id: None,
            client: None,
        }
    }
}

impl Provenance {
    /// Nothing to keep: every part at its default.
    pub fn is_empty(&self) -> bool {
        *self == Provenance::default()
    }

    /// The change was pushed by `device` in the later form.
    pub fn pushed_by(&self, device: &str) -> bool {
        self.client.as_deref() == Some(device)
    }

    /// The stored form: `None` when there is nothing to keep.
    pub fn stored(&self) -> Option<Value> {
        (!self.is_empty()).then(|| serde_json::to_value(self).expect("a provenance serialises"))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn the_stored_form_leaves_defaults_out_and_reads_back_the_same() {
        assert_eq!(Provenance::default().stored(), None);
        let full = Provenance {
            schema_version: 1,
            actor: Some(BTreeMap::from([("kind".to_owned(), json!("ai"))])),
            origin: Some("agent".into()),
            space_id: Some("s1".into()),
            client: Some("tab-1".into()),
        };
        let stored = full.stored().unwrap();
        assert_eq!(
            stored,
            json!({"actor": {"kind": "ai"}, "origin": "agent", "spaceId": "s1", "client": "tab-1"})
        );
        assert_eq!(serde_json::from_value::<Provenance>(stored).unwrap(), full);
        assert_eq!(
            serde_json::from_value::<Provenance>(json!({})).unwrap(),
            Provenance::default()
        );
        assert!(full.pushed_by("tab-1") && !full.pushed_by("tab-2"));
    }
}
