//! Request building, path encoding and response decoding, checked against the captures from a
//! real MLflow 3.17.2 (`tests/fixtures/samples`). Failure classification is tested in
//! `error.rs`; the client against real and fake servers in `tests/mlflow.rs`.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::*;
use crate::domain::FeedbackValue;

fn sample(name: &str) -> Value {
    let path = format!(
        "{}/tests/fixtures/samples/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path).expect("sample present");
    serde_json::from_str(&text).expect("sample is JSON")
}

fn new_assessment() -> NewAssessment {
    NewAssessment {
        assessment_id: None,
        name: "user_feedback".into(),
        source_id: "bob@example.com".into(),
        value: FeedbackValue::Bool(true),
        rationale: Some("Looks right".into()),
        metadata: BTreeMap::new(),
    }
}

#[test]
fn create_body_is_the_wrapped_shape_the_server_accepted() {
    let s = sample("02_create_assessment_wrapped.json");
    let body = wire::create_body("tr-9e6c1d9c60351da42d1ce2d10dd2afdd", &new_assessment());
    assert_eq!(body, s["request_body"]);
}

#[test]
fn create_body_with_client_id_and_string_value() {
    let s = sample("06_create_with_client_assessment_id.json");
    let a = NewAssessment {
        assessment_id: Some("a-proxy-req-abc123-1".into()),
        name: "user_feedback".into(),
        source_id: "carol".into(),
        value: FeedbackValue::String("thumbs_up".into()),
        rationale: None,
        metadata: BTreeMap::new(),
    };
    let mut body = wire::create_body("tr-9e6c1d9c60351da42d1ce2d10dd2afdd", &a);
    // The capture omitted the (optional, path-duplicated) trace id; everything else is equal.
    assert_eq!(
        body["assessment"]
            .as_object_mut()
            .and_then(|o| o.remove("trace_id")),
        Some(json!("tr-9e6c1d9c60351da42d1ce2d10dd2afdd"))
    );
    assert_eq!(body, s["request_body"]);
}

#[test]
fn create_body_numbers_and_metadata() {
    let mut a = new_assessment();
    a.name = "rating".into();
    a.value = FeedbackValue::Number(4.5);
    a.rationale = None;
    a.metadata.insert("proxy.message_id".into(), "m-1".into());
    let body = wire::create_body("tr-1", &a);
    assert_eq!(body["assessment"]["feedback"], json!({"value": 4.5}));
    assert_eq!(
        body["assessment"]["metadata"],
        json!({"proxy.message_id": "m-1"})
    );
    assert!(body["assessment"].get("rationale").is_none());
    assert!(body["assessment"].get("assessment_id").is_none());
    // A whole number is sent as a double, as the server will return it anyway.
    a.value = FeedbackValue::Number(4.0);
    let text = serde_json::to_string(&wire::create_body("tr-1", &a)).expect("json");
    assert!(text.contains(r#""value":4.0"#), "{text}");
}

#[test]
fn update_body_uses_the_camel_case_mask() {
    let s = sample("31_patch_with_mask.json");
    let body = wire::update_body(&AssessmentUpdate {
        value: FeedbackValue::Bool(false),
        rationale: Some("changed my mind".into()),
    });
    assert_eq!(body, s["request_body"]);
    // Clearing: the mask still names rationale, the field is absent.
    let body = wire::update_body(&AssessmentUpdate {
        value: FeedbackValue::Bool(true),
        rationale: None,
    });
    assert_eq!(
        body,
        json!({"assessment": {"feedback": {"value": true}}, "update_mask": "feedback,rationale"})
    );
}

#[test]
fn search_body_matches_the_capture_but_asks_for_one() {
    let s = sample("50_search_attributes_client_request_id.json");
    let mut expected = s["request_body"].clone();
    expected["max_results"] = json!(1);
    let filter = format!(
        "attributes.client_request_id = {}",
        validate::filter_literal("req-abc123").expect("valid")
    );
    assert_eq!(wire::search_body("1", &filter), expected);
}

#[test]
fn decodes_a_created_assessment() {
    let s = sample("02_create_assessment_wrapped.json");
    let env: wire::AssessmentEnvelope =
        decode(&serde_json::to_vec(&s["response_body"]).expect("json")).expect("decodes");
    let a: Assessment = env.assessment.into();
    assert_eq!(a.assessment_id, "a-c69db0de65a747e5955efeacadc85f35");
    assert_eq!(a.name, "user_feedback");
    assert_eq!(a.trace_id, "tr-9e6c1d9c60351da42d1ce2d10dd2afdd");
    assert_eq!(a.source_type, "HUMAN");
    assert_eq!(a.source_id, "bob@example.com");
    assert_eq!(a.value, Some(json!(true)));
    assert_eq!(a.feedback_value(), Some(FeedbackValue::Bool(true)));
    assert_eq!(a.rationale.as_deref(), Some("Looks right"));
    assert_eq!(a.valid, Some(true));
    assert_eq!(a.overrides, None);
    assert!(a.is_feedback);
    assert_eq!(a.create_time.as_deref(), Some("2026-11-23T02:32:37.005Z"));
}

#[test]
fn decodes_trace_search_with_every_assessment_shape() {
    let s = sample("50_search_attributes_client_request_id.json");
    let r: wire::SearchResponse =
        decode(&serde_json::to_vec(&s["response_body"]).expect("json")).expect("decodes");
    let t: TraceInfo = r.traces.into_iter().next().expect("one trace").into();
    assert_eq!(t.trace_id, "tr-9e6c1d9c60351da42d1ce2d10dd2afdd");
    assert_eq!(t.client_request_id.as_deref(), Some("req-abc123"));
    assert_eq!(t.state.as_deref(), Some("OK"));
    assert_eq!(
        t.metadata.get("app.user").map(String::as_str),
        Some("alice@example.com")
    );
    assert_eq!(t.assessments.len(), 14);
    let by_name = |n: &str| {
        t.assessments
            .iter()
            .find(|a| a.name == n)
            .unwrap_or_else(|| panic!("assessment {n}"))
    };
    assert_eq!(
        by_name("mismatch").feedback_value(),
        Some(FeedbackValue::Number(1.0))
    );
    assert_eq!(
        by_name("structured").feedback_value(),
        None,
        "an object is not a vote value"
    );
    let judge = by_name("judge");
    assert_eq!(judge.value, None);
    assert_eq!(
        judge.error.as_ref().and_then(|e| e["error_code"].as_str()),
        Some("RATE_LIMIT")
    );
    assert_eq!(by_name("nullval").value, None);
    let nosrc = by_name("nosrc");
    assert_eq!(nosrc.source_type, "SOURCE_TYPE_UNSPECIFIED");
    assert_eq!(nosrc.source_id, "");
    assert_eq!(
        t.assessments[0]
            .metadata
            .get("proxy.request_id")
            .map(String::as_str),
        Some("req-abc123")
    );
}

#[test]
fn an_empty_search_answer_is_no_traces() {
    let r: wire::SearchResponse = decode(b"{}").expect("decodes");
    assert!(r.traces.is_empty());
}

#[test]
fn decode_errors_are_decode() {
    let e = decode::<wire::AssessmentEnvelope>(b"{\"assessment\": {}}").expect_err("no id");
    assert_eq!(e.kind, MlflowErrorKind::Decode);
    assert!(
        e.short()
            .starts_with("decode: unexpected response from MLflow")
    );
}

#[test]
fn an_empty_rationale_reads_as_none() {
    let a: Assessment = decode::<wire::AssessmentEnvelope>(
        br#"{"assessment": {"assessment_id": "a-1", "rationale": "", "feedback": {"value": false}}}"#,
    )
    .expect("decodes")
    .assessment
    .into();
    assert_eq!(a.rationale, None);
    assert_eq!(a.feedback_value(), Some(FeedbackValue::Bool(false)));
}

#[test]
fn ids_are_percent_encoded_as_single_segments() {
    assert_eq!(
        seg("tr-9e6c1d9c60351da42d1ce2d10dd2afdd"),
        "tr-9e6c1d9c60351da42d1ce2d10dd2afdd"
    );
    assert_eq!(
        seg("trace:/main.agents/0af7651916cd43dd8448eb211c80319c"),
        "trace%3A%2Fmain.agents%2F0af7651916cd43dd8448eb211c80319c"
    );
    assert_eq!(seg("a b?c#d%e"), "a%20b%3Fc%23d%25e");
    assert_eq!(seg("é"), "%C3%A9");
    assert_eq!(
        assessment_path("trace:/c.s/x", "a-1"),
        "/api/3.0/mlflow/traces/trace%3A%2Fc.s%2Fx/assessments/a-1"
    );
}

#[test]
fn requests_carry_json_headers_and_never_host_or_origin() {
    let body = json!({"x": 1});
    let auth = http::HeaderValue::from_static("Bearer t0k");
    let req = build_request(
        "https://adb-1.azuredatabricks.net/prefix",
        Method::POST,
        "/api/3.0/mlflow/traces/search",
        Some(&body),
        Some(auth),
    )
    .expect("builds");
    assert_eq!(
        req.uri().to_string(),
        "https://adb-1.azuredatabricks.net/prefix/api/3.0/mlflow/traces/search"
    );
    let h = req.headers();
    assert_eq!(h[CONTENT_TYPE], "application/json");
    assert_eq!(h[ACCEPT], "application/json");
    assert_eq!(h[AUTHORIZATION], "Bearer t0k");
    assert!(h.get(http::header::ORIGIN).is_none());
    // hyper adds Host from the URI; we never copy one from anywhere else.
    assert!(h.get(http::header::HOST).is_none());

    let req =
        build_request("http://127.0.0.1:5055", Method::DELETE, "/x", None, None).expect("builds");
    assert!(req.headers().get(CONTENT_TYPE).is_none());
    assert!(req.headers().get(AUTHORIZATION).is_none());
}

#[test]
fn base_urls_are_normalised() {
    let c = |u: &str| {
        MlflowClient::new(
            Url::parse(u).expect("url"),
            HttpClient::new(&crate::client::ClientOptions::default()),
            TokenSource::None,
            Duration::from_secs(1),
            Arc::new(Metrics::new()),
        )
    };
    assert_eq!(
        c("http://127.0.0.1:5055").base_url(),
        "http://127.0.0.1:5055"
    );
    assert_eq!(
        c("http://127.0.0.1:5055/").base_url(),
        "http://127.0.0.1:5055"
    );
    assert_eq!(
        c("https://user:secret@host.example/mlflow/?x=1#f").base_url(),
        "https://host.example/mlflow"
    );
    assert!(!format!("{:?}", c("https://u:secret@h/")).contains("secret"));
}

#[tokio::test]
async fn invalid_input_fails_before_any_request() {
    // Port 9 (discard) on loopback: nothing should ever be sent there.
    let metrics = Arc::new(Metrics::new());
    let client = MlflowClient::new(
        Url::parse("http://127.0.0.1:9").expect("url"),
        HttpClient::new(&crate::client::ClientOptions::default()),
        TokenSource::None,
        Duration::from_secs(1),
        metrics.clone(),
    );
    let mut a = new_assessment();
    a.name = String::new();
    let e = client
        .create_assessment("tr-1", &a)
        .await
        .expect_err("invalid");
    assert_eq!(e.kind, MlflowErrorKind::Invalid);
    let mut a = new_assessment();
    a.assessment_id = Some("x".repeat(51));
    let e = client
        .create_assessment("tr-1", &a)
        .await
        .expect_err("invalid");
    assert_eq!(e.kind, MlflowErrorKind::Invalid);
    let e = client
        .update_assessment(
            "",
            "a-1",
            &AssessmentUpdate {
                value: FeedbackValue::Number(f64::NAN),
                rationale: None,
            },
        )
        .await
        .expect_err("invalid");
    assert_eq!(e.kind, MlflowErrorKind::Invalid);
    let e = client
        .find_trace_by_client_request_id("1", "a'b\"c")
        .await
        .expect_err("invalid");
    assert_eq!(e.kind, MlflowErrorKind::Invalid);
    // No call was made, so nothing was measured.
    assert!(
        !metrics
            .encode()
            .contains("mlflow_request_duration_seconds_count")
    );
}
