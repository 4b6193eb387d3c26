//! What each fuzz target checks, shared by the targets (`fuzz_targets/*.rs`)
//! and by `tests/integration/fuzz_regressions.rs`, which replays the committed corpus
//! and every input that once failed through the same checks.
//!
//! Each check takes raw bytes, so that a corpus file is a plain input: a
//! push body, a timestamp string, or a history in the small encoding that
//! [`history`] reads. A failed invariant is a panic.

use std::collections::BTreeMap;
use std::time::Duration;

use mana_sync::change_log::{self, Batch};
use mana_sync::cursor::Cursor;
use mana_sync::error::{Error, ErrorCode};
use mana_sync::fold::{DELETED_AT, FieldState, FieldWrite, LogEntry, RecordDelta, RecordState, UPDATED_AT};
use mana_sync::idempotency;
use mana_sync::protocol::{MAX_ID_CHARS, MAX_NAME_CHARS, Op, PushRequest, check_text};
use mana_sync::timestamp::{Timestamp, TimestampError};
use mana_sync::validate::{self, Limits};
use poem_openapi::types::{ParseFromJSON, ToJSON};
use serde_json::Value;

/// The receive time every push is validated at: 2024-01-01T12:00:00.123456789Z
/// (finer than a millisecond, so flooring it is exercised).
pub const NOW: Timestamp = Timestamp(1_704_110_400_123_456_789);

/// The server's defaults (`MAX_BATCH_CHANGES`, `MAX_CLOCK_SKEW`).
pub const SERVER_LIMITS: Limits = Limits {
    max_changes: 5000,
    max_clock_skew: Duration::from_secs(300),
};

/// A small batch limit, so that `too_many_changes` is reached too.
const TIGHT_LIMITS: Limits = Limits {
    max_changes: 3,
    max_clock_skew: Duration::from_secs(300),
};

// ---------------------------------------------------------------- push

/// A push body as the server reads it (poem-openapi's `Json<PushRequest>`:
/// `serde_json::from_slice` into a `Value`, an empty body as `null`, then
/// `PushRequest::parse_from_json`), then validated as `POST /sync/{appId}`
/// validates it, with and without an `X-Client-Id` header, at the server's
/// limits and at a tight one. Says whether the body is a push request,
/// and if so whether the server (at its limits, without the header)
/// accepts it.
pub fn push(body: &[u8]) -> Option<bool> {
    let value: Value = if body.is_empty() {
        Value::Null
    } else {
        // A 400 before validation.
        serde_json::from_slice(body).ok()?
    };
    let request = PushRequest::parse_from_json(Some(value)).ok()?;
    // The idempotency fingerprint is taken over the changes as sent.
    let sent = request.changes.to_json().unwrap_or_default();
    assert_eq!(idempotency::fingerprint("app", "dev", &sent).len(), 32);
    for header in [None, Some("header-dev")] {
        for limits in [SERVER_LIMITS, TIGHT_LIMITS] {
            check_push(header, &request, limits);
        }
    }
    Some(validate::push(None, request, NOW, SERVER_LIMITS).is_ok())
}

fn check_push(header: Option<&str>, request: &PushRequest, limits: Limits) {
    let result = validate::push(header, request.clone(), NOW, limits);
    let again = validate::push(header, request.clone(), NOW, limits);
    assert_eq!(outcome(&result), outcome(&again), "validation is deterministic");
    match result {
        Ok(batch) => accepted(header, request, &batch, limits),
        Err(error) => refused(header, request, &error, limits),
    }
}

/// A validation's result, comparable.
fn outcome(result: &Result<Batch, Error>) -> Result<&Batch, (ErrorCode, String)> {
    result.as_ref().map_err(client_error)
}

/// The code and message of a client error; any other error would be a 500
/// for a request that is merely malformed.
fn client_error(error: &Error) -> (ErrorCode, String) {
    match error {
        Error::Invalid { code, message } | Error::TooLarge { code, message } => (*code, message.clone()),
        other => panic!("validation must refuse with a client error, not {other:?}"),
    }
}

