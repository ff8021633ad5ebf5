//! Seeding for the feedback scenario: chats through the proxy, so that every (user, message)
//! the load votes on has a message link with a trace id, exactly as in real use.
//!
//! Ids are `{tag}-u{u}@bench.example` (user), `{tag}-c{u}` (chat) and `{tag}-m{u}-{m}` (message);
//! `bench/wrk/feedback.lua` and `bench/pgbench/upsert_vote.sql` use the same shapes.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use http::StatusCode;
use http_body_util::BodyExt;

use crate::target::{CHAT_REQUEST, Target};

/// Requests in flight while seeding.
const CONCURRENCY: u32 = 16;

pub async fn seed(
    url: &str,
    users: u32,
    messages: u32,
    tag: &str,
    expect: &[String],
) -> Result<(), String> {
    let target = Target::parse(url)?;
    let total = users * messages;
    let next = Arc::new(AtomicU32::new(0));
    let mut tasks = Vec::new();
    for _ in 0..CONCURRENCY.min(total.max(1)) {
        let target = target.clone();
        let next = next.clone();
        let tag = tag.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut send = target.connect().await?;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    return Ok::<_, String>(());
                }
                let (u, m) = (i / messages, i % messages);
                let user = format!("{tag}-u{u}@bench.example");
                let chat = format!("{tag}-c{u}");
                let message = format!("{tag}-m{u}-{m}");
                let req = target.post(
                    "/invocations?trace_header=1",
                    CHAT_REQUEST,
                    &[
                        ("x-forwarded-email", &user),
                        ("x-chat-id", &chat),
                        ("x-message-id", &message),
                    ],
                )?;
                send.ready().await.map_err(|e| format!("connection: {e}"))?;
                let res = send
                    .send_request(req)
                    .await
                    .map_err(|e| format!("request: {e}"))?;
                let status = res.status();
                let echoed = res
                    .headers()
                    .get("x-message-id")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                res.into_body()
                    .collect()
                    .await
                    .map_err(|e| format!("body: {e}"))?;
                if status != StatusCode::OK {
                    return Err(format!("seeding {message}: status {status}"));
                }
                if echoed.as_deref() != Some(message.as_str()) {
                    return Err(format!(
                        "seeding {message}: the proxy used message id {echoed:?} (is the store working?)"
                    ));
                }
            }
        }));
    }
    for t in tasks {
        t.await.map_err(|e| format!("seeding task failed: {e}"))??;
    }
    println!("seeded {total} message links");
    if !expect.is_empty() {
        check_vote(&target, tag, expect).await?;
    }
    Ok(())
}

/// Votes once (user 0, message 0) and checks that `mlflowStatus` is one of `expect`: proves that
/// the configuration under test really takes the path it is meant to measure.
async fn check_vote(target: &Target, tag: &str, expect: &[String]) -> Result<(), String> {
    // Give the link writer a moment: the vote should find its message's trace id.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let mut send = target.connect().await?;
    let user = format!("{tag}-u0@bench.example");
    let body = format!(r#"{{"chatId":"{tag}-c0","messageId":"{tag}-m0-0","isUpvoted":true}}"#);
    let req = target.post_bytes(
        "/api/feedback",
        body.into(),
        &[("x-forwarded-email", &user)],
    )?;
    let res = send
        .send_request(req)
        .await
        .map_err(|e| format!("vote: {e}"))?;
    let status = res.status();
    let bytes = res
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("vote body: {e}"))?
        .to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| {
        format!(
            "vote answer is not JSON ({e}): {}",
            String::from_utf8_lossy(&bytes)
        )
    })?;
    let got = v["mlflowStatus"].as_str().unwrap_or("");
    if status != StatusCode::OK || !expect.iter().any(|e| e == got) {
        return Err(format!(
            "check vote: status {status}, mlflowStatus {got:?} (expected one of {expect:?}): {v}"
        ));
    }
    println!("check vote: mlflowStatus {got}");
    Ok(())
}
