//! The fold's rules, and its properties over random histories.

use proptest::prelude::*;
use serde_json::json;

use super::*;

fn entry(seq: i64, writes: &[(&str, Value, i64)]) -> LogEntry {
    LogEntry {
        seq,
        writes: writes
            .iter()
            .map(|(name, value, at)| FieldWrite::timed(*name, value.clone(), Timestamp(*at)))
            .collect(),
        provenance: Provenance::default(),
    }
}

fn untimed(mut entry: LogEntry) -> LogEntry {
    for write in &mut entry.writes {
        write.untimed = true;
    }
    entry
}

fn object(value: Value) -> Data {
    serde_json::from_value(value).unwrap()
}

impl RecordState {
    fn data(&self, id: &str) -> Data {
        self.clone().into_data(id)
    }
}

#[test]
fn later_field_timestamp_wins_whatever_the_arrival_order() {
    let a = entry(1, &[("title", json!("Buy milk"), 500)]);
    let b = entry(2, &[("title", json!("Buy eggs"), 530), ("done", json!(false), 530)]);
    let late_old = entry(3, &[("title", json!("stale"), 100), ("done", json!(true), 600)]);
    let state = RecordState::fold([&a, &b, &late_old]);
    assert_eq!(state.fields["title"].value, json!("Buy eggs"));
    assert_eq!(state.fields["done"].value, json!(true));
    assert_eq!(
        state.fields["title"].written, 3,
        "a losing write still marks the field written"
    );
}

/// A field's stored form names `w` only when a later write lost, and
/// `u` only when untimed; rows stored with every member still read.
#[test]
fn the_stored_form_leaves_out_what_it_can_tell() {
    let state = RecordState::fold([
        &entry(1, &[("won", json!(1), 900), ("lost", json!(2), 900)]),
        &entry(2, &[("lost", json!(3), 100)]),
        &untimed(entry(3, &[("untimed", json!(null), 5)])),
    ]);
    let stored = serde_json::to_value(&state.fields).unwrap();
    assert_eq!(
        stored,
        json!({
            "won": { "v": 1, "t": 900, "s": 1 },
            "lost": { "v": 2, "t": 900, "s": 1, "w": 2 },
            "untimed": { "v": null, "t": 5, "s": 3, "u": true },
        })
    );
    let read: BTreeMap<String, FieldState> = serde_json::from_value(stored).unwrap();
    assert_eq!(read, state.fields);
    let old: FieldState = serde_json::from_value(json!({ "v": "x", "t": 7, "s": 4, "w": 4 })).unwrap();
    assert_eq!((old.seq, old.written, old.untimed), (4, 4, false));
}

#[test]
fn equal_timestamps_go_to_the_later_log_entry() {
    let a = entry(7, &[("title", json!("first"), 500)]);
    let b = entry(9, &[("title", json!("second"), 500)]);
    assert_eq!(RecordState::fold([&b, &a]).fields["title"].value, json!("second"));
}

#[test]
fn an_untimed_write_ranks_below_any_timed_one_whatever_the_times() {
    // The seed's own flow: an insert without timestamps (received at
    // 400), then an edit stamped in whole seconds (at 0).
    let insert = untimed(entry(1, &[("title", json!("draft"), 400), ("done", json!(false), 400)]));
    let edit = entry(2, &[("title", json!("final"), 0)]);
    for state in [RecordState::fold([&insert, &edit]), RecordState::fold([&edit, &insert])] {
        assert_eq!(state.fields["title"].value, json!("final"));
        assert_eq!(
            state.fields["done"].value,
            json!(false),
            "untouched fields keep the insert's"
        );
    }
    // Among untimed writes, the later received wins.
    let again = untimed(entry(3, &[("done", json!(true), 500)]));
    assert_eq!(
        RecordState::fold([&insert, &edit, &again]).fields["done"].value,
        json!(true)
    );
}

#[test]
fn updated_at_is_as_sent_until_a_second_change_then_the_latest_field_time() {
    let created = entry(
        10,
        &[
            ("title", json!("a"), 100),
            (UPDATED_AT, json!("1970-01-01T00:00:00.0000001Z"), 100),
        ],
    );
    let once = RecordState::fold([&created]);
    assert_eq!(
        once.data("r"),
        object(json!({"id": "r", "title": "a", "updatedAt": "1970-01-01T00:00:00.0000001Z"}))
    );
    let edited = entry(20, &[("title", json!("b"), 2_000_000)]);
    let twice = RecordState::fold([&created, &edited]);
    assert_eq!(twice.data("r")[UPDATED_AT], json!("1970-01-01T00:00:00.002Z"));
    // A record that never had `updatedAt` gets one once edited, as it does on a device.
    let bare = RecordState::fold([&entry(10, &[("title", json!("a"), 100)]), &edited]);
    assert_eq!(bare.data("r")[UPDATED_AT], json!("1970-01-01T00:00:00.002Z"));
}

