//! Reading request bodies (once `api::gate` has checked the token): the
//! bytes of all bodies held at once, and of each user's, stay within
//! budgets, counted as they arrive; a body must keep arriving at a least
//! rate and arrive in full within a deadline; and none is over the size
//! limit. An answer given before the body was read in full says
//! `Connection: close`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use poem::http::header;
use poem::{Endpoint, IntoResponse, Request, Response};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::api::admission::{PerUser, UserShare};
use crate::api::error::Answer;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::protocol::MAX_BODY_BYTES;

/// Set once a request's body has been read in full (by [`BodyReader`]).
#[derive(Clone, Default)]
struct BodyRead(Arc<AtomicBool>);

/// Whether the request announces a body.
pub fn has_body(req: &Request) -> bool {
    req.headers().contains_key(header::TRANSFER_ENCODING)
        || req
            .headers()
            .get(header::CONTENT_LENGTH)
            .is_some_and(|n| n.as_bytes() != b"0")
}

/// An answer given before the request's body was read in full (a 413, a
/// refused token or origin) says `Connection: close`: the rest of the body
/// is never read, so the connection cannot carry another request. The
/// lingering close (`api::listener`) then lets the answer arrive while the
/// client is still sending.
pub async fn close_if_body_unread<E: Endpoint>(ep: E, mut req: Request) -> poem::Result<Response> {
    let has_body = has_body(&req);
    let read = BodyRead::default();
    req.extensions_mut().insert(read.clone());
    let mut response = ep.call(req).await?.into_response();
    if has_body && !read.0.load(Ordering::Relaxed) {
        response
            .headers_mut()
            .insert(header::CONNECTION, header::HeaderValue::from_static("close"));
    }
    Ok(response)
}

/// Reads request bodies under the replica's rules (see the module docs).
#[derive(Clone)]
pub struct BodyReader {
    /// One permit per byte of body held, by every user together.
    budget: Arc<Semaphore>,
    /// One permit per byte of body held, by each user.
    per_user: Arc<PerUser>,
    timeout: Duration,
    min_rate: u64,
    deadline: Duration,
    metrics: Metrics,
}

/// What a body being read holds of the replica, given back when dropped.
pub struct HeldBody {
    _replica: OwnedSemaphorePermit,
    _user: UserShare,
}

/// What a body first reserves room for: a declared length is believed
/// only as far as bytes arrive.
const FIRST_CAPACITY: usize = 64 * 1024;

impl BodyReader {
    pub fn new(config: &Config, metrics: Metrics) -> BodyReader {
        BodyReader {
            budget: Arc::new(Semaphore::new(config.body_budget.min(Semaphore::MAX_PERMITS))),
            per_user: PerUser::new(config.body_budget_per_user),
            timeout: config.body_timeout,
            min_rate: config.body_min_rate.max(1),
            deadline: config.body_deadline,
            metrics,
        }
    }

    /// `user_id`'s request's body, with the share of the budgets it holds
    /// (taken as its bytes arrive, whatever length it declares).
    pub async fn read(&self, req: &mut Request, user_id: &str) -> Result<(Vec<u8>, HeldBody), Answer> {
        let declared = declared_length(req);
        if declared.is_some_and(|n| n > MAX_BODY_BYTES) {
            return Err(Answer::body_too_large());
        }
        let mut replica = self.take(0)?;
        let mut user = self.per_user.try_take(user_id, 0).expect("no permits are always there");
        let mut bytes = Vec::with_capacity(declared.unwrap_or(0).min(FIRST_CAPACITY));
        let mut chunks = req.take_body().into_bytes_stream();
        let started = Instant::now();
        let mut last = started;
        loop {
            // The next piece within `timeout` of the last, on average at
            // least `min_rate` after the first `timeout`, and all of it
            // within `deadline`.
            let on_pace = started + self.timeout + Duration::from_secs_f64(bytes.len() as f64 / self.min_rate as f64);
            let deadline = on_pace.min(last + self.timeout).min(started + self.deadline);
            let chunk = match tokio::time::timeout_at(deadline, chunks.next()).await {
                Err(_) => {
                    self.metrics.request_shed("slow_body");
                    return Err(Answer::body_too_slow(self.min_rate));
                }
                Ok(None) => break,
                Ok(Some(Err(e))) => return Err(Answer::body_unreadable(&e)),
                Ok(Some(Ok(chunk))) => chunk,
            };
            last = Instant::now();
            if bytes.len() + chunk.len() > MAX_BODY_BYTES {
                return Err(Answer::body_too_large());
            }
            replica.merge(self.take(chunk.len())?);
            if !user.grow(chunk.len()) {
                self.metrics.request_shed("user_body_budget");
                return Err(Answer::user_over_share("request bodies"));
            }
            bytes.extend_from_slice(&chunk);
        }
        let held = HeldBody {
            _replica: replica,
            _user: user,
        };
        Ok((bytes, held))
    }

    /// `n` bytes of the replica's budget, or a 503 when the replica holds
    /// too many bodies already.
    fn take(&self, n: usize) -> Result<OwnedSemaphorePermit, Answer> {
        let n = u32::try_from(n).unwrap_or(u32::MAX);
        self.budget.clone().try_acquire_many_owned(n).map_err(|_| {
            self.metrics.request_shed("body_budget");
            Answer::overloaded()
        })
    }
}

/// The body length the request declares (`Content-Length`), if any.
pub fn declared_length(req: &Request) -> Option<usize> {
    req.headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
}

/// Notes that the request's body has been read in full (see
/// [`close_if_body_unread`]).
pub fn mark_read(req: &Request) {
    if let Some(read) = req.extensions().get::<BodyRead>() {
        read.0.store(true, Ordering::Relaxed);
    }
}
