//! Field-level last-write-wins: the fold of the change log.
//!
//! Every accepted change is an immutable log entry that writes some fields
//! of one record, each field with a timestamp. A record's state is the fold
//! of its entries: each field holds the value of the write that ranks
//! highest: timed writes above untimed ones (an insert's data that came
//! without a timestamp of its own: a default that any explicit write of
//! the field supersedes), then the greatest timestamp, then the later log
//! entry. The fold is a per-field maximum, hence commutative: whatever
//! order the entries are applied in, the state is the same. That lets the
//! server keep the fold incrementally (the `sync_records` projection) and
//! rebuild it from the log at any time.
//!
//! A record's `updatedAt` is what the original client holds: a record
//! whose fields one change wrote is exactly what that change sent (the
//! client stores an insert with `put(data)`); once another change writes a
//! field of it, `updatedAt` is the latest timestamp of any of its fields,
//! which is what the client sets when it applies an update.
//!
//! Nothing here touches HTTP or SQL.

use std::collections::BTreeMap;

use serde::ser::SerializeStruct;
use serde::{Deserialize, Serialize, Serializer};
use serde_json::Value;

use crate::cursor::Cursor;
use crate::provenance::Provenance;
use crate::timestamp::Timestamp;

/// The field a delete writes; a record whose folded `deletedAt` is set is deleted.
pub const DELETED_AT: &str = "deletedAt";
/// The field that holds a record's last-write time (see [`RecordState::data`]).
pub const UPDATED_AT: &str = "updatedAt";

/// One field written by one change, at the change's time (clamped by `validate`).
#[derive(Clone, Debug, PartialEq)]
pub struct FieldWrite {
    pub name: String,
    pub value: Value,
    pub at: Timestamp,
    /// The change gave no time for this write (an insert's `data` without
    /// `updatedAt` or `createdAt`): `at` is the receive time, and the write
    /// ranks below every timed write of the field, whatever its time. A
    /// receive time and a device's clock are not comparable: the device's
    /// may lag, or count whole seconds.
    pub untimed: bool,
}

impl FieldWrite {
    /// A write at a time the change gave (or the receive time of an
    /// explicit update or delete, which takes effect when received).
    pub fn timed(name: impl Into<String>, value: Value, at: Timestamp) -> FieldWrite {
        FieldWrite {
            name: name.into(),
            value,
            at,
            untimed: false,
        }
    }
}

/// One log entry as the fold sees it: its position, the fields it writes
/// and what it says of itself.
#[derive(Clone, Debug, PartialEq)]
pub struct LogEntry {
    pub seq: i64,
    pub writes: Vec<FieldWrite>,
    pub provenance: Provenance,
}

/// The folded state of one field. Stored as `{"v": value, "t": at, "s":
/// seq}`, with `"w"` only when a later write lost (mostly the latest write
/// wins) and `"u"` only when untimed: a quarter less for the projection's
/// rows to write, hold and parse (five short fields: 366 bytes, not 486).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(from = "StoredField")]
pub struct FieldState {
    /// The winning value.
    pub value: Value,
    /// The winning write's field timestamp (nanoseconds).
    pub at: i64,
    /// The winning write's log position.
    pub seq: i64,
    /// The last log position that wrote this field, winning or not (never
    /// below `seq`). A losing write still makes the field part of the
    /// next delta, so the device that sent it is told the value that beat it.
    pub written: i64,
    /// The winning write is untimed (see [`FieldWrite::untimed`]).
    pub untimed: bool,
}

impl Serialize for FieldState {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let lost = self.written != self.seq;
        let len = 3 + usize::from(lost) + usize::from(self.untimed);
        let mut field = serializer.serialize_struct("FieldState", len)?;
        field.serialize_field("v", &self.value)?;
        field.serialize_field("t", &self.at)?;
        field.serialize_field("s", &self.seq)?;
        if lost {
            field.serialize_field("w", &self.written)?;
        }
        if self.untimed {
            field.serialize_field("u", &true)?;
        }
        field.end()
    }
}

/// A [`FieldState`] as stored (rows written before `"w"` became optional
/// have it always).
#[derive(Deserialize)]
struct StoredField {
    v: Value,
    t: i64,
    s: i64,
    #[serde(default)]
    w: Option<i64>,
    #[serde(default)]
    u: bool,
}

impl From<StoredField> for FieldState {
    fn from(f: StoredField) -> FieldState {
        FieldState {
            value: f.v,
            at: f.t,
            seq: f.s,
            written: f.w.unwrap_or(f.s),
            untimed: f.u,
        }
    }
}

