//! The sync service: push, pull and [`rebuild`], the change log, the fold
//! and the cursor put together, one transaction per request.

mod rebuild;
pub mod sweep;

use std::collections::{BTreeMap, HashMap};

use tracing::Instrument;

pub use self::rebuild::rebuild;
use crate::change_log::Batch;
use crate::cursor::Cursor;
use crate::error::{Error, Result};
use crate::fanout::Notifier;
use crate::fold::{Delta, LogEntry, RecordDelta, RecordState};
use crate::hub::{Hub, Notice};
use crate::idempotency::{self, Outcome};
use crate::metrics::Metrics;
use crate::projection::{Page, PageBuilder, Record};
use crate::protocol::{FieldValue, MAX_PAGE_BYTES, Op, ServerChange, SyncResponse};
use crate::quota::{self, Quotas};
use crate::store::{Store, Tx};

/// An `Idempotency-Key` and the fingerprint of the request it came with.
pub struct Idempotency {
    pub key: String,
    pub fingerprint: Vec<u8>,
    /// How long the outcome is kept for replay.
    pub ttl: std::time::Duration,
    /// Most outcomes kept per user (0: no limit).
    pub max_keys: u64,
}

/// Records a batch and answers with everything since `batch.since`, in
/// one transaction: all changes are recorded or none, and the answer is
/// sent only after commit; then the user's other devices are told. A
/// retry under the same idempotency key records nothing and is answered
/// afresh, the batch's changes included (see [`idempotency`]). A push that
/// would take the user over a quota records nothing.
///
/// [`idempotency`]: crate::idempotency
#[tracing::instrument(
    name = "sync.push",
    skip_all,
    fields(
        app_id = %app_id,
        changes = batch.changes.len(),
        tables = %batch.tables().into_iter().collect::<Vec<_>>().join(","),
        records = tracing::field::Empty,
        replayed = tracing::field::Empty,
    )
)]
#[allow(clippy::too_many_arguments)]
pub async fn push(
    store: &Store,
    notifier: &Notifier,
    metrics: &Metrics,
    quotas: &Quotas,
    user_id: &str,
    app_id: &str,
    batch: &Batch,
    idempotency: Option<&Idempotency>,
    limit: u32,
) -> Result<SyncResponse> {
    if batch.changes.is_empty() {
        return answer_empty(store, metrics, user_id, app_id, batch, idempotency, limit).await;
    }
    let mut tx = store.begin_write(user_id).await?;
    // The clock lock comes first: it serialises the user's pushes, so an
    // idempotency key cannot be checked by two of them at once. A quota
    // refusal writes nothing and leaves the transaction usable: a retry of
    // a batch accepted before the user went over is still replayed.
    let recorded = match record(&mut tx, user_id, app_id, batch, limit, quotas).await {
        Err(e @ Error::OverQuota { .. }) => Err(e),
        other => Ok(other?),
    };
    if let Some(idem) = idempotency
        && let Some(outcome) = tx.find_outcome(user_id, &idem.key, idem.ttl).await?
    {
        tx.rollback().await?;
        return replay(store, metrics, user_id, app_id, idem, &outcome, batch, limit).await;
    }
    let recorded = recorded.inspect_err(|e| {
        if let Error::OverQuota { limit, .. } = e {
            metrics.quota_refused(limit);
        }
    })?;
    let response = respond(recorded.page, batch.since, Some(&batch.client_id));
    if let Some(idem) = idempotency {
        tx.save_outcome(
            user_id,
            &idem.key,
            &idem.fingerprint,
            recorded.first_seq,
            idem.ttl,
            idem.max_keys,
        )
        .await?;
    }
    // Commit and announce in a task of their own: if the client goes away
    // and this request is dropped, a committed batch is still announced.
    let last_seq = recorded.first_seq + batch.changes.len() as i64 - 1;
    let announce = (notifier.clone(), notice(user_id, app_id, batch, last_seq));
    tokio::spawn(
        async move {
            tx.commit().await?;
            let (notifier, notice) = announce;
            notifier.publish(notice);
            Ok::<_, Error>(())
        }
        .in_current_span(),
    )
    .await
    .map_err(|e| Error::Internal(anyhow::Error::new(e).context("commit task failed")))??;
    metrics.changes_appended(batch.changes.len());
    counted(metrics, &response);
    Ok(response)
}

