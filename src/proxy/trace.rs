//! Trace-id and client-request-id extraction (CONTRACT §3.1).
//!
//! Given the payload of one candidate SSE event, or one whole JSON body, finds the ids the proxy
//! links an answer with, in every shape the contract lists:
//!
//! - the MLflow agent server's `{"trace_id": "tr-…"}` event (a top-level `trace_id` and no
//!   `type` field) → [`Source::AgentEvent`];
//! - `databricks_output.trace.info.trace_id` on any event or a JSON body (the chat-completions
//!   chunk and the Responses `response.output_item.done` / `response.completed` shapes all carry
//!   `databricks_output` at the top level) → [`Source::DatabricksOutput`];
//! - `metadata.trace_id` in a non-streaming JSON body → [`Source::ResponseMetadata`];
//! - seed 001's `{"type": "trace.client_request_id", "client_request_id": "req-…"}` event;
//! - configured response headers ([`from_headers`]) → [`Source::Header`];
//! - in an AI SDK UI message stream (the chat app template's `/api/chat`, `ui::from_ui_part`):
//!   the assistant message id of the `start` part, and the trace id of the
//!   `{"type": "data-traceId", "data": "tr-…"}` part (`data: null`: the endpoint emits no
//!   trace) or of another data part whose `data` object has a `traceId` →
//!   [`Source::UiDataPart`] (in [`ui`]).
//!
//! It deliberately does NOT decide which bytes are worth parsing (the cheap pre-filter lives with
//! the framing in `proxy::sse`), and does not interpret ids beyond validation: trace ids are
//! opaque (`tr-<hex>`, `trace:/<catalog.schema>/<hex>`, whatever a future server mints).
//!
//! Parsing uses small targeted structs that borrow from the input: everything else in the JSON
//! (a Responses item, a whole serialized trace under `databricks_output.trace.data`) is skipped
//! without being materialised. A field of an unexpected JSON type is treated as absent rather
//! than failing the whole document, so one odd field cannot hide a good id next to it.

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use http::HeaderMap;
use http::header::HeaderName;
use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// The scalar `visit_*` methods of a visitor that maps every scalar to `$v` (strings are handled
/// by each visitor itself).
macro_rules! scalars_are {
    ($v:expr) => {
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
            Ok($v)
        }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
            Ok($v)
        }
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
            Ok($v)
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
            Ok($v)
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok($v)
        }
    };
}

// Spelt out so that the fuzz crate, which compiles this file on its own, finds it too.
#[path = "trace/ui.rs"]
pub mod ui;

/// Where an id came from (metric label `source`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    /// The MLflow agent server's `data: {"trace_id": "tr-…"}` event.
    AgentEvent,
    /// `databricks_output.trace.info.trace_id` in an event or a JSON body.
    DatabricksOutput,
    /// `metadata.trace_id` in a non-streaming JSON body.
    ResponseMetadata,
    /// Seed 001's `{"type": "trace.client_request_id", "client_request_id": …}` event.
    ClientRequestIdEvent,
    /// A configured response header.
    Header,
    /// A data part of an AI SDK UI message stream (`data-traceId`).
    UiDataPart,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::AgentEvent => "agent_event",
            Self::DatabricksOutput => "databricks_output",
            Self::ResponseMetadata => "response_metadata",
            Self::ClientRequestIdEvent => "client_request_id_event",
            Self::Header => "header",
            Self::UiDataPart => "ui_data_part",
        }
    }
}

/// A validated id and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub id: String,
    pub source: Source,
}

/// The longest id accepted, in bytes (= characters for the ASCII ids MLflow mints). Bounds what
/// a misbehaving agent can make the proxy store per message.
pub const MAX_ID_LEN: usize = 256;

/// What an agent reports when it could not reach its tracking server (sample 106): not a trace.
pub const NO_OP_TRACE_ID: &str = "MLFLOW_NO_OP_SPAN_TRACE_ID";

/// Validates an opaque trace id: non-empty, at most [`MAX_ID_LEN`] bytes, no control
/// characters, not [`NO_OP_TRACE_ID`].
pub fn valid_trace_id(id: &str) -> bool {
    valid_client_request_id(id) && id != NO_OP_TRACE_ID
}

/// Validates a client request id: non-empty, at most [`MAX_ID_LEN`] bytes, no control
/// characters.
pub fn valid_client_request_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_ID_LEN && !id.chars().any(char::is_control)
}

/// Whether `s` is acceptable as a message or chat id: 1–128 characters of letters, digits and
/// `-_.:` (what the feedback API accepts; UUIDs and the AI SDK's ids qualify).
pub fn valid_message_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

