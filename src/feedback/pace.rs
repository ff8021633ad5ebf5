//! How many deliveries the worker keeps in flight: an adaptive limit that follows MLflow's pace.
//!
//! Additive increase, multiplicative decrease (the rule TCP and Netflix's concurrency-limits
//! use): every attempt MLflow answered in time adds `1 / limit` (about one more slot per round
//! of answers), every sign of overload (429, 5xx, a timeout, a refused connection) cuts the
//! limit by a fixed factor, at most once per `COOL_DOWN` so that one burst of failures counts
//! once. A `Retry-After` pauses new claims until it has passed. The limit stays within
//! `1..=max` (`delivery.concurrency`).
//!
//! Written here rather than taken from a crate: tower's `ConcurrencyLimit` is fixed, and the
//! adaptive limiters on crates.io measure latency against a baseline, which an MLflow server
//! whose latency depends on the trace it writes to does not have. The rule is a pure function
//! of (signals, clock) so that it is unit-tested without a server or real time.

use std::time::{Duration, Instant};

/// What one attempt said about MLflow's capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// MLflow answered (success, or an answer about the vote itself such as 404 or 400).
    Answered,
    /// MLflow is overloaded or unreachable; `retry_after` when it asked for a pause.
    Overloaded { retry_after: Option<Duration> },
    /// Nothing learnt about MLflow (the store failed, the attempt made no MLflow call).
    Neutral,
}

/// Multiplicative decrease on overload.
const BACKOFF: f64 = 0.7;
/// Overload signals closer together than this count once (they are one burst).
const COOL_DOWN: Duration = Duration::from_millis(500);
/// The limit the worker starts with (then grows while MLflow keeps up).
const INITIAL: f64 = 4.0;

/// The adaptive in-flight limit.
#[derive(Debug)]
pub struct Pace {
    limit: f64,
    max: f64,
    last_cut: Option<Instant>,
    paused_until: Option<Instant>,
}

impl Pace {
    /// A pace that starts below `max` (at most 4) and never exceeds it.
    pub fn new(max: usize) -> Self {
        let max = max.max(1) as f64;
        Self {
            limit: INITIAL.min(max),
            max,
            last_cut: None,
            paused_until: None,
        }
    }

    /// Takes one attempt's signal into account.
    pub fn observe(&mut self, signal: Signal, now: Instant) {
        match signal {
            Signal::Answered => {
                self.limit = (self.limit + 1.0 / self.limit).min(self.max);
            }
            Signal::Overloaded { retry_after } => {
                if self
                    .last_cut
                    .is_none_or(|t| now.saturating_duration_since(t) >= COOL_DOWN)
                {
                    self.limit = (self.limit * BACKOFF).max(1.0);
                    self.last_cut = Some(now);
                }
                if let Some(r) = retry_after {
                    let until = now + r;
                    self.paused_until = Some(self.paused_until.map_or(until, |p| p.max(until)));
                }
            }
            Signal::Neutral => {}
        }
    }

    /// How many attempts may be in flight now (0 while paused by a `Retry-After`).
    pub fn allowed(&self, now: Instant) -> usize {
        if self.paused_until.is_some_and(|p| now < p) {
            return 0;
        }
        self.limit.floor() as usize
    }

    /// Until when new claims are paused, if they are.
    pub fn paused_until(&self, now: Instant) -> Option<Instant> {
        self.paused_until.filter(|p| now < *p)
    }

    /// The current limit (for the metric).
    pub fn limit(&self) -> f64 {
        self.limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OVERLOAD: Signal = Signal::Overloaded { retry_after: None };

    #[test]
    fn grows_while_mlflow_answers_up_to_the_maximum() {
        let now = Instant::now();
        let mut p = Pace::new(32);
        assert_eq!(p.allowed(now), 4);
        for _ in 0..20 {
            p.observe(Signal::Answered, now);
        }
        // About one slot per round of answers: 4 → 5 takes 4 answers, 5 → 6 five, ...
        assert!((7..=8).contains(&p.allowed(now)), "{}", p.limit());
        for _ in 0..10_000 {
            p.observe(Signal::Answered, now);
        }
        assert_eq!(p.allowed(now), 32);
    }

    #[test]
    fn a_burst_of_overload_cuts_once_and_never_below_one() {
        let t0 = Instant::now();
        let mut p = Pace::new(32);
        for _ in 0..1000 {
            p.observe(Signal::Answered, t0);
        }
        assert_eq!(p.allowed(t0), 32);
        for _ in 0..50 {
            p.observe(OVERLOAD, t0);
        }
        assert_eq!(p.allowed(t0), 22, "one cut for one burst");
        let mut t = t0;
        for _ in 0..100 {
            t += COOL_DOWN;
            p.observe(OVERLOAD, t);
        }
        assert_eq!(p.allowed(t), 1);
    }

    #[test]
    fn retry_after_pauses_claims_until_it_has_passed() {
        let t0 = Instant::now();
        let mut p = Pace::new(8);
        p.observe(
            Signal::Overloaded {
                retry_after: Some(Duration::from_secs(3)),
            },
            t0,
        );
        assert_eq!(p.allowed(t0 + Duration::from_secs(2)), 0);
        assert_eq!(p.paused_until(t0), Some(t0 + Duration::from_secs(3)));
        // A shorter Retry-After does not end a longer pause.
        p.observe(
            Signal::Overloaded {
                retry_after: Some(Duration::from_secs(1)),
            },
            t0 + Duration::from_secs(1),
        );
        assert_eq!(p.allowed(t0 + Duration::from_millis(2900)), 0);
        assert!(p.allowed(t0 + Duration::from_secs(3)) >= 1);
        assert_eq!(p.paused_until(t0 + Duration::from_secs(3)), None);
    }

    #[test]
    fn neutral_signals_change_nothing_and_max_one_is_fixed() {
        let now = Instant::now();
        let mut p = Pace::new(1);
        p.observe(Signal::Neutral, now);
        p.observe(Signal::Answered, now);
        assert_eq!(p.allowed(now), 1);
        p.observe(OVERLOAD, now);
        assert_eq!(p.allowed(now), 1);
        assert_eq!(Pace::new(0).allowed(now), 1);
    }
}
