//! The SSE timing client (scenario 3).
//!
//! Opens `streams` HTTP/1.1 connections first, then starts every stream, staggered evenly over
//! one event interval so that all streams are open together for the whole run while their event
//! ticks are spread out (not one synchronized burst per tick). Per stream it measures:
//! - time to first event: request sent → the bytes of event 0 arrive;
//! - inter-event gaps: arrival of event i → arrival of event i+1;
//! - delivery lag: the upstream's wall-clock send time (`sent_us`) → arrival;
//! - lost events (never arrived) and reordered events (`seq` not the previous + 1).
//!
//! Everything is bounded by `timeout`; a stream cut by it counts its missing events as lost.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::StatusCode;
use http_body_util::BodyExt;
use serde_json::json;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::time::Instant;

use crate::stats::summary;
use crate::target::{CHAT_REQUEST, Target};

pub struct Options {
    pub url: String,
    pub streams: usize,
    pub events: u32,
    pub interval: Duration,
    pub repeat: u32,
    pub timeout: Duration,
    /// Send a client-chosen message id (`x-message-id: PREFIX-REPEAT-STREAM`, unique per
    /// request) instead of letting the proxy mint one.
    pub message_id_prefix: Option<String>,
}

/// Connections opened at once before the run.
const CONNECT_CONCURRENCY: usize = 200;

#[derive(Default)]
struct StreamResult {
    ttfb_ns: Option<u64>,
    gaps_ns: Vec<u64>,
    lags_us: Vec<u64>,
    received: u32,
    reordered: u32,
    complete: bool,
    /// A client-chosen message id was sent and the proxy answered with another one.
    id_replaced: bool,
    error: Option<String>,
}

/// Samples pooled over every stream of every repetition.
#[derive(Default)]
struct Agg {
    ttfb: Vec<u64>,
    gaps: Vec<u64>,
    lags: Vec<u64>,
    failed: u64,
    incomplete: u64,
    lost: u64,
    reordered: u64,
    ids_replaced: u64,
    errors: Vec<String>,
}

pub async fn run(o: Options) -> Result<(), String> {
    let target = Target::parse(&o.url)?;
    let mut agg = Agg::default();
    for rep in 0..o.repeat.max(1) {
        run_once(&o, &target, rep, &mut agg).await;
    }
    let (ttfb50, ttfb99, ttfb_max) = summary(&mut agg.ttfb);
    let (gap50, gap99, gap_max) = summary(&mut agg.gaps);
    let (lag50, lag99, _) = summary(&mut agg.lags);
    let us = |ns: u64| (ns as f64 / 100.0).round() / 10.0;
    println!(
        "{}",
        json!({
            "streams": o.streams, "events": o.events, "repeat": o.repeat,
            "interval_ms": o.interval.as_millis() as u64,
            "failed": agg.failed, "incomplete": agg.incomplete, "lost": agg.lost,
            "reordered": agg.reordered, "ids_replaced": agg.ids_replaced,
            "ttfb_samples": agg.ttfb.len(), "gap_samples": agg.gaps.len(),
            "ttfb_p50_us": us(ttfb50), "ttfb_p99_us": us(ttfb99), "ttfb_max_us": us(ttfb_max),
            "gap_p50_us": us(gap50), "gap_p99_us": us(gap99), "gap_max_us": us(gap_max),
            "lag_p50_us": lag50, "lag_p99_us": lag99,
            "errors": agg.errors,
        })
    );
    Ok(())
}

