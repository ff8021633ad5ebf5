//! The delivery worker's pace and leases (issue 14, findings 4 and 5) against a real
//! `mlflow server` and Postgres: a backlog drains as attempts finish (not one batch per poll),
//! a crashed replica's claim is picked up within one short lease, and a long attempt keeps its
//! lease (renewed) so that no other replica repeats it.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use feedback_proxy::mlflow::MlflowClient;
use feedback_proxy::store::{
    DeliveryState, Enqueue, FeedbackValue, LinkRecord, NewVote, SharedStore, VoteKey,
};
use http::Request;
use support::mlflow::{agent_url, ask_agent, experiment_id, mlflow_url};
use support::pg::{TestDb, shared_url};
use support::proxy::TestProxy;

fn config(mlflow: &str, store_url: &str, delivery: &str) -> String {
    format!(
        "[identity]\ntrust_forwarded_headers = true\n[agent]\nurl = \"http://127.0.0.1:9\"\n\
         [mlflow]\ntracking_uri = \"{mlflow}\"\nexperiment_id = \"{}\"\ntimeout = \"10s\"\n\
         [store]\nurl = \"{store_url}\"\n[delivery]\n{delivery}",
        experiment_id()
    )
}

/// A trace from the real agent, flushed to MLflow.
async fn trace(client: &MlflowClient) -> String {
    let answer = ask_agent(&agent_url(), "rate me", None, Some("t@example.com")).await;
    let trace_id = answer.trace_id.expect("agent returned a trace id");
    support::mlflow::wait_for_trace(client, &trace_id, Duration::from_secs(30)).await;
    trace_id
}

/// `n` votes (distinct users) on messages linked to `trace_id`, queued as due now, as if
/// cast while no worker ran.
async fn backlog(store: &SharedStore, trace_id: &str, n: usize, tag: &str) -> Vec<VoteKey> {
    let mut keys = Vec::new();
    for i in 0..n {
        let user = format!("{tag}-{i}@example.com");
        let message_id = format!("{tag}-m-{i}");
        store
            .record_links(&[LinkRecord {
                message_id: message_id.clone(),
                chat_id: Some(tag.to_owned()),
                user_id: user.clone(),
                trace_id: Some(trace_id.to_owned()),
                client_request_id: None,
                open: false,
                route: None,
            }])
            .await
            .unwrap();
        let key = VoteKey {
            message_id,
            user_id: user,
            name: "user_feedback".into(),
        };
        store
            .upsert_vote(
                &NewVote {
                    key: key.clone(),
                    chat_id: tag.to_owned(),
                    value: FeedbackValue::Bool(i % 2 == 0),
                    comment: None,
                },
                &Enqueue::Pending,
            )
            .await
            .unwrap();
        keys.push(key);
    }
    keys
}