#[test]
fn an_update_lists_updated_at_when_its_fields_would_not_tell_the_latest_time() {
    let created = entry(
        10,
        &[("title", json!("a"), 5_000_000), ("done", json!(false), 5_000_000)],
    );
    let late_clock = entry(20, &[("rank", json!(1), 3_000_000)]);
    let state = RecordState::fold([&created, &late_clock]);
    let Some(RecordDelta::Update { fields, data }) = state.clone().delta_since("r", Cursor(10), None).map(|d| d.change)
    else {
        panic!("expected an update");
    };
    assert_eq!(fields["rank"], (json!(1), Timestamp(3_000_000)));
    assert_eq!(
        fields[UPDATED_AT],
        (json!("1970-01-01T00:00:00.005Z"), Timestamp(5_000_000)),
        "the title's time is the latest"
    );
    assert_eq!(data[UPDATED_AT], json!("1970-01-01T00:00:00.005Z"));
    // When a listed field holds the latest time, nothing is added.
    let newer = entry(30, &[("done", json!(false), 9_000_000)]);
    let state = RecordState::fold([&created, &late_clock, &newer]);
    let Some(RecordDelta::Update { fields, .. }) = state.clone().delta_since("r", Cursor(20), None).map(|d| d.change)
    else {
        panic!("expected an update");
    };
    assert_eq!(fields.keys().collect::<Vec<_>>(), vec!["done"]);
}

#[test]
fn a_record_live_again_is_sent_whole() {
    let created = entry(10, &[("title", json!("a"), 100)]);
    let deleted = entry(20, &[(DELETED_AT, json!("2024-01-01T00:00:00.000Z"), 200)]);
    let edited = entry(30, &[("title", json!("b"), 300)]);
    let restored = entry(40, &[(DELETED_AT, Value::Null, 400)]);
    let state = RecordState::fold([&created, &deleted, &edited, &restored]);
    // A device that saw the delete at 20 missed the edit at 30.
    assert!(matches!(
        state.clone().delta_since("r", Cursor(20), None).map(|d| d.change),
        Some(RecordDelta::Insert { .. })
    ));
    assert!(
        state
            .clone()
            .delta_since("r", Cursor(40), None)
            .map(|d| d.change)
            .is_none()
    );
}

#[test]
fn delta_distinguishes_insert_update_and_delete() {
    let created = entry(10, &[("title", json!("a"), 100), ("done", json!(false), 100)]);
    let edited = entry(20, &[("done", json!(true), 200)]);
    let state = RecordState::fold([&created, &edited]);
    assert_eq!(
        state.clone().delta_since("r1", Cursor(20), None).map(|d| d.change),
        None
    );
    match state
        .clone()
        .delta_since("r1", Cursor(5), None)
        .map(|d| d.change)
        .unwrap()
    {
        RecordDelta::Insert { data } => assert_eq!(
            data,
            object(json!({"id": "r1", "title": "a", "done": true, "updatedAt": "1970-01-01T00:00:00.000000200Z"}))
        ),
        other => panic!("expected insert, got {other:?}"),
    }
    match state
        .clone()
        .delta_since("r1", Cursor(10), None)
        .map(|d| d.change)
        .unwrap()
    {
        RecordDelta::Update { data, fields } => {
            assert_eq!(fields.keys().collect::<Vec<_>>(), vec!["done"]);
            assert_eq!(data["title"], json!("a"));
            assert_eq!(data["id"], json!("r1"));
        }
        other => panic!("expected update, got {other:?}"),
    }
    let deleted = entry(30, &[(DELETED_AT, json!("2024-01-01T00:00:00.000Z"), 300)]);
    let state = RecordState::fold([&created, &edited, &deleted]);
    assert!(state.is_deleted());
    assert_eq!(
        state.clone().delta_since("r1", Cursor(25), None).map(|d| d.change),
        Some(RecordDelta::Delete {
            deleted_at: json!("2024-01-01T00:00:00.000Z")
        })
    );
}

/// An entry pushed by `device` in the later form, naming `actor`.
fn by(device: &str, actor: &str, mut entry: LogEntry) -> LogEntry {
    entry.provenance = Provenance {
        client: Some(device.to_owned()),
        actor: Some(BTreeMap::from([("principalId".to_owned(), json!(actor))])),
        ..Provenance::default()
    };
    entry
}

