//! Incremental inspection of agent response bodies (SSE events or one JSON body) for the ids
//! that link an answer to its MLflow trace (CONTRACT §3.1).
//!
//! The proxy shows every data frame of an agent's response to an [`Inspector`], by reference,
//! and forwards the frame whatever the inspector does: inspection never holds back, copies out
//! or alters a byte of the stream, and never fails it.
//!
//! - **SSE** ([`Inspector::sse`]): frames events incrementally ([`Framer`], WHATWG rules, any
//!   split of bytes across frames) and looks at each event's data. A cheap pre-filter keeps
//!   ordinary delta events from ever being JSON-parsed: the keys `"trace_id"` and
//!   `"client_request_id"` are searched for (`memmem`) once per frame, lazily, and an event is
//!   looked at only if one of them occurs among its bytes (an event that began in an earlier
//!   frame is searched on its own). Only candidate events go to [`trace::from_event`]. The FIRST
//!   valid trace id
//!   wins and ends inspection; [`Inspector::feed`] then says where that event ended in the
//!   frame, so the proxy can inject its own `feedback-proxy.trace` event right after it.
//! - **AI SDK UI message stream** ([`Inspector::ui_messages`], the chat app template's
//!   `/api/chat`): the same framing and pre-filter with the keys `"messageId"` and `traceId"`
//!   (the latter closes both `"data-traceId"` and a `"traceId"` key); candidates go to
//!   [`trace::ui::from_ui_part`]. The `start` part's message id is kept ([`Inspector::message_id`]);
//!   the trace id ends inspection as above, and so does a `data-traceId` part with `null` data
//!   ([`Inspector::no_trace`]), which says there will be none.
//! - **JSON** ([`Inspector::json`]): a non-streaming body is copied as it passes (the frames
//!   themselves are still forwarded at once) and parsed when it ends ([`Inspector::finish`]).
//!
//! Memory is bounded by the cap given at construction (`agent.max_inspect_bytes`, 1 MiB by
//! default): an SSE event whose data, or a JSON body, grows past it stops inspection for the rest
//! of the response ([`Inspector::overflowed`]) and frees what was held.
//!
//! On the common path (an ordinary event passing) nothing allocates: the event buffer is reused,
//! the pre-filter searchers are built once per response. Once the trace id is found, or after an
//! overflow, `feed` does nothing at all. Deliberately not done here: logging, metrics, locks
//! (the caller counts outcomes from [`Inspector::rejected`] / [`Inspector::overflowed`]).
//!
//! Known limit of the pre-filter: a key spelt with JSON escapes (`"trace\u005fid"`) is not
//! recognised; no MLflow or Databricks server writes keys that way.

// Spelt out so that the fuzz crate, which compiles this file on its own, finds it too.
#[path = "sse/frame.rs"]
mod frame;

use std::ops::{ControlFlow, Range};

use std::sync::LazyLock;

use memchr::memmem::Finder;

pub use self::frame::{Event, Framer};
use super::trace::{self, Candidate, Found, Source};

/// The keys whose presence makes an event worth parsing. `trace_id` also covers
/// `databricks_output.trace.info.trace_id` and `metadata.trace_id`.
const TRACE_ID_KEY: &[u8] = b"\"trace_id\"";
const CLIENT_REQUEST_ID_KEY: &[u8] = b"\"client_request_id\"";
static TRACE_ID_FINDER: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(TRACE_ID_KEY));
static CLIENT_REQUEST_ID_FINDER: LazyLock<Finder<'static>> =
    LazyLock::new(|| Finder::new(CLIENT_REQUEST_ID_KEY));
/// The UI message stream's keys: the `start` part's `messageId`, and the end of
/// `"data-traceId"` (the part's type) or of a `"traceId"` key in a data part's object. Both keep
/// a closing quote, so text that merely mentions them (escaped inside a JSON string) does not
/// match.
const MESSAGE_ID_KEY: &[u8] = b"\"messageId\"";
const UI_TRACE_KEY: &[u8] = b"traceId\"";
static MESSAGE_ID_FINDER: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(MESSAGE_ID_KEY));
static UI_TRACE_FINDER: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(UI_TRACE_KEY));