/// Waits until `store` holds `n` done deliveries and nothing pending; returns how long it took.
async fn until_done(store: &SharedStore, n: u64, within: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let s = store.delivery_stats().await.unwrap();
        if s.done == n && s.pending == 0 && s.waiting == 0 {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "not delivered within {within:?}: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Finding 4: a worker that polls once an hour still drains a 60-vote backlog, because it
/// claims again as soon as attempts finish. The old worker delivered one batch of
/// `concurrency` per poll: 8 of the 60 within the hour.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_drains_as_attempts_finish_not_once_per_poll() {
    let db = TestDb::create(&shared_url()).await;
    let client = support::mlflow::client_with(&mlflow_url(), Duration::from_secs(10)).0;
    let trace_id = trace(&client).await;
    let holder = TestProxy::start(&config(&mlflow_url(), &db.url, "worker = false\n")).await;
    backlog(&holder.state.store, &trace_id, 60, "drain").await;

    let worker = TestProxy::start(&config(
        &mlflow_url(),
        &db.url,
        "poll_interval = \"1h\"\nconcurrency = 8\n",
    ))
    .await;
    let took = until_done(&worker.state.store, 60, Duration::from_secs(120)).await;
    eprintln!("60 votes drained in {took:?}");
    let info = client.get_trace_info(&trace_id).await.unwrap();
    let n = info
        .assessments
        .iter()
        .filter(|a| a.is_feedback && a.name == "user_feedback")
        .count();
    assert_eq!(n, 60, "one assessment per vote");
}

/// Finding 5: a replica that claimed a delivery and died (its lease is never renewed nor
/// released) holds it for one lease only: with the default lease another replica delivers it
/// within 10 s of the claim. The old default (60 s, no renewal) kept it for a minute.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_replicas_claim_is_picked_up_within_ten_seconds() {
    let db = TestDb::create(&shared_url()).await;
    let client = support::mlflow::client_with(&mlflow_url(), Duration::from_secs(10)).0;
    let trace_id = trace(&client).await;
    let crashed = TestProxy::start(&config(&mlflow_url(), &db.url, "worker = false\n")).await;
    backlog(&crashed.state.store, &trace_id, 1, "crash").await;
    // The dead replica's claim, made with the default lease of the configuration.
    let lease = crashed.state.config.delivery.lease;
    let claimed_at = Instant::now();
    let claimed = crashed.state.store.claim_due(1, lease).await.unwrap();
    assert_eq!(claimed.len(), 1);

    let survivor = TestProxy::start(&config(
        &mlflow_url(),
        &db.url,
        "poll_interval = \"100ms\"\n",
    ))
    .await;
    until_done(&survivor.state.store, 1, Duration::from_secs(60)).await;
    let recovered = claimed_at.elapsed();
    eprintln!("a crashed replica's claim was delivered {recovered:?} after it was made");
    assert!(
        recovered < Duration::from_secs(10),
        "picked up after {recovered:?}"
    );
    let done = survivor
        .state
        .store
        .list_deliveries(Some(DeliveryState::Done), 10)
        .await
        .unwrap();
    assert_eq!(done.len(), 1);
}

/// A stand-in in front of the real MLflow that holds every assessment create for `delay`
/// before passing it on; counts the creates.
async fn slow_creates(real: String, delay: Duration) -> (String, Arc<AtomicUsize>) {
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
            let (client, real, counter) = (client.clone(), real.clone(), counter.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let (client, real, counter) = (client.clone(), real.clone(), counter.clone());
                    async move {
                        let (parts, body) = req.into_parts();
                        let body = body.collect().await.unwrap().to_bytes();
                        if parts.method == http::Method::POST
                            && parts.uri.path().ends_with("/assessments")
                        {
                            counter.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(delay).await;
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
                        Ok::<_, std::convert::Infallible>(hyper::Response::from_parts(
                            rp,
                            Full::new(rb),
                        ))
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

/// An attempt that takes three leases (MLflow answers its create after 3 s; the lease is 1 s)
/// keeps renewing its lease, so the second replica on the same store never claims it: one
/// create, one assessment. (The old code refused a lease this short, and without renewal the
/// second replica would have repeated the attempt after one lease.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_attempt_renews_its_lease_and_is_not_repeated() {
    let db = TestDb::create(&shared_url()).await;
    let client = support::mlflow::client_with(&mlflow_url(), Duration::from_secs(10)).0;
    let trace_id = trace(&client).await;
    let (slow, creates) = slow_creates(mlflow_url(), Duration::from_secs(3)).await;
    let delivery = "poll_interval = \"100ms\"\nlease = \"1s\"\n";
    let one = TestProxy::start(&config(
        &slow,
        &db.url,
        &format!("worker = false\n{delivery}"),
    ))
    .await;
    backlog(&one.state.store, &trace_id, 1, "renew").await;
    // Two replicas with workers on one store.
    let a = TestProxy::start(&config(&slow, &db.url, delivery)).await;
    let b = TestProxy::start(&config(&slow, &db.url, delivery)).await;
    until_done(&a.state.store, 1, Duration::from_secs(60)).await;
    assert_eq!(
        creates.load(Ordering::SeqCst),
        1,
        "the attempt was repeated"
    );
    let done = b
        .state
        .store
        .list_deliveries(Some(DeliveryState::Done), 10)
        .await
        .unwrap();
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].attempts, 1, "{:?}", done[0]);
}
