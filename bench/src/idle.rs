//! Idle streams at scale (scenario 4).
//!
//! Opens `streams` SSE streams (the upstream sends one event at once and then one every
//! `interval`), waits until every stream has its first event, then holds them all for `hold`
//! (longer than one interval, so that every stream also carries a real event while held),
//! reading the resident memory of the given processes before, when all are open, after the hold,
//! and 1 s after the servers have closed the streams' connections (their descriptor count back
//! where it was, waited for up to 30 s; `close_secs` says how long that took). Bounded by
//! `timeout` for the opening phase; the hold is fixed.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use http::StatusCode;
use http_body_util::BodyExt;
use serde_json::json;
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;

use crate::procfs::{self, Memory};
use crate::target::{CHAT_REQUEST, Target};

/// Descriptors a server may hold above its count before the streams (pooled upstream
/// connections, a log file opened meanwhile) and still count as having closed them.
const CLOSED_SLACK: usize = 16;
/// The longest wait for the server to close the streams' connections.
const CLOSE_WAIT: Duration = Duration::from_secs(30);

pub struct Options {
    pub url: String,
    pub streams: usize,
    pub interval: Duration,
    pub hold: Duration,
    pub connect_concurrency: usize,
    pub pids: Vec<u32>,
    pub timeout: Duration,
}

#[derive(Default)]
struct Counters {
    open: AtomicUsize,
    failed: AtomicUsize,
    events: AtomicU64,
}

pub async fn run(o: Options) -> Result<(), String> {
    let target = Target::parse(&o.url)?;
    let before = procfs::total(&o.pids)?;
    let fds_before: usize = o.pids.iter().map(|&p| procfs::fds(p)).sum();
    // Enough events that no stream ends while held; the upstream stops by itself after them.
    let events = (o.hold.as_secs() / o.interval.as_secs().max(1) + 3).max(3);
    let path = format!(
        "/invocations?sse={events}&interval_ms={}",
        o.interval.as_millis()
    );
    let counters = Arc::new(Counters::default());
    let connects = Arc::new(Semaphore::new(o.connect_concurrency.max(1)));
    let (stop_tx, stop_rx) = watch::channel(false);
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(o.streams);
    for _ in 0..o.streams {
        let target = target.clone();
        let path = path.clone();
        let counters = counters.clone();
        let connects = connects.clone();
        let mut stop = stop_rx.clone();
        tasks.push(tokio::spawn(async move {
            let opened = {
                let _permit = connects.acquire().await;
                open(&target, &path).await
            };
            let mut body = match opened {
                Ok(b) => b,
                Err(_) => {
                    counters.failed.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            };
            // The first event arrived: the stream is open end to end.
            counters.open.fetch_add(1, Ordering::Relaxed);
            counters.events.fetch_add(1, Ordering::Relaxed);
            loop {
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => return,
                    f = body.frame() => match f {
                        Some(Ok(f)) if f.is_data() => {
                            counters.events.fetch_add(1, Ordering::Relaxed);
                        }
                        Some(Ok(_)) => {}
                        _ => return,
                    }
                }
            }
        }));
    }

    let deadline = started + o.timeout;
    loop {
        let done = counters.open.load(Ordering::Relaxed) + counters.failed.load(Ordering::Relaxed);
        if done >= o.streams || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let open_after = started.elapsed();
    let opened = counters.open.load(Ordering::Relaxed);
    let at_open = procfs::total(&o.pids)?;
    let fds: usize = o.pids.iter().map(|&p| procfs::fds(p)).sum();
    let events_at_open = counters.events.load(Ordering::Relaxed);
    tokio::time::sleep(o.hold).await;
    let held = procfs::total(&o.pids)?;
    let still_open = counters.open.load(Ordering::Relaxed);
    let events_held = counters.events.load(Ordering::Relaxed) - events_at_open;

    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
    }
    // "After the streams closed" means closed by the server too: wait until its descriptors
    // are back to what it had before them (a loaded server may take seconds to process
    // thousands of closes; reading sooner measured a close in progress), then 1 s more.
    let closing = Instant::now();
    while o.pids.iter().map(|&p| procfs::fds(p)).sum::<usize>() > fds_before + CLOSED_SLACK
        && closing.elapsed() < CLOSE_WAIT
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let close_secs = closing.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = procfs::total(&o.pids)?;

    let peak = Memory {
        rss_kib: at_open.rss_kib.max(held.rss_kib),
        pss_kib: at_open.pss_kib.max(held.pss_kib),
    };
    let per_stream = |a: u64, b: u64| {
        if opened == 0 {
            0.0
        } else {
            ((a.saturating_sub(b)) as f64 / opened as f64 * 100.0).round() / 100.0
        }
    };
    println!(
        "{}",
        json!({
            "streams": o.streams, "open": opened, "still_open": still_open,
            "failed": counters.failed.load(Ordering::Relaxed),
            "open_secs": (open_after.as_secs_f64() * 10.0).round() / 10.0,
            "fds": fds,
            "events_while_held": events_held,
            "rss_before_kib": before.rss_kib, "rss_open_kib": at_open.rss_kib,
            "rss_held_kib": held.rss_kib, "rss_after_kib": after.rss_kib,
            "close_secs": (close_secs * 10.0).round() / 10.0,
            "pss_before_kib": before.pss_kib, "pss_peak_kib": peak.pss_kib,
            "rss_peak_kib": peak.rss_kib,
            "rss_per_stream_kib": per_stream(peak.rss_kib, before.rss_kib),
            "pss_per_stream_kib": per_stream(peak.pss_kib, before.pss_kib),
        })
    );
    Ok(())
}

/// Connects, sends the request and waits for the first event; returns the rest of the body.
async fn open(target: &Target, path: &str) -> Result<hyper::body::Incoming, String> {
    let mut send = target.connect().await?;
    let req = target.post(path, CHAT_REQUEST, &[("accept", "text/event-stream")])?;
    let res = send
        .send_request(req)
        .await
        .map_err(|e| format!("request: {e}"))?;
    if res.status() != StatusCode::OK {
        return Err(format!("status {}", res.status()));
    }
    let mut body = res.into_body();
    loop {
        match body.frame().await {
            Some(Ok(f)) if f.data_ref().is_some_and(|d| !d.is_empty()) => break,
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(format!("body: {e}")),
            None => return Err("the stream ended before its first event".into()),
        }
    }
    // The connection driver lives on its own task; `send` may go (the response is in flight).
    drop(send);
    Ok(body)
}
