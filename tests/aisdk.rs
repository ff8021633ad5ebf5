//! Issue 17: on-behalf-of-user calls (`agent.auth = "user" | "user-or-app"`) and the drop-in
//! mode for Databricks' chat app template (`kind = "ai-sdk-app"`), against the real example
//! agent, a real `mlflow server` and SQLite, with the template played by a stand-in that speaks
//! its captured wire shapes (`support::chat_app`).

mod support;

use std::time::{Duration, Instant};

use feedback_proxy::config::{Config, Env};
use feedback_proxy::mlflow::{Assessment, MlflowClient};
use http::Request;
use serde_json::{Value, json};
use support::chat_app::ChatApp;
use support::mlflow::{AgentProcess, MlflowServer, agent_url, experiment_id, mlflow_url};
use support::proxy::{TestProxy, body_bytes, body_json, h1, send};
use support::upstream::{Upstream, full};

const ADA: &str = "ada@example.com";
const FAST_DELIVERY: &str = "[delivery]\npoll_interval = \"100ms\"\nbackoff_initial = \"200ms\"\nbackoff_max = \"1s\"\nlease = \"10s\"\n";

/// The recipe's shape: the template's server behind `/`, forwarded headers trusted (the
/// platform), MLflow and a store that outlives one proxy.
fn app_config(app: &str, mlflow: (&str, &str), store: &str) -> String {
    format!(
        "[identity]\ntrust_forwarded_headers = true\n[agent]\nurl = \"{app}\"\n[[agent.routes]]\npath = \"/\"\nkind = \"ai-sdk-app\"\n[mlflow]\ntracking_uri = \"{}\"\nexperiment_id = \"{}\"\ntimeout = \"3s\"\n[store]\nurl = \"{store}\"\n{FAST_DELIVERY}",
        mlflow.0, mlflow.1
    )
}

/// The platform's identity headers for `email` (as Databricks Apps sets them).
fn platform(b: http::request::Builder, email: &str) -> http::request::Builder {
    let name = email.split('@').next().unwrap_or(email);
    b.header("x-forwarded-email", email)
        .header("x-forwarded-user", format!("{name}-id"))
        .header("x-forwarded-preferred-username", name)
}

/// One chat through the proxy as the template's client sends it; returns the assistant message
/// id (`start` part) and the trace id (`data-traceId` part).
async fn chat(
    proxy: &TestProxy,
    user: &str,
    chat_id: &str,
    text: &str,
) -> (String, Option<String>) {
    let body = json!({
        "id": chat_id,
        "message": {"id": uuid::Uuid::new_v4().to_string(), "role": "user", "parts": [{"type": "text", "text": text}]},
        "selectedChatModel": "chat-model",
        "selectedVisibilityType": "private",
    });
    let res = send(
        &h1(),
        platform(Request::post(proxy.url("/api/chat")), user)
            .header("content-type", "application/json"),
        body.to_string(),
    )
    .await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["x-vercel-ai-ui-message-stream"], "v1");
    assert!(
        !res.headers().contains_key("x-message-id"),
        "the proxy's id is not this message's"
    );
    let text = String::from_utf8(body_bytes(res).await.to_vec()).unwrap();
    let parts: Vec<Value> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str(d).ok())
        .collect();
    let message_id = parts
        .iter()
        .find(|p| p["type"] == "start")
        .and_then(|p| p["messageId"].as_str())
        .unwrap_or_else(|| panic!("no start part: {text}"))
        .to_owned();
    let trace_id = parts
        .iter()
        .find(|p| p["type"] == "data-traceId")
        .and_then(|p| p["data"].as_str())
        .map(str::to_owned);
    (message_id, trace_id)
}

/// A vote in the template's contract.
async fn thumb(proxy: &TestProxy, user: &str, message_id: &str, kind: &str) -> (u16, Value) {
    let res = send(
        &h1(),
        platform(Request::post(proxy.url("/api/feedback")), user)
            .header("content-type", "application/json"),
        json!({"messageId": message_id, "feedbackType": kind}).to_string(),
    )
    .await;
    (res.status().as_u16(), body_json(res).await)
}

/// The template's read of a chat's votes.
async fn chat_votes(proxy: &TestProxy, user: &str, chat_id: &str) -> Value {
    let res = send(
        &h1(),
        platform(
            Request::get(proxy.url(&format!("/api/feedback/chat/{chat_id}"))),
            user,
        ),
        "",
    )
    .await;
    assert_eq!(res.status(), 200);
    body_json(res).await
}

fn mlflow_client(url: &str) -> MlflowClient {
    support::mlflow::client_with(url, Duration::from_secs(5)).0
}

