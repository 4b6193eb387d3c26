//! When each collection last changed, as far as this replica knows from
//! the notices it hears: enough to answer a pull of a collection that has
//! not changed since its cursor without a database round trip (today's
//! web client polls every collection every few seconds, nearly always in
//! vain).
//!
//! What is kept is an upper bound of the position of each (user, app,
//! table)'s latest change: learned from a complete pull's answer (nothing
//! after its cursor, or its last record), and raised by every notice.
//! A bound learned from the database holds only if no notice was lost
//! between the read and the learning: every moment notices may be lost
//! (the listener connects, or loses its connection) starts a new epoch
//! and forgets everything, and a bound read in an earlier epoch is not
//! kept. A change whose notice is still on its way is not seen yet, as if
//! the pull had come a moment earlier; its answer keeps the cursor where
//! it was, so the next pull gets it.

use std::collections::HashMap;

/// Most bounds kept; past it they are forgotten all at once (pulls then
/// ask the database again, and learn them anew).
const MAX_KEPT: usize = 200_000;

/// The bounds and the epoch they hold in.
#[derive(Default)]
pub struct Quiet {
    epoch: u64,
    kept: usize,
    /// By user: by (app, table), the bound.
    latest: HashMap<String, HashMap<(String, String), i64>>,
}

impl Quiet {
    /// The current epoch, to hand back with what a read learns.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Nothing of `table` changed after `since`, as far as is known.
    pub fn is_quiet(&self, user_id: &str, app_id: &str, table: &str, since: i64) -> bool {
        self.latest
            .get(user_id)
            .and_then(|tables| tables.get(&(app_id.to_owned(), table.to_owned())))
            .is_some_and(|latest| *latest <= since)
    }

    /// A read made in `epoch` found nothing of `table` after `bound`.
    pub fn learned(&mut self, epoch: u64, user_id: &str, app_id: &str, table: &str, bound: i64) {
        if epoch == self.epoch {
            self.raise(user_id, app_id, table, bound);
        }
    }

    /// A notice: `tables` of `app_id` changed, the latest at `seq`; no
    /// tables or no position (a replica of an earlier release) forget what
    /// is known of the app.
    pub fn heard(&mut self, user_id: &str, app_id: &str, tables: Option<&[String]>, seq: Option<i64>) {
        match (tables, seq) {
            (Some(tables), Some(seq)) => {
                for table in tables {
                    self.raise(user_id, app_id, table, seq);
                }
            }
            _ => {
                if let Some(known) = self.latest.get_mut(user_id) {
                    let before = known.len();
                    known.retain(|(app, _), _| app != app_id);
                    self.kept -= before - known.len();
                }
            }
        }
    }

    /// Notices may have been lost: a new epoch, knowing nothing.
    pub fn forget_all(&mut self) {
        self.epoch += 1;
        self.latest.clear();
        self.kept = 0;
    }

    fn raise(&mut self, user_id: &str, app_id: &str, table: &str, bound: i64) {
        if self.kept >= MAX_KEPT {
            // Forgetting is always safe; only a lost notice is not.
            self.latest.clear();
            self.kept = 0;
        }
        let known = self.latest.entry(user_id.to_owned()).or_default();
        let latest = known.entry((app_id.to_owned(), table.to_owned())).or_insert_with(|| {
            self.kept += 1;
            bound
        });
        *latest = (*latest).max(bound);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bound_holds_until_a_notice_raises_it_or_notices_may_be_lost() {
        let mut quiet = Quiet::default();
        assert!(!quiet.is_quiet("u", "a", "t", 100), "nothing known: ask the database");
        let epoch = quiet.epoch();
        quiet.learned(epoch, "u", "a", "t", 50);
        assert!(quiet.is_quiet("u", "a", "t", 50) && quiet.is_quiet("u", "a", "t", 60));
        assert!(!quiet.is_quiet("u", "a", "t", 49));
        assert!(!quiet.is_quiet("u", "a", "other", 60) && !quiet.is_quiet("v", "a", "t", 60));
        quiet.heard("u", "a", Some(&["t".to_owned()]), Some(70));
        assert!(!quiet.is_quiet("u", "a", "t", 60), "a change at 70");
        // A read from before that notice does not lower the bound.
        quiet.learned(epoch, "u", "a", "t", 55);
        assert!(!quiet.is_quiet("u", "a", "t", 60) && quiet.is_quiet("u", "a", "t", 70));
        // A notice naming no tables, or no position, forgets the app.
        quiet.heard("u", "a", None, Some(80));
        assert!(!quiet.is_quiet("u", "a", "t", 100));
        quiet.learned(epoch, "u", "a", "t", 90);
        quiet.heard("u", "a", Some(&["t".to_owned()]), None);
        assert!(!quiet.is_quiet("u", "a", "t", 100));
        // Once notices may have been lost, a read from before counts for nothing.
        quiet.learned(epoch, "u", "a", "t", 90);
        quiet.forget_all();
        assert!(!quiet.is_quiet("u", "a", "t", 100));
        quiet.learned(epoch, "u", "a", "t", 90);
        assert!(!quiet.is_quiet("u", "a", "t", 100), "learned in an earlier epoch");
        quiet.learned(quiet.epoch(), "u", "a", "t", 90);
        assert!(quiet.is_quiet("u", "a", "t", 100));
    }
}
