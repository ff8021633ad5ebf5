//! The response inspector (`proxy::sse`, `proxy::trace`) against the real captures in
//! `tests/fixtures/samples/` and synthetic streams, fed the way `proxy/body.rs` feeds it.
//!
//! Every capture is fed (a) as one frame, (b) in 1-byte frames, (c) split at random points
//! (1,000 proptest cases per capture). For each run: the frames reassemble to the body (the
//! inspector only ever borrows them); the offset `feed` reports lies within its frame, just after
//! the blank line that ends the trace event; injecting an event there (as the proxy does) leaves
//! every original event intact; and the id found is the capture's.
//!
//! The `11x_ai_sdk_app_*` captures are the chat app template's own `/api/chat` answers (its
//! server, at databricks/app-templates 2a4c792, against the example agent), fed to
//! `Inspector::ui_messages` as the proxy does on an `ai-sdk-app` route: there the message id
//! (the `start` part) must be found as well.
//!
//! Deriving a body from a capture file (the fixtures are kept byte-for-byte as captured):
//! - a file starting with `HTTP/` (`100_*`, `105_*`) holds the status line and headers first:
//!   the body starts after the first `\r\n\r\n`;
//! - a file ending in a line `HTTP <code> total=<seconds>s` (`106_*`) has that line appended by
//!   the capture tool (curl's `-w "\nHTTP %{http_code} total=%{time_total}s\n"`): the body ends
//!   before the `\n` that precedes it.

use std::ops::ControlFlow;

use feedback_proxy::proxy::sse::{Framer, Inspector};
use feedback_proxy::proxy::trace::{self, Found, HeaderId, Source};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

const SAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/samples");
const CAP: usize = 1 << 20;
/// What the proxy injects at the offset `feed` reports (CONTRACT §3.2).
const INJECTED: &[u8] =
    b"event: feedback-proxy.trace\ndata: {\"messageId\":\"m\",\"traceId\":\"t\"}\n\n";

/// A capture and what the inspector must find in it.
struct Sample {
    name: String,
    body: Vec<u8>,
    json: bool,
    /// An AI SDK UI message stream (the chat app template's).
    ui: bool,
    trace_id: Option<&'static str>,
    rejected: Option<Source>,
    message_id: Option<&'static str>,
}

/// The body of a capture file; see the module documentation.
fn body_of(raw: &[u8]) -> Vec<u8> {
    let mut body = raw;
    if body.starts_with(b"HTTP/") {
        let at = body
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("a capture with a status line has a blank line after its headers");
        body = &body[at + 4..];
    }
    if let Some(nl) = body
        .strip_suffix(b"\n")
        .and_then(|b| b.iter().rposition(|&c| c == b'\n'))
    {
        let last = &body[nl + 1..];
        if last.starts_with(b"HTTP ") && last.windows(7).any(|w| w == b" total=") {
            body = &body[..nl];
        }
    }
    body.to_vec()
}

