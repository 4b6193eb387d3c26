//! The PostgreSQL statements: the log, the projection and idempotent
//! outcomes (NOTIFY and LISTEN between replicas are in [`super::channel`]).

use std::time::Duration;

use futures_util::stream::BoxStream;
use sqlx::{PgConnection, PgPool};

use crate::cursor::Cursor;
use crate::quota::Usage;
use crate::store::dialect::{Dialect, PoolDialect, read_batch};
use crate::store::rows::{
    AppendedRows, BatchRow, LogRow, NewRow, OutcomeRow, PageRow, RecordRow, SavedRow, TableRow, UsageRow,
};
use crate::timestamp::Timestamp;

impl Dialect for PgConnection {
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
        // One round trip for four statements: advance the user's clock
        // (positions are the database's clock in nanoseconds, one clock for
        // every replica; the row stays locked until the transaction ends),
        // append the rows at the positions handed out, and read the
        // batch's records and the page. The reads see the statement's
        // snapshot, taken before the clock was locked: if another
        // transaction moved the clock in between (a push on another
        // replica that this one waited for, or a rebuild), they may miss
        // its writes, and are made again now that the lock is held.
        // `previous_seq` is how the statement tells: the clock as it found
        // it when locked, against the clock its snapshot saw.
        let (tables, ids): (Vec<&str>, Vec<&str>) = keys.iter().copied().unzip();
        let batch: Vec<BatchRow> = sqlx::query_as(
            "WITH clock AS (
               INSERT INTO sync_clocks (user_id, last_seq)
               VALUES ($1, (EXTRACT(EPOCH FROM clock_timestamp()) * 1000000)::bigint * 1000 + $4 - 1)
               ON CONFLICT (user_id) DO UPDATE
               SET last_seq = GREATEST(sync_clocks.last_seq + $4, EXCLUDED.last_seq), previous_seq = sync_clocks.last_seq
               RETURNING last_seq, previous_seq, records, bytes, counted_seq),
             appended AS (
               INSERT INTO sync_changes (id, seq, app_id, table_name, record_id, user_id, op, data, field_timestamps, untimed, client_id, meta)
               SELECT u.id, c.last_seq - $4 + u.n, $2, u.table_name, u.record_id, $1, u.op, u.data, u.stamps, u.untimed, $3, u.meta
               FROM clock c, UNNEST($5::uuid[], $6::text[], $7::text[], $8::text[], $9::jsonb[], $10::jsonb[], $11::bool[], $16::jsonb[])
                 WITH ORDINALITY AS u(id, table_name, record_id, op, data, stamps, untimed, meta, n))
             SELECT c.last_seq,
                    c.previous_seq IS NOT DISTINCT FROM (SELECT s.last_seq FROM sync_clocks s WHERE s.user_id = $1) AS fresh,
                    c.counted_seq IS NOT DISTINCT FROM c.previous_seq AS counted, c.records, c.bytes,
                    r.loaded, r.table_name, r.record_id, r.fields::text AS fields, r.writers::text AS writers, r.created_seq, r.touched_seq
             FROM clock c LEFT JOIN LATERAL (
               SELECT true AS loaded, r.table_name, r.record_id, r.fields, r.writers, r.created_seq, r.touched_seq
               FROM UNNEST($14::text[], $15::text[]) AS k(table_name, record_id)
               CROSS JOIN LATERAL (
                 SELECT * FROM sync_records r
                 WHERE r.user_id = $1 AND r.app_id = $2 AND r.table_name = k.table_name AND r.record_id = k.record_id
                 LIMIT 1) r
               UNION ALL
               (SELECT false, r.table_name, r.record_id, r.fields, r.writers, r.created_seq, r.touched_seq
                FROM sync_records r
                WHERE r.user_id = $1 AND r.app_id = $2 AND r.touched_seq > 0 AND r.touched_seq > $12
                ORDER BY r.touched_seq LIMIT $13)) r ON true",
        )
        .bind(user_id)
        .bind(app_id)
        .bind(client_id)
        .bind(rows.len() as i64)
        .bind(rows.iter().map(|r| r.id).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.table).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.record_id).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.op).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| &r.data).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| &r.stamps).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.untimed).collect::<Vec<_>>())
        .bind(since.0)
        .bind(limit)
        .bind(tables)
        .bind(ids)
        .bind(rows.iter().map(|r| r.meta.as_ref()).collect::<Vec<_>>())
        .fetch_all(&mut *self)
        .await?;
        let last_seq = batch.first().map_or(0, |b| b.row.last_seq);
        // The counters come from the clock row as locked, hence current.
        let usage = batch.first().and_then(|b| b.usage.usage());
        if !batch.first().is_some_and(|b| b.fresh) {
            let (states, page) = read_batch(self, user_id, app_id, keys, since, limit).await?;
            return Ok(AppendedRows {
                last_seq,
                usage,
                states,
                page,
            });
        }
        let (mut states, mut page) = (Vec::new(), Vec::new());
        for b in batch {
            let loaded = b.loaded;
            let Some(record) = b.row.into_parts().map_err(|e| sqlx::Error::Decode(Box::new(e)))?.1 else {
                continue;
            };
            match loaded {
                Some(true) => states.push(record),
                _ => page.push(record),
            }
        }
        Ok(AppendedRows {
            last_seq,
            usage,
            states,
            page,
        })
    }

    async fn lock_clock(&mut self, user_id: &str) -> sqlx::Result<()> {
        // Moving the clock on by one position, which no change takes, tells
        // a push that read before this transaction committed that what it
        // read is stale (see `append_batch`).
        sqlx::query("UPDATE sync_clocks SET last_seq = last_seq + 1, previous_seq = last_seq WHERE user_id = $1")
            .bind(user_id)
            .execute(self)
            .await?;
        Ok(())
    }

    fn replay<'c>(&'c mut self, user_id: &'c str) -> BoxStream<'c, sqlx::Result<LogRow>> {
        sqlx::query_as(
            "SELECT app_id, table_name, record_id, seq, data, field_timestamps, untimed, meta
             FROM sync_changes WHERE user_id = $1 ORDER BY seq",
        )
        .bind(user_id)
        .fetch(self)
    }

    async fn load(&mut self, user_id: &str, app_id: &str, keys: &[(&str, &str)]) -> sqlx::Result<Vec<RecordRow>> {
        let (tables, ids): (Vec<&str>, Vec<&str>) = keys.iter().copied().unzip();
        sqlx::query_as(
            // One primary-key probe per key: the LIMIT keeps the planner from
            // turning this into a hash join over all of the user's records.
            // The delta indexes are partial so that it cannot probe them
            // instead (see the migration `delta_indexes_never_probe_keys`).
            "SELECT r.table_name, r.record_id, r.fields::text AS fields, r.writers::text AS writers, r.created_seq, r.touched_seq
             FROM UNNEST($3::text[], $4::text[]) AS k(table_name, record_id)
             CROSS JOIN LATERAL (
               SELECT * FROM sync_records r
               WHERE r.user_id = $1 AND r.app_id = $2 AND r.table_name = k.table_name AND r.record_id = k.record_id
               LIMIT 1) r",
        )
        .bind(user_id)
        .bind(app_id)
        .bind(tables)
        .bind(ids)
        .fetch_all(self)
        .await
    }

    async fn count_usage(&mut self, user_id: &str) -> sqlx::Result<Usage> {
        // A state's text as stored is its `json` text as written (see `save`).
        let row: UsageRow = sqlx::query_as(
            "SELECT count(*) AS records,
                    coalesce(sum(octet_length(table_name) + octet_length(record_id) + octet_length(fields::text)
                        + coalesce(octet_length(writers::text), 0)), 0)::bigint AS bytes
             FROM sync_records WHERE user_id = $1",
        )
        .bind(user_id)
        .fetch_one(self)
        .await?;
        Ok(row.into())
    }

    async fn set_usage(&mut self, user_id: &str, usage: Usage) -> sqlx::Result<()> {
        sqlx::query("UPDATE sync_clocks SET records = $2, bytes = $3, counted_seq = last_seq WHERE user_id = $1")
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
        // The states go as text, which the `json` column keeps as it is.
        // The counters are set in the same round trip (the clock row is
        // already locked by the push); without them the UPDATE matches
        // nothing.
        sqlx::query(
            "WITH saved AS (
               INSERT INTO sync_records (user_id, app_id, table_name, record_id, fields, writers, created_seq, touched_seq)
               SELECT $1, $2, u.table_name, u.record_id, u.fields::json, u.writers::json, u.created_seq, u.touched_seq
               FROM UNNEST($3::text[], $4::text[], $5::text[], $10::text[], $6::bigint[], $7::bigint[])
                 AS u(table_name, record_id, fields, writers, created_seq, touched_seq)
               ON CONFLICT (user_id, app_id, table_name, record_id) DO UPDATE
               SET fields = EXCLUDED.fields, writers = EXCLUDED.writers,
                   created_seq = EXCLUDED.created_seq, touched_seq = EXCLUDED.touched_seq)
             UPDATE sync_clocks SET records = $8, bytes = $9, counted_seq = last_seq
             WHERE user_id = $1 AND $8::bigint IS NOT NULL",
        )
        .bind(user_id)
        .bind(app_id)
        .bind(rows.iter().map(|r| r.table).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.record_id).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.fields.as_str()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.created_seq).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.touched_seq).collect::<Vec<_>>())
        .bind(usage.map(|u| u.records))
        .bind(usage.map(|u| u.bytes))
        .bind(rows.iter().map(|r| r.writers.as_deref()).collect::<Vec<_>>())
        .execute(self)
        .await?;
        Ok(())
    }

    async fn clear_records(&mut self, user_id: &str) -> sqlx::Result<()> {
        sqlx::query("DELETE FROM sync_records WHERE user_id = $1")
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
        // The bound by the clock keeps out records committed after the
        // clock was read. A statement per case rather than `table IS NULL
        // OR ...`, so each keeps a plan that walks its own index in
        // touched_seq order. `touched_seq > 0`, which changes nothing
        // (cursors are never negative), is the delta indexes' predicate,
        // stated so that the planner may use them (see the migration
        // `delta_indexes_never_probe_keys`).
        let statement = match table {
            Some(_) => {
                "SELECT c.last_seq, r.table_name, r.record_id, r.fields::text AS fields, r.writers::text AS writers, r.created_seq, r.touched_seq
                 FROM sync_clocks c LEFT JOIN LATERAL (
                   SELECT * FROM sync_records r
                   WHERE r.user_id = c.user_id AND r.app_id = $2 AND r.table_name = $5
                     AND r.touched_seq > 0 AND r.touched_seq > $3 AND r.touched_seq <= c.last_seq
                   ORDER BY r.touched_seq LIMIT $4) r ON true
                 WHERE c.user_id = $1"
            }
            None => {
                "SELECT c.last_seq, r.table_name, r.record_id, r.fields::text AS fields, r.writers::text AS writers, r.created_seq, r.touched_seq
                 FROM sync_clocks c LEFT JOIN LATERAL (
                   SELECT * FROM sync_records r
                   WHERE r.user_id = c.user_id AND r.app_id = $2
                     AND r.touched_seq > 0 AND r.touched_seq > $3 AND r.touched_seq <= c.last_seq
                   ORDER BY r.touched_seq LIMIT $4) r ON true
                 WHERE c.user_id = $1"
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
        // Each table walks its own delta index, as a page of one table does.
        let names: Vec<&str> = tables.iter().map(|(t, _)| t.as_str()).collect();
        let cursors: Vec<i64> = tables.iter().map(|(_, c)| c.0).collect();
        sqlx::query_as(
            "SELECT c.last_seq, r.table_name, r.record_id, r.fields::text AS fields, r.writers::text AS writers, r.created_seq, r.touched_seq
             FROM sync_clocks c LEFT JOIN LATERAL (
               SELECT d.ord, p.*
               FROM unnest($3::text[], $4::bigint[]) WITH ORDINALITY AS d(table_name, since, ord)
               CROSS JOIN LATERAL (
                 SELECT * FROM sync_records r
                 WHERE r.user_id = c.user_id AND r.app_id = $2 AND r.table_name = d.table_name
                   AND r.touched_seq > 0 AND r.touched_seq > d.since AND r.touched_seq <= c.last_seq
                 ORDER BY r.touched_seq LIMIT $5) p) r ON true
             WHERE c.user_id = $1
             ORDER BY r.ord, r.touched_seq",
        )
        .bind(user_id)
        .bind(app_id)
        .bind(names)
        .bind(cursors)
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
                 SELECT CASE WHEN $2::text IS NULL
                   THEN (SELECT r.app_id FROM sync_records r WHERE r.user_id = $1 ORDER BY r.app_id LIMIT 1)
                   ELSE $2::text END
                 UNION ALL
                 SELECT (SELECT r.app_id FROM sync_records r
                         WHERE r.user_id = $1 AND r.app_id > apps.app_id ORDER BY r.app_id LIMIT 1)
                 FROM apps WHERE apps.app_id IS NOT NULL AND $2::text IS NULL
               ),
               known(app_id, table_name) AS (
                 SELECT apps.app_id, (SELECT r.table_name FROM sync_records r
                         WHERE r.user_id = $1 AND r.app_id = apps.app_id ORDER BY r.table_name LIMIT 1)
                 FROM apps WHERE apps.app_id IS NOT NULL
                 UNION ALL
                 SELECT known.app_id, (SELECT r.table_name FROM sync_records r
                         WHERE r.user_id = $1 AND r.app_id = known.app_id AND r.table_name > known.table_name
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
             WHERE user_id = $1 AND idempotency_key = $2 AND created_at > now() - make_interval(secs => $3)",
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
        sqlx::query_scalar(
            "WITH saved AS (
               INSERT INTO sync_idempotency (user_id, idempotency_key, request_hash, first_seq)
               VALUES ($1, $2, $3, $4)
               ON CONFLICT (user_id, idempotency_key) DO UPDATE
               SET request_hash = EXCLUDED.request_hash, first_seq = EXCLUDED.first_seq, response = NULL, created_at = now()
               RETURNING 1)
             UPDATE sync_clocks SET outcomes = outcomes + (SELECT count(*) FROM saved) WHERE user_id = $1
             RETURNING outcomes",
        )
        .bind(user_id)
        .bind(key)
        .bind(fingerprint)
        .bind(first_seq)
        .fetch_one(self)
        .await
    }

    async fn trim_outcomes(&mut self, user_id: &str, ttl: Duration, keep: u64) -> sqlx::Result<()> {
        sqlx::query(
            "DELETE FROM sync_idempotency WHERE user_id = $1 AND created_at <= now() - make_interval(secs => $2)",
        )
        .bind(user_id)
        .bind(ttl.as_secs_f64())
        .execute(&mut *self)
        .await?;
        sqlx::query(
            "DELETE FROM sync_idempotency WHERE user_id = $1 AND idempotency_key IN (
               SELECT idempotency_key FROM sync_idempotency WHERE user_id = $1
               ORDER BY created_at DESC, idempotency_key DESC OFFSET $2)",
        )
        .bind(user_id)
        .bind(i64::try_from(keep).unwrap_or(i64::MAX))
        .execute(&mut *self)
        .await?;
        sqlx::query(
            "UPDATE sync_clocks SET outcomes = (SELECT count(*) FROM sync_idempotency WHERE user_id = $1)
             WHERE user_id = $1",
        )
        .bind(user_id)
        .execute(self)
        .await?;
        Ok(())
    }

    fn is_busy(e: &sqlx::Error) -> bool {
        // SQLSTATE 55P03 lock_not_available: `lock_timeout` expired.
        e.as_database_error().and_then(|d| d.code()).as_deref() == Some("55P03")
    }

    fn is_unavailable(e: &sqlx::Error) -> bool {
        match e {
            sqlx::Error::Io(_) | sqlx::Error::Tls(_) | sqlx::Error::PoolClosed | sqlx::Error::PoolTimedOut => true,
            // Class 08 connection exception; 57P01-57P03 the server is
            // shutting down, crashed or starting; 53300 too many connections.
            sqlx::Error::Database(d) => d
                .code()
                .is_some_and(|c| c.starts_with("08") || matches!(&*c, "57P01" | "57P02" | "57P03" | "53300")),
            _ => false,
        }
    }

    fn is_exhausted(e: &sqlx::Error) -> bool {
        // Class 53 insufficient resources: 53100 disk_full, 53200
        // out_of_memory, 53400 configuration_limit_exceeded (53300, too
        // many connections, is an outage: see above).
        e.as_database_error()
            .and_then(|d| d.code())
            .is_some_and(|c| c.starts_with("53") && c != "53300")
    }
}

