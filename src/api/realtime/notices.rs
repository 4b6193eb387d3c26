//! The `sync-available` messages a socket sends for what its user's
//! other devices pushed, and the table names a notice of "everything"
//! stands for (one lookup per user and replica, through the hub).

use super::{ServerMessage, Sink, send};
use crate::hub::{ByApp, Subscription};
use crate::state::AppState;
use crate::sync;

/// The most table names one `sync-available` carries, in bytes of JSON:
/// an app with more tables is announced in several messages.
pub(super) const NOTICE_NAMES_BYTES: usize = 32 * 1024;

/// Sends what is pending as `sync-available` messages, one per app (or
/// several, for an app with very many tables). Returns false when the
/// socket is gone.
pub(super) async fn notify(sink: &mut Sink, state: &AppState, subscription: &Subscription) -> bool {
    let subscriber = &subscription.subscriber;
    let mut taken = subscriber.take();
    for (app, tables) in std::mem::take(&mut taken.tables) {
        let messages: Vec<(String, Vec<String>)> = match tables {
            Some(tables) => vec![(app, tables.into_iter().collect())],
            None => {
                // "Everything": name every table the user has in the app(s).
                let only = subscriber.app_id.as_deref();
                // Old clients pull every collection whatever `tables` says, so
                // a failed lookup still sends the signal, naming none.
                match Box::pin(every_table(state, &subscriber.user_id, only)).await {
                    Ok(by_app) => by_app,
                    Err(e) => {
                        tracing::warn!(error = %e, "listing tables failed; signalling without names");
                        only.map(|app| (app.to_owned(), Vec::new())).into_iter().collect()
                    }
                }
            }
        };
        for (app_id, tables) in messages {
            for tables in in_parts(tables) {
                let message = ServerMessage::SyncAvailable {
                    app_id: &app_id,
                    tables,
                };
                if !send(sink, message.frame()).await {
                    subscriber.lost();
                    return false;
                }
            }
            subscriber.sent(&taken);
        }
    }
    true
}

/// The tables of the user, by app (of `only`, listed even with none), as
/// the hub's shared lookup has them.
async fn every_table(
    state: &AppState,
    user_id: &str,
    only: Option<&str>,
) -> crate::error::Result<Vec<(String, Vec<String>)>> {
    let all = state
        .hub
        .tables(user_id, || sync::tables_by_app(&state.store, user_id, None))
        .await?;
    Ok(match only {
        Some(app) => vec![(app.to_owned(), all.get(app).cloned().unwrap_or_default())],
        None => ByApp::clone(&all).into_iter().collect(),
    })
}

/// Splits a list of table names into lists of at most
/// [`NOTICE_NAMES_BYTES`] of JSON each (one list, maybe empty, for a short one).
fn in_parts(tables: Vec<String>) -> Vec<Vec<String>> {
    let mut parts = vec![Vec::new()];
    let mut bytes = 0;
    for table in tables {
        // Quoted, escaped, and a comma.
        let size = serde_json::to_string(&table).map_or(table.len() * 6, |t| t.len()) + 1;
        if bytes + size > NOTICE_NAMES_BYTES && !parts.last().is_none_or(Vec::is_empty) {
            parts.push(Vec::new());
            bytes = 0;
        }
        bytes += size;
        parts.last_mut().expect("one part at least").push(table);
    }
    parts
}

#[cfg(test)]
mod tests {
    #[test]
    fn many_table_names_are_sent_in_parts_of_bounded_size() {
        assert_eq!(super::in_parts(Vec::new()), vec![Vec::<String>::new()]);
        let names: Vec<String> = (0..5000).map(|i| format!("table_{i:05}_{}", "x".repeat(40))).collect();
        let parts = super::in_parts(names.clone());
        assert!(parts.len() > 1);
        for part in &parts {
            assert!(serde_json::to_string(part).unwrap().len() <= super::NOTICE_NAMES_BYTES + 2);
        }
        assert_eq!(parts.concat(), names);
    }
}
