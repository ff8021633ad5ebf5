//! Typed client for the MLflow 3 tracking server's REST API: the assessment calls the delivery
//! worker makes (create / update / delete / get), trace info, trace search by client request
//! id, label schemas (`label_schemas.rs`), and (`datasets`) evaluation datasets, review queues and whole traces. Open-source `mlflow server` and Databricks speak the same API; CONTRACT §5 lists what was
//! verified against a real server.
//!
//! Every call:
//! - validates its inputs locally first ([`validate`]): the open-source server silently drops or
//!   rewrites bad fields instead of rejecting them;
//! - builds its own request from scratch: the `Host` header comes from the tracking URI (hyper
//!   adds it), and there is never an `Origin` (open-source MLflow answers 403 to a mutating
//!   request with a foreign Origin, and to a foreign Host);
//! - percent-encodes ids in paths (`trace:/catalog.schema/hex` contains `/` and `:`);
//! - is bounded in time (credential + exchange within the configured timeout) and in size (the
//!   response is read under a per-operation cap);
//! - records `mlflow_request_duration_seconds{operation}` and, on failure,
//!   `mlflow_errors{operation,status}` (status 0: no HTTP answer);
//! - turns any failure into one [`MlflowError`] whose kind tells the caller what to do next.
//!
//! What it deliberately does not do: retry, back off or queue (the delivery worker owns that,
//! with the vote's durable state), log errors (the caller logs once, where the error ends), or
//! decide what an assessment should contain (the feedback module).

pub mod datasets;
mod error;
mod label_schemas;
mod types;
pub mod validate;
mod wire;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, USER_AGENT};
use http::{Method, Request};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde::de::DeserializeOwned;
use url::Url;

pub use error::{
    MlflowError, MlflowErrorKind, SHORT_MAX_CHARS, TOKEN_REJECTED, TOKEN_UNAVAILABLE,
    parse_retry_after,
};
pub use types::{Assessment, AssessmentUpdate, NewAssessment, NewExpectation, TraceInfo};
pub use wire::UPDATE_MASK;

use crate::auth::TokenSource;
use crate::body::{APPLICATION_JSON, Body};
use crate::client::HttpClient;
use crate::domain::FeedbackValue;
use crate::metrics::{Metrics, OperationLabel, OperationStatus};

/// Everything but RFC 3986 unreserved characters is escaped in a path segment.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

const USER_AGENT_VALUE: &str = concat!("feedback-proxy/", env!("CARGO_PKG_VERSION"));

/// The calls, for metric labels and response caps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    CreateAssessment,
    UpdateAssessment,
    DeleteAssessment,
    GetAssessment,
    GetTraceInfo,
    SearchTraces,
    GetLabelSchema,
    CreateLabelSchema,
    UpdateLabelSchema,
    GetTrace,
    SearchDatasets,
    CreateDataset,
    GetDatasetRecords,
    UpsertDatasetRecords,
    GetReviewQueue,
    CreateReviewQueue,
    AddReviewQueueItems,
    ListReviewQueueItems,
}

impl Op {
    fn label(self) -> &'static str {
        match self {
            Self::CreateAssessment => "create_assessment",
            Self::UpdateAssessment => "update_assessment",
            Self::DeleteAssessment => "delete_assessment",
            Self::GetAssessment => "get_assessment",
            Self::GetTraceInfo => "get_trace_info",
            Self::SearchTraces => "search_traces",
            Self::GetLabelSchema => "get_label_schema",
            Self::CreateLabelSchema => "create_label_schema",
            Self::UpdateLabelSchema => "update_label_schema",
            Self::GetTrace => "get_trace",
            Self::SearchDatasets => "search_datasets",
            Self::CreateDataset => "create_dataset",
            Self::GetDatasetRecords => "get_dataset_records",
            Self::UpsertDatasetRecords => "upsert_dataset_records",
            Self::GetReviewQueue => "get_review_queue",
            Self::CreateReviewQueue => "create_review_queue",
            Self::AddReviewQueueItems => "add_review_queue_items",
            Self::ListReviewQueueItems => "list_review_queue_items",
        }
    }

    /// Largest response read. One assessment is well under 100 KiB even at our field caps; a
    /// trace info carries every assessment on the trace plus request/response previews.
    fn response_limit(self) -> usize {
        match self {
            Self::GetTraceInfo | Self::SearchTraces => 8 << 20,
            // A whole trace (every span's inputs and outputs) and a page of 1000 records.
            Self::GetTrace | Self::GetDatasetRecords => 64 << 20,
            _ => 1 << 20,
        }
    }
}