#[test]
fn a_record_keeps_the_provenance_of_its_winning_entries_only() {
    let first = by(
        "a",
        "ann",
        entry(10, &[("title", json!("x"), 100), ("done", json!(false), 100)]),
    );
    let second = by("b", "bob", entry(20, &[("title", json!("y"), 200)]));
    let late_loser = by("c", "cid", entry(30, &[("title", json!("z"), 50)]));
    let state = RecordState::fold([&first, &second, &late_loser]);
    assert_eq!(state.writers.keys().collect::<Vec<_>>(), vec![&10, &20]);
    let state = RecordState::fold([
        &first,
        &second,
        &by("b", "bob", entry(40, &[("done", json!(true), 400)])),
    ]);
    assert_eq!(
        state.writers.keys().collect::<Vec<_>>(),
        vec![&20, &40],
        "entry 10 holds no field any more"
    );
    // Seed-form entries keep nothing.
    assert!(
        RecordState::fold([&entry(10, &[("title", json!("x"), 100)])])
            .writers
            .is_empty()
    );
}

#[test]
fn a_later_generation_device_is_not_sent_its_own_winning_writes() {
    let created = entry(10, &[("title", json!("x"), 100), ("done", json!(false), 100)]);
    let mine = by("a", "ann", entry(20, &[("title", json!("mine"), 200)]));
    let theirs = by("b", "bob", entry(30, &[("done", json!(true), 300)]));
    let state = RecordState::fold([&created, &mine, &theirs]);
    let listed = |asking| match state.clone().delta_since("r", Cursor(10), asking) {
        Some(Delta {
            change: RecordDelta::Update { fields, .. },
            event,
        }) => (fields.into_keys().collect::<Vec<_>>(), event),
        other => panic!("expected an update, got {other:?}"),
    };
    let (fields, event) = listed(None);
    assert_eq!(fields, vec!["done", "title"], "the seed's engine gets its echo");
    assert_eq!(event.seq, 30);
    let (fields, event) = listed(Some("a"));
    assert_eq!(fields, vec!["done"]);
    assert_eq!(
        (event.seq, event.provenance.actor.unwrap()["principalId"].clone()),
        (30, json!("bob"))
    );
    let (fields, event) = listed(Some("b"));
    assert_eq!(
        fields,
        vec!["title", UPDATED_AT],
        "the record's latest time is bob's done"
    );
    assert_eq!(event.seq, 20, "the entry of the latest field sent");
    // Nothing of its own comes back to a device: its own record, its own delete.
    let own = RecordState::fold([&by("a", "ann", entry(40, &[("title", json!("n"), 400)]))]);
    assert_eq!(own.clone().delta_since("r", Cursor::START, Some("a")), None);
    assert!(own.delta_since("r", Cursor::START, Some("b")).is_some());
    // But the record's `updatedAt`, the server's, which its own writes moved.
    let edited = by("a", "ann", entry(50, &[("title", json!("m"), 500)]));
    let own = RecordState::fold([&by("a", "ann", entry(40, &[("title", json!("n"), 400)])), &edited]);
    for since in [Cursor::START, Cursor(40)] {
        match own.clone().delta_since("r", since, Some("a")).map(|d| d.change) {
            Some(RecordDelta::Update { fields, .. }) => {
                assert_eq!(fields.into_keys().collect::<Vec<_>>(), vec![UPDATED_AT]);
            }
            other => panic!("expected updatedAt alone, got {other:?}"),
        }
    }
    let deleted = by(
        "a",
        "ann",
        entry(40, &[(DELETED_AT, json!("2024-01-01T00:00:00.000Z"), 400)]),
    );
    let state = RecordState::fold([&created, &theirs, &deleted]);
    assert_eq!(state.clone().delta_since("r", Cursor(10), Some("a")), None);
    assert!(matches!(
        state.delta_since("r", Cursor(10), Some("b")).map(|d| d.change),
        Some(RecordDelta::Delete { .. })
    ));
}