/// Every `*.sse.txt` capture and the non-streaming one, each with its expectation. A capture
/// without an expectation here fails the test, so a new fixture cannot go unchecked.
fn samples() -> Vec<Sample> {
    type Expect = (Option<&'static str>, Option<Source>, Option<&'static str>);
    let expect = |name: &str| -> Expect {
        match name {
            n if n.starts_with("90_") => (None, None, None),
            n if n.starts_with("91_") => (Some("tr-eaf19740d012e3a3e64accc2bf6d17bc"), None, None),
            n if n.starts_with("100_") => (Some("tr-200fee060856a08ecceb11f29f7d0c74"), None, None),
            n if n.starts_with("102_") => (Some("tr-c67f4a0495144b768a942472bf669d1b"), None, None),
            n if n.starts_with("105_") => (None, None, None),
            n if n.starts_with("106_") => (None, Some(Source::AgentEvent), None),
            n if n.starts_with("110_") => (
                Some("tr-5a31b67c30deeea6f6029818bdd03425"),
                None,
                Some("0e641697-74ff-45ca-bd5f-7336c62c3910"),
            ),
            // The agent failed mid-stream: the template says `data-traceId: null`.
            n if n.starts_with("111_") => {
                (None, None, Some("06f57b17-e9eb-49ef-8f59-06751d3d448f"))
            }
            n => panic!("no expectation for sample {n}: add one to tests/inspector.rs"),
        }
    };
    let mut out = Vec::new();
    for entry in std::fs::read_dir(SAMPLES).expect("samples directory") {
        let path = entry.expect("dir entry").path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let json = name.starts_with("100_");
        if !(name.ends_with(".sse.txt") || json) {
            continue;
        }
        let (trace_id, rejected, message_id) = expect(&name);
        out.push(Sample {
            body: body_of(&std::fs::read(&path).expect("read sample")),
            ui: name.contains("_ai_sdk_app_"),
            name,
            json,
            trace_id,
            rejected,
            message_id,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    assert_eq!(
        out.len(),
        8,
        "samples: {:?}",
        out.iter().map(|s| &s.name).collect::<Vec<_>>()
    );
    out
}

/// What one run of the inspector over some frames gave.
struct Run {
    /// The frames as the proxy would forward them, with [`INJECTED`] at the reported offset.
    forwarded: Vec<u8>,
    /// The frames reassembled, exactly as fed.
    fed: Vec<u8>,
    /// Stream offset just after the trace event, if `feed` reported one.
    at: Option<usize>,
    trace_id: Option<Found>,
    rejected: Option<Source>,
    overflowed: bool,
    message_id: Option<String>,
}

/// Feeds `frames` as `proxy/body.rs` does: only while the inspector is not done, `finish` at
/// the end, the proxy's event injected at the reported offset.
fn run(mut insp: Inspector, frames: &[&[u8]]) -> Run {
    let mut r = Run {
        forwarded: Vec::new(),
        fed: Vec::new(),
        at: None,
        trace_id: None,
        rejected: None,
        overflowed: false,
        message_id: None,
    };
    for frame in frames {
        let split = if insp.is_done() {
            None
        } else {
            insp.feed(frame)
        };
        match split {
            Some(n) => {
                assert!(
                    n <= frame.len(),
                    "offset {n} past a frame of {}",
                    frame.len()
                );
                assert!(r.at.is_none(), "a second offset");
                r.at = Some(r.fed.len() + n);
                r.forwarded.extend_from_slice(&frame[..n]);
                r.forwarded.extend_from_slice(INJECTED);
                r.forwarded.extend_from_slice(&frame[n..]);
            }
            None => r.forwarded.extend_from_slice(frame),
        }
        r.fed.extend_from_slice(frame);
    }
    insp.finish();
    r.trace_id = insp.trace_id().cloned();
    r.rejected = insp.rejected();
    r.overflowed = insp.overflowed();
    r.message_id = insp.message_id().map(str::to_owned);
    r
}

/// The data of every event of a whole stream.
fn events(stream: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    Framer::new(usize::MAX).feed(stream, |e| {
        out.push(e.data.to_vec());
        ControlFlow::Continue(())
    });
    out
}

/// Everything a run over `sample` must satisfy, whatever the frames.
fn check(sample: &Sample, frames: &[&[u8]]) -> Result<(), TestCaseError> {
    let insp = if sample.json {
        Inspector::json(CAP)
    } else if sample.ui {
        Inspector::ui_messages(CAP)
    } else {
        Inspector::sse(CAP)
    };
    let r = run(insp, frames);
    let name = &sample.name;
    prop_assert_eq!(
        &r.fed,
        &sample.body,
        "{}: the frames do not reassemble to the body",
        name
    );
    prop_assert_eq!(
        r.trace_id.as_ref().map(|f| f.id.as_str()),
        sample.trace_id,
        "{}: trace id",
        name
    );
    prop_assert_eq!(r.rejected, sample.rejected, "{}: rejected", name);
    prop_assert_eq!(
        r.message_id.as_deref(),
        sample.message_id,
        "{}: message id",
        name
    );
    prop_assert!(!r.overflowed);
    if sample.json {
        prop_assert_eq!(r.at, None);
        prop_assert_eq!(&r.forwarded, &sample.body);
        return Ok(());
    }
    match (r.at, sample.trace_id) {
        (None, None) => prop_assert_eq!(&r.forwarded, &sample.body),
        (Some(at), Some(id)) => {
            // Just after the blank line ending the trace event (the captures use LF only).
            let before = &sample.body[..at];
            prop_assert!(
                before.ends_with(b"\n\n"),
                "{}: offset {} not after a blank line",
                name,
                at
            );
            let last = events(before).pop().unwrap_or_default();
            prop_assert!(
                last.windows(id.len()).any(|w| w == id.as_bytes()),
                "{}: the event before offset {} is not the trace event",
                name,
                at
            );
            // The injected event sits between two whole events: every original event survives.
            let mut want = events(&sample.body);
            let idx = events(before).len();
            want.insert(idx, b"{\"messageId\":\"m\",\"traceId\":\"t\"}".to_vec());
            prop_assert_eq!(
                events(&r.forwarded),
                want,
                "{}: events after injection",
                name
            );
        }
        (at, want) => prop_assert!(
            false,
            "{}: offset {:?} but expected id {:?}",
            name,
            at,
            want
        ),
    }
    Ok(())
}

#[test]
fn samples_as_one_frame() {
    for s in samples() {
        check(&s, &[&s.body]).unwrap();
    }
}

#[test]
fn samples_in_one_byte_frames() {
    for s in samples() {
        let frames: Vec<&[u8]> = s.body.chunks(1).collect();
        check(&s, &frames).unwrap();
    }
}

/// Cut points (with repeats, so empty frames occur too) → frames.
fn cut(body: &[u8], mut cuts: Vec<usize>) -> Vec<&[u8]> {
    cuts.sort_unstable();
    let mut frames = Vec::new();
    let mut prev = 0;
    for c in cuts {
        frames.push(&body[prev..c]);
        prev = c;
    }
    frames.push(&body[prev..]);
    frames
}

#[test]
fn samples_split_at_random_points() {
    for s in samples() {
        let mut runner = TestRunner::new(Config {
            cases: 1000,
            failure_persistence: None,
            ..Config::default()
        });
        let len = s.body.len();
        let strategy = prop::collection::vec(0..=len, 0..48);
        let cases = std::cell::Cell::new(0);
        runner
            .run(&strategy, |cuts| {
                cases.set(cases.get() + 1);
                check(&s, &cut(&s.body, cuts))
            })
            .unwrap_or_else(|e| panic!("{}: {e}", s.name));
        assert!(
            cases.get() >= 1000,
            "{}: only {} cases",
            s.name,
            cases.get()
        );
    }
}

#[test]
fn sample_bodies_are_derived_from_the_captures() {
    let by_name = |p: &str| {
        samples()
            .into_iter()
            .find(|s| s.name.starts_with(p))
            .unwrap()
    };
    let s = by_name("100_");
    assert!(s.body.starts_with(b"{\"object\":\"response\""));
    assert!(s.body.ends_with(b"}}"));
    assert_eq!(s.body.len(), 268, "content-length of the capture");
    let s = by_name("105_");
    assert!(s.body.starts_with(b"data: "));
    let s = by_name("106_");
    assert!(
        s.body.ends_with(b"data: [DONE]\n\n"),
        "{:?}",
        String::from_utf8_lossy(&s.body)
    );
}

// ---- synthetic streams ----

const TID: &str = "tr-0123456789abcdef0123456789abcdef";

fn delta(text: &str) -> String {
    format!(
        "event: response.output_text.delta\ndata: {{\"type\": \"response.output_text.delta\", \"item_id\": \"msg_1\", \"delta\": \"{text}\"}}\n\n"
    )
}

/// Runs `stream` as one frame, in 1-byte frames and in 7-byte frames; all must agree.
fn run_all(stream: &[u8], cap: usize) -> Run {
    let one = run(Inspector::sse(cap), &[stream]);
    for size in [1, 7] {
        let frames: Vec<&[u8]> = stream.chunks(size).collect();
        let r = run(Inspector::sse(cap), &frames);
        assert_eq!(r.fed, stream);
        assert_eq!(r.trace_id, one.trace_id, "frames of {size}");
        assert_eq!(r.rejected, one.rejected, "frames of {size}");
        assert_eq!(r.overflowed, one.overflowed, "frames of {size}");
    }
    one
}

#[test]
fn databricks_output_chat_completions_stream() {
    let s = format!(
        "data: {{\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"Hi\"}}}}]}}\n\n\
         data: {{\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"choices\":[{{\"index\":0,\"delta\":{{}},\"finish_reason\":\"stop\"}}],\
         \"databricks_output\":{{\"databricks_request_id\":\"r1\",\"trace\":{{\"info\":{{\"trace_id\":\"{TID}\",\"state\":\"OK\"}},\"data\":{{\"spans\":[]}}}}}}}}\n\n\
         data: [DONE]\n\n"
    );
    let r = run_all(s.as_bytes(), CAP);
    let f = r.trace_id.unwrap();
    assert_eq!((f.id.as_str(), f.source), (TID, Source::DatabricksOutput));
    assert_eq!(r.at, s.find("data: [DONE]"));
}

#[test]
fn databricks_output_responses_stream_with_named_events_crlf_and_bom() {
    let s = format!(
        "\u{feff}{}event: response.output_item.done\r\ndata: {{\"type\":\"response.output_item.done\",\
         \"item\":{{\"type\":\"message\",\"id\":\"m1\",\"content\":[{{\"type\":\"output_text\",\"text\":\"Hi\"}}]}},\r\n\
         data: \"databricks_output\":{{\"trace\":{{\"info\":{{\"trace_id\":\"trace:/main.agents/0a1b2c\"}}}}}}}}\r\n\r\n\
         : keep-alive\r\n\r\ndata: [DONE]\r\n\r\n",
        delta("Hi").replace('\n', "\r\n")
    );
    let r = run_all(s.as_bytes(), CAP);
    let f = r.trace_id.unwrap();
    assert_eq!(
        (f.id.as_str(), f.source),
        ("trace:/main.agents/0a1b2c", Source::DatabricksOutput)
    );
    assert_eq!(r.at, s.find(": keep-alive"));
}

#[test]
fn cr_only_line_ends_and_multi_line_data() {
    let s =
        format!(": hi\r\rdata: {{\rdata: \"trace_id\":\rdata:  \"{TID}\"}}\r\rdata: [DONE]\r\r");
    let r = run_all(s.as_bytes(), CAP);
    assert_eq!(r.trace_id.unwrap().id, TID);
    assert_eq!(r.at, s.find("data: [DONE]"));
}

#[test]
fn seed_001_client_request_id_event() {
    let s = format!(
        "{}data: {{\"type\": \"trace.client_request_id\", \"client_request_id\": \"req-abc123\"}}\n\n{}data: [DONE]\n\n",
        delta("a"),
        delta("b")
    );
    let mut insp = Inspector::sse(CAP);
    for c in s.as_bytes().chunks(3) {
        assert_eq!(insp.feed(c), None);
    }
    assert!(!insp.finish());
    assert_eq!(insp.client_request_id(), Some("req-abc123"));
    assert_eq!(insp.trace_id(), None);
    assert_eq!(insp.rejected(), None);
}

#[test]
fn a_2_mib_event_stops_inspection_and_every_byte_still_passes() {
    let big = format!(
        "data: {{\"type\":\"response.output_text.delta\",\"delta\":\"{}\"}}\n\n",
        "x".repeat(2 << 20)
    );
    let s = format!(
        "{}{big}data: {{\"trace_id\": \"{TID}\"}}\n\ndata: [DONE]\n\n",
        delta("a")
    );
    for size in [1, 4096, 16 << 10, s.len()] {
        let frames: Vec<&[u8]> = s.as_bytes().chunks(size).collect();
        let r = run(Inspector::sse(CAP), &frames);
        assert!(r.overflowed, "frames of {size}");
        assert_eq!(r.trace_id, None);
        assert_eq!(r.at, None);
        assert_eq!(r.fed, s.as_bytes());
        assert_eq!(r.forwarded, s.as_bytes());
    }
    // Under the cap, the same stream yields its id.
    let r = run(Inspector::sse(4 << 20), &[s.as_bytes()]);
    assert_eq!(r.trace_id.unwrap().id, TID);
}

#[test]
fn a_json_body_over_the_cap_is_not_inspected() {
    let body = format!(
        "{{\"pad\":\"{}\",\"metadata\":{{\"trace_id\":\"{TID}\"}}}}",
        "x".repeat(2 << 20)
    );
    let frames: Vec<&[u8]> = body.as_bytes().chunks(16 << 10).collect();
    let r = run(Inspector::json(CAP), &frames);
    assert!(r.overflowed);
    assert_eq!(r.trace_id, None);
    let r = run(Inspector::json(4 << 20), &frames);
    assert_eq!(r.trace_id.unwrap().source, Source::ResponseMetadata);
}

#[test]
fn invalid_trace_ids_are_rejected_and_inspection_goes_on() {
    for bad in [
        format!("\"{}\"", "a".repeat(257)),
        "\"tr-\\u0007abc\"".to_owned(),
        "\"tr-\\nabc\"".to_owned(),
        "\"MLFLOW_NO_OP_SPAN_TRACE_ID\"".to_owned(),
        "\"\"".to_owned(),
        "17".to_owned(),
    ] {
        let s = format!("data: {{\"trace_id\": {bad}}}\n\ndata: {{\"trace_id\": \"{TID}\"}}\n\n");
        let r = run_all(s.as_bytes(), CAP);
        assert_eq!(r.rejected, Some(Source::AgentEvent), "{bad}");
        assert_eq!(r.trace_id.unwrap().id, TID, "{bad}");
    }
    let s =
        "data: {\"type\": \"trace.client_request_id\", \"client_request_id\": \"req-\\u0000\"}\n\n";
    let r = run_all(s.as_bytes(), CAP);
    assert_eq!(r.rejected, Some(Source::ClientRequestIdEvent));
    // A 256-byte id is still fine.
    let id = format!("tr-{}", "f".repeat(253));
    let s = format!("data: {{\"trace_id\": \"{id}\"}}\n\n");
    assert_eq!(run_all(s.as_bytes(), CAP).trace_id.unwrap().id, id);
}

#[test]
fn ordinary_text_mentioning_trace_id_is_not_an_id() {
    let s = format!(
        "{}data: [DONE]\n\n",
        delta("the \\\"trace_id\\\" field is tr-1")
    );
    let r = run_all(s.as_bytes(), CAP);
    assert_eq!(r.trace_id, None);
    assert_eq!(r.rejected, None);
}

#[test]
fn trace_id_from_configured_headers() {
    let name = http::header::HeaderName::from_static("x-mlflow-trace-id");
    let mut h = http::HeaderMap::new();
    h.insert(&name, http::HeaderValue::from_static(TID));
    assert_eq!(
        trace::from_headers(&h, std::slice::from_ref(&name)),
        HeaderId::Found(Found {
            id: TID.to_owned(),
            source: Source::Header
        })
    );
    h.insert(
        &name,
        http::HeaderValue::from_static("MLFLOW_NO_OP_SPAN_TRACE_ID"),
    );
    assert_eq!(
        trace::from_headers(&h, std::slice::from_ref(&name)),
        HeaderId::Rejected
    );
}