fn accepted(header: Option<&str>, request: &PushRequest, batch: &Batch, limits: Limits) {
    assert!(
        check_text(&batch.client_id, MAX_ID_CHARS).is_ok(),
        "{:?}",
        batch.client_id
    );
    assert_eq!(batch.changes.len(), request.changes.len(), "every change is kept");
    assert!(batch.changes.len() <= limits.max_changes);
    let now = NOW.floor_millis();
    let latest = Timestamp(now.0 + limits.max_clock_skew.as_nanos() as i64);
    for (input, change) in request.changes.iter().zip(&batch.changes) {
        assert_eq!(
            (&*input.table, &*input.id, input.op),
            (&*change.table, &*change.id, change.op)
        );
        assert!(check_text(&change.table, MAX_NAME_CHARS).is_ok(), "{:?}", change.table);
        assert!(check_text(&change.id, MAX_ID_CHARS).is_ok(), "{:?}", change.id);
        let untimed = change.writes.iter().any(|w| w.untimed);
        assert!(
            change.writes.iter().all(|w| w.untimed == untimed),
            "a change's writes are all timed or all untimed (the log keeps one flag per row)"
        );
        if change.op == Op::Delete {
            let [write] = change.writes.as_slice() else {
                panic!("a delete writes deletedAt alone: {:?}", change.writes);
            };
            assert_eq!(write.name, DELETED_AT);
            assert_eq!(write.value, Value::String(write.at.to_short_string()));
            assert!(!untimed);
        }
        let mut names = std::collections::BTreeSet::new();
        for w in &change.writes {
            assert!(names.insert(&w.name), "field {:?} written twice by one change", w.name);
            assert!(check_text(&w.name, MAX_NAME_CHARS).is_ok(), "{:?}", w.name);
            assert_ne!(w.name, "id", "id is the record key, not a field");
            assert!(!has_nul(&w.value), "a NUL character is not storable: {:?}", w.value);
            assert_eq!(w.at, w.at.floor_millis(), "field times are kept in milliseconds");
            assert!(w.at <= latest, "{:?} is beyond the allowed clock skew", w.at);
            if untimed {
                assert_eq!(w.at, now, "an untimed write is at the receive time");
            }
            if w.name == DELETED_AT && !w.value.is_null() {
                let text = w.value.as_str().expect("deletedAt is a string or null");
                assert!(Timestamp::parse(text).is_ok(), "deletedAt {text:?}");
            }
        }
        stored_round_trip(&change.writes);
    }
    // A request's own JSON (the form its fingerprint is taken over) is
    // the same request.
    let json = request.to_json().expect("a request has a JSON form");
    let text = serde_json::to_vec(&json).expect("a JSON value serializes");
    let reread = PushRequest::parse_from_json(Some(serde_json::from_slice(&text).expect("its own JSON parses")))
        .expect("a request's own JSON is a request");
    let revalidated = validate::push(header, reread, NOW, limits);
    assert_eq!(
        outcome(&revalidated),
        Ok(batch),
        "the request's JSON validates the same"
    );
}

/// The writes as the log keeps them (`change_log::columns`, written as
/// JSON text) read back (`change_log::writes`) are the same writes.
fn stored_round_trip(writes: &[FieldWrite]) {
    let (data, stamps) = change_log::columns(writes);
    let reread = |v: &Value| -> Value {
        let text = serde_json::to_string(v).expect("a JSON value serializes");
        let back: Value = serde_json::from_str(&text).expect("stored JSON parses");
        assert_eq!(&back, v, "stored JSON round-trips: {text}");
        back
    };
    let (data, stamps) = (reread(&data), reread(&stamps));
    let untimed = writes.iter().any(|w| w.untimed);
    let mut back = change_log::writes(data, &stamps, untimed);
    let mut sent = writes.to_vec();
    back.sort_by(|a, b| a.name.cmp(&b.name));
    sent.sort_by(|a, b| a.name.cmp(&b.name));
    assert_eq!(back, sent, "the log's columns read back as the same writes");
}

fn has_nul(value: &Value) -> bool {
    match value {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(has_nul),
        Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
        _ => false,
    }
}

/// The index of `changes[i]: ...`, if the message names one.
fn index_of(message: &str) -> Option<usize> {
    message.strip_prefix("changes[")?.split_once("]: ")?.0.parse().ok()
}

fn with_changes(request: &PushRequest, n: usize) -> PushRequest {
    let mut request = request.clone();
    request.changes.truncate(n);
    request
}