/// The MLflow REST client. Cheap to clone (the HTTP pool and token source are shared).
#[derive(Clone)]
pub struct MlflowClient {
    /// The tracking URI without a trailing slash, query, fragment or credentials; API paths are
    /// appended to it (so a base path such as `https://host/mlflow` is kept).
    base: String,
    http: HttpClient,
    token: TokenSource,
    timeout: Duration,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for MlflowClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MlflowClient")
            .field("base", &self.base)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl MlflowClient {
    /// `base` is the tracking server (config has already turned `"databricks"` into the
    /// workspace URL). Credentials embedded in it are dropped: they belong in `token`.
    pub fn new(
        mut base: Url,
        http: HttpClient,
        token: TokenSource,
        timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        let _ = base.set_username("");
        let _ = base.set_password(None);
        base.set_query(None);
        base.set_fragment(None);
        let base = base.as_str().trim_end_matches('/').to_owned();
        Self {
            base,
            http,
            token,
            timeout,
            metrics,
        }
    }

    /// The tracking server this client talks to (for logs and status pages).
    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// Creates a HUMAN feedback assessment on `trace_id`.
    ///
    /// With a client-chosen `assessment_id` that already exists, open-source MLflow answers 500
    /// "… constraint violation": that (and a 409 / `RESOURCE_ALREADY_EXISTS`) is returned as
    /// [`MlflowErrorKind::AlreadyExists`].
    pub async fn create_assessment(
        &self,
        trace_id: &str,
        a: &NewAssessment,
    ) -> Result<Assessment, MlflowError> {
        validate::path_id("trace id", trace_id)?;
        validate::name(&a.name)?;
        validate::source_id(&a.source_id)?;
        if let Some(id) = &a.assessment_id {
            validate::assessment_id(id)?;
        }
        validate::value(&a.value)?;
        validate::rationale(a.rationale.as_deref())?;
        validate::metadata(&a.metadata)?;
        let path = format!("/api/3.0/mlflow/traces/{}/assessments", seg(trace_id));
        let body = wire::create_body(trace_id, a);
        let res = self
            .call(Op::CreateAssessment, Method::POST, &path, Some(&body))
            .await;
        let bytes = match res {
            Err(mut e) if a.assessment_id.is_some() && is_constraint_violation(&e) => {
                e.kind = MlflowErrorKind::AlreadyExists;
                return Err(e);
            }
            other => other?,
        };
        decode::<wire::AssessmentEnvelope>(&bytes).map(|e| e.assessment.into())
    }

    /// Creates a HUMAN expectation assessment on `trace_id` (a correction). A client-chosen id
    /// that exists already is [`MlflowErrorKind::AlreadyExists`], as for
    /// [`MlflowClient::create_assessment`].
    pub async fn create_expectation(
        &self,
        trace_id: &str,
        a: &NewExpectation,
    ) -> Result<Assessment, MlflowError> {
        validate::path_id("trace id", trace_id)?;
        validate::name(&a.name)?;
        validate::source_id(&a.source_id)?;
        if let Some(id) = &a.assessment_id {
            validate::assessment_id(id)?;
        }
        validate::value(&FeedbackValue::String(a.value.clone()))?;
        validate::metadata(&a.metadata)?;
        let path = format!("/api/3.0/mlflow/traces/{}/assessments", seg(trace_id));
        let body = wire::expectation_create_body(trace_id, a);
        let res = self
            .call(Op::CreateAssessment, Method::POST, &path, Some(&body))
            .await;
        let bytes = match res {
            Err(mut e) if a.assessment_id.is_some() && is_constraint_violation(&e) => {
                e.kind = MlflowErrorKind::AlreadyExists;
                return Err(e);
            }
            other => other?,
        };
        decode::<wire::AssessmentEnvelope>(&bytes).map(|e| e.assessment.into())
    }

    /// Replaces the value of an expectation assessment (`update_mask` `expectation`).
    pub async fn update_expectation(
        &self,
        trace_id: &str,
        assessment_id: &str,
        value: &str,
    ) -> Result<Assessment, MlflowError> {
        validate::path_id("trace id", trace_id)?;
        validate::path_id("assessment id", assessment_id)?;
        validate::value(&FeedbackValue::String(value.to_owned()))?;
        let path = assessment_path(trace_id, assessment_id);
        let body = wire::expectation_update_body(value);
        let bytes = self
            .call(Op::UpdateAssessment, Method::PATCH, &path, Some(&body))
            .await?;
        decode::<wire::AssessmentEnvelope>(&bytes).map(|e| e.assessment.into())
    }

    /// Replaces the value and rationale of an assessment (see [`AssessmentUpdate`] for what
    /// `rationale: None` does).
    pub async fn update_assessment(
        &self,
        trace_id: &str,
        assessment_id: &str,
        u: &AssessmentUpdate,
    ) -> Result<Assessment, MlflowError> {
        validate::path_id("trace id", trace_id)?;
        validate::path_id("assessment id", assessment_id)?;
        validate::value(&u.value)?;
        validate::rationale(u.rationale.as_deref())?;
        let path = assessment_path(trace_id, assessment_id);
        let body = wire::update_body(u);
        let bytes = self
            .call(Op::UpdateAssessment, Method::PATCH, &path, Some(&body))
            .await?;
        decode::<wire::AssessmentEnvelope>(&bytes).map(|e| e.assessment.into())
    }

    /// Deletes an assessment. Idempotent: the server answers 200 `{}` whether or not it existed
    /// (even for an unknown trace).
    pub async fn delete_assessment(
        &self,
        trace_id: &str,
        assessment_id: &str,
    ) -> Result<(), MlflowError> {
        validate::path_id("trace id", trace_id)?;
        validate::path_id("assessment id", assessment_id)?;
        let path = assessment_path(trace_id, assessment_id);
        self.call(Op::DeleteAssessment, Method::DELETE, &path, None)
            .await
            .map(drop)
    }

    pub async fn get_assessment(
        &self,
        trace_id: &str,
        assessment_id: &str,
    ) -> Result<Assessment, MlflowError> {
        validate::path_id("trace id", trace_id)?;
        validate::path_id("assessment id", assessment_id)?;
        let path = assessment_path(trace_id, assessment_id);
        let bytes = self
            .call(Op::GetAssessment, Method::GET, &path, None)
            .await?;
        decode::<wire::AssessmentEnvelope>(&bytes).map(|e| e.assessment.into())
    }

    /// `GET /api/3.0/mlflow/traces/{id}`: the trace's info, including its assessments.
    /// [`MlflowErrorKind::NotFound`] for an unknown trace, and for one not flushed yet.
    pub async fn get_trace_info(&self, trace_id: &str) -> Result<TraceInfo, MlflowError> {
        validate::path_id("trace id", trace_id)?;
        let path = format!("/api/3.0/mlflow/traces/{}", seg(trace_id));
        let bytes = self
            .call(Op::GetTraceInfo, Method::GET, &path, None)
            .await?;
        decode::<wire::TraceEnvelope>(&bytes).map(|e| e.trace.trace_info.into())
    }

    /// The id of the (newest) trace in `experiment_id` whose client request id is
    /// `client_request_id`, or `None`. A trace not flushed yet is not found either.
    pub async fn find_trace_by_client_request_id(
        &self,
        experiment_id: &str,
        client_request_id: &str,
    ) -> Result<Option<String>, MlflowError> {
        Ok(self
            .search_trace_by_client_request_id(experiment_id, client_request_id)
            .await?
            .map(|t| t.trace_id))
    }

    /// Like [`MlflowClient::find_trace_by_client_request_id`], with the trace's info as the
    /// search returns it (its metadata names the trace's user, `mlflow.trace.user`).
    pub async fn search_trace_by_client_request_id(
        &self,
        experiment_id: &str,
        client_request_id: &str,
    ) -> Result<Option<TraceInfo>, MlflowError> {
        validate::experiment_id(experiment_id)?;
        let literal = validate::filter_literal(client_request_id)?;
        let filter = format!("attributes.client_request_id = {literal}");
        let body = wire::search_body(experiment_id, &filter);
        let bytes = self
            .call(
                Op::SearchTraces,
                Method::POST,
                "/api/3.0/mlflow/traces/search",
                Some(&body),
            )
            .await?;
        let found = decode::<wire::SearchResponse>(&bytes)?
            .traces
            .into_iter()
            .next();
        Ok(found.and_then(|t| match t.client_request_id.as_deref() {
            // A server that ignored the filter would hand us some other trace: linking a vote
            // to it would be worse than not finding one.
            Some(c) if c != client_request_id => {
                tracing::warn!(
                    trace_id = %t.trace_id,
                    "trace search returned a trace with another client request id; ignoring it"
                );
                None
            }
            _ => Some(t.into()),
        }))
    }

    /// One exchange: credential, request, bounded response, metrics. Returns the body of a
    /// success answer.
    async fn call(
        &self,
        op: Op,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<Bytes, MlflowError> {
        let started = Instant::now();
        let result =
            match tokio::time::timeout(self.timeout, self.exchange(op, method, path, body)).await {
                Ok(r) => r,
                Err(_) => Err(MlflowError::from_exchange(
                    &crate::client::ExchangeError::Timeout(self.timeout),
                )),
            };
        let operation = op.label();
        self.metrics
            .mlflow_request_duration
            .get_or_create(&OperationLabel { operation })
            .observe(started.elapsed().as_secs_f64());
        if let Err(e) = &result {
            self.metrics
                .mlflow_errors
                .get_or_create(&OperationStatus {
                    operation,
                    status: e.status.unwrap_or(0),
                })
                .inc();
        }
        tracing::debug!(
            operation,
            elapsed_ms = started.elapsed().as_millis() as u64,
            status = result.as_ref().err().and_then(|e| e.status),
            ok = result.is_ok(),
            "mlflow call"
        );
        result
    }

    async fn exchange(
        &self,
        op: Op,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<Bytes, MlflowError> {
        let auth = self
            .token
            .authorization()
            .await
            .map_err(|e| MlflowError::from_auth(&e))?;
        let req = build_request(&self.base, method, path, body, auth)?;
        let (parts, bytes) = self
            .http
            .exchange(req, self.timeout, op.response_limit())
            .await
            .map_err(|e| MlflowError::from_exchange(&e))?;
        if parts.status.is_success() {
            Ok(bytes)
        } else {
            Err(MlflowError::from_response(
                parts.status,
                &parts.headers,
                &bytes,
            ))
        }
    }
}

/// The request for one call. Deliberately sets no `Host` (hyper derives it from the URI, so it
/// is always the tracking server's own) and no `Origin`.
fn build_request(
    base: &str,
    method: Method,
    path: &str,
    body: Option<&serde_json::Value>,
    authorization: Option<http::HeaderValue>,
) -> Result<Request<Body>, MlflowError> {
    let uri = format!("{base}{path}");
    let mut builder = Request::builder()
        .method(method)
        .uri(&uri)
        .header(ACCEPT, APPLICATION_JSON)
        .header(USER_AGENT, USER_AGENT_VALUE);
    if let Some(a) = authorization {
        builder = builder.header(AUTHORIZATION, a);
    }
    let body = match body {
        Some(v) => {
            builder = builder.header(CONTENT_TYPE, APPLICATION_JSON);
            // Serializing a `Value` cannot fail; an empty body would be rejected by the server.
            Body::full(serde_json::to_vec(v).unwrap_or_default())
        }
        None => Body::Empty,
    };
    builder
        .body(body)
        .map_err(|e| MlflowError::invalid(format!("cannot build a request for {path}: {e}")))
}

fn seg(id: &str) -> String {
    utf8_percent_encode(id, SEGMENT).to_string()
}

fn assessment_path(trace_id: &str, assessment_id: &str) -> String {
    format!(
        "/api/3.0/mlflow/traces/{}/assessments/{}",
        seg(trace_id),
        seg(assessment_id)
    )
}

/// Open-source MLflow's answer to a create with a taken assessment id (sample 07).
fn is_constraint_violation(e: &MlflowError) -> bool {
    e.kind == MlflowErrorKind::Server
        && e.status == Some(500)
        && e.message.contains("constraint violation")
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, MlflowError> {
    serde_json::from_slice(bytes).map_err(|e| {
        MlflowError::new(
            MlflowErrorKind::Decode,
            format!("unexpected response from MLflow: {e}"),
        )
    })
}

#[cfg(test)]
mod tests;
