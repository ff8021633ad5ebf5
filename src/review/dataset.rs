//! `feedback-proxy dataset sync`: the rated traces as an MLflow evaluation dataset, one record
//! per trace: inputs from the trace's request (its root span's inputs, as MLflow's own
//! `merge_records(traces)` takes them), `expected_response` from the user's correction when
//! there is one, the trace as the record's source, and the vote as tags.
//!
//! Idempotent and resumable without local state: the dataset itself is the cursor. A run
//! first reads the records back and indexes them by source trace id; a trace already there
//! is not fetched again, and is upserted only if its tags or expectations changed. New records
//! are upserted in batches of [`BATCH`] as the store is walked, so a crash loses at most one
//! batch of work, and a second run finds everything written before it. MLflow keys records
//! by their inputs, so replaying a batch merges into the same records instead of adding
//! copies (two traces with exactly the same request share one record: the newest vote's).
//!
//! What it does not do: remove records (a retracted vote's record stays; merges never remove
//! a tag or an expectation, so a cleared comment is written as an empty tag), or read traces
//! for votes that have no trace id yet (counted, retried by the next run).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::export::{Filters, PAGE};
use crate::domain::{FeedbackValue, Thresholds};
use crate::mlflow::datasets::{DatasetRecord, NewRecord};
use crate::mlflow::{MlflowClient, MlflowError, MlflowErrorKind};
use crate::store::{ReviewCursor, ReviewedVote, SharedStore, StoreError};

/// Records upserted per call (and the most a crash can make a run redo).
pub const BATCH: usize = 50;

/// The expectation a correction becomes.
pub const EXPECTED_RESPONSE: &str = "expected_response";

/// Tag keys of a record.
pub const TAG_NAME: &str = "feedback.name";
pub const TAG_VALUE: &str = "feedback.value";
pub const TAG_COMMENT: &str = "feedback.comment";
pub const TAG_TRACE: &str = "feedback.trace_id";

/// The command line of `dataset sync`.
#[derive(Debug, Clone, clap::Args)]
pub struct SyncArgs {
    /// The evaluation dataset (created in `[mlflow] experiment_id` if missing).
    #[arg(long)]
    pub name: String,
    /// Which votes: negative, positive or all.
    #[arg(long, default_value = "negative")]
    pub value: String,
    /// Only votes changed at or after this time (RFC 3339, a UTC date, or epoch ms).
    #[arg(long)]
    pub from: Option<String>,
    /// Only votes with this assessment name.
    #[arg(long)]
    pub name_filter: Option<String>,
}

impl SyncArgs {
    fn filters(&self) -> Filters {
        Filters {
            from: self.from.clone(),
            value: Some(self.value.clone()),
            name: self.name_filter.clone(),
            ..Filters::default()
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("MLflow: {0}")]
    Mlflow(#[from] MlflowError),
}

/// What a run did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Report {
    /// Votes read from the store.
    pub votes: u64,
    /// Records the dataset held before the run.
    pub existing: u64,
    /// Records added.
    pub added: u64,
    /// Records whose tags or expectations were brought up to date.
    pub updated: u64,
    /// Traces already in the dataset as the votes say.
    pub unchanged: u64,
    /// Votes with no trace id yet (the next run tries again).
    pub no_trace: u64,
    /// Traces MLflow does not have (any more), or without a request to take inputs from.
    pub missing_trace: u64,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} votes read; {} records added, {} updated, {} unchanged ({} were there before); {} votes without a trace yet, {} traces not found or without a request",
            self.votes,
            self.added,
            self.updated,
            self.unchanged,
            self.existing,
            self.no_trace,
            self.missing_trace
        )
    }
}

/// What the dataset holds for one trace.
struct Held {
    inputs: Value,
    tags: BTreeMap<String, String>,
    expectations: BTreeMap<String, Value>,
}

