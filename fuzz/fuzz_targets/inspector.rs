//! Fuzz target for the response inspector (`src/proxy/sse.rs`, `src/proxy/sse/frame.rs`,
//! `src/proxy/trace.rs`): arbitrary bytes, split into frames at arbitrary points, in both modes.
//!
//! Input layout: byte 0 picks the mode (bit 7: JSON body; else SSE, with bit 6 an AI SDK UI
//! message stream, the chat app template's) and the cap (low bits); byte 1 the largest frame
//! size; bytes 2..10 seed the split points; the rest is the response body.
//!
//! Checked, beyond "no panic":
//! - every offset `feed` returns is within its frame and just after a line end;
//! - the outcome (trace id, client request id, first rejection, overflow; for a UI stream the
//!   message id and the "no trace" signal) and the stream offset
//!   of the trace event's end are the same for the split feed as for one whole frame (the offset
//!   may stop one byte early when a CRLF is split between frames: after the CR, the frame end);
//! - the `Framer` fed in frames hands over exactly the events of a plain, non-incremental
//!   reference reading of the WHATWG rules written below, and overflows exactly when it does;
//! - the inspector's trace id is the first valid one among the reference events that pass the
//!   pre-filter.
#![no_main]

use std::ops::ControlFlow;

use libfuzzer_sys::fuzz_target;

// The proxy's own source files, compiled into this crate (see fuzz/Cargo.toml for why).
#[allow(dead_code)]
#[path = "../../src/proxy/sse.rs"]
mod sse;
#[allow(dead_code)]
#[path = "../../src/proxy/trace.rs"]
mod trace;

use sse::{Event, Framer, Inspector};
use trace::{Candidate, Found, Source};

const CAPS: [usize; 8] = [0, 1, 8, 32, 64, 256, 4096, 1 << 20];

fuzz_target!(|input: &[u8]| {
    let (head, body) = input.split_at(input.len().min(10));
    let flags = head.first().copied().unwrap_or(0);
    let max_frame = usize::from(head.get(1).copied().unwrap_or(0)) + 1;
    let mut seed = 0u64;
    for b in head.iter().skip(2) {
        seed = (seed << 8) | u64::from(*b);
    }
    let cap = CAPS[usize::from(flags) % CAPS.len()];
    let frames = split(body, max_frame, seed);
    if flags & 0x80 != 0 {
        check_json(body, &frames, cap);
    } else {
        check_sse(body, &frames, cap, flags & 0x40 != 0);
        check_framer(body, &frames, cap);
    }
});

/// Splits `body` into frames of 1..=max bytes chosen by a xorshift generator from `seed`
/// (empty frames included now and then: a transport may deliver them).
fn split(body: &[u8], max: usize, seed: u64) -> Vec<&[u8]> {
    let mut state = seed | 1;
    let mut frames = Vec::new();
    let mut rest = body;
    while !rest.is_empty() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let n = usize::try_from(state % (max as u64 + 1)).unwrap_or(1);
        let (a, b) = rest.split_at(n.min(rest.len()));
        frames.push(a);
        rest = b;
    }
    frames
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Outcome {
    trace_id: Option<Found>,
    client_request_id: Option<String>,
    rejected: Option<Source>,
    overflowed: bool,
    /// A UI stream's message id (its `start` part) and whether it said it has no trace.
    message_id: Option<String>,
    no_trace: bool,
    /// Stream offset just after the event that yielded the trace id.
    at: Option<usize>,
}

/// Feeds the frames the way `proxy/body.rs` does (stops feeding once done).
fn inspect(mut insp: Inspector, body: &[u8], frames: &[&[u8]]) -> Outcome {
    let mut off = 0;
    let mut at = None;
    for f in frames {
        if !insp.is_done() {
            if let Some(n) = insp.feed(f) {
                assert!(n <= f.len(), "offset {n} past frame of {}", f.len());
                assert!(at.is_none(), "a second offset");
                assert!(insp.trace_id().is_some(), "offset without trace id");
                let g = off + n;
                assert!(
                    matches!(body.get(g.wrapping_sub(1)), Some(b'\n' | b'\r')),
                    "offset {g} not after a line end"
                );
                at = Some(g);
            }
        }
        off += f.len();
    }
    let found_at_end = insp.finish();
    assert!(!found_at_end || insp.trace_id().is_some());
    assert!(!insp.finish(), "finish found something twice");
    if insp.trace_id().is_some() || insp.overflowed() || insp.no_trace() {
        assert!(insp.is_done());
    }
    Outcome {
        trace_id: insp.trace_id().cloned(),
        client_request_id: insp.client_request_id().map(str::to_owned),
        rejected: insp.rejected(),
        overflowed: insp.overflowed(),
        message_id: insp.message_id().map(str::to_owned),
        no_trace: insp.no_trace(),
        at,
    }
}

