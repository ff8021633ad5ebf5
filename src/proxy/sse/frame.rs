//! Incremental `text/event-stream` framing (WHATWG HTML, "Interpreting an event stream").
//!
//! [`Framer`] turns a byte stream, delivered in chunks split at arbitrary points, into the data
//! of each dispatched event:
//!
//! - lines end in LF, CRLF or a lone CR; a CR that ends one chunk and an LF that starts the next
//!   are ONE line end;
//! - a blank line ends (dispatches) an event; an event without `data` lines dispatches nothing;
//! - the values of an event's `data:` lines are joined with `\n`; one space after the colon is
//!   dropped; a line without a colon is a field with an empty value (`data` alone is an empty
//!   data line);
//! - a line starting with `:` is a comment; a UTF-8 BOM at the very start of the stream is
//!   dropped (anywhere else it is content);
//! - an event whose data never ends with a blank line (the stream stops mid-event) is never
//!   dispatched, as the standard says.
//!
//! What it deliberately does not do: keep `event:`, `id:` and `retry:` values. They are
//! recognised (as not `data`) and skipped, so a named event has its data handed over like any
//! other; the proxy has no use for the names or for reconnection ids. It also never looks at the
//! bytes it does not need: comment and other non-`data` lines are skipped in place.
//!
//! Each event is handed over with the range of the current chunk that holds all of its data,
//! when it does lie wholly within the chunk (the common case): a caller can then pre-filter with
//! ONE substring search over the whole chunk instead of one per event ([`Event::within`]).
//!
//! Memory is bounded: the only thing kept across chunks is the current event's data (plus a few
//! bytes of line state). An event whose data would grow past `max_data` stops framing for the
//! rest of the stream ([`Framer::overflowed`]); the buffer is freed. The data buffer is reused
//! from event to event, so framing allocates only while it grows to the largest event seen.

use std::ops::{ControlFlow, Range};

use memchr::{memchr, memchr2};

const BOM: &[u8] = b"\xEF\xBB\xBF";
const DATA: &[u8] = b"data";
/// `Line::Name::matched` once the name can no longer be `data`.
const NOT_DATA: u8 = u8::MAX;

/// Where the framer is within the current line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Line {
    /// Nothing of the line seen yet.
    Start,
    /// Inside the field name, no colon yet; `matched` bytes of it equal the start of `data`
    /// ([`NOT_DATA`] once it cannot be `data`). Only that is needed to classify the line.
    Name { matched: u8 },
    /// Inside a `data` value. `fresh` until a value byte has been seen: the one optional space
    /// after the colon may arrive in the next chunk.
    Data { fresh: bool },
    /// Inside a line the inspector has no use for (comment, `event`, `id`, `retry`, unknown).
    Skip,
}

/// Whether the stream's first bytes have been checked for a BOM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bom {
    /// This many bytes of the stream so far equal the start of a BOM.
    Matching(u8),
    Done,
}

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event<'a> {
    /// The event's data: its `data` lines' values joined with `\n`.
    pub data: &'a [u8],
    /// A range of the chunk being fed that contains every byte of `data` (the event's lines up
    /// to its blank line), or `None` when the event began in an earlier chunk. No byte sequence
    /// without a line end can occur in `data` unless it occurs in `chunk[within]`.
    pub within: Option<Range<usize>>,
}

/// Incremental SSE framing with bounded memory; see the module documentation.
#[derive(Debug)]
pub struct Framer {
    max_data: usize,
    line: Line,
    bom: Bom,
    /// The previous chunk ended in a CR: an LF starting the next one belongs to that line end.
    pending_cr: bool,
    /// The current event has at least one `data` line (its data may still be empty).
    has_data: bool,
    /// The current event's data so far, joined with `\n`. Reused across events.
    data: Vec<u8>,
    /// Where in the current chunk the current event began, if it did in this chunk.
    event_start: Option<usize>,
    overflowed: bool,
}

impl Framer {
    /// A framer that gives up on events whose data exceeds `max_data` bytes.
    pub fn new(max_data: usize) -> Self {
        Self {
            max_data,
            line: Line::Start,
            bom: Bom::Matching(0),
            pending_cr: false,
            has_data: false,
            data: Vec::new(),
            event_start: None,
            overflowed: false,
        }
    }