/// Runs one sync; `progress` gets a line about once a second.
pub async fn sync(
    store: &SharedStore,
    mlflow: &MlflowClient,
    experiment_id: Option<&str>,
    thresholds: Thresholds,
    args: &SyncArgs,
    mut progress: impl FnMut(&str),
) -> Result<Report, SyncError> {
    let Some(experiment_id) = experiment_id else {
        return Err(SyncError::Usage(
            "dataset sync needs [mlflow] experiment_id (or MLFLOW_EXPERIMENT_ID)".to_owned(),
        ));
    };
    let mut q = args
        .filters()
        .query(thresholds)
        .map_err(|e| SyncError::Usage(e.to_string()))?;
    q.limit = PAGE;

    let dataset = match mlflow.find_dataset(experiment_id, &args.name).await? {
        Some(d) => d,
        None => {
            let d = mlflow.create_dataset(experiment_id, &args.name).await?;
            progress(&format!("created dataset {} ({})", args.name, d.dataset_id));
            d
        }
    };
    let id = dataset.dataset_id.as_str();

    let mut report = Report::default();
    let (mut by_trace, mut by_inputs) = (HashMap::new(), HashMap::new());
    let mut token: Option<String> = None;
    loop {
        let (records, next) = mlflow.dataset_records(id, token.as_deref()).await?;
        report.existing += records.len() as u64;
        for r in records {
            index(&mut by_trace, &mut by_inputs, r);
        }
        match next {
            Some(t) => token = Some(t),
            None => break,
        }
    }
    progress(&format!(
        "dataset {} ({id}) holds {} records",
        args.name, report.existing
    ));

    // Votes come newest first: the first vote seen for a trace (and for a request) is the one
    // its record shows.
    let mut seen_traces: HashSet<String> = HashSet::new();
    let mut seen_inputs: HashSet<String> = HashSet::new();
    let mut batch: Vec<NewRecord> = Vec::new();
    let mut after: Option<ReviewCursor> = None;
    let mut last_report = Instant::now();
    loop {
        let rows = store.review_votes(&q, after.as_ref()).await?;
        let Some(last) = rows.last() else { break };
        after = Some(last.cursor());
        for v in &rows {
            report.votes += 1;
            let Some(trace_id) = v.trace_id.as_deref() else {
                report.no_trace += 1;
                continue;
            };
            if !seen_traces.insert(trace_id.to_owned()) {
                continue;
            }
            let (tags, expectations) = wanted(v, trace_id);
            let inputs = match by_trace.get(trace_id) {
                Some(held) if covers(held, &tags, &expectations) => {
                    report.unchanged += 1;
                    seen_inputs.insert(inputs_key(&held.inputs));
                    continue;
                }
                Some(held) => held.inputs.clone(),
                None => match mlflow.trace_request(trace_id).await {
                    Ok(Some(request)) => as_inputs(request),
                    Ok(None) => {
                        report.missing_trace += 1;
                        continue;
                    }
                    Err(e) if e.kind == MlflowErrorKind::NotFound => {
                        report.missing_trace += 1;
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                },
            };
            let key = inputs_key(&inputs);
            if !seen_inputs.insert(key.clone()) {
                // A newer vote's trace asked exactly the same: that record is this one.
                continue;
            }
            if let Some(held) = by_inputs.get(&key)
                && covers(held, &tags, &expectations)
            {
                report.unchanged += 1;
                continue;
            }
            let fresh = !by_trace.contains_key(trace_id) && !by_inputs.contains_key(&key);
            batch.push(NewRecord {
                inputs,
                expectations,
                tags,
                trace_id: trace_id.to_owned(),
            });
            if fresh {
                report.added += 1;
            } else {
                report.updated += 1;
            }
            if batch.len() >= BATCH {
                mlflow.upsert_dataset_records(id, &batch).await?;
                batch.clear();
            }
        }
        if last_report.elapsed() >= Duration::from_secs(1) {
            progress(&format!("dataset {}: {report}", args.name));
            last_report = Instant::now();
        }
        if rows.len() < PAGE as usize {
            break;
        }
    }
    if !batch.is_empty() {
        mlflow.upsert_dataset_records(id, &batch).await?;
    }
    Ok(report)
}

fn index(
    by_trace: &mut HashMap<String, Held>,
    by_inputs: &mut HashMap<String, Held>,
    r: DatasetRecord,
) {
    let held = || Held {
        inputs: r.inputs.clone(),
        tags: r.tags.clone(),
        expectations: r.expectations.clone(),
    };
    by_inputs.insert(inputs_key(&r.inputs), held());
    if let Some(t) = &r.source_trace_id {
        by_trace.insert(t.clone(), held());
    }
}

/// What a dataset record says about a vote.
#[derive(Debug, Clone, Copy)]
pub struct VoteFields<'a> {
    pub name: &'a str,
    pub value: &'a FeedbackValue,
    pub comment: Option<&'a str>,
    /// The record's only expectation source.
    pub correction: Option<&'a str>,
}

