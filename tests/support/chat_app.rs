//! A stand-in for the server of Databricks' chat app template (`databricks/app-templates`
//! `e2e-chatbot-app-next`), written for these tests: it speaks the template's wire shapes as
//! captured from the real server (tests/fixtures/samples/110_*, 111_*) and calls a real agent
//! the way the template's API_PROXY mode does. None of the template's code is used.
//!
//! - `POST /api/chat` `{id, message: {id, role, parts: [{type: "text", text}]}, …}`: calls
//!   `<agent>/invocations` (Responses format, streaming, `x-mlflow-return-trace-id: true`,
//!   `context {conversation_id, user_id}`, the user's `x-forwarded-access-token` forwarded and
//!   used as the bearer when present) and answers the AI SDK UI message stream: `start` (a fresh
//!   UUID as `messageId`), `start-step`, `text-start`, `text-delta`s, `text-end`, `finish-step`,
//!   `data-traceId` (the agent's trace id, or `null`), `[DONE]`; `content-type:
//!   text/event-stream`, `x-vercel-ai-ui-message-stream: v1`. Without `X-Forwarded-User` it
//!   answers 401 `{"code": "unauthorized:chat", …}` as the template does; a body without `id`
//!   400 `{"code": "bad_request:api", …}`.
//! - `GET /` and other paths: a small page.
//! - `/api/feedback…`: 500, so that a test notices if the proxy ever forwarded the template's
//!   feedback calls instead of serving them.

use http::Method;
use serde_json::{Value, json};

use super::mlflow::http_json;
use super::upstream::{Received, TestBody, Upstream, full, streamed};

pub struct ChatApp {
    pub server: Upstream,
}

impl ChatApp {
    pub async fn start(agent: &str) -> Self {
        let agent = agent.to_owned();
        let server = Upstream::start(move |req| {
            let agent = agent.clone();
            async move { handle(&agent, req).await }
        })
        .await;
        Self { server }
    }

    pub fn url(&self) -> String {
        self.server.url()
    }

    /// The requests that reached it, in order.
    pub fn received(&self) -> Vec<Received> {
        self.server.received()
    }
}

fn error(status: u16, code: &str, message: &str) -> http::Response<TestBody> {
    full(
        status,
        "application/json",
        json!({"code": code, "message": message}).to_string(),
    )
}

async fn handle(agent: &str, req: Received) -> http::Response<TestBody> {
    let path = req.uri.path();
    if path.starts_with("/api/feedback") {
        return error(
            500,
            "stand_in:feedback",
            "the template's own feedback route was reached",
        );
    }
    if !(req.method == Method::POST && path == "/api/chat") {
        return full(
            200,
            "text/html",
            "<!doctype html><title>chat app stand-in</title>",
        );
    }
    let header = |n: &str| {
        req.headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let Some(_user_id) = header("x-forwarded-user") else {
        return error(
            401,
            "unauthorized:chat",
            "You need to sign in to view this chat.",
        );
    };
    let email = header("x-forwarded-email").unwrap_or_default();
    let body: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
    let (Some(chat_id), Some(text)) = (
        body["id"].as_str(),
        body["message"]["parts"][0]["text"].as_str(),
    ) else {
        return error(400, "bad_request:api", "The request couldn't be processed.");
    };
    let token = header("x-forwarded-access-token");
    let bearer = format!("Bearer {}", token.as_deref().unwrap_or("app-sp-token"));
    let mut headers = vec![
        ("x-mlflow-return-trace-id", "true"),
        ("authorization", bearer.as_str()),
    ];
    if let Some(t) = &token {
        headers.push(("x-forwarded-access-token", t.as_str()));
    }
    let (status, _, bytes) = http_json(
        Method::POST,
        &format!("{agent}/invocations"),
        &headers,
        Some(json!({
            "input": [{"role": "user", "content": text}],
            "stream": true,
            "context": {"conversation_id": chat_id, "user_id": email},
        })),
    )
    .await;
    if !status.is_success() {
        return error(
            503,
            "offline:chat",
            "We're having trouble sending your message.",
        );
    }
    let mut item = "msg_1".to_owned();
    let mut deltas = Vec::new();
    let mut trace_id = Value::Null;
    for data in String::from_utf8_lossy(&bytes)
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
    {
        let Ok(ev) = serde_json::from_str::<Value>(data) else {
            continue;
        };
        if ev["type"] == "response.output_text.delta" {
            if let Some(id) = ev["item_id"].as_str() {
                item = id.to_owned();
            }
            deltas.push(ev["delta"].as_str().unwrap_or_default().to_owned());
        } else if let Some(t) = ev["trace_id"].as_str() {
            trace_id = Value::String(t.to_owned());
        }
    }
    let mut parts = vec![
        json!({"type": "start", "messageId": uuid::Uuid::new_v4().to_string()}),
        json!({"type": "start-step"}),
        json!({"type": "text-start", "id": item}),
    ];
    for d in deltas {
        parts.push(json!({"type": "text-delta", "id": item, "delta": d}));
    }
    parts.push(json!({"type": "text-end", "id": item}));
    parts.push(json!({"type": "finish-step"}));
    parts.push(json!({"type": "data-traceId", "data": trace_id}));
    let (mut res, streamer) = streamed(200, "text/event-stream");
    let h = res.headers_mut();
    h.insert("cache-control", "no-cache".parse().unwrap());
    h.insert("x-vercel-ai-ui-message-stream", "v1".parse().unwrap());
    h.insert("x-accel-buffering", "no".parse().unwrap());
    tokio::spawn(async move {
        for p in parts {
            if streamer.send(format!("data: {p}\n\n")).await.is_none() {
                return;
            }
        }
        // Dropping the streamer then ends the body.
        let _ = streamer.send("data: [DONE]\n\n").await;
    });
    res
}
