//! The AI SDK UI message stream's shapes (the chat app template's `/api/chat`): the `start`
//! part's message id and the trace id of its data parts, parsed as the parent module parses
//! agent events (small borrowing structs, everything else skipped).

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::{Candidate, Source, Str, drain_seq, trace_candidate, valid_message_id};

/// What one part (SSE event data) of an AI SDK UI message stream carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UiExtracted {
    /// The assistant message's id, from the `start` part (valid ids only).
    pub message_id: Option<String>,
    pub trace_id: Candidate,
    /// A `data-traceId` part without a trace id (`"data": null`): the endpoint emits none.
    pub no_trace: bool,
}

/// The type of the UI stream part that carries the trace id.
pub const UI_TRACE_PART: &str = "data-traceId";

/// Extracts what an AI SDK UI message stream part carries: `{"type": "start", "messageId": …}`
/// gives the message id; `{"type": "data-traceId", "data": "tr-…" | null}` the trace id (or
/// that there is none); another `data-*` part whose `data` is an object with a string
/// `traceId` a trace id too. Anything else carries nothing.
pub fn from_ui_part(data: &[u8]) -> UiExtracted {
    let mut out = UiExtracted {
        message_id: None,
        trace_id: Candidate::None,
        no_trace: false,
    };
    let Ok(part) = serde_json::from_slice::<UiPart<'_>>(data) else {
        return out;
    };
    let Some(kind) = part.kind.as_ref().and_then(Str::as_str) else {
        return out;
    };
    if kind == "start" {
        out.message_id = match &part.message_id {
            Some(Str::Text(id)) if valid_message_id(id) => Some(id.clone().into_owned()),
            _ => None,
        };
    } else if kind == UI_TRACE_PART {
        match &part.data {
            None => out.no_trace = true,
            Some(UiData::Text(s)) => {
                out.trace_id = trace_candidate(
                    Some(&Str::Text(Cow::Borrowed(s.as_ref()))),
                    Source::UiDataPart,
                );
            }
            Some(_) => out.trace_id = Candidate::Rejected(Source::UiDataPart),
        }
    } else if kind.starts_with("data-") {
        if let Some(UiData::Object(Some(id))) = &part.data {
            out.trace_id = trace_candidate(Some(id), Source::UiDataPart);
        }
    }
    out
}

/// The fields of a UI message stream part that can carry an id.
#[derive(serde::Deserialize)]
struct UiPart<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Option<Str<'a>>,
    #[serde(rename = "messageId", borrow, default)]
    message_id: Option<Str<'a>>,
    #[serde(borrow, default)]
    data: Option<UiData<'a>>,
}

/// A data part's `data`: a string, an object (with the `traceId` it may hold), or anything
/// else. A `null` never gets here: `Option` turns it into `None`.
enum UiData<'a> {
    Text(Cow<'a, str>),
    Object(Option<Str<'a>>),
    Other,
}

impl<'de: 'a, 'a> Deserialize<'de> for UiData<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = UiData<'a>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(UiData::Text(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(UiData::Text(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(UiData::Text(Cow::Owned(v)))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut trace_id = None;
                while let Some(key) = map.next_key::<Str<'a>>()? {
                    if trace_id.is_none() && key.as_str() == Some("traceId") {
                        trace_id = Some(map.next_value::<Str<'a>>()?);
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(UiData::Object(trace_id))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
                drain_seq(seq).map(|()| UiData::Other)
            }
            scalars_are!(UiData::Other);
        }
        d.deserialize_any(V(PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::super::Found;
    use super::*;

    fn valid(id: &str, source: Source) -> Candidate {
        Candidate::Valid(Found {
            id: id.to_owned(),
            source,
        })
    }

    #[test]
    fn ui_message_stream_parts() {
        let e =
            from_ui_part(br#"{"type":"start","messageId":"01796c7a-39c4-4c87-b4c6-258d64389c80"}"#);
        assert_eq!(
            e.message_id.as_deref(),
            Some("01796c7a-39c4-4c87-b4c6-258d64389c80")
        );
        assert_eq!(e.trace_id, Candidate::None);
        let e = from_ui_part(
            br#"{"type":"data-traceId","data":"tr-22ed422da21c134a27709b986fb5e95a"}"#,
        );
        assert_eq!(
            e.trace_id,
            valid("tr-22ed422da21c134a27709b986fb5e95a", Source::UiDataPart)
        );
        assert_eq!(e.message_id, None);
        let e = from_ui_part(br#"{"type":"data-traceId","data":null}"#);
        assert!(e.no_trace);
        assert_eq!(e.trace_id, Candidate::None);
        for bad in [
            br#"{"type":"data-traceId","data":"MLFLOW_NO_OP_SPAN_TRACE_ID"}"#.as_slice(),
            br#"{"type":"data-traceId","data":42}"#,
            br#"{"type":"data-traceId","data":{"x":1}}"#,
        ] {
            assert_eq!(
                from_ui_part(bad).trace_id,
                Candidate::Rejected(Source::UiDataPart),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        // Another data part: only an object's traceId counts; a title is just text.
        let e = from_ui_part(br#"{"type":"data-trace","data":{"spans":[1],"traceId":"tr-9"}}"#);
        assert_eq!(e.trace_id, valid("tr-9", Source::UiDataPart));
        let e = from_ui_part(br#"{"type":"data-title","data":"tr-not-a-trace"}"#);
        assert_eq!(e.trace_id, Candidate::None);
        // A messageId elsewhere, or an unusable one, is not the answer's id.
        let e = from_ui_part(br#"{"type":"finish","messageId":"m-1"}"#);
        assert_eq!(e.message_id, None);
        let e = from_ui_part(br#"{"type":"start","messageId":"has space"}"#);
        assert_eq!(e.message_id, None);
        // Agent shapes mean nothing in a UI stream, and non-JSON carries nothing.
        let e = from_ui_part(br#"{"trace_id":"tr-1"}"#);
        assert_eq!(e.trace_id, Candidate::None);
        assert_eq!(from_ui_part(b"[DONE]").message_id, None);
    }
}
