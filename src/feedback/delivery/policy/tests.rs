//! The delivery policy on a controlled clock and controlled dice: every rule of
//! [`super::decide`] at and around its edges, with no sleeping and no real time.

use std::time::{Duration, SystemTime};

use super::{Failure, Now, backoff, decide};
use crate::config::DeliveryConfig;
use crate::feedback::delivery::Status;
use crate::feedback::pace::Signal;
use crate::mlflow::{MlflowError, MlflowErrorKind};
use crate::store::{Delivery, DeliveryState, Desired, FeedbackValue, Outcome, StoreError, VoteKey};

const SECOND: Duration = Duration::from_secs(1);

fn config() -> DeliveryConfig {
    DeliveryConfig {
        backoff_initial: SECOND,
        backoff_max: Duration::from_secs(60),
        not_found_horizon: Duration::from_secs(600),
        max_age: Duration::from_secs(3600),
        inline_deadline: SECOND,
        poll_interval: SECOND,
        batch_size: 1,
        concurrency: 1,
        lease: SECOND,
        worker: false,
        trace_lookup_interval: SECOND,
    }
}

/// The epoch of these tests: every time is an offset from it.
fn t(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + secs)
}

fn at(secs: u64, jitter: f64) -> Now {
    Now {
        time: t(secs),
        jitter,
    }
}

/// A delivery enqueued at `t(0)` after `attempts` attempts.
fn delivery(attempts: i32) -> Delivery {
    Delivery {
        key: VoteKey {
            message_id: "m".into(),
            user_id: "u".into(),
            name: "user_feedback".into(),
        },
        chat_id: "c".into(),
        desired: Desired::Upsert {
            value: FeedbackValue::Bool(true),
            comment: None,
        },
        version: 1,
        assessment_id: None,
        generation: 0,
        trace_id: None,
        state: DeliveryState::Pending,
        attempts,
        next_attempt_at: t(0),
        enqueued_at: t(0),
        last_error: None,
        updated_at: t(0),
        claims: 1,
    }
}

fn mlflow(kind: MlflowErrorKind) -> MlflowError {
    MlflowError::new(kind, "boom")
}

fn retry_at(a: &super::Attempt) -> SystemTime {
    match &a.outcome {
        Outcome::Retry { at, .. } => *at,
        other => panic!("not a retry: {other:?}"),
    }
}

#[test]
fn backoff_doubles_from_the_initial_value_up_to_the_cap_within_its_jitter() {
    let c = config();
    // Jitter 0 is the lower half, jitter 1 the top: [base/2, base].
    assert_eq!(backoff(&c, 1, None, 0.0), SECOND / 2);
    assert_eq!(backoff(&c, 1, None, 1.0), SECOND);
    assert_eq!(backoff(&c, 2, None, 0.0), SECOND);
    assert_eq!(backoff(&c, 3, None, 1.0), 4 * SECOND);
    // Capped at backoff_max, however many attempts (and never overflowing).
    assert_eq!(backoff(&c, 7, None, 1.0), 60 * SECOND);
    assert_eq!(backoff(&c, i32::MAX, None, 1.0), 60 * SECOND);
    // A first attempt counts as one; nonsense counts clamp.
    assert_eq!(backoff(&c, 0, None, 0.0), SECOND / 2);
    assert_eq!(backoff(&c, -5, None, 0.0), SECOND / 2);
    // Jitter outside [0, 1] cannot stretch the bounds.
    assert_eq!(backoff(&c, 1, None, 7.0), SECOND);
    // Retry-After wins when it is longer, never when it is shorter.
    assert_eq!(
        backoff(&c, 1, Some(30 * SECOND), 0.5),
        30 * SECOND,
        "the server's pause is honoured"
    );
    assert_eq!(backoff(&c, 3, Some(SECOND), 1.0), 4 * SECOND);
}

#[test]
fn not_yet_retries_within_the_horizon_and_parks_at_it() {
    let c = config();
    let d = delivery(2);
    let a = decide(
        &d,
        Some("tr-1"),
        Failure::NotYet("still streaming".into()),
        &c,
        at(599, 0.0),
    );
    assert_eq!(retry_at(&a), t(599) + SECOND);
    assert!(matches!(&a.status, Status::Queued { trace_id: Some(t), reason: None } if t == "tr-1"));
    assert_eq!(a.signal, Signal::Neutral);

    let a = decide(
        &d,
        None,
        Failure::NotYet("still streaming".into()),
        &c,
        at(600, 0.0),
    );
    match &a.outcome {
        Outcome::Park { reason } => {
            assert!(reason.contains("still streaming"), "{reason}");
            assert!(reason.contains("10m"), "{reason}");
        }
        other => panic!("not parked: {other:?}"),
    }
    assert!(matches!(a.status, Status::NoTraceId));
}