fn refused(header: Option<&str>, request: &PushRequest, error: &Error, limits: Limits) {
    let (code, message) = client_error(error);
    match index_of(&message) {
        // A change's error names the first change that is wrong.
        Some(i) => {
            assert!(
                i < request.changes.len(),
                "{message} (of {} changes)",
                request.changes.len()
            );
            let before = validate::push(header, with_changes(request, i), NOW, limits);
            assert!(
                before.is_ok(),
                "changes before {i} are valid, yet: {:?}",
                outcome(&before)
            );
            let upto = validate::push(header, with_changes(request, i + 1), NOW, limits);
            assert_eq!(
                outcome(&upto),
                Err((code, message.clone())),
                "changes[{i}] alone is the fault"
            );
        }
        None if code == ErrorCode::TooManyChanges => {
            assert!(matches!(error, Error::TooLarge { .. }), "{error:?}");
            assert!(request.changes.len() > limits.max_changes);
        }
        // Otherwise the batch itself is wrong (client id, since), whatever its changes.
        None => {
            let empty = validate::push(header, with_changes(request, 0), NOW, limits);
            assert_eq!(
                outcome(&empty),
                Err((code, message.clone())),
                "an error without an index is about the batch, not a change"
            );
        }
    }
}

// ----------------------------------------------------------- timestamp

/// Instants whose order against a parsed one must be the order of their
/// fixed-width strings.
const ANCHORS: [Timestamp; 6] = [
    Timestamp::MIN,
    Timestamp(-1),
    Timestamp::EPOCH,
    Timestamp(1),
    NOW,
    Timestamp::MAX,
];

/// `Timestamp::parse` (and `Cursor::parse`, which builds on it) of any
/// string: its forms re-parse to the same instant, the fixed form sorts as
/// the instant, and years beyond 1677-2262 saturate to `MIN`/`MAX`.
/// Returns the instant, if the string is one.
pub fn timestamp(bytes: &[u8]) -> Option<Timestamp> {
    let s = std::str::from_utf8(bytes).ok()?;
    let cursor = Cursor::parse(s);
    let t = match Timestamp::parse(s) {
        Ok(t) => t,
        Err(TimestampError::Malformed(echo)) => {
            assert_eq!(echo, s, "the error names the input");
            assert!(cursor.is_err(), "a cursor is a timestamp");
            return None;
        }
    };
    assert_eq!(cursor, Ok(Cursor(t.0.max(0))), "a cursor before the epoch is the start");

    let fixed = t.to_fixed_string();
    assert_eq!(fixed.len(), 30, "fixed width: {fixed}");
    assert_eq!(Timestamp::parse(&fixed), Ok(t), "{s:?} -> {fixed}");
    assert_eq!(Cursor(t.0.max(0)).to_string(), Timestamp(t.0.max(0)).to_fixed_string());
    let short = t.to_short_string();
    assert_eq!(Timestamp::parse(&short), Ok(t), "{s:?} -> {short}");
    assert_eq!(t.to_string(), short);
    let whole_millis = t.0.rem_euclid(1_000_000) == 0;
    assert_eq!(short.len(), if whole_millis { 24 } else { 30 }, "{short}");
    for anchor in ANCHORS {
        assert_eq!(
            fixed.cmp(&anchor.to_fixed_string()),
            t.cmp(&anchor),
            "{fixed} against {anchor:?}"
        );
    }

    let floor = t.floor_millis();
    assert!(floor <= t && i128::from(t.0) - i128::from(floor.0) < 1_000_000);
    assert!(floor == Timestamp::MIN || floor.0.rem_euclid(1_000_000) == 0);
    assert_eq!(floor.floor_millis(), floor);

    // Saturation: an RFC 3339 time starts with its four-digit year, and
    // any offset moves it by less than a day.
    let year: i32 = s[..4].parse().expect("an RFC 3339 time starts with its year");
    if year < 1677 {
        assert_eq!(t, Timestamp::MIN, "{s:?} is before 1677");
    } else if year > 2262 {
        assert_eq!(t, Timestamp::MAX, "{s:?} is after 2262");
    } else if (1678..=2261).contains(&year) {
        assert!(t != Timestamp::MIN && t != Timestamp::MAX, "{s:?} is inside the span");
    }
    Some(t)
}

// ---------------------------------------------------------------- fold

/// The fields histories write: few, so that writes meet.
const FIELDS: [&str; 5] = ["title", "done", "rank", UPDATED_AT, DELETED_AT];

/// A change as the fold takes it: its record (table, id) and log entry.
#[derive(Clone, Debug)]
pub struct Logged {
    pub key: (u8, u8),
    pub entry: LogEntry,
}

