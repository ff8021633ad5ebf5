//! The feedback API and MLflow delivery (issue 5) against a real `mlflow server`, the real
//! example agent and real stores (SQLite and Postgres), with small fault-injecting stand-ins
//! where a failure must be provoked.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use feedback_proxy::mlflow::{Assessment, MlflowClient};
use feedback_proxy::store::{DeliveryState, LinkRecord};
use http::Request;
use serde_json::{Value, json};
use support::mlflow::{
    AgentProcess, MlflowServer, agent_url, ask_agent, experiment_id, mlflow_url,
};
use support::pg::{TestDb, shared_url};
use support::proxy::{TestProxy, body_json, h1, send};

const ALICE: &str = "alice@example.com";
const BOB: &str = "bob@example.com";

/// Delivery settings that make retries quick enough for tests.
const FAST_DELIVERY: &str = "[delivery]\npoll_interval = \"100ms\"\nbackoff_initial = \"200ms\"\nbackoff_max = \"1s\"\nlease = \"10s\"\n";

fn config(mlflow: Option<(&str, &str)>, store_url: Option<&str>, extra: &str) -> String {
    let mut c =
        "[identity]\ntrust_forwarded_headers = true\n[agent]\nurl = \"http://127.0.0.1:9\"\n"
            .to_owned();
    if let Some((url, exp)) = mlflow {
        c.push_str(&format!(
            "[mlflow]\ntracking_uri = \"{url}\"\nexperiment_id = \"{exp}\"\ntimeout = \"3s\"\n"
        ));
    }
    if let Some(s) = store_url {
        c.push_str(&format!("[store]\nurl = \"{s}\"\n"));
    }
    c.push_str(extra);
    c
}

fn shared_mlflow() -> Option<(String, String)> {
    Some((mlflow_url(), experiment_id()))
}

fn as_ref(o: &Option<(String, String)>) -> Option<(&str, &str)> {
    o.as_ref().map(|(a, b)| (a.as_str(), b.as_str()))
}

/// A fresh trace from the agent, and its message id linked to `user` in the proxy's store, as
/// if the answer had streamed through the proxy (linking itself is tested in linking.rs).
async fn answered(proxy: &TestProxy, agent: &str, user: &str, chat: &str) -> (String, String) {
    let answer = ask_agent(agent, "what is the answer?", None, Some(user)).await;
    let trace_id = answer.trace_id.expect("agent returned a trace id");
    let message_id = uuid::Uuid::now_v7().to_string();
    link(proxy, &message_id, user, chat, Some(&trace_id), None).await;
    (message_id, trace_id)
}

/// Waits until nothing is left to deliver on any of `proxies`' stores (no pending or waiting
/// delivery, so no attempt in flight): from then on nothing can change in MLflow, and a count
/// read afterwards is final. This is the event a "no duplicate appears" check waits for.
async fn quiet(proxies: &[&TestProxy]) {
    let settled = async {
        'again: loop {
            for p in proxies {
                let s = p.state.store.delivery_stats().await.unwrap();
                if s.pending > 0 || s.waiting > 0 {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue 'again;
                }
            }
            return;
        }
    };
    tokio::time::timeout(Duration::from_secs(60), settled)
        .await
        .expect("deliveries still pending after 60s");
}

