//! A fast, stateless stand-in for the MLflow 3 assessment API, so that scenario 5b measures the
//! proxy's delivery path rather than a Python server.
//!
//! Answers, in the shapes the real server sends (see `tests/fixtures/samples`):
//! - `GET  /api/3.0/mlflow/traces/{id}`: the trace info, with no assessments;
//! - `POST /api/3.0/mlflow/traces/{id}/assessments`: the assessment as sent, with an id;
//! - `PATCH /api/3.0/mlflow/traces/{id}/assessments/{aid}`: the updated assessment;
//! - `DELETE …/assessments/{aid}`: `{}`; `POST /api/3.0/mlflow/traces/search`: no traces.
//!
//! It remembers nothing: every trace exists and has no assessments until one is created.

use std::sync::atomic::{AtomicU64, Ordering};

use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde_json::{Value, json};

use crate::serve::{BenchBody, full};

const PREFIX: &str = "/api/3.0/mlflow/traces/";
const MAX_REQUEST: usize = 1 << 20;
const NOW: &str = "2026-11-23T02:32:37.005Z";

static IDS: AtomicU64 = AtomicU64::new(1);

pub async fn handle(req: Request<Incoming>) -> Response<BenchBody> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let body = match Limited::new(req.into_body(), MAX_REQUEST).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return error(StatusCode::BAD_REQUEST, "request body unreadable"),
    };
    let parsed: Value = if body.is_empty() {
        Value::Null
    } else {
        match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(_) => return error(StatusCode::BAD_REQUEST, "request body is not JSON"),
        }
    };
    let Some(rest) = path.strip_prefix(PREFIX) else {
        return error(StatusCode::NOT_FOUND, "no such endpoint");
    };
    let parts: Vec<&str> = rest.split('/').collect();
    match (&method, parts.as_slice()) {
        (&Method::POST, ["search"]) => ok(json!({ "traces": [] })),
        (&Method::GET, [trace_id]) => ok(json!({
            "trace": { "trace_info": {
                "trace_id": trace_id, "state": "OK", "assessments": [],
                "request_time": NOW,
            }}
        })),
        (&Method::POST, [trace_id, "assessments"]) => {
            let mut a = parsed.get("assessment").cloned().unwrap_or(Value::Null);
            let Some(obj) = a.as_object_mut() else {
                return error(StatusCode::BAD_REQUEST, "missing assessment");
            };
            if !obj.contains_key("assessment_id") {
                let id = format!("a-{:032x}", IDS.fetch_add(1, Ordering::Relaxed));
                obj.insert("assessment_id".into(), json!(id));
            }
            obj.insert("trace_id".into(), json!(trace_id));
            obj.insert("create_time".into(), json!(NOW));
            obj.insert("last_update_time".into(), json!(NOW));
            obj.insert("valid".into(), json!(true));
            ok(json!({ "assessment": a }))
        }
        (&Method::PATCH, [trace_id, "assessments", aid]) => {
            let feedback = parsed
                .pointer("/assessment/feedback")
                .cloned()
                .unwrap_or(json!({ "value": null }));
            let rationale = parsed
                .pointer("/assessment/rationale")
                .cloned()
                .unwrap_or(json!(""));
            ok(json!({ "assessment": {
                "assessment_id": aid, "assessment_name": "user_feedback", "trace_id": trace_id,
                "source": { "source_type": "HUMAN", "source_id": "" },
                "create_time": NOW, "last_update_time": NOW,
                "feedback": feedback, "rationale": rationale, "valid": true,
            }}))
        }
        (&Method::GET, [trace_id, "assessments", aid]) => ok(json!({ "assessment": {
            "assessment_id": aid, "assessment_name": "user_feedback", "trace_id": trace_id,
            "feedback": { "value": true }, "valid": true,
        }})),
        (&Method::DELETE, [_, "assessments", _]) => ok(json!({})),
        _ => error(StatusCode::NOT_FOUND, "no such endpoint"),
    }
}

fn ok(v: Value) -> Response<BenchBody> {
    respond(StatusCode::OK, &v)
}

fn error(status: StatusCode, message: &str) -> Response<BenchBody> {
    respond(
        status,
        &json!({ "error_code": "BAD_REQUEST", "message": message }),
    )
}

fn respond(status: StatusCode, v: &Value) -> Response<BenchBody> {
    let mut res = Response::new(full(v.to_string()));
    *res.status_mut() = status;
    res.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    res
}
