//! SIGTERM with a stream open, against the real binary (issue 2 acceptance 8): new connections
//! are refused, the open stream finishes (or is cut at the grace period), and the process exits
//! 0 within grace + 1 s.

mod support;

use std::time::{Duration, Instant};

use http::Request;
use http_body_util::BodyExt;
use support::process::ProxyProcess;
use support::proxy::{h1, send};
use support::upstream::{Upstream, sse_agent};

/// An agent that streams `events` events `gap` apart.
async fn agent(events: usize, gap: Duration) -> Upstream {
    sse_agent(None, events, gap).await
}

/// The proxy binary in front of `agent`, with this shutdown grace period.
fn spawn(agent: &str, grace: &str) -> ProxyProcess {
    ProxyProcess::spawn(
        &format!(
            "shutdown_grace = \"{grace}\"\n[identity]\ndev_user = \"dev@example.com\"\n[agent]\nurl = \"{agent}\""
        ),
        &[],
    )
}

async fn refused(port: u16) -> bool {
    tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_the_open_stream_finish_then_exits_zero() {
    let agent = agent(10, Duration::from_millis(200)).await;
    let mut proxy = spawn(&agent.url(), "5s");
    proxy.wait_healthy().await;

    let res = send(
        &h1(),
        Request::post(proxy.url("/invocations")).header("content-type", "application/json"),
        "{}",
    )
    .await;
    assert_eq!(res.status(), 200);
    let mut body = res.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(first.as_ref(), b"data: {\"i\": 0}\n\n");

    let signalled = Instant::now();
    proxy.sigterm();
    // New connections are refused promptly.
    let deadline = Instant::now() + Duration::from_secs(1);
    while !refused(proxy.port).await {
        assert!(
            Instant::now() < deadline,
            "still accepting 1s after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The open stream runs to its end.
    let rest = body.collect().await.unwrap().to_bytes();
    let text = String::from_utf8(rest.to_vec()).unwrap();
    for i in 1..10 {
        assert!(
            text.contains(&format!("data: {{\"i\": {i}}}\n\n")),
            "{text}"
        );
    }
    assert!(!text.contains("event: error"));

    let status = proxy.exit_status(Duration::from_secs(6)).await;
    assert!(status.success(), "exit status {status}: {}", proxy.log());
    assert!(signalled.elapsed() < Duration::from_secs(6));
    assert!(proxy.log().contains("SIGTERM"), "{}", proxy.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_cuts_a_long_stream_at_the_grace_period() {
    let agent = agent(100, Duration::from_millis(200)).await;
    let mut proxy = spawn(&agent.url(), "1s");
    proxy.wait_healthy().await;

    let res = send(
        &h1(),
        Request::post(proxy.url("/invocations")).header("content-type", "application/json"),
        "{}",
    )
    .await;
    let mut body = res.into_body();
    body.frame().await.unwrap().unwrap();

    let signalled = Instant::now();
    proxy.sigterm();
    let status = proxy.exit_status(Duration::from_secs(2)).await;
    assert!(status.success(), "exit status {status}: {}", proxy.log());
    let exited = signalled.elapsed();
    assert!(
        exited >= Duration::from_millis(900),
        "exited too early: {exited:?}"
    );
    assert!(exited < Duration::from_secs(2), "{exited:?}");
    // The client's stream ends (cut) rather than hanging.
    let ended = tokio::time::timeout(Duration::from_secs(2), body.collect()).await;
    assert!(ended.is_ok(), "client stream still open after exit");
    assert!(
        proxy.log().contains("grace period elapsed"),
        "{}",
        proxy.log()
    );
}
