//! What one user, and all of them together, may hold of a replica at once:
//! requests in flight and bytes of bodies per user ([`PerUser`]), and
//! bytes of answers built but not yet taken by their clients
//! ([`AnswerBudget`]). Each share is given back when what holds it (a
//! body being read, an answer being sent) is dropped.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body::Body as _;
use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;
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
    /// Bytes held by each user's answers (users holding none are absent).
    by_user: Arc<Mutex<HashMap<String, usize>>>,
    user_limit: usize,
    metrics: Metrics,
}

/// Bytes of an answer, given back to the budget when the answer's body is
/// dropped (sent in full, or its connection gone).
struct Held {
    held: Arc<AtomicUsize>,
    by_user: Arc<Mutex<HashMap<String, usize>>>,
    user: String,
    bytes: usize,
    metrics: Metrics,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.held.fetch_sub(self.bytes, Ordering::Relaxed);
        let mut by_user = self.by_user.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(held) = by_user.get_mut(&self.user) {
            *held -= self.bytes;
            if *held == 0 {
                by_user.remove(&self.user);
            }
        }
        self.metrics.answer_bytes_held(-(self.bytes as i64));
    }
}

impl AnswerBudget {
    /// `limit` bytes for the replica, `user_limit` for each user.
    pub fn new(limit: usize, user_limit: usize, metrics: Metrics) -> AnswerBudget {
        AnswerBudget {
            held: Arc::default(),
            limit,
            by_user: Arc::default(),
            user_limit,
            metrics,
        }
    }

    /// Whether the replica already holds as many bytes of answers as it may.
    pub fn is_spent(&self) -> bool {
        self.held() >= self.limit
    }

    /// Whether `user`'s answers already hold as many bytes as one user's
    /// may (never, with a limit of 0).
    pub fn is_spent_by(&self, user: &str) -> bool {
        let by_user = self.by_user.lock().unwrap_or_else(|e| e.into_inner());
        self.user_limit > 0 && by_user.get(user).is_some_and(|held| *held >= self.user_limit)
    }

    /// Bytes of answers held now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// Counts the answer's body against the budget, the replica's and
    /// `user`'s, until the connection has taken all but its last pieces
    /// (see [`Pieces`]), and keeps `share` (if any) held as long. A body of
    /// unknown length (a stream) is not counted; only `share` rides on it.
    pub async fn hold(&self, response: &mut Response, user: &str, share: Option<UserShare>) {
        let body: BoxBody<Bytes, std::io::Error> = response.take_body().into();
        let Some(length) = body.size_hint().exact() else {
            let body = body.map_err(move |e| {
                let _ = &share;
                e
            });
            response.set_body(Body::from(body.boxed()));
            return;
        };
        // An answer of known length is already in memory: this takes it at once.
        let bytes = match body.collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(e) => {
                tracing::error!(error = %e, "an answer's body could not be read");
                Bytes::new()
            }
        };
        debug_assert_eq!(bytes.len() as u64, length);
        let n = bytes.len();
        self.held.fetch_add(n, Ordering::Relaxed);
        if n > 0 {
            let mut by_user = self.by_user.lock().unwrap_or_else(|e| e.into_inner());
            *by_user.entry(user.to_owned()).or_default() += n;
        }
        self.metrics.answer_bytes_held(n as i64);
        let held = Held {
            held: self.held.clone(),
            by_user: self.by_user.clone(),
            user: user.to_owned(),
            bytes: n,
            metrics: self.metrics.clone(),
        };
        response.set_body(Body::from(
            Pieces {
                rest: bytes,
                _held: (held, share),
            }
            .boxed(),
        ));
    }
}

/// How much of an answer the connection is handed at a time.
const PIECE: usize = 64 * 1024;

/// An answer handed to the connection [`PIECE`] by [`PIECE`], holding
/// what it holds of the budgets until the last piece is taken. hyper takes
/// a piece only while it has less than about 400 kB waiting to be written,
/// so an answer stays counted until all but that much (and what the
/// kernel's socket buffer took) has gone to the client: one handed over
/// whole would be let go at once, however long it then waits in hyper's
/// buffer for a client that does not read. Its length stays declared,
/// and with it `Content-Length`.
struct Pieces<G> {
    rest: Bytes,
    _held: G,
}

impl<G: Unpin> http_body::Body for Pieces<G> {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, std::io::Error>>> {
        if self.rest.is_empty() {
            return std::task::Poll::Ready(None);
        }
        let n = self.rest.len().min(PIECE);
        std::task::Poll::Ready(Some(Ok(http_body::Frame::data(self.rest.split_to(n)))))
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.rest.len() as u64)
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
        let budget = AnswerBudget::new(20, 10, Metrics::new());
        let mut response = Response::builder().body(vec![0u8; 12]);
        budget.hold(&mut response, "alice", None).await;
        assert_eq!(budget.held(), 12);
        assert!(!budget.is_spent());
        assert!(budget.is_spent_by("alice"));
        assert!(!budget.is_spent_by("bob"));
        let mut other = Response::builder().body(vec![0u8; 8]);
        budget.hold(&mut other, "bob", None).await;
        assert!(budget.is_spent());
        drop(other);
        let body: BoxBody<Bytes, std::io::Error> = response.take_body().into();
        assert_eq!(body.size_hint().exact(), Some(12), "its length is still declared");
        assert_eq!(body.collect().await.unwrap().to_bytes().len(), 12);
        assert_eq!(budget.held(), 0);
        assert!(!budget.is_spent());
        assert!(!budget.is_spent_by("alice"));
        assert!(
            budget.by_user.lock().unwrap().is_empty(),
            "nobody holds anything: forgotten"
        );
    }
}