impl PoolDialect for PgPool {
    type Connection = PgConnection;

    /// In a maintenance transaction: it may list the users (their clock
    /// rows) and nothing else of anyone's.
    async fn users(&self) -> sqlx::Result<Vec<String>> {
        let mut tx = self.begin().await?;
        sqlx::query("SELECT set_config('mana_sync.maintenance', 'on', true)")
            .execute(&mut *tx)
            .await?;
        let users = sqlx::query_scalar("SELECT user_id FROM sync_clocks ORDER BY user_id")
            .fetch_all(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(users)
    }

    /// In a maintenance transaction told the TTL: row-level security lets
    /// it see and delete expired outcomes and nothing else.
    async fn sweep_outcomes(&self, ttl: Duration, batch: i64) -> sqlx::Result<u64> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "SELECT set_config('mana_sync.maintenance', 'on', true), set_config('mana_sync.outcome_ttl', $1::text, true)",
        )
        .bind(ttl.as_secs_f64())
        .execute(&mut *tx)
        .await?;
        let swept = sqlx::query(
            "DELETE FROM sync_idempotency WHERE (user_id, idempotency_key) IN (
               SELECT user_id, idempotency_key FROM sync_idempotency
               WHERE created_at <= now() - make_interval(secs => $1)
               ORDER BY created_at LIMIT $2)",
        )
        .bind(ttl.as_secs_f64())
        .bind(batch)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        Ok(swept)
    }

    async fn ping(&self) -> sqlx::Result<()> {
        sqlx::query("SELECT 1").execute(self).await?;
        Ok(())
    }
}

