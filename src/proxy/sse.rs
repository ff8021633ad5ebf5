//! Incremental inspection of agent response bodies (SSE events or one JSON body).
//!
//! INTERFACE STUB: the framing and extraction are being written in a separate change; the type
//! and its methods here are the contract the proxy codes against. This stub finds nothing.

use super::trace::{Found, Source};

/// Inspects an agent response body as it passes, by reference, with bounded memory.
#[derive(Debug)]
pub struct Inspector {
    trace_id: Option<Found>,
    client_request_id: Option<String>,
    rejected: Option<Source>,
    overflowed: bool,
}

impl Inspector {
    /// For `text/event-stream` bodies; an event larger than `max_event` stops inspection.
    pub fn sse(max_event: usize) -> Self {
        let _ = max_event;
        Self::empty()
    }

    /// For a JSON body; a body larger than `max_body` is not inspected.
    pub fn json(max_body: usize) -> Self {
        let _ = max_body;
        Self::empty()
    }

    fn empty() -> Self {
        Self {
            trace_id: None,
            client_request_id: None,
            rejected: None,
            overflowed: false,
        }
    }

    /// Inspects the next chunk. When this chunk completes the event that yields the FIRST trace
    /// id, returns the number of bytes of `chunk` up to and including that event's end (so that
    /// the caller can insert something right after it).
    pub fn feed(&mut self, chunk: &[u8]) -> Option<usize> {
        let _ = chunk;
        None
    }

    /// The body ended. Returns whether a trace id was found only now (JSON bodies).
    pub fn finish(&mut self) -> bool {
        false
    }

    /// Whether inspecting further chunks could still change anything.
    pub fn is_done(&self) -> bool {
        self.trace_id.is_some() || self.overflowed
    }

    pub fn trace_id(&self) -> Option<&Found> {
        self.trace_id.as_ref()
    }

    pub fn client_request_id(&self) -> Option<&str> {
        self.client_request_id.as_deref()
    }

    /// The source of the first candidate that was rejected as invalid, if any.
    pub fn rejected(&self) -> Option<Source> {
        self.rejected
    }

    /// Whether inspection stopped at an event (or body) over the cap.
    pub fn overflowed(&self) -> bool {
        self.overflowed
    }
}
