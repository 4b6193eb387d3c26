//! Each user's pushes take turns in this process before they take a
//! database connection.
//!
//! A user's pushes are serialised by the lock on their clock row; without
//! a queue in front of it, every push waiting for that lock would hold a
//! pooled connection while it waits, and one user's burst would take the
//! whole pool from everyone else. Here a waiting push holds nothing but its
//! place in a fair (first come, first served) queue. The clock row still
//! orders pushes that reach other replicas.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::{Mutex as Queue, OwnedMutexGuard};

use crate::error::{Error, Result};

/// The queues, one per user with a push in flight or waiting. Cheap to clone.
#[derive(Clone, Default)]
pub struct Turns(Arc<Mutex<Queues>>);

#[derive(Default)]
struct Queues {
    by_user: HashMap<String, Weak<Queue<()>>>,
    /// Queues made since the map was last rid of unused ones: once they
    /// outnumber the map's entries, it is (so each costs O(1) amortised,
    /// and the map holds at most twice the users with a push in flight).
    made: usize,
}

/// A user's turn: held until dropped (when the push's transaction ends).
pub struct Turn(#[allow(dead_code)] OwnedMutexGuard<()>);

impl Turns {
    /// Waits for `user_id`'s turn, at most `timeout` ([`Error::Busy`] then).
    pub async fn wait(&self, user_id: &str, timeout: Duration) -> Result<Turn> {
        let queue = self.queue(user_id);
        let guard = tokio::time::timeout(timeout, queue.lock_owned())
            .await
            .map_err(|_| Error::Busy)?;
        Ok(Turn(guard))
    }

    fn queue(&self, user_id: &str) -> Arc<Queue<()>> {
        let mut queues = self.0.lock().expect("the turns map is never poisoned");
        if let Some(queue) = queues.by_user.get(user_id).and_then(Weak::upgrade) {
            return queue;
        }
        let queue = Arc::new(Queue::new(()));
        queues.by_user.insert(user_id.to_owned(), Arc::downgrade(&queue));
        queues.made += 1;
        if queues.made > queues.by_user.len() / 2 {
            queues.by_user.retain(|_, queue| queue.strong_count() > 0);
            queues.made = 0;
        }
        queue
    }

    /// Entries in the map (for tests).
    pub fn entries(&self) -> usize {
        self.0.lock().expect("the turns map is never poisoned").by_user.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn turns_are_taken_in_order_one_at_a_time() {
        let turns = Turns::default();
        let first = turns.wait("alice", Duration::from_secs(1)).await.unwrap();
        // Another user is not held up; the same user waits, then gives up.
        let _other = turns.wait("bob", Duration::from_millis(10)).await.unwrap();
        assert!(matches!(
            turns.wait("alice", Duration::from_millis(20)).await,
            Err(Error::Busy)
        ));
        let waiting = tokio::spawn({
            let turns = turns.clone();
            async move { turns.wait("alice", Duration::from_secs(5)).await.map(|_| ()) }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished(), "alice's second push waits for the first");
        drop(first);
        waiting.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn the_map_keeps_no_more_than_twice_the_users_in_flight() {
        let turns = Turns::default();
        let held = turns.wait("held", Duration::from_secs(1)).await.unwrap();
        for i in 0..1000 {
            drop(turns.wait(&format!("user-{i}"), Duration::from_secs(1)).await.unwrap());
            assert!(turns.entries() <= 4, "{} entries after {i}", turns.entries());
        }
        drop(held);
    }
}
