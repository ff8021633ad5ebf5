//! Message ownership through the running proxy (issue 12 finding 6, issue 14 finding 2): a
//! vote lands only on a message streamed to the voter, whatever the timing and however many
//! replicas share the store; a vote on an id nobody streamed is refused and squats nothing; the
//! agent always receives the message id the proxy settled on; a client-chosen id survives a
//! store outage.

mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use serde_json::{Value, json};
use support::pg::{TestDb, shared_url};
use support::proxy::{TestProxy, body_bytes, body_json, closed_link, h1, send};
use support::upstream::{Streamer, Upstream, streamed};
use tokio::sync::mpsc;

const ALICE: &str = "alice@example.com";
const BOB: &str = "bob@example.com";
/// The trace id in the capture `91_*`.
const TRACE: &str = "tr-eaf19740d012e3a3e64accc2bf6d17bc";
/// How often the header race is run: each try is one chance for a late link to let a vote in.
const TRIES: usize = 30;

fn sample() -> Bytes {
    Bytes::from(
        std::fs::read(format!(
            "{}/tests/fixtures/samples/91_agent_stream_return_trace_header.sse.txt",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap(),
    )
}

fn config(agent: &str, store_url: Option<&str>, extra: &str) -> String {
    let mut c = format!("[identity]\ntrust_forwarded_headers = true\n[agent]\nurl = \"{agent}\"\n");
    if let Some(s) = store_url {
        c.push_str(&format!("[store]\nurl = \"{s}\"\n"));
    }
    c.push_str(extra);
    c
}

/// An agent whose every answer is an SSE stream the test feeds (so the test decides when the
/// answer, and with it the final link, ends).
async fn held_agent() -> (Upstream, mpsc::Receiver<Streamer>) {
    let (tx, rx) = mpsc::channel(64);
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

/// An agent that answers every request at once with the capture `91_*` (trace id included).
async fn replaying_agent() -> Upstream {
    Upstream::start(|_req| async move {
        support::upstream::full(200, "text/event-stream; charset=utf-8", sample())
    })
    .await
}

fn chat(proxy: &TestProxy, user: &str) -> http::request::Builder {
    Request::post(proxy.url("/invocations"))
        .header("content-type", "application/json")
        .header("x-forwarded-email", user)
        .header("x-chat-id", "c-own")
}

fn message_id(res: &http::Response<hyper::body::Incoming>) -> String {
    res.headers()["x-message-id"].to_str().unwrap().to_owned()
}

async fn vote(proxy: &TestProxy, user: &str, message_id: &str, up: bool) -> (u16, Value) {
    let res = send(
        &h1(),
        Request::post(proxy.url("/api/feedback"))
            .header("content-type", "application/json")
            .header("x-forwarded-email", user),
        json!({"chatId": "c-own", "messageId": message_id, "isUpvoted": up}).to_string(),
    )
    .await;
    let status = res.status().as_u16();
    (status, body_json(res).await)
}

/// Alice chats through `chat_via`; the moment her response headers arrive, Bob votes on the
/// id they carry through `vote_via`. Bob must be refused every time, and nothing of his may be
/// stored; Alice, once her answer has ended, votes normally on her trace.
async fn header_race(
    chat_via: &TestProxy,
    vote_via: &TestProxy,
    streams: &mut mpsc::Receiver<Streamer>,
) {
    let body = sample();
    let mut last = String::new();
    for i in 0..TRIES {
        let res = send(&h1(), chat(chat_via, ALICE), "{}").await;
        assert_eq!(res.status(), 200);
        // The event: Alice has her headers, and with them the message id.
        let m = message_id(&res);
        let (status, v) = vote(vote_via, BOB, &m, false).await;
        assert!(
            status == 403 || status == 404,
            "try {i}: Bob's vote on Alice's message was accepted: {status} {v}"
        );
        let streamer = streams.recv().await.expect("the agent got Alice's chat");
        streamer.send(body.clone()).await;
        drop(streamer);
        body_bytes(res).await;
        last = m;
    }
    for proxy in [chat_via, vote_via] {
        assert!(
            proxy
                .state
                .store
                .list_votes("c-own", BOB)
                .await
                .unwrap()
                .is_empty(),
            "a vote of Bob's was stored"
        );
        assert!(
            proxy
                .state
                .store
                .list_deliveries(None, 1000)
                .await
                .unwrap()
                .is_empty(),
            "a delivery was stored"
        );
    }
    let l = closed_link(chat_via, &last).await;
    assert_eq!(l.user_id, ALICE);
    let (status, v) = vote(vote_via, ALICE, &last, true).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["traceId"], TRACE, "{v}");
    let (status, _) = vote(vote_via, BOB, &last, false).await;
    assert_eq!(status, 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_users_vote_right_after_the_owners_headers_is_always_refused() {
    let (agent, mut streams) = held_agent().await;
    let proxy = TestProxy::start(&config(&agent.url(), None, "")).await;
    header_race(&proxy, &proxy, &mut streams).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_proxies_on_one_postgres_refuse_the_header_race_too() {
    let (agent, mut streams) = held_agent().await;
    let db = TestDb::create(&shared_url()).await;
    let cfg = config(&agent.url(), Some(&db.url), "");
    let one = TestProxy::start(&cfg).await;
    let two = TestProxy::start(&cfg).await;
    header_race(&one, &two, &mut streams).await;
}

/// A vote on an id nobody streamed is 404 and stores nothing; the id's real owner later streams
/// it (as a client-chosen id) and votes normally: one assessment, hers, on her trace (real
/// example agent and `mlflow server`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vote_on_a_never_streamed_id_is_404_and_squats_nothing() {
    use support::mlflow::{agent_url, client_with, experiment_id, mlflow_url};

    let mlflow = format!(
        "[mlflow]\ntracking_uri = \"{}\"\nexperiment_id = \"{}\"\ntimeout = \"3s\"\n[delivery]\npoll_interval = \"100ms\"\nbackoff_initial = \"200ms\"\nbackoff_max = \"1s\"\n",
        mlflow_url(),
        experiment_id()
    );
    let proxy = TestProxy::start(&config(&agent_url(), None, &mlflow)).await;
    let m = format!("ui-chosen-{}", uuid::Uuid::new_v4().simple());

    let (status, v) = vote(&proxy, BOB, &m, false).await;
    assert_eq!(status, 404, "{v}");
    assert_eq!(v["code"], "UNKNOWN_MESSAGE", "{v}");
    assert!(
        proxy
            .state
            .store
            .list_deliveries(None, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(proxy.state.store.get_link(&m).await.unwrap(), None);

    let res = send(
        &h1(),
        chat(&proxy, ALICE).header("x-message-id", &m),
        r#"{"input":[{"role":"user","content":"whose answer is this?"}],"stream":true}"#,
    )
    .await;
    assert_eq!(res.status(), 200);
    assert_eq!(message_id(&res), m, "Alice's own id was not kept");
    body_bytes(res).await;
    let l = closed_link(&proxy, &m).await;
    assert_eq!(l.user_id, ALICE);
    let trace_id = l.trace_id.expect("the answer was linked to its trace");

    let (status, v) = vote(&proxy, ALICE, &m, true).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["traceId"], trace_id.as_str(), "{v}");
    let (status, _) = vote(&proxy, BOB, &m, false).await;
    assert_eq!(status, 403);

    let (client, _) = client_with(&mlflow_url(), Duration::from_secs(5));
    let deadline = Instant::now() + Duration::from_secs(30);
    let feedback = loop {
        let a: Vec<_> = match client.get_trace_info(&trace_id).await {
            Ok(info) => info
                .assessments
                .into_iter()
                .filter(|a| a.name == "user_feedback" && a.valid != Some(false))
                .collect(),
            Err(_) => Vec::new(),
        };
        if !a.is_empty() {
            break a;
        }
        assert!(
            Instant::now() < deadline,
            "Alice's vote never reached her trace"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(feedback.len(), 1, "{feedback:#?}");
    assert_eq!(feedback[0].source_id, ALICE);
    assert_eq!(feedback[0].value, Some(json!(true)));
    let deliveries = proxy.state.store.list_deliveries(None, 10).await.unwrap();
    assert_eq!(deliveries.len(), 1, "{deliveries:#?}");
    assert_eq!(deliveries[0].key.user_id, ALICE);
}

/// When a client's id belongs to someone else, the fresh id the proxy mints is what the agent
/// receives: in `x-message-id`, and in the body's `messageId` when the client put it there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_receives_the_settled_message_id() {
    let agent = replaying_agent().await;
    let proxy = TestProxy::start(&config(&agent.url(), None, "")).await;

    // Alice's own id is hers: kept, and the agent gets it.
    let res = send(
        &h1(),
        chat(&proxy, ALICE).header("x-message-id", "msg-taken"),
        "{}",
    )
    .await;
    assert_eq!(message_id(&res), "msg-taken");
    body_bytes(res).await;
    let got = agent.received();
    assert_eq!(got[0].headers["x-message-id"], "msg-taken");
    assert_eq!(closed_link(&proxy, "msg-taken").await.user_id, ALICE);

    // Bob sends Alice's id as a header: replaced, and the agent sees only the replacement.
    let res = send(
        &h1(),
        chat(&proxy, BOB).header("x-message-id", "msg-taken"),
        "{}",
    )
    .await;
    let fresh = message_id(&res);
    assert_ne!(fresh, "msg-taken");
    body_bytes(res).await;
    let got = agent.received();
    assert_eq!(got[1].headers["x-message-id"], fresh.as_str());
    assert_eq!(got[1].headers.get_all("x-message-id").iter().count(), 1);

    // ... and in the body.
    let res = send(
        &h1(),
        chat(&proxy, BOB),
        r#"{"messageId":"msg-taken","input":[{"role":"user","content":"hi"}]}"#,
    )
    .await;
    let fresh = message_id(&res);
    assert_ne!(fresh, "msg-taken");
    body_bytes(res).await;
    let got = agent.received();
    assert_eq!(got[2].headers["x-message-id"], fresh.as_str());
    let sent: Value = serde_json::from_slice(&got[2].body).unwrap();
    assert_eq!(sent["messageId"], fresh.as_str(), "{sent}");
    assert_eq!(sent["input"][0]["content"], "hi");

    // A minted id reaches the agent too.
    let res = send(&h1(), chat(&proxy, BOB), "{}").await;
    let minted = message_id(&res);
    body_bytes(res).await;
    assert_eq!(agent.received()[3].headers["x-message-id"], minted.as_str());
    assert_eq!(closed_link(&proxy, "msg-taken").await.user_id, ALICE);
}

async fn allow_connections(db: &TestDb, allow: bool) {
    let admin = support::pg::connect(&shared_url()).await;
    let mut sql = format!("ALTER DATABASE \"{}\" ALLOW_CONNECTIONS {allow};", db.name);
    if !allow {
        sql.push_str(&format!(
            " SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{}' AND pid <> pg_backend_pid();",
            db.name
        ));
    }
    admin.batch_execute(&sql).await.unwrap();
    if !allow {
        // Terminating is asynchronous, and a session that was already past its connection
        // check when the database closed shows up only afterwards: terminate until none is
        // left; the outage starts then.
        let name = db.name.clone();
        support::pg::wait_until(
            "the proxy's sessions to end",
            Duration::from_secs(10),
            || {
                let (admin, name) = (&admin, name.clone());
                async move {
                    let row = admin
                        .query_one(
                            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                            WHERE datname = $1 AND pid <> pg_backend_pid()",
                            &[&name],
                        )
                        .await
                        .unwrap();
                    row.get::<_, i64>(0) == 0
                }
            },
        )
        .await;
    }
}

/// The store is down while a chat with a client-chosen id starts: the id is kept (the response
/// and the agent carry it), and once the store is back the link is written with it, so the UI
/// votes with the id it chose.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_chosen_id_is_kept_through_a_store_outage() {
    let (agent, mut streams) = held_agent().await;
    let db = TestDb::create(&shared_url()).await;
    let proxy = TestProxy::start(&config(&agent.url(), Some(&db.url), "")).await;
    let m = format!("ui-chosen-{}", uuid::Uuid::new_v4().simple());

    allow_connections(&db, false).await;
    let res = send(&h1(), chat(&proxy, ALICE).header("x-message-id", &m), "{}").await;
    assert_eq!(res.status(), 200);
    assert_eq!(
        message_id(&res),
        m,
        "the client's id was replaced during the outage"
    );
    let streamer = streams.recv().await.unwrap();
    assert_eq!(agent.received()[0].headers["x-message-id"], m.as_str());

    allow_connections(&db, true).await;
    streamer.send(sample()).await;
    drop(streamer);
    body_bytes(res).await;
    let l = closed_link(&proxy, &m).await;
    assert_eq!(l.user_id, ALICE);
    assert_eq!(l.trace_id.as_deref(), Some(TRACE));
    let (status, v) = vote(&proxy, ALICE, &m, true).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["traceId"], TRACE);
    let (status, _) = vote(&proxy, BOB, &m, false).await;
    assert_eq!(status, 403);
}
