//! Parsing and validating `POST /api/feedback` bodies (CONTRACT §4), with errors that name the
//! field and say what was expected.
//!
//! Two forms: the proxy's own (`chatId`, `messageId`, `isUpvoted` or `value`, …) and the chat
//! app template's (`messageId`, `feedbackType: "thumbs_up" | "thumbs_down"`, which is a
//! `true`/`false` vote; the chat is the one the message was answered in, `chatId` optional).
//!
//! Two extensions: `expectedResponse`, the user's correction (a string sets it, `null` or a blank
//! string clears it, absent leaves it as it is; only on the default name's vote), and
//! `"scope": "chat"`, a rating of the whole chat (`chatId`, no `messageId`, no correction).
//!
//! Unknown fields are ignored (clients may send more than we need); known fields must have the
//! right type. A key given twice in one object is refused (`DUPLICATE_KEY`): serde_json keeps
//! the last silently, and another reader of the same body may keep the first. Nothing here
//! touches the store.

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

use super::label;
use crate::config::{FeedbackConfig, Kind, ValueKinds};
use crate::error::Error;
use crate::proxy::request::valid_id;
use crate::store::{CorrectionChange, FeedbackValue};

/// Longest string value accepted.
const MAX_STRING_VALUE: usize = 1024;

/// A validated vote request.
#[derive(Debug, Clone, PartialEq)]
pub struct VoteRequest {
    /// Always given in the proxy's form; in the template's form the message's own chat is used
    /// when absent.
    pub chat_id: Option<String>,
    /// The chat app template's form (`feedbackType`): answered in its shape.
    pub template: bool,
    /// `None` for a chat rating (`"scope": "chat"`).
    pub message_id: Option<String>,
    pub name: String,
    pub value: FeedbackValue,
    pub comment: Option<String>,
    /// What the vote does to the user's correction of the message (`expectedResponse`).
    pub correction: CorrectionChange,
}

fn invalid(field: &str, expected: &str) -> Error {
    Error::bad_request("INVALID_FIELD", format!("{field}: expected {expected}"))
}

const ID_EXPECTED: &str = "a string of 1-128 letters, digits, '-', '_', '.' or ':'";

/// Validates an id from a path segment or a body field.
pub fn id(field: &str, raw: &str) -> Result<String, Error> {
    if valid_id(raw) {
        Ok(raw.to_owned())
    } else {
        Err(invalid(field, ID_EXPECTED))
    }
}

fn required_id(obj: &Map<String, Value>, field: &str) -> Result<String, Error> {
    match obj.get(field) {
        None | Some(Value::Null) => Err(Error::bad_request(
            "MISSING_FIELD",
            format!("{field}: required ({ID_EXPECTED})"),
        )),
        Some(Value::String(s)) => id(field, s),
        Some(_) => Err(invalid(field, ID_EXPECTED)),
    }
}

/// A JSON value parsed like `serde_json::Value`, except that an object with a key given twice is
/// an error. serde_json has no option for this; a visitor that builds the `Value` itself checks
/// each key as it inserts it, so there is no second pass and no extra allocation.
struct Strict(Value);

/// Prefix of the error a [`Strict`] parse fails with on a duplicate key.
const DUPLICATE: &str = "duplicate key ";

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        Strict::deserialize(d).map(|s| s.0)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
        while let Some(Strict(v)) = seq.next_element()? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if out.contains_key(&key) {
                return Err(de::Error::custom(format_args!(
                    "{DUPLICATE}\"{}\"",
                    crate::text::echo(&key)
                )));
            }
            let Strict(v) = map.next_value()?;
            out.insert(key, v);
        }
        Ok(Value::Object(out))
    }
}

/// Parses JSON, refusing duplicate keys at any depth.
fn parse_strict(body: &[u8]) -> Result<Value, Error> {
    match serde_json::from_slice::<Strict>(body) {
        Ok(Strict(v)) => Ok(v),
        // A data error can only be ours (a `Value` accepts any well-formed JSON).
        Err(e) if e.is_data() => {
            let msg = e.to_string();
            let what = msg.strip_prefix(DUPLICATE).unwrap_or(&msg);
            // serde_json appends " at line L column C"; the key is what matters.
            let key = what.rsplit_once(" at line ").map_or(what, |(k, _)| k);
            Err(Error::bad_request(
                "DUPLICATE_KEY",
                format!("the body gives the key {key} more than once"),
            ))
        }
        Err(e) => Err(Error::bad_request(
            "INVALID_JSON",
            format!("the body is not valid JSON: {e}"),
        )),
    }
}

