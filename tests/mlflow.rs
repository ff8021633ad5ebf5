//! The MLflow client against a real `mlflow server` 3.17.2 and the example agent (started by
//! `scripts/test.sh`), and against a fault-injecting fake for what a healthy server won't do.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use feedback_proxy::mlflow::{AssessmentUpdate, MlflowErrorKind, NewAssessment};
use feedback_proxy::store::FeedbackValue;
use http::{Method, StatusCode};
use serde_json::json;
use support::mlflow::{
    AgentProcess, FakeMlflow, FakeReply, MlflowServer, agent_url, ask_agent, client, client_with,
    experiment_id, free_port, http_json, mlflow_url, run_python, wait_for_trace,
};

/// A trace produced by the shared agent, already visible on the shared server.
async fn fresh_trace(text: &str) -> String {
    let answer = ask_agent(&agent_url(), text, None, Some("alice@example.com")).await;
    let trace_id = answer.trace_id.expect("the agent returned a trace id");
    wait_for_trace(&client(), &trace_id, Duration::from_secs(20)).await;
    trace_id
}

fn vote(user: &str, value: FeedbackValue, rationale: Option<&str>) -> NewAssessment {
    NewAssessment {
        assessment_id: None,
        name: "user_feedback".into(),
        source_id: user.into(),
        value,
        rationale: rationale.map(str::to_owned),
        metadata: BTreeMap::new(),
    }
}

/// A client assessment id unique to this run (ids are unique across all traces on a server).
fn unique_id(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

#[tokio::test]
async fn create_then_get_and_trace_info_list_it() {
    let c = client();
    let trace = fresh_trace("create then get").await;
    let mut a = vote(
        "bob@example.com",
        FeedbackValue::Bool(true),
        Some("Looks right"),
    );
    a.metadata.insert("proxy.message_id".into(), "m-1".into());
    let created = c.create_assessment(&trace, &a).await.expect("created");
    assert!(
        created.assessment_id.starts_with("a-"),
        "{}",
        created.assessment_id
    );
    assert_eq!(created.trace_id, trace);
    assert_eq!(created.name, "user_feedback");
    assert_eq!(created.source_type, "HUMAN");
    assert_eq!(created.source_id, "bob@example.com");
    assert_eq!(created.value, Some(json!(true)));
    assert_eq!(created.rationale.as_deref(), Some("Looks right"));
    assert_eq!(
        created.metadata.get("proxy.message_id").map(String::as_str),
        Some("m-1")
    );
    assert_eq!(created.valid, Some(true));

    let got = c
        .get_assessment(&trace, &created.assessment_id)
        .await
        .expect("get");
    assert_eq!(got, created);

    let info = c.get_trace_info(&trace).await.expect("trace info");
    assert_eq!(info.trace_id, trace);
    assert_eq!(info.state.as_deref(), Some("OK"));
    let listed: Vec<_> = info
        .assessments
        .iter()
        .filter(|x| x.assessment_id == created.assessment_id)
        .collect();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0], &created);
}

#[tokio::test]
async fn numbers_come_back_as_doubles_and_strings_as_strings() {
    let c = client();
    let trace = fresh_trace("value kinds").await;
    let mut a = vote("bob", FeedbackValue::Number(4.0), None);
    a.name = "rating".into();
    let created = c.create_assessment(&trace, &a).await.expect("created");
    assert_eq!(created.value, Some(json!(4.0)));
    assert_eq!(created.feedback_value(), Some(FeedbackValue::Number(4.0)));
    assert_eq!(created.rationale, None);
    let a = vote("bob", FeedbackValue::String("thumbs_up".into()), None);
    let created = c.create_assessment(&trace, &a).await.expect("created");
    assert_eq!(
        created.feedback_value(),
        Some(FeedbackValue::String("thumbs_up".into()))
    );
}

