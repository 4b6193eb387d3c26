//! The checker's own reading of the log: which batch each row belongs to,
//! and an independent fold of every logged change (field by field: a timed
//! write beats an untimed one, then the later time, then the later log
//! position), written from the rules in the README, not from `src/fold.rs`.

use std::collections::{BTreeMap, HashMap};

use mana_sync::timestamp::Timestamp;
use serde_json::{Map, Value};
use sqlx::PgPool;

use super::device::{MARKERS, TABLE};

#[derive(sqlx::FromRow)]
pub struct Row {
    pub user_id: String,
    pub client_id: String,
    /// The transaction's start: the same for every row of one push.
    pub created_at: String,
    pub table_name: String,
    pub record_id: String,
    pub data: Value,
    pub field_timestamps: Value,
    pub seq: i64,
    pub untimed: bool,
}

/// Every row of the log, every user (the caller connects as a superuser).
pub async fn log(admin: &PgPool) -> Vec<Row> {
    sqlx::query_as(
        "SELECT user_id, client_id, created_at::text AS created_at, table_name, record_id, data,
                field_timestamps, seq, untimed
         FROM sync_changes ORDER BY user_id, seq",
    )
    .fetch_all(admin)
    .await
    .expect("read the log")
}

/// The batches found in the log: marker key → how many rows its push
/// wrote, and how many times the key was logged.
pub struct Batches {
    pub rows: HashMap<String, usize>,
    pub logged: HashMap<String, usize>,
    /// Pushes with no marker, or a marker whose `n` is not the push's size.
    pub malformed: Vec<String>,
}

pub fn batches(log: &[Row]) -> Batches {
    let mut pushes: BTreeMap<(&str, &str, &str), Vec<&Row>> = BTreeMap::new();
    for row in log {
        pushes
            .entry((&row.user_id, &row.client_id, &row.created_at))
            .or_default()
            .push(row);
    }
    let mut found = Batches {
        rows: HashMap::new(),
        logged: HashMap::new(),
        malformed: Vec::new(),
    };
    for ((user, client, at), rows) in pushes {
        let markers: Vec<&&Row> = rows.iter().filter(|r| r.table_name == MARKERS).collect();
        let [marker] = markers.as_slice() else {
            found
                .malformed
                .push(format!("{user}/{client} at {at}: {} markers", markers.len()));
            continue;
        };
        let key = marker.record_id.clone();
        if marker.data["n"].as_u64() != Some(rows.len() as u64) {
            found.malformed.push(format!(
                "{key}: {} rows logged, the batch had {}",
                rows.len(),
                marker.data["n"]
            ));
        }
        *found.logged.entry(key.clone()).or_default() += 1;
        found.rows.insert(key, rows.len());
    }
    found
}

/// One field's winning write so far: (timed, time, log position) ranks it.
struct Winner {
    rank: (bool, i64, i64),
    value: Value,
}

/// The live records of [`TABLE`] of each user, as the fold says: id →
/// fields (without `id`, which is the record's key, and without
/// `updatedAt`, which the server rewrites to the record's latest time).
pub fn fold(log: &[Row]) -> BTreeMap<String, BTreeMap<String, Map<String, Value>>> {
    let mut fields: BTreeMap<(&str, &str), BTreeMap<&str, Winner>> = BTreeMap::new();
    for row in log.iter().filter(|r| r.table_name == TABLE) {
        let record = fields.entry((&row.user_id, &row.record_id)).or_default();
        for (field, value) in row.data.as_object().into_iter().flatten() {
            let at = row.field_timestamps[field]
                .as_str()
                .and_then(|t| Timestamp::parse(t).ok())
                .unwrap_or_else(|| panic!("row {} has no time for {field}", row.seq));
            let rank = (!row.untimed, at.0, row.seq);
            let slot = record.entry(field).or_insert(Winner {
                rank,
                value: value.clone(),
            });
            if rank >= slot.rank {
                *slot = Winner {
                    rank,
                    value: value.clone(),
                };
            }
        }
    }
    let mut users: BTreeMap<String, BTreeMap<String, Map<String, Value>>> = BTreeMap::new();
    for ((user, id), record) in fields {
        let deleted = record.get("deletedAt").is_some_and(|w| !w.value.is_null());
        let records = users.entry(user.to_owned()).or_default();
        if deleted {
            continue;
        }
        records.insert(
            id.to_owned(),
            comparable(record.into_iter().map(|(f, w)| (f.to_owned(), w.value))),
        );
    }
    users
}

/// The fields two holders of a record must agree on.
pub fn comparable(fields: impl IntoIterator<Item = (String, Value)>) -> Map<String, Value> {
    fields
        .into_iter()
        .filter(|(f, _)| !matches!(f.as_str(), "id" | "updatedAt" | "deletedAt"))
        .collect()
}
