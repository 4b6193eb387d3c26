//! The fuzz corpus as a regression suite: every input committed under
//! `fuzz/corpus/<target>/` goes through the same checks as its fuzz
//! target (`fuzz/checks.rs`, shared with `fuzz/fuzz_targets/*.rs`), so an
//! invariant the fuzzer once held cannot silently break.

#[path = "../../fuzz/checks.rs"]
mod checks;

use std::path::PathBuf;

use mana_sync::error::{Error, ErrorCode};
use mana_sync::protocol::PushRequest;
use mana_sync::timestamp::Timestamp;
use mana_sync::validate;
use poem_openapi::types::ParseFromJSON;
use serde_json::{Value, json};

/// The committed corpus of one target, in name order, with its file names.
fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.expect("a corpus entry").path();
            let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
            (path.file_name().unwrap().to_string_lossy().into_owned(), bytes)
        })
        .collect();
    files.sort();
    assert!(
        files.len() >= 10,
        "the {target} corpus is committed ({} files)",
        files.len()
    );
    files
}

/// Runs `check` on every input of `target`'s corpus, naming the file that
/// fails, and returns what it said of each.
fn replay<T>(target: &str, check: fn(&[u8]) -> T) -> Vec<T> {
    corpus(target)
        .into_iter()
        .map(|(name, bytes)| {
            std::panic::catch_unwind(|| check(&bytes)).unwrap_or_else(|panic| {
                let why = panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("");
                panic!("fuzz/corpus/{target}/{name} breaks an invariant: {why}")
            })
        })
        .collect()
}

#[test]
fn every_push_body_of_the_corpus_parses_and_validates_as_the_server_requires() {
    let seen = replay("push", checks::push);
    // The corpus reaches past the parser, to both of validation's answers.
    assert!(seen.contains(&Some(true)), "some bodies are accepted");
    assert!(seen.contains(&Some(false)), "some push requests are refused");
}

#[test]
fn every_timestamp_of_the_corpus_round_trips_and_saturates() {
    let parsed = replay("timestamp", checks::timestamp);
    assert!(parsed.contains(&None), "some strings are not timestamps");
    let saturated = [Timestamp::MIN, Timestamp::MAX];
    assert!(
        saturated.iter().all(|end| parsed.contains(&Some(*end))),
        "both ends are reached"
    );
    assert!(
        parsed.iter().flatten().any(|t| !saturated.contains(t)),
        "some times are inside the span"
    );
}

#[test]
fn every_history_of_the_corpus_folds_the_same_in_any_order() {
    let lengths = replay("fold", checks::fold_history);
    assert!(lengths.iter().any(|&n| n >= 8), "some histories are long: {lengths:?}");
}

/// Found by the `push` target: a number whose exponent is near `i64::MAX`
/// or `i64::MIN` overflowed the digit bound's arithmetic (a panic in a
/// debug build; in a release build it wrapped, and the number passed the
/// bound). Such a number is refused like any other beyond the bound.
#[test]
fn a_number_with_an_exponent_at_the_ends_of_i64_is_out_of_range_not_an_overflow() {
    let found = include_bytes!("../../fuzz/corpus/push/crash-b94b0ed0a407c9e225415cd2eb71e5ae2b80a121");
    let minimal = [
        "1e9223372036854775807",
        "20.000e9223372036854775807",
        "1e-9223372036854775808",
        "0.5e-9223372036854775808",
    ]
    .map(|n| format!(r#"{{"clientId":"a","changes":[{{"table":"t","id":"x","op":"insert","data":{{"n":{n}}}}}]}}"#));
    for body in std::iter::once(&found[..]).chain(minimal.iter().map(String::as_bytes)) {
        assert_eq!(checks::push(body), Some(false), "{}", String::from_utf8_lossy(body));
        let request = PushRequest::parse_from_json(Some(serde_json::from_slice(body).unwrap())).unwrap();
        match validate::push(None, request, checks::NOW, checks::SERVER_LIMITS) {
            Err(Error::Invalid { code, message }) => {
                assert_eq!(code, ErrorCode::NumberOutOfRange, "{message}");
                assert!(message.starts_with("changes[0]: "), "{message}");
            }
            other => panic!("expected number_out_of_range, got {other:?}"),
        }
    }
}

/// The fold target's encoding is part of its corpus: pinned here.
#[test]
fn a_history_is_read_from_bytes_as_documented() {
    // Seed 7; an insert of `title` (null) at 3 ms, untimed, to table 1, id 1;
    // a delete of the same record at 1 ms; an update of `done` (string v1) at 2 ms.
    let (seed, changes) = checks::history(&[
        7,
        0b0011_0011,
        0b0000_0000,
        3,
        0b0000_1011,
        1,
        0b0010_0100,
        0b0011_0011,
        2,
    ]);
    assert_eq!(seed, 7);
    let shape: Vec<_> = changes
        .iter()
        .map(|c| {
            let writes: Vec<_> = c
                .entry
                .writes
                .iter()
                .map(|w| (w.name.as_str(), w.value.clone(), (w.at.0 / 1_000_000) % 1000, w.untimed))
                .collect();
            (c.key, c.entry.seq, writes)
        })
        .collect();
    assert_eq!(
        shape,
        vec![
            ((1, 1), 10, vec![("title", Value::Null, 3, true)]),
            (
                (1, 1),
                20,
                vec![("deletedAt", json!("2024-01-01T12:00:00.001Z"), 1, false)]
            ),
            ((0, 0), 30, vec![("done", json!("v1"), 2, false)]),
        ]
    );
}