async fn run_once(o: &Options, target: &Target, rep: u32, agg: &mut Agg) {
    let deadline = Instant::now() + o.timeout;
    let path = format!(
        "/invocations?sse={}&interval_ms={}",
        o.events,
        o.interval.as_millis()
    );
    let (go_tx, go_rx) = watch::channel(false);
    let (ready_tx, mut ready_rx) = mpsc::channel::<()>(o.streams.max(1));
    let connects = std::sync::Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
    let mut tasks = Vec::with_capacity(o.streams);
    for i in 0..o.streams {
        let target = target.clone();
        let path = path.clone();
        let mut go = go_rx.clone();
        let ready = ready_tx.clone();
        let connects = connects.clone();
        let stagger = o.interval.mul_f64(i as f64 / o.streams as f64);
        let events = o.events;
        let message_id = o
            .message_id_prefix
            .as_ref()
            .map(|p| format!("{p}-{rep}-{i}"));
        tasks.push(tokio::spawn(async move {
            let conn = {
                let _permit = connects.acquire().await;
                target.connect().await
            };
            let _ = ready.send(()).await;
            let mut send = match conn {
                Ok(s) => s,
                Err(e) => {
                    return StreamResult {
                        error: Some(e),
                        ..StreamResult::default()
                    };
                }
            };
            if go.wait_for(|g| *g).await.is_err() {
                return StreamResult::default();
            }
            tokio::time::sleep(stagger).await;
            let mut headers = vec![("accept", "text/event-stream")];
            if let Some(id) = &message_id {
                headers.push(("x-message-id", id.as_str()));
            }
            let req = match target.post(&path, CHAT_REQUEST, &headers) {
                Ok(r) => r,
                Err(e) => {
                    return StreamResult {
                        error: Some(e),
                        ..StreamResult::default()
                    };
                }
            };
            match tokio::time::timeout_at(
                deadline,
                one_stream(&mut send, req, events, message_id.as_deref()),
            )
            .await
            {
                Ok(r) => r,
                Err(_) => StreamResult {
                    error: Some("timed out".into()),
                    ..StreamResult::default()
                },
            }
        }));
    }
    drop(ready_tx);
    let mut connected = 0;
    while connected < o.streams {
        match tokio::time::timeout_at(deadline, ready_rx.recv()).await {
            Ok(Some(())) => connected += 1,
            _ => break,
        }
    }
    let _ = go_tx.send(true);

    for t in tasks {
        let r = match t.await {
            Ok(r) => r,
            Err(e) => StreamResult {
                error: Some(format!("task failed: {e}")),
                ..StreamResult::default()
            },
        };
        if let Some(e) = r.error {
            agg.failed += 1;
            if agg.errors.len() < 3 && !agg.errors.contains(&e) {
                agg.errors.push(e);
            }
        }
        if !r.complete {
            agg.incomplete += 1;
        }
        agg.lost += u64::from(o.events.saturating_sub(r.received));
        agg.reordered += u64::from(r.reordered);
        agg.ids_replaced += u64::from(r.id_replaced);
        agg.ttfb.extend(r.ttfb_ns);
        agg.gaps.extend(r.gaps_ns);
        agg.lags.extend(r.lags_us);
    }
}

async fn one_stream(
    send: &mut hyper::client::conn::http1::SendRequest<http_body_util::Full<Bytes>>,
    req: http::Request<http_body_util::Full<Bytes>>,
    events: u32,
    message_id: Option<&str>,
) -> StreamResult {
    let mut r = StreamResult::default();
    let t0 = Instant::now();
    let res = match send.send_request(req).await {
        Ok(res) => res,
        Err(e) => {
            r.error = Some(format!("request: {e}"));
            return r;
        }
    };
    if res.status() != StatusCode::OK {
        r.error = Some(format!("status {}", res.status()));
        return r;
    }
    if let Some(id) = message_id {
        r.id_replaced = res
            .headers()
            .get("x-message-id")
            .and_then(|v| v.to_str().ok())
            != Some(id);
    }
    let mut body = res.into_body();
    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    let mut last: Option<Instant> = None;
    let mut expected: u32 = 0;
    r.gaps_ns.reserve(events as usize);
    r.lags_us.reserve(events as usize);
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(f) => f,
            Err(e) => {
                r.error = Some(format!("body: {e}"));
                return r;
            }
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        let at = Instant::now();
        let wall_us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        buf.extend_from_slice(&data);
        let mut consumed = 0;
        while let Some(end) = memchr::memmem::find(&buf[consumed..], b"\n\n") {
            let event = &buf[consumed..consumed + end];
            consumed += end + 2;
            if memchr::memmem::find(event, b"[DONE]").is_some() {
                r.complete = true;
                continue;
            }
            let Some(seq) = number_after(event, b"\"seq\":") else {
                continue;
            };
            if r.ttfb_ns.is_none() {
                r.ttfb_ns = Some(at.duration_since(t0).as_nanos() as u64);
            }
            if let Some(prev) = last {
                r.gaps_ns.push(at.duration_since(prev).as_nanos() as u64);
            }
            last = Some(at);
            if let Some(sent) = number_after(event, b"\"sent_us\":") {
                r.lags_us.push(wall_us.saturating_sub(sent));
            }
            if seq as u32 != expected {
                r.reordered += 1;
            }
            expected = (seq as u32).wrapping_add(1);
            r.received += 1;
        }
        buf.drain(..consumed);
    }
    r
}

/// The unsigned integer right after `key` in `event`.
fn number_after(event: &[u8], key: &[u8]) -> Option<u64> {
    let at = memchr::memmem::find(event, key)? + key.len();
    let digits = event[at..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .count();
    std::str::from_utf8(&event[at..at + digits])
        .ok()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::number_after;

    #[test]
    fn numbers() {
        let ev = br#"data: {"delta":"x","seq":12,"sent_us":1700000000000000}"#;
        assert_eq!(number_after(ev, b"\"seq\":"), Some(12));
        assert_eq!(
            number_after(ev, b"\"sent_us\":"),
            Some(1_700_000_000_000_000)
        );
        assert_eq!(number_after(ev, b"\"nope\":"), None);
    }
}
