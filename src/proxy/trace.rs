//! Trace-id and client-request-id extraction (CONTRACT §3.1).
//!
//! INTERFACE STUB: the extraction logic is being written in a separate change; the types and
//! signatures here are the contract the proxy codes against.

use http::HeaderMap;
use http::header::HeaderName;

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
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::AgentEvent => "agent_event",
            Self::DatabricksOutput => "databricks_output",
            Self::ResponseMetadata => "response_metadata",
            Self::ClientRequestIdEvent => "client_request_id_event",
            Self::Header => "header",
        }
    }
}

/// A validated id and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub id: String,
    pub source: Source,
}

/// Validates an opaque trace id: non-empty, at most 256 characters, no control characters, not
/// `MLFLOW_NO_OP_SPAN_TRACE_ID`.
pub fn valid_trace_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 256
        && id != "MLFLOW_NO_OP_SPAN_TRACE_ID"
        && !id.chars().any(char::is_control)
}

/// Result of looking at the configured trace-id response headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderId {
    Found(Found),
    /// A header was present but its value is not a valid trace id.
    Rejected,
    Absent,
}

/// The first valid trace id in the configured response headers.
pub fn from_headers(headers: &HeaderMap, names: &[HeaderName]) -> HeaderId {
    let mut rejected = false;
    for name in names {
        if let Some(v) = headers.get(name) {
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
