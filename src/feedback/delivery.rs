//! Delivering votes to MLflow: one attempt ([`Deliverer::attempt`]) and the background worker
//! that retries until every vote lands ([`Deliverer::run_worker`]).
//!
//! - this module: the [`Deliverer`], claiming (inline or by the worker), recording an attempt's
//!   outcome, shutdown;
//! - `attempt`: the MLflow calls of one attempt (trace lookup, create / adopt / PATCH / DELETE);
//! - `policy`: park, retry with backoff, or dead-letter after a failure;
//! - `session`: where a chat rating lands (the chat's first trace, as a session assessment);
//! - `worker`: the background loop and the periodic trace lookup for waiting votes;
//! - `follow`: a delivered negative vote's trace into the review queue and the dataset.
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

mod attempt;
pub mod follow;
mod policy;
pub mod session;
mod worker;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8};
use std::time::{Duration, Instant, SystemTime};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::pace::Signal;

use crate::config::{DeliveryConfig, MlflowConfig};
use crate::metrics::{Metrics, OutcomeLabel};
use crate::mlflow::MlflowClient;
use crate::store::{AssessmentFact, Delivery, Finished, Outcome, SharedStore, VoteKey};

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
    /// Review queue and evaluation dataset of negative votes (`follow`).
    follow: follow::FollowUps,
}

const IDS_UNKNOWN: u8 = 0;
const IDS_HONOURED: u8 = 1;
const IDS_IGNORED: u8 = 2;

/// The result of one attempt before it is recorded.
struct Attempt {
    fact: AssessmentFact,
    outcome: Outcome,
    status: Status,
    /// What the attempt said about MLflow's capacity (for the worker's [`Pace`](super::pace::Pace)).
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
        Self::with_follow_ups(
            store,
            mlflow,
            mlflow_config,
            config,
            metrics,
            follow::FollowUps::default(),
        )
    }

    /// [`Deliverer::new`] whose negative votes also go to a review queue and/or a dataset.
    pub fn with_follow_ups(
        store: SharedStore,
        mlflow: Option<MlflowClient>,
        mlflow_config: &MlflowConfig,
        config: DeliveryConfig,
        metrics: Arc<Metrics>,
        follow: follow::FollowUps,
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
            follow,
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

    /// The lease an inline attempt claims its delivery with, when the vote's own store write
    /// claims it (`Store::vote_on_link`); `None` without MLflow (nothing to attempt).
    pub fn inline_lease(&self) -> Option<Duration> {
        self.enabled().then_some(self.config.lease)
    }

    /// [`Deliverer::attempt_inline`] for a delivery the vote's own store write already claimed
    /// (no earlier than `claimed_at`), which saves the claim's round trip.
    pub async fn attempt_claimed(self: &Arc<Self>, d: Delivery, claimed_at: Instant) -> Status {
        let this = self.clone();
        self.inline(async move { this.attempt(d, claimed_at).await.0 })
            .await
    }

    /// Claims `key` at `version` and makes one attempt, waiting at most the inline deadline for
    /// its outcome. The attempt itself runs to completion in the background either way (an
    /// abandoned MLflow call would only widen the crash window).
    pub async fn attempt_inline(self: &Arc<Self>, key: &VoteKey, version: i64) -> Status {
        let this = self.clone();
        let key = key.clone();
        self.inline(async move {
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
        })
        .await
    }

    /// Runs an inline attempt as a tracked task (it runs to completion in the background
    /// whatever happens to the request), waiting at most the inline deadline for its status.
    async fn inline(&self, attempt: impl Future<Output = Status> + Send + 'static) -> Status {
        let dropped = Status::Queued {
            trace_id: None,
            reason: Some("the proxy is shutting down".into()),
        };
        let task = self.spawn_tracked(dropped, attempt);
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
