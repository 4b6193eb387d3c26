//! The projection of the fold (`sync_records`): every record's current
//! field-level state, kept up to date by each push in the same transaction
//! as its log rows, so a pull reads one row per record however long the
//! record's history is. Derived from the log alone: [`rebuild`] re-derives it.

use std::collections::{BTreeMap, HashMap};

use anyhow::Context;
use futures_util::TryStreamExt;
use sqlx::types::Json;
use sqlx::{PgConnection, PgPool};

use crate::change_log::{self, RecordKey};
use crate::cursor::Cursor;
use crate::db;
use crate::fold::{FieldState, RecordState};

/// A record of one app with its folded state.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    pub table: String,
    pub id: String,
    pub state: RecordState,
}

type Row = (String, String, Json<BTreeMap<String, FieldState>>, i64, i64);

fn record((table, id, Json(fields), created, touched): Row) -> Record {
    Record {
        table,
        id,
        state: RecordState {
            fields,
            created,
            touched,
        },
    }
}

/// The current state of the given records of one app (those that exist).
pub async fn load(
    conn: &mut PgConnection,
    user_id: &str,
    app_id: &str,
    keys: &[(&str, &str)],
) -> sqlx::Result<HashMap<(String, String), RecordState>> {
    let (tables, ids): (Vec<&str>, Vec<&str>) = keys.iter().copied().unzip();
    let rows: Vec<Row> = sqlx::query_as(
        // One primary-key probe per key: the LIMIT keeps the planner from
        // turning this into a hash join over all of the user's records.
        "SELECT r.table_name, r.record_id, r.fields, r.created_seq, r.touched_seq
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
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(record)
        .map(|r| ((r.table, r.id), r.state))
        .collect())
}

/// Writes the given records' state (insert or replace).
pub async fn save(conn: &mut PgConnection, user_id: &str, app_id: &str, records: &[Record]) -> sqlx::Result<()> {
    let mut tables = Vec::with_capacity(records.len());
    let mut ids = Vec::with_capacity(records.len());
    let mut fields = Vec::with_capacity(records.len());
    let mut created = Vec::with_capacity(records.len());
    let mut touched = Vec::with_capacity(records.len());
    for r in records {
        tables.push(r.table.as_str());
        ids.push(r.id.as_str());
        fields.push(Json(&r.state.fields));
        created.push(r.state.created);
        touched.push(r.state.touched);
    }
    sqlx::query(
        "INSERT INTO sync_records (user_id, app_id, table_name, record_id, fields, created_seq, touched_seq)
         SELECT $1, $2, u.table_name, u.record_id, u.fields, u.created_seq, u.touched_seq
         FROM UNNEST($3::text[], $4::text[], $5::jsonb[], $6::bigint[], $7::bigint[])
           AS u(table_name, record_id, fields, created_seq, touched_seq)
         ON CONFLICT (user_id, app_id, table_name, record_id) DO UPDATE
         SET fields = EXCLUDED.fields, created_seq = EXCLUDED.created_seq, touched_seq = EXCLUDED.touched_seq",
    )
    .bind(user_id)
    .bind(app_id)
    .bind(tables)
    .bind(ids)
    .bind(fields)
    .bind(created)
    .bind(touched)
    .execute(conn)
    .await?;
    Ok(())
}

/// A page of records changed after a cursor, read in one snapshot.
#[derive(Debug)]
pub struct Page {
    /// The user's last committed log position in that snapshot (`None`: the
    /// user has never written anything).
    pub clock: Option<i64>,
    /// Records in log order of their last change.
    pub records: Vec<Record>,
    /// More records changed after the last one here.
    pub has_more: bool,
}