/// Inspects an agent response body as it passes, by reference, with bounded memory.
#[derive(Debug)]
pub struct Inspector {
    mode: Mode,
    /// Whether the events are AI SDK UI message stream parts (else agent events).
    ui: bool,
    /// Pre-filter searchers for events, built once per process (building one costs more than
    /// searching a small frame): `trace_id`/`client_request_id`, or the UI stream's keys.
    keys: [&'static Finder<'static>; 2],
    /// For a JSON body's final check.
    trace_key: &'static Finder<'static>,
    trace_id: Option<Found>,
    client_request_id: Option<String>,
    /// The UI stream's message id (its `start` part).
    message_id: Option<String>,
    /// The UI stream said it has no trace id.
    no_trace: bool,
    rejected: Option<Source>,
    overflowed: bool,
}

#[derive(Debug)]
enum Mode {
    Sse(Framer),
    /// The body so far; `None` once it went past `max` (or the body ended).
    Json {
        body: Option<Vec<u8>>,
        max: usize,
    },
}

impl Inspector {
    /// For `text/event-stream` bodies; an event whose data exceeds `max_event` bytes stops
    /// inspection.
    pub fn sse(max_event: usize) -> Self {
        Self::new(Mode::Sse(Framer::new(max_event)))
    }

    /// For an AI SDK UI message stream (`text/event-stream` from the chat app template's
    /// `/api/chat`); an event whose data exceeds `max_event` bytes stops inspection.
    pub fn ui_messages(max_event: usize) -> Self {
        let mut insp = Self::new(Mode::Sse(Framer::new(max_event)));
        insp.ui = true;
        insp.keys = [&MESSAGE_ID_FINDER, &UI_TRACE_FINDER];
        insp
    }

    /// For a JSON body; a body larger than `max_body` is not inspected.
    pub fn json(max_body: usize) -> Self {
        Self::new(Mode::Json {
            body: Some(Vec::new()),
            max: max_body,
        })
    }

    fn new(mode: Mode) -> Self {
        Self {
            mode,
            ui: false,
            keys: [&TRACE_ID_FINDER, &CLIENT_REQUEST_ID_FINDER],
            trace_key: &TRACE_ID_FINDER,
            trace_id: None,
            client_request_id: None,
            message_id: None,
            no_trace: false,
            rejected: None,
            overflowed: false,
        }
    }

    /// Inspects the next chunk. When this chunk completes the event that yields the FIRST trace
    /// id, returns the number of bytes of `chunk` up to and including that event's end (so that
    /// the caller can insert something right after it). Always `None` for JSON bodies (their id
    /// is known only at [`Inspector::finish`]).
    pub fn feed(&mut self, chunk: &[u8]) -> Option<usize> {
        if self.is_done() {
            return None;
        }
        match &mut self.mode {
            Mode::Sse(framer) => {
                let mut hits = KeyHits::default();
                let keys = self.keys;
                let ui = self.ui;
                let at = framer.feed(chunk, |ev| {
                    // The frame-wide search first (cheap per event); then the event's own data,
                    // which rules out a key seen only in a comment or another field.
                    let candidate = ev
                        .within
                        .is_none_or(|range| hits.occur_in(chunk, range, keys))
                        && keys.iter().any(|k| k.find(ev.data).is_some());
                    if !candidate {
                        return ControlFlow::Continue(());
                    }
                    if ui {
                        on_ui_part(
                            ev.data,
                            &mut self.message_id,
                            &mut self.trace_id,
                            &mut self.no_trace,
                            &mut self.rejected,
                        )
                    } else {
                        on_event(
                            ev.data,
                            &mut self.trace_id,
                            &mut self.client_request_id,
                            &mut self.rejected,
                        )
                    }
                });
                self.overflowed = framer.overflowed();
                // A stream that said it has no trace stops there, but reports no offset: there
                // is no trace event to follow.
                at.filter(|_| self.trace_id.is_some())
            }
            Mode::Json { body, max } => {
                if let Some(buf) = body {
                    if chunk.len() > max.saturating_sub(buf.len()) {
                        *body = None;
                        self.overflowed = true;
                    } else {
                        buf.extend_from_slice(chunk);
                    }
                }
                None
            }
        }
    }