/// Result of looking at the configured trace-id response headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderId {
    Found(Found),
    /// A header was present but its value is not a valid trace id.
    Rejected,
    Absent,
}

/// The first valid trace id in the configured response headers (in the configured order).
pub fn from_headers(headers: &HeaderMap, names: &[HeaderName]) -> HeaderId {
    let mut rejected = false;
    for name in names {
        // Every value of a repeated header counts, in order.
        for v in headers.get_all(name) {
            match v.to_str() {
                Ok(s) if valid_trace_id(s.trim()) => {
                    return HeaderId::Found(Found {
                        id: s.trim().to_owned(),
                        source: Source::Header,
                    });
                }
                _ => rejected = true,
            }
        }
    }
    if rejected {
        HeaderId::Rejected
    } else {
        HeaderId::Absent
    }
}

/// One id looked for in a payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Candidate {
    /// The payload does not carry this id.
    None,
    /// A valid id.
    Valid(Found),
    /// The payload carries the id, but not a valid one (wrong type, too long, control
    /// characters, the no-op id).
    Rejected(Source),
}

/// What one payload carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extracted {
    pub trace_id: Candidate,
    pub client_request_id: Candidate,
}

impl Extracted {
    const NONE: Self = Self {
        trace_id: Candidate::None,
        client_request_id: Candidate::None,
    };
}

/// Extracts ids from the data of one SSE event. Data that is not a JSON object (`[DONE]`, text,
/// malformed JSON) carries nothing.
pub fn from_event(data: &[u8]) -> Extracted {
    let Ok(ev) = serde_json::from_slice::<Shape<'_>>(data) else {
        return Extracted::NONE;
    };
    let mut out = Extracted::NONE;
    // `databricks_output` is the more specific shape; an agent event has no `type` at all.
    out.trace_id = trace_candidate(ev.databricks_output_trace_id(), Source::DatabricksOutput);
    if out.trace_id == Candidate::None && ev.kind.is_none() {
        out.trace_id = trace_candidate(ev.trace_id.as_ref(), Source::AgentEvent);
    }
    if ev.kind.as_ref().and_then(Str::as_str) == Some("trace.client_request_id") {
        out.client_request_id = match ev.client_request_id.as_ref() {
            None => Candidate::None,
            Some(Str::Text(s)) if valid_client_request_id(s) => Candidate::Valid(Found {
                id: s.clone().into_owned(),
                source: Source::ClientRequestIdEvent,
            }),
            Some(_) => Candidate::Rejected(Source::ClientRequestIdEvent),
        };
    }
    out
}

/// Extracts the trace id from a whole non-streaming JSON body: `databricks_output.trace.info.
/// trace_id`, else `metadata.trace_id`.
pub fn from_json_body(body: &[u8]) -> Candidate {
    // serde_json does not skip a byte-order mark; some servers send one.
    let body = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body);
    let Ok(doc) = serde_json::from_slice::<Shape<'_>>(body) else {
        return Candidate::None;
    };
    match trace_candidate(doc.databricks_output_trace_id(), Source::DatabricksOutput) {
        Candidate::None => {
            let meta = doc.metadata.as_ref().and_then(|m| m.0.as_ref());
            trace_candidate(
                meta.and_then(|m| m.trace_id.as_ref()),
                Source::ResponseMetadata,
            )
        }
        c => c,
    }
}

fn trace_candidate(v: Option<&Str<'_>>, source: Source) -> Candidate {
    match v {
        None => Candidate::None,
        Some(Str::Text(s)) if valid_trace_id(s) => Candidate::Valid(Found {
            id: s.clone().into_owned(),
            source,
        }),
        Some(_) => Candidate::Rejected(source),
    }
}

/// The fields of an event or body that can carry an id; serde skips every other field.
#[derive(serde::Deserialize)]
struct Shape<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Option<Str<'a>>,
    #[serde(borrow, default)]
    trace_id: Option<Str<'a>>,
    #[serde(borrow, default)]
    client_request_id: Option<Str<'a>>,
    #[serde(borrow, default)]
    databricks_output: Option<Loose<DatabricksOutput<'a>>>,
    #[serde(borrow, default)]
    metadata: Option<Loose<Metadata<'a>>>,
}

impl<'a> Shape<'a> {
    fn databricks_output_trace_id(&self) -> Option<&Str<'a>> {
        let out = self.databricks_output.as_ref()?.0.as_ref()?;
        let trace = out.trace.as_ref()?.0.as_ref()?;
        let info = trace.info.as_ref()?.0.as_ref()?;
        info.trace_id.as_ref()
    }
}

#[derive(serde::Deserialize)]
struct DatabricksOutput<'a> {
    #[serde(borrow, default)]
    trace: Option<Loose<TraceObj<'a>>>,
}