/// Records of one app (of one table, if given) whose last change is after
/// `since`, oldest first: at most `limit`, and no more once their JSON
/// passes `max_bytes` (but always at least one). The clock and the records
/// come from one statement, hence one snapshot: nothing at or below the
/// clock can commit later, so the clock is a safe cursor for a complete page.
pub async fn changed_since(
    conn: &mut PgConnection,
    user_id: &str,
    app_id: &str,
    table: Option<&str>,
    since: Cursor,
    limit: usize,
    max_bytes: i64,
) -> sqlx::Result<Page> {
    // Two statements rather than `table IS NULL OR ...`, so each keeps a
    // plan that walks its own index in touched_seq order.
    let sql = match table {
        Some(_) => {
            "SELECT c.last_seq, r.table_name, r.record_id, r.fields, r.created_seq, r.touched_seq,
                    octet_length(r.fields::text)::bigint
             FROM sync_clocks c LEFT JOIN LATERAL (
               SELECT * FROM sync_records r
               WHERE r.user_id = c.user_id AND r.app_id = $2 AND r.table_name = $5
                 AND r.touched_seq > $3 AND r.touched_seq <= c.last_seq
               ORDER BY r.touched_seq LIMIT $4) r ON true
             WHERE c.user_id = $1"
        }
        None => {
            "SELECT c.last_seq, r.table_name, r.record_id, r.fields, r.created_seq, r.touched_seq,
                    octet_length(r.fields::text)::bigint
             FROM sync_clocks c LEFT JOIN LATERAL (
               SELECT * FROM sync_records r
               WHERE r.user_id = c.user_id AND r.app_id = $2
                 AND r.touched_seq > $3 AND r.touched_seq <= c.last_seq
               ORDER BY r.touched_seq LIMIT $4) r ON true
             WHERE c.user_id = $1"
        }
    };
    type PageRow = (
        i64,
        Option<String>,
        Option<String>,
        Option<Json<BTreeMap<String, FieldState>>>,
        Option<i64>,
        Option<i64>,
        Option<i64>,
    );
    let mut query = sqlx::query_as::<_, PageRow>(sql)
        .bind(user_id)
        .bind(app_id)
        .bind(since.0)
        .bind(limit as i64 + 1);
    if let Some(table) = table {
        query = query.bind(table);
    }
    let mut rows = query.fetch(conn);
    let mut page = Page {
        clock: None,
        records: Vec::new(),
        has_more: false,
    };
    let mut bytes = 0;
    while let Some((clock, table, id, fields, created, touched, size)) = rows.try_next().await? {
        page.clock = Some(clock);
        let (Some(table), Some(id), Some(fields), Some(created), Some(touched)) = (table, id, fields, created, touched)
        else {
            break; // the user has a clock but nothing changed after `since`
        };
        bytes += size.unwrap_or(0);
        if page.records.len() == limit || (!page.records.is_empty() && bytes > max_bytes) {
            page.has_more = true;
            break;
        }
        page.records.push(record((table, id, fields, created, touched)));
    }
    Ok(page)
}

/// Re-derives the whole projection from the log, one user at a time. Each
/// user's clock is locked meanwhile, so pushes wait rather than interleave.
/// Returns (users, log entries, records).
pub async fn rebuild(pool: &PgPool) -> anyhow::Result<(u64, u64, u64)> {
    let users: Vec<String> = {
        let mut tx = db::begin_maintenance(pool).await?;
        let users = sqlx::query_scalar("SELECT user_id FROM sync_clocks ORDER BY user_id")
            .fetch_all(&mut *tx)
            .await?;
        tx.commit().await?;
        users
    };
    let (mut entries, mut records) = (0, 0);
    for user in &users {
        let (e, r) = rebuild_user(pool, user)
            .await
            .with_context(|| format!("failed to rebuild user {user:?}"))?;
        entries += e;
        records += r;
    }
    Ok((users.len() as u64, entries, records))
}

async fn rebuild_user(pool: &PgPool, user_id: &str) -> anyhow::Result<(u64, u64)> {
    let mut tx = db::begin_for(pool, user_id).await?;
    change_log::lock(&mut tx, user_id).await?;
    let mut folded: BTreeMap<RecordKey, RecordState> = BTreeMap::new();
    let entries = change_log::replay(&mut tx, user_id, |key, entry| {
        folded.entry(key).or_default().apply(&entry)
    })
    .await?;
    sqlx::query("DELETE FROM sync_records WHERE user_id = $1")
        .bind(user_id)
        .execute(&mut *tx)
        .await?;
    let mut by_app: BTreeMap<String, Vec<Record>> = BTreeMap::new();
    let count = folded.len() as u64;
    for (key, state) in folded {
        by_app.entry(key.app_id).or_default().push(Record {
            table: key.table,
            id: key.id,
            state,
        });
    }
    for (app_id, records) in by_app {
        for chunk in records.chunks(1000) {
            save(&mut tx, user_id, &app_id, chunk).await?;
        }
    }
    tx.commit().await?;
    Ok((entries, count))
}

/// The (app, table) pairs a user has records in, of one app if given: what
/// "pull everything" names.
pub async fn tables(pool: &PgPool, user_id: &str, app_id: Option<&str>) -> sqlx::Result<Vec<(String, String)>> {
    let mut tx = db::begin_for(pool, user_id).await?;
    let tables = sqlx::query_as(
        "SELECT DISTINCT app_id, table_name FROM sync_records
         WHERE user_id = $1 AND ($2::text IS NULL OR app_id = $2) ORDER BY 1, 2",
    )
    .bind(user_id)
    .bind(app_id)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(tables)
}
