//! What one user, and all of them together, may hold of a replica at once:
//! requests in flight and bytes of bodies per user ([`PerUser`]), and
//! bytes of answers built but not yet taken by their clients
//! ([`AnswerBudget`]). Each share is given back when what holds it (a
//! body being read, an answer being sent) is dropped.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::BodyExt;
use hyper::body::Body as _;
use poem::{Body, Response};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::metrics::Metrics;

/// A number of permits for each user, e.g. requests in flight or bytes
/// of bodies held. A user's entry lives while any of its permits is held
/// or waited for, so the map holds only the users active right now.
pub struct PerUser {
    permits: usize,
    users: Mutex<HashMap<String, Arc<Semaphore>>>,
}

/// Permits of one user's, given back when dropped.
pub struct UserShare {
    owner: Arc<PerUser>,
    user: String,
    semaphore: Arc<Semaphore>,
    /// `None` only while dropping.
    permit: Option<OwnedSemaphorePermit>,
}

impl PerUser {
    /// `permits` for each user (at most [`Semaphore::MAX_PERMITS`]).
    pub fn new(permits: usize) -> Arc<PerUser> {
        Arc::new(PerUser {
            permits: permits.min(Semaphore::MAX_PERMITS),
            users: Mutex::default(),
        })
    }

    fn semaphore(&self, user: &str) -> Arc<Semaphore> {
        let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        users
            .entry(user.to_owned())
            .or_insert_with(|| Arc::new(Semaphore::new(self.permits)))
            .clone()
    }

    /// `n` of `user`'s permits, at once or not at all.
    pub fn try_take(self: &Arc<Self>, user: &str, n: usize) -> Option<UserShare> {
        let semaphore = self.semaphore(user);
        let permit = u32::try_from(n)
            .ok()
            .and_then(|n| semaphore.clone().try_acquire_many_owned(n).ok());
        self.share(user, semaphore, permit)
    }

    /// `n` of `user`'s permits, waiting up to `wait` for them.
    pub async fn take(self: &Arc<Self>, user: &str, n: u32, wait: Duration) -> Option<UserShare> {
        let semaphore = self.semaphore(user);
        let permit = tokio::time::timeout(wait, semaphore.clone().acquire_many_owned(n))
            .await
            .ok()
            .and_then(Result::ok);
        self.share(user, semaphore, permit)
    }

    /// A share holding `permit`, or, without one, `None` (the user's entry
    /// forgotten if it is now unused).
    fn share(
        self: &Arc<Self>,
        user: &str,
        semaphore: Arc<Semaphore>,
        permit: Option<OwnedSemaphorePermit>,
    ) -> Option<UserShare> {
        let share = UserShare {
            owner: self.clone(),
            user: user.to_owned(),
            semaphore,
            permit,
        };
        share.permit.is_some().then_some(share)
    }

    /// Users with an entry (those holding or waiting for permits).
    pub fn users(&self) -> usize {
        self.users.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

impl UserShare {
    /// How many permits this share holds.
    pub fn held(&self) -> usize {
        self.permit.as_ref().map_or(0, |p| p.num_permits())
    }

    /// Adds `n` more of the same user's permits, at once or not at all.
    pub fn grow(&mut self, n: usize) -> bool {
        let more = u32::try_from(n)
            .ok()
            .and_then(|n| self.semaphore.clone().try_acquire_many_owned(n).ok());
        match (more, self.permit.as_mut()) {
            (Some(more), Some(permit)) => {
                permit.merge(more);
                true
            }
            _ => false,
        }
    }
}

impl Drop for UserShare {
    fn drop(&mut self) {
        // Under the map's lock, so that nobody takes a new reference to the
        // semaphore while it is found unused: only the map's and ours remain.
        let mut users = self.owner.users.lock().unwrap_or_else(|e| e.into_inner());
        drop(self.permit.take());
        if Arc::strong_count(&self.semaphore) == 2 && self.semaphore.available_permits() == self.owner.permits {
            users.remove(&self.user);
        }
    }
}

/// The bytes of answers the replica holds, built and not yet taken by
/// their clients. Cheap to clone.
#[derive(Clone)]
pub struct AnswerBudget {
    held: Arc<AtomicUsize>,
    limit: usize,
    metrics: Metrics,
}

/// Bytes of an answer, given back to the budget when the answer's body is
/// dropped (sent in full, or its connection gone).
struct Held {
    held: Arc<AtomicUsize>,
    bytes: usize,
    metrics: Metrics,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.held.fetch_sub(self.bytes, Ordering::Relaxed);
        self.metrics.answer_bytes_held(-(self.bytes as i64));
    }
}

impl AnswerBudget {
    pub fn new(limit: usize, metrics: Metrics) -> AnswerBudget {
        AnswerBudget {
            held: Arc::default(),
            limit,
            metrics,
        }
    }

    /// Whether the replica already holds as many bytes of answers as it may.
    pub fn is_spent(&self) -> bool {
        self.held() >= self.limit
    }

    /// Bytes of answers held now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// Counts the answer's body against the budget until it is dropped,
    /// and keeps `share` (if any) held as long. A body of unknown length
    /// (a stream) is not counted; only `share` rides on it.
    pub fn hold(&self, response: &mut Response, share: Option<UserShare>) {
        let body: http_body_util::combinators::BoxBody<_, _> = response.take_body().into();
        let bytes = body.size_hint().exact().map_or(0, |n| n as usize);
        self.held.fetch_add(bytes, Ordering::Relaxed);
        self.metrics.answer_bytes_held(bytes as i64);
        let held = Held {
            held: self.held.clone(),
            bytes,
            metrics: self.metrics.clone(),
        };
        // The closure owns both and is dropped with the body; the length
        // the body declares is kept, and with it `Content-Length`.
        let body = body.map_err(move |e| {
            let _ = (&held, &share);
            e
        });
        response.set_body(Body::from(body.boxed()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_gets_only_its_permits_and_its_entry_goes_with_the_last_one() {
        let per_user = PerUser::new(3);
        let mut a = per_user.try_take("alice", 2).unwrap();
        assert!(per_user.try_take("alice", 2).is_none(), "one permit left");
        assert!(!a.grow(2));
        assert!(a.grow(1));
        assert_eq!(a.held(), 3);
        let b = per_user.try_take("bob", 3).expect("bob has his own");
        assert_eq!(per_user.users(), 2);
        drop(a);
        assert_eq!(per_user.users(), 1, "alice holds nothing: forgotten");
        drop(b);
        assert_eq!(per_user.users(), 0);
        assert!(per_user.try_take("alice", 4).is_none(), "never more than the share");
        assert_eq!(per_user.users(), 0, "a refused request leaves nothing behind");
    }

    #[tokio::test]
    async fn an_answer_is_counted_until_its_body_is_dropped() {
        let budget = AnswerBudget::new(10, Metrics::new());
        let mut response = Response::builder().body(vec![0u8; 12]);
        budget.hold(&mut response, None);
        assert_eq!(budget.held(), 12);
        assert!(budget.is_spent());
        let body: http_body_util::combinators::BoxBody<_, _> = response.take_body().into();
        assert_eq!(body.size_hint().exact(), Some(12), "its length is still declared");
        assert_eq!(body.collect().await.unwrap().to_bytes().len(), 12);
        assert_eq!(budget.held(), 0);
        assert!(!budget.is_spent());
    }
}
