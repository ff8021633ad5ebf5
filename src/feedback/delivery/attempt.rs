//! One delivery attempt against MLflow: find the trace (or the message's unlinked trace, by the
//! proxy's client request id; for a chat rating, the chat's first trace: `session`), then
//! create, adopt, PATCH or DELETE the one assessment, and say what was learnt ([`Attempt`]).
//! What to do after a failure is `policy`.
//!
//! What the assessment holds follows from the key: a vote is a feedback assessment; a
//! correction ([`VoteKey::is_correction`]) an expectation; a chat rating
//! ([`VoteKey::rated_chat`]) a feedback assessment whose metadata names the session.

use std::sync::atomic::Ordering;
use std::time::SystemTime;

use super::session::{SESSION, session_of};
use super::{
    Attempt, Deliverer, IDS_HONOURED, IDS_IGNORED, NO_EXPERIMENT_ID, NO_TRACE_ID, Status,
    TRACE_USER, assessment_id_for,
};
use crate::feedback::pace::Signal;
use crate::mlflow::{
    Assessment, AssessmentUpdate, MlflowClient, MlflowError, MlflowErrorKind, NewAssessment,
    NewExpectation,
};
use crate::proxy::request::client_request_id_for;
use crate::store::{
    AssessmentFact, Delivery, Desired, FeedbackValue, LinkRecord, Outcome, VoteKey,
};

/// What one assessment holds: a vote's feedback or a correction's expected response.
pub(super) enum Payload {
    Feedback(AssessmentUpdate),
    Expectation(String),
}

/// The metadata key naming the message an assessment was made for.
const MESSAGE_ID: &str = "feedback_proxy.message_id";
/// The metadata key naming the chat a chat rating rates.
const CHAT_ID: &str = "feedback_proxy.chat_id";

impl Deliverer {
    pub(super) async fn run(&self, d: &Delivery) -> Attempt {
        let Some(mlflow) = &self.mlflow else {
            return Attempt::new(
                AssessmentFact::Unchanged,
                Outcome::Park {
                    reason: NO_EXPERIMENT_ID.into(),
                },
                Status::NoExperimentId,
            );
        };
        let trace_id = match self.resolve_trace(mlflow, d).await {
            Ok(t) => t,
            Err(a) => return a,
        };
        let Some(trace_id) = trace_id else {
            // Nothing was ever delivered to a trace we cannot find: a retraction is complete.
            if d.desired == Desired::Delete {
                return Attempt::new(
                    AssessmentFact::Unchanged,
                    Outcome::Done,
                    Status::Deleted { trace_id: None },
                );
            }
            return Attempt::new(
                AssessmentFact::Unchanged,
                Outcome::Park {
                    reason: NO_TRACE_ID.into(),
                },
                Status::NoTraceId,
            );
        };
        match &d.desired {
            Desired::Upsert { value, comment } => {
                let payload = match (d.key.is_correction(), value) {
                    (true, FeedbackValue::String(text)) => Payload::Expectation(text.clone()),
                    (true, _) => {
                        let why = "a correction's desired value is not a string".to_owned();
                        return Attempt::new(
                            AssessmentFact::Unchanged,
                            Outcome::Dead { error: why.clone() },
                            Status::Error {
                                trace_id: Some(trace_id),
                                reason: why.clone(),
                                detail: why,
                            },
                        );
                    }
                    (false, _) => Payload::Feedback(AssessmentUpdate {
                        value: value.clone(),
                        rationale: comment.clone(),
                    }),
                };
                let landed = self.upsert(mlflow, d, &trace_id, payload).await;
                // A correction is an expectation, not a vote: nothing follows it.
                if landed.outcome != Outcome::Done
                    || d.key.is_correction()
                    || !self.follow.wanted(value)
                {
                    return landed;
                }
                let Some(exp) = &self.experiment_id else {
                    return landed;
                };
                let follow = self
                    .follow
                    .run(mlflow, exp, &trace_id, &d.key, value, comment.as_deref())
                    .await;
                match follow {
                    Ok(()) => landed,
                    // Keep what was learnt about the assessment: the retry PATCHes it.
                    Err(e) => Attempt {
                        fact: landed.fact,
                        ..self.failure(d, Some(&trace_id), &e)
                    },
                }
            }
            Desired::Delete => self.delete(mlflow, d, &trace_id).await,
        }
    }

