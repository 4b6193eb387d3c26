//! The SQLite statements: the log, the projection and idempotent outcomes.
//!
//! Batches go through `json_each` over one JSON array: one statement
//! whatever the batch's size (no limit on bound parameters), one round
//! trip to the connection's thread. Times in `sync_idempotency` are Unix
//! milliseconds from SQLite's clock.

use std::time::Duration;

use futures_util::stream::BoxStream;
use serde_json::{Value, json};
use sqlx::types::Json;
use sqlx::{Sqlite, SqliteConnection, SqlitePool, Transaction};

use crate::cursor::Cursor;
use crate::quota::Usage;
use crate::store::dialect::{Dialect, PoolDialect, read_batch};
use crate::store::rows::{
    AppendedRows, ClockUsage, LogRow, NewRow, OutcomeRow, PageRow, RecordRow, SavedRow, TableRow, UsageRow,
};
use crate::timestamp::Timestamp;

impl Dialect for SqliteConnection {
    async fn append_batch(
        &mut self,
        user_id: &str,
        app_id: &str,
        client_id: &str,
        rows: &[NewRow<'_>],
        keys: &[(&str, &str)],
        since: Cursor,
        limit: i64,
    ) -> sqlx::Result<AppendedRows> {
        // The write transaction excludes every other writer until it ends,
        // so what it reads after is current.
        let clock = reserve(self, user_id, rows.len() as i64).await?;
        let last_seq = clock.last_seq;
        append(self, user_id, app_id, client_id, last_seq - rows.len() as i64 + 1, rows).await?;
        let (states, page) = read_batch(self, user_id, app_id, keys, since, limit).await?;
        Ok(AppendedRows {
            last_seq,
            usage: clock.usage.usage(),
            states,
            page,
        })
    }

    async fn lock_clock(&mut self, _user_id: &str) -> sqlx::Result<()> {
        // Nothing to do: a write transaction already excludes every other writer.
        Ok(())
    }

    fn replay<'c>(&'c mut self, user_id: &'c str) -> BoxStream<'c, sqlx::Result<LogRow>> {
        sqlx::query_as(
            "SELECT app_id, table_name, record_id, seq, data, field_timestamps, untimed, meta
             FROM sync_changes WHERE user_id = ?1 ORDER BY seq",
        )
        .bind(user_id)
        .fetch(self)
    }

    async fn load(&mut self, user_id: &str, app_id: &str, keys: &[(&str, &str)]) -> sqlx::Result<Vec<RecordRow>> {
        // CROSS JOIN keeps the keys as the outer loop: one primary-key probe each.
        sqlx::query_as(
            "SELECT r.table_name, r.record_id, r.fields, r.writers, r.created_seq, r.touched_seq
             FROM json_each(?3) AS k CROSS JOIN sync_records r
             WHERE r.user_id = ?1 AND r.app_id = ?2 AND r.table_name = k.value ->> 0 AND r.record_id = k.value ->> 1",
        )
        .bind(user_id)
        .bind(app_id)
        .bind(Json(keys))
        .fetch_all(self)
        .await
    }

    async fn count_usage(&mut self, user_id: &str) -> sqlx::Result<Usage> {
        // Lengths in bytes: `length` of text counts characters.
        let row: UsageRow = sqlx::query_as(
            "SELECT count(*) AS records,
                    coalesce(sum(length(CAST(table_name AS BLOB)) + length(CAST(record_id AS BLOB)) + length(CAST(fields AS BLOB))
                                 + coalesce(length(CAST(writers AS BLOB)), 0)), 0) AS bytes
             FROM sync_records WHERE user_id = ?1",
        )
        .bind(user_id)
        .fetch_one(self)
        .await?;
        Ok(row.into())
    }

    async fn set_usage(&mut self, user_id: &str, usage: Usage) -> sqlx::Result<()> {
        sqlx::query("UPDATE sync_clocks SET records = ?2, bytes = ?3, counted_seq = last_seq WHERE user_id = ?1")
            .bind(user_id)
            .bind(usage.records)
            .bind(usage.bytes)
            .execute(self)
            .await?;
        Ok(())
    }

    async fn save(
        &mut self,
        user_id: &str,
        app_id: &str,
        rows: &[SavedRow<'_>],
        usage: Option<Usage>,
    ) -> sqlx::Result<()> {
        // Each state goes as its JSON text, which `->>` hands on as it is.
        let rows: Vec<Value> = rows
            .iter()
            .map(|r| json!([r.table, r.record_id, r.fields, r.writers, r.created_seq, r.touched_seq]))
            .collect();
        // `WHERE true` tells SQLite's parser the ON CONFLICT is the upsert's.
        sqlx::query(
            "INSERT INTO sync_records (user_id, app_id, table_name, record_id, fields, writers, created_seq, touched_seq)
             SELECT ?1, ?2, j.value ->> 0, j.value ->> 1, j.value ->> 2, j.value ->> 3, j.value ->> 4, j.value ->> 5
             FROM json_each(?3) AS j WHERE true
             ON CONFLICT (user_id, app_id, table_name, record_id) DO UPDATE
             SET fields = excluded.fields, created_seq = excluded.created_seq, touched_seq = excluded.touched_seq,
                 writers = excluded.writers",
        )
        .bind(user_id)
        .bind(app_id)
        .bind(Json(rows))
        .execute(&mut *self)
        .await?;
        if let Some(usage) = usage {
            self.set_usage(user_id, usage).await?;
        }
        Ok(())
    }

    async fn clear_records(&mut self, user_id: &str) -> sqlx::Result<()> {
        sqlx::query("DELETE FROM sync_records WHERE user_id = ?1")
            .bind(user_id)
            .execute(self)
            .await?;
        Ok(())
    }

    fn page<'c>(
        &'c mut self,
        user_id: &'c str,
        app_id: &'c str,
        table: Option<&'c str>,
        since: Cursor,
        limit: i64,
    ) -> BoxStream<'c, sqlx::Result<PageRow>> {
        // Writers are serialised and a read sees one snapshot, so every
        // record it sees is at or below the clock it sees. A statement per
        // case rather than `?5 IS NULL OR ...`, so each searches its own
        // index in touched_seq order.
        let statement = match table {
            Some(_) => {
                "SELECT c.last_seq, r.table_name, r.record_id, r.fields, r.writers, r.created_seq, r.touched_seq
                 FROM sync_clocks c LEFT JOIN (
                   SELECT * FROM sync_records
                   WHERE user_id = ?1 AND app_id = ?2 AND table_name = ?5 AND touched_seq > ?3
                   ORDER BY touched_seq LIMIT ?4) r ON r.touched_seq <= c.last_seq
                 WHERE c.user_id = ?1
                 ORDER BY r.touched_seq"
            }
            None => {
                "SELECT c.last_seq, r.table_name, r.record_id, r.fields, r.writers, r.created_seq, r.touched_seq
                 FROM sync_clocks c LEFT JOIN (
                   SELECT * FROM sync_records
                   WHERE user_id = ?1 AND app_id = ?2 AND touched_seq > ?3
                   ORDER BY touched_seq LIMIT ?4) r ON r.touched_seq <= c.last_seq
                 WHERE c.user_id = ?1
                 ORDER BY r.touched_seq"
            }
        };
        let query = sqlx::query_as(statement)
            .bind(user_id)
            .bind(app_id)
            .bind(since.0)
            .bind(limit);
        match table {
            Some(table) => query.bind(table).fetch(self),
            None => query.fetch(self),
        }
    }

