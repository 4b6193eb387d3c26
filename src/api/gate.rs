//! What a request passes before its operation runs, in this order, each
//! before anything costlier:
//!
//! 1. its bearer token (a request with a body, or to `/sync/…`), so that
//!    nobody without one costs more than a token check;
//! 2. the answer budget: while the replica holds `ANSWER_BUDGET` bytes of
//!    answers its clients have not yet taken, new requests get 503; while
//!    the user's answers hold `ANSWER_BUDGET_PER_USER`, the user's get 429;
//! 3. the user's rate: for a push, `PUSH_RATE`, waited for up to
//!    `LOCK_TIMEOUT`; for a pull, `PULL_RATE`, waited for up to 10 s. A
//!    request waiting for its turn holds nothing but its connection: not
//!    a request slot, and its body is not read yet;
//! 4. the user's requests in flight (`MAX_REQUESTS_PER_USER`, waited for
//!    briefly; streams are bounded by `MAX_SOCKETS_PER_USER` instead);
//! 5. for a push, the user's byte rate (`PUSH_BYTES_RATE`, waited for up
//!    to 10 s), before its body is read;
//! 6. its body, read under the budgets of [`BodyReader`].
//!
//! The answer then holds the user's request slot and its bytes' part of
//! the answer budget until its client has taken it, or its connection is
//! gone (`api::listener` closes a connection whose client stops taking).

use std::sync::Arc;
use std::time::Duration;

use poem::http::Method;
use poem::web::headers::authorization::Bearer;
use poem::web::headers::{Authorization, HeaderMapExt};
use poem::{Endpoint, IntoResponse, Request, Response};

use crate::api::admission::{AnswerBudget, PerUser, UserShare};
use crate::api::body::{self, BodyReader};
use crate::api::error::Answer;
use crate::auth::User;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::state::AppState;
use crate::throttle::{Action, MAX_PULL_WAIT};

/// Longest a request waits for one of its user's request slots.
const REQUEST_SLOT_WAIT: Duration = Duration::from_secs(5);

/// The gate (see the module docs). Cheap to clone.
#[derive(Clone)]
pub struct Gate {
    bodies: BodyReader,
    /// `None`: no limit on requests in flight per user.
    requests: Option<Arc<PerUser>>,
    answers: AnswerBudget,
    metrics: Metrics,
}

impl Gate {
    pub fn new(config: &Config, metrics: Metrics) -> Gate {
        Gate {
            bodies: BodyReader::new(config, metrics.clone()),
            requests: (config.max_requests_per_user > 0).then(|| PerUser::new(config.max_requests_per_user)),
            answers: AnswerBudget::new(config.answer_budget, config.answer_budget_per_user, metrics.clone()),
            metrics,
        }
    }

    /// Lets `req` through to `ep` (see the module docs).
    pub async fn call<E: Endpoint>(&self, ep: &E, mut req: Request) -> poem::Result<Response> {
        let has_body = body::has_body(&req);
        let path = req.uri().path();
        if !has_body && !path.starts_with("/sync/") {
            return Ok(ep.call(req).await?.into_response());
        }
        let streaming = path.ends_with("/stream");
        let pushing = req.method() == Method::POST && !streaming;
        let state = req
            .data::<AppState>()
            .expect("AppState is attached to every route")
            .clone();
        let user = match req.headers().typed_get::<Authorization<Bearer>>() {
            None if has_body => return Ok(Answer::missing_token().into_response()),
            // The operation answers 401 itself (it knows its own spec).
            None => return Ok(ep.call(req).await?.into_response()),
            Some(bearer) => match state.verify(bearer.token()).await {
                Ok(user) => user,
                Err(e) => return Ok(Answer::from(&e).into_response()),
            },
        };
        // The operation's bearer check takes the user found here.
        req.extensions_mut().insert(user.clone());
        let share = match self.admit(&state, &user, streaming, pushing, &req).await {
            Ok(share) => share,
            Err(answer) => return Ok(answer.into_response()),
        };
        let mut held_body = None;
        if has_body {
            match self.bodies.read(&mut req, &user.id).await {
                Ok((read, held)) => {
                    // A chunked body's length is known only now.
                    if pushing
                        && body::declared_length(&req).is_none()
                        && let Err(e) = state.throttle.push_bytes(&user.id, read.len()).await
                    {
                        return Ok(Answer::from(e).into_response());
                    }
                    req.set_body(read);
                    held_body = Some(held);
                }
                Err(answer) => return Ok(answer.into_response()),
            }
            body::mark_read(&req);
        }
        let mut response = ep.call(req).await?.into_response();
        drop(held_body);
        self.answers.hold(&mut response, &user.id, share).await;
        Ok(response)
    }

    /// Steps 2 to 5 of the module docs: the user's request slot, if it takes one.
    async fn admit(
        &self,
        state: &AppState,
        user: &User,
        streaming: bool,
        pushing: bool,
        req: &Request,
    ) -> Result<Option<UserShare>, Answer> {
        if self.answers.is_spent() {
            self.metrics.request_shed("answer_budget");
            return Err(Answer::overloaded());
        }
        if self.answers.is_spent_by(&user.id) {
            self.metrics.request_shed("user_answer_budget");
            return Err(Answer::user_over_share("bytes of answers not yet taken"));
        }
        // A burst waits for its turn before it takes anything else.
        let pulling = req.method() == Method::GET && req.uri().path().ends_with("/pull");
        if pushing {
            state
                .throttle
                .wait(Action::Push, &user.id, state.config.lock_timeout)
                .await
                .map_err(Answer::from)?;
        } else if pulling {
            state
                .throttle
                .wait(Action::Pull, &user.id, MAX_PULL_WAIT)
                .await
                .map_err(Answer::from)?;
        }
        let share = match (&self.requests, streaming) {
            (Some(requests), false) => match requests.take(&user.id, 1, REQUEST_SLOT_WAIT).await {
                Some(share) => Some(share),
                None => {
                    self.metrics.request_shed("user_requests");
                    return Err(Answer::user_over_share("requests in flight"));
                }
            },
            _ => None,
        };
        if pushing && let Some(declared) = body::declared_length(req) {
            state.throttle.push_bytes(&user.id, declared).await?;
        }
        Ok(share)
    }
}
