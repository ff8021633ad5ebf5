//! Delivering votes to MLflow: one attempt ([`Deliverer::attempt`]) and the background worker
//! that retries until every vote lands ([`Deliverer::run_worker`]).
//!
//! Exactly one assessment per (message, user, name):
//! - the first delivery creates the assessment with a deterministic `assessment_id` derived
//!   from the key and the generation; if an earlier create's answer was lost, the server
//!   answers "already exists" and we PATCH that one instead. Servers that ignore client-chosen
//!   ids (Databricks may) cannot close the crash window that way, so until a create has shown
//!   that the server keeps our id — and forever if it does not — the first delivery first looks
//!   on the trace (its info lists the assessments) for one by this user and name, and adopts
//!   it;
//! - later deliveries PATCH it (`update_mask` in camelCase) or DELETE it;
//! - what was learnt about the assessment is recorded even when a newer vote superseded the
//!   attempt, so the next attempt never duplicates.
//!
//! Failures: a trace that answers 404 is not flushed yet and is retried up to
//! `delivery.not_found_horizon`; 5xx, timeouts, connection and token failures are retried with
//! exponential backoff and jitter up to `delivery.max_age` (429 honours `Retry-After`); other
//! 4xx dead-letter with the reason. The worker runs on every replica; the store's leases make
//! sure one delivery is worked on by one process at a time.
//!
//! A vote on a message the store has no link for (its link was lost, e.g. given up during a
//! store outage) is resolved through the proxy's own client request id: it is derived from the
//! message id and the voter (`proxy::request::client_request_id_for`), so a search for it finds
//! only that user's answer, never another user's. A found trace is linked to the message (which
//! wakes the vote). The worker repeats the search for votes waiting without a trace id every
//! `delivery.trace_lookup_interval`.
//!
//! Shutdown: [`Deliverer::shutdown`] lets running attempts (inline and the worker's) finish until
//! the drain deadline, then drops the rest; a dropped attempt keeps its lease and is retried from
//! the outbox when the lease expires.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::{Duration, Instant, SystemTime};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::pace::{Pace, Signal};

use crate::config::{DeliveryConfig, MlflowConfig};
use crate::metrics::{Metrics, OutcomeLabel};
use crate::mlflow::{
    Assessment, AssessmentUpdate, MlflowClient, MlflowError, MlflowErrorKind, NewAssessment,
};
use crate::proxy::request::client_request_id_for;
use crate::store::{
    AssessmentFact, Delivery, DeliveryState, Desired, Finished, LinkRecord, Outcome, SharedStore,
    StoreError, VoteKey,
};

/// Most waiting votes one trace lookup round looks at (newest first).
const LOOKUP_BATCH: u32 = 200;
/// The trace metadata key naming the user a trace was made for.
const TRACE_USER: &str = "mlflow.trace.user";

/// Namespace of the deterministic assessment ids (a fixed, random UUID).
const ASSESSMENT_ID_NAMESPACE: uuid::Uuid =
    uuid::Uuid::from_u128(0x5c1f_0e2a_9d7b_4f3e_8a61_2b9c_d4e7_f013);

/// What an attempt amounts to, as reported to the client (`mlflowStatus`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// An assessment was created (or an existing one of ours adopted) for the first time.
    Logged {
        trace_id: String,
        assessment_id: String,
    },
    /// An existing assessment was updated.
    Updated {
        trace_id: String,
        assessment_id: String,
    },
    /// The assessment was deleted (or there was none to delete).
    Deleted { trace_id: Option<String> },
    /// Not delivered yet; the worker retries.
    Queued {
        trace_id: Option<String>,
        reason: Option<String>,
    },
    /// The message has no trace id; delivery waits until one is linked.
    NoTraceId,
    /// MLflow delivery is not configured.
    NoExperimentId,
    /// Delivery gave up. `reason` is short and safe to show (status and MLflow's error code,
    /// never the server's message); `detail` is for the log and the dead letter.
    Error {
        trace_id: Option<String>,
        reason: String,
        detail: String,
    },
}