    /// The body ended. Returns whether a trace id was found only now (JSON bodies). An SSE event
    /// left unterminated at the end is discarded, as the standard says.
    pub fn finish(&mut self) -> bool {
        let Mode::Json { body, .. } = &mut self.mode else {
            return false;
        };
        let Some(buf) = body.take() else {
            return false;
        };
        if self.trace_id.is_some() || self.trace_key.find(&buf).is_none() {
            return false;
        }
        match trace::from_json_body(&buf) {
            Candidate::Valid(found) => {
                self.trace_id = Some(found);
                true
            }
            Candidate::Rejected(source) => {
                self.rejected.get_or_insert(source);
                false
            }
            Candidate::None => false,
        }
    }

    /// Whether inspecting further chunks could still change anything.
    pub fn is_done(&self) -> bool {
        self.trace_id.is_some() || self.overflowed || self.no_trace
    }

    /// The message id a UI message stream's `start` part named.
    pub fn message_id(&self) -> Option<&str> {
        self.message_id.as_deref()
    }

    /// Whether a UI message stream said it carries no trace id (`data-traceId` with `null`).
    pub fn no_trace(&self) -> bool {
        self.no_trace
    }

    /// The first valid trace id found.
    pub fn trace_id(&self) -> Option<&Found> {
        self.trace_id.as_ref()
    }