/// Reads a history from bytes, the fold target's input (no `arbitrary`,
/// so the test replays the corpus with no extra dependency):
/// - byte 0 seeds the permutation the history is also folded in;
/// - then up to 16 changes, the i-th at log position `10 * (i + 1)`, each
///   a header byte `h`: table `h & 1`, id `(h >> 1) & 1`, op `(h >> 2) & 3`
///   (insert, update, delete, update), untimed `(h >> 4) & 1` (inserts
///   only), and `(h >> 5) & 3` writes;
/// - a delete is one byte more, its time; any other write is two bytes, a
///   field and value `w` (field `w % 5`, value kind `(w >> 3) & 3`: null,
///   number, string, bool, of `w >> 5`) and a time `t` (`t % 8`
///   milliseconds, so times tie). A field written twice in one change is
///   written once.
///
/// Validation's shapes are kept: a delete writes `deletedAt` alone, at
/// its time and as its string; any `deletedAt` is a timestamp or null.
pub fn history(bytes: &[u8]) -> (u8, Vec<Logged>) {
    let mut bytes = bytes.iter().copied();
    let seed = bytes.next().unwrap_or(0);
    let mut changes = Vec::new();
    while changes.len() < 16 {
        let Some(h) = bytes.next() else { break };
        let seq = 10 * (changes.len() as i64 + 1);
        let key = (h & 1, (h >> 1) & 1);
        let op = (h >> 2) & 3;
        let mut writes = Vec::new();
        if op == 2 {
            let Some(t) = bytes.next() else { break };
            let at = millis(t);
            writes.push(FieldWrite::timed(DELETED_AT, Value::String(at.to_short_string()), at));
        } else {
            let untimed = op == 0 && (h >> 4) & 1 == 1;
            for _ in 0..(h >> 5) & 3 {
                let (Some(w), Some(t)) = (bytes.next(), bytes.next()) else {
                    break;
                };
                let name = FIELDS[usize::from(w % 5)];
                let n = w >> 5;
                let value = match ((w >> 3) & 3, name) {
                    (0, _) => Value::Null,
                    (_, DELETED_AT) => Value::String(millis(n).to_short_string()),
                    (1, _) => Value::from(n),
                    (2, _) => Value::String(format!("v{n}")),
                    _ => Value::Bool(n & 1 == 1),
                };
                if writes.iter().all(|x: &FieldWrite| x.name != name) {
                    writes.push(FieldWrite {
                        name: name.to_owned(),
                        value,
                        at: millis(t),
                        untimed,
                    });
                }
            }
        }
        changes.push(Logged {
            key,
            entry: LogEntry {
                seq,
                writes,
                provenance: Default::default(),
            },
        });
    }
    (seed, changes)
}

fn millis(t: u8) -> Timestamp {
    Timestamp(1_704_110_400_000_000_000 + i64::from(t % 8) * 1_000_000)
}

type Projection = BTreeMap<(u8, u8), RecordState>;

/// Folds changes in the given order, as a push does (`sync::record`):
/// each into its record's state.
fn fold<'a>(changes: impl IntoIterator<Item = &'a Logged>) -> Projection {
    let mut states = Projection::new();
    for change in changes {
        states.entry(change.key).or_default().apply(&change.entry);
    }
    states
}

/// A permutation of `0..n` from a seed (Fisher-Yates over an LCG).
fn permutation(n: usize, seed: u8) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut state = u64::from(seed).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for i in (1..n).rev() {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        order.swap(i, (state >> 33) as usize % (i + 1));
    }
    order
}