impl Status {
    /// The `mlflowStatus` string.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Logged { .. } => "logged",
            Self::Updated { .. } => "updated",
            Self::Deleted { .. } => "deleted",
            Self::Queued { .. } => "queued",
            Self::NoTraceId => "no_trace_id",
            Self::NoExperimentId => "no_experiment_id",
            Self::Error { .. } => "mlflow_error",
        }
    }

    pub fn trace_id(&self) -> Option<&str> {
        match self {
            Self::Logged { trace_id, .. } | Self::Updated { trace_id, .. } => Some(trace_id),
            Self::Deleted { trace_id }
            | Self::Queued { trace_id, .. }
            | Self::Error { trace_id, .. } => trace_id.as_deref(),
            Self::NoTraceId | Self::NoExperimentId => None,
        }
    }

    pub fn assessment_id(&self) -> Option<&str> {
        match self {
            Self::Logged { assessment_id, .. } | Self::Updated { assessment_id, .. } => {
                Some(assessment_id)
            }
            _ => None,
        }
    }
}

/// Park reasons, also the `mlflowStatus` they map to.
pub const NO_TRACE_ID: &str = crate::store::AWAITING_TRACE;
pub const NO_EXPERIMENT_ID: &str = "no_experiment_id";

/// The deterministic assessment id for a key and generation (≤ 50 characters, as the server
/// requires).
pub fn assessment_id_for(key: &VoteKey, generation: i64) -> String {
    let name = format!(
        "{}\u{0}{}\u{0}{}\u{0}{generation}",
        key.message_id, key.user_id, key.name
    );
    format!(
        "a-{}",
        uuid::Uuid::new_v5(&ASSESSMENT_ID_NAMESPACE, name.as_bytes()).simple()
    )
}

/// Runs delivery attempts. One per process, shared by the feedback handlers and the worker.
pub struct Deliverer {
    store: SharedStore,
    mlflow: Option<MlflowClient>,
    experiment_id: Option<String>,
    client_assessment_ids: bool,
    /// Whether the server keeps client-chosen assessment ids, learnt from the first create:
    /// [`IDS_UNKNOWN`], [`IDS_HONOURED`] or [`IDS_IGNORED`].
    ids: AtomicU8,
    config: DeliveryConfig,
    metrics: Arc<Metrics>,
    /// Running attempts (inline and the worker's), for shutdown.
    tasks: TaskTracker,
    /// Drops the attempts still running at the shutdown deadline.
    abort: CancellationToken,
    /// A trace lookup round is running.
    looking_up: AtomicBool,
}

const IDS_UNKNOWN: u8 = 0;
const IDS_HONOURED: u8 = 1;
const IDS_IGNORED: u8 = 2;

/// The result of one attempt before it is recorded.
struct Attempt {
    fact: AssessmentFact,
    outcome: Outcome,
    status: Status,
    /// What the attempt said about MLflow's capacity (for the worker's [`Pace`]).
    signal: Signal,
}

impl Attempt {
    fn new(fact: AssessmentFact, outcome: Outcome, status: Status) -> Self {
        Self {
            fact,
            outcome,
            status,
            signal: Signal::Neutral,
        }
    }

    fn with_signal(mut self, signal: Signal) -> Self {
        self.signal = signal;
        self
    }
}