/// Parses and validates a vote body.
pub fn parse_vote(body: &[u8], config: &FeedbackConfig) -> Result<VoteRequest, Error> {
    let value = parse_strict(body)?;
    let Value::Object(obj) = value else {
        return Err(Error::bad_request(
            "INVALID_JSON",
            "the body must be a JSON object",
        ));
    };
    vote_of(&obj, config)
}

/// Most votes one `POST /api/feedback/batch` may carry.
pub const MAX_BATCH_VOTES: usize = 100;

/// Parses a batch body, `{"votes": [vote, …]}` (1 to [`MAX_BATCH_VOTES`] items), and validates
/// each vote on its own: the outer `Err` is a body that is no batch at all, an inner one the
/// error that item alone would get from `POST /api/feedback`.
pub fn parse_batch(
    body: &[u8],
    config: &FeedbackConfig,
) -> Result<Vec<Result<VoteRequest, Error>>, Error> {
    let shape = || {
        Error::bad_request(
            "INVALID_JSON",
            format!(
                "the body must be a JSON object {{\"votes\": [...]}} with 1 to {MAX_BATCH_VOTES} votes"
            ),
        )
    };
    let Value::Object(mut obj) = parse_strict(body)? else {
        return Err(shape());
    };
    let Some(Value::Array(items)) = obj.remove("votes") else {
        return Err(shape());
    };
    if items.len() > MAX_BATCH_VOTES {
        return Err(Error::bad_request(
            "TOO_MANY_VOTES",
            format!(
                "votes: at most {MAX_BATCH_VOTES} votes in one batch (got {})",
                items.len()
            ),
        ));
    }
    if items.is_empty() {
        return Err(shape());
    }
    Ok(items
        .iter()
        .map(|item| match item {
            Value::Object(o) => vote_of(o, config),
            _ => Err(Error::bad_request(
                "INVALID_JSON",
                "each vote must be a JSON object",
            )),
        })
        .collect())
}

/// Validates one vote object.
fn vote_of(obj: &Map<String, Value>, config: &FeedbackConfig) -> Result<VoteRequest, Error> {
    let template = obj.contains_key("feedbackType");
    let chat_scope = match obj.get("scope") {
        None | Some(Value::Null) => false,
        Some(Value::String(s)) if s == "message" => false,
        Some(Value::String(s)) if s == "chat" => true,
        Some(_) => return Err(invalid("scope", "\"message\" or \"chat\"")),
    };
    let chat_id = match (template && !chat_scope, obj.get("chatId")) {
        (true, None | Some(Value::Null)) => None,
        _ => Some(required_id(obj, "chatId")?),
    };
    let message_id = if chat_scope {
        if !matches!(obj.get("messageId"), None | Some(Value::Null)) {
            return Err(invalid(
                "messageId",
                "no messageId with \"scope\": \"chat\" (a chat rating rates the whole chat)",
            ));
        }
        None
    } else {
        Some(required_id(obj, "messageId")?)
    };

    let name = match obj.get("name") {
        None | Some(Value::Null) => config.default_name.clone(),
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err(invalid("name", "a string")),
    };
    let Some(schema) = config.names.get(&name) else {
        let accepted: Vec<&str> = config.names.keys().map(String::as_str).collect();
        return Err(Error::bad_request(
            "UNKNOWN_NAME",
            format!(
                "name: \"{}\" is not an accepted assessment name (accepted: {})",
                crate::text::one_line(&name, 64),
                accepted.join(", ")
            ),
        ));
    };

    let value = match (obj.get("isUpvoted"), obj.get("value")) {
        _ if template => {
            if obj.contains_key("isUpvoted") || obj.contains_key("value") {
                return Err(Error::bad_request(
                    "INVALID_FIELD",
                    "give either feedbackType or isUpvoted/value, not both",
                ));
            }
            match obj.get("feedbackType") {
                Some(Value::String(t)) if t == "thumbs_up" => FeedbackValue::Bool(true),
                Some(Value::String(t)) if t == "thumbs_down" => FeedbackValue::Bool(false),
                _ => return Err(invalid("feedbackType", "\"thumbs_up\" or \"thumbs_down\"")),
            }
        }
        (Some(_), Some(_)) => {
            return Err(Error::bad_request(
                "INVALID_FIELD",
                "give either isUpvoted or value, not both",
            ));
        }
        (None, None) | (Some(Value::Null), None) | (None, Some(Value::Null)) => {
            return Err(Error::bad_request(
                "MISSING_FIELD",
                "isUpvoted (a boolean) or value (a boolean, number or string): required",
            ));
        }
        (Some(Value::Bool(b)), None) => FeedbackValue::Bool(*b),
        (Some(_), None) => return Err(invalid("isUpvoted", "a boolean")),
        (None, Some(v)) => match &schema.kind {
            Kind::Any { accepts } => value_of(v, &name, accepts)?,
            kind => label::check(v, &name, kind)?,
        },
    };
    if matches!(value, FeedbackValue::Bool(_)) && !schema.accepts_bool() {
        return Err(label::refused(&name, &schema.kind));
    }

    let comment = match obj.get("comment") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.trim().is_empty() => None,
        Some(Value::String(s)) => {
            if s.len() > config.max_comment_bytes {
                return Err(Error::bad_request(
                    "COMMENT_TOO_LONG",
                    format!(
                        "comment: at most {} bytes (got {})",
                        config.max_comment_bytes,
                        s.len()
                    ),
                ));
            }
            if s.chars()
                .any(|c| c.is_control() && !matches!(c, '\n' | '\r' | '\t'))
            {
                return Err(invalid("comment", "text without control characters"));
            }
            Some(s.clone())
        }
        Some(_) => return Err(invalid("comment", "a string or null")),
    };

    let correction = correction(obj, config, &name, chat_scope)?;

    Ok(VoteRequest {
        chat_id,
        template,
        message_id,
        name,
        value,
        comment,
        correction,
    })
}

