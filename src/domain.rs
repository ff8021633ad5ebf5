//! Domain types several layers share: a vote's value ([`FeedbackValue`]), the key of a vote
//! and its delivery ([`VoteKey`]), and what the proxy knows about a message ([`MessageLink`],
//! [`LinkRecord`]). A leaf: imports nothing from the crate, so the store, the MLflow client and
//! the handlers can all name them without depending on each other.

use std::fmt;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

/// The value of a vote. Serialized as plain JSON (`true`, `4.5`, `"thumbs_up"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum FeedbackValue {
    Bool(bool),
    Number(f64),
    String(String),
}

impl FeedbackValue {
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Self::Bool(b) => serde_json::Value::Bool(*b),
            Self::Number(n) => serde_json::Number::from_f64(*n)
                .map(serde_json::Value::Number)
                .unwrap_or(serde_json::Value::Null),
            Self::String(s) => serde_json::Value::String(s.clone()),
        }
    }

    /// Decodes a stored JSON value.
    pub fn from_json(v: &serde_json::Value) -> Option<Self> {
        match v {
            serde_json::Value::Bool(b) => Some(Self::Bool(*b)),
            serde_json::Value::Number(n) => n.as_f64().map(Self::Number),
            serde_json::Value::String(s) => Some(Self::String(s.clone())),
            _ => None,
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
