//! `feedback-proxy export`: every vote a listing query matches, as JSON lines or CSV, with the
//! same fields as `GET /api/review/feedback`.
//!
//! Streams: the store is read in keyset pages of [`PAGE`] votes and each page is written before
//! the next is read, so memory stays flat whatever the size of the export. Progress goes to
//! stderr once a second for long exports, and a last line says how many were written.

use std::io::Write;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::Review;
use crate::store::{ListQuery, ReviewCursor, SharedStore, StoreError};

/// Votes read per store round trip.
pub const PAGE: u32 = 1000;

/// The columns of the CSV export, in order (the listing's field names).
pub const CSV_COLUMNS: [&str; 13] = [
    "time",
    "user",
    "chatId",
    "messageId",
    "name",
    "value",
    "polarity",
    "comment",
    "route",
    "deliveryStatus",
    "deliveryError",
    "traceId",
    "traceUrl",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Jsonl,
    Csv,
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot write the export: {0}")]
    Write(#[from] std::io::Error),
    #[error("cannot write the export: {0}")]
    Csv(#[from] csv::Error),
}

/// Where items go.
enum Sink<W: Write> {
    Csv(Box<csv::Writer<W>>),
    Jsonl(std::io::BufWriter<W>),
}

impl<W: Write> Sink<W> {
    fn new(format: Format, out: W) -> Result<Self, ExportError> {
        Ok(match format {
            Format::Csv => {
                let mut w = csv::Writer::from_writer(out);
                w.write_record(CSV_COLUMNS)?;
                Self::Csv(Box::new(w))
            }
            Format::Jsonl => Self::Jsonl(std::io::BufWriter::new(out)),
        })
    }

    fn write(&mut self, item: &serde_json::Map<String, Value>) -> Result<(), ExportError> {
        match self {
            Self::Csv(w) => w.write_record(CSV_COLUMNS.iter().map(|c| cell(item.get(*c))))?,
            Self::Jsonl(w) => {
                serde_json::to_writer(&mut *w, item).map_err(std::io::Error::from)?;
                w.write_all(b"\n")?;
            }
        }
        Ok(())
    }

    fn finish(self) -> Result<(), ExportError> {
        match self {
            Self::Csv(mut w) => w.flush()?,
            Self::Jsonl(mut w) => w.flush()?,
        }
        Ok(())
    }
}

/// Writes every vote matching `q` (its `limit` is ignored) to `out`, newest first; returns how
/// many. `progress` is called about once a second with the count so far.
pub async fn run(
    review: &Review,
    store: &SharedStore,
    mut q: ListQuery,
    format: Format,
    out: impl Write,
    mut progress: impl FnMut(u64),
) -> Result<u64, ExportError> {
    q.limit = PAGE;
    let mut sink = Sink::new(format, out)?;
    let mut after: Option<ReviewCursor> = None;
    let mut written = 0u64;
    let mut last_report = Instant::now();
    loop {
        let rows = store.review_votes(&q, after.as_ref()).await?;
        let Some(last) = rows.last() else { break };
        after = Some(last.cursor());
        for r in &rows {
            sink.write(&review.item(r))?;
        }
        written += rows.len() as u64;
        if last_report.elapsed() >= Duration::from_secs(1) {
            progress(written);
            last_report = Instant::now();
        }
        if rows.len() < PAGE as usize {
            break;
        }
    }
    sink.finish()?;
    Ok(written)
}

/// A CSV cell: strings as they are, `null` empty, other JSON as JSON text.
fn cell(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

/// The command line's filters (`feedback-proxy export`), as the listing's query parameters.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Filters {
    /// Only votes changed at or after this time (RFC 3339, a UTC date, or epoch ms).
    #[arg(long)]
    pub from: Option<String>,
    /// Only votes changed before this time.
    #[arg(long)]
    pub to: Option<String>,
    /// negative, positive or all.
    #[arg(long)]
    pub value: Option<String>,
    /// Only this assessment name.
    #[arg(long)]
    pub name: Option<String>,
    /// Only this agent route (its path, e.g. /invocations).
    #[arg(long)]
    pub route: Option<String>,
    /// Only votes with (true) or without (false) a comment.
    #[arg(long)]
    pub has_comment: Option<bool>,
}

impl Filters {
    /// The listing query these filters make, validated exactly as `GET /api/review/feedback`
    /// validates its parameters (same messages, named after the parameters).
    pub fn query(
        &self,
        thresholds: crate::domain::Thresholds,
    ) -> Result<ListQuery, crate::error::Error> {
        let mut s = url::form_urlencoded::Serializer::new(String::new());
        for (k, v) in [
            ("from", &self.from),
            ("to", &self.to),
            ("value", &self.value),
            ("name", &self.name),
            ("route", &self.route),
        ] {
            if let Some(v) = v {
                s.append_pair(k, v);
            }
        }
        if let Some(c) = self.has_comment {
            s.append_pair("has_comment", if c { "true" } else { "false" });
        }
        let qs = s.finish();
        super::query::feedback(Some(&qs), std::time::SystemTime::now(), thresholds).map(|(q, _)| q)
    }
}
