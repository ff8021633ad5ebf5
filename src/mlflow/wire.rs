//! The JSON shapes of the MLflow 3 REST API, exactly as the server speaks them (CONTRACT §5,
//! samples 02–50), and their conversion to and from the client's domain types.
//!
//! Requests are built from `serde_json::json!` so that the shape is visible in one place per
//! call; responses are decoded leniently (every field optional except the ids we need), because
//! the server omits empty fields and Databricks adds its own.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{Value, json};

use super::types::{Assessment, AssessmentUpdate, NewAssessment, NewExpectation, TraceInfo};

/// `update_mask` for a vote change. The paths are camelCase: snake_case paths (or a
/// `{"paths": [...]}` object) are accepted with 200 and change nothing (CONTRACT §5.2).
pub const UPDATE_MASK: &str = "feedback,rationale";

/// `POST /api/3.0/mlflow/traces/{trace_id}/assessments` body: the `"assessment"` wrapper is
/// required (a flat body answers 400, sample 03).
pub fn create_body(trace_id: &str, a: &NewAssessment) -> Value {
    let mut assessment = json!({
        "trace_id": trace_id,
        "assessment_name": a.name,
        "source": {"source_type": "HUMAN", "source_id": a.source_id},
        "feedback": {"value": a.value.to_json()},
    });
    if let Some(id) = &a.assessment_id {
        assessment["assessment_id"] = json!(id);
    }
    if let Some(r) = &a.rationale {
        assessment["rationale"] = json!(r);
    }
    if !a.metadata.is_empty() {
        assessment["metadata"] = json!(a.metadata);
    }
    json!({ "assessment": assessment })
}

/// `update_mask` for a changed expectation. A feedback mask on an expectation answers 400
/// "Cannot update feedback value on an Expectation assessment" (verified on 3.17.2).
pub const EXPECTATION_UPDATE_MASK: &str = "expectation";

/// The create body of an expectation: like [`create_body`], with `expectation` instead of
/// `feedback` and no rationale.
pub fn expectation_create_body(trace_id: &str, a: &NewExpectation) -> Value {
    let mut assessment = json!({
        "trace_id": trace_id,
        "assessment_name": a.name,
        "source": {"source_type": "HUMAN", "source_id": a.source_id},
        "expectation": {"value": a.value},
    });
    if let Some(id) = &a.assessment_id {
        assessment["assessment_id"] = json!(id);
    }
    if !a.metadata.is_empty() {
        assessment["metadata"] = json!(a.metadata);
    }
    json!({ "assessment": assessment })
}

/// The PATCH body that replaces an expectation's value.
pub fn expectation_update_body(value: &str) -> Value {
    json!({
        "assessment": {"expectation": {"value": value}},
        "update_mask": EXPECTATION_UPDATE_MASK,
    })
}

/// `PATCH …/assessments/{id}` body. A `None` rationale is sent as an absent field under a mask
/// that names `rationale`: the server then stores an empty rationale, which is as close to
/// "cleared" as the API gets (it cannot be made null again; see [`AssessmentUpdate`]).
pub fn update_body(u: &AssessmentUpdate) -> Value {
    let mut assessment = json!({ "feedback": {"value": u.value.to_json()} });
    if let Some(r) = &u.rationale {
        assessment["rationale"] = json!(r);
    }
    json!({ "assessment": assessment, "update_mask": UPDATE_MASK })
}

/// `POST /api/3.0/mlflow/traces/search` body for one trace by client request id.
pub fn search_body(experiment_id: &str, filter: &str) -> Value {
    json!({
        "locations": [{"type": "MLFLOW_EXPERIMENT", "mlflow_experiment": {"experiment_id": experiment_id}}],
        "filter": filter,
        "max_results": 1,
    })
}

#[derive(Debug, Deserialize)]
pub struct AssessmentEnvelope {
    pub assessment: WireAssessment,
}

#[derive(Debug, Deserialize)]
pub struct TraceEnvelope {
    pub trace: TraceBody,
}

#[derive(Debug, Deserialize)]
pub struct TraceBody {
    pub trace_info: WireTraceInfo,
}

#[derive(Debug, Deserialize)]
pub struct SearchResponse {
    /// Absent (the answer is `{}`) when nothing matches.
    #[serde(default)]
    pub traces: Vec<WireTraceInfo>,
}

#[derive(Debug, Deserialize)]
pub struct WireSource {
    #[serde(default)]
    pub source_type: String,
    #[serde(default)]
    pub source_id: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct WireFeedback {
    #[serde(default)]
    pub value: Option<Value>,
    #[serde(default)]
    pub error: Option<Value>,
}

#[derive(Debug, Deserialize)]
pub struct WireAssessment {
    pub assessment_id: String,
    #[serde(default)]
    pub assessment_name: String,
    #[serde(default)]
    pub trace_id: String,
    #[serde(default)]
    pub source: Option<WireSource>,
    #[serde(default)]
    pub create_time: Option<String>,
    #[serde(default)]
    pub last_update_time: Option<String>,
    #[serde(default)]
    pub feedback: Option<WireFeedback>,
    #[serde(default)]
    pub expectation: Option<Value>,
    #[serde(default)]
    pub rationale: Option<String>,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    #[serde(default)]
    pub overrides: Option<String>,
    #[serde(default)]
    pub valid: Option<bool>,
    #[serde(default)]
    pub span_id: Option<String>,
}

impl From<WireAssessment> for Assessment {
    fn from(w: WireAssessment) -> Self {
        let (source_type, source_id) = match w.source {
            Some(s) => (s.source_type, s.source_id.unwrap_or_default()),
            None => (String::new(), String::new()),
        };
        let is_feedback = w.feedback.is_some();
        let (value, error) = match w.feedback {
            // `"value": null` (an error-only feedback) is no value.
            Some(f) => (f.value.filter(|v| !v.is_null()), f.error),
            None => (None, None),
        };
        Self {
            assessment_id: w.assessment_id,
            name: w.assessment_name,
            trace_id: w.trace_id,
            source_type,
            source_id,
            value,
            error,
            is_feedback,
            expectation: w.expectation,
            // The server cannot null a rationale once set, only empty it (PATCH with the mask
            // and no text stores ""): both mean "no rationale".
            rationale: w.rationale.filter(|r| !r.is_empty()),
            metadata: w.metadata,
            valid: w.valid,
            overrides: w.overrides.filter(|o| !o.is_empty()),
            span_id: w.span_id.filter(|s| !s.is_empty()),
            create_time: w.create_time,
            last_update_time: w.last_update_time,
        }
    }
}

#[derive(Debug, Deserialize)]
pub struct WireTraceInfo {
    pub trace_id: String,
    #[serde(default)]
    pub client_request_id: Option<String>,
    #[serde(default)]
    pub state: Option<String>,
    #[serde(default)]
    pub request_time: Option<String>,
    #[serde(default)]
    pub trace_metadata: BTreeMap<String, String>,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    #[serde(default)]
    pub assessments: Vec<WireAssessment>,
}

impl From<WireTraceInfo> for TraceInfo {
    fn from(w: WireTraceInfo) -> Self {
        Self {
            trace_id: w.trace_id,
            client_request_id: w.client_request_id.filter(|c| !c.is_empty()),
            state: w.state,
            request_time: w.request_time,
            metadata: w.trace_metadata,
            tags: w.tags,
            assessments: w.assessments.into_iter().map(Assessment::from).collect(),
        }
    }
}