/// `expectedResponse`: a string sets the correction, `null` or a blank string clears it, absent
/// keeps it. Only on a message vote under the default name, so that a message has at most one
/// correction per user.
fn correction(
    obj: &Map<String, Value>,
    config: &FeedbackConfig,
    name: &str,
    chat_scope: bool,
) -> Result<CorrectionChange, Error> {
    let Some(given) = obj.get("expectedResponse") else {
        return Ok(CorrectionChange::Keep);
    };
    if chat_scope {
        return Err(invalid(
            "expectedResponse",
            "no correction on a chat rating (correct a message instead)",
        ));
    }
    if name != config.default_name {
        return Err(invalid(
            "expectedResponse",
            &format!(
                "a correction only on the \"{}\" vote (got name \"{}\")",
                config.default_name,
                crate::text::one_line(name, 64)
            ),
        ));
    }
    match given {
        Value::Null => Ok(CorrectionChange::Clear),
        Value::String(s) if s.trim().is_empty() => Ok(CorrectionChange::Clear),
        Value::String(s) => {
            let max = config.max_expected_response_bytes;
            if s.len() > max {
                return Err(Error::bad_request(
                    "EXPECTED_RESPONSE_TOO_LONG",
                    format!("expectedResponse: at most {max} bytes (got {})", s.len()),
                ));
            }
            if s.chars()
                .any(|c| c.is_control() && !matches!(c, '\n' | '\r' | '\t'))
            {
                return Err(invalid(
                    "expectedResponse",
                    "text without control characters",
                ));
            }
            Ok(CorrectionChange::Set(s.clone()))
        }
        _ => Err(invalid("expectedResponse", "a string or null")),
    }
}

fn kind_error(name: &str, kinds: &ValueKinds) -> Error {
    Error::bad_request(
        "INVALID_VALUE",
        format!("value: \"{name}\" accepts {}", kinds.describe()),
    )
}

fn value_of(v: &Value, name: &str, kinds: &ValueKinds) -> Result<FeedbackValue, Error> {
    let value = match v {
        Value::Bool(b) => FeedbackValue::Bool(*b),
        Value::Number(n) => match n.as_f64() {
            Some(f) if f.is_finite() => FeedbackValue::Number(f),
            _ => return Err(invalid("value", "a finite number")),
        },
        Value::String(s) => {
            if s.is_empty() || s.len() > MAX_STRING_VALUE {
                return Err(invalid(
                    "value",
                    &format!("a non-empty string of at most {MAX_STRING_VALUE} bytes"),
                ));
            }
            FeedbackValue::String(s.clone())
        }
        _ => return Err(invalid("value", "a boolean, number or string")),
    };
    let ok = match value {
        FeedbackValue::Bool(_) => kinds.bool,
        FeedbackValue::Number(_) => kinds.number,
        FeedbackValue::String(_) => kinds.string,
        // Never built above: lists are for categorical names only.
        FeedbackValue::List(_) => false,
    };
    if ok {
        Ok(value)
    } else {
        Err(kind_error(name, kinds))
    }
}

#[cfg(test)]
mod tests;
