//! Throughput of the response inspector (`proxy::sse::Inspector`) over a realistic agent stream.
//!
//! The stream (≈ 12 MB) is what a Responses-API agent sends: mostly
//! `response.output_text.delta` events with deltas of 1 to ~200 characters (most of them a token
//! or two), a `response.output_item.done` carrying the whole text of each message every few
//! hundred deltas, an occasional keep-alive comment, and the agent server's
//! `{"trace_id": "tr-…"}` event at the very end, so that every byte is inspected. It is fed in
//! frames of 1–16 KiB (random, fixed seed), as a network read would deliver it, and — a second
//! case — one frame per event, as a server that flushes every event would.
//!
//! Criterion prints the throughput in MB/s (`Throughput::Bytes`). Run it with
//! `cargo bench --bench inspector`; see docs/DEVELOPMENT.md.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use feedback_proxy::proxy::sse::Inspector;

const TRACE_ID: &str = "tr-0123456789abcdef0123456789abcdef";
const TARGET_BYTES: usize = 12 << 20;
const WORDS: &[&str] = &[
    "the",
    " quarterly",
    " revenue",
    " grew",
    " by",
    " 4",
    ".2%",
    " compared",
    " with",
    " 2024",
    ",",
    " driven",
    " mainly",
    " by",
    " the",
    " EMEA",
    " region",
    ".",
    "\\n\\n",
    " However",
    " margins",
    " narrowed",
    " because",
    " of",
    " higher",
    " input",
    " costs",
    " and",
    " a",
    " one-off",
    " write-down",
    " of",
    " \\\"legacy\\\"",
    " inventory",
    ".",
];

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// The stream and the end offset of each event in it.
fn stream(rng: &mut Rng) -> (Vec<u8>, Vec<usize>) {
    let mut out = String::with_capacity(TARGET_BYTES + (64 << 10));
    let mut ends = Vec::new();
    let mut message = 0;
    let mut text = String::new();
    while out.len() < TARGET_BYTES {
        // Deltas: mostly one or two tokens, sometimes a burst of up to ~200 characters.
        let tokens = match rng.below(100) {
            0..=69 => 1,
            70..=89 => 2 + rng.below(3),
            _ => 5 + rng.below(40),
        };
        let mut delta = String::new();
        for _ in 0..tokens {
            delta.push_str(WORDS[rng.below(WORDS.len())]);
        }
        out.push_str(&format!(
            "data: {{\"type\": \"response.output_text.delta\", \"item_id\": \"msg_{message}\", \"delta\": \"{delta}\"}}\n\n"
        ));
        ends.push(out.len());
        text.push_str(&delta);
        if rng.below(400) == 0 || text.len() > 8 << 10 {
            out.push_str(&format!(
                "data: {{\"type\": \"response.output_item.done\", \"item\": {{\"id\": \"msg_{message}\", \"content\": [{{\"text\": \"{text}\", \"type\": \"output_text\", \"annotations\": []}}], \"role\": \"assistant\", \"type\": \"message\"}}}}\n\n"
            ));
            ends.push(out.len());
            text.clear();
            message += 1;
        }
        if rng.below(2000) == 0 {
            out.push_str(": ping\n\n");
            ends.push(out.len());
        }
    }
    out.push_str(&format!("data: {{\"trace_id\": \"{TRACE_ID}\"}}\n\n"));
    ends.push(out.len());
    out.push_str("data: [DONE]\n\n");
    ends.push(out.len());
    (out.into_bytes(), ends)
}

/// Cuts `len` bytes into frames of 1–16 KiB.
fn network_frames(len: usize, rng: &mut Rng) -> Vec<(usize, usize)> {
    let mut frames = Vec::new();
    let mut at = 0;
    while at < len {
        let n = (1 + rng.below(16 << 10)).min(len - at);
        frames.push((at, at + n));
        at += n;
    }
    frames
}

/// Feeds every frame; the trace id is in the last events, so everything is inspected.
fn inspect(body: &[u8], frames: &[(usize, usize)]) -> usize {
    let mut insp = Inspector::sse(1 << 20);
    let mut hit = 0;
    for &(a, b) in frames {
        if insp.is_done() {
            break;
        }
        if let Some(n) = insp.feed(black_box(&body[a..b])) {
            hit = a + n;
        }
    }
    assert_eq!(insp.trace_id().map(|f| f.id.as_str()), Some(TRACE_ID));
    hit
}

fn bench(c: &mut Criterion) {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let (body, ends) = stream(&mut rng);
    let frames = network_frames(body.len(), &mut rng);
    let per_event: Vec<(usize, usize)> = std::iter::once(0)
        .chain(ends.iter().copied())
        .zip(ends.iter().copied())
        .collect();
    eprintln!(
        "inspector bench: {:.1} MB, {} events, {} network frames (1-16 KiB)",
        body.len() as f64 / 1e6,
        ends.len(),
        frames.len()
    );

    let mut g = c.benchmark_group("inspector");
    g.throughput(Throughput::Bytes(body.len() as u64));
    g.bench_function("responses_mix/frames_1-16KiB", |b| {
        b.iter(|| inspect(&body, &frames))
    });
    g.bench_function("responses_mix/frame_per_event", |b| {
        b.iter(|| inspect(&body, &per_event))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
