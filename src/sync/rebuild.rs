//! Re-deriving the projection from the change log.

use std::collections::BTreeMap;

use anyhow::Context;

use crate::change_log::RecordKey;
use crate::fold::RecordState;
use crate::projection::Record;
use crate::quota::{self, Usage};
use crate::store::Store;

/// Re-derives the whole projection from the log, one user at a time. Each
/// user's pushes wait meanwhile rather than interleave.
/// Returns (users, log entries, records).
pub async fn rebuild(store: &Store) -> anyhow::Result<(u64, u64, u64)> {
    let users = store.users().await?;
    let (mut entries, mut records) = (0, 0);
    for user in &users {
        let (e, r) = rebuild_user(store, user)
            .await
            .with_context(|| format!("failed to rebuild user {user:?}"))?;
        entries += e;
        records += r;
    }
    Ok((users.len() as u64, entries, records))
}

async fn rebuild_user(store: &Store, user_id: &str) -> anyhow::Result<(u64, u64)> {
    let mut tx = store.begin_write(user_id).await?;
    tx.lock_clock(user_id).await?;
    let mut folded: BTreeMap<RecordKey, RecordState> = BTreeMap::new();
    let entries = tx
        .replay(user_id, |key, entry| folded.entry(key).or_default().apply(&entry))
        .await?;
    tx.clear_records(user_id).await?;
    let mut by_app: BTreeMap<String, Vec<Record>> = BTreeMap::new();
    let count = folded.len() as u64;
    for (key, state) in folded {
        by_app.entry(key.app_id).or_default().push(Record {
            table: key.table,
            id: key.id,
            state,
        });
    }
    // The usage counters are counted afresh as the records are saved.
    let mut usage = Usage::default();
    for (app_id, records) in by_app {
        for chunk in records.chunks(1000) {
            let sizes = tx.save(user_id, &app_id, chunk, |_| Ok(None)).await?;
            for (record, size) in chunk.iter().zip(sizes) {
                usage.records += 1;
                usage.bytes += quota::stored_bytes(&record.table, &record.id, size as usize);
            }
        }
    }
    tx.set_usage(user_id, usage).await?;
    tx.commit().await?;
    Ok((entries, count))
}