    /// The trace the assessment belongs on: remembered, linked, or found by client request id.
    /// `Ok(None)`: the message has no trace (park). `Err`: the attempt ends here.
    pub(super) async fn resolve_trace(
        &self,
        mlflow: &MlflowClient,
        d: &Delivery,
    ) -> Result<Option<String>, Attempt> {
        if let Some(t) = &d.trace_id {
            return Ok(Some(t.clone()));
        }
        if let Some(chat) = d.key.rated_chat() {
            return self.resolve_chat_trace(mlflow, d, chat).await;
        }
        let link = self
            .store
            .get_link(&d.key.message_id)
            .await
            .map_err(|e| self.store_failure(d, &e))?;
        let Some(link) = link else {
            // The link was lost (or never written): look for the voter's own answer.
            return match self.find_unlinked(mlflow, &d.key, &d.chat_id, None).await {
                Ok(t) => Ok(t),
                Err(e) => Err(self.failure(d, None, &e)),
            };
        };
        if link.user_id != d.key.user_id {
            return Err(Attempt::new(
                AssessmentFact::Unchanged,
                Outcome::Dead {
                    error: "the message belongs to another user".into(),
                },
                Status::Error {
                    trace_id: None,
                    reason: "the message belongs to another user".into(),
                    detail: "the message belongs to another user".into(),
                },
            ));
        }
        if let Some(t) = link.trace_id {
            return Ok(Some(t));
        }
        if let Some(crid) = &link.client_request_id {
            let Some(exp) = &self.experiment_id else {
                return Ok(None);
            };
            return match mlflow.find_trace_by_client_request_id(exp, crid).await {
                Ok(Some(t)) => {
                    if let Err(e) = self.store.set_link_trace_id(&d.key.message_id, &t).await {
                        tracing::warn!(error = %e, "cannot remember the trace id found by search");
                    }
                    Ok(Some(t))
                }
                Ok(None) => Err(self.not_yet(
                    d,
                    None,
                    format!("no trace with client_request_id {crid} yet"),
                )),
                Err(e) => Err(self.failure(d, None, &e)),
            };
        }
        if link.open {
            // The stream is still running; its trace id may yet arrive.
            return Err(self.not_yet(d, None, "the answer is still streaming".into()));
        }
        Ok(None)
    }

    /// Searches for the trace of `key.user_id`'s answer `key.message_id` by the client request
    /// id the proxy sent with it (`crid`, else the one derived from message and voter) and, when
    /// found, links it to the message (which wakes the message's waiting votes). A trace that
    /// names another user is ignored. `Ok(None)`: not found (or no experiment to search).
    pub(super) async fn find_unlinked(
        &self,
        mlflow: &MlflowClient,
        key: &VoteKey,
        chat_id: &str,
        crid: Option<&str>,
    ) -> Result<Option<String>, MlflowError> {
        let Some(exp) = &self.experiment_id else {
            return Ok(None);
        };
        let crid = match crid {
            Some(c) => c.to_owned(),
            None => client_request_id_for(&key.message_id, &key.user_id),
        };
        let Some(info) = mlflow.search_trace_by_client_request_id(exp, &crid).await? else {
            return Ok(None);
        };
        if let Some(user) = info.metadata.get(TRACE_USER) {
            if *user != key.user_id {
                tracing::warn!(%key, trace_id = %info.trace_id, "the trace found by client request id belongs to another user; ignoring it");
                return Ok(None);
            }
        }
        let link = LinkRecord {
            message_id: key.message_id.clone(),
            chat_id: Some(chat_id.to_owned()),
            user_id: key.user_id.clone(),
            trace_id: Some(info.trace_id.clone()),
            client_request_id: Some(crid),
            open: false,
            route: None,
        };
        if let Err(e) = self.store.record_links(std::slice::from_ref(&link)).await {
            tracing::warn!(%key, error = %e, "cannot record the link found by client request id");
        }
        tracing::info!(%key, trace_id = %info.trace_id, "linked a message found by its client request id");
        Ok(Some(info.trace_id))
    }

