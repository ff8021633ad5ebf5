//! The streaming proxy core against fake agents (issue 2 acceptance 1–7): unbuffered SSE,
//! byte-exact bodies over HTTP/1.1 and h2c, header rules, identity, cancellation, upstream
//! failures, and the OAuth M2M token source.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::BodyExt;
use support::proxy::{TestProxy, body_bytes, body_json, h1, h2c, log_text, logs, send};
use support::upstream::{Streamer, Upstream, closed_port, eventually, full, silent, streamed};
use tokio::sync::mpsc;

fn config(upstream: &str, extra: &str) -> String {
    format!("[identity]\ndev_user = \"dev@example.com\"\n[agent]\nurl = \"{upstream}\"\n{extra}")
}

/// An upstream whose every request is answered with an SSE stream handed to the test.
async fn streaming_upstream() -> (Upstream, mpsc::Receiver<Streamer>) {
    let (tx, rx) = mpsc::channel(16);
    let upstream = Upstream::start(move |_req| {
        let tx = tx.clone();
        async move {
            let (res, streamer) = streamed(200, "text/event-stream; charset=utf-8");
            let _ = tx.send(streamer).await;
            res
        }
    })
    .await;
    (upstream, rx)
}

fn post(url: &str) -> http::request::Builder {
    Request::post(url).header("content-type", "application/json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_events_reach_the_client_as_they_are_sent() {
    let (upstream, mut streams) = streaming_upstream().await;
    let proxy = TestProxy::start(&config(&upstream.url(), "")).await;
    let res = send(&h1(), post(&proxy.url("/invocations")), r#"{"input":[]}"#).await;
    assert_eq!(res.status(), 200);
    let h = res.headers();
    assert_eq!(h["cache-control"], "no-cache, no-transform");
    assert_eq!(h["x-accel-buffering"], "no");
    assert!(h.contains_key("x-message-id"));
    assert!(h.contains_key("x-request-id"));
    assert!(!h.contains_key("content-length"));

    let streamer = streams.recv().await.unwrap();
    let mut body = res.into_body();
    for i in 0..5 {
        let event =
            format!("data: {{\"type\": \"response.output_text.delta\", \"delta\": \"{i}\"}}\n\n");
        let sent_at = streamer.send(event.clone()).await.unwrap();
        let frame = tokio::time::timeout(Duration::from_secs(2), body.frame())
            .await
            .expect("event not forwarded within 2s")
            .unwrap()
            .unwrap();
        let lag = sent_at.elapsed();
        assert_eq!(frame.into_data().unwrap(), Bytes::from(event));
        assert!(lag < Duration::from_millis(50), "event {i} took {lag:?}");
        // The next event is only sent after this one arrived: nothing waits for it.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(streamer);
    assert!(body.frame().await.is_none());
}

fn sample(name: &str) -> Vec<u8> {
    let path = format!(
        "{}/tests/fixtures/samples/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read(path).unwrap()
}

/// Splits `data` into pseudo-random chunk sizes (deterministic).
fn chunks(data: &[u8], seed: u64) -> Vec<Bytes> {
    let mut out = Vec::new();
    let mut state = seed | 1;
    let mut rest = data;
    while !rest.is_empty() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let n = (1 + (state % 97) as usize).min(rest.len());
        out.push(Bytes::copy_from_slice(&rest[..n]));
        rest = &rest[n..];
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_are_byte_identical_over_http1_and_h2c() {
    let sse = sample("91_agent_stream_return_trace_header.sse.txt");
    // A JSON body big enough to span many frames, with a content length.
    let json: Vec<u8> = {
        let items: Vec<String> = (0..20_000)
            .map(|i| format!("{{\"i\":{i},\"s\":\"{}\"}}", "é✓x".repeat(i % 7)))
            .collect();
        format!("{{\"output\":[{}]}}", items.join(",")).into_bytes()
    };
    let sse_up = sse.clone();
    let json_up = json.clone();
    let upstream = Upstream::start(move |req| {
        let sse = sse_up.clone();
        let json = json_up.clone();
        async move {
            if req.uri.path() == "/responses" {
                return full(200, "application/json", json);
            }
            let (res, streamer) = streamed(200, "text/event-stream");
            tokio::spawn(async move {
                for c in chunks(&sse, 7) {
                    streamer.send(c).await;
                }
            });
            res
        }
    })
    .await;
    let proxy = TestProxy::start(&config(&upstream.url(), "")).await;
    for (name, client) in [("http/1.1", h1()), ("h2c", h2c())] {
        let res = send(&client, post(&proxy.url("/invocations")), "{}").await;
        assert_eq!(res.status(), 200, "{name}");
        assert_eq!(body_bytes(res).await.as_ref(), sse.as_slice(), "{name} SSE");

        let res = send(&client, post(&proxy.url("/responses")), "{}").await;
        assert_eq!(res.status(), 200, "{name}");
        assert_eq!(
            res.headers()["content-length"],
            json.len().to_string().as_str(),
            "{name}"
        );
        assert_eq!(
            body_bytes(res).await.as_ref(),
            json.as_slice(),
            "{name} JSON"
        );
    }
    // Request bodies stream through unchanged too (a JSON content type, which agent routes
    // require, on a body past the rewrite cap: streamed, never parsed).
    let big = vec![b'x'; 3 << 20];
    let res = send(&h1(), post(&proxy.url("/responses")), big.clone()).await;
    assert_eq!(res.status(), 200);
    let got = upstream.received().last().unwrap().body.clone();
    assert_eq!(got.len(), big.len());
    assert!(got.as_ref() == big.as_slice());
}

#[tokio::test]
async fn spoofed_headers_never_reach_the_agent() {
    let upstream = Upstream::start(|_r| async { full(200, "application/json", "{}") }).await;
    let proxy = TestProxy::start_with_env(
        &format!(
            "[identity]\ntrust_forwarded_headers = true\n[agent]\nurl = \"{}\"\nauth = \"bearer-env:AGENT_TOKEN\"\n",
            upstream.url()
        ),
        &[("AGENT_TOKEN", "tok-123")],
    )
    .await;
    let res = send(
        &h1(),
        post(&proxy.url("/invocations"))
            .header("x-forwarded-email", "alice@example.com")
            .header("x-app-user-email", "attacker@x")
            .header("authorization", "Bearer browser-token")
            .header("cookie", "session=abc")
            // The app's own origin (a foreign one is refused: tests/edges.rs); still dropped.
            .header("origin", format!("http://{}", proxy.addr))
            .header("x-forwarded-access-token", "user-token")
            .header(
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            )
            .header("x-request-id", "req-test-1")
            .header("connection", "x-hop")
            .header("x-hop", "1"),
        "{}",
    )
    .await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["x-request-id"], "req-test-1");
    let got = &upstream.received()[0];
    let all = |name: &str| -> Vec<String> {
        got.headers
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(all("x-app-user-email"), ["alice@example.com"]);
    assert_eq!(all("authorization"), ["Bearer tok-123"]);
    assert_eq!(all("x-mlflow-return-trace-id"), ["true"]);
    assert_eq!(all("x-request-id"), ["req-test-1"]);
    assert_eq!(
        all("traceparent"),
        ["00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"]
    );
    for gone in [
        "cookie",
        "origin",
        "x-forwarded-access-token",
        "x-forwarded-email",
        "x-hop",
    ] {
        assert!(all(gone).is_empty(), "{gone} reached the agent");
    }
}

#[tokio::test]
async fn untrusted_identity_headers_fall_back_to_dev_user() {
    let upstream = Upstream::start(|_r| async { full(200, "application/json", "{}") }).await;
    let proxy = TestProxy::start(&config(&upstream.url(), "")).await;
    let res = send(
        &h1(),
        post(&proxy.url("/invocations")).header("x-forwarded-email", "mallory@example.com"),
        "{}",
    )
    .await;
    assert_eq!(res.status(), 200);
    assert_eq!(
        upstream.received()[0].headers["x-app-user-email"],
        "dev@example.com"
    );
}

#[tokio::test]
async fn no_identity_is_401_and_the_agent_sees_nothing() {
    let upstream = Upstream::start(|_r| async { full(200, "application/json", "{}") }).await;
    let proxy = TestProxy::start(&format!("[agent]\nurl = \"{}\"\n", upstream.url())).await;
    let res = send(&h1(), post(&proxy.url("/invocations")), "{}").await;
    assert_eq!(res.status(), 401);
    assert_eq!(res.headers()["content-type"], "application/json");
    let v = body_json(res).await;
    assert_eq!(v["code"], "UNAUTHENTICATED");
    assert!(v["error"].as_str().unwrap().contains("identity"));
    assert_eq!(upstream.count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_cancels_the_upstream_request() {
    let (upstream, mut streams) = streaming_upstream().await;
    let proxy = TestProxy::start(&config(&upstream.url(), "")).await;
    for client in [h1(), h2c()] {
        let res = send(&client, post(&proxy.url("/invocations")), "{}").await;
        let streamer = streams.recv().await.unwrap();
        streamer.send("data: {\"a\": 1}\n\n").await.unwrap();
        let mut body = res.into_body();
        body.frame().await.unwrap().unwrap();
        // The client goes away mid-stream.
        let gone_at = Instant::now();
        drop(body);
        drop(client);
        let observed = tokio::time::timeout(Duration::from_secs(1), async {
            // Keep the stream alive the way an agent would; writes fail once the proxy has let
            // go of the upstream connection.
            loop {
                tokio::select! {
                    () = streamer.closed() => break,
                    () = tokio::time::sleep(Duration::from_millis(50)) => {
                        if streamer.send("data: {\"tick\": 1}\n\n").await.is_none() {
                            break;
                        }
                    }
                }
            }
        })
        .await;
        assert!(
            observed.is_ok(),
            "upstream did not see the connection close within 1s"
        );
        assert!(gone_at.elapsed() < Duration::from_secs(1));
    }
}

/// Issue 12 finding 8: the body says what failed and gives the request id; where (the agent's
/// address) and why (the connect error) are in the log under that id.
#[tokio::test]
async fn unreachable_agent_is_502_json_naming_it_only_in_the_log() {
    logs();
    let addr = closed_port().await;
    let proxy = TestProxy::start(&config(&format!("http://{addr}"), "")).await;
    let res = send(
        &h1(),
        post(&proxy.url("/invocations")).header("x-request-id", "req-unreachable-1"),
        "{}",
    )
    .await;
    assert_eq!(res.status(), 502);
    let v = body_json(res).await;
    assert_eq!(v["code"], "UPSTREAM_UNREACHABLE");
    assert_eq!(v["requestId"], "req-unreachable-1");
    let error = v["error"].as_str().unwrap();
    assert!(!error.contains(&addr.port().to_string()), "{v}");
    assert!(!error.contains("127.0.0.1"), "{v}");
    eventually("the error log", Duration::from_secs(2), || {
        log_text()
            .lines()
            .any(|l| l.contains("req-unreachable-1") && l.contains(&addr.to_string()))
    })
    .await;
}

#[tokio::test]
async fn silent_agent_is_504_after_the_header_timeout() {
    let (addr, _task) = silent().await;
    let proxy = TestProxy::start(&config(
        &format!("http://{addr}"),
        "response_header_timeout = \"500ms\"\n",
    ))
    .await;
    let t = Instant::now();
    let res = send(&h1(), post(&proxy.url("/invocations")), "{}").await;
    assert_eq!(res.status(), 504);
    assert!(t.elapsed() >= Duration::from_millis(500));
    assert!(t.elapsed() < Duration::from_secs(3));
    let v = body_json(res).await;
    assert_eq!(v["code"], "UPSTREAM_TIMEOUT");
    assert!(
        !v["error"].as_str().unwrap().contains(&addr.to_string()),
        "the agent's address is for the log only: {v}"
    );
    assert!(v["requestId"].is_string(), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_breaks_ends_with_an_error_event_and_the_proxy_keeps_serving() {
    let (upstream, mut streams) = streaming_upstream().await;
    let proxy = TestProxy::start(&config(&upstream.url(), "")).await;
    let res = send(&h1(), post(&proxy.url("/invocations")), "{}").await;
    let streamer = streams.recv().await.unwrap();
    streamer
        .send("data: {\"delta\": \"part\"}\n\n")
        .await
        .unwrap();
    let mut body = res.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(first.as_ref(), b"data: {\"delta\": \"part\"}\n\n");
    // The agent dies in the middle of the next event.
    streamer.send("data: {\"delta\": \"trunc").await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    streamer.abort().await;
    let rest = body.collect().await.unwrap().to_bytes();
    let text = String::from_utf8(rest.to_vec()).unwrap();
    assert!(text.starts_with("data: {\"delta\": \"trunc"), "{text:?}");
    assert!(text.ends_with("\n\n"), "{text:?}");
    let last = text.trim_end().rsplit("\n\n").next().unwrap();
    assert!(last.starts_with("event: error\ndata: {"), "{text:?}");
    let data: serde_json::Value =
        serde_json::from_str(last.trim_start_matches("event: error\ndata: ")).unwrap();
    assert_eq!(data["code"], "UPSTREAM_STREAM_BROKEN");
    assert!(
        !data["error"]
            .as_str()
            .unwrap()
            .contains(&upstream.addr.to_string()),
        "{data}"
    );
    assert!(data["requestId"].is_string(), "{data}");

    // Still serving.
    let res = send(&h1(), post(&proxy.url("/invocations")), "{}").await;
    assert_eq!(res.status(), 200);
    let streamer = streams.recv().await.unwrap();
    streamer.send("data: ok\n\n").await.unwrap();
    drop(streamer);
    assert_eq!(body_bytes(res).await.as_ref(), b"data: ok\n\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_stream_ends_with_an_error_event() {
    let (upstream, mut streams) = streaming_upstream().await;
    let proxy = TestProxy::start(&config(&upstream.url(), "idle_timeout = \"1s\"\n")).await;
    let res = send(&h1(), post(&proxy.url("/invocations")), "{}").await;
    let streamer = streams.recv().await.unwrap();
    // Frames keep coming faster than the idle timeout: no error.
    let mut last = Instant::now();
    for _ in 0..5 {
        last = streamer.send("data: {}\n\n").await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let text = String::from_utf8(body_bytes(res).await.to_vec()).unwrap();
    let silence = last.elapsed();
    assert!(silence >= Duration::from_secs(1), "cut after {silence:?}");
    assert!(silence < Duration::from_secs(3), "cut after {silence:?}");
    assert_eq!(text.matches("data: {}\n\n").count(), 5);
    assert!(text.contains("event: error\ndata: {"), "{text:?}");
    assert!(text.contains("UPSTREAM_IDLE_TIMEOUT"));
}

/// A fake Databricks OAuth endpoint handing out `tok-1`, `tok-2`, … (or refusing).
async fn token_endpoint(expires_in: u64, refuse: bool) -> (Upstream, Arc<AtomicUsize>) {
    let n = Arc::new(AtomicUsize::new(0));
    let count = n.clone();
    let up = Upstream::start(move |req| {
        let count = count.clone();
        async move {
            assert_eq!(req.uri.path(), "/oidc/v1/token");
            assert_eq!(
                req.body.as_ref(),
                b"grant_type=client_credentials&scope=all-apis"
            );
            assert!(
                req.headers["authorization"]
                    .to_str()
                    .unwrap()
                    .starts_with("Basic ")
            );
            let i = count.fetch_add(1, Ordering::SeqCst) + 1;
            // Slow enough that concurrent callers pile up behind one refresh.
            tokio::time::sleep(Duration::from_millis(200)).await;
            if refuse {
                return full(
                    401,
                    "application/json",
                    r#"{"error":"invalid_client","error_description":"Client authentication failed"}"#,
                );
            }
            full(
                200,
                "application/json",
                format!(
                    r#"{{"access_token":"tok-{i}","token_type":"Bearer","expires_in":{expires_in}}}"#
                ),
            )
        }
    })
    .await;
    (up, n)
}

fn oauth_config(agent: &str, host: &str) -> String {
    format!(
        "[identity]\ndev_user = \"dev@example.com\"\n[databricks]\nhost = \"{host}\"\nclient_id = \"sp-client\"\nclient_secret = \"sp-SECRET-value\"\n[agent]\nurl = \"{agent}\"\nauth = \"databricks-oauth\"\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oauth_one_token_request_for_a_burst_and_refresh_before_expiry() {
    let agent = Upstream::start(|_r| async { full(200, "application/json", "{}") }).await;
    let (tokens, count) = token_endpoint(2, false).await;
    // One user sends all 100: lift the per-user cap on open agent requests.
    let proxy = TestProxy::start(&format!(
        "{}max_concurrent_per_user = 0\n",
        oauth_config(&agent.url(), &tokens.url())
    ))
    .await;

    let client = h1();
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let client = client.clone();
        let url = proxy.url("/invocations");
        tasks.push(tokio::spawn(async move {
            send(&client, post(&url), "{}").await.status()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert_eq!(
        count.load(Ordering::SeqCst),
        1,
        "one token request for 100 callers"
    );
    assert_eq!(agent.count(), 100);
    assert!(
        agent
            .received()
            .iter()
            .all(|r| r.headers["authorization"] == "Bearer tok-1")
    );

    // The token lives 2 s and is refreshed at half-life: after 1.1 s the next request uses a
    // new one, fetched before the request goes out.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let res = send(&client, post(&proxy.url("/invocations")), "{}").await;
    assert_eq!(res.status(), 200);
    assert_eq!(count.load(Ordering::SeqCst), 2);
    assert_eq!(
        agent.received().last().unwrap().headers["authorization"],
        "Bearer tok-2"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oauth_rejection_is_a_quiet_502_and_an_error_log_without_the_secret() {
    logs();
    let agent = Upstream::start(|_r| async { full(200, "application/json", "{}") }).await;
    let (tokens, count) = token_endpoint(3600, true).await;
    let proxy = TestProxy::start(&oauth_config(&agent.url(), &tokens.url())).await;

    let client = h1();
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let client = client.clone();
        let url = proxy.url("/invocations");
        tasks.push(tokio::spawn(async move {
            let res = send(&client, post(&url), "{}").await;
            (res.status(), body_json(res).await)
        }));
    }
    for t in tasks {
        let (status, v) = t.await.unwrap();
        assert_eq!(status, 502);
        assert_eq!(v["code"], "UPSTREAM_AUTH_FAILED");
        let msg = v["error"].as_str().unwrap();
        // The identity provider's answer and the token endpoint are for the log only.
        assert!(
            !msg.contains("invalid_client") && !msg.contains("oidc"),
            "{msg}"
        );
        assert!(!msg.contains(&tokens.addr.to_string()), "{msg}");
        assert!(!msg.contains("sp-SECRET-value"));
        assert!(v["requestId"].is_string(), "{v}");
    }
    // The failure is shared by the burst instead of being retried per caller.
    assert_eq!(count.load(Ordering::SeqCst), 1);
    assert_eq!(agent.count(), 0);
    eventually("the error log", Duration::from_secs(2), || {
        log_text().contains("token refresh failed")
    })
    .await;
    let logs = log_text();
    assert!(logs.contains("invalid_client"));
    assert!(!logs.contains("sp-SECRET-value"), "secret leaked into logs");
    assert!(!logs.contains(&base64_of("sp-client:sp-SECRET-value")));
}

fn base64_of(s: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(s)
}

#[tokio::test]
async fn own_routes_and_unknown_paths() {
    let upstream = Upstream::start(|_r| async { full(200, "application/json", "{}") }).await;
    let proxy = TestProxy::start(&config(&upstream.url(), "")).await;
    let res = send(&h1(), Request::get(proxy.url("/healthz")), "").await;
    assert_eq!(res.status(), 200);
    assert_eq!(body_json(res).await["status"], "ok");
    let res = send(&h1(), Request::post(proxy.url("/nope")), "").await;
    assert_eq!(res.status(), 404);
    assert_eq!(body_json(res).await["code"], "NOT_FOUND");
    assert_eq!(upstream.count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_map_onto_the_agents_base_path_with_the_query_kept() {
    let agent = Upstream::start(|_r| async { full(200, "application/json", "{}") }).await;
    let proxy = TestProxy::start(&format!(
        "[identity]\ndev_user = \"dev@example.com\"\n[agent]\nurl = \"{}/base/\"\npaths = [\"/invocations\"]\n\
         [[agent.routes]]\npath = \"/api/chat\"\nupstream_path = \"/invocations\"\n\
         [[agent.routes]]\npath = \"/api/root\"\nupstream_path = \"/\"\n",
        agent.url()
    ))
    .await;
    let cases = [
        ("/invocations?a=1&b=%20x", "/base/invocations?a=1&b=%20x"),
        ("/api/chat", "/base/invocations"),
        ("/api/chat/sub/path?x", "/base/invocations/sub/path?x"),
        ("/api/root", "/base/"),
        ("/api/root/deeper", "/base/deeper"),
    ];
    for (sent, _) in cases {
        let res = send(&h1(), post(&proxy.url(sent)), "{}").await;
        assert_eq!(res.status(), 200, "{sent}");
        body_bytes(res).await;
    }
    let seen: Vec<String> = agent
        .received()
        .iter()
        .map(|r| r.uri.path_and_query().unwrap().to_string())
        .collect();
    let expected: Vec<&str> = cases.iter().map(|(_, want)| *want).collect();
    assert_eq!(seen, expected);
}

/// Finding 5 of issue 12: in trusted mode the identity is exactly one clean value; anything
/// else is a 400 that never reaches the agent (or the feedback API), and underscore header
/// names never reach the agent.
#[tokio::test]
async fn trusted_identity_must_be_exactly_one_clean_value() {
    let upstream = Upstream::start(|_r| async { full(200, "application/json", "{}") }).await;
    let proxy = TestProxy::start(&format!(
        "[identity]\ntrust_forwarded_headers = true\n[agent]\nurl = \"{}\"\n",
        upstream.url()
    ))
    .await;
    let long = format!("{}@example.com", "a".repeat(255 - 12));
    // (what, headers, expected code)
    type Case = (&'static str, Vec<(&'static str, Vec<u8>)>, &'static str);
    let cases: Vec<Case> = vec![
        (
            "a repeated header",
            vec![
                ("x-forwarded-email", b"alice@example.com".to_vec()),
                ("x-forwarded-email", b"mallory@example.com".to_vec()),
            ],
            "AMBIGUOUS_IDENTITY",
        ),
        (
            "a repeated lower-preference header",
            vec![
                ("x-forwarded-email", b"alice@example.com".to_vec()),
                ("x-forwarded-user", b"1".to_vec()),
                ("x-forwarded-user", b"2".to_vec()),
            ],
            "AMBIGUOUS_IDENTITY",
        ),
        (
            "a comma list",
            vec![(
                "x-forwarded-email",
                b"alice@example.com, mallory@example.com".to_vec(),
            )],
            "INVALID_IDENTITY",
        ),
        (
            "a bidi override",
            vec![(
                "x-forwarded-email",
                "alice\u{202E}moc.elpmaxe@".as_bytes().to_vec(),
            )],
            "INVALID_IDENTITY",
        ),
        (
            "a zero-width space",
            vec![(
                "x-forwarded-email",
                "ali\u{200B}ce@example.com".as_bytes().to_vec(),
            )],
            "INVALID_IDENTITY",
        ),
        (
            "255 bytes",
            vec![("x-forwarded-email", long.into_bytes())],
            "INVALID_IDENTITY",
        ),
        (
            "a blank preferred header is not skipped",
            vec![
                ("x-forwarded-email", b"".to_vec()),
                ("x-forwarded-user", b"bob".to_vec()),
            ],
            "INVALID_IDENTITY",
        ),
    ];
    for (what, headers, code) in cases {
        for path in ["/invocations", "/api/feedback"] {
            let mut req = post(&proxy.url(path));
            for (k, v) in &headers {
                req = req.header(*k, http::HeaderValue::from_bytes(v).unwrap());
            }
            let res = send(
                &h1(),
                req,
                r#"{"chatId":"c","messageId":"m","isUpvoted":true}"#,
            )
            .await;
            assert_eq!(res.status(), 400, "{what} on {path}");
            let v = body_json(res).await;
            assert_eq!(v["code"], code, "{what} on {path}: {v}");
            assert!(!v["error"].as_str().unwrap().contains("mallory"), "{v}");
        }
    }
    assert_eq!(upstream.count(), 0, "no refused request reached the agent");

    // One clean value passes; underscore names (a CGI server reads x_app_user_email as
    // x-app-user-email) are dropped on the way.
    let res = send(
        &h1(),
        post(&proxy.url("/invocations"))
            .header("x-forwarded-email", "alice@example.com")
            .header("x_app_user_email", "mallory@example.com")
            .header("x_forwarded_email", "mallory@example.com")
            .header("x-custom_thing", "1"),
        "{}",
    )
    .await;
    assert_eq!(res.status(), 200);
    let got = &upstream.received()[0];
    assert_eq!(got.headers["x-app-user-email"], "alice@example.com");
    let underscored: Vec<&str> = got
        .headers
        .keys()
        .map(|k| k.as_str())
        .filter(|k| k.contains('_'))
        .collect();
    assert!(underscored.is_empty(), "{underscored:?} reached the agent");
}

/// Finding 7 of issue 12: the agent is another origin; its cookies, CORS grants, HSTS policy,
/// identity and proxy-owned headers do not reach the browser unless allowlisted.
#[tokio::test]
async fn agent_response_headers_for_the_proxys_origin_are_dropped() {
    let upstream = Upstream::start(|_r| async {
        let mut res = full(200, "application/json", "{}");
        let h = res.headers_mut();
        for (k, v) in [
            ("set-cookie", "agent_session=1; Path=/"),
            ("access-control-allow-origin", "*"),
            ("access-control-allow-credentials", "true"),
            ("strict-transport-security", "max-age=0"),
            ("x-app-user-email", "someone@else.example"),
            ("x-forwarded-email", "someone@else.example"),
            ("x-message-id", "agent-chosen"),
            ("x-request-id", "agent-chosen"),
            ("x-agent-note", "kept"),
        ] {
            h.append(k, http::HeaderValue::from_static(v));
        }
        res
    })
    .await;
    let proxy = TestProxy::start(&config(&upstream.url(), "")).await;
    let res = send(
        &h1(),
        post(&proxy.url("/invocations")).header("x-request-id", "req-mine"),
        "{}",
    )
    .await;
    assert_eq!(res.status(), 200);
    let h = res.headers();
    for gone in [
        "set-cookie",
        "access-control-allow-origin",
        "access-control-allow-credentials",
        "strict-transport-security",
        "x-app-user-email",
        "x-forwarded-email",
    ] {
        assert!(!h.contains_key(gone), "{gone} reached the browser");
    }
    assert_eq!(h.get_all("x-message-id").iter().count(), 1);
    assert_ne!(h["x-message-id"], "agent-chosen");
    assert_eq!(h.get_all("x-request-id").iter().count(), 1);
    assert_eq!(h["x-request-id"], "req-mine");
    assert_eq!(h["x-agent-note"], "kept");

    // An allowlisted name passes; the rest is still dropped.
    let proxy = TestProxy::start(&config(
        &upstream.url(),
        "pass_response_headers = [\"set-cookie\"]\n",
    ))
    .await;
    let res = send(&h1(), post(&proxy.url("/invocations")), "{}").await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["set-cookie"], "agent_session=1; Path=/");
    assert!(!res.headers().contains_key("access-control-allow-origin"));
}

/// Issue 12 finding 8: the public port's `/readyz` says ready or not and nothing else; the
/// checks (hosts, connect errors, delivery counts) are on the metrics listener and, when not
/// ready, in the log.
#[tokio::test]
async fn readyz_is_quiet_on_the_public_port_and_detailed_on_the_metrics_listener() {
    logs();
    let addr = closed_port().await;
    let proxy =
        TestProxy::start_with_metrics_listener(&config(&format!("http://{addr}"), "")).await;
    let res = send(&h1(), Request::get(proxy.url("/readyz")), "").await;
    assert_eq!(res.status(), 503);
    let text = String::from_utf8(body_bytes(res).await.to_vec()).unwrap();
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&text).unwrap(),
        serde_json::json!({"status": "not_ready"}),
        "{text}"
    );
    eventually("the not-ready warning", Duration::from_secs(2), || {
        log_text()
            .lines()
            .any(|l| l.contains("WARN") && l.contains("not ready") && l.contains(&addr.to_string()))
    })
    .await;

    let res = send(&h1(), Request::get(proxy.metrics_url("/readyz")), "").await;
    assert_eq!(res.status(), 503);
    let v = body_json(res).await;
    assert_eq!(v["status"], "not_ready");
    assert_eq!(v["checks"]["agent"]["ok"], false);
    assert!(
        v["checks"]["agent"]["error"]
            .as_str()
            .unwrap()
            .contains(&addr.to_string()),
        "{v}"
    );
    assert_eq!(v["checks"]["store"]["ok"], true, "{v}");
    assert!(v["deliveries"].is_object(), "{v}");
    // The metrics listener still serves the metrics.
    let res = send(&h1(), Request::get(proxy.metrics_url("/metrics")), "").await;
    assert_eq!(res.status(), 200);
    assert!(
        String::from_utf8(body_bytes(res).await.to_vec())
            .unwrap()
            .contains("feedback_proxy_")
    );

    // Ready: the same two words, no checks.
    let upstream = Upstream::start(|_r| async { full(200, "application/json", "{}") }).await;
    let proxy = TestProxy::start(&config(&upstream.url(), "")).await;
    let res = send(&h1(), Request::get(proxy.url("/readyz")), "").await;
    assert_eq!(res.status(), 200);
    assert_eq!(body_json(res).await, serde_json::json!({"status": "ready"}));
}

/// Issue 12 finding 10: a client whose chunked request body is malformed gets a 400, counted
/// as a client error, not a 502 counted against the agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_chunked_request_body_is_the_clients_400() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    logs();
    let upstream = Upstream::start(|_r| async { full(200, "application/json", "{}") }).await;
    let proxy = TestProxy::start(&config(&upstream.url(), "")).await;
    // JSON (what agent routes accept) of unknown length: streamed on, never read for a peek.
    // Twice, so that a second client on a fresh connection is served the same way.
    for content_type in ["application/json", "application/json; charset=utf-8"] {
        let mut tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        // A first chunk the proxy streams on, then a chunk-size line that is not hex.
        tcp.write_all(
            format!(
                "POST /invocations HTTP/1.1\r\nhost: proxy\r\ncontent-type: {content_type}\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\nZZZ\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        let mut got = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), async {
            let mut buf = [0u8; 4096];
            loop {
                match tcp.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
                if got.windows(4).any(|w| w == b"\r\n\r\n") && got.ends_with(b"}") {
                    break;
                }
            }
        })
        .await;
        assert!(read.is_ok(), "no answer within 10s");
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 400"), "{content_type}: {text}");
        assert!(text.contains("BODY_READ_FAILED"), "{text}");
    }
    let metrics = proxy.state.metrics.encode();
    assert!(
        metrics.contains(r#"feedback_proxy_http_requests_total{route="agent",status="400"} 2"#),
        "{metrics}"
    );
    assert!(!metrics.contains(r#"status="502""#), "{metrics}");
    assert!(
        !metrics.contains(r#"feedback_proxy_upstream_errors_total{kind="protocol"}"#),
        "{metrics}"
    );
    assert!(
        !log_text().contains("UPSTREAM_ERROR"),
        "logged as an agent failure"
    );
}
