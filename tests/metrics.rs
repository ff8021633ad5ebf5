//! `/metrics` after a streamed chat and a vote (issue 7 acceptance 2): every metric family the
//! proxy promises is there with its labels and non-zero counts. Also: `/metrics` is not on the
//! main port unless configured, and can have a listener of its own.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use http::Request;
use serde_json::json;
use support::mlflow::{agent_url, experiment_id, mlflow_url};
use support::pg::{TestDb, shared_url};
use support::proxy::{TestProxy, body_bytes, body_json, h1, send};
use support::upstream::{Upstream, full};

/// Parses the text exposition into `series → value` (series = name plus its label set).
fn parse(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// The value of the first series of `name` whose labels include every `k="v"` in `labels`.
fn value(m: &BTreeMap<String, f64>, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    m.iter()
        .find(|(series, _)| {
            let (n, rest) = series.split_once('{').unwrap_or((series.as_str(), ""));
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
        })
        .map(|(_, v)| *v)
}

async fn scrape(url: &str) -> (String, BTreeMap<String, f64>) {
    let res = send(&h1(), Request::get(url), "").await;
    assert_eq!(res.status(), 200);
    assert!(
        res.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text")
    );
    let text = String::from_utf8(body_bytes(res).await.to_vec()).unwrap();
    let parsed = parse(&text);
    (text, parsed)
}

/// A token endpoint that refuses the first request and then hands out tokens.
async fn flaky_token_endpoint() -> Upstream {
    let n = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    Upstream::start(move |_r| {
        let n = n.clone();
        async move {
            if n.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
                full(401, "application/json", r#"{"error":"invalid_client"}"#)
            } else {
                full(
                    200,
                    "application/json",
                    r#"{"access_token":"tok","token_type":"Bearer","expires_in":3600}"#,
                )
            }
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_family_is_exported_with_labels_and_counts() {
    let db = TestDb::create(&shared_url()).await;
    let tokens = flaky_token_endpoint().await;
    let proxy = TestProxy::start(&format!(
        "[identity]\ntrust_forwarded_headers = true\n\
         [databricks]\nhost = \"{}\"\nclient_id = \"id\"\nclient_secret = \"secret\"\n\
         [agent]\nurl = \"{}\"\nauth = \"databricks-oauth\"\n\
         [[agent.routes]]\npath = \"/api/chat\"\nupstream_path = \"/invocations\"\nevents = true\n\
         [mlflow]\ntracking_uri = \"{}\"\nexperiment_id = \"{}\"\ntimeout = \"3s\"\n\
         [delivery]\npoll_interval = \"100ms\"\nbackoff_initial = \"200ms\"\nbackoff_max = \"1s\"\nlease = \"10s\"\n\
         [store]\nurl = \"{}\"\n[metrics]\non_main_port = true\n",
        tokens.url(),
        agent_url(),
        mlflow_url(),
        experiment_id(),
        db.url
    ))
    .await;
    let chat = |user: &'static str| {
        let url = proxy.url("/api/chat");
        async move {
            send(
                &h1(),
                Request::post(url)
                    .header("content-type", "application/json")
                    .header("x-forwarded-email", user)
                    .header("x-chat-id", "metrics-chat"),
                r#"{"input":[{"role":"user","content":"count me"}],"stream":true}"#,
            )
            .await
        }
    };
    // The token endpoint refuses first: a 502 and a token refresh failure.
    let res = chat("mia@example.com").await;
    assert_eq!(res.status(), 502);
    body_bytes(res).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;

    // A streamed answer, linked to its trace.
    let res = chat("mia@example.com").await;
    assert_eq!(res.status(), 200);
    let message_id = res.headers()["x-message-id"].to_str().unwrap().to_owned();
    let text = String::from_utf8(body_bytes(res).await.to_vec()).unwrap();
    let trace_id = text
        .split("\"traceId\":\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .expect("trace event")
        .to_owned();
    let client = support::mlflow::client_with(&mlflow_url(), Duration::from_secs(5)).0;
    support::mlflow::wait_for_trace(&client, &trace_id, Duration::from_secs(20)).await;

    // A vote that lands, and one on a bogus trace that MLflow answers 404 to.
    let vote = |body: serde_json::Value| {
        let url = proxy.url("/api/feedback");
        async move {
            let res = send(
                &h1(),
                Request::post(url)
                    .header("content-type", "application/json")
                    .header("x-forwarded-email", "mia@example.com"),
                body.to_string(),
            )
            .await;
            body_json(res).await
        }
    };
    let v =
        vote(json!({"chatId": "metrics-chat", "messageId": message_id, "isUpvoted": true})).await;
    assert_eq!(v["mlflowStatus"], "logged", "{v}");
    proxy
        .state
        .store
        .record_links(&[feedback_proxy::store::LinkRecord {
            message_id: "m-bogus".into(),
            chat_id: Some("metrics-chat".into()),
            user_id: "mia@example.com".into(),
            trace_id: Some("tr-ffffffffffffffffffffffffffffffff".into()),
            client_request_id: None,
            open: false,
            route: None,
        }])
        .await
        .unwrap();
    let v =
        vote(json!({"chatId": "metrics-chat", "messageId": "m-bogus", "isUpvoted": false})).await;
    assert_eq!(v["mlflowStatus"], "queued", "{v}");

    // A store failure: the database refuses connections for a moment.
    let admin = support::pg::connect(&shared_url()).await;
    admin
        .batch_execute(&format!(
            "ALTER DATABASE \"{0}\" ALLOW_CONNECTIONS false; SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{0}' AND pid <> pg_backend_pid();",
            db.name
        ))
        .await
        .unwrap();
    let res = send(&h1(), Request::get(proxy.url("/readyz")), "").await;
    assert_eq!(res.status(), 503);
    body_bytes(res).await;
    admin
        .batch_execute(&format!(
            "ALTER DATABASE \"{}\" ALLOW_CONNECTIONS true",
            db.name
        ))
        .await
        .unwrap();

    // Gauges mirrored from the store are read at scrape time: wait for the delivery to land.
    let start = Instant::now();
    let (text, m) = loop {
        let (text, m) = scrape(&proxy.url("/metrics")).await;
        if value(&m, "feedback_proxy_deliveries", &[("state", "done")]) == Some(1.0) {
            break (text, m);
        }
        assert!(start.elapsed() < Duration::from_secs(60), "{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    let positive = [
        (
            "feedback_proxy_http_requests_total",
            vec![("route", "agent"), ("status", "200")],
        ),
        (
            "feedback_proxy_http_requests_total",
            vec![("route", "agent"), ("status", "502")],
        ),
        (
            "feedback_proxy_http_requests_total",
            vec![("route", "feedback_submit"), ("status", "200")],
        ),
        (
            "feedback_proxy_http_request_duration_seconds_count",
            vec![("route", "agent"), ("status", "200")],
        ),
        ("feedback_proxy_upstream_errors_total", vec![]),
        (
            "feedback_proxy_stream_duration_seconds_count",
            vec![("route", "agent")],
        ),
        (
            "feedback_proxy_stream_first_byte_seconds_count",
            vec![("route", "agent")],
        ),
        ("feedback_proxy_stream_bytes_total", vec![]),
        (
            "feedback_proxy_trace_ids_total",
            vec![("outcome", "found"), ("source", "agent_event")],
        ),
        ("feedback_proxy_links_recorded_total", vec![]),
        (
            "feedback_proxy_feedback_responses_total",
            vec![("status", "logged")],
        ),
        (
            "feedback_proxy_feedback_responses_total",
            vec![("status", "queued")],
        ),
        ("feedback_proxy_deliveries", vec![("state", "done")]),
        ("feedback_proxy_deliveries", vec![("state", "pending")]),
        (
            "feedback_proxy_delivery_attempts_total",
            vec![("outcome", "done")],
        ),
        (
            "feedback_proxy_delivery_attempts_total",
            vec![("outcome", "retry")],
        ),
        (
            "feedback_proxy_mlflow_request_duration_seconds_count",
            vec![("operation", "create_assessment")],
        ),
        (
            "feedback_proxy_mlflow_errors_total",
            vec![("status", "404")],
        ),
        (
            "feedback_proxy_token_refreshes_total",
            vec![("source", "databricks-oauth")],
        ),
        (
            "feedback_proxy_token_refresh_failures_total",
            vec![("source", "databricks-oauth")],
        ),
        ("feedback_proxy_store_pool_size", vec![]),
        ("feedback_proxy_store_errors_total", vec![]),
    ];
    for (name, labels) in &positive {
        let v = value(&m, name, labels);
        assert!(
            v.is_some_and(|v| v > 0.0),
            "{name}{labels:?} = {v:?}\n{text}"
        );
    }
    // Present, possibly zero.
    for name in [
        "feedback_proxy_streams_open",
        "feedback_proxy_delivery_oldest_pending_age_seconds",
        "feedback_proxy_store_pool_available",
        "feedback_proxy_inspector_overflows_total",
        "feedback_proxy_links_dropped_total",
        "feedback_proxy_link_errors_total",
    ] {
        assert!(value(&m, name, &[]).is_some(), "{name} missing\n{text}");
    }
    assert_eq!(value(&m, "feedback_proxy_streams_open", &[]), Some(0.0));
    assert!(
        value(
            &m,
            "feedback_proxy_delivery_oldest_pending_age_seconds",
            &[]
        )
        .unwrap()
            > 0.0,
        "the bogus vote is pending"
    );
}

#[tokio::test]
async fn metrics_stay_off_the_main_port_unless_configured() {
    let agent = Upstream::start(|_r| async { full(200, "application/json", "{}") }).await;
    let proxy = TestProxy::start(&format!(
        "[identity]\ndev_user = \"d@example.com\"\n[agent]\nurl = \"{}\"\n",
        agent.url()
    ))
    .await;
    let res = send(&h1(), Request::get(proxy.url("/metrics")), "").await;
    assert_eq!(res.status(), 404);

    // A listener of its own.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = feedback_proxy::Config::from_toml_str(
        &format!(
            "[identity]\ndev_user = \"d@example.com\"\n[agent]\nurl = \"{}\"\n[store]\nurl = \"sqlite://{}/m.db\"\n",
            agent.url(),
            proxy.dir.path().display()
        ),
        &feedback_proxy::config::Env::default(),
    )
    .unwrap();
    let main = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let main_addr = main.local_addr().unwrap();
    let app = feedback_proxy::App::build(config).await.unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(app.serve(main, Some(listener), async {
        let _ = rx.await;
    }));
    let (text, _) = scrape(&format!("http://{addr}/metrics")).await;
    assert!(
        text.contains("# TYPE feedback_proxy_streams_open gauge"),
        "{text}"
    );
    let res = send(
        &h1(),
        Request::get(format!("http://{main_addr}/metrics")),
        "",
    )
    .await;
    assert_eq!(res.status(), 404);
    let _ = tx.send(());
    let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
}

/// Issue 14, finding 7: the gauges mirrored from the store (delivery states, pool size) are read
/// when `/metrics` is scraped, not on the delivery worker's schedule. With a worker that polls
/// once an hour, a vote cast after start-up must still show in the very next scrape, and the
/// pool gauge must count the connection that scrape used (both read 0 on the old code).
#[tokio::test]
async fn store_gauges_are_read_at_scrape_time() {
    let db = TestDb::create(&shared_url()).await;
    let agent =
        Upstream::start(|_r| async { full(200, "application/json", r#"{"output":[]}"#) }).await;
    let proxy = TestProxy::start(&format!(
        "[identity]\ndev_user = \"gauge@example.com\"\n\
         [agent]\nurl = \"{}\"\n\
         [delivery]\npoll_interval = \"1h\"\n\
         [store]\nurl = \"{}\"\n[metrics]\non_main_port = true\n",
        agent.url(),
        db.url
    ))
    .await;
    let res = send(
        &h1(),
        Request::post(proxy.url("/invocations")).header("content-type", "application/json"),
        r#"{"input":[{"role":"user","content":"hi"}]}"#,
    )
    .await;
    assert_eq!(res.status(), 200);
    let message_id = res.headers()["x-message-id"].to_str().unwrap().to_owned();
    body_bytes(res).await;
    // The link is written off the streaming path: vote once it is there.
    let start = Instant::now();
    let v = loop {
        let res = send(
            &h1(),
            Request::post(proxy.url("/api/feedback")).header("content-type", "application/json"),
            json!({"chatId": "gauges", "messageId": message_id, "isUpvoted": true}).to_string(),
        )
        .await;
        let status = res.status();
        let v = body_json(res).await;
        if status == 200 {
            break v;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "{status} {v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(v["mlflowStatus"], "no_experiment_id", "{v}");

    let (text, m) = scrape(&proxy.url("/metrics")).await;
    assert_eq!(
        value(&m, "feedback_proxy_deliveries", &[("state", "waiting")]),
        Some(1.0),
        "{text}"
    );
    assert!(
        value(&m, "feedback_proxy_store_pool_size", &[]).is_some_and(|v| v >= 1.0),
        "{text}"
    );
}
