//! What a [`super::ResponseBody`] is built with: the options of the wrapper, and everything
//! the end of the stream needs (the link and how it is written, metrics, the access line).

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::metrics::Metrics;
use crate::proxy::limit::UserPermit;
use crate::proxy::link::LinkRecorder;
use crate::proxy::sse::Inspector;
use crate::proxy::streams::OpenStreams;
use crate::proxy::trace::Found;
use crate::store::LinkRecord;

/// Which links a response writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkMode {
    /// The message id is known from the start (agent routes): an open link at the start of a
    /// stream, the final one as soon as the trace id is known or when the body ends.
    Record,
    /// The message id comes from the stream (the chat app template's `start` part): nothing is
    /// written until the inspector has it, then as [`LinkMode::Record`]. A stream that never
    /// names its message writes no link.
    FromStream,
    /// Not an exchange (an `ai-sdk-app` route's pages and other API calls): no link.
    Off,
}

/// Everything the end of a stream needs, taken exactly once.
#[derive(Debug)]
pub struct StreamEnd {
    /// The link as known at the start (message, chat, user, client request id, header trace
    /// id); completed with what the inspector finds.
    pub link: LinkRecord,
    pub links: LinkMode,
    /// Where the trace id already known at the start came from (a response header).
    pub header_trace: Option<Found>,
    /// Whether a rejected trace-id header was seen.
    pub header_rejected: bool,
    /// The open link was already written (the client's message id was claimed).
    pub claimed: bool,
    pub recorder: LinkRecorder,
    pub metrics: Arc<Metrics>,
    pub request_id: String,
    pub method: http::Method,
    /// The request URI as received (its path goes to the access line; moved, not copied).
    pub uri: http::Uri,
    pub status: u16,
    pub start: Instant,
    /// The upstream base, for error messages.
    pub upstream: String,
    /// The user's slot under `agent.max_concurrent_per_user`, freed with this (at the end of
    /// the stream or when the client goes away).
    pub permit: Option<UserPermit>,
    /// The request's span: the end of the stream (its link, access line and warnings) is
    /// logged in it even when it comes from a drop, outside any poll.
    pub span: tracing::Span,
}

/// Options for one wrapped body.
pub struct BodyOptions {
    pub inspector: Option<Inspector>,
    pub sse: bool,
    /// Inject the meta event first and the trace event when known.
    pub events: bool,
    pub idle_timeout: Duration,
    /// The registry that shutdown cuts open streams through.
    pub streams: Arc<OpenStreams>,
}