#[test]
fn a_trace_not_found_is_not_yet_and_says_mlflow_answered() {
    let c = config();
    let d = delivery(1);
    let e = mlflow(MlflowErrorKind::NotFound);
    let a = decide(&d, Some("tr-2"), Failure::Mlflow(&e), &c, at(10, 1.0));
    assert_eq!(retry_at(&a), t(10) + SECOND);
    assert_eq!(a.signal, Signal::Answered);
    match &a.outcome {
        Outcome::Retry { error, .. } => assert!(error.contains("trace tr-2 not found"), "{error}"),
        other => panic!("{other:?}"),
    }
    // Past the horizon it parks, still as an answer.
    let a = decide(&d, Some("tr-2"), Failure::Mlflow(&e), &c, at(601, 1.0));
    assert!(matches!(a.outcome, Outcome::Park { .. }));
    assert_eq!(a.signal, Signal::Answered);
}

#[test]
fn retryable_failures_retry_until_max_age_then_die() {
    let c = config();
    let d = delivery(3);
    for kind in [
        MlflowErrorKind::Server,
        MlflowErrorKind::Timeout,
        MlflowErrorKind::Connect,
    ] {
        let e = mlflow(kind);
        let a = decide(&d, Some("tr"), Failure::Mlflow(&e), &c, at(3599, 0.0));
        assert_eq!(retry_at(&a), t(3599) + 2 * SECOND, "{kind:?}");
        assert_eq!(a.signal, Signal::Overloaded { retry_after: None });
        assert!(matches!(
            &a.status,
            Status::Queued {
                reason: Some(_),
                ..
            }
        ));

        let a = decide(&d, Some("tr"), Failure::Mlflow(&e), &c, at(3600, 0.0));
        assert!(matches!(a.outcome, Outcome::Dead { .. }), "{kind:?}");
        assert!(matches!(&a.status, Status::Error { trace_id: Some(t), .. } if t == "tr"));
        assert_eq!(a.signal, Signal::Overloaded { retry_after: None });
    }
}

#[test]
fn a_rate_limit_waits_at_least_as_long_as_mlflow_asked() {
    let c = config();
    let d = delivery(1);
    let pause = Some(45 * SECOND);
    let e = mlflow(MlflowErrorKind::RateLimited { retry_after: pause });
    let a = decide(&d, None, Failure::Mlflow(&e), &c, at(5, 0.0));
    assert_eq!(retry_at(&a), t(5) + 45 * SECOND);
    assert_eq!(a.signal, Signal::Overloaded { retry_after: pause });
}

#[test]
fn a_refusal_of_the_vote_itself_dies_at_once() {
    let c = config();
    let d = delivery(1);
    for kind in [MlflowErrorKind::Client, MlflowErrorKind::Invalid] {
        let e = mlflow(kind);
        let a = decide(&d, Some("tr"), Failure::Mlflow(&e), &c, at(1, 0.0));
        assert!(matches!(a.outcome, Outcome::Dead { .. }), "{kind:?}");
        assert_eq!(a.signal, Signal::Answered, "{kind:?}");
    }
}

#[test]
fn a_store_failure_retries_whatever_the_age_and_says_nothing_about_mlflow() {
    let c = config();
    let d = delivery(2);
    let e = StoreError::Unavailable("down".into());
    // Far past every horizon: the vote is ours to keep, so it is retried.
    let a = decide(&d, Some("tr"), Failure::Store(&e), &c, at(1_000_000, 1.0));
    assert_eq!(retry_at(&a), t(1_000_000) + 2 * SECOND);
    assert_eq!(a.signal, Signal::Neutral);
    assert!(matches!(
        a.status,
        Status::Queued {
            trace_id: None,
            reason: None
        }
    ));
}

#[test]
fn a_clock_behind_the_enqueue_time_counts_as_age_zero() {
    let c = config();
    let mut d = delivery(1);
    d.enqueued_at = t(100);
    let e = mlflow(MlflowErrorKind::Server);
    let a = decide(&d, None, Failure::Mlflow(&e), &c, at(50, 0.0));
    assert!(matches!(a.outcome, Outcome::Retry { .. }));
}