/// Histories of up to 12 entries at positions 10, 20, ...: each writes
/// 0-3 fields at times in milliseconds (as validation keeps them), and
/// is untimed now and then (an insert without a timestamp).
fn arb_history() -> impl Strategy<Value = Vec<LogEntry>> {
    let field = prop::sample::select(vec!["title", "done", "rank", UPDATED_AT, DELETED_AT]);
    let write = (field, prop::option::of(0i64..5), 0i64..6);
    let device = prop::option::of(prop::sample::select(vec!["a", "b"]));
    let entry = (prop::collection::vec(write, 0..4), prop::bool::weighted(0.2), device);
    prop::collection::vec(entry, 1..12).prop_map(|entries| {
        entries
            .into_iter()
            .enumerate()
            .map(|(i, (writes, untimed, device))| LogEntry {
                seq: (i as i64 + 1) * 10,
                writes: writes
                    .into_iter()
                    .map(|(name, v, at)| FieldWrite {
                        name: name.to_owned(),
                        value: match (name, v) {
                            (_, None) => Value::Null,
                            (DELETED_AT, Some(_)) => json!("2024-01-01T00:00:00.000Z"),
                            (_, Some(v)) => json!(v),
                        },
                        at: Timestamp(at * 1_000_000),
                        untimed,
                    })
                    .collect(),
                // A device of the later generation, named; or one of the seed's.
                provenance: Provenance {
                    client: device.map(str::to_owned),
                    origin: device.map(|_| "user".to_owned()),
                    ..Provenance::default()
                },
            })
            .collect()
    })
}

/// A device's copy of a record, changed the way the original client
/// applies a delta: `put(data)` for an insert; for an update, each
/// field's value and then `updatedAt` set to the latest of the fields'
/// times (compared as strings, as the client does); for a delete,
/// `deletedAt`. `None`: the device does not hold the record.
fn apply(copy: &mut Option<Data>, delta: RecordDelta) {
    match delta {
        RecordDelta::Insert { data } => *copy = Some(data),
        RecordDelta::Update { fields, .. } => {
            let record = copy
                .as_mut()
                .expect("an update is only sent for a record the device has");
            let mut latest = String::new();
            for (name, (value, at)) in fields {
                record.insert(name, value);
                latest = latest.max(at.to_short_string());
            }
            record.insert(UPDATED_AT.to_owned(), Value::String(latest));
        }
        RecordDelta::Delete { deleted_at } => {
            if let Some(record) = copy {
                record.insert(DELETED_AT.to_owned(), deleted_at);
            }
        }
    }
}

proptest! {
    #[test]
    fn any_permutation_of_the_log_folds_to_the_same_state(
        (history, order) in arb_history().prop_flat_map(|h| {
            let n = h.len();
            (Just(h), Just((0..n).collect::<Vec<_>>()).prop_shuffle())
        })
    ) {
        let in_order = RecordState::fold(&history);
        let shuffled = RecordState::fold(order.iter().map(|&i| &history[i]));
        prop_assert_eq!(in_order, shuffled);
    }

    /// A device holding the record as of cursor C that applies the
    /// delta since C holds the record as it is now: its fields merged,
    /// or `data` put, equal the folded record.
    #[test]
    fn delta_since_a_cursor_brings_the_copy_at_that_cursor_up_to_date(
        history in arb_history(), cut in 0usize..12
    ) {
        let cut = cut.min(history.len());
        let since = Cursor(cut as i64 * 10);
        let now = RecordState::fold(&history);
        let mut copy = (cut > 0).then(|| RecordState::fold(&history[..cut]).data("r"));
        let delta = now.clone().delta_since("r", since, None).map(|d| d.change);
        let deleted = matches!(delta, Some(RecordDelta::Delete { .. }));
        if let Some(RecordDelta::Update { data, .. }) = &delta {
            prop_assert_eq!(data, &now.data("r"));
        }
        if let Some(delta) = delta {
            apply(&mut copy, delta);
        }
        if deleted {
            prop_assert!(now.is_deleted());
        } else {
            prop_assert_eq!(copy, Some(now.data("r")));
        }
    }

    /// The issue's rule: after any history, a device that applied a
    /// delta at every step of its own choosing holds exactly what a new
    /// device gets from the beginning.
    #[test]
    fn a_device_that_followed_every_step_holds_what_a_new_device_pulls(
        history in arb_history(), steps in prop::collection::btree_set(1usize..12, 0..6)
    ) {
        let mut follower = None;
        let mut cursor = Cursor::START;
        for cut in steps.into_iter().filter(|&c| c < history.len()).chain([history.len()]) {
            if let Some(delta) = RecordState::fold(&history[..cut]).delta_since("r", cursor, None).map(|d| d.change) {
                apply(&mut follower, delta);
            }
            cursor = Cursor(cut as i64 * 10);
        }
        let now = RecordState::fold(&history);
        let mut fresh = None;
        apply(&mut fresh, now.clone().delta_since("r", Cursor::START, None).map(|d| d.change).expect("the record exists"));
        if now.is_deleted() {
            prop_assert!(fresh.is_none(), "a new device never holds a deleted record");
        } else {
            prop_assert_eq!(follower, fresh);
        }
    }
}
