//! What a [`super::ResponseBody`] is built with: the options of the wrapper, and everything
//! the end of the stream needs (the link and how it is written, metrics, the access line).

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::metrics::{KindLabel, Metrics, TraceIdLabels};
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum EndReason {
    Complete,
    UpstreamError,
    IdleTimeout,
    ClientGone,
    /// Cut at the end of the shutdown grace period.
    Shutdown,
}

/// What a stream tells its observer when it ends, once.
pub(super) struct Summary<'a> {
    pub reason: EndReason,
    /// Why the agent's stream broke, for the log.
    pub error: Option<&'a str>,
    pub bytes: u64,
    pub first_byte: Option<Instant>,
    pub inspector: Option<&'a Inspector>,
    /// Whether the final link is still to be written (not already written when the trace id
    /// became known) and may be.
    pub write_link: bool,
}

impl StreamEnd {
    /// The stream's end, observed: the stream metrics, the trace-id outcome, the access line
    /// (one per request, whatever happened), a warning for a broken stream, and the final link.
    pub(super) fn observe(mut self, s: Summary<'_>) {
        let _span = std::mem::replace(&mut self.span, tracing::Span::none()).entered();
        let now = Instant::now();
        let m = &self.metrics;
        m.streams_open.dec();
        m.agent_stream_duration()
            .observe(now.duration_since(self.start).as_secs_f64());
        if let Some(fb) = s.first_byte {
            m.agent_stream_first_byte()
                .observe(fb.duration_since(self.start).as_secs_f64());
        }
        m.stream_bytes.inc_by(s.bytes);

        let found = s
            .inspector
            .and_then(|i| i.trace_id())
            .or(self.header_trace.as_ref());
        let rejected = s.inspector.and_then(|i| i.rejected());
        let (outcome, source) = match (found, rejected) {
            (Some(f), _) => ("found", f.source.as_str()),
            (None, Some(src)) => ("rejected", src.as_str()),
            (None, None) if self.header_rejected => ("rejected", "header"),
            (None, None) => ("not_found", "none"),
        };
        m.trace_ids
            .get_or_create(&TraceIdLabels { outcome, source })
            .inc();
        if s.inspector.is_some_and(Inspector::overflowed) {
            m.inspector_overflows.inc();
            if found.is_none() {
                // Said once per exchange, with the knob: large traces returned inline (Model
                // Serving's `return_trace`) are the usual cause.
                tracing::warn!(
                    request_id = %self.request_id,
                    message_id = %self.link.message_id,
                    "an agent event or response body was larger than agent.max_inspect_bytes, so it was not searched for a trace id (forwarding was not affected); raise agent.max_inspect_bytes if the agent returns large traces inline"
                );
            }
        }

        let trace_id = found.map(|f| f.id.as_str()).unwrap_or("");
        let duration_ms = now.duration_since(self.start).as_secs_f64() * 1e3;
        let ttfb_ms = s
            .first_byte
            .map(|fb| fb.duration_since(self.start).as_secs_f64() * 1e3);
        let outcome = match s.reason {
            EndReason::Complete => "complete",
            EndReason::ClientGone => "client_gone",
            EndReason::UpstreamError => "stream_error",
            EndReason::IdleTimeout => "idle_timeout",
            EndReason::Shutdown => "shutdown",
        };
        // The access line: one per request, whatever happened.
        tracing::info!(
            target: "feedback_proxy::access",
            request_id = %self.request_id,
            method = %self.method,
            path = %self.uri.path(),
            route = "agent",
            status = self.status,
            duration_ms,
            ttfb_ms,
            bytes = s.bytes,
            message_id = %self.link.message_id,
            trace_id,
            outcome,
            "request"
        );
        // A broken stream is also an error, logged once, here.
        if let Some(error) = s.error {
            m.upstream_errors
                .get_or_create(&KindLabel { kind: outcome })
                .inc();
            tracing::warn!(
                request_id = %self.request_id,
                message_id = %self.link.message_id,
                upstream = %self.upstream,
                error,
                "the agent stream ended early"
            );
        }

        if s.write_link {
            let StreamEnd {
                mut link, recorder, ..
            } = self;
            if let Some(insp) = s.inspector {
                link.trace_id = insp.trace_id().map(|f| f.id.clone());
                if let Some(c) = insp.client_request_id() {
                    link.client_request_id = Some(c.to_owned());
                }
            }
            link.open = false;
            recorder.record(link);
        }
    }
}
