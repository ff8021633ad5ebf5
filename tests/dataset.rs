//! `feedback-proxy dataset sync` (issue 16) against the real `mlflow server` and each store
//! backend: traces logged by MLflow's own Python client, votes in the store linked to them,
//! the real binary run twice (one record per negatively rated trace; the second run adds and
//! changes nothing), a crashed run resumed, and the records read back with
//! `mlflow.genai.datasets.get_dataset(...).to_df()`.

mod support;

use std::collections::BTreeSet;
use std::sync::Arc;

use feedback_proxy::store::{
    CorrectionChange, Enqueue, FeedbackValue, LinkRecord, NewVote, SharedStore, VoteKey,
};
use serde_json::{Value, json};
use support::mlflow::{client, create_experiment, mlflow_url, run_python};
use support::pg;

/// Logs one trace per question into `experiment_id` with `@mlflow.trace`; prints the ids.
const LOG_TRACES: &str = r#"
import sys, json, mlflow
mlflow.set_tracking_uri(sys.argv[1])
mlflow.set_experiment(experiment_id=sys.argv[2])
@mlflow.trace
def agent(input, custom_inputs=None):
    return {"output": "an answer"}
ids = []
for q in sys.argv[3:]:
    agent(input=[{"role": "user", "content": q}])
    ids.append(mlflow.get_last_active_trace_id())
mlflow.flush_trace_async_logging()
print(json.dumps(ids))
"#;

/// Reads a dataset back through MLflow's Python client; prints its rows as JSON.
const READ_DATASET: &str = r#"
import sys, json, mlflow
from mlflow.genai.datasets import get_dataset
mlflow.set_tracking_uri(sys.argv[1])
df = get_dataset(name=sys.argv[2]).to_df()
rows = []
for _, r in df.iterrows():
    rows.append({
        "inputs": r["inputs"],
        "expectations": r["expectations"],
        "tags": r["tags"],
        "source_id": r["source_id"],
        "source_type": r["source_type"],
    })
print(json.dumps(rows, default=str))
"#;

async fn log_traces(experiment_id: &str, questions: &[&str]) -> Vec<String> {
    let mut args = vec![mlflow_url(), experiment_id.to_owned()];
    args.extend(questions.iter().map(|q| (*q).to_owned()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_python(LOG_TRACES, &args).await;
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("trace ids: {e}: {out}"))
}

async fn read_back(name: &str) -> Vec<Value> {
    let out = run_python(READ_DATASET, &[&mlflow_url(), name]).await;
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("rows: {e}: {out}"))
}

/// Links message `m` (answered for `user`) to `trace` and stores `user`'s vote on it.
async fn vote(
    store: &SharedStore,
    m: &str,
    user: &str,
    trace: Option<&str>,
    up: bool,
    comment: Option<&str>,
) {
    store
        .record_links(&[LinkRecord {
            message_id: m.into(),
            chat_id: Some("chat".into()),
            user_id: user.into(),
            trace_id: trace.map(Into::into),
            client_request_id: None,
            open: false,
            route: Some(Arc::from("/invocations")),
        }])
        .await
        .expect("record link");
    store
        .upsert_vote(
            &NewVote {
                key: VoteKey {
                    message_id: m.into(),
                    user_id: user.into(),
                    name: "user_feedback".into(),
                },
                chat_id: "chat".into(),
                value: FeedbackValue::Bool(up),
                comment: comment.map(Into::into),
            },
            &Enqueue::Waiting {
                reason: "test".into(),
            },
        )
        .await
        .expect("upsert vote");
}

