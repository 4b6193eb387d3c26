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
pub struct Turns(Arc<Mutex<HashMap<String, Weak<Queue<()>>>>>);

/// A user's turn: held until dropped (the push's transaction ends).
pub struct Turn {
    turns: Turns,
    user_id: String,
    guard: Option<OwnedMutexGuard<()>>,
}

impl Turns {
    /// Waits for `user_id`'s turn, at most `timeout` ([`Error::Busy`] then).
    pub async fn wait(&self, user_id: &str, timeout: Duration) -> Result<Turn> {
        let queue = {
            let mut queues = self.0.lock().expect("the turns map is never poisoned");
            match queues.get(user_id).and_then(Weak::upgrade) {
                Some(queue) => queue,
                None => {
                    let queue = Arc::new(Queue::new(()));
                    queues.insert(user_id.to_owned(), Arc::downgrade(&queue));
                    queue
                }
            }
        };
        let guard = tokio::time::timeout(timeout, queue.lock_owned())
            .await
            .map_err(|_| Error::Busy)?;
        Ok(Turn {
            turns: self.clone(),
            user_id: user_id.to_owned(),
            guard: Some(guard),
        })
    }

    /// Users with a queue (for tests: an idle user has none).
    pub fn queued(&self) -> usize {
        self.0.lock().expect("the turns map is never poisoned").len()
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        let mut queues = self.turns.0.lock().expect("the turns map is never poisoned");
        let guard = self.guard.take().expect("a turn is released once");
        // Nobody else holds or waits for this queue (each waiter holds an
        // `Arc` of it, and none can take one while the map is locked): forget it.
        if Arc::strong_count(OwnedMutexGuard::mutex(&guard)) == 1 {
            queues.remove(&self.user_id);
        }
        drop(guard);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn turns_are_taken_in_order_one_at_a_time_and_forgotten_when_idle() {
        let turns = Turns::default();
        let first = turns.wait("alice", Duration::from_secs(1)).await.unwrap();
        // Another user is not held up; the same user waits, then gives up.
        let other = turns.wait("bob", Duration::from_millis(10)).await.unwrap();
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
        drop(other);
        assert_eq!(turns.queued(), 0, "no queue is kept for idle users");
    }
}