/// A push of no changes: a pull of every table of the app, which waits
/// for no writer and keeps no outcome. Its key is still looked up, so that
/// a key used before for other changes is refused.
async fn answer_empty(
    store: &Store,
    metrics: &Metrics,
    user_id: &str,
    app_id: &str,
    batch: &Batch,
    idempotency: Option<&Idempotency>,
    limit: u32,
) -> Result<SyncResponse> {
    let mut tx = store.begin_read(user_id).await?;
    if let Some(idem) = idempotency
        && let Some(outcome) = tx.find_outcome(user_id, &idem.key, idem.ttl).await?
    {
        tx.rollback().await?;
        return replay(store, metrics, user_id, app_id, idem, &outcome, batch, limit).await;
    }
    let page = tx
        .changed_since(user_id, app_id, None, batch.since, limit as usize, MAX_PAGE_BYTES)
        .await?;
    tx.commit().await?;
    let response = respond(page, batch.since, Some(&batch.client_id));
    counted(metrics, &response);
    Ok(response)
}

/// Answers a retry of a recorded batch, or refuses a key reused for other
/// changes: everything since [`idempotency::replay_since`], read afresh.
#[allow(clippy::too_many_arguments)]
async fn replay(
    store: &Store,
    metrics: &Metrics,
    user_id: &str,
    app_id: &str,
    idem: &Idempotency,
    outcome: &Outcome,
    batch: &Batch,
    limit: u32,
) -> Result<SyncResponse> {
    if outcome.fingerprint != idem.fingerprint {
        return Err(Error::IdempotencyKeyReused(idem.key.clone()));
    }
    metrics.idempotent_replay();
    tracing::Span::current().record("replayed", true);
    let since = idempotency::replay_since(outcome, batch.since);
    let mut tx = store.begin_read(user_id).await?;
    let page = tx
        .changed_since(user_id, app_id, None, since, limit as usize, MAX_PAGE_BYTES)
        .await?;
    tx.commit().await?;
    let response = respond(page, since, Some(&batch.client_id));
    counted(metrics, &response);
    Ok(response)
}

/// The tables a user has records in, by app, of one app if given (listed
/// even while it has none): what a notice of "everything" names.
pub async fn tables_by_app(
    store: &Store,
    user_id: &str,
    app_id: Option<&str>,
) -> Result<BTreeMap<String, Vec<String>>> {
    let mut by_app: BTreeMap<String, Vec<String>> =
        app_id.map(|app| (app.to_owned(), Vec::new())).into_iter().collect();
    for known in store.tables(user_id, app_id).await? {
        by_app.entry(known.app_id).or_default().push(known.table_name);
    }
    Ok(by_app)
}

/// Counts the records an answer returns, and notes them on the current span.
fn counted(metrics: &Metrics, response: &SyncResponse) {
    metrics.records_pulled(response.server_changes.len());
    tracing::Span::current().record("records", response.server_changes.len());
}

/// What a committed batch tells the user's other devices; `last_seq` is
/// its last position.
pub fn notice(user_id: &str, app_id: &str, batch: &Batch, last_seq: i64) -> Notice {
    Notice {
        user_id: user_id.to_owned(),
        app_id: app_id.to_owned(),
        client_id: batch.client_id.clone(),
        tables: Some(batch.tables().into_iter().map(str::to_owned).collect()),
        replica: None,
        seq: Some(last_seq),
        committed_at: None,
        traceparent: None,
    }
}

/// What [`record`] did: where the batch starts in the log, and the page
/// it answers with.
pub struct Recorded {
    pub first_seq: i64,
    pub page: Page,
}

