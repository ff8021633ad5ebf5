//! Label schemas, the schema endpoint, batch votes and the MLflow label-schema sync (issue 16)
//! against a real `mlflow server` 3.17.2, the real example agent and real stores (SQLite and
//! Postgres).

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use feedback_proxy::config::{Config, Env};
use feedback_proxy::feedback::label_sync::{self, Outcome};
use feedback_proxy::mlflow::{Assessment, MlflowClient};
use feedback_proxy::store::LinkRecord;
use http::{Method, Request};
use serde_json::{Value, json};
use support::mlflow::{agent_url, ask_agent, experiment_id, http_json, mlflow_url};
use support::pg::{TestDb, shared_url};
use support::proxy::{TestProxy, body_json, h1, post_vote, send};

const ALICE: &str = "alice@example.com";
const BOB: &str = "bob@example.com";

const FAST_DELIVERY: &str = "[delivery]\npoll_interval = \"100ms\"\nbackoff_initial = \"200ms\"\nbackoff_max = \"1s\"\nlease = \"10s\"\n";

/// One name of each kind.
const NAMES: &str = r#"
[feedback.names]
user_feedback = ["bool", "number", "string"]
helpful = { kind = "bool" }
stars = { kind = "numeric", min = 1, max = 5, integer = true, title = "How many stars?" }
reason = { kind = "categorical", values = ["incorrect", "unhelpful", "unsafe", "other"] }
tags = { kind = "categorical", values = ["slow", "wrong", "rude"], multi = true }
note = { kind = "text", max_length = 20, instruction = "In a few words" }
"#;

fn config(mlflow: bool, store_url: Option<&str>, extra: &str) -> String {
    let mut c =
        "[identity]\ntrust_forwarded_headers = true\n[agent]\nurl = \"http://127.0.0.1:9\"\n"
            .to_owned();
    if mlflow {
        c.push_str(&format!(
            "[mlflow]\ntracking_uri = \"{}\"\nexperiment_id = \"{}\"\ntimeout = \"3s\"\n",
            mlflow_url(),
            experiment_id()
        ));
    }
    if let Some(s) = store_url {
        c.push_str(&format!("[store]\nurl = \"{s}\"\n"));
    }
    c.push_str(extra);
    c
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
        .unwrap();
}

/// A fresh, flushed trace of the example agent.
async fn trace(user: &str) -> String {
    let answer = ask_agent(&agent_url(), "what is the answer?", None, Some(user)).await;
    let trace_id = answer.trace_id.expect("agent returned a trace id");
    support::mlflow::wait_for_trace(&client(), &trace_id, Duration::from_secs(30)).await;
    trace_id
}

/// Alice's assessments on `trace_id`, by name.
async fn assessments(trace_id: &str) -> BTreeMap<String, Vec<Assessment>> {
    let mut out: BTreeMap<String, Vec<Assessment>> = BTreeMap::new();
    if let Ok(info) = client().get_trace_info(trace_id).await {
        for a in info.assessments {
            if a.source_id == ALICE && a.valid != Some(false) && a.is_feedback {
                out.entry(a.name.clone()).or_default().push(a);
            }
        }
    }
    out
}

