//! How many deliveries the worker keeps in flight: an adaptive limit that follows MLflow's pace.
//!
//! Additive increase, multiplicative decrease (the rule TCP and Netflix's concurrency-limits
//! use): every attempt MLflow answered in time adds `1 / limit` (about one more slot per round
//! of answers), every sign of overload (429, 5xx, a timeout, a refused connection) cuts the
//! limit by a fixed factor, at most once per `COOL_DOWN` so that one burst of failures counts
//! once. A `Retry-After` pauses new claims until it has passed. The limit stays within
//! `1..=max` (`delivery.concurrency`).
//!
//! Growth also stops when answers queue (TCP Vegas' rule): while the smoothed attempt time is
//! more than [`GROW_BELOW`] times the least seen lately, more attempts in flight only wait
//! longer (a saturated MLflow answers at the same rate, each answer later), so the limit holds;
//! past [`SHRINK_ABOVE`] times it shrinks gently. Measured on a real `mlflow server` on SQLite
//! (bench/drain): the best direct rate comes at 2–8 creates in flight, and at 32 it is
//! ≈ 20 % lower; growing to the maximum on answers alone drained a backlog at 0.81–0.86 of the
//! best direct rate. The least time is relearnt every [`BASELINE_WINDOW`], so a server that
//! became slower for good is not mistaken for a queue forever.
//!
//! Written here rather than taken from a crate: tower's `ConcurrencyLimit` is fixed, and the
//! adaptive limiters on crates.io are request-path middleware, not a worker's claim budget. The
//! rule is a pure function of (signals, attempt times, clock) so that it is unit-tested without
//! a server or real time.

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
/// Grow only while the smoothed attempt time is below this multiple of the least one.
pub const GROW_BELOW: f64 = 2.0;
/// Shrink (by `SHRINK`, at most once per `COOL_DOWN`) above this multiple.
pub const SHRINK_ABOVE: f64 = 4.0;
const SHRINK: f64 = 0.9;
/// How often the least attempt time is relearnt (the least of the last window).
pub const BASELINE_WINDOW: Duration = Duration::from_secs(30);
/// Weight of a new attempt time in the smoothed one.
const SMOOTHING: f64 = 0.2;