    fn pages<'c>(
        &'c mut self,
        user_id: &'c str,
        app_id: &'c str,
        tables: &'c [(String, Cursor)],
        limit: i64,
    ) -> BoxStream<'c, sqlx::Result<PageRow>> {
        // SQLite has neither arrays nor LATERAL: the tables come as JSON,
        // (CROSS JOIN keeps them the outer loop, so each table walks its
        // delta index), and each table's `limit` is its `limit`-th change
        // after its cursor, as an upper bound: positions are unique per
        // user, so the bound lets in exactly that many. The clock comes in
        // a row of its own, first; a read sees one snapshot in which no
        // record is later than the clock (writers are serialised).
        let wanted = serde_json::Value::from(
            tables
                .iter()
                .map(|(t, c)| serde_json::json!([t, c.0]))
                .collect::<Vec<_>>(),
        )
        .to_string();
        sqlx::query_as(
            "SELECT last_seq, NULL AS table_name, NULL AS record_id, NULL AS fields, NULL AS writers,
                    NULL AS created_seq, NULL AS touched_seq, -1 AS ord
             FROM sync_clocks WHERE user_id = ?1
             UNION ALL
             SELECT (SELECT last_seq FROM sync_clocks WHERE user_id = ?1),
                    s.table_name, s.record_id, s.fields, s.writers, s.created_seq, s.touched_seq, d.key
             FROM json_each(?3) d CROSS JOIN sync_records s
               ON s.user_id = ?1 AND s.app_id = ?2 AND s.table_name = json_extract(d.value, '$[0]')
               AND s.touched_seq > json_extract(d.value, '$[1]')
               AND s.touched_seq <= coalesce((
                 SELECT x.touched_seq FROM sync_records x
                 WHERE x.user_id = ?1 AND x.app_id = ?2 AND x.table_name = json_extract(d.value, '$[0]')
                   AND x.touched_seq > json_extract(d.value, '$[1]')
                 ORDER BY x.touched_seq LIMIT 1 OFFSET ?4 - 1), 9223372036854775807)
             ORDER BY ord, touched_seq",
        )
        .bind(user_id)
        .bind(app_id)
        .bind(wanted)
        .bind(limit)
        .fetch(self)
    }

    async fn tables(&mut self, user_id: &str, app_id: Option<&str>) -> sqlx::Result<Vec<TableRow>> {
        // A skip-scan of the primary key (user, app, table, record): one
        // index probe per app and per table, however many records each
        // holds, where `SELECT DISTINCT` read every record of the user
        // (160-200 ms for 200,000 of them).
        sqlx::query_as(
            "WITH RECURSIVE
               apps(app_id) AS (
                 SELECT CASE WHEN ?2 IS NULL
                   THEN (SELECT r.app_id FROM sync_records r WHERE r.user_id = ?1 ORDER BY r.app_id LIMIT 1)
                   ELSE ?2 END
                 UNION ALL
                 SELECT (SELECT r.app_id FROM sync_records r
                         WHERE r.user_id = ?1 AND r.app_id > apps.app_id ORDER BY r.app_id LIMIT 1)
                 FROM apps WHERE apps.app_id IS NOT NULL AND ?2 IS NULL
               ),
               known(app_id, table_name) AS (
                 SELECT apps.app_id, (SELECT r.table_name FROM sync_records r
                         WHERE r.user_id = ?1 AND r.app_id = apps.app_id ORDER BY r.table_name LIMIT 1)
                 FROM apps WHERE apps.app_id IS NOT NULL
                 UNION ALL
                 SELECT known.app_id, (SELECT r.table_name FROM sync_records r
                         WHERE r.user_id = ?1 AND r.app_id = known.app_id AND r.table_name > known.table_name
                         ORDER BY r.table_name LIMIT 1)
                 FROM known WHERE known.table_name IS NOT NULL
               )
             SELECT app_id, table_name FROM known WHERE table_name IS NOT NULL ORDER BY 1, 2",
        )
        .bind(user_id)
        .bind(app_id)
        .fetch_all(self)
        .await
    }

    async fn find_outcome(&mut self, user_id: &str, key: &str, ttl: Duration) -> sqlx::Result<Option<OutcomeRow>> {
        sqlx::query_as(
            "SELECT request_hash, first_seq FROM sync_idempotency
             WHERE user_id = ?1 AND idempotency_key = ?2 AND created_at > unixepoch('subsec') * 1000 - ?3 * 1000",
        )
        .bind(user_id)
        .bind(key)
        .bind(ttl.as_secs_f64())
        .fetch_optional(self)
        .await
    }

    async fn save_outcome(
        &mut self,
        user_id: &str,
        key: &str,
        fingerprint: &[u8],
        first_seq: i64,
    ) -> sqlx::Result<i64> {
        // A row already under the key is an expired one (a live one would
        // have been replayed): it is replaced.
        sqlx::query(
            "INSERT INTO sync_idempotency (user_id, idempotency_key, request_hash, first_seq, created_at)
             VALUES (?1, ?2, ?3, ?4, CAST(unixepoch('subsec') * 1000 AS INTEGER))
             ON CONFLICT (user_id, idempotency_key) DO UPDATE
             SET request_hash = excluded.request_hash, first_seq = excluded.first_seq, created_at = excluded.created_at",
        )
        .bind(user_id)
        .bind(key)
        .bind(fingerprint)
        .bind(first_seq)
        .execute(&mut *self)
        .await?;
        sqlx::query_scalar("UPDATE sync_clocks SET outcomes = outcomes + 1 WHERE user_id = ?1 RETURNING outcomes")
            .bind(user_id)
            .fetch_one(self)
            .await
    }

    async fn trim_outcomes(&mut self, user_id: &str, ttl: Duration, keep: u64) -> sqlx::Result<()> {
        sqlx::query(
            "DELETE FROM sync_idempotency WHERE user_id = ?1 AND created_at <= unixepoch('subsec') * 1000 - ?2 * 1000",
        )
        .bind(user_id)
        .bind(ttl.as_secs_f64())
        .execute(&mut *self)
        .await?;
        sqlx::query(
            "DELETE FROM sync_idempotency WHERE user_id = ?1 AND idempotency_key IN (
               SELECT idempotency_key FROM sync_idempotency WHERE user_id = ?1
               ORDER BY created_at DESC, idempotency_key DESC LIMIT -1 OFFSET ?2)",
        )
        .bind(user_id)
        .bind(i64::try_from(keep).unwrap_or(i64::MAX))
        .execute(&mut *self)
        .await?;
        sqlx::query(
            "UPDATE sync_clocks SET outcomes = (SELECT count(*) FROM sync_idempotency WHERE user_id = ?1)
             WHERE user_id = ?1",
        )
        .bind(user_id)
        .execute(self)
        .await?;
        Ok(())
    }

    fn is_busy(e: &sqlx::Error) -> bool {
        // SQLITE_BUSY and its extended codes: the busy timeout expired
        // (another process writes to the file, which the lock file should
        // prevent).
        matches!(
            e.as_database_error().and_then(|d| d.code()).as_deref(),
            Some("5" | "261" | "517")
        )
    }

    fn is_unavailable(_: &sqlx::Error) -> bool {
        // A local file: there is no outage to wait out, only faults.
        false
    }

    fn is_exhausted(e: &sqlx::Error) -> bool {
        // SQLITE_FULL (the disk, or `max_page_count`) and SQLITE_NOMEM;
        // sqlx gives the extended code, whose low byte is the primary one.
        e.as_database_error()
            .and_then(|d| d.code())
            .and_then(|c| c.parse::<u32>().ok())
            .is_some_and(|c| matches!(c & 0xff, 13 | 7))
    }
}