    /// The first valid client request id announced by the agent (seed 001).
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

/// Where the pre-filter keys next occur in the frame being fed, searched lazily: for a frame of
/// ordinary events, one pass per key over the whole frame instead of one per event.
#[derive(Debug, Default)]
struct KeyHits {
    next: [Next; 2],
}

#[derive(Debug, Default, Clone, Copy)]
enum Next {
    #[default]
    Unknown,
    /// The first occurrence at or after the last position searched from.
    At(usize),
    /// None after the last position searched from.
    Never,
}

impl KeyHits {
    /// Whether any key occurs in `chunk[range]`. Ranges come in increasing order (events in
    /// stream order), so each key is searched from a position at most once past each hit.
    fn occur_in(&mut self, chunk: &[u8], range: Range<usize>, keys: [&Finder<'_>; 2]) -> bool {
        let mut found = false;
        for (next, key) in self.next.iter_mut().zip(keys) {
            let stale = match *next {
                Next::Unknown => true,
                Next::At(at) => at < range.start,
                Next::Never => false,
            };
            if stale {
                *next = match chunk.get(range.start..).and_then(|h| key.find(h)) {
                    Some(at) => Next::At(range.start + at),
                    None => Next::Never,
                };
            }
            // A key holds no line end, so one that starts inside the event ends inside it.
            found |= matches!(*next, Next::At(at) if at < range.end);
        }
        found
    }
}

/// Looks at one candidate event's data; `Break` when it yields the first trace id. A free
/// function over the inspector's fields so that it can run while the framer is borrowed.
fn on_event(
    data: &[u8],
    trace_id: &mut Option<Found>,
    client_request_id: &mut Option<String>,
    rejected: &mut Option<Source>,
) -> ControlFlow<()> {
    let found = trace::from_event(data);
    match found.client_request_id {
        Candidate::Valid(f) => {
            client_request_id.get_or_insert(f.id);
        }
        Candidate::Rejected(source) => {
            rejected.get_or_insert(source);
        }
        Candidate::None => {}
    }
    take_trace_id(found.trace_id, trace_id, rejected)
}

/// A trace id candidate of one event: a valid one is taken (`Break`: inspection is done), a
/// rejected one remembered (for the metrics) while inspection goes on.
fn take_trace_id(
    candidate: Candidate,
    trace_id: &mut Option<Found>,
    rejected: &mut Option<Source>,
) -> ControlFlow<()> {
    match candidate {
        Candidate::Valid(f) => {
            *trace_id = Some(f);
            ControlFlow::Break(())
        }
        Candidate::Rejected(source) => {
            rejected.get_or_insert(source);
            ControlFlow::Continue(())
        }
        Candidate::None => ControlFlow::Continue(()),
    }
}

/// [`on_event`] for a UI message stream part.
fn on_ui_part(
    data: &[u8],
    message_id: &mut Option<String>,
    trace_id: &mut Option<Found>,
    no_trace: &mut bool,
    rejected: &mut Option<Source>,
) -> ControlFlow<()> {
    let found = trace::ui::from_ui_part(data);
    if let Some(m) = found.message_id {
        message_id.get_or_insert(m);
    }
    if found.no_trace {
        *no_trace = true;
        return ControlFlow::Break(());
    }
    take_trace_id(found.trace_id, trace_id, rejected)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRACE: &str = "tr-eaf19740d012e3a3e64accc2bf6d17bc";

    fn delta(text: &str) -> String {
        format!(
            "data: {{\"type\": \"response.output_text.delta\", \"item_id\": \"msg_1\", \"delta\": \"{text}\"}}\n\n"
        )
    }

    /// Feeds `input` in chunks of `size`; returns the stream offset `feed` reported, if any.
    fn run(insp: &mut Inspector, input: &[u8], size: usize) -> Option<usize> {
        let mut off = 0;
        let mut hit = None;
        for c in input.chunks(size) {
            if !insp.is_done() {
                if let Some(n) = insp.feed(c) {
                    assert!(n <= c.len());
                    assert!(hit.is_none());
                    hit = Some(off + n);
                }
            }
            off += c.len();
        }
        hit
    }

    #[test]
    fn agent_event_with_crlf_yields_offset_after_blank_line() {
        let s = format!(
            "{}data: {{\"trace_id\": \"{TRACE}\"}}\r\n\r\ndata: [DONE]\r\n\r\n",
            delta("hi").replace('\n', "\r\n")
        );
        let want = s.find("[DONE]").unwrap() - "data: ".len();
        for size in 1..=s.len() {
            let mut insp = Inspector::sse(1 << 20);
            let at = run(&mut insp, s.as_bytes(), size).expect("found");
            // A CRLF split between chunks: the offset may stop after the CR.
            assert!(
                at == want || (at == want - 1 && at % size == 0),
                "{size}: {at}"
            );
            assert_eq!(insp.trace_id().unwrap().id, TRACE);
            assert_eq!(insp.trace_id().unwrap().source, Source::AgentEvent);
            assert!(insp.is_done());
            assert_eq!(insp.feed(b"data: {\"trace_id\": \"tr-2\"}\n\n"), None);
        }
    }

    #[test]
    fn first_valid_trace_id_wins_and_rejections_are_remembered() {
        let s = "data: {\"trace_id\": \"MLFLOW_NO_OP_SPAN_TRACE_ID\"}\n\ndata: {\"trace_id\": \"tr-1\"}\n\ndata: {\"trace_id\": \"tr-2\"}\n\n";
        let mut insp = Inspector::sse(1 << 20);
        assert!(insp.feed(s.as_bytes()).is_some());
        assert_eq!(insp.trace_id().unwrap().id, "tr-1");
        assert_eq!(insp.rejected(), Some(Source::AgentEvent));
    }

    #[test]
    fn client_request_id_then_trace() {
        let s = "event: trace\ndata: {\"type\": \"trace.client_request_id\", \"client_request_id\": \"req-1\"}\n\n\
                 data: {\"type\": \"trace.client_request_id\", \"client_request_id\": \"req-2\"}\n\n";
        let mut insp = Inspector::sse(1 << 20);
        assert_eq!(insp.feed(s.as_bytes()), None);
        assert_eq!(insp.client_request_id(), Some("req-1"));
        assert!(!insp.is_done());
        assert_eq!(insp.trace_id(), None);
    }

    #[test]
    fn json_body_found_at_finish() {
        let body =
            br#"{"output":[],"metadata":{"trace_id":"tr-200fee060856a08ecceb11f29f7d0c74"}}"#;
        let mut insp = Inspector::json(1 << 20);
        for c in body.chunks(5) {
            assert_eq!(insp.feed(c), None);
        }
        assert!(insp.finish());
        assert_eq!(insp.trace_id().unwrap().source, Source::ResponseMetadata);
        assert!(!insp.finish());

        let mut insp = Inspector::json(10);
        insp.feed(&body[..8]);
        assert!(!insp.overflowed());
        insp.feed(&body[8..]);
        assert!(insp.overflowed());
        assert!(insp.is_done());
        assert!(!insp.finish());
        assert_eq!(insp.trace_id(), None);
    }

    #[test]
    fn sse_finish_discards_an_unterminated_event() {
        let mut insp = Inspector::sse(1 << 20);
        insp.feed(format!("data: {{\"trace_id\": \"{TRACE}\"}}\n").as_bytes());
        assert!(!insp.finish());
        assert_eq!(insp.trace_id(), None);
    }

    #[test]
    fn ui_stream_message_id_then_trace_id() {
        let s = "data: {\"type\":\"start\",\"messageId\":\"m-1\"}\n\n\
                 data: {\"type\":\"text-delta\",\"id\":\"t\",\"delta\":\"say \\\"traceId\\\" and \\\"messageId\\\"\"}\n\n\
                 data: {\"type\":\"data-traceId\",\"data\":\"tr-1\"}\n\ndata: [DONE]\n\n";
        for size in 1..=s.len() {
            let mut insp = Inspector::ui_messages(1 << 20);
            let at = run(&mut insp, s.as_bytes(), size).expect("found");
            assert_eq!(&s[at..], "data: [DONE]\n\n", "{size}");
            assert_eq!(insp.message_id(), Some("m-1"));
            assert_eq!(insp.trace_id().unwrap().id, "tr-1");
            assert_eq!(insp.trace_id().unwrap().source, Source::UiDataPart);
        }
        // Agent shapes are not looked for in a UI stream, nor UI shapes in an agent stream.
        let mut insp = Inspector::ui_messages(1 << 20);
        assert_eq!(insp.feed(b"data: {\"trace_id\": \"tr-2\"}\n\n"), None);
        assert!(!insp.is_done());
        let mut insp = Inspector::sse(1 << 20);
        assert_eq!(insp.feed(s.as_bytes()), None);
        assert_eq!(insp.message_id(), None);
    }

    #[test]
    fn ui_stream_without_trace_ends_inspection_without_offset() {
        let s = "data: {\"type\":\"start\",\"messageId\":\"m-1\"}\n\n\
                 data: {\"type\":\"data-traceId\",\"data\":null}\n\n\
                 data: {\"type\":\"data-traceId\",\"data\":\"tr-late\"}\n\n";
        let mut insp = Inspector::ui_messages(1 << 20);
        assert_eq!(insp.feed(s.as_bytes()), None);
        assert!(insp.no_trace() && insp.is_done());
        assert_eq!(insp.trace_id(), None);
        assert_eq!(insp.message_id(), Some("m-1"));
    }

    #[test]
    fn overflow_stops_inspection() {
        let mut insp = Inspector::sse(64);
        let big = format!("data: {}\n\n", "x".repeat(100));
        let s = format!("{big}data: {{\"trace_id\": \"{TRACE}\"}}\n\n");
        assert_eq!(run(&mut insp, s.as_bytes(), 7), None);
        assert!(insp.overflowed());
        assert!(insp.is_done());
        assert_eq!(insp.trace_id(), None);
    }
}
