use serde_json::{Value, json};

use super::*;
use crate::fold::{DELETED_AT, FieldWrite};

const LIMITS: Limits = Limits {
    max_changes: 3,
    max_clock_skew: Duration::from_secs(300),
};

fn now() -> Timestamp {
    Timestamp::parse("2024-01-01T12:00:00Z").unwrap()
}

fn request(changes: Value) -> PushRequest {
    use poem_openapi::types::ParseFromJSON;
    PushRequest::parse_from_json(Some(json!({ "clientId": "dev-1", "changes": changes }))).unwrap()
}

fn code(result: Result<Batch>) -> ErrorCode {
    match result {
        Err(Error::Invalid { code, .. } | Error::TooLarge { code, .. }) => code,
        other => panic!("expected a client error, got {other:?}"),
    }
}

#[test]
fn insert_fields_take_updated_at_else_created_at_else_now() {
    let batch = push(None, request(json!([
        { "table": "todos", "id": "a", "op": "insert", "data": { "id": "a", "title": "x", "updatedAt": "2024-01-01T10:00:00Z", "createdAt": "2023-01-01T00:00:00Z" } },
        { "table": "todos", "id": "b", "op": "insert", "data": { "title": "y", "createdAt": "2023-01-01T00:00:00Z" } },
        { "table": "todos", "id": "c", "op": "insert", "data": { "title": "z" } }
    ])), now(), LIMITS).unwrap();
    let first = |i: usize| (batch.changes[i].writes[0].at, batch.changes[i].writes[0].untimed);
    assert_eq!(first(0), (Timestamp::parse("2024-01-01T10:00:00Z").unwrap(), false));
    assert_eq!(first(1), (Timestamp::parse("2023-01-01T00:00:00Z").unwrap(), false));
    assert_eq!(first(2), (now(), true), "no time: untimed, at the receive time");
    assert!(
        batch.changes[0].writes.iter().all(|w| w.name != "id"),
        "id is the record key, not a field"
    );
}

#[test]
fn the_at_alias_and_future_clamp_apply_to_field_changes() {
    let batch = push(
        Some("header-dev"),
        request(json!([
            { "table": "todos", "id": "a", "op": "update", "fields": {
                "title": { "value": "x", "at": "2024-01-01T11:00:00+01:00" },
                "done": { "value": true, "updatedAt": "2030-01-01T00:00:00Z" } } }
        ])),
        now(),
        LIMITS,
    )
    .unwrap();
    assert_eq!(batch.client_id, "header-dev");
    let w = &batch.changes[0].writes;
    assert_eq!(
        w.iter().find(|w| w.name == "title").unwrap().at,
        Timestamp::parse("2024-01-01T10:00:00Z").unwrap()
    );
    assert_eq!(
        w.iter().find(|w| w.name == "done").unwrap().at,
        now(),
        "a far-future timestamp is clamped"
    );
}

#[test]
fn record_timestamps_may_be_epoch_milliseconds_and_only_the_used_one_is_checked() {
    let batch = push(None, request(json!([
        { "table": "todos", "id": "a", "op": "insert", "data": { "updatedAt": 1_704_103_200_000i64, "createdAt": "not read" } },
        { "table": "todos", "id": "b", "op": "insert", "data": { "deletedAt": null, "createdAt": "2024-01-01T10:00:00Z" } }
    ])), now(), LIMITS).unwrap();
    let ten = Timestamp::parse("2024-01-01T10:00:00Z").unwrap();
    assert_eq!(batch.changes[0].writes[0].at, ten);
    assert_eq!(batch.changes[1].writes[0].at, ten);
}

#[test]
fn a_delete_writes_deleted_at() {
    let batch = push(
        None,
        request(json!([
            { "table": "todos", "id": "a", "op": "delete", "deletedAt": "2024-01-01T10:06:00Z" }
        ])),
        now(),
        LIMITS,
    )
    .unwrap();
    assert_eq!(
        batch.changes[0].writes,
        vec![FieldWrite::timed(
            DELETED_AT,
            json!("2024-01-01T10:06:00.000Z"),
            Timestamp::parse("2024-01-01T10:06:00Z").unwrap()
        )]
    );
}

