//! Trace linking through the running proxy (issue 4): message and chat ids, request rewriting,
//! injected events, and the message → trace link recorded in the store — against fake agents
//! that replay the real captures, and end to end against a real MLflow agent server.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use serde_json::{Value, json};
use support::proxy::{TestProxy, body_bytes, body_json, h1, log_text, logs, send};
use support::upstream::{Upstream, full, streamed};

const TRACE: &str = "tr-eaf19740d012e3a3e64accc2bf6d17bc";

fn sample(name: &str) -> Vec<u8> {
    std::fs::read(format!(
        "{}/tests/fixtures/samples/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

/// An agent that answers every request with the capture `91_*` (trace id event at the end),
/// split into small frames.
async fn replaying_agent() -> Upstream {
    let body = sample("91_agent_stream_return_trace_header.sse.txt");
    Upstream::start(move |_r| {
        let body = body.clone();
        async move {
            let (res, streamer) = streamed(200, "text/event-stream; charset=utf-8");
            tokio::spawn(async move {
                for c in body.chunks(37) {
                    streamer.send(Bytes::copy_from_slice(c)).await;
                }
            });
            res
        }
    })
    .await
}

fn post(url: &str) -> http::request::Builder {
    Request::post(url).header("content-type", "application/json")
}

fn base(agent: &str, routes: &str) -> String {
    format!(
        "[identity]\ntrust_forwarded_headers = true\ndev_user = \"dev@example.com\"\n[agent]\nurl = \"{agent}\"\n{routes}"
    )
}

/// The link of `message_id` once the stream has ended (bounded wait).
async fn link(proxy: &TestProxy, message_id: &str) -> feedback_proxy::store::MessageLink {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        if let Ok(Some(l)) = proxy.state.store.get_link(message_id).await {
            if !l.open {
                return l;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no closed link for {message_id} within 5s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_answer_is_linked_to_the_trace_in_its_stream() {
    let agent = replaying_agent().await;
    let proxy = TestProxy::start(&base(&agent.url(), "")).await;
    let res = send(
        &h1(),
        post(&proxy.url("/invocations"))
            .header("x-forwarded-email", "alice@example.com")
            .header("x-chat-id", "chat-1"),
        r#"{"input":[{"role":"user","content":"hi"}],"stream":true}"#,
    )
    .await;
    assert_eq!(res.status(), 200);
    let message_id = res.headers()["x-message-id"].to_str().unwrap().to_owned();
    // Minted ids are UUID v7.
    let uuid = uuid::Uuid::parse_str(&message_id).unwrap();
    assert_eq!(uuid.get_version_num(), 7);
    // Without `events`, the bytes are untouched.
    assert_eq!(
        body_bytes(res).await.as_ref(),
        sample("91_agent_stream_return_trace_header.sse.txt").as_slice()
    );
    let l = link(&proxy, &message_id).await;
    assert_eq!(l.trace_id.as_deref(), Some(TRACE));
    assert_eq!(l.user_id, "alice@example.com");
    assert_eq!(l.chat_id.as_deref(), Some("chat-1"));
    // Every agent request asks for the trace id.
    assert_eq!(
        agent.received()[0].headers["x-mlflow-return-trace-id"],
        "true"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_without_a_trace_id_is_still_recorded() {
    let body = sample("106_agent_stream_tracking_server_down.sse.txt");
    let agent = Upstream::start(move |_r| {
        let body = body.clone();
        async move { full(200, "text/event-stream", body) }
    })
    .await;
    let proxy = TestProxy::start(&base(&agent.url(), "")).await;
    let res = send(&h1(), post(&proxy.url("/invocations")), "{}").await;
    let message_id = res.headers()["x-message-id"].to_str().unwrap().to_owned();
    body_bytes(res).await;
    let l = link(&proxy, &message_id).await;
    assert_eq!(
        l.trace_id, None,
        "MLFLOW_NO_OP_SPAN_TRACE_ID is not a trace id"
    );
    assert_eq!(l.user_id, "dev@example.com");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_message_ids_are_used_unless_they_belong_to_someone_else() {
    let agent = replaying_agent().await;
    let proxy = TestProxy::start(&base(&agent.url(), "")).await;

    // Header.
    let res = send(
        &h1(),
        post(&proxy.url("/invocations"))
            .header("x-forwarded-email", "alice@example.com")
            .header("x-message-id", "msg-alice-1"),
        "{}",
    )
    .await;
    assert_eq!(res.headers()["x-message-id"], "msg-alice-1");
    body_bytes(res).await;
    assert_eq!(
        link(&proxy, "msg-alice-1").await.trace_id.as_deref(),
        Some(TRACE)
    );

    // Body field, same user again: kept.
    let res = send(
        &h1(),
        post(&proxy.url("/invocations")).header("x-forwarded-email", "alice@example.com"),
        r#"{"messageId":"msg-alice-1","chatId":"c-9"}"#,
    )
    .await;
    assert_eq!(res.headers()["x-message-id"], "msg-alice-1");
    body_bytes(res).await;

    // Another user cannot take it over: a fresh id is minted and Alice's link is untouched.
    let res = send(
        &h1(),
        post(&proxy.url("/invocations"))
            .header("x-forwarded-email", "mallory@example.com")
            .header("x-message-id", "msg-alice-1"),
        "{}",
    )
    .await;
    let fresh = res.headers()["x-message-id"].to_str().unwrap().to_owned();
    assert_ne!(fresh, "msg-alice-1");
    body_bytes(res).await;
    assert_eq!(link(&proxy, &fresh).await.user_id, "mallory@example.com");
    assert_eq!(
        link(&proxy, "msg-alice-1").await.user_id,
        "alice@example.com"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewrites_and_events() {
    let agent = replaying_agent().await;
    let proxy = TestProxy::start(&format!(
        "{}max_rewrite_bytes = \"4KiB\"\n[[agent.routes]]\npath = \"/api/chat\"\nupstream_path = \"/invocations\"\nreturn_trace = true\ncontext = true\nclient_request_id = true\nevents = true\n",
        base(&agent.url(), "")
    ))
    .await;
    let res = send(
        &h1(),
        post(&proxy.url("/api/chat"))
            .header("x-forwarded-email", "alice@example.com")
            .header("x-client-request-id", "req-spoofed"),
        r#"{"input":[{"role":"user","content":"hi"}],"stream":true,"chatId":"chat-7","context":{"user_id":"mallory"}}"#,
    )
    .await;
    assert_eq!(res.status(), 200);
    let message_id = res.headers()["x-message-id"].to_str().unwrap().to_owned();
    let text = String::from_utf8(body_bytes(res).await.to_vec()).unwrap();

    // Upstream saw the rewritten body on the mapped path.
    let got = &agent.received()[0];
    assert_eq!(got.uri.path(), "/invocations");
    let crid = got.headers["x-client-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(crid.starts_with("req-") && crid != "req-spoofed", "{crid}");
    let body: Value = serde_json::from_slice(&got.body).unwrap();
    assert_eq!(body["databricks_options"], json!({"return_trace": true}));
    assert_eq!(body["context"]["conversation_id"], "chat-7");
    assert_eq!(body["context"]["user_id"], "alice@example.com");
    assert_eq!(body["custom_inputs"]["client_request_id"], crid.as_str());
    assert_eq!(body["input"][0]["content"], "hi");
    assert_eq!(
        got.headers["content-length"],
        got.body.len().to_string().as_str()
    );

    // The client got the meta event first, the trace event right after the agent's trace
    // event, and every agent byte in between unchanged.
    let meta = format!(
        "event: feedback-proxy.meta\ndata: {}\n\n",
        json!({"messageId": message_id, "chatId": "chat-7"})
    );
    let trace_ev = format!(
        "event: feedback-proxy.trace\ndata: {}\n\n",
        json!({"messageId": message_id, "traceId": TRACE})
    );
    assert!(text.starts_with(&meta), "{text}");
    let original =
        String::from_utf8(sample("91_agent_stream_return_trace_header.sse.txt")).unwrap();
    let trace_line = format!("data: {{\"trace_id\": \"{TRACE}\"}}\n\n");
    let expected = format!(
        "{meta}{}",
        original.replacen(&trace_line, &format!("{trace_line}{trace_ev}"), 1)
    );
    assert_eq!(text, expected);

    let l = link(&proxy, &message_id).await;
    assert_eq!(l.trace_id.as_deref(), Some(TRACE));
    assert_eq!(l.client_request_id.as_deref(), Some(crid.as_str()));

    // Over the rewrite cap: 413 before anything reaches the agent.
    let before = agent.count();
    let big = format!(r#"{{"input":"{}"}}"#, "x".repeat(8 * 1024));
    let res = send(&h1(), post(&proxy.url("/api/chat")), big).await;
    assert_eq!(res.status(), 413);
    assert_eq!(body_json(res).await["code"], "PAYLOAD_TOO_LARGE");
    assert_eq!(agent.count(), before);

    // A JSON content type on a body that is not a JSON object: forwarded untouched, no
    // rewrite (the agent decides what a bad request is).
    let res = send(&h1(), post(&proxy.url("/api/chat")), "plain words").await;
    assert_eq!(res.status(), 200);
    body_bytes(res).await;
    assert_eq!(
        agent.received().last().unwrap().body.as_ref(),
        b"plain words"
    );
    // Not JSON at all: a type a cross-site form could send, refused (tests/edges.rs).
    let before = agent.count();
    let res = send(
        &h1(),
        Request::post(proxy.url("/api/chat")).header("content-type", "text/plain"),
        "plain words",
    )
    .await;
    assert_eq!(res.status(), 415);
    body_bytes(res).await;
    assert_eq!(agent.count(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_streaming_json_answers_are_linked_from_metadata() {
    let raw = sample("100_agent_invoke_return_trace.txt");
    let text = String::from_utf8(raw).unwrap();
    let json_body = text
        .split("\r\n\r\n")
        .nth(1)
        .or_else(|| text.split("\n\n").nth(1))
        .unwrap()
        .to_owned();
    let agent = Upstream::start(move |_r| {
        let b = json_body.clone();
        async move { full(200, "application/json", b) }
    })
    .await;
    let proxy = TestProxy::start(&base(&agent.url(), "")).await;
    let res = send(&h1(), post(&proxy.url("/invocations")), "{}").await;
    let message_id = res.headers()["x-message-id"].to_str().unwrap().to_owned();
    body_bytes(res).await;
    assert_eq!(
        link(&proxy, &message_id).await.trace_id.as_deref(),
        Some("tr-200fee060856a08ecceb11f29f7d0c74")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_over_the_inspection_cap_is_forwarded_whole_and_the_log_names_the_knob() {
    logs();
    // A Model Serving style answer with its trace inline: ~8 KiB of spans after the id.
    let answer = json!({
        "object": "response",
        "output": [{"type": "message", "content": [{"type": "output_text", "text": "hello"}]}],
        "databricks_output": {"trace": {
            "info": {"trace_id": TRACE},
            "data": {"spans": [{"name": "x".repeat(8192)}]}
        }}
    })
    .to_string();
    let agent = Upstream::start(move |_r| {
        let b = answer.clone();
        async move { full(200, "application/json", b) }
    })
    .await;
    for (cap, linked) in [("4KiB", false), ("64KiB", true)] {
        let proxy = TestProxy::start(&base(
            &agent.url(),
            &format!("max_inspect_bytes = \"{cap}\"\n"),
        ))
        .await;
        let res = send(&h1(), post(&proxy.url("/invocations")), "{}").await;
        let message_id = res.headers()["x-message-id"].to_str().unwrap().to_owned();
        let body: Value = serde_json::from_slice(&body_bytes(res).await).unwrap();
        assert_eq!(
            body["databricks_output"]["trace"]["info"]["trace_id"],
            TRACE
        );
        let l = link(&proxy, &message_id).await;
        assert_eq!(l.trace_id.as_deref(), linked.then_some(TRACE), "cap {cap}");
        let warned = log_text().lines().any(|line| {
            line.contains(&message_id) && line.contains("larger than agent.max_inspect_bytes")
        });
        assert_eq!(warned, !linked, "cap {cap}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_ids_from_configured_headers() {
    let agent = Upstream::start(|_r| async {
        let mut res = full(200, "application/json", "{}");
        res.headers_mut().insert(
            "x-mlflow-trace-id",
            "tr-0123456789abcdef0123456789abcdef".parse().unwrap(),
        );
        res
    })
    .await;
    let proxy = TestProxy::start(&base(
        &agent.url(),
        "trace_id_headers = [\"x-mlflow-trace-id\"]\n",
    ))
    .await;
    let res = send(&h1(), post(&proxy.url("/invocations")), "{}").await;
    let message_id = res.headers()["x-message-id"].to_str().unwrap().to_owned();
    body_bytes(res).await;
    assert_eq!(
        link(&proxy, &message_id).await.trace_id.as_deref(),
        Some("tr-0123456789abcdef0123456789abcdef")
    );
}

/// End to end through the running proxy against the real example agent and `mlflow server`:
/// the link recorded for the answer holds the trace id the tracking server has for exactly
/// that request (found independently through the client request id the proxy minted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_link_matches_the_tracking_servers_trace_for_the_request() {
    use support::mlflow::{agent_url, client_with, mlflow_url, wait_for_trace};

    let proxy = TestProxy::start(&format!(
        "{}[[agent.routes]]\npath = \"/api/chat\"\nupstream_path = \"/invocations\"\nclient_request_id = true\ncontext = true\nevents = true\n",
        base(&agent_url(), "")
    ))
    .await;
    let res = send(
        &h1(),
        post(&proxy.url("/api/chat"))
            .header("x-forwarded-email", "erin@example.com")
            .header("x-chat-id", "chat-e2e"),
        r#"{"input":[{"role":"user","content":"which trace am I?"}],"stream":true}"#,
    )
    .await;
    assert_eq!(res.status(), 200);
    let message_id = res.headers()["x-message-id"].to_str().unwrap().to_owned();
    let text = String::from_utf8(body_bytes(res).await.to_vec()).unwrap();
    assert!(text.contains("which trace am I?"), "{text}");
    assert!(text.contains("event: feedback-proxy.trace"), "{text}");

    let l = link(&proxy, &message_id).await;
    let trace_id = l.trace_id.clone().expect("a trace id was linked");
    let crid = l
        .client_request_id
        .clone()
        .expect("a client request id was minted");
    assert_eq!(l.user_id, "erin@example.com");
    assert_eq!(l.chat_id.as_deref(), Some("chat-e2e"));

    let (client, _) = client_with(&mlflow_url(), Duration::from_secs(5));
    wait_for_trace(&client, &trace_id, Duration::from_secs(20)).await;
    // The tracking server's own answer, found by the id only this request carried.
    let found = client
        .find_trace_by_client_request_id(&support::mlflow::experiment_id(), &crid)
        .await
        .unwrap();
    assert_eq!(found.as_deref(), Some(trace_id.as_str()));
    let info = client.get_trace_info(&trace_id).await.unwrap();
    assert_eq!(info.client_request_id.as_deref(), Some(crid.as_str()));
    assert_eq!(
        info.metadata.get("mlflow.trace.user").map(String::as_str),
        Some("erin@example.com")
    );
}
