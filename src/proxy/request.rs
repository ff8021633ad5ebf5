//! The request side of an agent exchange: which message and chat it is about, and the optional
//! JSON body rewrites (CONTRACT §3, §3.2).
//!
//! The body is read only when needed and always under a cap: to rewrite it (route options), or
//! to look for `messageId` / `chatId` / `context.conversation_id` when the client did not send
//! them as headers and the body is small and of known length. Anything that is not a JSON
//! object is forwarded unchanged: the agent, not the proxy, decides what a bad request is.

use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::config::AgentRoute;

/// Ids from headers or body.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ClientIds {
    pub message_id: Option<String>,
    pub chat_id: Option<String>,
}

/// Whether `s` is acceptable as a client-supplied message or chat id: 1–128 characters of
/// letters, digits and `-_.:`. Anything else is ignored (and a message id is minted instead).
pub fn valid_id(s: &str) -> bool {
    super::trace::valid_message_id(s)
}

/// A new message id (UUID v7: time-ordered, unguessable enough that nobody can pre-claim
/// another user's next message).
pub fn mint_message_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// Namespace of the client request ids (a fixed, random UUID).
const CLIENT_REQUEST_ID_NAMESPACE: uuid::Uuid =
    uuid::Uuid::from_u128(0x8e2d_41b7_c39a_4c0e_9f15_6a7b_0d2e_c4a9);

/// The client request id of `user`'s answer `message_id`, in the `req-…` shape of seed 001.
///
/// Derived (UUID v5) from the message id AND the user rather than random, so that the proxy can
/// find the answer's trace again when its link was lost (a store outage): a vote by `user` on
/// `message_id` searches for exactly this id, and one user's vote can never compute the id of
/// another user's answer. A client cannot set it either: the proxy replaces any client-sent
/// `x-client-request-id` and `custom_inputs.client_request_id` on routes that send it.
pub fn client_request_id_for(message_id: &str, user: &str) -> String {
    let name = format!("{message_id}\u{0}{user}");
    format!(
        "req-{}",
        uuid::Uuid::new_v5(&CLIENT_REQUEST_ID_NAMESPACE, name.as_bytes()).simple()
    )
}

#[derive(Deserialize, Default)]
struct Peek {
    #[serde(rename = "messageId", default)]
    message_id: Option<Value>,
    #[serde(rename = "chatId", default)]
    chat_id: Option<Value>,
    #[serde(default)]
    context: Option<PeekContext>,
}

#[derive(Deserialize, Default)]
struct PeekContext {
    #[serde(default)]
    conversation_id: Option<Value>,
}

fn id_of(v: Option<Value>) -> Option<String> {
    match v {
        Some(Value::String(s)) if valid_id(&s) => Some(s),
        _ => None,
    }
}

/// Reads `messageId`, `chatId` and `context.conversation_id` from a JSON body without building
/// a full `Value` (unknown fields are skipped, not allocated).
pub fn peek_ids(body: &[u8]) -> ClientIds {
    let peek: Peek = serde_json::from_slice(body).unwrap_or_default();
    let chat = id_of(peek.chat_id).or_else(|| id_of(peek.context.and_then(|c| c.conversation_id)));
    ClientIds {
        message_id: id_of(peek.message_id),
        chat_id: chat,
    }
}

#[derive(Deserialize, Default)]
struct ChatBody {
    #[serde(default)]
    id: Option<Value>,
}

/// The chat id of a chat app template's `/api/chat` body (its top-level `id`; the user
/// message's own `message.id` is not it).
pub fn ai_sdk_chat_id(body: &[u8]) -> Option<String> {
    let body: ChatBody = serde_json::from_slice(body).unwrap_or_default();
    id_of(body.id)
}

/// What to add to a JSON request body.
#[derive(Debug, Clone, Copy)]
pub struct Rewrite<'a> {
    pub route: &'a AgentRoute,
    pub chat_id: Option<&'a str>,
    pub user: &'a str,
    pub client_request_id: Option<&'a str>,
    /// Replaces the body's `messageId` (when it has one) with this id: the one the proxy
    /// settled on, when it is not the client's.
    pub message_id: Option<&'a str>,
}

/// Applies the route's body options. Returns `None` when the body is not a JSON object (it is
/// then forwarded unchanged).
pub fn rewrite(body: &[u8], rw: Rewrite<'_>) -> Option<Bytes> {
    let Ok(Value::Object(mut obj)) = serde_json::from_slice::<Value>(body) else {
        return None;
    };
    if rw.route.return_trace {
        let opts = object_entry(&mut obj, "databricks_options");
        opts.insert("return_trace".into(), Value::Bool(true));
    }
    if rw.route.context {
        let ctx = object_entry(&mut obj, "context");
        if let Some(chat) = rw.chat_id {
            ctx.entry("conversation_id")
                .or_insert_with(|| Value::String(chat.to_owned()));
        }
        // Always ours: a client must not attribute its request to someone else.
        ctx.insert("user_id".into(), Value::String(rw.user.to_owned()));
    }
    if let Some(m) = rw.message_id {
        if let Some(slot) = obj.get_mut("messageId") {
            *slot = Value::String(m.to_owned());
        }
    }
    if let Some(crid) = rw.client_request_id {
        let ci = object_entry(&mut obj, "custom_inputs");
        ci.insert("client_request_id".into(), Value::String(crid.to_owned()));
    }
    serde_json::to_vec(&Value::Object(obj))
        .ok()
        .map(Bytes::from)
}

