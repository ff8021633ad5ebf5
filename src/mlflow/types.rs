//! The client's own types for what it sends and gets back: assessments (new, updated, as
//! stored) and a trace's info record. `wire` maps them to and from the server's JSON.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::domain::FeedbackValue;

/// A new HUMAN feedback assessment.
#[derive(Debug, Clone, PartialEq)]
pub struct NewAssessment {
    /// A client-chosen id (≤ 50 characters of `[A-Za-z0-9._-]`), honoured by open-source MLflow
    /// and unique across all traces: makes a retried create fail with
    /// [`MlflowErrorKind::AlreadyExists`](super::MlflowErrorKind::AlreadyExists) instead of creating a second assessment.
    pub assessment_id: Option<String>,
    pub name: String,
    /// The HUMAN source's id: the user who voted.
    pub source_id: String,
    pub value: FeedbackValue,
    pub rationale: Option<String>,
    pub metadata: BTreeMap<String, String>,
}

/// A new HUMAN expectation assessment: what the user says the answer should have been (a
/// correction). Its value is sent as `{"expectation": {"value": "<text>"}}`, the shape
/// `mlflow.log_expectation` writes for a string (verified on 3.17.2).
#[derive(Debug, Clone, PartialEq)]
pub struct NewExpectation {
    /// A client-chosen id, as for [`NewAssessment::assessment_id`].
    pub assessment_id: Option<String>,
    pub name: String,
    /// The HUMAN source's id: the user who corrected.
    pub source_id: String,
    pub value: String,
    pub metadata: BTreeMap<String, String>,
}

/// A change of an existing feedback assessment's value and rationale (`update_mask`
/// `feedback,rationale`).
///
/// `rationale: None` clears the rationale as far as MLflow allows: the server stores an empty
/// string (verified on 3.17.2: the field reads back as `"rationale": ""`; there is no way to make
/// it absent again). [`Assessment::rationale`] reads an empty rationale as `None`. Metadata is
/// not touched: the server merges metadata on update and cannot remove keys.
#[derive(Debug, Clone, PartialEq)]
pub struct AssessmentUpdate {
    pub value: FeedbackValue,
    pub rationale: Option<String>,
}

/// An assessment as the server holds it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Assessment {
    pub assessment_id: String,
    pub name: String,
    pub trace_id: String,
    /// `HUMAN`, `LLM_JUDGE`, `CODE`, or `SOURCE_TYPE_UNSPECIFIED`.
    pub source_type: String,
    /// Empty when the server has none.
    pub source_id: String,
    /// `feedback.value` as the server returns it (numbers come back as doubles: `1` → `1.0`).
    /// `None` for a null value, an error-only feedback, or an expectation.
    pub value: Option<serde_json::Value>,
    /// `feedback.error`, for feedback that records a failed judge.
    pub error: Option<serde_json::Value>,
    /// Whether the server sent a `feedback` object (as opposed to an expectation or an issue
    /// reference): only feedback assessments are votes.
    pub is_feedback: bool,
    /// The whole `expectation` object, for expectation assessments.
    pub expectation: Option<serde_json::Value>,
    /// `None` when absent or empty (see [`AssessmentUpdate`]).
    pub rationale: Option<String>,
    pub metadata: BTreeMap<String, String>,
    /// `false` once another assessment overrides this one.
    pub valid: Option<bool>,
    /// The id of the assessment this one overrides.
    pub overrides: Option<String>,
    pub span_id: Option<String>,
    /// RFC 3339 timestamps as the server wrote them.
    pub create_time: Option<String>,
    pub last_update_time: Option<String>,
}

impl Assessment {
    /// The value as a vote value, when it is one (bool, number or string).
    pub fn feedback_value(&self) -> Option<FeedbackValue> {
        self.value.as_ref().and_then(FeedbackValue::from_json)
    }
}

/// A trace's info record (no spans).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TraceInfo {
    pub trace_id: String,
    pub client_request_id: Option<String>,
    /// `OK`, `ERROR` or `IN_PROGRESS`.
    pub state: Option<String>,
    pub request_time: Option<String>,
    /// `trace_metadata` (e.g. `mlflow.trace.user`, `mlflow.trace.session`).
    pub metadata: BTreeMap<String, String>,
    pub tags: BTreeMap<String, String>,
    pub assessments: Vec<Assessment>,
}