    /// Frames the next chunk, calling `on_event` with every event it completes.
    ///
    /// When `on_event` answers `Break`, framing stops right after that event's blank line and
    /// this returns how many bytes of `chunk` that is (including a CRLF's LF, when it is in this
    /// chunk). The framer is then in a consistent state: feeding the rest of the chunk continues
    /// the stream. Otherwise the whole chunk is consumed and this returns `None`.
    pub fn feed<F>(&mut self, chunk: &[u8], mut on_event: F) -> Option<usize>
    where
        F: FnMut(Event<'_>) -> ControlFlow<()>,
    {
        if self.overflowed {
            return None;
        }
        let mut start = 0;
        if let Bom::Matching(seen) = self.bom {
            // The BOM may arrive split across chunks, like anything else.
            let mut seen = usize::from(seen);
            loop {
                let Some(&b) = chunk.get(start) else {
                    self.bom = Bom::Matching(u8::try_from(seen).unwrap_or(0));
                    return None;
                };
                if BOM.get(seen) == Some(&b) {
                    seen += 1;
                    start += 1;
                    if seen == BOM.len() {
                        self.bom = Bom::Done;
                        break;
                    }
                } else {
                    // Not a BOM after all: the bytes held back are content. They hold no line
                    // end, so no event can complete here.
                    self.bom = Bom::Done;
                    self.scan(BOM.get(..seen).unwrap_or_default(), 0, &mut on_event);
                    break;
                }
            }
        }
        self.scan(chunk, start, &mut on_event)
    }

    /// Whether an event's data went past the cap; framing has stopped for good.
    pub fn overflowed(&self) -> bool {
        self.overflowed
    }

    /// Frames `chunk[start..]`; see [`Framer::feed`].
    fn scan<F>(&mut self, chunk: &[u8], start: usize, on_event: &mut F) -> Option<usize>
    where
        F: FnMut(Event<'_>) -> ControlFlow<()>,
    {
        let mut pos = start;
        if self.pending_cr {
            if let Some(&first) = chunk.get(pos) {
                self.pending_cr = false;
                if first == b'\n' {
                    pos += 1;
                }
            }
        }
        // An event whose data is still empty and whose line state is clean lies wholly in this
        // chunk (or later ones): its bytes start here.
        self.event_start = (self.line == Line::Start && !self.has_data).then_some(pos);
        loop {
            let rest = match chunk.get(pos..) {
                Some(rest) if !rest.is_empty() && !self.overflowed => rest,
                _ => return None,
            };
            // A blank line right after a line end is the most common line of all (every event
            // ends with one): take it without a search.
            let end = match rest.first() {
                Some(b'\n' | b'\r') => 0,
                _ => match memchr2(b'\n', b'\r', rest) {
                    Some(end) => end,
                    None => {
                        self.segment(rest);
                        return None;
                    }
                },
            };
            let (line, term) = rest.split_at(end);
            self.segment(line);
            let mut used = end + 1;
            if term.first() == Some(&b'\r') {
                match term.get(1) {
                    Some(b'\n') => used += 1,
                    Some(_) => {}
                    None => self.pending_cr = true,
                }
            }
            let line_start = pos;
            pos += used;
            match std::mem::replace(&mut self.line, Line::Start) {
                Line::Start => {
                    // A blank line: dispatch, and the next event starts after it.
                    let within = self.event_start.map(|s| s..line_start);
                    self.event_start = Some(pos);
                    if self.dispatch(within, on_event).is_break() {
                        return Some(pos);
                    }
                }
                // `data` without a colon: a data line with an empty value.
                Line::Name { matched } if usize::from(matched) == DATA.len() => self.begin_data(),
                Line::Name { .. } | Line::Data { .. } | Line::Skip => {}
            }
        }
    }

    /// Takes in a piece of the current line (no line-end bytes in it).
    fn segment(&mut self, seg: &[u8]) {
        if seg.is_empty() || self.overflowed {
            return;
        }
        match self.line {
            Line::Start => {
                // The common line, whole in one chunk: `data: …`.
                if let Some(value) = seg.strip_prefix(b"data:") {
                    self.begin_data();
                    self.line = Line::Data { fresh: true };
                    self.segment(value);
                } else {
                    self.line = Line::Name { matched: 0 };
                    self.name(seg);
                }
            }
            Line::Name { .. } => self.name(seg),
            Line::Data { fresh } => {
                let value = if fresh {
                    seg.strip_prefix(b" ").unwrap_or(seg)
                } else {
                    seg
                };
                self.line = Line::Data { fresh: false };
                self.append(value);
            }
            Line::Skip => {}
        }
    }

    /// Takes in a piece of the field name and, if the colon is in it, the start of the value.
    fn name(&mut self, seg: &[u8]) {
        let Line::Name { matched } = self.line else {
            return;
        };
        let (name, value) = match memchr(b':', seg) {
            Some(colon) => {
                let (name, rest) = seg.split_at(colon);
                (name, rest.get(1..))
            }
            None => (seg, None),
        };
        let matched = match DATA.get(usize::from(matched)..) {
            Some(want) if want.starts_with(name) => {
                u8::try_from(usize::from(matched) + name.len()).unwrap_or(NOT_DATA)
            }
            _ => NOT_DATA,
        };
        match value {
            None => self.line = Line::Name { matched },
            Some(value) if usize::from(matched) == DATA.len() => {
                self.begin_data();
                self.line = Line::Data { fresh: true };
                self.segment(value);
            }
            Some(_) => self.line = Line::Skip,
        }
    }

    /// A blank line: hands over the event's data, if it has any, and starts a new event.
    fn dispatch<F>(&mut self, within: Option<Range<usize>>, on_event: &mut F) -> ControlFlow<()>
    where
        F: FnMut(Event<'_>) -> ControlFlow<()>,
    {
        if !self.has_data || self.overflowed {
            return ControlFlow::Continue(());
        }
        let flow = on_event(Event {
            data: &self.data,
            within,
        });
        self.data.clear();
        self.has_data = false;
        flow
    }

    /// A new `data` line starts: lines after the first are joined with `\n`.
    fn begin_data(&mut self) {
        if self.has_data {
            self.append(b"\n");
        }
        self.has_data = true;
    }

    fn append(&mut self, bytes: &[u8]) {
        if bytes.len() > self.max_data.saturating_sub(self.data.len()) {
            // Give up on this stream and free what the event held.
            self.overflowed = true;
            self.has_data = false;
            self.data = Vec::new();
            return;
        }
        self.data.extend_from_slice(bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `chunks` and returns the data of every event.
    fn events(chunks: &[&[u8]]) -> Vec<String> {
        let mut f = Framer::new(1 << 20);
        let mut out = Vec::new();
        for c in chunks {
            let r = f.feed(c, |e| {
                check_within(c, &e);
                out.push(String::from_utf8_lossy(e.data).into_owned());
                ControlFlow::Continue(())
            });
            assert_eq!(r, None);
        }
        out
    }

    /// `within`, when given, holds every byte of the data (data lines are a subsequence of it).
    fn check_within(chunk: &[u8], e: &Event<'_>) {
        let Some(r) = e.within.clone() else { return };
        let raw = &chunk[r];
        for line in e.data.split(|&b| b == b'\n') {
            assert!(
                raw.windows(line.len().max(1)).any(|w| w == line) || line.is_empty(),
                "{:?} not in {:?}",
                String::from_utf8_lossy(line),
                String::from_utf8_lossy(raw)
            );
        }
    }

    /// Every way of cutting `input` in two or three pieces frames to the same events.
    fn all_splits(input: &[u8]) -> Vec<String> {
        let whole = events(&[input]);
        for i in 0..=input.len() {
            let (a, b) = input.split_at(i);
            assert_eq!(events(&[a, b]), whole, "split at {i}");
            for j in i..=input.len() {
                let (b1, c) = input.split_at(j);
                let b1 = &b1[i..];
                assert_eq!(events(&[a, b1, c]), whole, "split at {i},{j}");
            }
        }
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(events(&bytes), whole, "1-byte chunks");
        whole
    }

    #[test]
    fn lf_crlf_and_cr_line_ends() {
        for sep in ["\n", "\r\n", "\r"] {
            let input = format!("data: a{sep}{sep}data: b{sep}data: c{sep}{sep}").into_bytes();
            assert_eq!(all_splits(&input), ["a", "b\nc"], "{sep:?}");
        }
        // Mixed, and a CRLF split across chunks is one line end (not a blank line).
        assert_eq!(
            all_splits(b"data: a\r\ndata: b\rdata: c\n\r\n"),
            ["a\nb\nc"]
        );
        assert_eq!(events(&[b"data: a\r", b"\ndata: b\r\n\r\n"]), ["a\nb"]);
        // CR, an empty chunk, then LF: still one line end.
        assert_eq!(events(&[b"data: a\r", b"", b"\n", b"\n"]), ["a"]);
        // LF CR is two line ends: a blank line.
        assert_eq!(all_splits(b"data: a\n\rdata: b\n\n"), ["a", "b"]);
    }

    #[test]
    fn space_after_colon_and_empty_values() {
        assert_eq!(
            all_splits(b"data:x\n\ndata:  two\n\ndata:\n\ndata\n\ndata\ndata\n\n"),
            ["x", " two", "", "", "\n"]
        );
        // The optional space may arrive alone in the next chunk.
        assert_eq!(events(&[b"data:", b" x\n\n"]), ["x"]);
        assert_eq!(events(&[b"dat", b"a: x\n\n"]), ["x"]);
    }

    #[test]
    fn comments_fields_and_named_events() {
        assert_eq!(
            all_splits(
                b": ping\n\nevent: response.output_item.done\nid: 7\nretry: 10\ndata: {\"a\":1}\n: mid\ndatum: no\ndata2: no\nDATA: no\n\n"
            ),
            ["{\"a\":1}"]
        );
        // Events without data dispatch nothing; neither do leading blank lines.
        assert_eq!(
            all_splits(b"\n\n\nevent: x\n\nid: 1\n\n"),
            Vec::<String>::new()
        );
    }

    #[test]
    fn bom_only_at_the_start() {
        assert_eq!(all_splits(b"\xEF\xBB\xBFdata: a\n\n"), ["a"]);
        // A BOM that is not at the start is part of a field name: not `data`.
        assert_eq!(all_splits(b"data: a\n\n\xEF\xBB\xBFdata: b\n\n"), ["a"]);
        // A second BOM right after the first is content, too.
        assert_eq!(
            all_splits(b"\xEF\xBB\xBF\xEF\xBB\xBFdata: b\n\n"),
            Vec::<String>::new()
        );
        // A truncated BOM is content: its bytes start a field name.
        assert_eq!(all_splits(b"\xEF\xBBdata: b\n\ndata: c\n\n"), ["c"]);
        assert_eq!(events(&[b"\xEF", b"\xBB", b"\xBF", b"data: a\n\n"]), ["a"]);
    }

    #[test]
    fn unterminated_event_is_not_dispatched() {
        assert_eq!(all_splits(b"data: a\n\ndata: b\n"), ["a"]);
    }

    #[test]
    fn break_reports_the_offset_after_the_blank_line() {
        let input = b"data: a\r\n\r\ndata: b\r\n\r\ndata: c\n\n";
        let mut f = Framer::new(100);
        let at = f.feed(input, |e| {
            let want = if e.data == b"a" { 0..9 } else { 11..20 };
            assert_eq!(e.within, Some(want));
            if e.data == b"b" {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        });
        assert_eq!(at, Some(22));
        assert_eq!(&input[..22], b"data: a\r\n\r\ndata: b\r\n\r\n");
        // The rest continues the stream.
        let mut rest = Vec::new();
        assert_eq!(
            f.feed(&input[22..], |e| {
                assert_eq!(e.within, Some(0..8));
                rest.push(e.data.to_vec());
                ControlFlow::Continue(())
            }),
            None
        );
        assert_eq!(rest, [b"c".to_vec()]);

        // A CR ending the chunk: the offset is the chunk's end, the LF is skipped next time.
        let mut f = Framer::new(100);
        assert_eq!(f.feed(b"data: a\r\r", |_| ControlFlow::Break(())), Some(9));
        let mut n = 0;
        f.feed(b"\ndata: b\n\n", |_| {
            n += 1;
            ControlFlow::Continue(())
        });
        assert_eq!(n, 1);
    }

    #[test]
    fn overflow_stops_framing_and_frees_the_buffer() {
        let mut f = Framer::new(8);
        let mut seen = Vec::new();
        let mut push = |e: Event<'_>| {
            seen.push(e.data.to_vec());
            ControlFlow::Continue(())
        };
        f.feed(b"data: 12345678\n\n", &mut push);
        assert!(!f.overflowed());
        // Joined lines count: 4 + 1 + 4 = 9 > 8.
        f.feed(b"data: 1234\ndata: 5678\n\ndata: x\n\n", &mut push);
        assert!(f.overflowed());
        assert_eq!(f.data.capacity(), 0);
        f.feed(b"data: y\n\n", &mut push);
        assert_eq!(seen, [b"12345678".to_vec()]);
    }

    #[test]
    fn long_comment_and_other_lines_do_not_count_against_the_cap() {
        let mut input = b": ".to_vec();
        input.extend(std::iter::repeat_n(b'x', 100));
        input.extend_from_slice(b"\nevent: ");
        input.extend(std::iter::repeat_n(b'y', 100));
        input.extend_from_slice(b"\ndata: ok\n\n");
        let mut f = Framer::new(8);
        let mut seen = Vec::new();
        for c in input.chunks(7) {
            f.feed(c, |e| {
                seen.push(e.data.to_vec());
                ControlFlow::Continue(())
            });
        }
        assert!(!f.overflowed());
        assert_eq!(seen, [b"ok".to_vec()]);
    }
}