#[derive(serde::Deserialize)]
struct TraceObj<'a> {
    #[serde(borrow, default)]
    info: Option<Loose<Info<'a>>>,
}

#[derive(serde::Deserialize)]
struct Info<'a> {
    #[serde(borrow, default)]
    trace_id: Option<Str<'a>>,
}

#[derive(serde::Deserialize)]
struct Metadata<'a> {
    #[serde(borrow, default)]
    trace_id: Option<Str<'a>>,
}

/// A JSON value that is a string (borrowed unless it had escapes) or something else. A `null`
/// never gets here: `Option` turns it into `None`.
enum Str<'a> {
    Text(Cow<'a, str>),
    Other,
}

impl Str<'_> {
    fn as_str(&self) -> Option<&str> {
        match self {
            Str::Text(s) => Some(s),
            Str::Other => None,
        }
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Str<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Str<'a>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Str::Text(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Str::Text(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Str::Text(Cow::Owned(v)))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                drain_map(map).map(|()| Str::Other)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
                drain_seq(seq).map(|()| Str::Other)
            }
            scalars_are!(Str::Other);
        }
        d.deserialize_any(V(PhantomData))
    }
}

/// An object of shape `T`, or `None` when the JSON value is of another type.
struct Loose<T>(Option<T>);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Loose<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = Loose<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                T::deserialize(de::value::MapAccessDeserializer::new(map)).map(|t| Loose(Some(t)))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
                drain_seq(seq).map(|()| Loose(None))
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
                Ok(Loose(None))
            }
            scalars_are!(Loose(None));
        }
        d.deserialize_any(V(PhantomData))
    }
}

fn drain_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<(), A::Error> {
    while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
    Ok(())
}