/// `BEGIN`, then the scope to one user: row-level security lets the
/// transaction see and write only that user's rows (the setting is
/// transaction-local, so it never leaks to the pooled connection's next
/// user). One simple query, so one round trip instead of two; a simple
/// query binds no parameters, so the id is written as an `E''` literal,
/// backslashes and quotes doubled, which reads the same whatever
/// `standard_conforming_strings` says (the connection's encoding is UTF-8).
pub fn begin_scoped(user_id: &str) -> sqlx::Result<String> {
    if user_id.contains('\0') {
        // No PostgreSQL text holds NUL; authentication refuses such ids.
        return Err(sqlx::Error::Protocol("a user id cannot hold NUL".to_owned()));
    }
    let literal = user_id.replace('\\', "\\\\").replace('\'', "''");
    Ok(format!(
        "BEGIN; SELECT set_config('mana_sync.user_id', E'{literal}', true)"
    ))
}

/// Whether the role row-level security would be enforced on bypasses it
/// (superusers and BYPASSRLS roles do).
pub async fn bypasses_rls(pool: &PgPool) -> sqlx::Result<bool> {
    sqlx::query_scalar("SELECT rolsuper OR rolbypassrls FROM pg_roles WHERE rolname = current_user")
        .fetch_one(pool)
        .await
}

