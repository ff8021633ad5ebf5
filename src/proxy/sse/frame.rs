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
//! Memory is bounded: the only thing kept across chunks is the current event's data (plus a few
//! bytes of line state). An event whose data would grow past `max_data` stops framing for the
//! rest of the stream ([`Framer::overflowed`]); the buffer is freed. The data buffer is reused
//! from event to event, so framing allocates only while it grows to the largest event seen.

use std::ops::ControlFlow;

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
            overflowed: false,
        }
    }

    /// Frames the next chunk, calling `on_event` with the data of every event it completes.
    ///
    /// When `on_event` answers `Break`, framing stops right after that event's blank line and
    /// this returns how many bytes of `chunk` that is (including a CRLF's LF, when it is in this
    /// chunk). The framer is then in a consistent state: feeding the rest of the chunk continues
    /// the stream. Otherwise the whole chunk is consumed and this returns `None`.
    pub fn feed<F>(&mut self, chunk: &[u8], mut on_event: F) -> Option<usize>
    where
        F: FnMut(&[u8]) -> ControlFlow<()>,
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
        F: FnMut(&[u8]) -> ControlFlow<()>,
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
        loop {
            let rest = match chunk.get(pos..) {
                Some(rest) if !rest.is_empty() && !self.overflowed => rest,
                _ => return None,
            };
            let Some(end) = memchr2(b'\n', b'\r', rest) else {
                self.segment(rest);
                return None;
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
            pos += used;
            if self.end_line(on_event).is_break() {
                return Some(pos);
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

    /// The current line ended.
    fn end_line<F>(&mut self, on_event: &mut F) -> ControlFlow<()>
    where
        F: FnMut(&[u8]) -> ControlFlow<()>,
    {
        match std::mem::replace(&mut self.line, Line::Start) {
            Line::Start => self.dispatch(on_event),
            // `data` without a colon: a data line with an empty value.
            Line::Name { matched } if usize::from(matched) == DATA.len() => {
                self.begin_data();
                ControlFlow::Continue(())
            }
            Line::Name { .. } | Line::Data { .. } | Line::Skip => ControlFlow::Continue(()),
        }
    }

    /// A blank line: hands over the event's data, if it has any, and starts a new event.
    fn dispatch<F>(&mut self, on_event: &mut F) -> ControlFlow<()>
    where
        F: FnMut(&[u8]) -> ControlFlow<()>,
    {
        if !self.has_data || self.overflowed {
            return ControlFlow::Continue(());
        }
        let flow = on_event(&self.data);
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
            let r = f.feed(c, |d| {
                out.push(String::from_utf8_lossy(d).into_owned());
                ControlFlow::Continue(())
            });
            assert_eq!(r, None);
        }
        out
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
        let at = f.feed(input, |d| {
            if d == b"b" {
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
            f.feed(&input[22..], |d| {
                rest.push(d.to_vec());
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
        let mut push = |d: &[u8]| {
            seen.push(d.to_vec());
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
            f.feed(c, |d| {
                seen.push(d.to_vec());
                ControlFlow::Continue(())
            });
        }
        assert!(!f.overflowed());
        assert_eq!(seen, [b"ok".to_vec()]);
    }
}