/// Appends a non-empty batch to the log and folds it into the projection,
/// inside the caller's transaction (which must be scoped to `user_id`),
/// keeping the user's usage counters, and returns the page of the app's
/// records changed after `batch.since` (the batch's among them). The
/// user's clock stays locked until that transaction ends. A batch that
/// would take the user over a quota is refused before anything of the
/// projection is written ([`Error::OverQuota`]); the caller must then not
/// commit. A batch that only deletes records that exist passes every quota.
pub async fn record(
    tx: &mut Tx,
    user_id: &str,
    app_id: &str,
    batch: &Batch,
    limit: u32,
    quotas: &Quotas,
) -> Result<Recorded> {
    let appended = tx
        .append(
            user_id,
            app_id,
            &batch.client_id,
            &batch.changes,
            batch.since,
            limit as usize,
        )
        .await?;
    let deletes_only = batch.changes.iter().all(|c| c.op == Op::Delete);
    // The usage after the batch: without its records as loaded (their
    // field counts kept), with them as saved, below.
    let mut after = appended.usage;
    let mut states: HashMap<(String, String), (RecordState, Option<usize>)> = HashMap::new();
    for (key, (state, bytes)) in appended.states {
        after.bytes -= bytes;
        let fields = state.fields.len();
        states.insert(key, (state, Some(fields)));
    }
    for (seq, change) in (appended.first_seq..).zip(&batch.changes) {
        let entry = LogEntry {
            seq,
            writes: change.writes.clone(),
            provenance: change.provenance.clone(),
        };
        let (state, _) = states
            .entry((change.table.clone(), change.id.clone()))
            .or_insert_with(|| (RecordState::default(), None));
        state.apply(&entry);
    }
    // Every loaded state is one the batch touched; records never seen are
    // created. In log order, they follow every other record of the page.
    // Deletes of records that exist pass every quota; a delete of a record
    // never seen makes one (a tombstone), so it counts like any change.
    let created = states.values().filter(|(_, before)| before.is_none()).count() as i64;
    let deletes_only = deletes_only && created == 0;
    let mut records = Vec::with_capacity(states.len());
    for ((table, id), (state, fields_before)) in states {
        quotas.admit_fields(
            &table,
            &id,
            fields_before.unwrap_or(0),
            state.fields.len(),
            deletes_only,
        )?;
        records.push(Record { table, id, state });
    }
    records.sort_by_key(|r| r.state.touched);
    let sizes = tx
        .save(user_id, app_id, &records, |sizes| {
            after.records += created;
            for (record, size) in records.iter().zip(sizes) {
                after.bytes += quota::stored_bytes(&record.table, &record.id, *size as usize);
            }
            quotas.admit(appended.usage, after, deletes_only)?;
            Ok(Some(after))
        })
        .await?;
    let batch_records = records
        .into_iter()
        .zip(sizes)
        .filter(|(r, _)| r.state.touched > batch.since.0);
    let page = PageBuilder::new(limit as usize, MAX_PAGE_BYTES);
    Ok(Recorded {
        first_seq: appended.first_seq,
        page: page.fill(appended.clock, appended.earlier.into_iter().chain(batch_records)),
    })
}

/// What a pull asks for.
pub struct Pull<'a> {
    pub user_id: &'a str,
    pub app_id: &'a str,
    pub table: &'a str,
    pub since: Cursor,
    pub limit: u32,
    /// The device that asks, when it says which it is: see
    /// [`RecordState::delta_since`].
    pub asking: Option<&'a str>,
}