#[test]
fn explicit_changes_without_a_time_take_the_receive_time_in_milliseconds() {
    let received = Timestamp(now().0 + 123_456_789);
    let batch = push(
        None,
        request(json!([
            { "table": "t", "id": "a", "op": "update", "fields": { "title": { "value": "x" } } },
            { "table": "t", "id": "a", "op": "delete" }
        ])),
        received,
        LIMITS,
    )
    .unwrap();
    let ms = Timestamp(now().0 + 123_000_000);
    assert_eq!(
        batch.changes[0].writes,
        vec![FieldWrite::timed("title", json!("x"), ms)]
    );
    assert_eq!(
        batch.changes[1].writes,
        vec![FieldWrite::timed(DELETED_AT, json!("2024-01-01T12:00:00.123Z"), ms)]
    );
}

#[test]
fn bad_input_is_named() {
    let one = |c: Value| push(None, request(json!([c])), now(), LIMITS);
    assert_eq!(
        code(one(json!({ "table": "", "id": "a", "op": "delete" }))),
        ErrorCode::InvalidName
    );
    assert_eq!(
        code(one(json!({ "table": "t".repeat(129), "id": "a", "op": "delete" }))),
        ErrorCode::InvalidName
    );
    assert_eq!(
        code(one(json!({ "table": "t", "id": "a\u{0}", "op": "delete" }))),
        ErrorCode::NulCharacter
    );
    assert_eq!(
        code(one(
            json!({ "table": "t", "id": "a", "op": "insert", "data": { "x": ["ok", "bad\u{0}"] } })
        )),
        ErrorCode::NulCharacter
    );
    assert_eq!(
        code(one(
            json!({ "table": "t", "id": "a", "op": "insert", "data": { "updatedAt": "yesterday" } })
        )),
        ErrorCode::InvalidTimestamp
    );
    assert_eq!(
        code(one(
            json!({ "table": "t", "id": "a", "op": "insert", "data": { "id": "b" } })
        )),
        ErrorCode::IdMismatch
    );
    assert_eq!(
        code(one(json!({ "table": "t", "id": "a", "op": "insert" }))),
        ErrorCode::MissingData
    );
    assert_eq!(
        code(one(json!({ "table": "t", "id": "a", "op": "update" }))),
        ErrorCode::MissingFields
    );
    assert_eq!(
        code(one(
            json!({ "table": "t", "id": "a", "op": "delete", "deletedAt": "5" })
        )),
        ErrorCode::InvalidTimestamp
    );
    let four = json!([{ "table": "t", "id": "a", "op": "delete" }, { "table": "t", "id": "a", "op": "delete" }, { "table": "t", "id": "a", "op": "delete" }, { "table": "t", "id": "a", "op": "delete" }]);
    assert_eq!(
        code(push(None, request(four), now(), LIMITS)),
        ErrorCode::TooManyChanges
    );
    let mut anonymous = request(json!([]));
    anonymous.client_id = None;
    assert_eq!(code(push(None, anonymous, now(), LIMITS)), ErrorCode::MissingClientId);
}

fn parsed(body: Value) -> PushRequest {
    use poem_openapi::types::ParseFromJSON;
    PushRequest::parse_from_json(Some(body)).unwrap()
}

