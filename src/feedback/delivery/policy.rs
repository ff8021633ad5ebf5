//! What happens after an attempt that did not land: park, retry after a backoff (exponential
//! with jitter, `Retry-After` honoured, bounded by `delivery.max_age` and
//! `delivery.not_found_horizon`) or dead-letter, by the kind of failure.
//!
//! [`decide`] is a pure function of (delivery, failure, config, now): the clock and the jitter
//! come in as [`Now`], so the rules are unit-tested below on a controlled clock. The
//! `Deliverer` methods at the end only supply the real clock and dice.

use std::time::{Duration, SystemTime};

use super::{Attempt, Deliverer, NO_TRACE_ID, Status};
use crate::config::DeliveryConfig;
use crate::feedback::pace::Signal;
use crate::mlflow::{MlflowError, MlflowErrorKind};
use crate::store::{AssessmentFact, Delivery, Outcome, StoreError};

/// Why an attempt did not land.
pub(super) enum Failure<'a> {
    /// Not there yet (trace not flushed, stream still running), with what was seen.
    NotYet(String),
    /// MLflow answered with an error, or could not be reached.
    Mlflow(&'a MlflowError),
    /// The store could not be read or written.
    Store(&'a StoreError),
}

/// The moment of a decision and its dice.
#[derive(Debug, Clone, Copy)]
pub(super) struct Now {
    pub time: SystemTime,
    /// Uniform in [0, 1): where in the upper half of the backoff the retry falls.
    pub jitter: f64,
}

impl Now {
    pub(super) fn real() -> Self {
        Self {
            time: SystemTime::now(),
            jitter: fastrand::f64(),
        }
    }
}

/// What to do with `d` after `failure` (see the module documentation).
pub(super) fn decide(
    d: &Delivery,
    trace_id: Option<&str>,
    failure: Failure<'_>,
    config: &DeliveryConfig,
    now: Now,
) -> Attempt {
    let age = now.time.duration_since(d.enqueued_at).unwrap_or_default();
    let retry = |retry_after: Option<Duration>, error: String, status: Status| {
        Attempt::new(
            AssessmentFact::Unchanged,
            Outcome::Retry {
                at: now.time + backoff(config, d.attempts, retry_after, now.jitter),
                error,
            },
            status,
        )
    };
    let e = match failure {
        Failure::Store(e) => {
            return retry(
                None,
                e.to_string(),
                Status::Queued {
                    trace_id: None,
                    reason: None,
                },
            );
        }
        Failure::NotYet(why) => return not_yet(d, trace_id, why, config, now),
        Failure::Mlflow(e) => e,
    };
    let reason = e.short();
    if e.kind == MlflowErrorKind::NotFound {
        let what = match trace_id {
            Some(t) => format!("trace {t} not found (not flushed yet?)"),
            None => reason,
        };
        return not_yet(d, trace_id, what, config, now).with_signal(Signal::Answered);
    }
    let trace = trace_id.map(str::to_owned);
    if e.is_retryable() && age < config.max_age {
        let retry_after = match e.kind {
            MlflowErrorKind::RateLimited { retry_after } => retry_after,
            _ => None,
        };
        return retry(
            retry_after,
            reason.clone(),
            Status::Queued {
                trace_id: trace,
                reason: Some(reason),
            },
        )
        .with_signal(Signal::Overloaded { retry_after });
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

/// Not there yet: retry within the horizon, then park as having no trace id.
fn not_yet(
    d: &Delivery,
    trace_id: Option<&str>,
    why: String,
    config: &DeliveryConfig,
    now: Now,
) -> Attempt {
    let age = now.time.duration_since(d.enqueued_at).unwrap_or_default();
    if age >= config.not_found_horizon {
        let reason = format!(
            "{NO_TRACE_ID}: {why} after {}",
            humantime::format_duration(config.not_found_horizon)
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
            at: now.time + backoff(config, d.attempts, None, now.jitter),
            error: why,
        },
        Status::Queued {
            trace_id: trace_id.map(str::to_owned),
            reason: None,
        },
    )
}

/// Exponential backoff with jitter (half fixed, half `jitter`), capped; at least
/// `retry_after` when the server asked for it.
pub(super) fn backoff(
    config: &DeliveryConfig,
    attempts: i32,
    retry_after: Option<Duration>,
    jitter: f64,
) -> Duration {
    let exp = attempts.clamp(1, 30) as u32 - 1;
    let base = config
        .backoff_initial
        .saturating_mul(1u32 << exp.min(20))
        .min(config.backoff_max);
    let jittered = base / 2 + base.mul_f64(jitter.clamp(0.0, 1.0) / 2.0);
    match retry_after {
        Some(r) => jittered.max(r),
        None => jittered,
    }
}

impl Deliverer {
    /// [`decide`] for a delivery that is not there yet, on the real clock.
    pub(super) fn not_yet(&self, d: &Delivery, trace_id: Option<&str>, why: String) -> Attempt {
        decide(d, trace_id, Failure::NotYet(why), &self.config, Now::real())
    }

    /// [`decide`] for an MLflow failure, on the real clock.
    pub(super) fn failure(&self, d: &Delivery, trace_id: Option<&str>, e: &MlflowError) -> Attempt {
        decide(d, trace_id, Failure::Mlflow(e), &self.config, Now::real())
    }

    /// [`backoff`] with real dice.
    pub(super) fn backoff(&self, attempts: i32, retry_after: Option<Duration>) -> Duration {
        backoff(&self.config, attempts, retry_after, fastrand::f64())
    }

    /// [`decide`] for a store failure, on the real clock.
    pub(super) fn store_failure(&self, d: &Delivery, e: &StoreError) -> Attempt {
        decide(d, None, Failure::Store(e), &self.config, Now::real())
    }
}

#[cfg(test)]
mod tests;