    /// For a vote on a message the store has no link for: looks for the voter's answer by the
    /// client request id derived from message and voter, within the inline deadline, and links
    /// it when found. Whether a link was recorded.
    pub async fn recover_link(&self, key: &VoteKey, chat_id: &str) -> bool {
        let Some(mlflow) = &self.mlflow else {
            return false;
        };
        match tokio::time::timeout(
            self.config.inline_deadline,
            self.find_unlinked(mlflow, key, chat_id, None),
        )
        .await
        {
            Ok(Ok(found)) => found.is_some(),
            Ok(Err(e)) => {
                tracing::debug!(%key, error = %e.short(), "cannot look for an unlinked message's trace");
                false
            }
            Err(_) => false,
        }
    }

    pub(super) async fn upsert(
        &self,
        mlflow: &MlflowClient,
        d: &Delivery,
        trace_id: &str,
        payload: Payload,
    ) -> Attempt {
        let first = d.assessment_id.is_none();
        let mut known = d.assessment_id.clone();
        let chat = d.key.rated_chat();
        // A chat rating names the session its first trace belongs to (read from the trace).
        let mut session = None;
        // Where the server keeps our deterministic ids, a create whose answer was lost is
        // caught by the next create ("already exists"); otherwise look on the trace first.
        let ids_safe =
            self.client_assessment_ids && self.ids.load(Ordering::Relaxed) == IDS_HONOURED;
        if known.is_none() && (!ids_safe || chat.is_some()) {
            // Adopt an assessment this user already has under this name (a previous attempt
            // whose answer was lost). This also tells us whether the trace exists yet.
            match mlflow.get_trace_info(trace_id).await {
                Ok(info) => {
                    known = find_ours(&info.assessments, &d.key).map(|a| a.assessment_id.clone());
                    session = chat.map(|c| session_of(&info, c));
                }
                Err(e) => return self.failure(d, Some(trace_id), &e),
            }
        }
        if let Some(aid) = known {
            let updated = match &payload {
                Payload::Feedback(update) => mlflow.update_assessment(trace_id, &aid, update).await,
                Payload::Expectation(text) => mlflow.update_expectation(trace_id, &aid, text).await,
            };
            match updated {
                Ok(_) => return self.landed(trace_id, aid, first),
                Err(e) if e.kind == MlflowErrorKind::NotFound => {
                    // Deleted behind our back (or the trace is gone): start over with a new
                    // generation, unless the trace itself is missing, which `get_trace_info`
                    // will tell on the next attempt.
                    return Attempt::new(
                        AssessmentFact::Gone,
                        Outcome::Retry {
                            at: SystemTime::now(),
                            error: format!("assessment {aid} no longer exists; re-creating"),
                        },
                        Status::Queued {
                            trace_id: Some(trace_id.to_owned()),
                            reason: None,
                        },
                    );
                }
                Err(e) => return self.failure(d, Some(trace_id), &e),
            }
        }
        let client_id = self
            .client_assessment_ids
            .then(|| assessment_id_for(&d.key, d.generation));
        let metadata = match chat {
            Some(chat) => [
                (CHAT_ID.to_owned(), chat.to_owned()),
                (
                    SESSION.to_owned(),
                    session.unwrap_or_else(|| chat.to_owned()),
                ),
            ]
            .into_iter()
            .collect(),
            None => [(MESSAGE_ID.to_owned(), d.key.message_id.clone())]
                .into_iter()
                .collect(),
        };
        let created = match &payload {
            Payload::Feedback(update) => {
                let new = NewAssessment {
                    assessment_id: client_id.clone(),
                    name: d.key.name.clone(),
                    source_id: d.key.user_id.clone(),
                    value: update.value.clone(),
                    rationale: update.rationale.clone(),
                    metadata,
                };
                mlflow.create_assessment(trace_id, &new).await
            }
            Payload::Expectation(text) => {
                let new = NewExpectation {
                    assessment_id: client_id.clone(),
                    name: d.key.name.clone(),
                    source_id: d.key.user_id.clone(),
                    value: text.clone(),
                    metadata,
                };
                mlflow.create_expectation(trace_id, &new).await
            }
        };
        match created {
            Ok(a) => {
                if let Some(ours) = &client_id {
                    self.learn_ids(*ours == a.assessment_id);
                }
                self.landed(trace_id, a.assessment_id, true)
            }
            Err(e) if e.kind == MlflowErrorKind::AlreadyExists => {
                // Our deterministic id exists: a create whose answer we lost. Make it hold the
                // current value.
                let Some(aid) = client_id else {
                    return self.failure(d, Some(trace_id), &e);
                };
                let updated = match &payload {
                    Payload::Feedback(update) => {
                        mlflow.update_assessment(trace_id, &aid, update).await
                    }
                    Payload::Expectation(text) => {
                        mlflow.update_expectation(trace_id, &aid, text).await
                    }
                };
                match updated {
                    Ok(_) => self.landed(trace_id, aid, true),
                    Err(e) => self.failure(d, Some(trace_id), &e),
                }
            }
            Err(e) => self.failure(d, Some(trace_id), &e),
        }
    }