/// Lets the migrator wait for other replicas' migrations for as long as they take.
pub async fn no_lock_timeout(conn: &mut PgConnection) -> sqlx::Result<()> {
    sqlx::query("SET lock_timeout = 0").execute(conn).await?;
    Ok(())
}

/// Whether a connection still answers.
/// The database's clock now (`clock_timestamp()`, not the transaction's
/// start), to the microsecond: what the probe keeps the replica's time to.
pub async fn database_time(conn: &mut PgConnection) -> sqlx::Result<Timestamp> {
    let micros: i64 = sqlx::query_scalar("SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::int8")
        .fetch_one(conn)
        .await?;
    Ok(Timestamp(micros.saturating_mul(1000)))
}

#[cfg(test)]
mod tests {
    use super::begin_scoped;

    #[test]
    fn a_user_id_is_one_escaped_literal() {
        assert_eq!(
            begin_scoped("alice").unwrap(),
            "BEGIN; SELECT set_config('mana_sync.user_id', E'alice', true)"
        );
        assert_eq!(
            begin_scoped(r"o'brien\'); DROP TABLE sync_changes; --").unwrap(),
            r"BEGIN; SELECT set_config('mana_sync.user_id', E'o''brien\\''); DROP TABLE sync_changes; --', true)"
        );
        assert!(begin_scoped("nul\0").is_err());
    }
}