impl Deliverer {
    pub fn new(
        store: SharedStore,
        mlflow: Option<MlflowClient>,
        mlflow_config: &MlflowConfig,
        config: DeliveryConfig,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            store,
            experiment_id: mlflow_config.experiment_id.clone(),
            mlflow: if mlflow_config.enabled() {
                mlflow
            } else {
                None
            },
            client_assessment_ids: mlflow_config.client_assessment_ids,
            ids: AtomicU8::new(IDS_UNKNOWN),
            config,
            metrics,
            tasks: TaskTracker::new(),
            abort: CancellationToken::new(),
            looking_up: AtomicBool::new(false),
        }
    }

    /// Runs `f` as a tracked attempt task: [`Deliverer::shutdown`] waits for it, or drops it at
    /// the deadline (answering `dropped`).
    fn spawn_tracked<T: Send + 'static>(
        &self,
        dropped: T,
        f: impl std::future::Future<Output = T> + Send + 'static,
    ) -> tokio::task::JoinHandle<T> {
        let abort = self.abort.clone();
        self.tasks.spawn(async move {
            tokio::select! {
                biased;
                () = abort.cancelled() => dropped,
                out = f => out,
            }
        })
    }

    /// Waits until `deadline` for running attempts to finish and record their outcome, then
    /// drops the rest (they keep their lease and are retried from the outbox).
    pub async fn shutdown(&self, deadline: tokio::time::Instant) {
        self.tasks.close();
        if tokio::time::timeout_at(deadline, self.tasks.wait())
            .await
            .is_err()
        {
            let left = self.tasks.len();
            self.abort.cancel();
            self.tasks.wait().await;
            tracing::warn!(
                attempts = left,
                "delivery attempts still running at the shutdown deadline were stopped; they are retried from the outbox once their lease expires"
            );
        }
    }

    /// Whether MLflow delivery is configured at all.
    pub fn enabled(&self) -> bool {
        self.mlflow.is_some()
    }

    /// How long a fresh vote's delivery is kept from the background worker, so that the inline
    /// attempt right after it claims it first (`store::Enqueue::Inline`).
    pub fn inline_hold(&self) -> Duration {
        if self.enabled() {
            self.config.inline_deadline
        } else {
            Duration::ZERO
        }
    }

    /// Claims `key` at `version` and makes one attempt, waiting at most the inline deadline for
    /// its outcome. The attempt itself runs to completion in the background either way (an
    /// abandoned MLflow call would only widen the crash window).
    pub async fn attempt_inline(self: &Arc<Self>, key: &VoteKey, version: i64) -> Status {
        let this = self.clone();
        let key = key.clone();
        let dropped = Status::Queued {
            trace_id: None,
            reason: Some("the proxy is shutting down".into()),
        };
        let task = self.spawn_tracked(dropped, async move {
            let claimed_at = Instant::now();
            match this.store.claim(&key, version, this.config.lease).await {
                Ok(Some(d)) => this.attempt(d, claimed_at).await.0,
                // Someone else holds it (an older version in flight) or a newer vote
                // superseded this one: the worker picks it up next.
                Ok(None) => Status::Queued {
                    trace_id: None,
                    reason: None,
                },
                Err(e) => {
                    tracing::warn!(%key, error = %e, "cannot claim delivery for the inline attempt");
                    Status::Queued {
                        trace_id: None,
                        reason: None,
                    }
                }
            }
        });
        match tokio::time::timeout(self.config.inline_deadline, task).await {
            Ok(Ok(status)) => status,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "inline delivery task failed");
                Status::Queued {
                    trace_id: None,
                    reason: None,
                }
            }
            Err(_) => Status::Queued {
                trace_id: None,
                reason: Some("MLflow did not answer within the inline deadline".into()),
            },
        }
    }

    /// One attempt on a claimed delivery (claimed no earlier than `claimed_at`); records the
    /// result in the store. Also returns what the attempt said about MLflow's capacity.
    ///
    /// The lease is renewed every third of its length while the attempt runs, so a long attempt
    /// keeps it and a crashed replica's claims are free again within one short lease. When
    /// renewing fails (the store is down, or the claim is gone), the attempt is cut before the
    /// last lease it holds runs out, so that two workers never talk to MLflow about one vote at
    /// once. Should finishing still come too late (a stalled store), the claim's ticket keeps
    /// it from overriding the newer claim (`Finished::LeaseLost`).
    pub async fn attempt(&self, d: Delivery, claimed_at: Instant) -> (Status, Signal) {
        let attempt = match self.run_leased(&d, claimed_at).await {
            Ok(a) => a,
            Err(why) => Attempt::new(
                AssessmentFact::Unchanged,
                Outcome::Retry {
                    at: SystemTime::now() + self.backoff(d.attempts, None),
                    error: why,
                },
                Status::Queued {
                    trace_id: d.trace_id.clone(),
                    reason: None,
                },
            ),
        };
        let signal = attempt.signal;
        (self.record(&d, attempt).await, signal)
    }

    /// Runs the attempt under a renewed lease; `Err` says why it was cut.
    async fn run_leased(&self, d: &Delivery, claimed_at: Instant) -> Result<Attempt, String> {
        let lease = self.config.lease;
        let ticket = d.ticket();
        // The lease the store holds for us ends no earlier than this (conservative: measured
        // from before the claim was sent).
        let mut expires = claimed_at + lease;
        let run = self.run(d);
        tokio::pin!(run);
        let mut next_renewal = claimed_at + lease / 3;
        loop {
            let cut_at = expires.checked_sub(lease / 5).unwrap_or(expires);
            tokio::select! {
                a = &mut run => return Ok(a),
                () = tokio::time::sleep_until(next_renewal.into()) => {
                    let sent = Instant::now();
                    match self.store.renew_lease(&ticket, lease).await {
                        Ok(true) => expires = sent + lease,
                        Ok(false) => {
                            return Err("the lease was lost while the attempt ran; another claim holds the delivery".into());
                        }
                        Err(e) => {
                            tracing::warn!(key = %d.key, error = %e, "cannot renew a delivery lease");
                        }
                    }
                    next_renewal = Instant::now() + lease / 3;
                }
                () = tokio::time::sleep_until(cut_at.into()) => {
                    return Err(format!(
                        "the lease ({}) could not be renewed and the attempt was cut",
                        humantime::format_duration(lease)
                    ));
                }
            }
        }
    }

    /// Records an attempt's outcome; returns the status to report.
    async fn record(&self, d: &Delivery, attempt: Attempt) -> Status {
        let label = match &attempt.outcome {
            Outcome::Done => "done",
            Outcome::Retry { .. } => "retry",
            Outcome::Park { .. } => "park",
            Outcome::Dead { .. } => "dead",
        };
        match self
            .store
            .finish(&d.ticket(), &attempt.fact, &attempt.outcome)
            .await
        {
            Ok(Finished::Applied) => {
                self.metrics
                    .delivery_attempts
                    .get_or_create(&OutcomeLabel { outcome: label })
                    .inc();
            }
            Ok(not_applied) => {
                let outcome = match not_applied {
                    // A newer vote arrived meanwhile; it is pending and will be delivered next.
                    Finished::Superseded => "superseded",
                    Finished::LeaseLost => {
                        tracing::warn!(key = %d.key, version = d.version, "the lease expired before the attempt was recorded; another claim holds the delivery now");
                        "lease_lost"
                    }
                    // Removed meanwhile (an operator, or its message).
                    Finished::Missing | Finished::Applied => "missing",
                };
                self.metrics
                    .delivery_attempts
                    .get_or_create(&OutcomeLabel { outcome })
                    .inc();
                return Status::Queued {
                    trace_id: attempt.status.trace_id().map(str::to_owned),
                    reason: None,
                };
            }
            Err(e) => {
                // The lease expires and the attempt is repeated; thanks to the lookup by user
                // and name, repeating it cannot duplicate the assessment.
                tracing::error!(key = %d.key, version = d.version, error = %e, "cannot record the delivery outcome");
                return Status::Queued {
                    trace_id: attempt.status.trace_id().map(str::to_owned),
                    reason: None,
                };
            }
        }
        match &attempt.outcome {
            Outcome::Retry { error, .. } => {
                tracing::info!(key = %d.key, attempts = d.attempts, error = %error, "delivery will be retried")
            }
            Outcome::Dead { error } => {
                tracing::error!(key = %d.key, attempts = d.attempts, error = %error, "delivery gave up (dead letter)")
            }
            Outcome::Park { reason } => {
                tracing::info!(key = %d.key, reason = %reason, "delivery waits for a trace id")
            }
            Outcome::Done => {
                tracing::debug!(key = %d.key, status = attempt.status.as_str(), "delivered")
            }
        }
        attempt.status
    }

    async fn run(&self, d: &Delivery) -> Attempt {
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
                let update = AssessmentUpdate {
                    value: value.clone(),
                    rationale: comment.clone(),
                };
                self.upsert(mlflow, d, &trace_id, update).await
            }
            Desired::Delete => self.delete(mlflow, d, &trace_id).await,
        }
    }

    /// The trace the assessment belongs on: remembered, linked, or found by client request id.
    /// `Ok(None)`: the message has no trace (park). `Err`: the attempt ends here.
    async fn resolve_trace(
        &self,
        mlflow: &MlflowClient,
        d: &Delivery,
    ) -> Result<Option<String>, Attempt> {
        if let Some(t) = &d.trace_id {
            return Ok(Some(t.clone()));
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
    async fn find_unlinked(
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

    /// One round of the worker's trace lookup: votes waiting without a trace id (newest first,
    /// at most [`LOOKUP_BATCH`], enqueued within `delivery.max_age`) whose message has no trace
    /// are searched for by client request id; those found are linked, which makes them due.
    async fn look_up_waiting(&self) {
        let Some(mlflow) = &self.mlflow else { return };
        let waiting = match self
            .store
            .list_deliveries(Some(DeliveryState::Waiting), LOOKUP_BATCH)
            .await
        {
            Ok(w) => w,
            Err(e) => {
                tracing::debug!(error = %e, "cannot list waiting deliveries for the trace lookup");
                return;
            }
        };
        let now = SystemTime::now();
        for d in waiting {
            let awaits_trace = d
                .last_error
                .as_deref()
                .is_some_and(|r| r.starts_with(NO_TRACE_ID));
            let recent = now
                .duration_since(d.enqueued_at)
                .is_ok_and(|age| age < self.config.max_age);
            if !awaits_trace || d.trace_id.is_some() || !recent {
                continue;
            }
            let crid = match self.store.get_link(&d.key.message_id).await {
                Ok(None) => None,
                // The stream's client request id, when the link has one but no trace (its
                // final link was lost); a link without one was never sent one.
                Ok(Some(l)) if l.user_id == d.key.user_id && l.trace_id.is_none() => {
                    match l.client_request_id {
                        Some(c) => Some(c),
                        None => continue,
                    }
                }
                Ok(Some(_)) => continue,
                Err(e) => {
                    tracing::debug!(error = %e, "cannot read a link for the trace lookup");
                    return;
                }
            };
            match self
                .find_unlinked(mlflow, &d.key, &d.chat_id, crid.as_deref())
                .await
            {
                Ok(_) => {}
                Err(e) if e.is_retryable() => {
                    tracing::debug!(error = %e.short(), "MLflow fails; the trace lookup stops for this round");
                    return;
                }
                Err(e) => {
                    tracing::debug!(key = %d.key, error = %e.short(), "trace lookup failed");
                }
            }
        }
    }

    async fn upsert(
        &self,
        mlflow: &MlflowClient,
        d: &Delivery,
        trace_id: &str,
        update: AssessmentUpdate,
    ) -> Attempt {
        let first = d.assessment_id.is_none();
        let mut known = d.assessment_id.clone();
        // Where the server keeps our deterministic ids, a create whose answer was lost is
        // caught by the next create ("already exists"); otherwise look on the trace first.
        let ids_safe =
            self.client_assessment_ids && self.ids.load(Ordering::Relaxed) == IDS_HONOURED;
        if known.is_none() && !ids_safe {
            // Adopt an assessment this user already has under this name (a previous attempt
            // whose answer was lost). This also tells us whether the trace exists yet.
            match mlflow.get_trace_info(trace_id).await {
                Ok(info) => {
                    known = find_ours(&info.assessments, &d.key).map(|a| a.assessment_id.clone())
                }
                Err(e) => return self.failure(d, Some(trace_id), &e),
            }
        }
        if let Some(aid) = known {
            match mlflow.update_assessment(trace_id, &aid, &update).await {
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
        let new = NewAssessment {
            assessment_id: client_id.clone(),
            name: d.key.name.clone(),
            source_id: d.key.user_id.clone(),
            value: update.value.clone(),
            rationale: update.rationale.clone(),
            metadata: [(
                "feedback_proxy.message_id".to_owned(),
                d.key.message_id.clone(),
            )]
            .into_iter()
            .collect(),
        };
        match mlflow.create_assessment(trace_id, &new).await {
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
                match mlflow.update_assessment(trace_id, &aid, &update).await {
                    Ok(_) => self.landed(trace_id, aid, true),
                    Err(e) => self.failure(d, Some(trace_id), &e),
                }
            }
            Err(e) => self.failure(d, Some(trace_id), &e),
        }
    }

    /// Records whether the server kept a client-chosen id (logged once when it did not).
    fn learn_ids(&self, honoured: bool) {
        let now = if honoured { IDS_HONOURED } else { IDS_IGNORED };
        if self.ids.swap(now, Ordering::Relaxed) != now && !honoured {
            tracing::warn!(
                "the MLflow server ignores client-chosen assessment ids; every first delivery now looks for an existing assessment before creating one"
            );
        }
    }

    fn landed(&self, trace_id: &str, assessment_id: String, first: bool) -> Attempt {
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

    async fn delete(&self, mlflow: &MlflowClient, d: &Delivery, trace_id: &str) -> Attempt {
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

    /// Not there yet (trace not flushed, stream still running): retry within the horizon, then
    /// park as having no trace id.
    fn not_yet(&self, d: &Delivery, trace_id: Option<&str>, why: String) -> Attempt {
        let age = SystemTime::now()
            .duration_since(d.enqueued_at)
            .unwrap_or_default();
        if age >= self.config.not_found_horizon {
            let reason = format!(
                "{NO_TRACE_ID}: {why} after {}",
                humantime::format_duration(self.config.not_found_horizon)
            );
            return Attempt::new(
                AssessmentFact::Unchanged,
                Outcome::Park { reason },
                Status::NoTraceId,
            );
        }
        Attempt::new(
            AssessmentFact::Unchanged,
            Outcome::Retry {
                at: SystemTime::now() + self.backoff(d.attempts, None),
                error: why,
            },
            Status::Queued {
                trace_id: trace_id.map(str::to_owned),
                reason: None,
            },
        )
    }

    fn failure(&self, d: &Delivery, trace_id: Option<&str>, e: &MlflowError) -> Attempt {
        let reason = e.short();
        if e.kind == MlflowErrorKind::NotFound {
            let what = match trace_id {
                Some(t) => format!("trace {t} not found (not flushed yet?)"),
                None => reason,
            };
            return self
                .not_yet(d, trace_id, what)
                .with_signal(Signal::Answered);
        }
        let trace = trace_id.map(str::to_owned);
        if e.is_retryable() {
            let age = SystemTime::now()
                .duration_since(d.enqueued_at)
                .unwrap_or_default();
            if age < self.config.max_age {
                let retry_after = match e.kind {
                    MlflowErrorKind::RateLimited { retry_after } => retry_after,
                    _ => None,
                };
                return Attempt::new(
                    AssessmentFact::Unchanged,
                    Outcome::Retry {
                        at: SystemTime::now() + self.backoff(d.attempts, retry_after),
                        error: reason.clone(),
                    },
                    Status::Queued {
                        trace_id: trace,
                        reason: Some(reason),
                    },
                )
                .with_signal(Signal::Overloaded { retry_after });
            }
        }
        let signal = if e.is_retryable() {
            Signal::Overloaded { retry_after: None }
        } else {
            Signal::Answered
        };
        Attempt::new(
            AssessmentFact::Unchanged,
            Outcome::Dead {
                error: reason.clone(),
            },
            Status::Error {
                trace_id: trace,
                reason: e.public(),
                detail: reason,
            },
        )
        .with_signal(signal)
    }

    fn store_failure(&self, d: &Delivery, e: &StoreError) -> Attempt {
        Attempt::new(
            AssessmentFact::Unchanged,
            Outcome::Retry {
                at: SystemTime::now() + self.backoff(d.attempts, None),
                error: e.to_string(),
            },
            Status::Queued {
                trace_id: None,
                reason: None,
            },
        )
    }

    /// Exponential backoff with jitter (half fixed, half random), capped; at least
    /// `retry_after` when the server asked for it.
    fn backoff(&self, attempts: i32, retry_after: Option<Duration>) -> Duration {
        let exp = attempts.clamp(1, 30) as u32 - 1;
        let base = self
            .config
            .backoff_initial
            .saturating_mul(1u32 << exp.min(20))
            .min(self.config.backoff_max);
        let jittered = base / 2 + base.mul_f64(fastrand::f64() / 2.0);
        match retry_after {
            Some(r) => jittered.max(r),
            None => jittered,
        }
    }

    /// The background worker: claims due deliveries and attempts them until `stop` is
    /// cancelled, as many at a time as MLflow keeps up with ([`Pace`]: at most
    /// `delivery.concurrency`). It claims again as soon as attempts finish, so a backlog drains
    /// at MLflow's pace rather than one batch per `poll_interval`; with nothing due it polls
    /// every `poll_interval`. Attempts are tracked tasks: [`Deliverer::shutdown`] waits for
    /// them until the drain deadline.
    ///
    /// Votes stored while MLflow was not configured (held as `no_experiment_id`) are released
    /// first, so that configuring MLflow delivers the backlog without an operator's help.
    pub async fn run_worker(self: Arc<Self>, stop: CancellationToken) {
        let mut pace = Pace::new(self.config.concurrency);
        // Finished attempts report their signal here; `inflight` counts those not back yet.
        let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<Signal>();
        let mut inflight: usize = 0;
        let mut next_lookup: Option<tokio::time::Instant> = None;
        let mut backlog_released = !self.enabled();
        loop {
            if !backlog_released {
                match self.store.requeue_held(NO_EXPERIMENT_ID).await {
                    Ok(n) => {
                        backlog_released = true;
                        if n > 0 {
                            tracing::info!(
                                deliveries = n,
                                "votes stored while MLflow was not configured are queued for delivery"
                            );
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot release the votes held while MLflow was not configured; trying again")
                    }
                }
            }
            if self.enabled()
                && next_lookup.is_none_or(|at| at <= tokio::time::Instant::now())
                && !self.looking_up.swap(true, Ordering::AcqRel)
            {
                next_lookup = Some(tokio::time::Instant::now() + self.config.trace_lookup_interval);
                let this = self.clone();
                self.spawn_tracked((), async move {
                    this.look_up_waiting().await;
                    this.looking_up.store(false, Ordering::Release);
                });
            }
            let now = Instant::now();
            let room = pace
                .allowed(now)
                .saturating_sub(inflight)
                .min(self.config.batch_size as usize);
            let mut more_due = false;
            if room > 0 && self.enabled() {
                let claimed_at = Instant::now();
                match self.store.claim_due(room as u32, self.config.lease).await {
                    Ok(batch) => {
                        more_due = batch.len() == room;
                        for d in batch {
                            let this = self.clone();
                            let done = Done {
                                tx: done_tx.clone(),
                                signal: Signal::Neutral,
                            };
                            inflight += 1;
                            self.spawn_tracked((), async move {
                                let mut done = done;
                                done.signal = this.attempt(d, claimed_at).await.1;
                            });
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot claim due deliveries");
                    }
                }
            }
            self.metrics.delivery_concurrency_limit.set(pace.limit());
            if more_due && pace.allowed(Instant::now()) > inflight {
                // More is due and there is room: claim again without waiting.
                continue;
            }
            // Wait for an attempt to finish (then claim again at once), the poll interval, the
            // end of a Retry-After pause, or the stop.
            let wake = pace
                .paused_until(now)
                .map_or(now + self.config.poll_interval, |p| {
                    p.min(now + self.config.poll_interval)
                });
            tokio::select! {
                biased;
                () = stop.cancelled() => break,
                Some(signal) = done_rx.recv(), if inflight > 0 => {
                    inflight -= 1;
                    pace.observe(signal, Instant::now());
                    // Take every other attempt that has finished too, then claim once for all.
                    while let Ok(signal) = done_rx.try_recv() {
                        inflight = inflight.saturating_sub(1);
                        pace.observe(signal, Instant::now());
                    }
                }
                () = tokio::time::sleep_until(wake.into()) => {}
            }
        }
        // In-flight attempts are tracked: `Deliverer::shutdown` waits for them.
    }
}

/// Reports a worker attempt's end to the worker, also when the attempt panicked or was
/// stopped (then with no signal), so that its slot is always given back.
struct Done {
    tx: tokio::sync::mpsc::UnboundedSender<Signal>,
    signal: Signal,
}

impl Drop for Done {
    fn drop(&mut self) {
        let _ = self.tx.send(self.signal);
    }
}

/// This user's current assessment under this name, if the trace holds one.
fn find_ours<'a>(assessments: &'a [Assessment], key: &VoteKey) -> Option<&'a Assessment> {
    assessments.iter().find(|a| {
        a.is_feedback
            && a.name == key.name
            && a.source_id == key.user_id
            && a.source_type.eq_ignore_ascii_case("HUMAN")
            && a.valid != Some(false)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_ids_are_stable_short_and_per_generation() {
        let key = VoteKey {
            message_id: "0192f0c4-7e4b-7cc2-9a4f-1b2c3d4e5f60".into(),
            user_id: "alice@example.com".into(),
            name: "user_feedback".into(),
        };
        let a = assessment_id_for(&key, 0);
        assert_eq!(a, assessment_id_for(&key, 0));
        assert_ne!(a, assessment_id_for(&key, 1));
        assert!(a.len() <= 50 && a.starts_with("a-"), "{a}");
        let other = VoteKey {
            user_id: "bob@example.com".into(),
            ..key.clone()
        };
        assert_ne!(a, assessment_id_for(&other, 0));
    }
}
