//! The agent's response body on its way back to the client.
//!
//! [`ResponseBody`] wraps the upstream `Incoming` body and forwards every frame as soon as it
//! arrives, untouched. Along the way it:
//!
//! - shows each data frame, by reference, to the [`Inspector`] (trace ids; for the chat app
//!   template's stream also the message id, which the link waits for: [`LinkMode`]);
//! - optionally injects `feedback-proxy.meta` / `feedback-proxy.trace` events, always at an event
//!   boundary (splitting a frame with `Bytes::split_to` is zero-copy);
//! - enforces the idle timeout between frames without touching the timer per frame: each frame
//!   only records `Instant::now()`, and the timer is re-armed lazily when it fires;
//! - ends an SSE stream that breaks or idles out with a final `event: error`;
//! - ends the stream when shutdown cuts it at the end of the grace period (an SSE stream with a
//!   final `event: error`, code `SHUTTING_DOWN`; see `streams.rs`);
//! - reports the end exactly once — completion, upstream error, idle timeout, shutdown, or the
//!   client going away (drop) — as one summary to the stream's observer
//!   (`end.rs`, `StreamEnd::observe`), which records the message link, updates the metrics and
//!   writes the access line.
//!
//! Nothing on the per-frame path allocates, locks, or calls the store.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::Sleep;

use super::sse::Inspector;
use super::streams::StreamHandle;
use crate::body::BoxError;
use crate::store::LinkRecord;

mod end;
pub use end::{BodyOptions, LinkMode, StreamEnd};
use end::{EndReason, Summary};

const BOM: &[u8] = b"\xEF\xBB\xBF";

/// The sentence of the final error event of a stream cut by shutdown.
const SHUTTING_DOWN: &str = "the proxy is shutting down; the answer was cut off";

/// See the module documentation.
pub struct ResponseBody {
    inner: Incoming,
    inspector: Option<Inspector>,
    sse: bool,
    events: bool,
    /// Frames to emit before polling `inner` again (injected events, split remainders).
    queue: VecDeque<Bytes>,
    /// The meta event, waiting for the first data frame (so that it can go after a BOM).
    meta: Option<Bytes>,
    idle_timeout: Duration,
    idle: Pin<Box<Sleep>>,
    last_frame: Instant,
    bytes: u64,
    first_byte: Option<Instant>,
    /// The trace id was reported (link written, event injected).
    trace_reported: bool,
    /// [`LinkMode::FromStream`] and the stream has not named its message yet.
    await_message_id: bool,
    done: bool,
    end: Option<StreamEnd>,
    /// Registered with shutdown until the end is reported.
    cut: Option<StreamHandle>,
}