async fn user_feedback(client: &MlflowClient, trace_id: &str) -> Vec<Assessment> {
    match client.get_trace_info(trace_id).await {
        Ok(info) => info
            .assessments
            .into_iter()
            .filter(|a| a.name == "user_feedback" && a.valid != Some(false))
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// Waits until nothing is left to deliver: from then on MLflow cannot change, so what it holds
/// is final.
async fn quiet(proxy: &TestProxy) {
    let settled = async {
        loop {
            let s = proxy.state.store.delivery_stats().await.unwrap();
            if s.pending == 0 && s.waiting == 0 {
                assert_eq!(s.dead, 0, "{s:?}");
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(60), settled)
        .await
        .expect("deliveries still pending after 60s");
}

/// Exactly one `user_feedback` assessment by `user` on the trace, with `value`.
async fn assert_one_assessment(client: &MlflowClient, trace_id: &str, user: &str, value: bool) {
    let a = user_feedback(client, trace_id).await;
    assert_eq!(a.len(), 1, "{a:#?}");
    assert_eq!(a[0].source_id, user);
    assert_eq!(a[0].value, Some(json!(value)), "{a:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_templates_votes_get_one_assessment_with_the_last_value_across_a_restart() {
    let app = ChatApp::start(&agent_url()).await;
    let dir = tempfile::tempdir().unwrap();
    let store = format!("sqlite://{}/fp.db", dir.path().display());
    let (mlflow, exp) = (mlflow_url(), experiment_id());
    let config = app_config(&app.url(), (&mlflow, &exp), &store);
    let proxy = TestProxy::start(&config).await;
    let client = mlflow_client(&mlflow);

    let chat_id = uuid::Uuid::new_v4().to_string();
    let (message_id, trace_id) = chat(&proxy, ADA, &chat_id, "what is the answer?").await;
    let trace_id = trace_id.expect("the agent traced the answer");

    // 👍 right after [DONE], as the template's client may: 200, durable, delivered later if
    // the trace is not flushed yet.
    let (status, v) = thumb(&proxy, ADA, &message_id, "thumbs_up").await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["success"], true);
    assert_eq!(v["traceId"], trace_id.as_str());
    let want = json!({&message_id: {"messageId": &message_id, "feedbackType": "thumbs_up", "assessmentId": null}});
    assert_eq!(chat_votes(&proxy, ADA, &chat_id).await, want);
    // Someone else's read of the chat shows nothing of Ada's.
    assert_eq!(
        chat_votes(&proxy, "bob@example.com", &chat_id).await,
        json!({})
    );
    // And nobody else can vote on Ada's answer.
    let (status, _) = thumb(&proxy, "bob@example.com", &message_id, "thumbs_up").await;
    assert_eq!(status, 403);

    // 👎
    let (status, _) = thumb(&proxy, ADA, &message_id, "thumbs_down").await;
    assert_eq!(status, 200);
    assert_eq!(
        chat_votes(&proxy, ADA, &chat_id).await[&message_id]["feedbackType"],
        "thumbs_down"
    );
    quiet(&proxy).await;
    assert_one_assessment(&client, &trace_id, ADA, false).await;

    // Restart the proxy (same store), then change again.
    proxy.shutdown().await;
    let proxy = TestProxy::start(&config).await;
    assert_eq!(
        chat_votes(&proxy, ADA, &chat_id).await[&message_id]["feedbackType"],
        "thumbs_down",
        "the vote is read back after a restart"
    );
    let (status, v) = thumb(&proxy, ADA, &message_id, "thumbs_up").await;
    assert_eq!(status, 200, "{v}");
    quiet(&proxy).await;
    assert_one_assessment(&client, &trace_id, ADA, true).await;

    // Retractable (the template has no route for it; the proxy's own one serves its votes).
    let res = send(
        &h1(),
        platform(
            Request::delete(proxy.url(&format!("/api/feedback/{chat_id}/{message_id}"))),
            ADA,
        )
        .header("content-type", "application/json"),
        "",
    )
    .await;
    assert_eq!(res.status(), 200);
    quiet(&proxy).await;
    assert!(user_feedback(&client, &trace_id).await.is_empty());
    assert_eq!(chat_votes(&proxy, ADA, &chat_id).await, json!({}));

    // The template's own feedback routes were never reached; its chat was, once.
    let got = app.received();
    assert!(
        got.iter()
            .all(|r| !r.uri.path().starts_with("/api/feedback"))
    );
    assert_eq!(
        got.iter().filter(|r| r.uri.path() == "/api/chat").count(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vote_cast_while_mlflow_is_down_lands_once_it_is_back() {
    let mut server = MlflowServer::spawn().await;
    let exp = support::mlflow::create_experiment(&server.url(), "aisdk-outage").await;
    let agent = AgentProcess::spawn(&server.url(), &exp).await;
    let app = ChatApp::start(&agent.url()).await;
    let dir = tempfile::tempdir().unwrap();
    let store = format!("sqlite://{}/fp.db", dir.path().display());
    let proxy = TestProxy::start(&app_config(&app.url(), (&server.url(), &exp), &store)).await;
    let client = mlflow_client(&server.url());

    let chat_id = uuid::Uuid::new_v4().to_string();
    let (message_id, trace_id) = chat(&proxy, ADA, &chat_id, "and now?").await;
    let trace_id = trace_id.expect("the agent traced the answer");
    support::mlflow::wait_for_trace(&client, &trace_id, Duration::from_secs(30)).await;

    server.stop();
    let (status, v) = thumb(&proxy, ADA, &message_id, "thumbs_up").await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["mlflowStatus"], "queued", "{v}");
    assert_eq!(
        chat_votes(&proxy, ADA, &chat_id).await[&message_id]["feedbackType"],
        "thumbs_up"
    );
    // The outage lasts until the delivery has failed against it at least twice.
    let start = Instant::now();
    loop {
        let d = proxy.state.store.list_deliveries(None, 10).await.unwrap();
        if d.iter().any(|d| d.attempts >= 2) {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "{d:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    server.start().await;
    quiet(&proxy).await;
    assert_one_assessment(&client, &trace_id, ADA, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_template_gets_the_platforms_identity_and_nothing_a_browser_made_up() {
    let app = ChatApp::start("http://127.0.0.1:9").await;
    let get = |proxy: &TestProxy| {
        platform(Request::get(proxy.url("/some/page")), ADA)
            .header("x-forwarded-access-token", "user-token")
            .header("authorization", "Bearer browser")
            .header("cookie", "session=1")
            .header("x-app-user-email", "mallory@example.com")
    };
    // Trusted (the platform): the identity headers and the user's token as sent.
    let trusted = TestProxy::start(&format!(
        "[identity]\ntrust_forwarded_headers = true\n[agent]\nurl = \"{}\"\n[[agent.routes]]\npath = \"/\"\nkind = \"ai-sdk-app\"\n",
        app.url()
    ))
    .await;
    // A cross-site navigation to a page is fine; a cross-site POST is not.
    let res = send(
        &h1(),
        get(&trusted).header("sec-fetch-site", "cross-site"),
        "",
    )
    .await;
    assert_eq!(res.status(), 200);
    let res = send(
        &h1(),
        platform(Request::post(trusted.url("/api/chat")), ADA)
            .header("content-type", "application/json")
            .header("sec-fetch-site", "cross-site"),
        "{}",
    )
    .await;
    assert_eq!(res.status(), 403);
    // Not authenticated at all: 401 before anything is forwarded.
    let res = send(&h1(), Request::get(trusted.url("/")), "").await;
    assert_eq!(res.status(), 401);
    let r = app.received().pop().unwrap();
    assert_eq!(r.uri.path(), "/some/page");
    assert_eq!(r.headers["x-forwarded-email"], ADA);
    assert_eq!(r.headers["x-forwarded-user"], "ada-id");
    assert_eq!(r.headers["x-forwarded-preferred-username"], "ada");
    assert_eq!(r.headers["x-forwarded-access-token"], "user-token");
    assert_eq!(r.headers["x-app-user-email"], ADA);
    for gone in ["authorization", "cookie"] {
        assert!(!r.headers.contains_key(gone), "{gone} reached the template");
    }

    // Untrusted (local, dev_user): the browser's copies never pass; the resolved user stands in.
    let local = TestProxy::start(&format!(
        "[identity]\ntrust_forwarded_headers = false\ndev_user = \"dev@example.com\"\n[agent]\nurl = \"{}\"\n[[agent.routes]]\npath = \"/\"\nkind = \"ai-sdk-app\"\n",
        app.url()
    ))
    .await;
    let res = send(&h1(), get(&local), "").await;
    assert_eq!(res.status(), 200);
    let r = app.received().pop().unwrap();
    for h in [
        "x-forwarded-email",
        "x-forwarded-user",
        "x-forwarded-preferred-username",
    ] {
        assert_eq!(r.headers[h], "dev@example.com", "{h}");
    }
    assert!(!r.headers.contains_key("x-forwarded-access-token"));
}

// ---- on-behalf-of-user ----

/// An agent that records what it is sent.
async fn recording_agent() -> Upstream {
    Upstream::start(|_r| async { full(200, "application/json", "{}") }).await
}

/// A stand-in for the workspace's OAuth token endpoint (the app's own token).
async fn token_endpoint() -> Upstream {
    Upstream::start(|_r| async {
        full(
            200,
            "application/json",
            r#"{"access_token":"app-sp-token","token_type":"Bearer","expires_in":3600}"#,
        )
    })
    .await
}

fn obo_config(agent: &str, auth: &str, trusted: bool, host: &str) -> String {
    format!(
        "[identity]\ntrust_forwarded_headers = {trusted}\ndev_user = \"dev@example.com\"\n[databricks]\nhost = \"{host}\"\nclient_id = \"sp\"\nclient_secret = \"s\"\n[agent]\nurl = \"{agent}\"\nauth = \"{auth}\"\n"
    )
}

async fn invoke(proxy: &TestProxy, token: Option<&str>) -> (u16, Value) {
    let mut b = platform(Request::post(proxy.url("/invocations")), ADA)
        .header("content-type", "application/json");
    if let Some(t) = token {
        b = b.header("x-forwarded-access-token", t);
    }
    let res = send(&h1(), b, "{}").await;
    let status = res.status().as_u16();
    let bytes = body_bytes(res).await;
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_mode_sends_the_users_token_and_refuses_without_one() {
    let agent = recording_agent().await;
    let tokens = token_endpoint().await;
    let proxy = TestProxy::start(&obo_config(&agent.url(), "user", true, &tokens.url())).await;
    let (status, _) = invoke(&proxy, Some("eyJ.ada.token")).await;
    assert_eq!(status, 200);
    let r = agent.received().pop().unwrap();
    assert_eq!(r.headers["authorization"], "Bearer eyJ.ada.token");
    assert_eq!(r.headers["x-forwarded-access-token"], "eyJ.ada.token");
    assert_eq!(r.headers["x-app-user-email"], ADA);

    let (status, v) = invoke(&proxy, None).await;
    assert_eq!(status, 401, "{v}");
    assert_eq!(v["code"], "USER_TOKEN_REQUIRED");
    assert!(v["requestId"].is_string(), "{v}");
    assert_eq!(
        agent.count(),
        1,
        "nothing was forwarded without the user's token"
    );
    assert_eq!(tokens.count(), 0, "\"user\" never asks for the app's token");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_or_app_mode_falls_back_to_the_apps_token() {
    let agent = recording_agent().await;
    let tokens = token_endpoint().await;
    let proxy = TestProxy::start(&obo_config(
        &agent.url(),
        "user-or-app",
        true,
        &tokens.url(),
    ))
    .await;
    let (status, _) = invoke(&proxy, None).await;
    assert_eq!(status, 200);
    let r = agent.received().pop().unwrap();
    assert_eq!(r.headers["authorization"], "Bearer app-sp-token");
    assert!(!r.headers.contains_key("x-forwarded-access-token"));

    let (status, _) = invoke(&proxy, Some("eyJ.ada.token")).await;
    assert_eq!(status, 200);
    let r = agent.received().pop().unwrap();
    assert_eq!(r.headers["authorization"], "Bearer eyJ.ada.token");
    assert_eq!(r.headers["x-forwarded-access-token"], "eyJ.ada.token");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browsers_token_never_passes_without_trusted_forwarded_headers() {
    // The user's token is only ever the platform's: "user" without trusted headers is refused
    // at start-up, and so is any user token on the MLflow hop.
    for (auth, key) in [("user", "agent.auth"), ("user-or-app", "agent.auth")] {
        let e = Config::from_toml_str(
            &obo_config("http://127.0.0.1:1", auth, false, "https://x.example"),
            &Env::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains(key) && e.contains("trust_forwarded_headers"),
            "{e}"
        );
    }
    let e = Config::from_toml_str(
        "[identity]\ntrust_forwarded_headers = true\n[agent]\nurl = \"http://127.0.0.1:1\"\n[mlflow]\ntracking_uri = \"http://127.0.0.1:2\"\nauth = \"user\"\n",
        &Env::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("mlflow.auth"), "{e}");

    // With the app's own token and untrusted headers, a browser's x-forwarded-access-token is
    // dropped like any identity header.
    let agent = recording_agent().await;
    let proxy = TestProxy::start_with_env(
        &format!(
            "[identity]\ntrust_forwarded_headers = false\ndev_user = \"dev@example.com\"\n[agent]\nurl = \"{}\"\nauth = \"bearer-env:APP_TOKEN\"\n",
            agent.url()
        ),
        &[("APP_TOKEN", "app-token")],
    )
    .await;
    let (status, _) = invoke(&proxy, Some("eyJ.forged")).await;
    assert_eq!(status, 200);
    let r = agent.received().pop().unwrap();
    assert_eq!(r.headers["authorization"], "Bearer app-token");
    assert!(!r.headers.contains_key("x-forwarded-access-token"));
    assert_eq!(r.headers["x-app-user-email"], "dev@example.com");
}