    /// Records whether the server kept a client-chosen id (logged once when it did not).
    pub(super) fn learn_ids(&self, honoured: bool) {
        let now = if honoured { IDS_HONOURED } else { IDS_IGNORED };
        if self.ids.swap(now, Ordering::Relaxed) != now && !honoured {
            tracing::warn!(
                "the MLflow server ignores client-chosen assessment ids; every first delivery now looks for an existing assessment before creating one"
            );
        }
    }

    pub(super) fn landed(&self, trace_id: &str, assessment_id: String, first: bool) -> Attempt {
        let fact = AssessmentFact::Exists {
            assessment_id: assessment_id.clone(),
            trace_id: trace_id.to_owned(),
        };
        let trace_id = trace_id.to_owned();
        let status = if first {
            Status::Logged {
                trace_id,
                assessment_id,
            }
        } else {
            Status::Updated {
                trace_id,
                assessment_id,
            }
        };
        Attempt::new(fact, Outcome::Done, status).with_signal(Signal::Answered)
    }

    pub(super) async fn delete(
        &self,
        mlflow: &MlflowClient,
        d: &Delivery,
        trace_id: &str,
    ) -> Attempt {
        let mut target = d.assessment_id.clone();
        if target.is_none() {
            // A create whose answer was lost would have left one behind.
            match mlflow.get_trace_info(trace_id).await {
                Ok(info) => {
                    target = find_ours(&info.assessments, &d.key).map(|a| a.assessment_id.clone())
                }
                // No trace, no assessment to delete.
                Err(e) if e.kind == MlflowErrorKind::NotFound => {}
                Err(e) => return self.failure(d, Some(trace_id), &e),
            }
        }
        if let Some(aid) = target {
            if let Err(e) = mlflow.delete_assessment(trace_id, &aid).await {
                if e.kind != MlflowErrorKind::NotFound {
                    return self.failure(d, Some(trace_id), &e);
                }
            }
        }
        Attempt::new(
            AssessmentFact::Gone,
            Outcome::Done,
            Status::Deleted {
                trace_id: Some(trace_id.to_owned()),
            },
        )
    }
}

/// This user's current assessment for `key`, if the trace holds one: under the key's name, of
/// the key's kind (an expectation for a correction, else feedback), and a session assessment
/// exactly when the key is a chat rating's (a chat's first trace may carry both the rating and
/// a vote on its first answer, under the same name).
fn find_ours<'a>(assessments: &'a [Assessment], key: &VoteKey) -> Option<&'a Assessment> {
    let correction = key.is_correction();
    let chat = key.rated_chat().is_some();
    assessments.iter().find(|a| {
        let kind_ok = if correction {
            a.expectation.is_some()
        } else {
            a.is_feedback
        };
        kind_ok
            && a.metadata.contains_key(SESSION) == chat
            && a.name == key.name
            && a.source_id == key.user_id
            && a.source_type.eq_ignore_ascii_case("HUMAN")
            && a.valid != Some(false)
    })
}
