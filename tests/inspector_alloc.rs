//! The inspector allocates nothing while ordinary events pass (after warm-up: its one event
//! buffer grows to the largest event seen, then is reused).
//!
//! A separate test binary because it installs a counting global allocator. The count is per
//! thread, so whatever the test harness does on its own threads does not disturb it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use feedback_proxy::proxy::sse::Inspector;

struct Counting;

thread_local! {
    // `const` and without a destructor: safe to touch from inside the allocator.
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

fn count() {
    ALLOCATIONS.with(|c| c.set(c.get() + 1));
}

// SAFETY: every call is forwarded unchanged to the system allocator; counting touches only a
// const-initialised thread-local `Cell`, which neither allocates nor panics.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: same contract as ours.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

/// A long run of ordinary events: Responses text deltas of varying size (some named, some with
/// CRLF line ends, some multi-line), keep-alive comments and an occasional `output_item.done`.
fn ordinary_events(n: usize) -> Vec<u8> {
    let mut s = String::new();
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    for i in 0..n {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let len = 1 + (rng % 120) as usize;
        let text: String = "lorem ipsum dolor sit amet "
            .chars()
            .cycle()
            .take(len)
            .collect();
        let ev = format!(
            "data: {{\"type\": \"response.output_text.delta\", \"item_id\": \"msg_{i}\", \"delta\": \"{text}\"}}\n\n"
        );
        match i % 50 {
            0 => s.push_str(&format!("event: response.output_text.delta\n{ev}")),
            1 => s.push_str(&ev.replace('\n', "\r\n")),
            2 => s.push_str(": keep-alive\n\n"),
            3 => s.push_str("data: {\"type\": \"response.output_text.delta\",\ndata: \"delta\": \"two lines\"}\n\n"),
            4 => s.push_str(&format!(
                "data: {{\"type\": \"response.output_item.done\", \"item\": {{\"id\": \"msg_{i}\", \"content\": [{{\"text\": \"{}\", \"type\": \"output_text\"}}], \"role\": \"assistant\", \"type\": \"message\"}}}}\n\n",
                "lorem ipsum ".repeat(40)
            )),
            _ => s.push_str(&ev),
        }
    }
    s.into_bytes()
}

#[test]
fn no_allocation_per_ordinary_event_after_warm_up() {
    let stream = ordinary_events(20_000);
    let mut insp = Inspector::sse(1 << 20);

    // Warm-up: one pass in 4 KiB frames grows the event buffer to the largest event.
    for frame in stream.chunks(4096) {
        assert_eq!(insp.feed(frame), None);
    }

    let before = allocations();
    let mut frames = 0u64;
    for size in [1usize, 7, 1500, 16 << 10] {
        for frame in stream.chunks(size) {
            assert_eq!(insp.feed(frame), None);
            frames += 1;
        }
    }
    let during = allocations() - before;
    assert!(!insp.is_done() && !insp.overflowed());
    assert_eq!(
        during,
        0,
        "{during} allocations while feeding {frames} frames ({} bytes, 4 passes)",
        stream.len()
    );

    // The counter does count: a trace id found (a `String` the inspector keeps) allocates.
    let before = allocations();
    insp.feed(b"data: {\"trace_id\": \"tr-0123456789abcdef0123456789abcdef\"}\n\n");
    assert!(insp.trace_id().is_some());
    assert!(allocations() > before);
}

/// The chat app template's UI message stream: ordinary parts (text deltas, steps) as its server
/// writes them (tests/fixtures/samples/110_*), once the `start` part has named the message.
fn ordinary_ui_parts(n: usize) -> Vec<u8> {
    let mut s = String::new();
    for i in 0..n {
        let text = "lorem ipsum dolor sit amet ".repeat(1 + i % 5);
        match i % 40 {
            0 => s.push_str("data: {\"type\":\"start-step\"}\n\n"),
            1 => s.push_str(&format!(
                "data: {{\"type\":\"text-start\",\"id\":\"msg_{i}\"}}\n\n"
            )),
            2 => s.push_str("data: {\"type\":\"finish-step\"}\n\n"),
            _ => s.push_str(&format!(
                "data: {{\"type\":\"text-delta\",\"id\":\"msg_{i}\",\"delta\":\"{text}\"}}\n\n"
            )),
        }
    }
    s.into_bytes()
}

#[test]
fn no_allocation_per_ordinary_ui_part_after_warm_up() {
    let stream = ordinary_ui_parts(20_000);
    let mut insp = Inspector::ui_messages(1 << 20);
    assert_eq!(
        insp.feed(b"data: {\"type\":\"start\",\"messageId\":\"0e641697-74ff-45ca-bd5f-7336c62c3910\"}\n\n"),
        None
    );
    assert!(insp.message_id().is_some());
    for frame in stream.chunks(4096) {
        assert_eq!(insp.feed(frame), None);
    }
    let before = allocations();
    for size in [1usize, 7, 1500, 16 << 10] {
        for frame in stream.chunks(size) {
            assert_eq!(insp.feed(frame), None);
        }
    }
    let during = allocations() - before;
    assert!(!insp.is_done() && !insp.overflowed());
    assert_eq!(during, 0, "{during} allocations while feeding UI parts");
    insp.feed(
        b"data: {\"type\":\"data-traceId\",\"data\":\"tr-0123456789abcdef0123456789abcdef\"}\n\n",
    );
    assert!(insp.trace_id().is_some());
}