fn check_sse(body: &[u8], frames: &[&[u8]], cap: usize, ui: bool) {
    let new = || {
        if ui {
            Inspector::ui_messages(cap)
        } else {
            Inspector::sse(cap)
        }
    };
    let whole = inspect(new(), body, &[body]);
    let split = inspect(new(), body, frames);
    if let Some(g) = whole.at {
        assert!(whole.trace_id.is_some());
        assert!(g <= body.len());
    }
    match (whole.at, split.at) {
        (Some(w), Some(s)) if s + 1 == w => {
            // Only a CRLF split between two frames may stop the offset after the CR.
            assert_eq!(body.get(s - 1), Some(&b'\r'));
            assert_eq!(body.get(s), Some(&b'\n'));
            let mut end = 0;
            let frame_end = frames.iter().any(|f| {
                end += f.len();
                end == s
            });
            assert!(frame_end, "offset {s} is not a frame end");
        }
        (w, s) => assert_eq!(w, s, "offsets differ"),
    }
    assert_eq!(
        Outcome { at: None, ..whole },
        Outcome {
            at: None,
            ..split.clone()
        },
        "split feed disagrees with one frame"
    );

    // The outcome is what the first events of the reference reading that pass the pre-filter
    // give, up to and including the first valid trace id.
    let reference = reference_events(body, cap);
    let mut want = Outcome {
        trace_id: None,
        client_request_id: None,
        rejected: None,
        overflowed: reference.overflowed,
        message_id: None,
        no_trace: false,
        at: split.at,
    };
    if ui {
        for data in reference.events.iter().filter(|d| passes_ui_prefilter(d)) {
            let ex = trace::ui::from_ui_part(data);
            if let Some(m) = ex.message_id {
                want.message_id.get_or_insert(m);
            }
            if ex.no_trace {
                want.no_trace = true;
                want.overflowed = false;
                break;
            }
            match ex.trace_id {
                Candidate::Valid(f) => {
                    want.trace_id = Some(f);
                    want.overflowed = false;
                    break;
                }
                Candidate::Rejected(s) => {
                    want.rejected.get_or_insert(s);
                }
                Candidate::None => {}
            }
        }
        assert_eq!(split, want, "UI outcome differs from the reference reading");
        return;
    }
    for data in reference.events.iter().filter(|d| passes_prefilter(d)) {
        let ex = trace::from_event(data);
        match ex.client_request_id {
            Candidate::Valid(f) => {
                want.client_request_id.get_or_insert(f.id);
            }
            Candidate::Rejected(s) => {
                want.rejected.get_or_insert(s);
            }
            Candidate::None => {}
        }
        match ex.trace_id {
            Candidate::Valid(f) => {
                want.trace_id = Some(f);
                // Inspection stops here: a later overflow is never reached.
                want.overflowed = false;
                break;
            }
            Candidate::Rejected(s) => {
                want.rejected.get_or_insert(s);
            }
            Candidate::None => {}
        }
    }
    assert_eq!(split, want, "outcome differs from the reference reading");
}

fn passes_ui_prefilter(data: &[u8]) -> bool {
    memchr::memmem::find(data, b"\"messageId\"").is_some()
        || memchr::memmem::find(data, b"traceId\"").is_some()
}

fn passes_prefilter(data: &[u8]) -> bool {
    memchr::memmem::find(data, b"\"trace_id\"").is_some()
        || memchr::memmem::find(data, b"\"client_request_id\"").is_some()
}

