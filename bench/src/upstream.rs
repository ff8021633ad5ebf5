//! The fast agent stand-in.
//!
//! `POST /invocations` (any path, any method) answers one of:
//! - the default: a fixed 1 KiB `application/json` answer shaped like an agent's (with a
//!   `databricks_output.trace.info.trace_id`, so the proxy's JSON inspector has real work);
//! - `?sse=N&interval_ms=M`: `text/event-stream`, N delta events M ms apart (the first at once),
//!   then the agent server's `{"trace_id": …}` event and `[DONE]`. Each delta carries `seq` and
//!   `sent_us` (wall clock, µs) so the client can check order and measure delivery;
//! - `&trace_header=1` adds an `x-bench-trace-id` response header (used to seed message links
//!   with trace ids for the feedback scenario, independently of body inspection).
//!
//! Events are paced against their own schedule (`start + i × interval`), not the previous
//! send, so slow polling by the peer never stretches the schedule of later events.

use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body::{Frame, SizeHint};
use http_body_util::{BodyExt, Either, Limited};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use crate::serve::{BenchBody, full};

/// The size of the JSON answer.
pub const JSON_SIZE: usize = 1024;
/// Request bodies larger than this are not read (the stand-in answers anyway).
const MAX_REQUEST: usize = 1 << 20;

static TRACE_SEQ: AtomicU64 = AtomicU64::new(1);

fn next_trace_id() -> String {
    format!("tr-{:032x}", TRACE_SEQ.fetch_add(1, Ordering::Relaxed))
}

/// The 1 KiB answer, built once.
fn json_answer() -> Bytes {
    static ANSWER: OnceLock<Bytes> = OnceLock::new();
    ANSWER
        .get_or_init(|| {
            let build = |pad: usize| {
                format!(
                    concat!(
                        r#"{{"object":"response","id":"resp_bench","output":[{{"type":"message","#,
                        r#""id":"msg_bench","role":"assistant","content":[{{"type":"output_text","#,
                        r#""text":"{}","annotations":[]}}]}}],"databricks_output":{{"trace":"#,
                        r#"{{"info":{{"trace_id":"tr-00000000000000000000000000b3c4d5"}}}}}}}}"#
                    ),
                    "x".repeat(pad)
                )
            };
            let base = build(0).len();
            Bytes::from(build(JSON_SIZE.saturating_sub(base)))
        })
        .clone()
}

/// Options read from the query string.
#[derive(Debug, Default, PartialEq)]
struct Query {
    sse: Option<u32>,
    interval_ms: u64,
    trace_header: bool,
}

fn parse_query(q: &str) -> Query {
    let mut out = Query {
        interval_ms: 20,
        ..Query::default()
    };
    for pair in q.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "sse" => out.sse = v.parse().ok(),
            "interval_ms" => out.interval_ms = v.parse().unwrap_or(20),
            "trace_header" => out.trace_header = v == "1",
            _ => {}
        }
    }
    out
}

pub async fn handle(req: Request<Incoming>) -> Response<BenchBody> {
    let q = parse_query(req.uri().query().unwrap_or(""));
    // Read the request like an agent would (and so that the connection stays reusable).
    if Limited::new(req.into_body(), MAX_REQUEST)
        .collect()
        .await
        .is_err()
    {
        let mut res = Response::new(full(r#"{"error":"request body unreadable"}"#));
        *res.status_mut() = StatusCode::BAD_REQUEST;
        return res;
    }
    let mut res = match q.sse {
        Some(n) => {
            let mut res = Response::new(Either::Right(SseBody::new(
                n,
                Duration::from_millis(q.interval_ms),
                next_trace_id(),
            )));
            res.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream; charset=utf-8"),
            );
            res
        }
        None => {
            let mut res = Response::new(full(json_answer()));
            res.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            res
        }
    };
    if q.trace_header {
        if let Ok(v) = HeaderValue::from_str(&next_trace_id()) {
            res.headers_mut().insert("x-bench-trace-id", v);
        }
    }
    res
}

/// N paced delta events, then the trace-id event and `[DONE]`.
pub struct SseBody {
    events: u32,
    next: u32,
    interval: Duration,
    start: Instant,
    sleep: Pin<Box<Sleep>>,
    trace_id: String,
    finished: bool,
}

impl SseBody {
    fn new(events: u32, interval: Duration, trace_id: String) -> Self {
        let start = Instant::now();
        Self {
            events,
            next: 0,
            interval,
            start,
            sleep: Box::pin(tokio::time::sleep_until(start)),
            trace_id,
            finished: false,
        }
    }
}

fn now_us() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros())
        .unwrap_or(0)
}

impl http_body::Body for SseBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if this.next < this.events {
            if this.next > 0 {
                ready!(this.sleep.as_mut().poll(cx));
            }
            let ev = format!(
                concat!(
                    r#"data: {{"type":"response.output_text.delta","item_id":"msg_bench","#,
                    r#""delta":"token ","seq":{},"sent_us":{}}}"#,
                    "\n\n"
                ),
                this.next,
                now_us()
            );
            this.next += 1;
            if this.next < this.events {
                let at = this.start + this.interval * this.next;
                this.sleep.as_mut().reset(at);
            }
            return Poll::Ready(Some(Ok(Frame::data(Bytes::from(ev)))));
        }
        if this.finished {
            return Poll::Ready(None);
        }
        this.finished = true;
        let tail = format!(
            "data: {{\"trace_id\": \"{}\"}}\n\ndata: [DONE]\n\n",
            this.trace_id
        );
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(tail)))))
    }

    fn is_end_stream(&self) -> bool {
        self.finished
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answer_is_one_kib_of_json() {
        let a = json_answer();
        assert_eq!(a.len(), JSON_SIZE);
        let v: serde_json::Value = serde_json::from_slice(&a).expect("valid JSON");
        assert!(v["databricks_output"]["trace"]["info"]["trace_id"].is_string());
    }

    #[test]
    fn query() {
        let q = parse_query("sse=64&interval_ms=5&trace_header=1");
        assert_eq!(q.sse, Some(64));
        assert_eq!(q.interval_ms, 5);
        assert!(q.trace_header);
        assert_eq!(parse_query("").sse, None);
    }
}
