//! The tables a notice of "everything" names, read once per user and
//! replica rather than once per socket.
//!
//! A notice of every table (a push over [`super::MAX_PENDING_TABLES`]
//! tables, a listener reconnect, the catch-up after `auth-ok`) wakes all
//! of a user's sockets at once; each used to read the user's tables
//! itself. Now they share one lookup per user: the first socket starts
//! it, the others await the same one, and later sockets reuse its answer
//! until a notice may have added a table it does not name. A user's
//! tables only ever grow (records are kept as tombstones), so an answer
//! stays true until such a notice.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use tokio::sync::OnceCell;

/// Table names by app.
pub type ByApp = BTreeMap<String, Vec<String>>;

/// One lookup of a user's tables: in flight, or done.
pub type Lookup = Arc<OnceCell<Arc<ByApp>>>;

/// The lookups of the users with subscribers on this replica.
#[derive(Default)]
pub struct Lookups {
    by_user: HashMap<String, Lookup>,
}

impl Lookups {
    /// The user's lookup to await: the one held, unless `fresh_only` and
    /// it has already answered (its answer may miss tables), or a new one.
    pub fn get(&mut self, user_id: &str, fresh_only: bool) -> Lookup {
        let held = self.by_user.entry(user_id.to_owned()).or_default();
        if fresh_only && held.initialized() {
            *held = Lookup::default();
        }
        held.clone()
    }

    /// Takes note of a notice: tables it names join a finished answer
    /// (they exist now); an answer still to come, or a notice of every
    /// table, means the next socket must look again.
    pub fn learn(&mut self, user_id: &str, app_id: &str, tables: Option<&[String]>) {
        let Some(held) = self.by_user.get_mut(user_id) else {
            return;
        };
        let (Some(tables), Some(known)) = (tables, held.get()) else {
            self.by_user.remove(user_id);
            return;
        };
        let listed = known.get(app_id);
        if tables.iter().all(|t| listed.is_some_and(|l| l.contains(t))) {
            return;
        }
        let mut merged = ByApp::clone(known);
        let names = merged.entry(app_id.to_owned()).or_default();
        names.extend(tables.iter().cloned());
        names.sort_unstable();
        names.dedup();
        *held = Arc::new(OnceCell::new_with(Some(Arc::new(merged))));
    }

    /// Forgets a user (no subscriber left on this replica).
    pub fn forget(&mut self, user_id: &str) {
        self.by_user.remove(user_id);
    }

    /// Forgets every answer (notices may have been lost).
    pub fn forget_all(&mut self) {
        self.by_user.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_is_shared_until_a_notice_may_add_a_table() {
        let mut lookups = Lookups::default();
        let first = lookups.get("alice", false);
        assert!(
            Arc::ptr_eq(&first, &lookups.get("alice", false)),
            "one lookup in flight, shared"
        );
        first
            .set(Arc::new(ByApp::from([("todo".to_owned(), vec!["todos".to_owned()])])))
            .unwrap();
        assert!(
            Arc::ptr_eq(&first, &lookups.get("alice", false)),
            "the answer is reused"
        );

        lookups.learn("alice", "todo", Some(&["todos".to_owned()]));
        assert!(
            Arc::ptr_eq(&first, &lookups.get("alice", false)),
            "a known table changes nothing"
        );
        lookups.learn("alice", "todo", Some(&["lists".to_owned()]));
        let merged = lookups.get("alice", false);
        assert_eq!(
            merged.get().unwrap()["todo"],
            ["lists", "todos"],
            "a new table joins the answer"
        );

        lookups.learn("alice", "todo", None);
        assert!(lookups.get("alice", false).get().is_none(), "every table: look again");
        assert!(lookups.get("bob", true).get().is_none());
    }

    #[test]
    fn a_notice_during_a_lookup_or_an_unsure_replica_means_looking_again() {
        let mut lookups = Lookups::default();
        let in_flight = lookups.get("alice", false);
        lookups.learn("alice", "todo", Some(&["todos".to_owned()]));
        assert!(!Arc::ptr_eq(&in_flight, &lookups.get("alice", false)));

        let done = lookups.get("alice", false);
        done.set(Arc::new(ByApp::new())).unwrap();
        assert!(
            !Arc::ptr_eq(&done, &lookups.get("alice", true)),
            "not listening: no reuse"
        );
        lookups.forget_all();
        assert!(lookups.by_user.is_empty());
    }
}