/// The fold of a history is the same in any order and when changes come
/// twice; it agrees with a small independent model of the rule; it is the
/// same rebuilt from the log's columns, and continued from a projection
/// saved as JSON; deltas name what was written after a cursor. Returns
/// the number of changes read.
pub fn fold_history(bytes: &[u8]) -> usize {
    let (seed, changes) = history(bytes);
    let folded = fold(&changes);

    let order = permutation(changes.len(), seed);
    assert_eq!(fold(order.iter().map(|&i| &changes[i])), folded, "permuted {order:?}");
    assert_eq!(fold(changes.iter().rev()), folded, "reversed");
    assert_eq!(fold(changes.iter().chain(&changes)), folded, "the whole history twice");
    assert_eq!(
        fold(changes.iter().flat_map(|c| [c, c])),
        folded,
        "each change twice in a row"
    );
    assert_eq!(folded, model(&changes), "the independent model");

    // Rebuilt from the log (`rebuild`): each change's columns as stored, read back.
    let replayed: Vec<Logged> = changes
        .iter()
        .map(|c| {
            let (data, stamps) = change_log::columns(&c.entry.writes);
            let data: Value = serde_json::from_str(&data.to_string()).expect("stored JSON parses");
            let stamps: Value = serde_json::from_str(&stamps.to_string()).expect("stored JSON parses");
            let untimed = c.entry.writes.iter().any(|w| w.untimed);
            Logged {
                key: c.key,
                entry: LogEntry {
                    seq: c.entry.seq,
                    writes: change_log::writes(data, &stamps, untimed),
                    provenance: Default::default(),
                },
            }
        })
        .collect();
    assert_eq!(fold(&replayed), folded, "rebuilt from the log");

    // Continued from the projection as saved (its fields as JSON) after
    // every prefix, as pushes in several batches do.
    for cut in 0..=changes.len() {
        let mut states: Projection = fold(&changes[..cut])
            .into_iter()
            .map(|(key, state)| {
                let text = serde_json::to_string(&state.fields).expect("fields serialize");
                let fields: BTreeMap<String, FieldState> = serde_json::from_str(&text).expect("saved fields parse");
                (key, RecordState { fields, ..state })
            })
            .collect();
        for change in &changes[cut..] {
            states.entry(change.key).or_default().apply(&change.entry);
        }
        assert_eq!(
            states, folded,
            "continued from the projection saved after {cut} changes"
        );
    }

    for (key, state) in &folded {
        let id = format!("r{}", key.1);
        match state.clone().delta_since(&id, Cursor::START, None).map(|d| d.change) {
            Some(RecordDelta::Delete { deleted_at }) => {
                assert!(state.is_deleted());
                assert_eq!(deleted_at, state.fields[DELETED_AT].value);
            }
            Some(RecordDelta::Insert { data }) => {
                assert!(!state.is_deleted());
                assert_eq!(data, state.clone().into_data(&id));
            }
            other => panic!("from the start a record is an insert or a delete, not {other:?}"),
        }
        for since in (0..=changes.len() as i64).map(|i| Cursor(10 * i)) {
            let delta = state.clone().delta_since(&id, since, None).map(|d| d.change);
            if state.touched <= since.0 {
                assert_eq!(delta, None, "nothing after {since:?}");
            }
            if let Some(RecordDelta::Update { data, fields }) = delta {
                assert_eq!(data, state.clone().into_data(&id));
                for (name, (value, at)) in &fields {
                    if name != UPDATED_AT {
                        let f = &state.fields[name];
                        assert!(f.written > since.0, "{name} was written after {since:?}");
                        assert_eq!((value, at.0), (&f.value, f.at));
                    }
                }
            }
        }
    }
    changes.len()
}

/// Field-level last-write-wins, written out: per record, each field is
/// the value of its highest-ranked write (timed above untimed, then the
/// later time, then the later log position).
fn model(changes: &[Logged]) -> Projection {
    let mut states = Projection::new();
    for (key, seqs) in group(changes) {
        let mine: Vec<&LogEntry> = changes.iter().filter(|c| c.key == key).map(|c| &c.entry).collect();
        let mut fields = BTreeMap::new();
        for name in FIELDS {
            let writes: Vec<(i64, &FieldWrite)> = mine
                .iter()
                .flat_map(|e| e.writes.iter().filter(|w| w.name == name).map(|w| (e.seq, w)))
                .collect();
            let Some(&(seq, winner)) = writes.iter().max_by_key(|(seq, w)| (!w.untimed, w.at, *seq)) else {
                continue;
            };
            fields.insert(
                name.to_owned(),
                FieldState {
                    value: winner.value.clone(),
                    at: winner.at.0,
                    seq,
                    written: writes.iter().map(|(s, _)| *s).max().unwrap_or(seq),
                    untimed: winner.untimed,
                },
            );
        }
        let created = *seqs.iter().min().expect("a record has a change");
        let touched = *seqs.iter().max().expect("a record has a change");
        states.insert(
            key,
            RecordState {
                fields,
                created,
                touched,
                writers: Default::default(),
            },
        );
    }
    states
}

fn group(changes: &[Logged]) -> BTreeMap<(u8, u8), Vec<i64>> {
    let mut seqs: BTreeMap<(u8, u8), Vec<i64>> = BTreeMap::new();
    for change in changes {
        seqs.entry(change.key).or_default().push(change.entry.seq);
    }
    seqs
}
