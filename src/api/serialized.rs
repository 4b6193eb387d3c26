//! A JSON answer written straight from its serde form.

use poem::http::StatusCode;
use poem::{IntoResponse, Response};
use poem_openapi::ApiResponse;
use poem_openapi::payload::Payload;
use poem_openapi::registry::{MetaMediaType, MetaResponse, MetaResponses, MetaSchemaRef, Registry};
use poem_openapi::types::Type;
use serde::Serialize;

/// A JSON body, documented as `T`'s schema as poem-openapi's `Json` is,
/// but written by serde straight from `T`. poem-openapi's `ToJSON` first
/// builds the whole answer again as a tree of `serde_json::Value`s, then
/// writes that: for a page of a thousand records, thousands of allocations
/// and a second pass. `T`'s serde form must be its schema's (the protocol
/// types derive both, and a test compares them).
pub struct Serialized<T>(pub T);

const CONTENT_TYPE: &str = "application/json; charset=utf-8";

impl<T: Type + Send> Payload for Serialized<T> {
    const CONTENT_TYPE: &'static str = CONTENT_TYPE;

    fn schema_ref() -> MetaSchemaRef {
        T::schema_ref()
    }

    fn register(registry: &mut Registry) {
        T::register(registry);
    }
}

impl<T: Serialize + Send> IntoResponse for Serialized<T> {
    fn into_response(self) -> Response {
        match serde_json::to_vec(&self.0) {
            Ok(body) => Response::builder().content_type(CONTENT_TYPE).body(body),
            // Only a map with non-string keys fails, which no answer holds.
            Err(e) => Response::builder()
                .status(StatusCode::INTERNAL_SERVER_ERROR)
                .body(e.to_string()),
        }
    }
}

/// The same 200 answer poem-openapi declares for its `Json`.
impl<T: Type + Serialize + Send> ApiResponse for Serialized<T> {
    fn meta() -> MetaResponses {
        MetaResponses {
            responses: vec![MetaResponse {
                description: "",
                status: Some(200),
                status_range: None,
                content: vec![MetaMediaType {
                    content_type: CONTENT_TYPE,
                    schema: T::schema_ref(),
                }],
                headers: vec![],
            }],
        }
    }

    fn register(registry: &mut Registry) {
        T::register(registry);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use poem_openapi::types::ToJSON;
    use serde_json::json;

    use crate::protocol::{FieldValue, Op, ServerChange, SyncResponse};

    /// What serde writes is what poem-openapi would have: every shape of
    /// change, absent and null members, numbers as sent.
    #[test]
    fn the_serde_form_is_the_schemas() {
        let change = |op, data: Option<serde_json::Value>, fields, deleted_at| ServerChange {
            table: "todos".into(),
            id: "r\"1".into(),
            op,
            data: data.map(|d| serde_json::from_value(d).unwrap()),
            fields,
            deleted_at,
            event_id: "1764669600000000001".into(),
            schema_version: 1,
            // Present for inserts only: absent members of both kinds.
            actor: (op == Op::Insert).then(|| BTreeMap::from([("kind".to_owned(), json!("ai"))])),
            origin: (op == Op::Insert).then(|| "agent".to_owned()),
            space_id: (op == Op::Insert).then(|| "s1".to_owned()),
        };
        let response = SyncResponse {
            server_changes: vec![
                change(
                    Op::Insert,
                    Some(
                        json!({ "id": "r\"1", "n": 12345678901234567890123_u128.to_string().parse::<serde_json::Value>().unwrap(), "x": null }),
                    ),
                    None,
                    None,
                ),
                change(
                    Op::Update,
                    Some(json!({ "id": "r\"1", "list": [1.5, "é", { "deep": true }] })),
                    Some(BTreeMap::from([(
                        "list".to_owned(),
                        FieldValue::new(json!([1.5, "é", { "deep": true }]), "2026-12-02T10:00:00.000Z".into()),
                    )])),
                    None,
                ),
                change(Op::Delete, None, None, Some(json!("2026-12-02T10:00:00Z"))),
            ],
            conflicts: Vec::new(),
            synced_until: "2026-12-02T10:00:00.000000001Z".into(),
            has_more: true,
        };
        assert_eq!(serde_json::to_value(&response).unwrap(), response.to_json().unwrap());
    }
}
