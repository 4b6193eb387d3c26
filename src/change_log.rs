//! The append-only change log (`sync_changes`) and each user's clock.

use futures_util::TryStreamExt;
use serde_json::{Map, Value};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::fold::{FieldWrite, LogEntry};
use crate::timestamp::Timestamp;
use crate::validate::Change;

/// Reserves `n` consecutive log positions for `user_id` and returns the
/// first. The clock row stays locked until the transaction ends, which
/// orders the user's pushes: positions are unique and increase in commit
/// order. Positions are nanosecond timestamps from the database clock (one
/// clock for every replica), never going backwards.
pub async fn reserve(conn: &mut PgConnection, user_id: &str, n: i64) -> sqlx::Result<i64> {
    let last: i64 = sqlx::query_scalar(
        "INSERT INTO sync_clocks (user_id, last_seq)
         VALUES ($1, (EXTRACT(EPOCH FROM clock_timestamp()) * 1000000)::bigint * 1000 + $2 - 1)
         ON CONFLICT (user_id) DO UPDATE SET last_seq = GREATEST(sync_clocks.last_seq + $2, EXCLUDED.last_seq)
         RETURNING last_seq",
    )
    .bind(user_id)
    .bind(n)
    .fetch_one(conn)
    .await?;
    Ok(last - n + 1)
}

/// Locks the user's clock without advancing it (for maintenance that must
/// not interleave with pushes).
pub async fn lock(conn: &mut PgConnection, user_id: &str) -> sqlx::Result<()> {
    sqlx::query("SELECT 1 FROM sync_clocks WHERE user_id = $1 FOR UPDATE")
        .bind(user_id)
        .execute(conn)
        .await?;
    Ok(())
}

/// Appends `changes` at positions `first_seq..`, one row each.
pub async fn append(
    conn: &mut PgConnection,
    user_id: &str,
    app_id: &str,
    client_id: &str,
    first_seq: i64,
    changes: &[Change],
) -> sqlx::Result<()> {
    let n = changes.len();
    let (mut ids, mut seqs, mut tables, mut records, mut ops, mut data, mut stamps) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for (i, change) in changes.iter().enumerate() {
        ids.push(Uuid::now_v7());
        seqs.push(first_seq + i as i64);
        tables.push(change.table.as_str());
        records.push(change.id.as_str());
        ops.push(change.op.as_str());
        let (values, times) = columns(&change.writes);
        data.push(values);
        stamps.push(times);
    }
    sqlx::query(
        "INSERT INTO sync_changes (id, seq, app_id, table_name, record_id, user_id, op, data, field_timestamps, client_id)
         SELECT u.id, u.seq, $1, u.table_name, u.record_id, $2, u.op, u.data, u.stamps, $3
         FROM UNNEST($4::uuid[], $5::bigint[], $6::text[], $7::text[], $8::text[], $9::jsonb[], $10::jsonb[])
           AS u(id, seq, table_name, record_id, op, data, stamps)",
    )
    .bind(app_id)
    .bind(user_id)
    .bind(client_id)
    .bind(ids)
    .bind(seqs)
    .bind(tables)
    .bind(records)
    .bind(ops)
    .bind(data)
    .bind(stamps)
    .execute(conn)
    .await?;
    Ok(())
}

/// A change's writes as the log stores them: `{field: value}` and
/// `{field: "<RFC 3339>"}`.
fn columns(writes: &[FieldWrite]) -> (Value, Value) {
    let mut values = Map::with_capacity(writes.len());
    let mut times = Map::with_capacity(writes.len());
    for w in writes {
        values.insert(w.name.clone(), w.value.clone());
        times.insert(w.name.clone(), Value::String(w.at.to_fixed_string()));
    }
    (Value::Object(values), Value::Object(times))
}

/// The inverse of [`columns`]. A field without a readable timestamp is
/// taken at the epoch (it then loses to any timed write) rather than
/// failing a whole rebuild.
fn writes(data: Value, times: &Value) -> Vec<FieldWrite> {
    let Value::Object(values) = data else { return Vec::new() };
    values
        .into_iter()
        .map(|(name, value)| {
            let at = times
                .get(&name)
                .and_then(Value::as_str)
                .and_then(|s| Timestamp::parse(s).ok())
                .unwrap_or(Timestamp::EPOCH);
            FieldWrite { name, value, at }
        })
        .collect()
}

/// One record's key in the log.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RecordKey {
    pub app_id: String,
    pub table: String,
    pub id: String,
}

/// Streams a user's whole log in order, calling `each` per entry.
pub async fn replay(
    conn: &mut PgConnection,
    user_id: &str,
    mut each: impl FnMut(RecordKey, LogEntry),
) -> sqlx::Result<u64> {
    let mut rows = sqlx::query_as::<_, (String, String, String, i64, Value, Value)>(
        "SELECT app_id, table_name, record_id, seq, data, field_timestamps
         FROM sync_changes WHERE user_id = $1 ORDER BY seq",
    )
    .bind(user_id)
    .fetch(conn);
    let mut count = 0;
    while let Some((app_id, table, id, seq, data, times)) = rows.try_next().await? {
        each(
            RecordKey { app_id, table, id },
            LogEntry {
                seq,
                writes: writes(data, &times),
            },
        );
        count += 1;
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn log_columns_round_trip_to_the_same_writes() {
        let original = vec![
            FieldWrite {
                name: "title".into(),
                value: json!("x"),
                at: Timestamp(1_704_103_575_123_456_789),
            },
            FieldWrite {
                name: "tags".into(),
                value: json!(["a", {"b": null}]),
                at: Timestamp(5),
            },
        ];
        let (data, times) = columns(&original);
        let mut back = writes(data, &times);
        back.sort_by(|a, b| b.name.cmp(&a.name));
        assert_eq!(back, original);
    }
}
