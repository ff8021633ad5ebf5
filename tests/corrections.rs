//! Corrections (`expectedResponse` → an MLflow expectation) and chat ratings (`"scope": "chat"`
//! → a session assessment on the chat's first trace), issue 16, against a real `mlflow server`,
//! the real example agent and both stores (SQLite and Postgres). Every wait polls MLflow or the
//! store until a condition holds.

mod support;

use std::time::{Duration, Instant};

use feedback_proxy::mlflow::{Assessment, MlflowClient};
use feedback_proxy::store::LinkRecord;
use http::Method;
use serde_json::{Value, json};
use support::mlflow::{agent_url, experiment_id, http_json, mlflow_url};
use support::pg::{TestDb, shared_url};
use support::proxy::{TestProxy, body_json, h1, send};

const ALICE: &str = "alice@example.com";
const BOB: &str = "bob@example.com";
const SESSION: &str = "mlflow.trace.session";
const LIMIT: Duration = Duration::from_secs(30);

const FAST_DELIVERY: &str = "[delivery]\npoll_interval = \"100ms\"\nbackoff_initial = \"200ms\"\nbackoff_max = \"1s\"\nlease = \"10s\"\ntrace_lookup_interval = \"500ms\"\n";

fn config(store_url: Option<&str>) -> String {
    let mut c = format!(
        "[identity]\ntrust_forwarded_headers = true\n[agent]\nurl = \"http://127.0.0.1:9\"\n\
         [mlflow]\ntracking_uri = \"{}\"\nexperiment_id = \"{}\"\ntimeout = \"3s\"\n",
        mlflow_url(),
        experiment_id()
    );
    if let Some(s) = store_url {
        c.push_str(&format!("[store]\nurl = \"{s}\"\n"));
    }
    c.push_str(FAST_DELIVERY);
    c
}

/// A proxy on SQLite (its default, a temporary file) or on a fresh Postgres database.
async fn proxy_on(postgres: bool) -> (TestProxy, Option<TestDb>) {
    if postgres {
        let db = TestDb::create(&shared_url()).await;
        let p = TestProxy::start(&config(Some(&db.url))).await;
        (p, Some(db))
    } else {
        (TestProxy::start(&config(None)).await, None)
    }
}

fn client() -> MlflowClient {
    support::mlflow::client_with(&mlflow_url(), Duration::from_secs(5)).0
}

async fn link(proxy: &TestProxy, message_id: &str, user: &str, chat: &str, trace: Option<&str>) {
    proxy
        .state
        .store
        .record_links(&[LinkRecord {
            message_id: message_id.to_owned(),
            chat_id: Some(chat.to_owned()),
            user_id: user.to_owned(),
            trace_id: trace.map(str::to_owned),
            client_request_id: None,
            open: false,
            route: None,
        }])
        .await
        .expect("record link");
}

/// A fresh trace from the agent in session `chat` (the agent records `context.conversation_id`
/// as `mlflow.trace.session`), visible in MLflow.
async fn traced_answer(chat: &str, user: &str) -> String {
    let body = json!({
        "input": [{"role": "user", "content": "what is the answer?"}],
        "stream": true,
        "custom_inputs": {"chunk_delay_ms": 0},
        "context": {"conversation_id": chat, "user_id": user},
    });
    let (status, _, bytes) = http_json(
        Method::POST,
        &format!("{}/invocations", agent_url()),
        &[
            ("x-mlflow-return-trace-id", "true"),
            ("x-app-user-email", user),
        ],
        Some(body),
    )
    .await;
    let text = String::from_utf8_lossy(&bytes);
    assert!(status.is_success(), "agent answered {status}: {text}");
    let trace_id = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .find_map(|v| v.get("trace_id").and_then(Value::as_str).map(str::to_owned))
        .expect("agent returned a trace id");
    support::mlflow::wait_for_trace(&client(), &trace_id, LIMIT).await;
    trace_id
}

