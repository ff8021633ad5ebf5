//! Domain types several layers share: a vote's value ([`FeedbackValue`]), the key of a vote
//! and its delivery ([`VoteKey`]), and what the proxy knows about a message ([`MessageLink`],
//! [`LinkRecord`]), and the two kinds of key beside a message vote: a correction's
//! ([`VoteKey::correction`]) and a chat rating's ([`VoteKey::chat_rating`]). A leaf: imports nothing from the crate, so the store, the MLflow client and
//! the handlers can all name them without depending on each other.

use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

/// The value of a vote. Serialized as plain JSON (`true`, `4.5`, `"thumbs_up"`, or for a
/// multi-valued categorical name `["incorrect", "unsafe"]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum FeedbackValue {
    Bool(bool),
    Number(f64),
    String(String),
    /// Several values of a categorical name with `multi = true` (MLflow takes a list value).
    List(Vec<String>),
}

impl FeedbackValue {
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Self::Bool(b) => serde_json::Value::Bool(*b),
            Self::Number(n) => serde_json::Number::from_f64(*n)
                .map(serde_json::Value::Number)
                .unwrap_or(serde_json::Value::Null),
            Self::String(s) => serde_json::Value::String(s.clone()),
            Self::List(l) => l.iter().cloned().map(serde_json::Value::String).collect(),
        }
    }

    /// Decodes a stored JSON value.
    pub fn from_json(v: &serde_json::Value) -> Option<Self> {
        match v {
            serde_json::Value::Bool(b) => Some(Self::Bool(*b)),
            serde_json::Value::Number(n) => n.as_f64().map(Self::Number),
            serde_json::Value::String(s) => Some(Self::String(s.clone())),
            serde_json::Value::Array(items) => items
                .iter()
                .map(|i| i.as_str().map(str::to_owned))
                .collect::<Option<Vec<_>>>()
                .map(Self::List),
            _ => None,
        }
    }
}

/// Whether a vote says the answer was good or bad, for the review surface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Polarity {
    Positive,
    Negative,
}

impl Polarity {
    /// `1` positive, `-1` negative: what the stores' SQL computes for a value.
    pub fn sign(self) -> i32 {
        match self {
            Self::Positive => 1,
            Self::Negative => -1,
        }
    }
}

/// String values read as positive (compared exactly, lower case). The stores' SQL is built from
/// the same lists, so a listing filter and a summary classify a value alike.
pub const POSITIVE_WORDS: [&str; 6] = ["thumbs_up", "up", "positive", "like", "good", "yes"];
/// String values read as negative.
pub const NEGATIVE_WORDS: [&str; 6] = ["thumbs_down", "down", "negative", "dislike", "bad", "no"];

/// Where numeric votes (ratings) turn positive or negative: `>= positive_from` is positive,
/// `<= negative_to` negative, anything between neither (`[review]` `positive_from` /
/// `negative_to`; the defaults suit 1-5 stars).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Thresholds {
    pub positive_from: f64,
    pub negative_to: f64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Self {
            positive_from: 4.0,
            negative_to: 2.0,
        }
    }
}

impl FeedbackValue {
    /// The value's polarity: `true` and [`POSITIVE_WORDS`] are positive, `false` and
    /// [`NEGATIVE_WORDS`] negative, numbers by `t`; anything else (other strings, ratings in
    /// the middle) neither.
    pub fn polarity(&self, t: &Thresholds) -> Option<Polarity> {
        match self {
            Self::Bool(true) => Some(Polarity::Positive),
            Self::Bool(false) => Some(Polarity::Negative),
            Self::Number(n) if *n >= t.positive_from => Some(Polarity::Positive),
            Self::Number(n) if *n <= t.negative_to => Some(Polarity::Negative),
            Self::Number(_) => None,
            Self::String(s) if POSITIVE_WORDS.contains(&s.as_str()) => Some(Polarity::Positive),
            Self::String(s) if NEGATIVE_WORDS.contains(&s.as_str()) => Some(Polarity::Negative),
            Self::String(_) | Self::List(_) => None,
        }
    }
}

/// What the proxy knows about one assistant message.
#[derive(Debug, Clone, PartialEq)]
pub struct MessageLink {
    pub message_id: String,
    pub chat_id: Option<String>,
    /// The user the answer was streamed to; only this user may vote on it.
    pub user_id: String,
    pub trace_id: Option<String>,
    pub client_request_id: Option<String>,
    /// The stream is still running (a trace id may yet arrive).
    pub open: bool,
    /// The agent route the answer was streamed through (its configured path), if recorded.
    pub route: Option<String>,
    pub created_at: SystemTime,
    pub updated_at: SystemTime,
}

/// A link write: inserted if the message is new; merged into the existing link if it belongs to
/// the same user (`chat_id`, `trace_id`, `client_request_id` take the new value when it is
/// `Some`, otherwise keep the old; `open` takes the new value); IGNORED if the message belongs to
/// another user (nobody can redirect someone else's link).
#[derive(Debug, Clone, PartialEq)]
pub struct LinkRecord {
    pub message_id: String,
    pub chat_id: Option<String>,
    pub user_id: String,
    pub trace_id: Option<String>,
    pub client_request_id: Option<String>,
    pub open: bool,
    /// The agent route (its configured path; shared, so a link costs no copy of it). Merged
    /// like `chat_id`.
    pub route: Option<Arc<str>>,
}

/// Identifies a vote and its delivery.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VoteKey {
    pub message_id: String,
    pub user_id: String,
    /// The assessment name (`user_feedback`, `rating`, …).
    pub name: String,
}

impl fmt::Display for VoteKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.message_id, self.user_id, self.name)
    }
}

/// The MLflow assessment name of a correction: an *expectation* (not feedback) holding what the
/// user says the answer should have been. A delivery whose key has this name is an expectation.
pub const EXPECTED_RESPONSE: &str = "expected_response";

/// Prefix of the `message_id` of a chat rating's key. Message ids never contain `/` (they are
/// validated as `[A-Za-z0-9._:-]{1,128}`), so a chat rating's key can never be a message's.
const CHAT_SCOPE: &str = "chat/";

impl VoteKey {
    /// The key of `user_id`'s correction of `message_id`: one per (message, user), whatever
    /// vote carried it.
    pub fn correction(message_id: &str, user_id: &str) -> Self {
        Self {
            message_id: message_id.to_owned(),
            user_id: user_id.to_owned(),
            name: EXPECTED_RESPONSE.to_owned(),
        }
    }

    /// The key of `user_id`'s rating `name` of the whole chat `chat_id`.
    pub fn chat_rating(chat_id: &str, user_id: &str, name: &str) -> Self {
        Self {
            message_id: format!("{CHAT_SCOPE}{chat_id}"),
            user_id: user_id.to_owned(),
            name: name.to_owned(),
        }
    }

    /// The chat this key rates as a whole, if it is a chat rating's.
    pub fn rated_chat(&self) -> Option<&str> {
        self.message_id.strip_prefix(CHAT_SCOPE)
    }

    /// Whether the key is a correction's (delivered as an expectation).
    pub fn is_correction(&self) -> bool {
        self.name == EXPECTED_RESPONSE && self.rated_chat().is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_ratings_and_corrections_have_keys_of_their_own() {
        let r = VoteKey::chat_rating("c1", "u", "user_feedback");
        assert_eq!(r.rated_chat(), Some("c1"));
        assert!(!r.is_correction());
        let c = VoteKey::correction("m1", "u");
        assert!(c.is_correction());
        assert_eq!(c.rated_chat(), None);
        assert_ne!(c.message_id, r.message_id);
    }
}
