//! `[delivery]`: retries, backoff, leases and the worker, with their validation.

use std::time::Duration;

use serde::Serialize;

use super::raw;
use super::ser::ser_duration;
use super::validate::Validator;

#[derive(Debug, Clone, Serialize)]
pub struct DeliveryConfig {
    /// How long `POST /api/feedback` waits for the first delivery attempt before answering
    /// `queued`.
    #[serde(serialize_with = "ser_duration")]
    pub inline_deadline: Duration,
    #[serde(serialize_with = "ser_duration")]
    pub poll_interval: Duration,
    pub batch_size: u32,
    /// The most attempts in flight per process; the worker adapts below it (`feedback::pace`).
    pub concurrency: usize,
    /// How long a claimed delivery stays invisible to other workers unless its attempt renews
    /// it (every third of it).
    #[serde(serialize_with = "ser_duration")]
    pub lease: Duration,
    #[serde(serialize_with = "ser_duration")]
    pub backoff_initial: Duration,
    #[serde(serialize_with = "ser_duration")]
    pub backoff_max: Duration,
    /// How long a trace that answers 404 (not flushed yet) is retried.
    #[serde(serialize_with = "ser_duration")]
    pub not_found_horizon: Duration,
    /// How long retryable failures (5xx, timeouts) are retried before dead-lettering.
    #[serde(serialize_with = "ser_duration")]
    pub max_age: Duration,
    /// Run the background worker in this process.
    pub worker: bool,
    /// How often the worker searches MLflow, by the proxy's client request id, for the traces
    /// of votes waiting without one (for at most `max_age` after the vote).
    #[serde(serialize_with = "ser_duration")]
    pub trace_lookup_interval: Duration,
}

impl Validator {
    pub(super) fn delivery(&mut self, raw: raw::RawDelivery) -> DeliveryConfig {
        let d = DeliveryConfig {
            inline_deadline: self.duration(
                "delivery.inline_deadline",
                raw.inline_deadline.as_deref(),
                "2s",
            ),
            poll_interval: self.duration(
                "delivery.poll_interval",
                raw.poll_interval.as_deref(),
                "1s",
            ),
            batch_size: raw.batch_size.unwrap_or(32),
            concurrency: raw.concurrency.unwrap_or(32),
            lease: self.duration("delivery.lease", raw.lease.as_deref(), "6s"),
            backoff_initial: self.duration(
                "delivery.backoff_initial",
                raw.backoff_initial.as_deref(),
                "1s",
            ),
            backoff_max: self.duration("delivery.backoff_max", raw.backoff_max.as_deref(), "5m"),
            not_found_horizon: self.duration(
                "delivery.not_found_horizon",
                raw.not_found_horizon.as_deref(),
                "15m",
            ),
            max_age: self.duration("delivery.max_age", raw.max_age.as_deref(), "24h"),
            worker: raw.worker.unwrap_or(true),
            trace_lookup_interval: self.duration(
                "delivery.trace_lookup_interval",
                raw.trace_lookup_interval.as_deref(),
                "1m",
            ),
        };
        if d.trace_lookup_interval.is_zero() {
            self.problem(
                "delivery.trace_lookup_interval",
                "must be greater than zero",
            );
        }
        if d.batch_size == 0 {
            self.problem("delivery.batch_size", "must be greater than zero");
        }
        if d.concurrency == 0 {
            self.problem("delivery.concurrency", "must be greater than zero");
        }
        if d.backoff_initial.is_zero() || d.backoff_initial > d.backoff_max {
            self.problem(
                "delivery.backoff_initial",
                "must be greater than zero and at most delivery.backoff_max",
            );
        }
        if d.poll_interval.is_zero() {
            self.problem("delivery.poll_interval", "must be greater than zero");
        }
        d
    }
}
