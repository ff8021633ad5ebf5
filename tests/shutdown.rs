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

/// A stream cut at the end of the grace period ends with an SSE `event: error` (code
/// `SHUTTING_DOWN`); its final link is in the store and its access line says `shutdown`, both
/// before the process exits; nothing is logged after "feedback-proxy stopped".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_cut_at_the_grace_period_ends_with_an_error_event_and_is_recorded() {
    let agent = agent(100, Duration::from_millis(100)).await;
    let mut proxy = ProxyProcess::spawn(
        &format!(
            "shutdown_grace = \"1s\"\n[log]\nformat = \"json\"\n[identity]\ndev_user = \"dev@example.com\"\n[agent]\nurl = \"{}\"",
            agent.url()
        ),
        &[],
    );
    proxy.wait_healthy().await;
    let res = send(
        &h1(),
        Request::post(proxy.url("/invocations")).header("content-type", "application/json"),
        "{}",
    )
    .await;
    assert_eq!(res.status(), 200);
    let message_id = res.headers()["x-message-id"].to_str().unwrap().to_owned();
    let mut body = res.into_body();
    body.frame().await.unwrap().unwrap();

    proxy.sigterm();
    let rest = tokio::time::timeout(Duration::from_secs(5), body.collect())
        .await
        .expect("the client stream ends")
        .expect("the stream ends cleanly, with an event rather than a reset")
        .to_bytes();
    let text = String::from_utf8(rest.to_vec()).unwrap();
    let tail = text.rsplit("\n\n\n").next().unwrap_or("");
    assert!(
        text.ends_with("\n\n") && tail.starts_with("event: error\ndata: "),
        "{text}"
    );
    let data: serde_json::Value =
        serde_json::from_str(tail.trim_start_matches("event: error\ndata: ").trim()).unwrap();
    assert_eq!(data["code"], "SHUTTING_DOWN", "{data}");
    assert!(
        data["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{data}"
    );

    let status = proxy.exit_status(Duration::from_secs(3)).await;
    assert!(status.success(), "exit status {status}: {}", proxy.log());

    let log = proxy.log();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let field = |l: &serde_json::Value, k: &str| l[k].as_str().map(str::to_owned);
    let access = lines
        .iter()
        .find(|l| {
            l["target"] == "feedback_proxy::access"
                && field(l, "message_id").as_deref() == Some(message_id.as_str())
        })
        .unwrap_or_else(|| panic!("no access line for the cut stream: {log}"));
    assert_eq!(
        field(access, "outcome").as_deref(),
        Some("shutdown"),
        "{log}"
    );
    let last = lines.last().unwrap();
    assert_eq!(
        field(last, "message").as_deref(),
        Some("feedback-proxy stopped"),
        "something was logged after the stopped line: {log}"
    );

    // The final link reached the store before the exit.
    let config = feedback_proxy::Config::from_toml_str(
        &format!(
            "[agent]\nurl = \"{}\"\n[store]\nurl = \"sqlite://{}\"\n",
            agent.url(),
            proxy.db_path().display()
        ),
        &feedback_proxy::config::Env::from_pairs::<&str, &str>([]),
    )
    .unwrap();
    let store = feedback_proxy::admin::open_store(&config).await.unwrap();
    let link = store.get_link(&message_id).await.unwrap().expect("a link");
    assert!(
        !link.open,
        "the final link of the cut stream was lost: {link:?}"
    );
}