impl std::fmt::Debug for ResponseBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseBody")
            .field("sse", &self.sse)
            .field("bytes", &self.bytes)
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl ResponseBody {
    pub fn new(inner: Incoming, opts: BodyOptions, end: StreamEnd) -> Self {
        end.metrics.streams_open.inc();
        let now = Instant::now();
        let mut body = Self {
            inner,
            inspector: opts.inspector,
            sse: opts.sse,
            events: opts.events && opts.sse,
            queue: VecDeque::new(),
            meta: None,
            idle_timeout: opts.idle_timeout,
            idle: Box::pin(tokio::time::sleep(opts.idle_timeout)),
            last_frame: now,
            bytes: 0,
            first_byte: None,
            trace_reported: false,
            await_message_id: end.links == LinkMode::FromStream,
            done: false,
            end: None,
            cut: Some(opts.streams.register()),
        };
        if body.events {
            let meta = serde_json::json!({
                "messageId": end.link.message_id,
                "chatId": end.link.chat_id,
            });
            body.meta = Some(sse_event("feedback-proxy.meta", &meta));
            if let Some(found) = &end.header_trace {
                let ev = trace_event(&end.link.message_id, &found.id);
                body.trace_reported = true;
                if let Some(meta) = body.meta.as_mut() {
                    let mut both = Vec::with_capacity(meta.len() + ev.len());
                    both.extend_from_slice(meta);
                    both.extend_from_slice(&ev);
                    *meta = Bytes::from(both);
                }
            }
        }
        if end.links != LinkMode::Record {
            // Nothing to write yet (or ever).
        } else if end.header_trace.is_some() {
            // The trace id is known from the start: record the final link now.
            body.trace_reported = true;
            end.recorder.record(LinkRecord {
                open: false,
                ..end.link.clone()
            });
        } else if !end.claimed && body.sse {
            // A stream may run for a while: say now that it exists, so that a vote cast while
            // it runs is queued rather than answered `no_trace_id`. A non-streaming answer
            // arrives whole, and its final link follows within moments.
            end.recorder.record(LinkRecord {
                open: true,
                ..end.link.clone()
            });
        }
        body.end = Some(end);
        body
    }

    /// Handles one data chunk: inspection, injections. Returns the bytes to emit now.
    fn on_data(&mut self, mut data: Bytes) -> Bytes {
        let now = Instant::now();
        self.last_frame = now;
        if self.first_byte.is_none() && !data.is_empty() {
            self.first_byte = Some(now);
        }
        self.bytes += data.len() as u64;

        let mut split_at = None;
        if let Some(insp) = self.inspector.as_mut() {
            if !insp.is_done() {
                split_at = insp.feed(&data);
            }
        }
        if self.await_message_id {
            self.learn_message_id();
        }
        if split_at.is_some() && !self.trace_reported {
            self.report_trace();
        }

        // The meta event goes first, after a leading BOM if the stream has one.
        if let Some(meta) = self.meta.take() {
            if data.starts_with(BOM) {
                let bom = data.split_to(BOM.len());
                self.queue.push_back(meta);
                self.push_with_trace_event(data, split_at.map(|s| s.saturating_sub(BOM.len())));
                return bom;
            }
            self.push_with_trace_event(data, split_at);
            return meta;
        }
        if split_at.is_some() && self.events {
            self.push_with_trace_event(data, split_at);
            return self.queue.pop_front().unwrap_or_default();
        }
        data
    }

    /// Queues `data`, with the trace event inserted after its first `split_at` bytes.
    fn push_with_trace_event(&mut self, mut data: Bytes, split_at: Option<usize>) {
        match (split_at, self.events, self.trace_event()) {
            (Some(at), true, Some(ev)) => {
                let at = at.min(data.len());
                let rest = data.split_off(at);
                if !data.is_empty() {
                    self.queue.push_back(data);
                }
                self.queue.push_back(ev);
                if !rest.is_empty() {
                    self.queue.push_back(rest);
                }
            }
            _ => {
                if !data.is_empty() {
                    self.queue.push_back(data);
                }
            }
        }
    }

    fn trace_event(&self) -> Option<Bytes> {
        let found = self.inspector.as_ref()?.trace_id()?;
        let end = self.end.as_ref()?;
        Some(trace_event(&end.link.message_id, &found.id))
    }

    /// Takes the message id the stream named (once): the link is this message's from now on,
    /// and, unless the trace is already known, its open link is written at once (so that a
    /// vote cast while the answer streams is queued, not refused).
    fn learn_message_id(&mut self) {
        let (Some(end), Some(insp)) = (self.end.as_mut(), self.inspector.as_ref()) else {
            return;
        };
        let Some(id) = insp.message_id() else { return };
        self.await_message_id = false;
        end.link.message_id = id.to_owned();
        if insp.trace_id().is_none() && !insp.no_trace() {
            end.recorder.record(LinkRecord {
                open: true,
                ..end.link.clone()
            });
        }
    }

    /// Whether this response writes links now.
    fn may_link(&self) -> bool {
        self.end.as_ref().is_some_and(|e| match e.links {
            LinkMode::Record => true,
            LinkMode::FromStream => !self.await_message_id,
            LinkMode::Off => false,
        })
    }

    /// Writes the final link as soon as the trace id is known.
    fn report_trace(&mut self) {
        self.trace_reported = true;
        if !self.may_link() {
            return;
        }
        let (Some(end), Some(insp)) = (self.end.as_ref(), self.inspector.as_ref()) else {
            return;
        };
        let mut link = end.link.clone();
        link.trace_id = insp.trace_id().map(|f| f.id.clone());
        link.client_request_id = insp
            .client_request_id()
            .map(str::to_owned)
            .or(link.client_request_id);
        link.open = false;
        end.recorder.record(link);
    }

    /// Ends the stream once: one summary to the stream's observer ([`StreamEnd::observe`]),
    /// which writes the metrics, the access line and the final link.
    fn finish(&mut self, reason: EndReason, error: Option<&str>) {
        let write_link = !self.trace_reported && self.may_link();
        let Some(end) = self.end.take() else {
            return;
        };
        end.observe(Summary {
            reason,
            error,
            bytes: self.bytes,
            first_byte: self.first_byte,
            inspector: self.inspector.as_ref(),
            write_link,
        });
        // Last: shutdown waits for this to learn that the link and the access line are out.
        self.cut = None;
    }

    /// Whether shutdown has cut the stream.
    fn is_cut(&self) -> bool {
        self.cut.as_ref().is_some_and(StreamHandle::is_cut)
    }

    /// Ends with an error: SSE clients get a final `event: error`; other bodies fail (the client
    /// sees a truncated response, which is the honest signal for a non-event body).
    ///
    /// The client's event carries `public` (no agent URL, no transport text) and the request
    /// id; `message`, with the details, goes to the log.
    fn fail(
        &mut self,
        reason: EndReason,
        code: &str,
        public: &str,
        message: String,
    ) -> Option<BoxError> {
        let request_id = self
            .end
            .as_ref()
            .map(|e| e.request_id.clone())
            .unwrap_or_default();
        if reason == EndReason::Shutdown {
            // Not an upstream failure: no error count, no "ended early" warning.
            self.finish(reason, None);
        } else {
            self.finish(reason, Some(&message));
        }
        self.done = true;
        if self.sse {
            // Two newlines first: if the upstream died mid-event, this terminates the partial
            // line and event; at a clean boundary they are empty lines that dispatch nothing.
            let payload =
                serde_json::json!({ "error": public, "code": code, "requestId": request_id });
            let mut ev = b"\n\n".to_vec();
            ev.extend_from_slice(&sse_event("error", &payload));
            self.queue.push_back(Bytes::from(ev));
            None
        } else {
            Some(message.into())
        }
    }

    /// The upstream body ended: final inspection, then the end report.
    fn end_of_body(&mut self) {
        if self.done {
            return;
        }
        if let Some(insp) = self.inspector.as_mut() {
            if insp.finish() && !self.trace_reported {
                self.report_trace();
            }
        }
        // A meta event never emitted (empty body) is emitted now.
        if let Some(meta) = self.meta.take() {
            self.queue.push_back(meta);
        }
        self.finish(EndReason::Complete, None);
        self.done = true;
    }

    fn upstream_name(&self) -> String {
        self.end
            .as_ref()
            .map(|e| e.upstream.clone())
            .unwrap_or_default()
    }
}