/// The proxy's `done` deliveries, once there is at least one (at most 20 s).
async fn done_deliveries(proxy: &TestProxy) -> Vec<feedback_proxy::store::Delivery> {
    let done = async {
        loop {
            let d = proxy
                .state
                .store
                .list_deliveries(Some(DeliveryState::Done), 10)
                .await
                .unwrap();
            if !d.is_empty() {
                return d;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(20), done)
        .await
        .expect("no delivery was done within 20 s")
}

async fn link(
    proxy: &TestProxy,
    message_id: &str,
    user: &str,
    chat: &str,
    trace_id: Option<&str>,
    client_request_id: Option<&str>,
) {
    proxy
        .state
        .store
        .record_links(&[LinkRecord {
            message_id: message_id.to_owned(),
            chat_id: Some(chat.to_owned()),
            user_id: user.to_owned(),
            trace_id: trace_id.map(str::to_owned),
            client_request_id: client_request_id.map(str::to_owned),
            open: false,
            route: None,
        }])
        .await
        .unwrap();
}

async fn vote(proxy: &TestProxy, user: &str, body: Value) -> (u16, Value) {
    support::proxy::post_vote(proxy, user, &body).await
}

async fn votes_of(proxy: &TestProxy, user: &str, chat: &str) -> Value {
    let res = send(
        &h1(),
        Request::get(proxy.url(&format!("/api/feedback/{chat}"))).header("x-forwarded-email", user),
        "",
    )
    .await;
    assert_eq!(res.status(), 200);
    body_json(res).await
}

fn client_for(url: &str) -> MlflowClient {
    support::mlflow::client_with(url, Duration::from_secs(5)).0
}

/// The valid feedback assessments named `name` on a trace.
async fn assessments(client: &MlflowClient, trace_id: &str, name: &str) -> Vec<Assessment> {
    match client.get_trace_info(trace_id).await {
        Ok(info) => info
            .assessments
            .into_iter()
            .filter(|a| a.name == name && a.valid != Some(false))
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// Waits until `check` holds for the trace's assessments.
async fn wait_assessments(
    client: &MlflowClient,
    trace_id: &str,
    what: &str,
    limit: Duration,
    check: impl Fn(&[Assessment]) -> bool,
) -> Vec<Assessment> {
    let start = Instant::now();
    loop {
        let a = assessments(client, trace_id, "user_feedback").await;
        if check(&a) {
            return a;
        }
        assert!(
            start.elapsed() < limit,
            "{what}: not within {limit:?}; assessments: {a:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vote_is_stored_logged_updated_and_listed() {
    vote_logged_updated_listed(None).await;
}

/// The same on Postgres, where the usual vote is checked, written and claimed for its inline
/// attempt in one statement (`Store::vote_on_link`), and a retracted vote voted again is logged
/// afresh on that path too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vote_is_stored_logged_updated_and_listed_on_postgres() {
    let db = TestDb::create(&shared_url()).await;
    let (proxy, message_id, trace_id) = vote_logged_updated_listed(Some(&db.url)).await;
    let delete = Request::delete(proxy.url(&format!("/api/feedback/chat-a/{message_id}")))
        .header("content-type", "application/json")
        .header("x-forwarded-email", ALICE);
    let res = send(&h1(), delete, "").await;
    assert_eq!(res.status(), 200);
    assert_eq!(body_json(res).await["mlflowStatus"], "deleted");
    let (status, v) = vote(
        &proxy,
        ALICE,
        json!({"chatId": "chat-a", "messageId": message_id, "isUpvoted": true}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["mlflowStatus"], "logged", "{v}");
    let a = assessments(&client_for(&mlflow_url()), &trace_id, "user_feedback").await;
    assert_eq!(a.len(), 1, "{a:#?}");
    assert_eq!(a[0].value, Some(json!(true)));
    assert_eq!(
        votes_of(&proxy, ALICE, "chat-a").await["votes"],
        json!({ message_id: true })
    );
}

/// Votes on an answer, changes the vote, and checks MLflow and the listing; returns the proxy,
/// the message and its trace.
async fn vote_logged_updated_listed(store_url: Option<&str>) -> (TestProxy, String, String) {
    let proxy = TestProxy::start(&config(as_ref(&shared_mlflow()), store_url, FAST_DELIVERY)).await;
    let (message_id, trace_id) = answered(&proxy, &agent_url(), ALICE, "chat-a").await;
    support::mlflow::wait_for_trace(
        &client_for(&mlflow_url()),
        &trace_id,
        Duration::from_secs(20),
    )
    .await;

    let (status, v) = vote(
        &proxy,
        ALICE,
        json!({"chatId": "chat-a", "messageId": message_id, "isUpvoted": true}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["success"], true);
    assert_eq!(v["isUpvoted"], true);
    assert_eq!(v["mlflowStatus"], "logged", "{v}");
    assert_eq!(v["traceId"], trace_id.as_str());
    let assessment_id = v["assessmentId"].as_str().unwrap().to_owned();

    let listed = votes_of(&proxy, ALICE, "chat-a").await;
    assert_eq!(listed["votes"], json!({ message_id.clone(): true }));
    // Nobody else sees Alice's votes.
    assert_eq!(votes_of(&proxy, BOB, "chat-a").await["votes"], json!({}));

    // A changed vote patches the same assessment.
    let (status, v) = vote(
        &proxy,
        ALICE,
        json!({"chatId": "chat-a", "messageId": message_id, "isUpvoted": false, "comment": "missing the 2024 numbers"}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(v["mlflowStatus"], "updated", "{v}");
    assert_eq!(v["assessmentId"], assessment_id.as_str());

    let client = client_for(&mlflow_url());
    let a = assessments(&client, &trace_id, "user_feedback").await;
    assert_eq!(a.len(), 1, "{a:#?}");
    assert_eq!(a[0].assessment_id, assessment_id);
    assert_eq!(a[0].value, Some(json!(false)));
    assert_eq!(a[0].rationale.as_deref(), Some("missing the 2024 numbers"));
    assert_eq!(a[0].source_type, "HUMAN");
    assert_eq!(a[0].source_id, ALICE);
    assert_eq!(
        votes_of(&proxy, ALICE, "chat-a").await["feedback"][&message_id]["comment"],
        "missing the 2024 numbers"
    );
    (proxy, message_id, trace_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_assessment_is_what_mlflow_log_feedback_would_create() {
    let proxy = TestProxy::start(&config(as_ref(&shared_mlflow()), None, FAST_DELIVERY)).await;
    let (message_id, ours) = answered(&proxy, &agent_url(), ALICE, "chat-p").await;
    let theirs = ask_agent(&agent_url(), "same question", None, Some(ALICE))
        .await
        .trace_id
        .unwrap();
    let client = client_for(&mlflow_url());
    support::mlflow::wait_for_trace(&client, &ours, Duration::from_secs(20)).await;
    support::mlflow::wait_for_trace(&client, &theirs, Duration::from_secs(20)).await;

    let (status, v) = vote(
        &proxy,
        ALICE,
        json!({"chatId": "chat-p", "messageId": message_id, "isUpvoted": false, "comment": "wrong year"}),
    )
    .await;
    assert_eq!(
        (status, v["mlflowStatus"].as_str()),
        (200, Some("logged")),
        "{v}"
    );

    // The same feedback through the Python client, the reference behaviour.
    let out = support::mlflow::run_python(
        r#"
import json, sys, mlflow
from mlflow.entities import AssessmentSource, AssessmentSourceType
mlflow.set_tracking_uri(sys.argv[1])
mlflow.log_feedback(trace_id=sys.argv[2], name="user_feedback", value=False, rationale="wrong year",
    source=AssessmentSource(source_type=AssessmentSourceType.HUMAN, source_id=sys.argv[3]))
def fields(trace_id):
    a = [x for x in mlflow.get_trace(trace_id).info.assessments if x.name == "user_feedback"][0]
    return {"name": a.name, "value": a.feedback.value, "rationale": a.rationale,
            "source_type": a.source.source_type, "source_id": a.source.source_id,
            "valid": a.valid, "error": a.feedback.error is not None, "expectation": a.expectation is not None}
print(json.dumps({"ours": fields(sys.argv[4]), "theirs": fields(sys.argv[2])}))
"#,
        &[&mlflow_url(), &theirs, ALICE, &ours],
    )
    .await;
    let v: Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(v["ours"], v["theirs"], "{v}");
    assert_eq!(v["ours"]["source_type"], "HUMAN");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_mlflow_the_vote_is_kept_and_delivered_once_mlflow_is_configured() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("sqlite://{}", dir.path().join("store.db").display());
    let proxy = TestProxy::start(&config(None, Some(&store), "")).await;
    let (message_id, trace_id) = answered(&proxy, &agent_url(), ALICE, "c").await;
    let (status, v) = vote(
        &proxy,
        ALICE,
        json!({"chatId": "c", "messageId": message_id, "isUpvoted": true}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(v["success"], true);
    assert_eq!(v["mlflowStatus"], "no_experiment_id");
    assert_eq!(
        votes_of(&proxy, ALICE, "c").await["votes"],
        json!({ &message_id: true })
    );
    let parked = proxy
        .state
        .store
        .list_deliveries(Some(DeliveryState::Waiting), 10)
        .await
        .unwrap();
    assert_eq!(parked.len(), 1);
    assert_eq!(parked[0].last_error.as_deref(), Some("no_experiment_id"));
    proxy.shutdown().await;

    // The operator configures MLflow and restarts: the held vote is delivered, once.
    let proxy = TestProxy::start(&config(
        as_ref(&shared_mlflow()),
        Some(&store),
        FAST_DELIVERY,
    ))
    .await;
    let a = wait_assessments(
        &client_for(&mlflow_url()),
        &trace_id,
        "the vote held while MLflow was not configured",
        Duration::from_secs(20),
        |a| !a.is_empty(),
    )
    .await;
    assert_eq!(a.len(), 1);
    assert_eq!(a[0].value, Some(json!(true)));
    let d = &proxy.state.store.list_deliveries(None, 10).await.unwrap()[0];
    assert_eq!(
        (d.state, d.last_error.as_deref()),
        (DeliveryState::Done, None)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_message_is_404_and_an_untraced_one_is_parked_until_its_trace_arrives() {
    let proxy = TestProxy::start(&config(as_ref(&shared_mlflow()), None, FAST_DELIVERY)).await;
    let message_id = uuid::Uuid::now_v7().to_string();
    let body = json!({"chatId": "c-u", "messageId": message_id, "isUpvoted": true});
    // Nobody streamed it: refused, nothing stored (ownership, tests/ownership.rs).
    let (status, v) = vote(&proxy, ALICE, body.clone()).await;
    assert_eq!(status, 404, "{v}");
    assert_eq!(v["code"], "UNKNOWN_MESSAGE");
    assert!(
        votes_of(&proxy, ALICE, "c-u").await["votes"]
            .get(&message_id)
            .is_none()
    );

    // Alice's answer ended without a trace id: her vote is stored and parked.
    link(&proxy, &message_id, ALICE, "c-u", None, None).await;
    let (status, v) = vote(&proxy, ALICE, body).await;
    assert_eq!(status, 200);
    assert_eq!(v["mlflowStatus"], "no_trace_id");
    assert_eq!(
        votes_of(&proxy, ALICE, "c-u").await["votes"][&message_id],
        true
    );

    // The trace id shows up later (e.g. written by another replica): the parked vote is
    // delivered.
    let trace_id = ask_agent(&agent_url(), "late link", None, Some(ALICE))
        .await
        .trace_id
        .unwrap();
    link(&proxy, &message_id, ALICE, "c-u", Some(&trace_id), None).await;
    let client = client_for(&mlflow_url());
    let a = wait_assessments(
        &client,
        &trace_id,
        "the woken vote",
        Duration::from_secs(20),
        |a| a.len() == 1,
    )
    .await;
    assert_eq!(a[0].value, Some(json!(true)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_request_id_is_resolved_by_search() {
    let proxy = TestProxy::start(&config(as_ref(&shared_mlflow()), None, FAST_DELIVERY)).await;
    let crid = format!("req-{}", uuid::Uuid::new_v4().simple());
    let trace_id = ask_agent(&agent_url(), "tagged", Some(&crid), Some(ALICE))
        .await
        .trace_id
        .unwrap();
    let message_id = uuid::Uuid::now_v7().to_string();
    link(&proxy, &message_id, ALICE, "c-r", None, Some(&crid)).await;

    let (status, v) = vote(
        &proxy,
        ALICE,
        json!({"chatId": "c-r", "messageId": message_id, "value": 4, "name": "rating"}),
    )
    .await;
    assert_eq!(status, 200);
    assert!(
        matches!(v["mlflowStatus"].as_str(), Some("logged" | "queued")),
        "{v}"
    );
    let client = client_for(&mlflow_url());
    let start = Instant::now();
    loop {
        let a = assessments(&client, &trace_id, "rating").await;
        if a.len() == 1 {
            assert_eq!(a[0].value, Some(json!(4.0)));
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "{a:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The trace id found by search is remembered on the link.
    let l = proxy
        .state
        .store
        .get_link(&message_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(l.trace_id.as_deref(), Some(trace_id.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vote_before_the_trace_is_flushed_is_queued_then_lands_exactly_once() {
    // An agent that flushes its traces slowly: the trace is unknown for seconds after [DONE].
    let agent = AgentProcess::spawn_with_env(
        &mlflow_url(),
        &experiment_id(),
        &[("MLFLOW_ASYNC_TRACE_LOGGING_MAX_INTERVAL_MILLIS", "4000")],
    )
    .await;
    let proxy = TestProxy::start(&config(as_ref(&shared_mlflow()), None, FAST_DELIVERY)).await;
    let (message_id, trace_id) = answered(&proxy, &agent.url(), ALICE, "c-q").await;
    let (status, v) = vote(
        &proxy,
        ALICE,
        json!({"chatId": "c-q", "messageId": message_id, "isUpvoted": true}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(v["mlflowStatus"], "queued", "{v}");
    let client = client_for(&mlflow_url());
    assert!(
        assessments(&client, &trace_id, "user_feedback")
            .await
            .is_empty()
    );
    wait_assessments(
        &client,
        &trace_id,
        "the queued vote",
        Duration::from_secs(30),
        |a| a.len() == 1 && a[0].value == Some(json!(true)),
    )
    .await;
    // And it stays one: nothing else is pending for it.
    quiet(&[&proxy]).await;
    assert_eq!(
        assessments(&client, &trace_id, "user_feedback").await.len(),
        1
    );
}

async fn alternating_votes(proxies: &[&TestProxy], message_id: &str, chat: &str) -> bool {
    let mut tasks = Vec::new();
    for i in 0..20 {
        let url = proxies[i % proxies.len()].url("/api/feedback");
        let body = json!({"chatId": chat, "messageId": message_id, "isUpvoted": i % 2 == 0});
        tasks.push(tokio::spawn(async move {
            let res = send(
                &h1(),
                Request::post(url)
                    .header("content-type", "application/json")
                    .header("x-forwarded-email", ALICE),
                body.to_string(),
            )
            .await;
            res.status().as_u16()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    // The last committed vote is what the store holds now.
    votes_of(proxies[0], ALICE, chat).await["votes"][message_id]
        .as_bool()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_votes_end_as_one_assessment_with_the_last_value() {
    let db = TestDb::create(&shared_url()).await;
    let proxy = TestProxy::start(&config(
        as_ref(&shared_mlflow()),
        Some(&db.url),
        FAST_DELIVERY,
    ))
    .await;
    let (message_id, trace_id) = answered(&proxy, &agent_url(), ALICE, "c-c").await;
    let client = client_for(&mlflow_url());
    support::mlflow::wait_for_trace(&client, &trace_id, Duration::from_secs(20)).await;
    let last = alternating_votes(&[&proxy], &message_id, "c-c").await;
    let a = wait_assessments(
        &client,
        &trace_id,
        "the last value",
        Duration::from_secs(20),
        |a| a.len() == 1 && a[0].value == Some(json!(last)),
    )
    .await;
    assert_eq!(a[0].source_id, ALICE);
    quiet(&[&proxy]).await;
    assert_eq!(
        assessments(&client, &trace_id, "user_feedback").await.len(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_proxies_on_one_postgres_deliver_one_assessment() {
    let db = TestDb::create(&shared_url()).await;
    let cfg = config(as_ref(&shared_mlflow()), Some(&db.url), FAST_DELIVERY);
    let one = TestProxy::start(&cfg).await;
    let two = TestProxy::start(&cfg).await;
    let (message_id, trace_id) = answered(&one, &agent_url(), ALICE, "c-2").await;
    let client = client_for(&mlflow_url());
    support::mlflow::wait_for_trace(&client, &trace_id, Duration::from_secs(20)).await;
    let last = alternating_votes(&[&one, &two], &message_id, "c-2").await;
    wait_assessments(
        &client,
        &trace_id,
        "one assessment",
        Duration::from_secs(20),
        |a| a.len() == 1 && a[0].value == Some(json!(last)),
    )
    .await;
    quiet(&[&one, &two]).await;
    assert_eq!(
        assessments(&client, &trace_id, "user_feedback").await.len(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retracting_deletes_the_assessment_and_an_unknown_vote_is_404() {
    let proxy = TestProxy::start(&config(as_ref(&shared_mlflow()), None, FAST_DELIVERY)).await;
    let (message_id, trace_id) = answered(&proxy, &agent_url(), ALICE, "c-d").await;
    let client = client_for(&mlflow_url());
    support::mlflow::wait_for_trace(&client, &trace_id, Duration::from_secs(20)).await;
    let (_, v) = vote(
        &proxy,
        ALICE,
        json!({"chatId": "c-d", "messageId": message_id, "isUpvoted": true}),
    )
    .await;
    assert_eq!(v["mlflowStatus"], "logged");
    assert_eq!(
        assessments(&client, &trace_id, "user_feedback").await.len(),
        1
    );

    let delete = |chat: &str, message: &str| {
        Request::delete(proxy.url(&format!("/api/feedback/{chat}/{message}")))
            .header("content-type", "application/json")
            .header("x-forwarded-email", ALICE)
    };
    let res = send(&h1(), delete("c-d", &message_id), "").await;
    assert_eq!(res.status(), 200);
    let v = body_json(res).await;
    assert_eq!(v["mlflowStatus"], "deleted", "{v}");
    assert!(
        assessments(&client, &trace_id, "user_feedback")
            .await
            .is_empty()
    );
    assert_eq!(votes_of(&proxy, ALICE, "c-d").await["votes"], json!({}));

    // Again: nothing to retract.
    let res = send(&h1(), delete("c-d", &message_id), "").await;
    assert_eq!(res.status(), 404);
    let v = body_json(res).await;
    assert_eq!(v["code"], "NOT_FOUND");
    assert!(v["error"].as_str().unwrap().contains(&message_id));

    // Voting again after a retraction creates a fresh assessment.
    let (_, v) = vote(
        &proxy,
        ALICE,
        json!({"chatId": "c-d", "messageId": message_id, "isUpvoted": false}),
    )
    .await;
    assert_eq!(v["mlflowStatus"], "logged", "{v}");
    let a = assessments(&client, &trace_id, "user_feedback").await;
    assert_eq!(a.len(), 1);
    assert_eq!(a[0].value, Some(json!(false)));
}

/// A stand-in in front of the real MLflow that lets the first create through to the server and
/// then drops the connection instead of answering: the crash window between "MLflow created it"
/// and "we recorded it".
async fn dropping_first_create(real: String) -> (String, Arc<AtomicUsize>) {
    faulty_mlflow(real, false, &[0]).await
}

/// A stand-in in front of the real MLflow: drops the answers of the creates whose index is in
/// `drop` (they are applied first), and with `strip_ids` ignores client-chosen assessment ids
/// like a server that assigns its own.
async fn faulty_mlflow(
    real: String,
    strip_ids: bool,
    drop: &[usize],
) -> (String, Arc<AtomicUsize>) {
    let drop: Arc<Vec<usize>> = Arc::new(drop.to_vec());
    use http_body_util::{BodyExt, Full};
    use hyper::service::service_fn;
    use hyper_util::rt::{TokioExecutor, TokioIo};

    let creates = Arc::new(AtomicUsize::new(0));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let counter = creates.clone();
    tokio::spawn(async move {
        let client = support::proxy::h1();
        while let Ok((stream, _)) = listener.accept().await {
            let client = client.clone();
            let real = real.clone();
            let counter = counter.clone();
            let drop = drop.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let client = client.clone();
                    let real = real.clone();
                    let counter = counter.clone();
                    let drop = drop.clone();
                    async move {
                        let (parts, body) = req.into_parts();
                        let mut body = body.collect().await.unwrap().to_bytes();
                        let is_create = parts.method == http::Method::POST
                            && parts.uri.path().ends_with("/assessments");
                        if is_create && strip_ids {
                            let mut v: Value = serde_json::from_slice(&body).unwrap();
                            v["assessment"]
                                .as_object_mut()
                                .unwrap()
                                .remove("assessment_id");
                            body = bytes::Bytes::from(v.to_string());
                        }
                        let mut fwd = Request::builder()
                            .method(parts.method.clone())
                            .uri(format!("{real}{}", parts.uri));
                        for (k, v) in &parts.headers {
                            if k != http::header::HOST && k != http::header::CONTENT_LENGTH {
                                fwd = fwd.header(k, v);
                            }
                        }
                        let res = client
                            .request(fwd.body(Full::new(body)).unwrap())
                            .await
                            .unwrap();
                        let (rp, rb) = res.into_parts();
                        let rb = rb.collect().await.unwrap().to_bytes();
                        if is_create && drop.contains(&counter.fetch_add(1, Ordering::SeqCst)) {
                            // Applied on the server; the answer never arrives.
                            return Err::<hyper::Response<Full<bytes::Bytes>>, _>(
                                std::io::Error::other("dropped"),
                            );
                        }
                        Ok(hyper::Response::from_parts(rp, Full::new(rb)))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (format!("http://{addr}"), creates)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_whose_answer_is_lost_still_leaves_one_assessment() {
    let (faulty, creates) = dropping_first_create(mlflow_url()).await;
    let proxy = TestProxy::start(&config(
        Some((&faulty, &experiment_id())),
        None,
        FAST_DELIVERY,
    ))
    .await;
    let (message_id, trace_id) = answered(&proxy, &agent_url(), BOB, "c-x").await;
    let client = client_for(&mlflow_url());
    support::mlflow::wait_for_trace(&client, &trace_id, Duration::from_secs(20)).await;
    let (status, v) = vote(
        &proxy,
        BOB,
        json!({"chatId": "c-x", "messageId": message_id, "isUpvoted": true}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(v["mlflowStatus"], "queued", "{v}");
    let first = wait_assessments(
        &client,
        &trace_id,
        "the retried create",
        Duration::from_secs(20),
        |a| !a.is_empty(),
    )
    .await;
    // The retry must not have created a second one: once nothing is pending, none can appear.
    let d = done_deliveries(&proxy).await;
    quiet(&[&proxy]).await;
    let a = assessments(&client, &trace_id, "user_feedback").await;
    assert_eq!(a.len(), 1, "{a:#?}");
    assert_eq!(first[0].assessment_id, a[0].assessment_id);
    assert_eq!(
        d[0].assessment_id.as_deref(),
        Some(a[0].assessment_id.as_str())
    );
    assert!(creates.load(Ordering::SeqCst) >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_create_without_client_ids_is_found_by_user_and_name() {
    let (faulty, _creates) = dropping_first_create(mlflow_url()).await;
    let mut cfg = config(Some((&faulty, &experiment_id())), None, FAST_DELIVERY);
    cfg = cfg.replace(
        "timeout = \"3s\"\n",
        "timeout = \"3s\"\nclient_assessment_ids = false\n",
    );
    let proxy = TestProxy::start(&cfg).await;
    let (message_id, trace_id) = answered(&proxy, &agent_url(), BOB, "c-y").await;
    let client = client_for(&mlflow_url());
    support::mlflow::wait_for_trace(&client, &trace_id, Duration::from_secs(20)).await;
    let (_, v) = vote(
        &proxy,
        BOB,
        json!({"chatId": "c-y", "messageId": message_id, "isUpvoted": false}),
    )
    .await;
    assert_eq!(v["mlflowStatus"], "queued", "{v}");
    wait_assessments(
        &client,
        &trace_id,
        "one assessment",
        Duration::from_secs(20),
        |a| a.len() == 1,
    )
    .await;
    let d = done_deliveries(&proxy).await;
    quiet(&[&proxy]).await;
    let a = assessments(&client, &trace_id, "user_feedback").await;
    assert_eq!(a.len(), 1, "{a:#?}");
    assert_eq!(
        d[0].assessment_id.as_deref(),
        Some(a[0].assessment_id.as_str())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_error_and_nothing_is_stored() {
    let proxy = TestProxy::start(&config(
        as_ref(&shared_mlflow()),
        None,
        "[feedback.rate_limit]\nper_second = 1\nburst = 30\n",
    ))
    .await;
    // Bob's answer, for the authorization case.
    link(
        &proxy,
        "msg-bob",
        BOB,
        "c-b",
        Some("tr-00000000000000000000000000000001"),
        None,
    )
    .await;
    let post = |ct: &str, user: Option<&str>| {
        let mut b = Request::post(proxy.url("/api/feedback")).header("content-type", ct);
        if let Some(u) = user {
            b = b.header("x-forwarded-email", u);
        }
        b
    };
    let json_ct = "application/json";
    let long_comment = "x".repeat(5 * 1024);
    let two_mib = format!(
        r#"{{"chatId":"c","messageId":"m","isUpvoted":true,"pad":"{}"}}"#,
        "y".repeat(2 << 20)
    );
    let cases: Vec<(&str, http::request::Builder, String, u16, &str, &str)> = vec![
        (
            "malformed JSON",
            post(json_ct, Some(ALICE)),
            "{\"chatId\": ".into(),
            400,
            "INVALID_JSON",
            "not valid JSON",
        ),
        (
            "wrong type",
            post(json_ct, Some(ALICE)),
            r#"{"chatId":"c","messageId":"m","isUpvoted":"yes"}"#.into(),
            400,
            "INVALID_FIELD",
            "isUpvoted",
        ),
        (
            "missing field",
            post(json_ct, Some(ALICE)),
            r#"{"chatId":"c","isUpvoted":true}"#.into(),
            400,
            "MISSING_FIELD",
            "messageId",
        ),
        (
            "both isUpvoted and value",
            post(json_ct, Some(ALICE)),
            r#"{"chatId":"c","messageId":"m","isUpvoted":true,"value":1}"#.into(),
            400,
            "INVALID_FIELD",
            "not both",
        ),
        (
            "unknown name",
            post(json_ct, Some(ALICE)),
            r#"{"chatId":"c","messageId":"m","value":true,"name":"vibes"}"#.into(),
            400,
            "UNKNOWN_NAME",
            "vibes",
        ),
        (
            "5 KiB comment",
            post(json_ct, Some(ALICE)),
            format!(
                r#"{{"chatId":"c","messageId":"m","isUpvoted":false,"comment":"{long_comment}"}}"#
            ),
            400,
            "COMMENT_TOO_LONG",
            "comment",
        ),
        (
            "2 MiB body",
            post(json_ct, Some(ALICE)),
            two_mib,
            413,
            "PAYLOAD_TOO_LARGE",
            "limit",
        ),
        (
            "text/plain",
            post("text/plain", Some(ALICE)),
            r#"{"chatId":"c","messageId":"m","isUpvoted":true}"#.into(),
            415,
            "UNSUPPORTED_MEDIA_TYPE",
            "application/json",
        ),
        (
            "form post",
            post("application/x-www-form-urlencoded", Some(ALICE)),
            "chatId=c&messageId=m&isUpvoted=true".into(),
            415,
            "UNSUPPORTED_MEDIA_TYPE",
            "application/json",
        ),
        (
            "missing identity",
            post(json_ct, None),
            r#"{"chatId":"c","messageId":"m","isUpvoted":true}"#.into(),
            401,
            "UNAUTHENTICATED",
            "identity",
        ),
        (
            "another user's message",
            post(json_ct, Some(ALICE)),
            r#"{"chatId":"c-b","messageId":"msg-bob","isUpvoted":false}"#.into(),
            403,
            "FORBIDDEN",
            "another user",
        ),
    ];
    for (what, req, body, status, code, says) in cases {
        let res = send(&h1(), req, body).await;
        assert_eq!(res.status().as_u16(), status, "{what}");
        assert_eq!(res.headers()["content-type"], "application/json", "{what}");
        let v = body_json(res).await;
        assert_eq!(v["code"], code, "{what}: {v}");
        assert!(v["error"].as_str().unwrap().contains(says), "{what}: {v}");
    }
    // A burst past the rate limit (30 tokens; the cases above used some).
    let mut limited = None;
    for _ in 0..40 {
        let res = send(&h1(), post(json_ct, Some("carol@example.com")), "{").await;
        if res.status() == 429 {
            limited = Some(res);
            break;
        }
    }
    let res = limited.expect("no 429 within 40 requests");
    let retry_after: u64 = res.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry_after >= 1);
    assert_eq!(body_json(res).await["code"], "RATE_LIMITED");

    // Nothing was stored for any of them.
    for user in [ALICE, BOB] {
        for chat in ["c", "c-b"] {
            assert_eq!(
                votes_of(&proxy, user, chat).await["votes"],
                json!({}),
                "{user} {chat}"
            );
        }
    }
    let stats = proxy.state.store.delivery_stats().await.unwrap();
    assert_eq!(stats.pending + stats.waiting + stats.done + stats.dead, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_is_off_unless_configured() {
    let proxy = TestProxy::start(&config(None, None, "")).await;
    link(&proxy, "m", ALICE, "c", None, None).await;
    let res = send(
        &h1(),
        Request::post(proxy.url("/api/feedback"))
            .header("content-type", "application/json")
            .header("x-forwarded-email", ALICE)
            .header("origin", "https://elsewhere.example"),
        r#"{"chatId":"c","messageId":"m","isUpvoted":true}"#,
    )
    .await;
    assert_eq!(res.status(), 200);
    assert!(!res.headers().contains_key("access-control-allow-origin"));
    let res = send(
        &h1(),
        Request::options(proxy.url("/api/feedback")).header("origin", "https://elsewhere.example"),
        "",
    )
    .await;
    assert_eq!(res.status(), 403);

    let proxy = TestProxy::start(&config(
        None,
        None,
        "[feedback]\ncors_origins = [\"https://chat.example\"]\n",
    ))
    .await;
    let res = send(
        &h1(),
        Request::options(proxy.url("/api/feedback")).header("origin", "https://chat.example"),
        "",
    )
    .await;
    assert_eq!(res.status(), 204);
    assert_eq!(
        res.headers()["access-control-allow-origin"],
        "https://chat.example"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mlflow_outage_delays_200_votes_but_loses_none() {
    let mut server = MlflowServer::spawn().await;
    let exp = support::mlflow::create_experiment(&server.url(), "outage").await;
    let agent = AgentProcess::spawn(&server.url(), &exp).await;
    let db = TestDb::create(&shared_url()).await;
    let proxy = TestProxy::start(&config(
        Some((&server.url(), &exp)),
        Some(&db.url),
        "[delivery]\npoll_interval = \"200ms\"\nbackoff_initial = \"500ms\"\nbackoff_max = \"2s\"\nlease = \"10s\"\nconcurrency = 16\nbatch_size = 64\n[feedback.rate_limit]\nper_second = 0\n",
    ))
    .await;
    let client = client_for(&server.url());

    // 20 answers, each voted on by 8 users (160), 40 of whom change their mind (200 votes).
    let users: Vec<String> = (0..8).map(|i| format!("user{i}@example.com")).collect();
    let mut answers = Vec::new();
    for i in 0..20 {
        let answer = ask_agent(&agent.url(), &format!("question {i}"), None, None).await;
        let trace_id = answer.trace_id.unwrap();
        let message_id = uuid::Uuid::now_v7().to_string();
        for u in &users {
            // Each user gets their own message for the same trace: one link per user.
            let _ = u;
        }
        answers.push((message_id, trace_id));
    }
    for (_, t) in &answers {
        support::mlflow::wait_for_trace(&client, t, Duration::from_secs(30)).await;
    }

    server.stop();
    let mut expected: BTreeMap<(String, String), bool> = BTreeMap::new();
    let mut sent = 0;
    for (i, (_, trace_id)) in answers.iter().enumerate() {
        for (j, u) in users.iter().enumerate() {
            let message_id = format!("m-{i}-{j}");
            link(&proxy, &message_id, u, "outage", Some(trace_id), None).await;
            let mut value = (i + j) % 2 == 0;
            let (status, v) = vote(
                &proxy,
                u,
                json!({"chatId": "outage", "messageId": message_id, "isUpvoted": value}),
            )
            .await;
            assert_eq!(status, 200, "{v}");
            assert_eq!(v["mlflowStatus"], "queued", "{v}");
            sent += 1;
            if (i * users.len() + j) % 4 == 0 {
                value = !value;
                let (status, _) = vote(
                    &proxy,
                    u,
                    json!({"chatId": "outage", "messageId": message_id, "isUpvoted": value}),
                )
                .await;
                assert_eq!(status, 200);
                sent += 1;
            }
            expected.insert((trace_id.clone(), u.clone()), value);
        }
    }
    assert_eq!(sent, 200);

    // The outage lasts until every vote's delivery has failed against it and been retried at
    // least once (the event this test is about), not for a fixed time.
    let retried = async {
        loop {
            let d = proxy
                .state
                .store
                .list_deliveries(Some(DeliveryState::Pending), 1000)
                .await
                .unwrap();
            if d.len() == 160 && d.iter().all(|d| d.attempts >= 2) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(120), retried)
        .await
        .expect("every vote retried during the outage within 120s");
    server.start().await;
    let start = Instant::now();
    loop {
        let s = proxy.state.store.delivery_stats().await.unwrap();
        if s.pending == 0 && s.waiting == 0 {
            assert_eq!(s.dead, 0);
            assert_eq!(s.done, 160);
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "still undelivered: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for (_, trace_id) in &answers {
        let a = assessments(&client, trace_id, "user_feedback").await;
        assert_eq!(a.len(), users.len(), "{trace_id}: {a:#?}");
        for u in &users {
            let mine: Vec<_> = a.iter().filter(|x| &x.source_id == u).collect();
            assert_eq!(mine.len(), 1, "{trace_id} {u}");
            assert_eq!(
                mine[0].value,
                Some(json!(expected[&(trace_id.clone(), u.clone())]))
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_can_list_and_requeue_dead_letters() {
    // An MLflow that refuses every create with 403: the vote dead-letters with the reason.
    let refused = Arc::new(AtomicUsize::new(0));
    let count = refused.clone();
    let fake = support::upstream::Upstream::start(move |req| {
        let count = count.clone();
        async move {
            if req.method == http::Method::GET {
                return support::upstream::full(200, "application/json", r#"{"trace":{"trace_info":{"trace_id":"tr-00000000000000000000000000000abc","assessments":[]}}}"#);
            }
            count.fetch_add(1, Ordering::SeqCst);
            support::upstream::full(403, "application/json", r#"{"error_code":"PERMISSION_DENIED","message":"User does not have CAN_EDIT on experiment 1"}"#)
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("fp.db");
    let cfg_text = config(
        Some((&fake.url(), "1")),
        Some(&format!("sqlite://{}", db.display())),
        FAST_DELIVERY,
    );
    let proxy = TestProxy::start(&cfg_text).await;
    link(
        &proxy,
        "m-dead",
        ALICE,
        "c",
        Some("tr-00000000000000000000000000000abc"),
        None,
    )
    .await;
    let (status, v) = vote(
        &proxy,
        ALICE,
        json!({"chatId": "c", "messageId": "m-dead", "isUpvoted": true}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(v["mlflowStatus"], "mlflow_error");
    assert!(v["mlflowError"].as_str().unwrap().contains("403"), "{v}");
    proxy.shutdown().await;

    let file = dir.path().join("proxy.toml");
    std::fs::write(&file, &cfg_text).unwrap();
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_feedback-proxy"))
            .args(args)
            .arg("--config")
            .arg(&file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let table = run(&["deliveries", "list"]);
    assert!(table.contains("1 dead"), "{table}");
    assert!(
        table.contains("m-dead") && table.contains("PERMISSION_DENIED"),
        "{table}"
    );
    let listed: Value =
        serde_json::from_str(&run(&["deliveries", "list", "--state", "dead", "--json"])).unwrap();
    assert_eq!(listed[0]["messageId"], "m-dead");
    assert_eq!(listed[0]["state"], "dead");
    // Counts per state and dead letters by reason, whatever the page size.
    let stats: Value = serde_json::from_str(&run(&["deliveries", "stats", "--json"])).unwrap();
    assert_eq!(stats["dead"], 1, "{stats}");
    assert_eq!(stats["deadReasons"][0]["count"], 1, "{stats}");
    assert!(run(&["deliveries", "stats"]).contains("dead letters by reason"));
    // A page of one, then nothing after it.
    let page = run(&["deliveries", "list", "--limit", "1"]);
    assert!(!page.contains("more: --after"), "{page}");
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_feedback-proxy"))
        .args(["deliveries", "list", "--after", "garbage", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--after"));
    assert!(run(&["deliveries", "retry"]).contains("requeued 1"));
    let table = run(&["deliveries", "list"]);
    assert!(table.contains("1 pending"), "{table}");
}

/// A server that assigns its own assessment ids cannot catch a repeated create by id: the
/// proxy must notice (from the first create) and look on the trace before creating, so lost
/// answers still never produce a second assessment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_ignoring_client_ids_still_gets_one_assessment_per_vote() {
    // Creates 0 and 2 are applied but their answers lost; all client ids are ignored.
    let (faulty, creates) = faulty_mlflow(mlflow_url(), true, &[0, 2]).await;
    let proxy = TestProxy::start(&config(
        Some((&faulty, &experiment_id())),
        None,
        FAST_DELIVERY,
    ))
    .await;
    let client = client_for(&mlflow_url());
    for (i, chat) in ["c-i0", "c-i1", "c-i2"].into_iter().enumerate() {
        let (message_id, trace_id) = answered(&proxy, &agent_url(), BOB, chat).await;
        support::mlflow::wait_for_trace(&client, &trace_id, Duration::from_secs(20)).await;
        let (status, v) = vote(
            &proxy,
            BOB,
            json!({"chatId": chat, "messageId": message_id, "isUpvoted": i % 2 == 0}),
        )
        .await;
        assert_eq!(status, 200, "{v}");
        wait_assessments(
            &client,
            &trace_id,
            "one assessment",
            Duration::from_secs(20),
            |a| a.len() == 1 && a[0].value == Some(json!(i % 2 == 0)),
        )
        .await;
        let settled = async {
            loop {
                let s = proxy.state.store.delivery_stats().await.unwrap();
                if s.pending == 0 {
                    return s;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        let s = tokio::time::timeout(Duration::from_secs(20), settled)
            .await
            .unwrap();
        assert_eq!(s.done as usize, i + 1);
        quiet(&[&proxy]).await;
        let a = assessments(&client, &trace_id, "user_feedback").await;
        assert_eq!(a.len(), 1, "vote {i}: {a:#?}");
        // The server's own id, not our deterministic one: it really ignored the client id.
        let ours = feedback_proxy::feedback::delivery::assessment_id_for(
            &feedback_proxy::store::VoteKey {
                message_id: message_id.clone(),
                user_id: BOB.into(),
                name: "user_feedback".into(),
            },
            0,
        );
        assert_ne!(a[0].assessment_id, ours);
    }
    assert!(creates.load(Ordering::SeqCst) >= 3);
}

/// Once a create has shown that the server keeps client-chosen ids, the trace lookup is
/// skipped; a later create whose answer is lost is then caught by the repeated create
/// ("already exists") and patched, still one assessment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_honoured_client_ids_a_lost_create_is_caught_by_its_id() {
    let (faulty, creates) = faulty_mlflow(mlflow_url(), false, &[1]).await;
    let proxy = TestProxy::start(&config(
        Some((&faulty, &experiment_id())),
        None,
        FAST_DELIVERY,
    ))
    .await;
    let client = client_for(&mlflow_url());
    for (i, chat) in ["c-h0", "c-h1"].into_iter().enumerate() {
        let (message_id, trace_id) = answered(&proxy, &agent_url(), BOB, chat).await;
        support::mlflow::wait_for_trace(&client, &trace_id, Duration::from_secs(20)).await;
        let (status, v) = vote(
            &proxy,
            BOB,
            json!({"chatId": chat, "messageId": message_id, "isUpvoted": true}),
        )
        .await;
        assert_eq!(status, 200, "{v}");
        let want = if i == 0 { "logged" } else { "queued" };
        assert_eq!(v["mlflowStatus"], want, "vote {i}: {v}");
        let done = async {
            loop {
                let s = proxy.state.store.delivery_stats().await.unwrap();
                if s.done as usize == i + 1 {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(20), done)
            .await
            .unwrap();
        let a = assessments(&client, &trace_id, "user_feedback").await;
        assert_eq!(a.len(), 1, "vote {i}: {a:#?}");
        let ours = feedback_proxy::feedback::delivery::assessment_id_for(
            &feedback_proxy::store::VoteKey {
                message_id: message_id.clone(),
                user_id: BOB.into(),
                name: "user_feedback".into(),
            },
            0,
        );
        assert_eq!(a[0].assessment_id, ours);
    }
    // Vote 0: one create. Vote 1: the lost create and its repeat (answered "already exists").
    assert_eq!(creates.load(Ordering::SeqCst), 3);
}

/// Issue 12 finding 8: `mlflowError` says status and MLflow's error code, never MLflow's
/// message (it names the service principal and the experiment); that goes to the log under the
/// request id. Uses a stand-in MLflow, no real server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mlflow_error_is_short_and_generic_and_the_details_are_logged() {
    support::proxy::logs();
    let fake = support::upstream::Upstream::start(move |req| async move {
        if req.method == http::Method::GET {
            return support::upstream::full(200, "application/json", r#"{"trace":{"trace_info":{"trace_id":"tr-00000000000000000000000000000abc","assessments":[]}}}"#);
        }
        support::upstream::full(403, "application/json", r#"{"error_code":"PERMISSION_DENIED","message":"Principal 7f3c1e2a-sp-secret-id does not have CAN_EDIT on /Users/owner@example.com/secret-experiment"}"#)
    })
    .await;
    let proxy = TestProxy::start(&config(Some((&fake.url(), "1")), None, FAST_DELIVERY)).await;
    link(
        &proxy,
        "m-403",
        ALICE,
        "c",
        Some("tr-00000000000000000000000000000abc"),
        None,
    )
    .await;
    let res = send(
        &h1(),
        Request::post(proxy.url("/api/feedback"))
            .header("content-type", "application/json")
            .header("x-forwarded-email", ALICE)
            .header("x-request-id", "req-mlflow-403"),
        json!({"chatId": "c", "messageId": "m-403", "isUpvoted": true}).to_string(),
    )
    .await;
    assert_eq!(res.status(), 200);
    let v = body_json(res).await;
    assert_eq!(v["mlflowStatus"], "mlflow_error", "{v}");
    let e = v["mlflowError"].as_str().unwrap();
    assert!(e.contains("403") && e.contains("PERMISSION_DENIED"), "{v}");
    for secret in [
        "7f3c1e2a",
        "secret-experiment",
        "owner@example.com",
        "CAN_EDIT",
    ] {
        assert!(!e.contains(secret), "{secret} in {v}");
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while !support::proxy::log_text()
        .lines()
        .any(|l| l.contains("req-mlflow-403") && l.contains("secret-experiment"))
    {
        assert!(Instant::now() < deadline, "the details are not in the log");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Issue 12 finding 8: values a client sends are echoed at most 64 characters long.
#[tokio::test]
async fn echoed_values_in_errors_are_cut_short() {
    let proxy = TestProxy::start(&config(None, None, "")).await;
    let long = "n".repeat(5000);
    let res = send(
        &h1(),
        Request::delete(proxy.url(&format!("/api/feedback/c/m?name={long}")))
            .header("content-type", "application/json")
            .header("x-forwarded-email", ALICE),
        "",
    )
    .await;
    assert_eq!(res.status(), 400);
    let v = body_json(res).await;
    assert_eq!(v["code"], "UNKNOWN_NAME", "{v}");
    let e = v["error"].as_str().unwrap();
    assert!(e.contains('…') && !e.contains(&"n".repeat(65)), "{e}");
    let (status, v) = vote(
        &proxy,
        ALICE,
        json!({"chatId": "c", "messageId": "m", "isUpvoted": true, "name": long}),
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        !v["error"].as_str().unwrap().contains(&"n".repeat(65)),
        "{v}"
    );
    let res = send(
        &h1(),
        Request::get(proxy.url(&format!("/{long}"))).header("x-forwarded-email", ALICE),
        "",
    )
    .await;
    assert_eq!(res.status(), 404);
    let v = body_json(res).await;
    assert!(
        !v["error"].as_str().unwrap().contains(&"n".repeat(65)),
        "{v}"
    );
}

/// Issue 12: a key given twice in a vote body is ambiguous (serde_json would keep the last,
/// another reader the first): 400 DUPLICATE_KEY naming the key, and nothing is stored.
#[tokio::test]
async fn a_vote_body_with_a_duplicate_key_is_400() {
    let proxy = TestProxy::start(&config(None, None, "")).await;
    let res = send(
        &h1(),
        Request::post(proxy.url("/api/feedback"))
            .header("content-type", "application/json")
            .header("x-forwarded-email", ALICE),
        r#"{"chatId":"c-dup","messageId":"m-dup","isUpvoted":true,"isUpvoted":false}"#,
    )
    .await;
    assert_eq!(res.status(), 400);
    let v = body_json(res).await;
    assert_eq!(v["code"], "DUPLICATE_KEY", "{v}");
    assert!(v["error"].as_str().unwrap().contains("isUpvoted"), "{v}");
    assert_eq!(votes_of(&proxy, ALICE, "c-dup").await["votes"], json!({}));
}