fn drain_seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<(), A::Error> {
    while seq.next_element::<IgnoredAny>()?.is_some() {}
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn valid(id: &str, source: Source) -> Candidate {
        Candidate::Valid(Found {
            id: id.to_owned(),
            source,
        })
    }

    #[test]
    fn agent_event_without_type() {
        let e = from_event(br#"{"trace_id": "tr-eaf19740d012e3a3e64accc2bf6d17bc"}"#);
        assert_eq!(
            e.trace_id,
            valid("tr-eaf19740d012e3a3e64accc2bf6d17bc", Source::AgentEvent)
        );
        assert_eq!(e.client_request_id, Candidate::None);
    }

    #[test]
    fn top_level_trace_id_on_a_typed_event_is_not_the_agent_event() {
        let e = from_event(br#"{"type": "tool.result", "trace_id": "tr-other"}"#);
        assert_eq!(e.trace_id, Candidate::None);
    }

    #[test]
    fn databricks_output_chat_completions_chunk() {
        let e = from_event(
            br#"{"id":"chatcmpl-1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{},"finish_reason":"stop"}],
               "databricks_output":{"databricks_request_id":"r-1","trace":{"info":{"trace_id":"tr-0123456789abcdef0123456789abcdef","state":"OK"},"data":{"spans":[{"trace_id":"x"}]}}}}"#,
        );
        assert_eq!(
            e.trace_id,
            valid(
                "tr-0123456789abcdef0123456789abcdef",
                Source::DatabricksOutput
            )
        );
    }

    #[test]
    fn databricks_output_responses_item_done_with_unity_catalog_id() {
        let e = from_event(
            br#"{"type":"response.output_item.done","item":{"type":"message","id":"m","content":[{"type":"output_text","text":"hi \"trace_id\""}]},
               "databricks_output":{"trace":{"info":{"trace_id":"trace:/main.agents/0123abcd"}}}}"#,
        );
        assert_eq!(
            e.trace_id,
            valid("trace:/main.agents/0123abcd", Source::DatabricksOutput)
        );
    }

    #[test]
    fn seed_001_client_request_id_event() {
        let e = from_event(
            br#"{"type": "trace.client_request_id", "client_request_id": "req-abc123"}"#,
        );
        assert_eq!(e.trace_id, Candidate::None);
        assert_eq!(
            e.client_request_id,
            valid("req-abc123", Source::ClientRequestIdEvent)
        );
        // Another event type naming a client request id is not the seed-001 event.
        let e = from_event(br#"{"type": "x", "client_request_id": "req-abc123"}"#);
        assert_eq!(e.client_request_id, Candidate::None);
        let e = from_event(br#"{"type": "trace.client_request_id", "client_request_id": ""}"#);
        assert_eq!(
            e.client_request_id,
            Candidate::Rejected(Source::ClientRequestIdEvent)
        );
    }

    #[test]
    fn invalid_trace_ids_are_rejected() {
        let long = format!(r#"{{"trace_id": "tr-{}"}}"#, "a".repeat(300));
        for data in [
            br#"{"trace_id": "MLFLOW_NO_OP_SPAN_TRACE_ID"}"#.as_slice(),
            br#"{"trace_id": "tr-\u0000abc"}"#,
            br#"{"trace_id": "tr-a\nb"}"#,
            br#"{"trace_id": ""}"#,
            br#"{"trace_id": 42}"#,
            br#"{"trace_id": ["tr-1"]}"#,
            long.as_bytes(),
        ] {
            let e = from_event(data);
            assert_eq!(
                e.trace_id,
                Candidate::Rejected(Source::AgentEvent),
                "{}",
                String::from_utf8_lossy(data)
            );
        }
        let e = from_event(br#"{"trace_id": null}"#);
        assert_eq!(e.trace_id, Candidate::None);
    }

    #[test]
    fn escaped_ids_are_unescaped() {
        let e = from_event(br#"{"trace_id": "tr-\u0061bc"}"#);
        assert_eq!(e.trace_id, valid("tr-abc", Source::AgentEvent));
    }

    #[test]
    fn odd_types_elsewhere_do_not_hide_an_id() {
        let e = from_event(br#"{"metadata": 3, "databricks_output": "x", "trace_id": "tr-1"}"#);
        assert_eq!(e.trace_id, valid("tr-1", Source::AgentEvent));
        let e = from_event(br#"{"databricks_output": {"trace": [1, {"info": 2}]}}"#);
        assert_eq!(e.trace_id, Candidate::None);
        let e =
            from_event(br#"{"databricks_output": {"trace": {"info": {"trace_id": {"a": 1}}}}}"#);
        assert_eq!(e.trace_id, Candidate::Rejected(Source::DatabricksOutput));
    }

    #[test]
    fn non_json_data_carries_nothing() {
        for data in [
            b"[DONE]".as_slice(),
            b"",
            b"trace_id",
            b"{\"trace_id\": ",
            b"\xff\xfe",
        ] {
            assert_eq!(from_event(data), Extracted::NONE);
        }
    }

    #[test]
    fn json_body_metadata_and_databricks_output() {
        let body = br#"{"object":"response","output":[],"custom_outputs":{"echoed_chars":19},"metadata":{"trace_id":"tr-200fee060856a08ecceb11f29f7d0c74"}}"#;
        assert_eq!(
            from_json_body(body),
            valid(
                "tr-200fee060856a08ecceb11f29f7d0c74",
                Source::ResponseMetadata
            )
        );
        let body = br#"{"choices":[],"databricks_output":{"trace":{"info":{"trace_id":"tr-1"}}},"metadata":{"trace_id":"tr-2"}}"#;
        assert_eq!(
            from_json_body(body),
            valid("tr-1", Source::DatabricksOutput)
        );
        let body = b"\xEF\xBB\xBF{\"metadata\":{\"trace_id\":\"MLFLOW_NO_OP_SPAN_TRACE_ID\"}}";
        assert_eq!(
            from_json_body(body),
            Candidate::Rejected(Source::ResponseMetadata)
        );
        // A top-level trace_id is the streaming event's shape, not a body's.
        assert_eq!(from_json_body(br#"{"trace_id":"tr-1"}"#), Candidate::None);
    }

    #[test]
    fn headers_in_configured_order() {
        let a = HeaderName::from_static("x-mlflow-trace-id");
        let b = HeaderName::from_static("x-trace-id");
        let mut h = HeaderMap::new();
        assert_eq!(from_headers(&h, &[a.clone(), b.clone()]), HeaderId::Absent);
        h.insert(&b, HeaderValue::from_static(" tr-b "));
        h.insert(&a, HeaderValue::from_static("MLFLOW_NO_OP_SPAN_TRACE_ID"));
        assert_eq!(
            from_headers(&h, &[a.clone(), b.clone()]),
            HeaderId::Found(Found {
                id: "tr-b".to_owned(),
                source: Source::Header
            })
        );
        assert_eq!(
            from_headers(&h, std::slice::from_ref(&a)),
            HeaderId::Rejected
        );
        h.insert(&a, HeaderValue::from_bytes(b"tr-\xff").unwrap());
        assert_eq!(from_headers(&h, &[a]), HeaderId::Rejected);
    }

    #[test]
    fn validation_limits() {
        assert!(valid_trace_id(&"a".repeat(MAX_ID_LEN)));
        assert!(!valid_trace_id(&"a".repeat(MAX_ID_LEN + 1)));
        assert!(!valid_trace_id("tr-\u{7f}"));
        assert!(!valid_trace_id("tr-\u{85}"));
        assert!(valid_client_request_id(NO_OP_TRACE_ID));
        assert!(!valid_client_request_id(""));
    }
}