impl FieldState {
    /// Where the winning write ranks: timed above untimed, then by
    /// timestamp, then by log position. A total order, so the fold is a
    /// maximum and does not depend on arrival order.
    fn rank(&self) -> (bool, i64, i64) {
        (!self.untimed, self.at, self.seq)
    }
}

/// The folded state of one record.
#[derive(Clone, Debug, PartialEq)]
pub struct RecordState {
    pub fields: BTreeMap<String, FieldState>,
    /// Log position of the record's first entry.
    pub created: i64,
    /// Log position of the record's last entry.
    pub touched: i64,
    /// The provenance of each entry that holds a winning field, by its
    /// position; entries with none are left out. A function of the fields'
    /// winners, so as order-independent as they are.
    pub writers: BTreeMap<i64, Provenance>,
}

impl Default for RecordState {
    fn default() -> Self {
        RecordState {
            fields: BTreeMap::new(),
            created: i64::MAX,
            touched: i64::MIN,
            writers: BTreeMap::new(),
        }
    }
}

/// The log entry a server change names: the one that wrote the record's
/// latest winning field (of those sent), with its provenance.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    pub seq: i64,
    pub provenance: Provenance,
}

/// A record's delta, and the entry it names.
#[derive(Clone, Debug, PartialEq)]
pub struct Delta {
    pub change: RecordDelta,
    pub event: Event,
}

/// A record as a client stores it: `{field: value}`, `id` included.
pub type Data = BTreeMap<String, Value>;

/// What a client must do to bring its copy of a record up to date.
#[derive(Clone, Debug, PartialEq)]
pub enum RecordDelta {
    /// The record did not exist at the cursor (or was deleted then):
    /// `data` is all of it.
    Insert { data: Data },
    /// `fields` are the fields written after the cursor, with their winning
    /// value and timestamp; `data` is the whole folded record.
    Update {
        data: Data,
        fields: BTreeMap<String, (Value, Timestamp)>,
    },
    /// The record is (soft-)deleted.
    Delete { deleted_at: Value },
}

impl RecordState {
    /// Folds one log entry in. Order-independent: applying the same entries
    /// in any order gives the same state.
    pub fn apply(&mut self, entry: &LogEntry) {
        self.created = self.created.min(entry.seq);
        self.touched = self.touched.max(entry.seq);
        let mut won = false;
        for write in &entry.writes {
            let candidate = FieldState {
                value: write.value.clone(),
                at: write.at.0,
                seq: entry.seq,
                written: entry.seq,
                untimed: write.untimed,
            };
            match self.fields.get_mut(&write.name) {
                None => {
                    self.fields.insert(write.name.clone(), candidate);
                    won = true;
                }
                Some(current) => {
                    let written = current.written.max(entry.seq);
                    if candidate.rank() > current.rank() {
                        *current = candidate;
                        won = true;
                    }
                    current.written = written;
                }
            }
        }
        if won && !entry.provenance.is_empty() {
            self.writers.insert(entry.seq, entry.provenance.clone());
        }
        if won && !self.writers.is_empty() {
            let winners: std::collections::BTreeSet<i64> = self.fields.values().map(|f| f.seq).collect();
            self.writers.retain(|seq, _| winners.contains(seq));
        }
    }