/// Waits until nothing is left to deliver.
async fn quiet(proxy: &TestProxy) {
    let start = Instant::now();
    loop {
        let s = proxy.state.store.delivery_stats().await.unwrap();
        if s.pending == 0 && s.waiting == 0 {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "still delivering: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn get(proxy: &TestProxy, path: &str, user: Option<&str>) -> (u16, Value) {
    let mut req = Request::get(proxy.url(path));
    if let Some(u) = user {
        req = req.header("x-forwarded-email", u);
    }
    let res = send(&h1(), req, "").await;
    (res.status().as_u16(), body_json(res).await)
}

async fn post_batch(proxy: &TestProxy, user: &str, body: String) -> (u16, Value) {
    let res = send(
        &h1(),
        Request::post(proxy.url("/api/feedback/batch"))
            .header("content-type", "application/json")
            .header("x-forwarded-email", user),
        body,
    )
    .await;
    (res.status().as_u16(), body_json(res).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_kind_accepts_its_values_into_mlflow_and_refuses_others_naming_what_is_allowed() {
    let proxy = TestProxy::start(&config(true, None, &format!("{NAMES}{FAST_DELIVERY}"))).await;
    let trace_id = trace(ALICE).await;
    let m = uuid::Uuid::now_v7().to_string();
    link(&proxy, &m, ALICE, "chat-k", Some(&trace_id)).await;
    let vote = |name: &str, value: Value| json!({"chatId": "chat-k", "messageId": m, "name": name, "value": value});

    let refusals = [
        ("helpful", json!(1), "\"helpful\" accepts true or false"),
        ("helpful", json!("yes"), "\"helpful\" accepts true or false"),
        (
            "stars",
            json!(0),
            "\"stars\" accepts an integer from 1 to 5",
        ),
        (
            "stars",
            json!(6),
            "\"stars\" accepts an integer from 1 to 5",
        ),
        (
            "stars",
            json!(2.5),
            "\"stars\" accepts an integer from 1 to 5",
        ),
        (
            "stars",
            json!(true),
            "\"stars\" accepts an integer from 1 to 5",
        ),
        (
            "reason",
            json!("boring"),
            "\"reason\" accepts one of \"incorrect\", \"unhelpful\", \"unsafe\", \"other\"",
        ),
        (
            "reason",
            json!(["unsafe"]),
            "\"reason\" accepts one of \"incorrect\"",
        ),
        (
            "tags",
            json!("slow"),
            "\"tags\" accepts a list of distinct values, each one of \"slow\", \"wrong\", \"rude\"",
        ),
        ("tags", json!(["slow", "slow"]), "a list of distinct values"),
        ("tags", json!(["fast"]), "a list of distinct values"),
        ("tags", json!([]), "a list of distinct values"),
        (
            "note",
            json!("x".repeat(21)),
            "\"note\" accepts text of 1 to 20 characters",
        ),
        (
            "note",
            json!(" "),
            "\"note\" accepts text of 1 to 20 characters",
        ),
        (
            "note",
            json!(3),
            "\"note\" accepts text of 1 to 20 characters",
        ),
    ];
    for (name, value, want) in refusals {
        let (status, v) = post_vote(&proxy, ALICE, &vote(name, value.clone())).await;
        assert_eq!(status, 400, "{name} = {value}: {v}");
        assert_eq!(v["code"], "INVALID_VALUE", "{name} = {value}: {v}");
        let error = v["error"].as_str().unwrap();
        assert!(error.contains(want), "{name} = {value}: {error}");
    }
    // isUpvoted is a boolean vote: only a bool (or list-form) name takes it.
    let (status, v) = post_vote(
        &proxy,
        ALICE,
        &json!({"chatId": "chat-k", "messageId": m, "name": "stars", "isUpvoted": true}),
    )
    .await;
    assert_eq!(
        (status, v["code"].as_str()),
        (400, Some("INVALID_VALUE")),
        "{v}"
    );
    let listed = get(&proxy, "/api/feedback/chat-k", Some(ALICE)).await.1;
    assert_eq!(
        listed["assessments"],
        json!({}),
        "refused votes were stored"
    );

    let accepted = [
        ("helpful", json!(false), json!(false)),
        ("stars", json!(4), json!(4.0)),
        ("reason", json!("unsafe"), json!("unsafe")),
        ("tags", json!(["wrong", "slow"]), json!(["wrong", "slow"])),
        ("note", json!("too long by half"), json!("too long by half")),
        ("user_feedback", json!("thumbs_down"), json!("thumbs_down")),
    ];
    for (name, value, echoed) in &accepted {
        let (status, v) = post_vote(&proxy, ALICE, &vote(name, value.clone())).await;
        assert_eq!(status, 200, "{name} = {value}: {v}");
        // Numbers are echoed (and stored, and sent) as doubles, as before.
        assert_eq!(v["value"], *echoed, "{v}");
        assert!(
            ["logged", "queued"].contains(&v["mlflowStatus"].as_str().unwrap()),
            "{v}"
        );
    }
    quiet(&proxy).await;
    let got = assessments(&trace_id).await;
    for (name, _, in_mlflow) in accepted {
        let a = got.get(name).map(Vec::as_slice).unwrap_or_default();
        assert_eq!(a.len(), 1, "{name}: {got:#?}");
        assert_eq!(a[0].value.as_ref(), Some(&in_mlflow), "{name}");
    }
    let listed = get(&proxy, "/api/feedback/chat-k", Some(ALICE)).await.1;
    assert_eq!(
        listed["assessments"][&m]["tags"]["value"],
        json!(["wrong", "slow"])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_schema_endpoint_tells_a_ui_which_controls_to_draw() {
    let proxy = TestProxy::start(&config(
        false,
        None,
        &format!(
            "[feedback]\nreason_name = \"reason\"\ncors_origins = [\"https://ui.example\"]\n{NAMES}"
        ),
    ))
    .await;
    let (status, v) = get(&proxy, "/api/feedback/schema", None).await;
    assert_eq!(
        (status, v["code"].as_str()),
        (401, Some("UNAUTHENTICATED")),
        "{v}"
    );
    let (status, v) = get(&proxy, "/api/feedback/schema", Some(ALICE)).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["defaultName"], "user_feedback");
    assert_eq!(v["reasonName"], "reason");
    assert_eq!(v["maxBatchVotes"], 100);
    let n = &v["names"];
    assert_eq!(
        n["user_feedback"],
        json!({"name": "user_feedback", "title": "user_feedback", "kind": "any", "accepts": ["bool", "number", "string"]})
    );
    assert_eq!(n["helpful"]["kind"], "bool");
    assert_eq!(
        n["stars"],
        json!({"name": "stars", "title": "How many stars?", "kind": "numeric", "min": 1.0, "max": 5.0, "integer": true})
    );
    assert_eq!(
        n["reason"],
        json!({"name": "reason", "title": "reason", "kind": "categorical", "multi": false,
               "values": ["incorrect", "unhelpful", "unsafe", "other"]})
    );
    assert_eq!(n["tags"]["multi"], true);
    assert_eq!(
        n["note"],
        json!({"name": "note", "title": "note", "kind": "text", "maxLength": 20, "instruction": "In a few words"})
    );
    // The same CORS rules as the rest of the feedback API.
    let res = send(
        &h1(),
        Request::get(proxy.url("/api/feedback/schema"))
            .header("x-forwarded-email", ALICE)
            .header("origin", "https://ui.example"),
        "",
    )
    .await;
    assert_eq!(
        res.headers()["access-control-allow-origin"],
        "https://ui.example"
    );
    let res = send(
        &h1(),
        Request::get(proxy.url("/api/feedback/schema"))
            .header("x-forwarded-email", ALICE)
            .header("origin", "https://evil.example"),
        "",
    )
    .await;
    assert!(!res.headers().contains_key("access-control-allow-origin"));
    let res = send(
        &h1(),
        Request::post(proxy.url("/api/feedback/schema"))
            .header("x-forwarded-email", ALICE)
            .header("content-type", "application/json"),
        "{}",
    )
    .await;
    assert_eq!(res.status(), 405);
}

/// 100 votes, 3 of them bad (a value the schema refuses, an unknown message, Bob's message):
/// 97 answered 200 and stored and in MLflow, 3 answered with the single endpoint's errors.
async fn batch_of_100(store_url: Option<&str>) {
    // Ten traces × ten names: every vote is its own assessment (trace, user, name).
    let mut names = String::from("[feedback.names]\nuser_feedback = [\"bool\"]\n");
    for i in 0..10 {
        names.push_str(&format!("n{i} = {{ kind = \"bool\" }}\n"));
    }
    let proxy = TestProxy::start(&config(
        true,
        store_url,
        &format!("{names}{FAST_DELIVERY}[feedback.rate_limit]\nper_second = 0\n"),
    ))
    .await;
    let mut traces = Vec::new();
    for _ in 0..10 {
        traces.push(trace(ALICE).await);
    }
    let chat = format!("chat-{}", uuid::Uuid::now_v7());
    let mut votes = Vec::new();
    let mut messages = Vec::new();
    for (t, trace_id) in traces.iter().enumerate() {
        let m = uuid::Uuid::now_v7().to_string();
        link(&proxy, &m, ALICE, &chat, Some(trace_id)).await;
        messages.push(m.clone());
        for i in 0..10 {
            votes.push(json!({"chatId": chat, "messageId": m, "name": format!("n{i}"), "value": (t + i) % 2 == 0, "comment": format!("vote {t}/{i}")}));
        }
    }
    let bob_message = uuid::Uuid::now_v7().to_string();
    link(&proxy, &bob_message, BOB, &chat, Some(&traces[0])).await;
    votes[7]["value"] = json!("maybe");
    votes[42]["messageId"] = json!("never-streamed");
    votes[99]["messageId"] = json!(bob_message);

    let started = Instant::now();
    let (status, v) = post_batch(&proxy, ALICE, json!({ "votes": votes }).to_string()).await;
    assert_eq!(status, 200, "{v}");
    eprintln!("a 100-vote batch took {:?}", started.elapsed());
    assert_eq!(
        (v["ok"].as_u64(), v["failed"].as_u64()),
        (Some(97), Some(3)),
        "{v}"
    );
    let results = v["results"].as_array().unwrap();
    assert_eq!(results.len(), 100);
    for (i, r) in results.iter().enumerate() {
        match i {
            7 => {
                assert_eq!(r["status"], 400, "{r}");
                assert_eq!(r["body"]["code"], "INVALID_VALUE");
                assert!(
                    r["body"]["error"]
                        .as_str()
                        .unwrap()
                        .contains("\"n7\" accepts true or false")
                );
            }
            42 => {
                assert_eq!(r["status"], 404, "{r}");
                assert_eq!(r["body"]["code"], "UNKNOWN_MESSAGE");
            }
            99 => {
                assert_eq!(r["status"], 403, "{r}");
                assert_eq!(r["body"]["code"], "FORBIDDEN");
            }
            _ => {
                assert_eq!(r["status"], 200, "{i}: {r}");
                assert_eq!(r["body"]["success"], true);
                assert_eq!(r["body"]["name"], format!("n{}", i % 10));
                assert_eq!(r["body"]["value"], json!((i / 10 + i % 10) % 2 == 0));
            }
        }
    }
    // Stored: 97 votes.
    let listed = get(&proxy, &format!("/api/feedback/{chat}"), Some(ALICE))
        .await
        .1;
    let stored: usize = listed["assessments"]
        .as_object()
        .unwrap()
        .values()
        .map(|per| per.as_object().unwrap().len())
        .sum();
    assert_eq!(stored, 97, "{listed}");
    let bobs = get(&proxy, &format!("/api/feedback/{chat}"), Some(BOB))
        .await
        .1;
    assert_eq!(bobs["assessments"], json!({}));
    // In MLflow: 97 assessments, each once, with its value.
    quiet(&proxy).await;
    let mut in_mlflow = 0;
    for (t, trace_id) in traces.iter().enumerate() {
        let got = assessments(trace_id).await;
        for i in 0..10 {
            let index = t * 10 + i;
            let a = got
                .get(&format!("n{i}"))
                .map(Vec::as_slice)
                .unwrap_or_default();
            if [7, 42, 99].contains(&index) {
                assert!(a.is_empty(), "{index}: {a:#?}");
            } else {
                assert_eq!(a.len(), 1, "{index}: {a:#?}");
                assert_eq!(a[0].value, Some(json!((t + i) % 2 == 0)));
                in_mlflow += 1;
            }
        }
    }
    assert_eq!(in_mlflow, 97);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_100_with_3_bad_votes_stores_97_on_sqlite() {
    batch_of_100(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_100_with_3_bad_votes_stores_97_on_postgres() {
    let db = TestDb::create(&shared_url()).await;
    batch_of_100(Some(&db.url)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_that_are_no_batch_are_refused_whole() {
    let proxy = TestProxy::start(&config(
        false,
        None,
        "[feedback]\nmax_batch_bytes = \"4KiB\"\n[feedback.rate_limit]\nper_second = 0.01\nburst = 5\n",
    ))
    .await;
    let m = uuid::Uuid::now_v7().to_string();
    link(&proxy, &m, ALICE, "c", None).await;
    let one = json!({"chatId": "c", "messageId": m, "isUpvoted": true});

    let cases = [
        (
            json!([one]).to_string(),
            "INVALID_JSON",
            "{\"votes\": [...]}",
        ),
        (
            json!({"votes": []}).to_string(),
            "INVALID_JSON",
            "1 to 100 votes",
        ),
        (
            json!({"votes": one}).to_string(),
            "INVALID_JSON",
            "1 to 100 votes",
        ),
        ("{".to_owned(), "INVALID_JSON", "not valid JSON"),
        (
            json!({"votes": vec![json!({}); 101]}).to_string(),
            "TOO_MANY_VOTES",
            "at most 100 votes in one batch (got 101)",
        ),
        (
            r#"{"votes": [{"chatId": "c", "chatId": "d"}]}"#.to_owned(),
            "DUPLICATE_KEY",
            "\"chatId\"",
        ),
    ];
    for (body, code, text) in cases {
        let (status, v) = post_batch(&proxy, ALICE, body.clone()).await;
        assert_eq!(status, 400, "{body}: {v}");
        assert_eq!(v["code"], code, "{body}: {v}");
        assert!(v["error"].as_str().unwrap().contains(text), "{body}: {v}");
    }
    let big = json!({"votes": [{"chatId": "c", "messageId": m, "isUpvoted": true, "comment": "x".repeat(5000)}]});
    let (status, v) = post_batch(&proxy, ALICE, big.to_string()).await;
    assert_eq!(
        (status, v["code"].as_str()),
        (413, Some("PAYLOAD_TOO_LARGE")),
        "{v}"
    );

    // An item that is no object, and a second vote on the same (message, name): refused alone.
    let (status, v) = post_batch(
        &proxy,
        ALICE,
        json!({"votes": [one, 5, {"chatId": "c", "messageId": m, "isUpvoted": false}]}).to_string(),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        (v["ok"].as_u64(), v["failed"].as_u64()),
        (Some(1), Some(2)),
        "{v}"
    );
    assert_eq!(v["results"][0]["status"], 200);
    assert_eq!(v["results"][0]["body"]["mlflowStatus"], "no_experiment_id");
    assert_eq!(v["results"][1]["body"]["code"], "INVALID_JSON");
    assert_eq!(v["results"][2]["body"]["code"], "DUPLICATE_VOTE");

    // The rate limit takes one token per vote: 3 taken above, 2 left of the burst of 5.
    let three = json!({"votes": [one, one, one]}).to_string();
    let (status, v) = post_batch(&proxy, ALICE, three).await;
    assert_eq!(
        (status, v["code"].as_str()),
        (429, Some("RATE_LIMITED")),
        "{v}"
    );

    let res = send(
        &h1(),
        Request::post(proxy.url("/api/feedback/batch")).header("x-forwarded-email", ALICE),
        json!({"votes": [one]}).to_string(),
    )
    .await;
    assert_eq!(res.status(), 415);
    let res = send(
        &h1(),
        Request::post(proxy.url("/api/feedback/batch")).header("content-type", "application/json"),
        json!({"votes": [one]}).to_string(),
    )
    .await;
    assert_eq!(res.status(), 401);
}

async fn create_experiment() -> String {
    let name = format!("label-schemas-{}", uuid::Uuid::now_v7());
    let (status, v, _) = http_json(
        Method::POST,
        &format!("{}/api/2.0/mlflow/experiments/create", mlflow_url()),
        &[],
        Some(json!({"name": name})),
    )
    .await;
    assert!(status.is_success(), "{v}");
    v["experiment_id"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn label_schemas_are_created_then_kept_in_step_with_mlflow() {
    let exp = create_experiment().await;
    let client = client();
    let names = Config::from_toml_str(
        &format!(
            "[agent]\nurl = \"http://127.0.0.1:9\"\n{NAMES}Feedback = {{ kind = \"bool\" }}\n"
        ),
        &Env::default(),
    )
    .unwrap()
    .feedback
    .names;

    // MLflow already has a `note` of another kind: that cannot be changed, only warned about.
    let body =
        json!({"experiment_id": exp, "name": "note", "type": "FEEDBACK", "input": {"numeric": {}}});
    client.create_label_schema(&body).await.unwrap();

    let first: BTreeMap<_, _> = label_sync::sync(&client, &exp, &names)
        .await
        .into_iter()
        .collect();
    assert_eq!(first["helpful"], Outcome::Created);
    assert_eq!(first["stars"], Outcome::Created);
    assert_eq!(first["reason"], Outcome::Created);
    assert_eq!(first["tags"], Outcome::Created);
    assert!(
        matches!(&first["note"], Outcome::Conflict(d) if d.contains("MLflow's input is numeric, the proxy's text")),
        "{:?}",
        first["note"]
    );
    assert!(
        matches!(&first["user_feedback"], Outcome::Skipped(w) if w.contains("lists value kinds"))
    );
    assert!(matches!(&first["Feedback"], Outcome::Skipped(w) if w.contains("reserves")));

    let reason = client
        .get_label_schema(&exp, "reason")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reason["type"], "FEEDBACK");
    assert_eq!(
        reason["input"],
        json!({"categorical": {"options": ["incorrect", "unhelpful", "unsafe", "other"], "multi_select": false}})
    );
    let stars = client
        .get_label_schema(&exp, "stars")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        stars["input"],
        json!({"numeric": {"min_value": 1.0, "max_value": 5.0}})
    );
    let tags = client
        .get_label_schema(&exp, "tags")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(tags["input"]["categorical"]["multi_select"], true);
    let helpful = client
        .get_label_schema(&exp, "helpful")
        .await
        .unwrap()
        .unwrap();
    assert!(helpful["input"]["pass_fail"].is_object(), "{helpful}");

    // A second run changes nothing.
    let second: BTreeMap<_, _> = label_sync::sync(&client, &exp, &names)
        .await
        .into_iter()
        .collect();
    for n in ["helpful", "stars", "reason", "tags"] {
        assert_eq!(second[n], Outcome::Unchanged, "{n}");
    }

    // Someone edits the options in MLflow: the next start-up says so and puts them back.
    let id = reason["schema_id"].as_str().unwrap();
    client
        .update_label_schema(
            &json!({"schema_id": id, "input": {"categorical": {"options": ["bad"]}}}),
        )
        .await
        .unwrap();
    let third: BTreeMap<_, _> = label_sync::sync(&client, &exp, &names)
        .await
        .into_iter()
        .collect();
    assert!(
        matches!(&third["reason"], Outcome::Updated(d) if d.contains("\"bad\"")),
        "{:?}",
        third["reason"]
    );
    let reason = client
        .get_label_schema(&exp, "reason")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reason["input"]["categorical"]["options"][0], "incorrect");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_syncs_label_schemas_when_asked() {
    let exp = create_experiment().await;
    let text = format!(
        "[identity]\ntrust_forwarded_headers = true\n[agent]\nurl = \"http://127.0.0.1:9\"\n[mlflow]\ntracking_uri = \"{}\"\nexperiment_id = \"{exp}\"\nsync_label_schemas = true\n",
        mlflow_url()
    );
    let proxy = TestProxy::start(&text).await;
    let client = client();
    let start = Instant::now();
    let reason = loop {
        if let Some(s) = client.get_label_schema(&exp, "reason").await.unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no reason schema in MLflow"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        reason["input"]["categorical"]["options"],
        json!(["incorrect", "unhelpful", "unsafe", "other"])
    );
    // The list-form names of the defaults are not synced.
    assert!(
        client
            .get_label_schema(&exp, "rating")
            .await
            .unwrap()
            .is_none()
    );
    proxy.shutdown().await;
}