/// Runs `feedback-proxy dataset sync --config FILE ARGS…`: (success, stdout, stderr).
fn sync(config: &std::path::Path, args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_feedback-proxy"))
        .args(["dataset", "sync", "--config"])
        .arg(config)
        .args(args)
        .env_remove("PGHOST")
        .env_remove("MLFLOW_EXPERIMENT_ID")
        .env_remove("MLFLOW_TRACKING_URI")
        .output()
        .expect("run feedback-proxy dataset sync");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

/// Two negative votes on trace A (the newer one's comment wins), one on B, a positive one on C,
/// a negative one with no trace yet; a run that "crashed" after writing B's record (bare,
/// without tags); then two full runs.
async fn twice_gives_one_record_per_negative_trace(store_url: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = feedback_proxy::store::open(&pg::store_config(store_url, ""), pg::deps())
        .await
        .expect("open store");
    let exp = create_experiment(&mlflow_url(), &unique("dataset-sync")).await;
    let traces = log_traces(&exp, &["what is 6*7", "capital of France", "hello"]).await;
    let (a, b, c) = (&traces[0], &traces[1], &traces[2]);

    vote(&store, "m1", "alice@x.com", Some(a), false, Some("wrong")).await;
    vote(
        &store,
        "m2",
        "bob@x.com",
        Some(a),
        false,
        Some("still wrong"),
    )
    .await;
    // Bob also says what the answer should have been: the record's expectation.
    store
        .upsert_vote_corrected(
            &NewVote {
                key: VoteKey {
                    message_id: "m2".into(),
                    user_id: "bob@x.com".into(),
                    name: "user_feedback".into(),
                },
                chat_id: "chat".into(),
                value: FeedbackValue::Bool(false),
                comment: Some("still wrong".into()),
            },
            &CorrectionChange::Set("42".into()),
            &Enqueue::Waiting {
                reason: "test".into(),
            },
        )
        .await
        .expect("upsert the corrected vote");
    vote(&store, "m3", "alice@x.com", Some(b), false, None).await;
    vote(&store, "m4", "alice@x.com", Some(c), true, None).await;
    vote(&store, "m5", "carol@x.com", None, false, None).await;

    let name = unique("negatives");
    let config = dir.path().join("sync.toml");
    std::fs::write(
        &config,
        format!(
            "[agent]\nurl = \"http://127.0.0.1:1\"\n[store]\nurl = \"{store_url}\"\nmigrate = false\n\
             [mlflow]\ntracking_uri = \"{}\"\nexperiment_id = \"{exp}\"\n",
            mlflow_url()
        ),
    )
    .expect("write config");

    // What a run that crashed after its first batch leaves: the dataset, and B's record.
    let mlflow = client();
    let ds = mlflow.create_dataset(&exp, &name).await.expect("create");
    let inputs = mlflow
        .trace_request(b)
        .await
        .expect("trace")
        .expect("inputs");
    mlflow
        .upsert_dataset_records(
            &ds.dataset_id,
            &[feedback_proxy::mlflow::datasets::NewRecord {
                inputs,
                expectations: Default::default(),
                tags: Default::default(),
                trace_id: b.clone(),
            }],
        )
        .await
        .expect("upsert");

    let (ok, out, err) = sync(&config, &["--name", &name]);
    assert!(ok, "{err}");
    assert!(err.contains("holds 1 records"), "{err}");
    assert!(
        out.contains("4 votes read; 1 records added, 1 updated, 0 unchanged (1 were there before); 1 votes without a trace yet"),
        "resumed: A added, B brought up to date: {out}"
    );

    let (ok, out, err) = sync(&config, &["--name", &name]);
    assert!(ok, "{err}");
    assert!(
        out.contains("0 records added, 0 updated, 2 unchanged (2 were there before)"),
        "the second run adds and changes nothing: {out}"
    );

    let rows = read_back(&name).await;
    assert_eq!(rows.len(), 2, "{rows:#?}");
    let sources: BTreeSet<&str> = rows
        .iter()
        .filter_map(|r| r["source_id"].as_str())
        .collect();
    assert_eq!(sources, BTreeSet::from([a.as_str(), b.as_str()]));
    let row_a = rows
        .iter()
        .find(|r| r["source_id"] == a.as_str())
        .expect("A");
    assert_eq!(
        row_a["inputs"],
        json!({"input": [{"role": "user", "content": "what is 6*7"}], "custom_inputs": null})
    );
    assert_eq!(row_a["source_type"], "TRACE");
    assert_eq!(row_a["tags"]["feedback.name"], "user_feedback");
    assert_eq!(row_a["tags"]["feedback.value"], "false");
    assert_eq!(
        row_a["tags"]["feedback.comment"], "still wrong",
        "the newest vote on the trace"
    );
    assert_eq!(row_a["tags"]["feedback.trace_id"], a.as_str());
    assert_eq!(
        row_a["expectations"],
        json!({"expected_response": "42"}),
        "the correction of the newest vote on the trace"
    );
    let row_b = rows
        .iter()
        .find(|r| r["source_id"] == b.as_str())
        .expect("B");
    assert_eq!(row_b["tags"]["feedback.comment"], "");

    // `--value all` takes C too; a bad value is a usage error naming the choices.
    let (ok, out, err) = sync(&config, &["--name", &name, "--value", "all"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("1 records added, 0 updated, 2 unchanged"),
        "{out}"
    );
    let (ok, _, err) = sync(&config, &["--name", &name, "--value", "sideways"]);
    assert!(!ok);
    assert!(err.contains("value: expected"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sync_twice_on_sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("store.db").display());
    twice_gives_one_record_per_negative_trace(&url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sync_twice_on_postgres() {
    let db = pg::TestDb::create(&pg::shared_url()).await;
    twice_gives_one_record_per_negative_trace(&db.url).await;
}

/// Through the proxy: negative votes (two users on trace A, a changed vote, one on B) and a
/// positive one on C, delivered by the outbox with `[review] mlflow_queue` and `[datasets]
/// auto`: the queue holds A and B once each, the dataset one record each; C is in neither.
async fn outbox_adds_each_negative_trace_once(store_url: &str) {
    use support::proxy::{TestProxy, post_vote};

    let exp = create_experiment(&mlflow_url(), &unique("dataset-auto")).await;
    let traces = log_traces(&exp, &["what is 6*7", "capital of France", "hello"]).await;
    let (a, b, c) = (&traces[0], &traces[1], &traces[2]);
    let (queue, ds) = (unique("to-review"), unique("auto"));
    let proxy = TestProxy::start(&format!(
        "[identity]\ntrust_forwarded_headers = true\n[agent]\nurl = \"http://127.0.0.1:9\"\n\
         [mlflow]\ntracking_uri = \"{}\"\nexperiment_id = \"{exp}\"\ntimeout = \"5s\"\n\
         [store]\nurl = \"{store_url}\"\n\
         [delivery]\npoll_interval = \"100ms\"\nbackoff_initial = \"200ms\"\nbackoff_max = \"1s\"\n\
         [review]\nmlflow_queue = \"{queue}\"\n[datasets]\nauto = \"{ds}\"\n",
        mlflow_url()
    ))
    .await;
    let store = proxy.state.store.clone();
    // Message ids are unique per run: the proxy derives its assessment ids from them, and
    // those are unique across the whole tracking server.
    let m: Vec<String> = (0..4).map(|_| unique("m")).collect();
    let link = |m: &str, user: &str, trace: &str| LinkRecord {
        message_id: m.into(),
        chat_id: Some("chat".into()),
        user_id: user.into(),
        trace_id: Some(trace.into()),
        client_request_id: None,
        open: false,
        route: None,
    };
    store
        .record_links(&[
            link(&m[0], "alice@x.com", a),
            link(&m[1], "bob@x.com", a),
            link(&m[2], "alice@x.com", b),
            link(&m[3], "alice@x.com", c),
        ])
        .await
        .expect("links");
    let votes = [
        (
            "alice@x.com",
            json!({"chatId": "chat", "messageId": m[0], "isUpvoted": false}),
        ),
        (
            "bob@x.com",
            json!({"chatId": "chat", "messageId": m[1], "isUpvoted": false, "comment": "no"}),
        ),
        (
            "alice@x.com",
            json!({"chatId": "chat", "messageId": m[0], "isUpvoted": false, "comment": "changed"}),
        ),
        (
            "alice@x.com",
            json!({"chatId": "chat", "messageId": m[2], "isUpvoted": false}),
        ),
        (
            "alice@x.com",
            json!({"chatId": "chat", "messageId": m[3], "isUpvoted": true}),
        ),
    ];
    for (user, body) in &votes {
        let (status, answer) = post_vote(&proxy, user, body).await;
        assert_eq!(status, 200, "{answer}");
    }
    // Every delivery done (none pending or waiting): nothing can change in MLflow any more.
    let settled = async {
        loop {
            let s = store.delivery_stats().await.expect("stats");
            if s.pending == 0 && s.waiting == 0 && s.dead == 0 {
                return;
            }
            assert_eq!(s.dead, 0, "{:?}", store.list_deliveries(None, 10).await);
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    };
    if tokio::time::timeout(std::time::Duration::from_secs(60), settled)
        .await
        .is_err()
    {
        let left = store.list_deliveries(None, 10).await.expect("list");
        let why: Vec<_> = left
            .iter()
            .map(|d| (d.key.message_id.as_str(), d.state, d.last_error.as_deref()))
            .collect();
        panic!("deliveries still pending after 60 s: {why:?}");
    }

    let mlflow = client();
    let qid = mlflow
        .ensure_review_queue(&exp, &queue)
        .await
        .expect("queue exists");
    let (items, next) = mlflow.review_queue_items(&qid, None).await.expect("items");
    assert_eq!(next, None);
    let mut items: Vec<&str> = items.iter().map(String::as_str).collect();
    items.sort_unstable();
    let mut want = vec![a.as_str(), b.as_str()];
    want.sort_unstable();
    assert_eq!(
        items, want,
        "each negative trace once, the positive one not at all"
    );

    let rows = read_back(&ds).await;
    assert_eq!(rows.len(), 2, "{rows:#?}");
    let sources: BTreeSet<&str> = rows
        .iter()
        .filter_map(|r| r["source_id"].as_str())
        .collect();
    assert_eq!(sources, BTreeSet::from([a.as_str(), b.as_str()]));
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn outbox_on_sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("store.db").display());
    outbox_adds_each_negative_trace_once(&url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn outbox_on_postgres() {
    let db = pg::TestDb::create(&pg::shared_url()).await;
    outbox_adds_each_negative_trace_once(&db.url).await;
}