#[tokio::test]
async fn update_with_mask_changes_value_and_rationale() {
    let c = client();
    let trace = fresh_trace("update").await;
    let created = c
        .create_assessment(
            &trace,
            &vote("carol", FeedbackValue::Bool(true), Some("good")),
        )
        .await
        .expect("created");
    let updated = c
        .update_assessment(
            &trace,
            &created.assessment_id,
            &AssessmentUpdate {
                value: FeedbackValue::Bool(false),
                rationale: Some("changed my mind".into()),
            },
        )
        .await
        .expect("updated");
    assert_eq!(updated.assessment_id, created.assessment_id);
    assert_eq!(updated.value, Some(json!(false)));
    assert_eq!(updated.rationale.as_deref(), Some("changed my mind"));
    assert_eq!(updated.source_id, "carol", "source is immutable");
    assert_eq!(updated.create_time, created.create_time);
    let got = c
        .get_assessment(&trace, &created.assessment_id)
        .await
        .expect("get");
    assert_eq!(got.value, Some(json!(false)));
    assert_eq!(got.rationale.as_deref(), Some("changed my mind"));
}

/// `rationale: None` on update: the server stores "" (it cannot null the column through the
/// API), which the client reads back as no rationale.
#[tokio::test]
async fn update_without_rationale_clears_it() {
    let c = client();
    let trace = fresh_trace("clear rationale").await;
    let created = c
        .create_assessment(
            &trace,
            &vote("dave", FeedbackValue::Bool(false), Some("bad")),
        )
        .await
        .expect("created");
    let updated = c
        .update_assessment(
            &trace,
            &created.assessment_id,
            &AssessmentUpdate {
                value: FeedbackValue::Bool(true),
                rationale: None,
            },
        )
        .await
        .expect("updated");
    assert_eq!(updated.rationale, None);
    assert_eq!(updated.value, Some(json!(true)));
    // What the server really holds: an empty string, not an absent field.
    let (status, raw, _) = http_json(
        Method::GET,
        &format!(
            "{}/api/3.0/mlflow/traces/{trace}/assessments/{}",
            mlflow_url(),
            created.assessment_id
        ),
        &[],
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(raw["assessment"]["rationale"], json!(""));
}

#[tokio::test]
async fn delete_is_idempotent() {
    let c = client();
    let trace = fresh_trace("delete").await;
    let created = c
        .create_assessment(&trace, &vote("erin", FeedbackValue::Bool(true), None))
        .await
        .expect("created");
    c.delete_assessment(&trace, &created.assessment_id)
        .await
        .expect("deleted");
    let e = c
        .get_assessment(&trace, &created.assessment_id)
        .await
        .expect_err("gone");
    assert_eq!(e.kind, MlflowErrorKind::NotFound, "{e}");
    c.delete_assessment(&trace, &created.assessment_id)
        .await
        .expect("deleting again is fine");
    c.delete_assessment("tr-00000000000000000000000000000000", "a-none")
        .await
        .expect("even on an unknown trace");
    let info = c.get_trace_info(&trace).await.expect("trace info");
    assert!(
        info.assessments
            .iter()
            .all(|a| a.assessment_id != created.assessment_id)
    );
}

#[tokio::test]
async fn create_with_a_taken_client_id_is_already_exists() {
    let c = client();
    let trace = fresh_trace("client ids").await;
    let id = unique_id("a-fp");
    assert!(id.len() <= 50);
    let mut a = vote("frank", FeedbackValue::Bool(true), None);
    a.assessment_id = Some(id.clone());
    let created = c.create_assessment(&trace, &a).await.expect("created");
    assert_eq!(
        created.assessment_id, id,
        "the server honours the client id"
    );
    a.value = FeedbackValue::Bool(false);
    let e = c.create_assessment(&trace, &a).await.expect_err("taken");
    assert_eq!(e.kind, MlflowErrorKind::AlreadyExists, "{e}");
    assert_eq!(e.status, Some(500));
    assert!(!e.is_retryable());
    let info = c.get_trace_info(&trace).await.expect("trace info");
    let same: Vec<_> = info
        .assessments
        .iter()
        .filter(|x| x.assessment_id == id)
        .collect();
    assert_eq!(same.len(), 1);
    assert_eq!(same[0].value, Some(json!(true)), "the first create stands");
}

#[tokio::test]
async fn unknown_trace_is_not_found() {
    let c = client();
    let unknown = "tr-00000000000000000000000000000000";
    let e = c
        .create_assessment(unknown, &vote("gina", FeedbackValue::Bool(true), None))
        .await
        .expect_err("unknown trace");
    assert_eq!(e.kind, MlflowErrorKind::NotFound);
    assert_eq!(
        e.short(),
        "404 RESOURCE_DOES_NOT_EXIST: Trace with ID 'tr-00000000000000000000000000000000' not found."
    );
    let e = c.get_trace_info(unknown).await.expect_err("unknown trace");
    assert_eq!(e.kind, MlflowErrorKind::NotFound);
    let trace = fresh_trace("unknown assessment").await;
    let e = c
        .update_assessment(
            &trace,
            "a-doesnotexist",
            &AssessmentUpdate {
                value: FeedbackValue::Bool(true),
                rationale: None,
            },
        )
        .await
        .expect_err("unknown assessment");
    assert_eq!(e.kind, MlflowErrorKind::NotFound);
    // A Unity Catalog trace id is encoded as ONE path segment; open-source MLflow cannot route
    // it and answers its HTML 404, which is a Client error ("no such endpoint"), not a missing
    // trace to wait for.
    let e = c
        .get_trace_info("trace:/main.agents/0af7651916cd43dd8448eb211c80319c")
        .await
        .expect_err("not routable here");
    assert_eq!(e.kind, MlflowErrorKind::Client, "{e}");
    assert_eq!(e.status, Some(404));
}

#[tokio::test]
async fn search_by_client_request_id_finds_the_agent_trace() {
    let c = client();
    // Ids with either kind of quote must be found too (the filter literal picks the quote).
    for crid in [
        unique_id("req"),
        format!("{}'q", unique_id("req")),
        format!("{}\"dq", unique_id("req")),
    ] {
        let answer = ask_agent(&agent_url(), "search me", Some(&crid), None).await;
        let trace = answer.trace_id.expect("trace id");
        wait_for_trace(&c, &trace, Duration::from_secs(20)).await;
        let found = c
            .find_trace_by_client_request_id(&experiment_id(), &crid)
            .await
            .expect("search");
        assert_eq!(
            found.as_deref(),
            Some(trace.as_str()),
            "client request id {crid}"
        );
    }
}

#[tokio::test]
async fn search_without_match_is_none() {
    let c = client();
    let found = c
        .find_trace_by_client_request_id(&experiment_id(), &unique_id("req-never-sent"))
        .await
        .expect("search");
    assert_eq!(found, None);
}

/// The example agent tags its trace with the proxy's correlation data.
#[tokio::test]
async fn agent_tags_client_request_id_user_and_session() {
    let crid = unique_id("req-hdr");
    let (status, _, bytes) = http_json(
        Method::POST,
        &format!("{}/invocations", agent_url()),
        &[
            ("x-mlflow-return-trace-id", "true"),
            ("x-client-request-id", crid.as_str()),
            ("x-app-user-email", "alice@example.com"),
        ],
        Some(json!({
            "input": [{"role": "user", "content": "tag me"}],
            "context": {"conversation_id": "chat-42"},
        })),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    // Non-streaming: the trace id is in metadata.
    let body: serde_json::Value = serde_json::from_slice(&bytes).expect("json");
    let trace = body["metadata"]["trace_id"]
        .as_str()
        .expect("trace id")
        .to_owned();
    let c = client();
    wait_for_trace(&c, &trace, Duration::from_secs(20)).await;
    let info = c.get_trace_info(&trace).await.expect("trace info");
    assert_eq!(info.client_request_id.as_deref(), Some(crid.as_str()));
    assert_eq!(
        info.metadata.get("mlflow.trace.user").map(String::as_str),
        Some("alice@example.com")
    );
    assert_eq!(
        info.metadata
            .get("mlflow.trace.session")
            .map(String::as_str),
        Some("chat-42")
    );
    // The stream ends with the trace id event, then [DONE] (CONTRACT §3.1).
    let answer = ask_agent(&agent_url(), "stream shape", None, None).await;
    let events: Vec<&str> = answer
        .body
        .split("\n\n")
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .collect();
    let n = events.len();
    assert!(n >= 4, "{}", answer.body);
    assert_eq!(events[n - 1], "data: [DONE]");
    let trace_id = answer.trace_id.expect("trace id");
    assert_eq!(
        events[n - 2],
        format!("data: {{\"trace_id\": \"{trace_id}\"}}")
    );
    assert!(trace_id.starts_with("tr-"));
    assert!(events[0].contains("response.output_text.delta"));
}

/// With the default 200 ms flush interval the trace is searchable well within a second of
/// `[DONE]` (CONTRACT: 110–200 ms); this prints the figure and allows for a loaded machine.
#[tokio::test]
async fn trace_becomes_visible_soon_after_done() {
    let c = client();
    let answer = ask_agent(&agent_url(), "how soon", None, None).await;
    let trace = answer.trace_id.expect("trace id");
    let (_, first_not_found) = wait_for_trace(&c, &trace, Duration::from_secs(20)).await;
    let after_done = answer.done_at.elapsed();
    eprintln!("trace visible {after_done:?} after [DONE] (first probe 404: {first_not_found})");
    assert!(after_done < Duration::from_secs(5), "{after_done:?}");
}

/// A fresh trace answers 404 until the agent flushes it. A private agent with a 2 s flush
/// interval makes the 404 window certain rather than a race.
#[tokio::test]
async fn fresh_trace_is_not_found_until_flushed() {
    let agent = AgentProcess::spawn_with_env(
        &mlflow_url(),
        &experiment_id(),
        &[("MLFLOW_ASYNC_TRACE_LOGGING_MAX_INTERVAL_MILLIS", "2000")],
    )
    .await;
    let c = client();
    let answer = ask_agent(&agent.url(), "not yet", None, Some("alice@example.com")).await;
    let trace = answer.trace_id.expect("trace id");
    let e = c
        .create_assessment(
            &trace,
            &vote("alice@example.com", FeedbackValue::Bool(true), None),
        )
        .await
        .expect_err("not flushed yet");
    assert_eq!(e.kind, MlflowErrorKind::NotFound, "{e}");
    let (waited, first_not_found) = wait_for_trace(&c, &trace, Duration::from_secs(20)).await;
    assert!(first_not_found);
    eprintln!(
        "with a 2 s flush interval the trace became visible {:?} after [DONE]",
        answer.done_at.elapsed()
    );
    assert!(waited < Duration::from_secs(10));
    c.create_assessment(
        &trace,
        &vote("alice@example.com", FeedbackValue::Bool(true), None),
    )
    .await
    .expect("created once visible");
}

/// The assessment our client creates has the same fields as the one
/// `mlflow.log_feedback(..., source=AssessmentSource(HUMAN, user))` creates.
#[tokio::test]
async fn assessment_matches_what_python_log_feedback_creates() {
    const SNIPPET: &str = r#"
import sys
import mlflow
from mlflow.entities import AssessmentSource, AssessmentSourceType
url, trace_id, user = sys.argv[1:4]
mlflow.set_tracking_uri(url)
fb = mlflow.log_feedback(
    trace_id=trace_id,
    name="user_feedback",
    value=False,
    rationale="missing the 2024 numbers",
    source=AssessmentSource(source_type=AssessmentSourceType.HUMAN, source_id=user),
)
print(fb.assessment_id)
"#;
    let c = client();
    let trace = fresh_trace("compare with python").await;
    let user = "alice@example.com";
    let py_id = run_python(SNIPPET, &[&mlflow_url(), &trace, user])
        .await
        .trim()
        .to_owned();
    let ours = c
        .create_assessment(
            &trace,
            &vote(
                user,
                FeedbackValue::Bool(false),
                Some("missing the 2024 numbers"),
            ),
        )
        .await
        .expect("created");

    // Typed view.
    let theirs = c.get_assessment(&trace, &py_id).await.expect("python's");
    let ours = c
        .get_assessment(&trace, &ours.assessment_id)
        .await
        .expect("ours");
    let normalise = |mut a: feedback_proxy::mlflow::Assessment| {
        a.assessment_id.clear();
        a.create_time = None;
        a.last_update_time = None;
        a
    };
    assert_eq!(normalise(ours.clone()), normalise(theirs.clone()));

    // Raw view: field by field, as the server stores them.
    let raw = |id: String| {
        let url = format!(
            "{}/api/3.0/mlflow/traces/{trace}/assessments/{id}",
            mlflow_url()
        );
        async move {
            let (status, mut v, _) = http_json(Method::GET, &url, &[], None).await;
            assert_eq!(status, StatusCode::OK);
            let a = v["assessment"].as_object_mut().expect("assessment object");
            for k in ["assessment_id", "create_time", "last_update_time"] {
                assert!(a.remove(k).is_some(), "{k} present");
            }
            v
        }
    };
    let ours_raw = raw(ours.assessment_id).await;
    let theirs_raw = raw(theirs.assessment_id).await;
    assert_eq!(ours_raw, theirs_raw);
    assert_eq!(
        ours_raw["assessment"]["source"],
        json!({"source_type": "HUMAN", "source_id": user})
    );
}

/// The private server helper: stop makes calls fail with Connect; start on the same port and
/// db brings the data back.
#[tokio::test]
async fn private_server_can_be_stopped_and_restarted() {
    let mut server = MlflowServer::spawn().await;
    let exp = support::mlflow::create_experiment(&server.url(), "restart").await;
    let (c, _) = client_with(&server.url(), Duration::from_secs(5));
    // A trace of our own, made by the Python client (no agent needed).
    let trace = run_python(
        r#"
import sys, mlflow
mlflow.set_tracking_uri(sys.argv[1]); mlflow.set_experiment(experiment_id=sys.argv[2])
with mlflow.start_span("restart-test") as span:
    span.set_inputs({"q": "x"})
print(span.trace_id)
mlflow.flush_trace_async_logging()
"#,
        &[&server.url(), &exp],
    )
    .await
    .lines()
    .next()
    .expect("trace id")
    .trim()
    .to_owned();
    wait_for_trace(&c, &trace, Duration::from_secs(20)).await;
    let a = c
        .create_assessment(&trace, &vote("hank", FeedbackValue::Bool(true), None))
        .await
        .expect("created");
    server.stop();
    assert!(!server.is_running());
    let e = c.get_trace_info(&trace).await.expect_err("server is down");
    assert_eq!(e.kind, MlflowErrorKind::Connect, "{e}");
    assert!(e.is_retryable());
    server.start().await;
    let got = c
        .get_assessment(&trace, &a.assessment_id)
        .await
        .expect("data survived the restart");
    assert_eq!(got.value, Some(json!(true)));
}

// ---- fault injection -------------------------------------------------------------------------

fn fake_client(fake: &FakeMlflow, timeout: Duration) -> feedback_proxy::mlflow::MlflowClient {
    client_with(&fake.url(), timeout).0
}

#[tokio::test]
async fn fake_500_is_a_retryable_server_error() {
    let fake = FakeMlflow::start(|_| {
        FakeReply::json(
            500,
            json!({"error_code": "INTERNAL_ERROR", "message": "database is locked"}),
        )
    })
    .await;
    let e = fake_client(&fake, Duration::from_secs(5))
        .get_trace_info("tr-1")
        .await
        .expect_err("500");
    assert_eq!(e.kind, MlflowErrorKind::Server);
    assert!(e.is_retryable());
    assert_eq!(e.short(), "500 INTERNAL_ERROR: database is locked");
}

#[tokio::test]
async fn fake_hang_is_a_timeout() {
    let fake = FakeMlflow::start(|_| FakeReply::Hang).await;
    let started = std::time::Instant::now();
    let e = fake_client(&fake, Duration::from_millis(300))
        .get_assessment("tr-1", "a-1")
        .await
        .expect_err("hang");
    assert_eq!(e.kind, MlflowErrorKind::Timeout);
    assert!(e.is_retryable());
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(e.short(), "timeout: no response within 300ms");
}

#[tokio::test]
async fn fake_429_carries_retry_after() {
    let fake = FakeMlflow::start(|_| {
        FakeReply::Status(
            StatusCode::TOO_MANY_REQUESTS,
            vec![
                ("content-type", "application/json".into()),
                ("retry-after", "17".into()),
            ],
            r#"{"error_code":"REQUEST_LIMIT_EXCEEDED","message":"rate limit"}"#.into(),
        )
    })
    .await;
    let e = fake_client(&fake, Duration::from_secs(5))
        .create_assessment("tr-1", &vote("ivy", FeedbackValue::Bool(true), None))
        .await
        .expect_err("429");
    assert_eq!(
        e.kind,
        MlflowErrorKind::RateLimited {
            retry_after: Some(Duration::from_secs(17))
        }
    );
    assert!(e.is_retryable());
    // The HTTP-date form.
    let at = std::time::SystemTime::now() + Duration::from_secs(120);
    let date = httpdate::fmt_http_date(at);
    let fake = FakeMlflow::start(move |_| {
        FakeReply::Status(
            StatusCode::TOO_MANY_REQUESTS,
            vec![("retry-after", date.clone())],
            "slow down".into(),
        )
    })
    .await;
    let e = fake_client(&fake, Duration::from_secs(5))
        .get_trace_info("tr-1")
        .await
        .expect_err("429");
    let d = e.retry_after().expect("retry after");
    assert!(
        d > Duration::from_secs(110) && d <= Duration::from_secs(120),
        "{d:?}"
    );
}

#[tokio::test]
async fn connection_refused_is_connect() {
    let port = free_port();
    let (c, metrics) = client_with(&format!("http://127.0.0.1:{port}"), Duration::from_secs(5));
    let e = c.get_trace_info("tr-1").await.expect_err("refused");
    assert_eq!(e.kind, MlflowErrorKind::Connect, "{e}");
    assert!(e.is_retryable());
    assert_eq!(e.status, None);
    let text = metrics.encode();
    assert!(
        text.contains(
            r#"feedback_proxy_mlflow_errors_total{operation="get_trace_info",status="0"} 1"#
        ),
        "{text}"
    );
}

#[tokio::test]
async fn fake_html_405_is_a_client_error_with_a_short_reason() {
    let fake = FakeMlflow::start(|_| {
        FakeReply::Status(
            StatusCode::METHOD_NOT_ALLOWED,
            vec![("content-type", "text/html; charset=utf-8".into())],
            "<!doctype html>\n<html lang=en>\n<title>405 Method Not Allowed</title>\n<h1>Method Not Allowed</h1>\n<p>The method is not allowed for the requested URL.</p>\n".into(),
        )
    })
    .await;
    let e = fake_client(&fake, Duration::from_secs(5))
        .delete_assessment("tr-1", "a-1")
        .await
        .expect_err("405");
    assert_eq!(e.kind, MlflowErrorKind::Client);
    assert!(!e.is_retryable());
    assert_eq!(
        e.short(),
        "405: Method Not Allowed: The method is not allowed for the requested URL."
    );
}

#[tokio::test]
async fn fake_constraint_violation_on_a_client_id_is_already_exists() {
    let sample: serde_json::Value = serde_json::from_str(include_str!(
        "fixtures/samples/07_create_with_same_client_assessment_id.json"
    ))
    .expect("sample");
    let body = sample["response_body"].clone();
    let fake = FakeMlflow::start(move |_| FakeReply::json(500, body.clone())).await;
    let c = fake_client(&fake, Duration::from_secs(5));
    let mut a = vote("carol", FeedbackValue::String("thumbs_down".into()), None);
    a.assessment_id = Some("a-proxy-req-abc123-1".into());
    let e = c.create_assessment("tr-1", &a).await.expect_err("taken");
    assert_eq!(e.kind, MlflowErrorKind::AlreadyExists);
    // Without a client id the same answer is just a server error.
    a.assessment_id = None;
    let e = c.create_assessment("tr-1", &a).await.expect_err("500");
    assert_eq!(e.kind, MlflowErrorKind::Server);
}

/// The crash window: the server applied the create, then the connection dropped before the
/// answer. The caller sees a retryable Connect error (and retries with the same client id).
#[tokio::test]
async fn fake_dropped_connection_is_connect() {
    let fake = FakeMlflow::start(|_| FakeReply::Drop).await;
    let e = fake_client(&fake, Duration::from_secs(5))
        .create_assessment("tr-1", &vote("jo", FeedbackValue::Bool(true), None))
        .await
        .expect_err("dropped");
    assert_eq!(e.kind, MlflowErrorKind::Connect, "{e}");
    assert!(e.is_retryable());
    assert_eq!(fake.requests().len(), 1, "the request did arrive");
}

/// What goes on the wire: our own Host, no Origin, JSON content type on bodies, the wrapped
/// create body, the camelCase mask, encoded ids, and metrics per call.
#[tokio::test]
async fn requests_carry_own_host_json_and_no_origin() {
    let fake = FakeMlflow::start(|r| match (r.method.as_str(), r.path.as_str()) {
        ("POST", p) if p.ends_with("/assessments") => {
            let mut body: serde_json::Value = serde_json::from_slice(&r.body).expect("json");
            body["assessment"]["assessment_id"] = json!("a-1");
            FakeReply::json(200, body)
        }
        ("PATCH", _) => FakeReply::json(
            200,
            json!({"assessment": {"assessment_id": "a-1", "feedback": {"value": false}}}),
        ),
        ("POST", "/api/3.0/mlflow/traces/search") => FakeReply::json(200, json!({})),
        _ => FakeReply::json(200, json!({})),
    })
    .await;
    let (c, metrics) = client_with(&fake.url(), Duration::from_secs(5));
    let trace = "trace:/main.agents/0af7651916cd43dd8448eb211c80319c";
    c.create_assessment(trace, &vote("kim", FeedbackValue::Bool(true), Some("ok")))
        .await
        .expect("create");
    c.update_assessment(
        trace,
        "a-1",
        &AssessmentUpdate {
            value: FeedbackValue::Bool(false),
            rationale: None,
        },
    )
    .await
    .expect("update");
    c.delete_assessment(trace, "a-1").await.expect("delete");
    assert_eq!(
        c.find_trace_by_client_request_id("1", "req-1")
            .await
            .expect("search"),
        None
    );

    let reqs = fake.requests();
    assert_eq!(reqs.len(), 4);
    let host = fake.addr.to_string();
    for r in &reqs {
        assert_eq!(r.headers["host"], host.as_str(), "{} {}", r.method, r.path);
        assert!(r.headers.get("origin").is_none());
        assert!(r.headers.get("authorization").is_none());
        assert_eq!(r.headers["accept"], "application/json");
    }
    let encoded = "trace%3A%2Fmain.agents%2F0af7651916cd43dd8448eb211c80319c";
    assert_eq!(reqs[0].method, Method::POST);
    assert_eq!(
        reqs[0].path,
        format!("/api/3.0/mlflow/traces/{encoded}/assessments")
    );
    assert_eq!(reqs[0].headers["content-type"], "application/json");
    let create: serde_json::Value = serde_json::from_slice(&reqs[0].body).expect("json");
    assert_eq!(
        create,
        json!({"assessment": {
            "trace_id": trace, "assessment_name": "user_feedback",
            "source": {"source_type": "HUMAN", "source_id": "kim"},
            "feedback": {"value": true}, "rationale": "ok"}})
    );
    assert_eq!(reqs[1].method, Method::PATCH);
    assert_eq!(
        reqs[1].path,
        format!("/api/3.0/mlflow/traces/{encoded}/assessments/a-1")
    );
    let patch: serde_json::Value = serde_json::from_slice(&reqs[1].body).expect("json");
    assert_eq!(patch["update_mask"], "feedback,rationale");
    assert_eq!(reqs[2].method, Method::DELETE);
    assert!(reqs[2].body.is_empty());
    assert!(reqs[2].headers.get("content-type").is_none());
    let search: serde_json::Value = serde_json::from_slice(&reqs[3].body).expect("json");
    assert_eq!(search["filter"], "attributes.client_request_id = 'req-1'");
    assert_eq!(
        search["locations"],
        json!([{"type": "MLFLOW_EXPERIMENT", "mlflow_experiment": {"experiment_id": "1"}}])
    );

    let text = metrics.encode();
    for op in [
        "create_assessment",
        "update_assessment",
        "delete_assessment",
        "search_traces",
    ] {
        assert!(
            text.contains(&format!(
                "feedback_proxy_mlflow_request_duration_seconds_count{{operation=\"{op}\"}} 1"
            )),
            "{op}: {text}"
        );
    }
    assert!(
        !text.contains("feedback_proxy_mlflow_errors_total{"),
        "{text}"
    );
}

/// A search answer naming another client request id (a server that ignored the filter) is not
/// taken as a match.
#[tokio::test]
async fn fake_search_result_with_another_client_request_id_is_ignored() {
    let fake = FakeMlflow::start(|_| {
        FakeReply::json(
            200,
            json!({"traces": [{"trace_id": "tr-other", "client_request_id": "req-other"}]}),
        )
    })
    .await;
    let c = fake_client(&fake, Duration::from_secs(5));
    assert_eq!(
        c.find_trace_by_client_request_id("1", "req-mine")
            .await
            .expect("search"),
        None
    );
}