/// `obj[key]` as an object, replacing a non-object value.
fn object_entry<'m>(obj: &'m mut Map<String, Value>, key: &str) -> &'m mut Map<String, Value> {
    let slot = obj
        .entry(key.to_owned())
        .or_insert_with(|| Value::Object(Map::new()));
    if !slot.is_object() {
        *slot = Value::Object(Map::new());
    }
    match slot {
        Value::Object(m) => m,
        // Just made an object above.
        _ => unreachable!("slot was replaced by an object"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn route(return_trace: bool, context: bool, crid: bool) -> AgentRoute {
        AgentRoute {
            path: "/invocations".into(),
            upstream_path: None,
            kind: crate::config::RouteKind::Agent,
            return_trace,
            context,
            client_request_id: crid,
            events: false,
            methods: vec![http::Method::POST],
        }
    }

    #[test]
    fn peeks_ids_from_body_shapes() {
        let ids = peek_ids(br#"{"input": [], "messageId": "m-1", "chatId": "c-1"}"#);
        assert_eq!(ids.message_id.as_deref(), Some("m-1"));
        assert_eq!(ids.chat_id.as_deref(), Some("c-1"));
        let ids = peek_ids(br#"{"context": {"conversation_id": "conv-9"}}"#);
        assert_eq!(ids.chat_id.as_deref(), Some("conv-9"));
        assert_eq!(peek_ids(b"not json"), ClientIds::default());
        let ids = peek_ids(br#"{"messageId": "has space", "chatId": 5}"#);
        assert_eq!(ids, ClientIds::default());
    }

    #[test]
    fn the_templates_chat_id_is_the_bodys_id() {
        let body = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/samples/110_ai_sdk_app_chat.request.json"
        ))
        .unwrap();
        assert_eq!(
            ai_sdk_chat_id(&body).as_deref(),
            Some("f2cad496-9638-445f-9136-83d8418c55c7")
        );
        assert_eq!(ai_sdk_chat_id(br#"{"message": {"id": "m"}}"#), None);
        assert_eq!(ai_sdk_chat_id(br#"{"id": "a b"}"#), None);
        assert_eq!(ai_sdk_chat_id(b"nope"), None);
    }

    #[test]
    fn rewrites_add_options_and_keep_client_fields() {
        let r = route(true, true, true);
        let out = rewrite(
            br#"{"input": [{"role": "user", "content": "hi"}], "context": {"conversation_id": "theirs", "user_id": "spoof"}, "custom_inputs": {"k": 1}}"#,
            Rewrite {
                route: &r,
                chat_id: Some("ours"),
                user: "alice@example.com",
                client_request_id: Some("req-1"),
                message_id: None,
            },
        )
        .unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["databricks_options"], json!({"return_trace": true}));
        assert_eq!(v["context"]["conversation_id"], "theirs");
        assert_eq!(v["context"]["user_id"], "alice@example.com");
        assert_eq!(
            v["custom_inputs"],
            json!({"k": 1, "client_request_id": "req-1"})
        );
        assert_eq!(v["input"][0]["content"], "hi");
    }

    #[test]
    fn a_settled_message_id_replaces_the_bodys_only_where_it_was() {
        let r = route(false, false, false);
        let rw = |m| Rewrite {
            route: &r,
            chat_id: None,
            user: "u",
            client_request_id: None,
            message_id: m,
        };
        let out = rewrite(br#"{"messageId": "theirs", "input": []}"#, rw(Some("ours"))).unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v, json!({"messageId": "ours", "input": []}));
        let out = rewrite(br#"{"input": []}"#, rw(Some("ours"))).unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v, json!({"input": []}));
    }

    #[test]
    fn non_objects_are_left_alone() {
        let r = route(true, false, false);
        let rw = Rewrite {
            route: &r,
            chat_id: None,
            user: "u",
            client_request_id: None,
            message_id: None,
        };
        assert!(rewrite(b"[1,2]", rw).is_none());
        assert!(rewrite(b"{oops", rw).is_none());
    }

    #[test]
    fn id_validation() {
        assert!(valid_id("0192f0c4-7e4b-7cc2-9a4f-1b2c3d4e5f60"));
        assert!(valid_id("msg_1.2:3"));
        assert!(!valid_id(""));
        assert!(!valid_id("a b"));
        assert!(!valid_id(&"x".repeat(129)));
        let crid = client_request_id_for("m-1", "alice@example.com");
        assert!(crid.starts_with("req-") && crid.len() == 36, "{crid}");
        assert!(valid_id(&crid));
        assert_eq!(crid, client_request_id_for("m-1", "alice@example.com"));
        assert_ne!(crid, client_request_id_for("m-1", "bob@example.com"));
        assert_ne!(crid, client_request_id_for("m-2", "alice@example.com"));
        // The separator keeps (message, user) pairs apart.
        assert_ne!(
            client_request_id_for("m-1a", "b"),
            client_request_id_for("m-1", "ab")
        );
    }
}