/// The tags and expectations a vote's record carries (also the outbox's, `[datasets] auto`).
pub fn record_fields(
    v: &VoteFields<'_>,
    trace_id: &str,
) -> (BTreeMap<String, String>, BTreeMap<String, Value>) {
    let value = match v.value.to_json() {
        Value::String(s) => s,
        other => other.to_string(),
    };
    let tags = BTreeMap::from([
        (TAG_NAME.to_owned(), v.name.to_owned()),
        (TAG_VALUE.to_owned(), value),
        // Always sent: a merge cannot delete a tag, so a cleared comment is an empty one.
        (
            TAG_COMMENT.to_owned(),
            v.comment.unwrap_or_default().to_owned(),
        ),
        (TAG_TRACE.to_owned(), trace_id.to_owned()),
    ]);
    let expectations = v
        .correction
        .map(|c| BTreeMap::from([(EXPECTED_RESPONSE.to_owned(), json!(c))]))
        .unwrap_or_default();
    (tags, expectations)
}

/// The record fields of a listed vote.
fn wanted(v: &ReviewedVote, trace_id: &str) -> (BTreeMap<String, String>, BTreeMap<String, Value>) {
    let fields = VoteFields {
        name: &v.key.name,
        value: &v.value,
        comment: v.comment.as_deref(),
        correction: v.correction.as_deref(),
    };
    record_fields(&fields, trace_id)
}

/// Whether a held record already says what `tags` and `expectations` say (merges only add).
fn covers(
    held: &Held,
    tags: &BTreeMap<String, String>,
    expectations: &BTreeMap<String, Value>,
) -> bool {
    tags.iter().all(|(k, v)| held.tags.get(k) == Some(v))
        && expectations
            .iter()
            .all(|(k, v)| held.expectations.get(k) == Some(v))
}

/// A record's inputs must be an object: a request that is not one is kept under `request`.
pub fn as_inputs(request: Value) -> Value {
    match request {
        Value::Object(_) => request,
        other => json!({ "request": other }),
    }
}

/// MLflow's record key is a hash of the inputs as JSON with sorted keys; `serde_json` maps
/// are sorted (no `preserve_order`), so their text is the same key.
fn inputs_key(inputs: &Value) -> String {
    inputs.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_correction_is_the_expected_response_and_the_vote_the_tags() {
        let mut v = ReviewedVote {
            key: crate::domain::VoteKey {
                message_id: "m".into(),
                user_id: "u".into(),
                name: "user_feedback".into(),
            },
            chat_id: "c".into(),
            value: crate::domain::FeedbackValue::Bool(false),
            comment: None,
            updated_at: std::time::SystemTime::UNIX_EPOCH,
            route: None,
            delivery: None,
            last_error: None,
            trace_id: Some("tr-1".into()),
            correction: None,
        };
        let (tags, exp) = wanted(&v, "tr-1");
        assert!(exp.is_empty());
        assert_eq!(tags[TAG_VALUE], "false");
        assert_eq!(tags[TAG_COMMENT], "");
        assert_eq!(tags[TAG_TRACE], "tr-1");
        v.correction = Some("42".into());
        v.value = crate::domain::FeedbackValue::String("thumbs_down".into());
        let (tags, exp) = wanted(&v, "tr-1");
        assert_eq!(exp[EXPECTED_RESPONSE], json!("42"));
        assert_eq!(tags[TAG_VALUE], "thumbs_down");
    }

    #[test]
    fn non_object_requests_are_wrapped() {
        assert_eq!(as_inputs(json!("hi")), json!({"request": "hi"}));
        assert_eq!(as_inputs(json!({"input": [1]})), json!({"input": [1]}));
    }

    #[test]
    fn a_record_covers_what_it_already_says() {
        let held = Held {
            inputs: json!({}),
            tags: BTreeMap::from([
                ("a".to_owned(), "1".to_owned()),
                ("b".to_owned(), "2".to_owned()),
            ]),
            expectations: BTreeMap::new(),
        };
        let tags = |a: &str| BTreeMap::from([("a".to_owned(), a.to_owned())]);
        assert!(covers(&held, &tags("1"), &BTreeMap::new()));
        assert!(!covers(&held, &tags("9"), &BTreeMap::new()));
        let exp = BTreeMap::from([(EXPECTED_RESPONSE.to_owned(), json!("x"))]);
        assert!(!covers(&held, &tags("1"), &exp));
    }
}