/// The trace's valid assessments named `name`.
async fn named(trace_id: &str, name: &str) -> Vec<Assessment> {
    match client().get_trace_info(trace_id).await {
        Ok(info) => info
            .assessments
            .into_iter()
            .filter(|a| a.name == name && a.valid != Some(false))
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// Polls the trace until `check` holds for its assessments named `name`.
async fn wait_named(
    trace_id: &str,
    name: &str,
    what: &str,
    check: impl Fn(&[Assessment]) -> bool,
) -> Vec<Assessment> {
    let start = Instant::now();
    loop {
        let a = named(trace_id, name).await;
        if check(&a) {
            return a;
        }
        assert!(
            start.elapsed() < LIMIT,
            "{what}: not within {LIMIT:?}; {name}: {a:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until no delivery is pending or waiting: nothing can change in MLflow after that.
async fn quiet(proxy: &TestProxy) {
    let start = Instant::now();
    loop {
        let s = proxy.state.store.delivery_stats().await.expect("stats");
        if s.pending == 0 && s.waiting == 0 {
            return;
        }
        assert!(start.elapsed() < LIMIT, "deliveries still open: {s:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn vote(proxy: &TestProxy, user: &str, body: Value) -> (u16, Value) {
    support::proxy::post_vote(proxy, user, &body).await
}

async fn delete(proxy: &TestProxy, user: &str, path: &str) -> (u16, Value) {
    let res = send(
        &h1(),
        http::Request::delete(proxy.url(path))
            .header("content-type", "application/json")
            .header("x-forwarded-email", user),
        "",
    )
    .await;
    (res.status().as_u16(), body_json(res).await)
}

async fn listed(proxy: &TestProxy, user: &str, chat: &str) -> Value {
    let res = send(
        &h1(),
        http::Request::get(proxy.url(&format!("/api/feedback/{chat}")))
            .header("x-forwarded-email", user),
        "",
    )
    .await;
    assert_eq!(res.status(), 200);
    body_json(res).await
}

fn expectation_text(a: &Assessment) -> Option<&str> {
    a.expectation.as_ref()?.get("value")?.as_str()
}

/// One expectation by Alice holding `text`.
fn one_expectation(text: &'static str) -> impl Fn(&[Assessment]) -> bool {
    move |a: &[Assessment]| {
        a.len() == 1
            && a[0].source_type == "HUMAN"
            && a[0].source_id == ALICE
            && !a[0].is_feedback
            && expectation_text(&a[0]) == Some(text)
    }
}

async fn a_correction_follows_the_vote(postgres: bool) {
    let (proxy, _db) = proxy_on(postgres).await;
    let chat = format!("corr-{}", uuid::Uuid::now_v7());
    let message = uuid::Uuid::now_v7().to_string();
    let trace = traced_answer(&chat, ALICE).await;
    link(&proxy, &message, ALICE, &chat, Some(&trace)).await;

    // 👎 with a correction: the vote and the expectation land.
    let (status, v) = vote(
        &proxy,
        ALICE,
        json!({"chatId": chat, "messageId": message, "isUpvoted": false,
               "expectedResponse": "The 2024 revenue was 12M."}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        v["correction"]["expectedResponse"],
        "The 2024 revenue was 12M."
    );
    let first = wait_named(
        &trace,
        "expected_response",
        "the correction",
        one_expectation("The 2024 revenue was 12M."),
    )
    .await;
    let id = first[0].assessment_id.clone();
    assert_eq!(
        first[0].metadata.get("feedback_proxy.message_id"),
        Some(&message)
    );
    wait_named(&trace, "user_feedback", "the vote", |a| {
        a.len() == 1 && a[0].value == Some(json!(false))
    })
    .await;
    assert_eq!(
        listed(&proxy, ALICE, &chat).await["feedback"][&message]["expectedResponse"],
        "The 2024 revenue was 12M."
    );

    // A changed correction updates the same expectation.
    let (_, v) = vote(
        &proxy,
        ALICE,
        json!({"chatId": chat, "messageId": message, "isUpvoted": false,
               "expectedResponse": "It was 13M."}),
    )
    .await;
    assert!(v["correction"].is_object(), "{v}");
    let changed = wait_named(
        &trace,
        "expected_response",
        "the changed correction",
        one_expectation("It was 13M."),
    )
    .await;
    assert_eq!(changed[0].assessment_id, id);

    // A vote without the field keeps it; the answer says nothing about it.
    let (_, v) = vote(
        &proxy,
        ALICE,
        json!({"chatId": chat, "messageId": message, "isUpvoted": false, "comment": "wrong year"}),
    )
    .await;
    assert!(v.get("correction").is_none(), "{v}");
    quiet(&proxy).await;
    assert!(one_expectation("It was 13M.")(
        &named(&trace, "expected_response").await
    ));

    // Cleared (null): the expectation goes, the vote stays.
    let (_, v) = vote(
        &proxy,
        ALICE,
        json!({"chatId": chat, "messageId": message, "isUpvoted": false,
               "expectedResponse": null}),
    )
    .await;
    assert_eq!(v["correction"]["expectedResponse"], Value::Null, "{v}");
    wait_named(&trace, "expected_response", "the cleared correction", |a| {
        a.is_empty()
    })
    .await;
    assert_eq!(named(&trace, "user_feedback").await.len(), 1);
    assert!(
        listed(&proxy, ALICE, &chat).await["feedback"][&message]
            .get("expectedResponse")
            .is_none()
    );

    // Set again, then the vote is retracted: both go.
    vote(
        &proxy,
        ALICE,
        json!({"chatId": chat, "messageId": message, "isUpvoted": false,
               "expectedResponse": "Again: 13M."}),
    )
    .await;
    wait_named(
        &trace,
        "expected_response",
        "the correction set again",
        one_expectation("Again: 13M."),
    )
    .await;
    let (status, v) = delete(&proxy, ALICE, &format!("/api/feedback/{chat}/{message}")).await;
    assert_eq!(status, 200, "{v}");
    assert!(v["correction"].is_object(), "{v}");
    wait_named(
        &trace,
        "expected_response",
        "the retracted correction",
        |a| a.is_empty(),
    )
    .await;
    wait_named(&trace, "user_feedback", "the retracted vote", |a| {
        a.is_empty()
    })
    .await;
    quiet(&proxy).await;
    assert!(named(&trace, "expected_response").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_correction_follows_the_vote_on_sqlite() {
    a_correction_follows_the_vote(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_correction_follows_the_vote_on_postgres() {
    a_correction_follows_the_vote(true).await;
}

/// Alice's session assessments named `user_feedback` on a trace.
fn session_ratings(a: &[Assessment]) -> Vec<&Assessment> {
    a.iter()
        .filter(|a| a.source_id == ALICE && a.metadata.contains_key(SESSION))
        .collect()
}

async fn a_chat_rating_lands_on_the_first_trace(postgres: bool) {
    let (proxy, _db) = proxy_on(postgres).await;
    let chat = format!("chat-{}", uuid::Uuid::now_v7());
    let (m1, m2) = (
        uuid::Uuid::now_v7().to_string(),
        uuid::Uuid::now_v7().to_string(),
    );
    let t1 = traced_answer(&chat, ALICE).await;
    link(&proxy, &m1, ALICE, &chat, Some(&t1)).await;
    let t2 = traced_answer(&chat, ALICE).await;
    link(&proxy, &m2, ALICE, &chat, Some(&t2)).await;
    // A vote on the first answer under the same name lives beside the chat rating.
    vote(
        &proxy,
        ALICE,
        json!({"chatId": chat, "messageId": m1, "isUpvoted": true}),
    )
    .await;

    let (status, v) = vote(
        &proxy,
        ALICE,
        json!({"chatId": chat, "scope": "chat", "isUpvoted": false, "comment": "went in circles"}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["scope"], "chat");
    let a = wait_named(&t1, "user_feedback", "the chat rating", |a| {
        session_ratings(a).len() == 1 && a.len() == 2
    })
    .await;
    let rating = session_ratings(&a)[0].clone();
    assert_eq!(rating.value, Some(json!(false)));
    assert_eq!(rating.rationale.as_deref(), Some("went in circles"));
    assert_eq!(rating.metadata.get(SESSION), Some(&chat));
    assert_eq!(rating.metadata.get("feedback_proxy.chat_id"), Some(&chat));
    assert_eq!(rating.source_type, "HUMAN");
    assert!(named(&t2, "user_feedback").await.is_empty());
    assert_eq!(
        listed(&proxy, ALICE, &chat).await["chat"]["user_feedback"]["value"],
        false
    );

    // Changed: the same assessment; the message vote is untouched.
    let (_, v) = vote(
        &proxy,
        ALICE,
        json!({"chatId": chat, "scope": "chat", "isUpvoted": true}),
    )
    .await;
    assert_eq!(v["scope"], "chat", "{v}");
    let a = wait_named(&t1, "user_feedback", "the changed chat rating", |a| {
        let r = session_ratings(a);
        r.len() == 1 && r[0].value == Some(json!(true))
    })
    .await;
    assert_eq!(session_ratings(&a)[0].assessment_id, rating.assessment_id);
    quiet(&proxy).await;
    assert_eq!(named(&t1, "user_feedback").await.len(), 2);

    // Retracted: only the chat rating goes.
    let (status, v) = delete(&proxy, ALICE, &format!("/api/feedback/{chat}")).await;
    assert_eq!(status, 200, "{v}");
    let a = wait_named(&t1, "user_feedback", "the retracted chat rating", |a| {
        session_ratings(a).is_empty()
    })
    .await;
    assert_eq!(a.len(), 1);
    assert!(!a[0].metadata.contains_key(SESSION));
    let (status, _) = delete(&proxy, ALICE, &format!("/api/feedback/{chat}")).await;
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_rating_lands_on_the_first_trace_on_sqlite() {
    a_chat_rating_lands_on_the_first_trace(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_rating_lands_on_the_first_trace_on_postgres() {
    a_chat_rating_lands_on_the_first_trace(true).await;
}

async fn a_chat_rating_waits_for_the_chats_first_trace(postgres: bool) {
    let (proxy, _db) = proxy_on(postgres).await;
    let chat = format!("wait-{}", uuid::Uuid::now_v7());
    let m1 = uuid::Uuid::now_v7().to_string();
    // The chat's only answer has no trace yet.
    link(&proxy, &m1, ALICE, &chat, None).await;
    let (status, v) = vote(
        &proxy,
        ALICE,
        json!({"chatId": chat, "scope": "chat", "value": 2, "name": "rating"}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["mlflowStatus"], "no_trace_id", "{v}");
    assert_eq!(proxy.state.store.delivery_stats().await.unwrap().waiting, 1);

    // Its trace id arrives: the rating wakes and lands on it.
    let t1 = traced_answer(&chat, ALICE).await;
    link(&proxy, &m1, ALICE, &chat, Some(&t1)).await;
    let a = wait_named(&t1, "rating", "the woken chat rating", |a| {
        session_ratings(a).len() == 1
    })
    .await;
    assert_eq!(a[0].value, Some(json!(2.0)));
    quiet(&proxy).await;
    assert_eq!(named(&t1, "rating").await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_rating_waits_for_the_chats_first_trace_on_sqlite() {
    a_chat_rating_waits_for_the_chats_first_trace(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_rating_waits_for_the_chats_first_trace_on_postgres() {
    a_chat_rating_waits_for_the_chats_first_trace(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_corrections_and_chat_ratings_are_400_or_404() {
    let proxy = TestProxy::start(&config(None)).await;
    let chat = "bad-chat";
    let message = uuid::Uuid::now_v7().to_string();
    link(&proxy, &message, ALICE, chat, None).await;
    let too_long = "x".repeat(8193);
    let cases = [
        (
            json!({"chatId": chat, "messageId": message, "value": 3, "name": "rating", "expectedResponse": "x"}),
            400,
            "INVALID_FIELD",
            "user_feedback",
        ),
        (
            json!({"chatId": chat, "messageId": message, "isUpvoted": false, "expectedResponse": too_long}),
            400,
            "EXPECTED_RESPONSE_TOO_LONG",
            "8192",
        ),
        (
            json!({"chatId": chat, "messageId": message, "isUpvoted": false, "expectedResponse": 5}),
            400,
            "INVALID_FIELD",
            "expectedResponse",
        ),
        (
            json!({"chatId": chat, "scope": "chat", "isUpvoted": false, "expectedResponse": "y"}),
            400,
            "INVALID_FIELD",
            "expectedResponse",
        ),
        (
            json!({"chatId": chat, "messageId": message, "scope": "chat", "isUpvoted": true}),
            400,
            "INVALID_FIELD",
            "messageId",
        ),
        (
            json!({"chatId": chat, "scope": "session", "isUpvoted": true}),
            400,
            "INVALID_FIELD",
            "scope",
        ),
        (
            json!({"scope": "chat", "isUpvoted": true}),
            400,
            "MISSING_FIELD",
            "chatId",
        ),
        // Bob has no answer in the chat: he cannot rate it.
        (
            json!({"chatId": "no-such-chat", "scope": "chat", "isUpvoted": true}),
            404,
            "UNKNOWN_CHAT",
            "no-such-chat",
        ),
    ];
    for (body, want_status, want_code, want_text) in cases {
        let (status, v) = vote(&proxy, ALICE, body.clone()).await;
        assert_eq!(status, want_status, "{body}: {v}");
        assert_eq!(v["code"], want_code, "{body}: {v}");
        assert!(
            v["error"].as_str().unwrap_or_default().contains(want_text),
            "{body}: {v}"
        );
    }
    let (status, v) = vote(
        &proxy,
        BOB,
        json!({"chatId": chat, "scope": "chat", "isUpvoted": true}),
    )
    .await;
    assert_eq!(status, 404, "{v}");
    assert!(
        proxy
            .state
            .store
            .list_deliveries(None, 10)
            .await
            .unwrap()
            .is_empty()
    );
}
