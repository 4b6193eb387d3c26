//! The change stream on the wire: `text/event-stream`, one [`StreamEvent`]
//! per Server-Sent Event, and the spec's description of exactly that.
//!
//! poem-openapi's own `EventStream` declares an array of its items, which
//! no client ever receives: each event carries one value, and a heartbeat
//! carries `null`. So the stream has a payload type of its own whose schema
//! is one event, `{event, data}`, as OpenAPI 3.2 models a sequential media
//! type's items (and as schemathesis checks each event it receives).

use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use poem::web::sse::{Event as SseEvent, SSE};
use poem::{IntoResponse, Response};
use poem_openapi::ApiResponse;
use poem_openapi::payload::Payload;
use poem_openapi::registry::{MetaMediaType, MetaResponse, MetaResponses, MetaSchema, MetaSchemaRef, Registry};
use poem_openapi::types::{ToJSON, Type};
use serde_json::Value;

use crate::protocol::ChangeEvent;

/// One event of the change stream.
pub enum StreamEvent {
    /// `event: changes`: one collection's folded delta.
    Changes(ChangeEvent),
    /// `event: heartbeat`, data `null`: the stream is alive.
    Heartbeat,
}

impl StreamEvent {
    const CHANGES: &'static str = "changes";
    const HEARTBEAT: &'static str = "heartbeat";
    /// The name of this event's schema among the spec's components.
    const SCHEMA: &'static str = "StreamEvent";

    fn into_sse(self) -> SseEvent {
        match self {
            StreamEvent::Changes(event) => SseEvent::message(event.to_json_string()).event_type(Self::CHANGES),
            StreamEvent::Heartbeat => SseEvent::message("null").event_type(Self::HEARTBEAT),
        }
    }

    /// `{event, data}` for each kind: `event` the SSE event name, `data`
    /// the text of its `data:` line. What that text holds as JSON is added
    /// by [`declare_event_data`].
    fn schema(_: &mut Registry) -> MetaSchema {
        let kind = |name: &'static str, description: &'static str, data: MetaSchema| {
            MetaSchemaRef::Inline(Box::new(MetaSchema {
                title: Some(name.to_owned()),
                description: Some(description),
                required: vec!["event", "data"],
                properties: vec![
                    (
                        "event",
                        MetaSchemaRef::Inline(Box::new(MetaSchema {
                            enum_items: vec![Value::from(name)],
                            ..MetaSchema::new("string")
                        })),
                    ),
                    ("data", MetaSchemaRef::Inline(Box::new(data))),
                ],
                ..MetaSchema::new("object")
            }))
        };
        MetaSchema {
            description: Some(
                "One Server-Sent Event of the change stream (the response is a sequence of them): `event` is its \
                 `event:` line, `data` its `data:` line.",
            ),
            one_of: vec![
                kind(
                    Self::CHANGES,
                    "One collection's folded delta.",
                    MetaSchema {
                        description: Some("A `ChangeEvent` as JSON."),
                        ..MetaSchema::new("string")
                    },
                ),
                kind(
                    Self::HEARTBEAT,
                    "Sent every 15 s while nothing else is, so proxies keep the stream open.",
                    MetaSchema {
                        description: Some("The JSON `null`."),
                        enum_items: vec![Value::from("null")],
                        ..MetaSchema::new("string")
                    },
                ),
            ],
            ..MetaSchema::new("object")
        }
    }
}

/// Says in `spec` (the generated document) that the `data` of a `changes`
/// event is a JSON `ChangeEvent`, with the JSON Schema keywords OpenAPI 3.1
/// and 3.2 use for it (`contentMediaType`, `contentSchema`), which
/// poem-openapi's schema type cannot carry; and adds `ChangeEvent` to the
/// components, which poem-openapi leaves out: it drops every schema that no
/// operation reaches through the keywords it knows.
pub fn declare_event_data(spec: &mut Value) {
    let kinds = spec
        .pointer_mut(&format!("/components/schemas/{}/oneOf", StreamEvent::SCHEMA))
        .and_then(Value::as_array_mut);
    let changes = kinds
        .into_iter()
        .flatten()
        .find(|kind| kind["title"] == StreamEvent::CHANGES);
    if let Some(data) = changes.and_then(|kind| kind.pointer_mut("/properties/data")) {
        data["contentMediaType"] = Value::from("application/json");
        data["contentSchema"] = serde_json::json!({ "$ref": "#/components/schemas/ChangeEvent" });
    }
    let mut registry = Registry::new();
    ChangeEvent::register(&mut registry);
    if let Some(schemas) = spec.pointer_mut("/components/schemas").and_then(Value::as_object_mut) {
        for (name, schema) in registry.schemas {
            schemas
                .entry(name)
                .or_insert_with(|| serde_json::to_value(schema).expect("a schema serializes"));
        }
    }
}

/// A `text/event-stream` response of [`StreamEvent`]s.
pub struct ChangeStream(pub BoxStream<'static, StreamEvent>);

impl Payload for ChangeStream {
    const CONTENT_TYPE: &'static str = "text/event-stream";

    fn schema_ref() -> MetaSchemaRef {
        MetaSchemaRef::Reference(StreamEvent::SCHEMA.to_owned())
    }

    fn register(registry: &mut Registry) {
        registry.create_schema::<StreamEvent, _>(StreamEvent::SCHEMA.to_owned(), StreamEvent::schema);
    }
}

impl IntoResponse for ChangeStream {
    fn into_response(self) -> Response {
        SSE::new(self.0.map(StreamEvent::into_sse)).into_response()
    }
}

impl ApiResponse for ChangeStream {
    fn meta() -> MetaResponses {
        MetaResponses {
            responses: vec![MetaResponse {
                description: "The change stream, one event at a time.",
                status: Some(200),
                status_range: None,
                content: vec![MetaMediaType {
                    content_type: Self::CONTENT_TYPE,
                    schema: Self::schema_ref(),
                }],
                headers: vec![],
            }],
        }
    }

    fn register(registry: &mut Registry) {
        <Self as Payload>::register(registry);
    }
}