/// The folded delta of one collection since a cursor. A collection that
/// has not changed since, as far as this replica knows from the notices it
/// hears ([`Hub::is_quiet`]), is answered without the database, its cursor
/// kept where it was; a complete answer from the database teaches the
/// replica as much.
#[tracing::instrument(name = "sync.pull", skip_all, fields(app_id = %pull.app_id, table = %pull.table, records = tracing::field::Empty))]
pub async fn pull(store: &Store, metrics: &Metrics, hub: &Hub, pull: Pull<'_>) -> Result<SyncResponse> {
    let Pull {
        user_id,
        app_id,
        table,
        since,
        limit,
        asking,
    } = pull;
    if hub.is_quiet(user_id, app_id, table, since.0) {
        metrics.quiet_pull();
        return Ok(respond(Page::empty(since), since, asking));
    }
    let epoch = hub.quiet_epoch();
    let mut tx = store.begin_read(user_id).await?;
    let page = tx
        .changed_since(user_id, app_id, Some(table), since, limit as usize, MAX_PAGE_BYTES)
        .await?;
    tx.commit().await?;
    if let Some(epoch) = epoch
        && !page.has_more
    {
        let bound = page.records.last().map_or(since.0, |r| r.state.touched.max(since.0));
        hub.learned(epoch, user_id, app_id, table, bound);
    }
    let response = respond(page, since, asking);
    counted(metrics, &response);
    Ok(response)
}

/// The folded deltas of several collections of one app, each since its
/// own cursor, read by one statement in one transaction (what a change
/// stream sends after a notice): in the order given, as many collections
/// as fit one page's bytes ([`MAX_PAGE_BYTES`]); the rest are left for
/// another read.
#[tracing::instrument(name = "sync.pull_each", skip_all, fields(app_id = %app_id, tables = tables.len(), records = tracing::field::Empty))]
pub async fn pull_each(
    store: &Store,
    metrics: &Metrics,
    user_id: &str,
    app_id: &str,
    tables: &[(String, Cursor)],
    limit: u32,
    asking: Option<&str>,
) -> Result<Vec<(String, SyncResponse)>> {
    let mut tx = store.begin_read(user_id).await?;
    let pages = tx
        .changed_since_each(user_id, app_id, tables, limit as usize, MAX_PAGE_BYTES)
        .await?;
    tx.commit().await?;
    let responses: Vec<(String, SyncResponse)> = pages
        .into_iter()
        .zip(tables)
        .map(|((table, page), (_, since))| (table, respond(page, *since, asking)))
        .collect();
    let records: usize = responses.iter().map(|(_, r)| r.server_changes.len()).sum();
    metrics.records_pulled(records);
    tracing::Span::current().record("records", records);
    Ok(responses)
}

/// Shapes a page into the wire response. A page cut short stops its cursor
/// at the last record sent; a complete one takes the clock it was read at
/// (or the start, when the user has written nothing). `asking` is the
/// device the answer goes to, when known.
fn respond(page: Page, since: Cursor, asking: Option<&str>) -> SyncResponse {
    let synced_until = match page.records.last() {
        Some(last) if page.has_more => Cursor(last.state.touched),
        _ => page.clock.map_or(Cursor::START, Cursor),
    };
    let server_changes = page
        .records
        .into_iter()
        .filter_map(|r| {
            let delta = r.state.delta_since(&r.id, since, asking)?;
            Some(server_change(r.table, r.id, delta))
        })
        .collect();
    SyncResponse {
        server_changes,
        conflicts: Vec::new(),
        synced_until: synced_until.to_string(),
        has_more: page.has_more,
    }
}

fn server_change(table: String, id: String, delta: Delta) -> ServerChange {
    let Delta { change, event } = delta;
    let (op, data, fields, deleted_at) = match change {
        RecordDelta::Insert { data } => (Op::Insert, Some(data), None, None),
        RecordDelta::Update { data, fields } => (
            Op::Update,
            Some(data),
            Some(
                fields
                    .into_iter()
                    .map(|(name, (value, at))| (name, FieldValue::new(value, at.to_short_string())))
                    .collect(),
            ),
            None,
        ),
        RecordDelta::Delete { deleted_at } => (Op::Delete, None, None, Some(deleted_at)),
    };
    let provenance = event.provenance;
    ServerChange {
        table,
        id,
        op,
        data,
        fields,
        deleted_at,
        event_id: event.seq.to_string(),
        schema_version: provenance.schema_version,
        actor: provenance.actor,
        origin: provenance.origin,
        space_id: provenance.space_id,
    }
}
