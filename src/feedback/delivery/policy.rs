//! What happens after an attempt that did not land: park, retry after a backoff (exponential
//! with jitter, `Retry-After` honoured, bounded by `delivery.max_age` and
//! `delivery.not_found_horizon`) or dead-letter, by the kind of failure.

use std::time::{Duration, SystemTime};

use super::{Attempt, Deliverer, NO_TRACE_ID, Status};
use crate::feedback::pace::Signal;
use crate::mlflow::{MlflowError, MlflowErrorKind};
use crate::store::{AssessmentFact, Delivery, Outcome, StoreError};

impl Deliverer {
    /// Not there yet (trace not flushed, stream still running): retry within the horizon, then
    /// park as having no trace id.
    pub(super) fn not_yet(&self, d: &Delivery, trace_id: Option<&str>, why: String) -> Attempt {
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

    pub(super) fn failure(&self, d: &Delivery, trace_id: Option<&str>, e: &MlflowError) -> Attempt {
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

    pub(super) fn store_failure(&self, d: &Delivery, e: &StoreError) -> Attempt {
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
    pub(super) fn backoff(&self, attempts: i32, retry_after: Option<Duration>) -> Duration {
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
}