fn check_framer(body: &[u8], frames: &[&[u8]], cap: usize) {
    let mut framer = Framer::new(cap);
    let mut got: Vec<Vec<u8>> = Vec::new();
    for f in frames {
        let r = framer.feed(f, |e| {
            assert!(e.data.len() <= cap);
            check_within(f, &e);
            got.push(e.data.to_vec());
            ControlFlow::Continue(())
        });
        assert_eq!(r, None);
    }
    let want = reference_events(body, cap);
    assert_eq!(got, want.events, "framer events differ from the reference");
    assert_eq!(framer.overflowed(), want.overflowed, "overflow differs");

    // Stopping at every event and feeding the rest of the frame continues the same stream.
    let mut framer = Framer::new(cap);
    let mut again: Vec<Vec<u8>> = Vec::new();
    for f in frames {
        let mut rest: &[u8] = f;
        while let Some(n) = framer.feed(rest, |e| {
            check_within(rest, &e);
            again.push(e.data.to_vec());
            ControlFlow::Break(())
        }) {
            assert!(n >= 1 && n <= rest.len());
            rest = &rest[n..];
        }
    }
    assert_eq!(again, want.events, "break-and-resume differs");
}

/// `within`, when given, is a range of the frame holding every data line of the event, which
/// is what lets the inspector pre-filter by searching the frame once.
fn check_within(frame: &[u8], e: &Event<'_>) {
    let Some(r) = e.within.clone() else { return };
    assert!(
        r.start <= r.end && r.end <= frame.len(),
        "{r:?} out of a frame of {}",
        frame.len()
    );
    let raw = &frame[r];
    assert!(e.data.len() <= raw.len());
    for line in e.data.split(|&b| b == b'\n') {
        assert!(
            line.is_empty() || memchr::memmem::find(raw, line).is_some(),
            "a data line is not within the reported range"
        );
    }
    if passes_prefilter(e.data) {
        assert!(
            passes_prefilter(raw),
            "a key in the data but not in the range"
        );
    }
}

fn check_json(body: &[u8], frames: &[&[u8]], cap: usize) {
    let whole = inspect(Inspector::json(cap), body, &[body]);
    let split = inspect(Inspector::json(cap), body, frames);
    assert_eq!(whole, split);
    assert_eq!(split.at, None);
    assert_eq!(split.overflowed, body.len() > cap);
}

struct Reference {
    events: Vec<Vec<u8>>,
    overflowed: bool,
}

/// The WHATWG event-stream rules, read literally over the whole body at once: no state machine,
/// no chunks. Events whose data would pass `cap` (counting lines as they are read, including an
/// unterminated last one) end the reading, as the framer's cap does.
fn reference_events(body: &[u8], cap: usize) -> Reference {
    let body = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body);
    let mut out = Reference {
        events: Vec::new(),
        overflowed: false,
    };
    let mut data: Vec<u8> = Vec::new();
    let mut has_data = false;
    let mut i = 0;
    while i < body.len() {
        let end = body[i..]
            .iter()
            .position(|&b| b == b'\n' || b == b'\r')
            .map(|p| i + p);
        let line = &body[i..end.unwrap_or(body.len())];
        let terminated = end.is_some();
        i = match end {
            Some(e) if body[e] == b'\r' && body.get(e + 1) == Some(&b'\n') => e + 2,
            Some(e) => e + 1,
            None => body.len(),
        };
        if line.is_empty() {
            if has_data {
                out.events.push(std::mem::take(&mut data));
                has_data = false;
            }
            continue;
        }
        let (name, value) = match line.iter().position(|&b| b == b':') {
            Some(c) => {
                let v = &line[c + 1..];
                (&line[..c], Some(v.strip_prefix(b" ").unwrap_or(v)))
            }
            None => (line, None),
        };
        // An unterminated last line counts only as far as the framer has seen it: a bare `data`
        // name has not become a data line yet.
        if name != b"data" || (!terminated && value.is_none()) {
            continue;
        }
        let mut add = Vec::new();
        if has_data {
            add.push(b'\n');
        }
        add.extend_from_slice(value.unwrap_or_default());
        if data.len() + add.len() > cap {
            out.overflowed = true;
            return out;
        }
        data.extend_from_slice(&add);
        has_data = true;
    }
    out
}
