//! Latency at concurrency 1 with the systems interleaved request by request (scenario 1).
//!
//! wrk measures one system for seconds at a time; on a shared, noisy machine the tail of such a
//! run is set by whatever else ran during those seconds, so two runs a few seconds apart differ
//! by more than the 0.3 ms under test. Here one client keeps a keep-alive connection to each
//! system and sends the same 1 KiB JSON POST (as `bench/wrk/post.lua`) to each in turn, one
//! request in flight at a time: every system sees the same noise over the same seconds, and the
//! difference of their percentiles is the cost of the hop.

use std::time::Duration;

use http::StatusCode;
use http_body_util::BodyExt;
use serde_json::json;
use tokio::time::Instant;

use crate::stats::summary;
use crate::target::Target;

pub struct Options {
    /// `name=http://127.0.0.1:PORT`, in order.
    pub targets: Vec<String>,
    pub duration: Duration,
    pub max_requests: u64,
    /// Written into every output line (the harness's round number).
    pub round: u32,
}

/// The 1 KiB request body (the same as `bench/wrk/post.lua`).
fn body() -> &'static str {
    static BODY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BODY.get_or_init(|| {
        let head = r#"{"input":[{"role":"user","content":""#;
        let tail = r#""}],"custom_inputs":{"source":"bench"}}"#;
        format!("{head}{}{tail}", "x".repeat(1024 - head.len() - tail.len()))
    })
}

pub async fn run(o: Options) -> Result<(), String> {
    let mut systems = Vec::new();
    for t in &o.targets {
        let (name, url) = t
            .split_once('=')
            .ok_or_else(|| format!("{t}: want NAME=URL"))?;
        let target = Target::parse(url)?;
        let send = target.connect().await?;
        systems.push((name.to_owned(), target, send, Vec::<u64>::new(), 0u64));
    }
    let n = systems.len();
    let deadline = Instant::now() + o.duration;
    let mut sent = 0u64;
    let mut cycle = 0usize;
    while Instant::now() < deadline && sent < o.max_requests {
        // Rotate the order each cycle so that no system always follows another.
        for k in 0..n {
            let (_, target, send, lat, errors) = &mut systems[(cycle + k) % n];
            let req = target.post("/invocations", body(), &[])?;
            let t0 = Instant::now();
            let ok = match send.send_request(req).await {
                Ok(res) => {
                    let status = res.status();
                    let read = res.into_body().collect().await;
                    status == StatusCode::OK && read.is_ok_and(|b| !b.to_bytes().is_empty())
                }
                Err(_) => false,
            };
            let elapsed = t0.elapsed();
            if ok {
                lat.push(elapsed.as_nanos() as u64);
            } else {
                *errors += 1;
                // A broken connection is replaced; the failure is counted.
                *send = target.connect().await?;
            }
            sent += 1;
        }
        cycle += 1;
    }
    // One raw-results line per system (the format of bench/run.sh's `record`).
    for (name, _, _, mut lat, errors) in systems {
        let count = lat.len();
        lat.sort_unstable();
        let p90 = crate::stats::percentile(&lat, 90.0);
        let (p50, p99, max) = summary(&mut lat);
        let us = |ns: u64| (ns as f64 / 100.0).round() / 10.0;
        println!(
            "{}",
            json!({
                "scenario": "latency-mixed", "system": name, "round": o.round, "param": "",
                "metrics": {
                    "requests": count, "errors": errors,
                    "p50_us": us(p50), "p90_us": us(p90), "p99_us": us(p99), "max_us": us(max),
                },
            })
        );
    }
    Ok(())
}
