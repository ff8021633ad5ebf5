//! MLflow REST client. PLACEHOLDER with the agreed interface; the real client is being written
//! in its own change and replaces this file. Every call fails with `Connect`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use url::Url;

use crate::auth::TokenSource;
use crate::client::HttpClient;
use crate::metrics::Metrics;
use crate::store::FeedbackValue;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MlflowErrorKind {
    NotFound,
    AlreadyExists,
    RateLimited { retry_after: Option<Duration> },
    Server,
    Client,
    Timeout,
    Connect,
    Auth,
    Invalid,
    Decode,
}

#[derive(Debug, Clone)]
pub struct MlflowError {
    pub kind: MlflowErrorKind,
    pub status: Option<u16>,
    pub error_code: Option<String>,
    pub message: String,
}

impl MlflowError {
    pub fn is_retryable(&self) -> bool {
        matches!(
            self.kind,
            MlflowErrorKind::RateLimited { .. }
                | MlflowErrorKind::Server
                | MlflowErrorKind::Timeout
                | MlflowErrorKind::Connect
                | MlflowErrorKind::Auth
        )
    }
    pub fn short(&self) -> String {
        self.message.clone()
    }
}

pub struct NewAssessment {
    pub assessment_id: Option<String>,
    pub name: String,
    pub source_id: String,
    pub value: FeedbackValue,
    pub rationale: Option<String>,
    pub metadata: BTreeMap<String, String>,
}

pub struct AssessmentUpdate {
    pub value: FeedbackValue,
    pub rationale: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Assessment {
    pub assessment_id: String,
    pub name: String,
    pub trace_id: String,
    pub source_type: String,
    pub source_id: String,
    pub value: Option<serde_json::Value>,
    pub rationale: Option<String>,
    pub valid: Option<bool>,
}

#[derive(Debug, Clone)]
pub struct TraceInfo {
    pub trace_id: String,
    pub client_request_id: Option<String>,
    pub state: Option<String>,
    pub assessments: Vec<Assessment>,
}

pub struct MlflowClient;

fn nope<T>() -> Result<T, MlflowError> {
    Err(MlflowError {
        kind: MlflowErrorKind::Connect,
        status: None,
        error_code: None,
        message: "MLflow client not implemented in this build".into(),
    })
}

impl MlflowClient {
    pub fn new(_: Url, _: HttpClient, _: TokenSource, _: Duration, _: Arc<Metrics>) -> Self {
        Self
    }
    pub async fn create_assessment(
        &self,
        _: &str,
        _: &NewAssessment,
    ) -> Result<Assessment, MlflowError> {
        nope()
    }
    pub async fn update_assessment(
        &self,
        _: &str,
        _: &str,
        _: &AssessmentUpdate,
    ) -> Result<Assessment, MlflowError> {
        nope()
    }
    pub async fn delete_assessment(&self, _: &str, _: &str) -> Result<(), MlflowError> {
        nope()
    }
    pub async fn get_assessment(&self, _: &str, _: &str) -> Result<Assessment, MlflowError> {
        nope()
    }
    pub async fn get_trace_info(&self, _: &str) -> Result<TraceInfo, MlflowError> {
        nope()
    }
    pub async fn find_trace_by_client_request_id(
        &self,
        _: &str,
        _: &str,
    ) -> Result<Option<String>, MlflowError> {
        nope()
    }
}
