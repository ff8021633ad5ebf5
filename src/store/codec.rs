//! How the domain types are spelled in the database, shared by both backends so that they
//! cannot drift apart: the `desired` / `state` words, vote values as JSON, and what `finish`
//! writes for each [`AssessmentFact`] and [`Outcome`].
//!
//! No SQL lives here (it stays next to the backend function that runs it), and nothing here
//! touches a connection.

use std::time::SystemTime;

use super::api::{
    AssessmentFact, DeliveryState, Desired, Enqueue, FeedbackValue, Finished, Outcome, StoreError,
};

pub(super) const DESIRED_UPSERT: &str = "upsert";
pub(super) const DESIRED_DELETE: &str = "delete";

/// The JSON stored for a vote value; rejects values JSON cannot hold (NaN, infinities), which
/// would otherwise be stored as `null` and read back as corrupt.
pub(super) fn value_json(v: &FeedbackValue) -> Result<serde_json::Value, StoreError> {
    match v.to_json() {
        serde_json::Value::Null => Err(StoreError::Query(
            "the vote value is not a finite number".to_owned(),
        )),
        j => Ok(j),
    }
}

pub(super) fn value_from_json(v: &serde_json::Value) -> Result<FeedbackValue, StoreError> {
    FeedbackValue::from_json(v).ok_or_else(|| {
        StoreError::Corrupt(format!("vote value {v} is not a bool, number or string"))
    })
}

/// Parses a value stored as JSON text (SQLite).
pub(super) fn value_from_text(text: &str) -> Result<FeedbackValue, StoreError> {
    let v: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| StoreError::Corrupt(format!("vote value is not JSON: {e}")))?;
    value_from_json(&v)
}

pub(super) fn desired(
    kind: &str,
    value: Option<serde_json::Value>,
    comment: Option<String>,
) -> Result<Desired, StoreError> {
    match kind {
        DESIRED_UPSERT => {
            let value = value.ok_or_else(|| {
                StoreError::Corrupt("an upsert delivery has no desired value".to_owned())
            })?;
            Ok(Desired::Upsert {
                value: value_from_json(&value)?,
                comment,
            })
        }
        DESIRED_DELETE => Ok(Desired::Delete),
        other => Err(StoreError::Corrupt(format!(
            "unknown desired action \"{other}\""
        ))),
    }
}

pub(super) fn state(s: &str) -> Result<DeliveryState, StoreError> {
    DeliveryState::parse(s)
        .ok_or_else(|| StoreError::Corrupt(format!("unknown delivery state \"{s}\"")))
}

/// The state and `last_error` an enqueue asks for (before the backend's wake-up check).
/// The state, waiting reason and due delay (milliseconds) of a delivery enqueued as `e`.
pub(super) fn enqueue(e: &Enqueue) -> (DeliveryState, Option<&str>, i64) {
    match e {
        Enqueue::Pending => (DeliveryState::Pending, None, 0),
        Enqueue::Inline { hold } => (DeliveryState::Pending, None, millis(*hold)),
        Enqueue::Waiting { reason } => (DeliveryState::Waiting, Some(reason.as_str()), 0),
    }
}

/// A duration in whole milliseconds, saturating.
pub(super) fn millis(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// The columns `finish` writes, decided in Rust so that both backends run the same logic.
pub(super) struct FinishPlan<'a> {
    /// `unchanged`, `exists` or `gone`.
    pub fact: &'static str,
    pub assessment_id: Option<&'a str>,
    pub trace_id: Option<&'a str>,
    /// Applied only when the version is current.
    pub state: DeliveryState,
    /// `Some` only for a retry: the new due time.
    pub next_attempt_at: Option<SystemTime>,
    pub last_error: Option<&'a str>,
}

pub(super) fn finish<'a>(fact: &'a AssessmentFact, outcome: &'a Outcome) -> FinishPlan<'a> {
    let (fact, assessment_id, trace_id) = match fact {
        AssessmentFact::Unchanged => ("unchanged", None, None),
        AssessmentFact::Exists {
            assessment_id,
            trace_id,
        } => (
            "exists",
            Some(assessment_id.as_str()),
            Some(trace_id.as_str()),
        ),
        AssessmentFact::Gone => ("gone", None, None),
    };
    let (state, next_attempt_at, last_error) = match outcome {
        Outcome::Done => (DeliveryState::Done, None, None),
        Outcome::Retry { at, error } => (DeliveryState::Pending, Some(*at), Some(error.as_str())),
        Outcome::Park { reason } => (DeliveryState::Waiting, None, Some(reason.as_str())),
        Outcome::Dead { error } => (DeliveryState::Dead, None, Some(error.as_str())),
    };
    FinishPlan {
        fact,
        assessment_id,
        trace_id,
        state,
        next_attempt_at,
        last_error,
    }
}

/// Decodes what the backends' `finish` statements return (see their SQL).
pub(super) fn finished(s: Option<&str>) -> Result<Finished, StoreError> {
    match s {
        None => Ok(Finished::Missing),
        Some("applied") => Ok(Finished::Applied),
        Some("superseded") => Ok(Finished::Superseded),
        Some("lease_lost") => Ok(Finished::LeaseLost),
        Some(other) => Err(StoreError::Corrupt(format!(
            "unexpected finish result {other:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_finite_numbers_are_refused() {
        assert!(value_json(&FeedbackValue::Number(f64::NAN)).is_err());
        assert_eq!(
            value_json(&FeedbackValue::Number(4.5)).unwrap(),
            serde_json::json!(4.5)
        );
    }

    #[test]
    fn desired_round_trips_and_rejects_garbage() {
        let d = desired("upsert", Some(serde_json::json!("up")), Some("c".into())).unwrap();
        assert_eq!(
            d,
            Desired::Upsert {
                value: FeedbackValue::String("up".into()),
                comment: Some("c".into())
            }
        );
        assert_eq!(desired("delete", None, None).unwrap(), Desired::Delete);
        assert!(matches!(
            desired("upsert", None, None),
            Err(StoreError::Corrupt(_))
        ));
        assert!(matches!(
            desired("frob", None, None),
            Err(StoreError::Corrupt(_))
        ));
        assert!(matches!(
            value_from_text("[1]"),
            Err(StoreError::Corrupt(_))
        ));
    }
}