/// The adaptive in-flight limit.
#[derive(Debug)]
pub struct Pace {
    limit: f64,
    max: f64,
    last_cut: Option<Instant>,
    paused_until: Option<Instant>,
    /// Smoothed attempt time, seconds.
    smoothed: Option<f64>,
    /// The least attempt time of the previous window (or of this one, if less), seconds.
    least: Option<f64>,
    /// The least of the current window, and when the window began.
    window_least: Option<f64>,
    window_start: Option<Instant>,
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
            smoothed: None,
            least: None,
            window_least: None,
            window_start: None,
        }
    }

    /// How much longer attempts take now than the least time seen lately (1.0: no queue;
    /// `None` before any attempt was timed).
    pub fn queueing(&self) -> Option<f64> {
        match (self.smoothed, self.least) {
            (Some(s), Some(l)) if l > 0.0 => Some(s / l),
            _ => None,
        }
    }

    fn time(&mut self, rtt: Duration, now: Instant) {
        let t = rtt.as_secs_f64();
        self.smoothed = Some(match self.smoothed {
            Some(s) => s + SMOOTHING * (t - s),
            None => t,
        });
        let start = *self.window_start.get_or_insert(now);
        if now.saturating_duration_since(start) >= BASELINE_WINDOW {
            // The new baseline: the least of the window that ended.
            if let Some(w) = self.window_least.take() {
                self.least = Some(w);
            }
            self.window_start = Some(now);
        }
        self.window_least = Some(self.window_least.map_or(t, |w| w.min(t)));
        self.least = Some(self.least.map_or(t, |l| l.min(t)));
    }

    /// Takes one attempt's signal, and how long it took when known, into account.
    pub fn observe(&mut self, signal: Signal, took: Option<Duration>, now: Instant) {
        match signal {
            Signal::Answered => {
                if let Some(t) = took {
                    self.time(t, now);
                }
                match self.queueing() {
                    Some(q) if q > SHRINK_ABOVE => {
                        if self
                            .last_cut
                            .is_none_or(|t| now.saturating_duration_since(t) >= COOL_DOWN)
                        {
                            self.limit = (self.limit * SHRINK).max(1.0);
                            self.last_cut = Some(now);
                        }
                    }
                    Some(q) if q > GROW_BELOW => {}
                    _ => self.limit = (self.limit + 1.0 / self.limit).min(self.max),
                }
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
            p.observe(Signal::Answered, None, now);
        }
        // About one slot per round of answers: 4 → 5 takes 4 answers, 5 → 6 five, ...
        assert!((7..=8).contains(&p.allowed(now)), "{}", p.limit());
        for _ in 0..10_000 {
            p.observe(Signal::Answered, None, now);
        }
        assert_eq!(p.allowed(now), 32);
    }

    #[test]
    fn a_burst_of_overload_cuts_once_and_never_below_one() {
        let t0 = Instant::now();
        let mut p = Pace::new(32);
        for _ in 0..1000 {
            p.observe(Signal::Answered, None, t0);
        }
        assert_eq!(p.allowed(t0), 32);
        for _ in 0..50 {
            p.observe(OVERLOAD, None, t0);
        }
        assert_eq!(p.allowed(t0), 22, "one cut for one burst");
        let mut t = t0;
        for _ in 0..100 {
            t += COOL_DOWN;
            p.observe(OVERLOAD, None, t);
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
            None,
            t0,
        );
        assert_eq!(p.allowed(t0 + Duration::from_secs(2)), 0);
        assert_eq!(p.paused_until(t0), Some(t0 + Duration::from_secs(3)));
        // A shorter Retry-After does not end a longer pause.
        p.observe(
            Signal::Overloaded {
                retry_after: Some(Duration::from_secs(1)),
            },
            None,
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
        p.observe(Signal::Neutral, None, now);
        p.observe(Signal::Answered, None, now);
        assert_eq!(p.allowed(now), 1);
        p.observe(OVERLOAD, None, now);
        assert_eq!(p.allowed(now), 1);
        assert_eq!(Pace::new(0).allowed(now), 1);
    }

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn growth_stops_while_answers_queue_and_resumes_when_they_do_not() {
        let t0 = Instant::now();
        let mut p = Pace::new(32);
        // Attempts take 20 ms: no queue, the limit grows.
        for _ in 0..20 {
            p.observe(Signal::Answered, Some(20 * MS), t0);
        }
        let grown = p.limit();
        assert!(grown > 6.0, "{grown}");
        // They take 60 ms (3x the least): once the smoothed time has followed, the limit holds.
        for _ in 0..10 {
            p.observe(Signal::Answered, Some(60 * MS), t0);
        }
        let held = p.limit();
        assert!(held < grown + 1.0, "{held} after {grown}");
        for _ in 0..200 {
            p.observe(Signal::Answered, Some(60 * MS), t0);
        }
        assert_eq!(p.limit(), held);
        // Back to 20 ms: growth resumes.
        for _ in 0..100 {
            p.observe(Signal::Answered, Some(20 * MS), t0);
        }
        assert!(p.limit() > held);
    }

    #[test]
    fn a_long_queue_shrinks_the_limit_once_per_cool_down_and_the_baseline_is_relearnt() {
        let t0 = Instant::now();
        let mut p = Pace::new(32);
        for _ in 0..1000 {
            p.observe(Signal::Answered, Some(10 * MS), t0);
        }
        assert_eq!(p.allowed(t0), 32);
        let mut t = t0;
        for _ in 0..50 {
            p.observe(Signal::Answered, Some(100 * MS), t);
        }
        let cut = p.limit();
        assert!(
            (28.0..32.0).contains(&cut),
            "one gentle cut per cool-down: {cut}"
        );
        for _ in 0..10 {
            t += COOL_DOWN;
            p.observe(Signal::Answered, Some(100 * MS), t);
        }
        assert!(p.limit() < cut);
        // The server is slower for good: after two windows 100 ms is the baseline, and the
        // limit grows again.
        let low = p.limit();
        t += BASELINE_WINDOW;
        p.observe(Signal::Answered, Some(100 * MS), t);
        t += BASELINE_WINDOW;
        for _ in 0..50 {
            p.observe(Signal::Answered, Some(100 * MS), t);
        }
        assert!(p.queueing().is_some_and(|q| (q - 1.0).abs() < 1e-6));
        assert!(p.limit() > low, "{} after {low}", p.limit());
    }
}