    /// Folds a whole history.
    pub fn fold<'a>(entries: impl IntoIterator<Item = &'a LogEntry>) -> RecordState {
        let mut state = RecordState::default();
        for entry in entries {
            state.apply(entry);
        }
        state
    }

    pub fn is_deleted(&self) -> bool {
        self.fields.get(DELETED_AT).is_some_and(|f| !f.value.is_null())
    }

    /// The latest timestamp of any field, winning writes only.
    fn latest(&self) -> Option<Timestamp> {
        self.fields.values().map(|f| Timestamp(f.at)).max()
    }

    /// The record's `updatedAt` once a second change has written a field
    /// of it: the latest timestamp of any field, in the form the server
    /// writes every timestamp (`2024-01-01T10:05:00.000Z`, as `toISOString()`
    /// writes it, and as a device then holds it). `None` while only the
    /// first change wrote fields: the record is what that change sent.
    fn updated_at(&self) -> Option<String> {
        if self.fields.values().all(|f| f.written == self.created) {
            return None;
        }
        self.latest().map(Timestamp::to_short_string)
    }

    /// The record as a client stores it: every folded field plus `id`, and
    /// `updatedAt` as devices that applied each change hold it.
    pub fn into_data(self, id: &str) -> Data {
        let updated_at = self.updated_at();
        // The fields come in key order, so the map is built without searching.
        let mut data: Data = self.fields.into_iter().map(|(name, f)| (name, f.value)).collect();
        if let Some(updated_at) = updated_at {
            data.insert(UPDATED_AT.to_owned(), Value::String(updated_at));
        }
        data.insert("id".to_owned(), Value::String(id.to_owned()));
        data
    }

    /// The delta since `since` as `asking` (the device that asks, if it
    /// said) is to get it, or `None` when nothing was written after it
    /// that the device lacks. Takes the state, whose values move into the
    /// delta.
    ///
    /// A device of the later generation is not sent what it wrote itself
    /// (see [`Provenance::client`]): a record it deleted, a record whose
    /// every field it wrote, or, in an update, a field it wrote. The
    /// record's `updatedAt` is the server's, not the device's: when the
    /// device's own writes moved it, and nothing else is to be sent, the
    /// record comes as an update of `updatedAt` alone.
    pub fn delta_since(mut self, id: &str, since: Cursor, asking: Option<&str>) -> Option<Delta> {
        if self.touched <= since.0 {
            return None;
        }
        let own = |seq: i64| asking.is_some_and(|device| self.writers.get(&seq).is_some_and(|p| p.pushed_by(device)));
        if self.is_deleted() {
            let deleted = self.fields.remove(DELETED_AT)?;
            if own(deleted.seq) {
                return None;
            }
            let event = self.event(deleted.seq);
            let deleted_at = deleted.value;
            return Some(Delta {
                change: RecordDelta::Delete { deleted_at },
                event,
            });
        }
        // A record created after the cursor is sent whole; so is one whose
        // `deletedAt` was written since and is now live: a device may hold
        // it deleted, without the edits that came with or after the delete.
        let undeleted = self.fields.get(DELETED_AT).is_some_and(|f| f.written > since.0);
        if self.created > since.0 || undeleted {
            if !self.fields.is_empty() && self.fields.values().all(|f| own(f.seq)) {
                return self.own_updated_at(id);
            }
            // A record whose changes wrote no field names its last entry.
            let event = self.event(self.fields.values().map(|f| f.seq).max().unwrap_or(self.touched));
            return Some(Delta {
                change: RecordDelta::Insert {
                    data: self.into_data(id),
                },
                event,
            });
        }
        let mut fields: BTreeMap<String, (Value, Timestamp)> = BTreeMap::new();
        let mut latest_sent = None;
        for (name, f) in &self.fields {
            if f.written > since.0 && !own(f.seq) {
                fields.insert(name.clone(), (f.value.clone(), Timestamp(f.at)));
                latest_sent = latest_sent.max(Some(f.seq));
            }
        }
        // Changes that wrote no field (`data: {}`) change nothing, and a
        // device is not sent back what it wrote itself.
        let Some(latest_sent) = latest_sent else {
            let own_written = self.fields.values().any(|f| f.written > since.0 && own(f.seq));
            return if own_written { self.own_updated_at(id) } else { None };
        };
        let event = self.event(latest_sent);
        let latest = self.latest();
        let data = self.into_data(id);
        // The original client sets `updatedAt` to the latest time among the
        // fields it applies: when the record's latest time is not among
        // them, or `updatedAt` is (its value is the record's, not the
        // field's), `updatedAt` is listed with the record's latest time.
        if let (Some(latest), Some(updated_at)) = (latest, data.get(UPDATED_AT)) {
            let listed = fields.values().map(|(_, at)| *at).max();
            if fields.contains_key(UPDATED_AT) || listed < Some(latest) {
                fields.insert(UPDATED_AT.to_owned(), (updated_at.clone(), latest));
            }
        }
        Some(Delta {
            change: RecordDelta::Update { data, fields },
            event,
        })
    }

    /// What a device is sent of a record only its own writes changed: the
    /// record's `updatedAt`, which those writes moved, when it has one
    /// (see [`RecordState::into_data`]), named by the latest entry.
    fn own_updated_at(self, id: &str) -> Option<Delta> {
        let updated_at = Value::String(self.updated_at()?);
        let latest = self.latest()?;
        let event = self.event(self.fields.values().map(|f| f.seq).max()?);
        let data = self.into_data(id);
        Some(Delta {
            change: RecordDelta::Update {
                fields: BTreeMap::from([(UPDATED_AT.to_owned(), (updated_at, latest))]),
                data,
            },
            event,
        })
    }

    /// The entry at `seq`, with its provenance (the default when it kept none).
    fn event(&self, seq: i64) -> Event {
        Event {
            seq,
            provenance: self.writers.get(&seq).cloned().unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests;
