//! Reading request bodies, and only from requests that may send one: the
//! bearer token is checked before the first byte of a body is read; the
//! bytes of all bodies held at once stay within a budget; a body must
//! keep arriving at a least rate; and none is over the size limit. An
//! answer given before the body was read in full says `Connection: close`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures_util::StreamExt;
use poem::http::header;
use poem::web::headers::authorization::Bearer;
use poem::web::headers::{Authorization, HeaderMapExt};
use poem::{Body, Endpoint, IntoResponse, Request, Response};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::api::error::Answer;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::protocol::MAX_BODY_BYTES;
use crate::state::AppState;

/// Set once a request's body has been read in full (by [`BodyGate`]).
#[derive(Clone, Default)]
struct BodyRead(Arc<AtomicBool>);

/// Whether the request announces a body.
fn has_body(req: &Request) -> bool {
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
pub struct BodyGate {
    /// One permit per byte of body held.
    budget: Arc<Semaphore>,
    timeout: std::time::Duration,
    min_rate: u64,
    metrics: Metrics,
}

impl BodyGate {
    pub fn new(config: &Config, metrics: Metrics) -> BodyGate {
        BodyGate {
            budget: Arc::new(Semaphore::new(config.body_budget.min(Semaphore::MAX_PERMITS))),
            timeout: config.body_timeout,
            min_rate: config.body_min_rate.max(1),
            metrics,
        }
    }

    /// Authenticates a request that has a body, reads the body, and calls
    /// `ep` with it, holding the body's share of the budget until the
    /// answer is ready.
    pub async fn call<E: Endpoint>(&self, ep: &E, mut req: Request) -> poem::Result<Response> {
        if !has_body(&req) {
            return Ok(ep.call(req).await?.into_response());
        }
        // A body is read only from a request with a good token; the
        // operation's bearer check then takes the user found here.
        let state = req.data::<AppState>().expect("AppState is attached to every route");
        let user = match req.headers().typed_get::<Authorization<Bearer>>() {
            None => return Ok(Answer::missing_token().into_response()),
            Some(bearer) => match state.verify(bearer.token()).await {
                Ok(user) => user,
                Err(e) => return Ok(Answer::from(&e).into_response()),
            },
        };
        req.extensions_mut().insert(user);
        let (body, _held) = match self.read(&mut req).await {
            Ok(read) => read,
            Err(answer) => return Ok(answer.into_response()),
        };
        req.set_body(body);
        if let Some(read) = req.extensions().get::<BodyRead>() {
            read.0.store(true, Ordering::Relaxed);
        }
        Ok(ep.call(req).await?.into_response())
    }

    /// The request's body, with the budget's permits it holds.
    async fn read(&self, req: &mut Request) -> Result<(Body, OwnedSemaphorePermit), Answer> {
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        if declared.is_some_and(|n| n > MAX_BODY_BYTES) {
            return Err(Answer::body_too_large());
        }
        // A declared length takes its share at once; a chunked body, as it comes.
        let mut held = self.take(declared.unwrap_or(0))?;
        let mut bytes = Vec::with_capacity(declared.unwrap_or(0));
        let mut chunks = req.take_body().into_bytes_stream();
        let started = Instant::now();
        let mut last = started;
        loop {
            // The next piece within `timeout` of the last, and on average
            // at least `min_rate` after the first `timeout`.
            let on_pace =
                started + self.timeout + std::time::Duration::from_secs_f64(bytes.len() as f64 / self.min_rate as f64);
            let deadline = on_pace.min(last + self.timeout);
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
            let grown = (bytes.len() + chunk.len()).saturating_sub(held.num_permits());
            if grown > 0 {
                held.merge(self.take(grown)?);
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok((Body::from_vec(bytes), held))
    }

    /// `n` bytes of the budget, or a 503 when the replica holds too many
    /// bodies already.
    fn take(&self, n: usize) -> Result<OwnedSemaphorePermit, Answer> {
        let n = u32::try_from(n).unwrap_or(u32::MAX);
        self.budget.clone().try_acquire_many_owned(n).map_err(|_| {
            self.metrics.request_shed("body_budget");
            Answer::bodies_over_budget()
        })
    }
}