/// The user's clock row as a push leaves it.
#[derive(sqlx::FromRow)]
struct Reserved {
    last_seq: i64,
    #[sqlx(flatten)]
    usage: ClockUsage,
}

/// Advances the user's clock by `n`; returns its new value and the usage counters.
async fn reserve(conn: &mut SqliteConnection, user_id: &str, n: i64) -> sqlx::Result<Reserved> {
    sqlx::query_as(
        "INSERT INTO sync_clocks (user_id, last_seq) VALUES (?1, ?3 + ?2 - 1)
         ON CONFLICT (user_id) DO UPDATE
         SET last_seq = max(sync_clocks.last_seq + ?2, excluded.last_seq), previous_seq = sync_clocks.last_seq
         RETURNING last_seq, counted_seq IS previous_seq AS counted, records, bytes",
    )
    .bind(user_id)
    .bind(n)
    .bind(Timestamp::now().0)
    .fetch_one(conn)
    .await
}

/// Appends a batch's rows at positions `first_seq..`.
async fn append(
    conn: &mut SqliteConnection,
    user_id: &str,
    app_id: &str,
    client_id: &str,
    first_seq: i64,
    rows: &[NewRow<'_>],
) -> sqlx::Result<()> {
    let rows: Vec<Value> = rows
        .iter()
        .zip(first_seq..)
        .map(|(r, seq)| {
            json!([
                r.id.to_string(),
                seq,
                r.table,
                r.record_id,
                r.op,
                r.data,
                r.stamps,
                r.untimed,
                r.meta.as_ref().map(Value::to_string)
            ])
        })
        .collect();
    sqlx::query(
        "INSERT INTO sync_changes (id, seq, app_id, table_name, record_id, user_id, op, data, field_timestamps, untimed, client_id, meta)
         SELECT j.value ->> 0, j.value ->> 1, ?1, j.value ->> 2, j.value ->> 3, ?2, j.value ->> 4,
                j.value ->> 5, j.value ->> 6, j.value ->> 7, ?3, j.value ->> 8
         FROM json_each(?4) AS j",
    )
    .bind(app_id)
    .bind(user_id)
    .bind(client_id)
    .bind(Json(rows))
    .execute(conn)
    .await?;
    Ok(())
}

impl PoolDialect for SqlitePool {
    type Connection = SqliteConnection;

    async fn users(&self) -> sqlx::Result<Vec<String>> {
        sqlx::query_scalar("SELECT user_id FROM sync_clocks ORDER BY user_id")
            .fetch_all(self)
            .await
    }

    async fn sweep_outcomes(&self, ttl: Duration, batch: i64) -> sqlx::Result<u64> {
        Ok(sqlx::query(
            "DELETE FROM sync_idempotency WHERE (user_id, idempotency_key) IN (
               SELECT user_id, idempotency_key FROM sync_idempotency
               WHERE created_at <= unixepoch('subsec') * 1000 - ?1 * 1000
               ORDER BY created_at LIMIT ?2)",
        )
        .bind(ttl.as_secs_f64())
        .bind(batch)
        .execute(self)
        .await?
        .rows_affected())
    }

    async fn ping(&self) -> sqlx::Result<()> {
        sqlx::query("SELECT 1").execute(self).await?;
        Ok(())
    }
}

/// Begins a write transaction that takes the database's write lock at
/// once, so writers queue for it in order rather than fail on upgrade.
pub async fn begin_immediate(pool: &SqlitePool) -> sqlx::Result<Transaction<'static, Sqlite>> {
    pool.begin_with("BEGIN IMMEDIATE").await
}
