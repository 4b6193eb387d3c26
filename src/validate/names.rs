//! The names, ids, keys and cursors a request carries outside its changes
//! (and the ones inside, through [`name`] and [`id`]).

use super::value::nul;
use crate::cursor::Cursor;
use crate::error::{Error, ErrorCode, Result};
use crate::protocol::{BadText, MAX_ID_CHARS, MAX_NAME_CHARS, MAX_STREAM_COLLECTIONS, check_text};

/// Checks a name (app id, table, field): 1-128 characters, no control characters.
pub fn name(what: &str, value: &str) -> Result<()> {
    bounded(what, value, MAX_NAME_CHARS)
}

/// Checks an id (record, client): 1-256 characters, no control characters.
pub fn id(what: &str, value: &str) -> Result<()> {
    bounded(what, value, MAX_ID_CHARS)
}

fn bounded(what: &str, value: &str, max: usize) -> Result<()> {
    match check_text(value, max) {
        Ok(()) => Ok(()),
        Err(BadText::Length) => Err(Error::invalid(
            ErrorCode::InvalidName,
            format!("{what} must be 1 to {max} characters long"),
        )),
        Err(BadText::Nul) => Err(nul(what)),
        Err(BadText::Control) => Err(Error::invalid(
            ErrorCode::InvalidName,
            format!("{what} must not contain control characters"),
        )),
    }
}

pub fn idempotency_key(key: &str) -> Result<()> {
    if check_text(key, MAX_ID_CHARS).is_err() {
        return Err(Error::invalid(
            ErrorCode::InvalidIdempotencyKey,
            format!("Idempotency-Key must be 1 to {MAX_ID_CHARS} characters without control characters"),
        ));
    }
    Ok(())
}

/// Checks the collections a stream follows: 1 to
/// [`MAX_STREAM_COLLECTIONS`] names, each a valid name.
pub fn collections(names: Vec<String>) -> Result<Vec<String>> {
    if names.len() > MAX_STREAM_COLLECTIONS {
        return Err(Error::invalid(
            ErrorCode::TooManyCollections,
            format!("a stream follows at most {MAX_STREAM_COLLECTIONS} collections"),
        ));
    }
    for collection in &names {
        name("collection", collection)?;
    }
    Ok(names)
}

/// Parses a cursor parameter (`since`), defaulting to the beginning.
pub fn since(value: Option<&str>) -> Result<Cursor> {
    match value {
        None | Some("") => Ok(Cursor::START),
        Some(s) => Cursor::parse(s).map_err(|e| Error::invalid(ErrorCode::InvalidCursor, format!("since: {e}"))),
    }
}
