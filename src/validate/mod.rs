//! Turns a pushed batch into log entries, or says exactly what is wrong
//! with it. Everything is checked before anything is written: the names
//! and keys around the changes ([`names`]), each change ([`change`]), its
//! times ([`clock`]), and what a store can keep of a JSON value ([`value`]).

mod change;
mod clock;
mod names;
mod provenance;
#[cfg(test)]
mod tests;
mod value;

use std::time::Duration;

use crate::change_log::Batch;
use crate::error::{Error, ErrorCode, Result};
use crate::protocol::{Attribution, PushRequest};
use crate::timestamp::Timestamp;

use self::clock::Clock;
pub use self::names::{collections, id, idempotency_key, name, since};
pub use self::provenance::MAX_ACTOR_BYTES;
use self::provenance::{later_form, provenance};

/// The rules a push is checked against.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_changes: usize,
    pub max_clock_skew: Duration,
}

/// Checks a whole push and resolves every write's effective timestamp.
/// `now` is the server's receive time (taken at millisecond precision, see
/// [`Timestamp::floor_millis`]): the time of an update or delete that gives
/// none, and what a timestamp further ahead than `max_clock_skew` is
/// clamped to. An insert's `data` without a time is untimed (see
/// [`FieldWrite::untimed`]).
pub fn push(header_client_id: Option<&str>, request: PushRequest, now: Timestamp, limits: Limits) -> Result<Batch> {
    let now = now.floor_millis();
    // Both are checked when both are sent, as the spec declares each.
    let header_client_id = header_client_id.filter(|c| !c.is_empty());
    if let Some(sent) = header_client_id {
        id("X-Client-Id", sent)?;
    }
    if let Some(sent) = request.client_id.as_deref() {
        id("clientId", sent)?;
    }
    let client_id = header_client_id
        .or(request.client_id.as_deref())
        .ok_or_else(|| {
            Error::invalid(
                ErrorCode::MissingClientId,
                "send the device id in X-Client-Id (or the body's clientId)",
            )
        })?
        .to_owned();
    if request.changes.len() > limits.max_changes {
        return Err(Error::too_large(
            ErrorCode::TooManyChanges,
            format!(
                "a push may hold at most {} changes; got {} (send them in several pushes)",
                limits.max_changes,
                request.changes.len()
            ),
        ));
    }
    let since = since(request.since.as_deref())?;
    let latest = Timestamp(
        now.0
            .saturating_add(i64::try_from(limits.max_clock_skew.as_nanos()).unwrap_or(i64::MAX)),
    );
    let clock = Clock { now, latest };
    let changeset = &request.attribution;
    // Checked even when no change takes any of it: bad input is refused.
    provenance(changeset, &Attribution::default(), None)?;
    // A device of the later generation is remembered on its writes, which
    // are then not echoed to it (see `Provenance::client`).
    let later = later_form(changeset, &request.changes).then_some(client_id.as_str());
    let changes = request
        .changes
        .into_iter()
        .enumerate()
        .map(|(i, change)| {
            provenance(&change.attribution, changeset, later)
                .and_then(|provenance| change::change(change, clock, provenance))
                .map_err(|e| at_index(i, e))
        })
        .collect::<Result<_>>()?;
    Ok(Batch {
        client_id,
        since,
        changes,
    })
}

fn at_index(i: usize, e: Error) -> Error {
    match e {
        Error::Invalid { code, message } => Error::Invalid {
            code,
            message: format!("changes[{i}]: {message}"),
        },
        other => other,
    }
}