impl http_body::Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            if let Some(b) = this.queue.pop_front() {
                return Poll::Ready(Some(Ok(Frame::data(b))));
            }
            if this.done {
                return Poll::Ready(None);
            }
            if this.is_cut() {
                if let Some(err) = this.fail(
                    EndReason::Shutdown,
                    "SHUTTING_DOWN",
                    SHUTTING_DOWN,
                    SHUTTING_DOWN.to_owned(),
                ) {
                    return Poll::Ready(Some(Err(err)));
                }
                continue;
            }
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    return match frame.into_data() {
                        Ok(data) => {
                            let out = this.on_data(data);
                            // A body with a known length may be complete now, and the server
                            // will not poll again for its end: finish here, not on drop.
                            if this.inner.is_end_stream() {
                                this.end_of_body();
                            }
                            Poll::Ready(Some(Ok(Frame::data(out))))
                        }
                        Err(frame) => {
                            this.last_frame = Instant::now();
                            Poll::Ready(Some(Ok(frame)))
                        }
                    };
                }
                Poll::Ready(Some(Err(e))) => {
                    let msg = format!(
                        "the agent at {} broke the stream: {}",
                        this.upstream_name(),
                        crate::text::chain(&e)
                    );
                    if let Some(err) = this.fail(
                        EndReason::UpstreamError,
                        "UPSTREAM_STREAM_BROKEN",
                        "the agent's answer broke off",
                        msg,
                    ) {
                        return Poll::Ready(Some(Err(err)));
                    }
                }
                Poll::Ready(None) => this.end_of_body(),
                Poll::Pending => {
                    // Lazy idle timer: frames only record their time; when the timer fires we
                    // check the real silence and re-arm if a frame came in since.
                    loop {
                        if this.idle.as_mut().poll(cx).is_pending() {
                            if this.cut.as_mut().is_some_and(|c| c.register(cx.waker())) {
                                // Cut meanwhile: end at the top of the outer loop.
                                break;
                            }
                            return Poll::Pending;
                        }
                        let deadline = this.last_frame + this.idle_timeout;
                        if Instant::now() < deadline {
                            this.idle.as_mut().reset(deadline.into());
                            continue;
                        }
                        let msg = format!(
                            "the agent at {} sent nothing for {}",
                            this.upstream_name(),
                            humantime::format_duration(this.idle_timeout)
                        );
                        if let Some(err) = this.fail(
                            EndReason::IdleTimeout,
                            "UPSTREAM_IDLE_TIMEOUT",
                            "the agent stopped sending",
                            msg,
                        ) {
                            return Poll::Ready(Some(Err(err)));
                        }
                        break;
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.queue.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        if self.sse || self.events {
            SizeHint::default()
        } else {
            self.inner.size_hint()
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        if self.end.is_some() {
            let reason = if self.is_cut() {
                EndReason::Shutdown
            } else {
                EndReason::ClientGone
            };
            self.finish(reason, None);
        }
    }
}

/// One SSE event with a JSON payload.
fn sse_event(name: &str, data: &serde_json::Value) -> Bytes {
    // Serialized JSON never contains a raw newline, so one `data:` line carries it.
    let json = serde_json::to_string(data).unwrap_or_else(|_| "{}".to_owned());
    Bytes::from(format!("event: {name}\ndata: {json}\n\n"))
}

fn trace_event(message_id: &str, trace_id: &str) -> Bytes {
    sse_event(
        "feedback-proxy.trace",
        &serde_json::json!({ "messageId": message_id, "traceId": trace_id }),
    )
}