#[test]
fn a_change_keeps_its_provenance_and_inherits_the_changesets() {
    let batch = push(
        None,
        parsed(json!({
            "clientId": "tab-1", "schemaVersion": 1, "actor": {"kind": "user", "principalId": "u1"}, "origin": "user",
            "changes": [
                { "table": "todos", "id": "a", "op": "insert", "data": { "title": "x" } },
                { "table": "todos", "id": "b", "op": "insert", "data": { "title": "y" },
                  "actor": {"kind": "ai"}, "origin": "agent", "spaceId": "s1", "unknownKey": 7 }
            ]
        })),
        now(),
        LIMITS,
    )
    .unwrap();
    let first = &batch.changes[0].provenance;
    assert_eq!(first.actor.as_ref().unwrap()["principalId"], json!("u1"));
    assert_eq!(
        (first.origin.as_deref(), first.space_id.as_deref()),
        (Some("user"), None)
    );
    assert_eq!(
        first.client.as_deref(),
        Some("tab-1"),
        "a schemaVersion marks the later form"
    );
    let second = &batch.changes[1].provenance;
    assert_eq!(second.actor.as_ref().unwrap()["kind"], json!("ai"));
    assert_eq!(
        (second.origin.as_deref(), second.space_id.as_deref()),
        (Some("agent"), Some("s1"))
    );
    // The seed's form: no device is kept, so its writes are echoed to it.
    let seed = push(
        None,
        request(json!([{ "table": "todos", "id": "a", "op": "insert", "data": {} }])),
        now(),
        LIMITS,
    );
    assert!(seed.unwrap().changes[0].provenance.is_empty());
}

#[test]
fn a_schema_version_this_server_does_not_know_is_refused() {
    for version in [0, 2, -1] {
        for body in [
            json!({ "clientId": "d", "schemaVersion": version, "changes": [{ "table": "t", "id": "a", "op": "insert", "data": {} }] }),
            json!({ "clientId": "d", "changes": [{ "table": "t", "id": "a", "op": "insert", "data": {}, "schemaVersion": version }] }),
        ] {
            assert_eq!(
                code(push(None, parsed(body), now(), LIMITS)),
                ErrorCode::UnsupportedSchemaVersion
            );
        }
    }
    let big = "x".repeat(MAX_ACTOR_BYTES);
    let body = json!({ "clientId": "d", "actor": {"name": big}, "changes": [{ "table": "t", "id": "a", "op": "insert", "data": {} }] });
    assert_eq!(code(push(None, parsed(body), now(), LIMITS)), ErrorCode::InvalidActor);
    let body =
        json!({ "clientId": "d", "origin": "", "changes": [{ "table": "t", "id": "a", "op": "insert", "data": {} }] });
    assert_eq!(code(push(None, parsed(body), now(), LIMITS)), ErrorCode::InvalidName);
}

#[test]
fn todays_delete_form_carries_its_time_in_fields_too() {
    let batch = push(None, request(json!([
        { "table": "t", "id": "a", "op": "delete", "fields": { "deletedAt": { "value": "2024-01-01T10:00:00.000Z", "at": "2024-01-01T10:00:00.000Z" } } },
        { "table": "t", "id": "b", "op": "delete", "deletedAt": "2024-01-01T09:00:00.000Z",
          "fields": { "deletedAt": { "value": "2024-01-01T10:00:00.000Z", "at": "2024-01-01T10:00:00.000Z" } } }
    ])), now(), LIMITS).unwrap();
    let deleted = |i: usize| (batch.changes[i].writes[0].name.clone(), batch.changes[i].writes[0].at);
    assert_eq!(
        deleted(0),
        (DELETED_AT.to_owned(), Timestamp::parse("2024-01-01T10:00:00Z").unwrap())
    );
    assert_eq!(
        deleted(1).1,
        Timestamp::parse("2024-01-01T09:00:00Z").unwrap(),
        "deletedAt comes first"
    );
    assert_eq!(batch.changes[0].writes.len(), 1);
}

#[test]
fn a_changesets_parts_are_checked_even_with_no_change() {
    let body = json!({ "clientId": "d", "schemaVersion": 0, "changes": [] });
    assert_eq!(
        code(push(None, parsed(body), now(), LIMITS)),
        ErrorCode::UnsupportedSchemaVersion
    );
    let body = json!({ "clientId": "d", "spaceId": "\u{9b}", "changes": [] });
    assert_eq!(code(push(None, parsed(body), now(), LIMITS)), ErrorCode::InvalidName);
}
