//! What a delivered negative vote sets off besides its assessment: its trace added to the MLflow
//! review queue `[review] mlflow_queue`, and a record of it upserted into the evaluation dataset
//! `[datasets] auto` (the record `feedback-proxy dataset sync` writes).
//!
//! Exactly once, by the outbox's rules: the follow-ups run inside the delivery attempt, after
//! the assessment landed and before the delivery is `done`; if one fails, the attempt fails
//! (with what it learnt about the assessment kept, so the retry PATCHes instead of creating),
//! and the outbox retries under the usual policy. Both MLflow operations are idempotent on the
//! server (verified on 3.17.2: adding a trace a queue holds keeps one item; a record is keyed
//! by its inputs, so a second upsert merges), so an attempt repeated after a crash adds nothing.
//!
//! What it does not do: remove anything when a vote is retracted or turns positive (a queue
//! item or record, once there, stays for the reviewers), or follow up on positive votes.

use std::sync::Mutex;

use crate::domain::{FeedbackValue, Polarity, Thresholds};
use crate::mlflow::datasets::NewRecord;
use crate::mlflow::{MlflowClient, MlflowError, MlflowErrorKind};
use crate::review::dataset;
use crate::store::VoteKey;

/// Where negative votes go besides their assessment, and the ids found for those names.
#[derive(Debug, Default)]
pub struct FollowUps {
    pub queue: Option<String>,
    pub dataset: Option<String>,
    pub thresholds: Thresholds,
    /// The queue's id, once looked up (cleared when MLflow says it is gone).
    queue_id: Mutex<Option<String>>,
    dataset_id: Mutex<Option<String>>,
}

impl FollowUps {
    pub fn new(queue: Option<String>, dataset: Option<String>, thresholds: Thresholds) -> Self {
        Self {
            queue,
            dataset,
            thresholds,
            ..Self::default()
        }
    }

    /// Whether a vote of `value` has follow-ups at all.
    pub fn wanted(&self, value: &FeedbackValue) -> bool {
        (self.queue.is_some() || self.dataset.is_some())
            && value.polarity(&self.thresholds) == Some(Polarity::Negative)
    }

    /// Runs the follow-ups of a delivered negative vote on `trace_id`.
    pub async fn run(
        &self,
        mlflow: &MlflowClient,
        experiment_id: &str,
        trace_id: &str,
        key: &VoteKey,
        value: &FeedbackValue,
        comment: Option<&str>,
    ) -> Result<(), MlflowError> {
        if let Some(name) = &self.queue {
            let id = cached(&self.queue_id, || {
                mlflow.ensure_review_queue(experiment_id, name)
            })
            .await?;
            forget_if_gone(
                &self.queue_id,
                mlflow.add_to_review_queue(&id, &[trace_id]).await,
                // A missing trace also answers 404: only a missing queue is forgotten.
                |e| e.kind == MlflowErrorKind::NotFound && e.message.contains("Review queue"),
            )?;
        }
        if let Some(name) = &self.dataset {
            let id = cached(&self.dataset_id, || async {
                match mlflow.find_dataset(experiment_id, name).await? {
                    Some(d) => Ok(d.dataset_id),
                    None => Ok(mlflow.create_dataset(experiment_id, name).await?.dataset_id),
                }
            })
            .await?;
            let Some(request) = mlflow.trace_request(trace_id).await? else {
                return Err(MlflowError::new(
                    MlflowErrorKind::Invalid,
                    format!("trace {trace_id} has no root span inputs to make a dataset record of"),
                ));
            };
            let vote = dataset::VoteFields {
                name: &key.name,
                value,
                comment,
                // Not read here: the vote's delivery does not carry its correction (that is a
                // delivery of its own). `dataset sync` writes it; a later sync fills it in.
                correction: None,
            };
            let (tags, expectations) = dataset::record_fields(&vote, trace_id);
            let record = NewRecord {
                inputs: dataset::as_inputs(request),
                expectations,
                tags,
                trace_id: trace_id.to_owned(),
            };
            forget_if_gone(
                &self.dataset_id,
                mlflow
                    .upsert_dataset_records(&id, std::slice::from_ref(&record))
                    .await
                    .map(drop),
                // A deleted dataset answers 400 (a foreign key error) on 3.17.2, not 404: any
                // failure makes the next attempt look the name up again.
                |_| true,
            )?;
        }
        Ok(())
    }
}

/// The id in `slot`, else the one `find` returns (remembered).
async fn cached<F, Fut>(slot: &Mutex<Option<String>>, find: F) -> Result<String, MlflowError>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<String, MlflowError>>,
{
    if let Some(id) = slot.lock().ok().and_then(|g| g.clone()) {
        return Ok(id);
    }
    let id = find().await?;
    if let Ok(mut g) = slot.lock() {
        *g = Some(id.clone());
    }
    Ok(id)
}

/// Passes `r` on; an error that `gone` says may mean the cached object is gone clears `slot`,
/// so the retry looks the name up again (and re-creates it if it was deleted).
fn forget_if_gone(
    slot: &Mutex<Option<String>>,
    r: Result<(), MlflowError>,
    gone: impl Fn(&MlflowError) -> bool,
) -> Result<(), MlflowError> {
    if let Err(e) = &r {
        if gone(e) {
            if let Ok(mut g) = slot.lock() {
                *g = None;
            }
        }
    }
    r
}
