//! Unit tests of the MLflow failure classification.

use super::*;
use http::HeaderValue;

fn sample_error(name: &str) -> (StatusCode, Vec<u8>) {
    let path = format!(
        "{}/tests/fixtures/samples/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path).expect("sample present");
    let v: serde_json::Value = serde_json::from_str(&text).expect("sample is JSON");
    let status =
        StatusCode::from_u16(v["status"].as_u64().expect("status") as u16).expect("valid status");
    let body = serde_json::to_vec(&v["response_body"]).expect("serializable");
    (status, body)
}

fn json_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h
}

#[test]
fn unknown_trace_is_not_found_and_short_names_it() {
    let (status, body) = sample_error("20_err_unknown_trace.json");
    let e = MlflowError::from_response(status, &json_headers(), &body);
    assert_eq!(e.kind, MlflowErrorKind::NotFound);
    assert_eq!(e.status, Some(404));
    assert_eq!(e.error_code.as_deref(), Some("RESOURCE_DOES_NOT_EXIST"));
    assert_eq!(
        e.short(),
        "404 RESOURCE_DOES_NOT_EXIST: Trace with ID 'tr-00000000000000000000000000000000' not found."
    );
    assert!(!e.is_retryable());
}

#[test]
fn unknown_assessment_is_not_found() {
    let (status, body) = sample_error("38_patch_unknown_assessment.json");
    let e = MlflowError::from_response(status, &json_headers(), &body);
    assert_eq!(e.kind, MlflowErrorKind::NotFound);
}

#[test]
fn bad_request_is_client_and_final() {
    for name in [
        "03_create_assessment_flat.json",
        "32_patch_without_mask.json",
    ] {
        let (status, body) = sample_error(name);
        let e = MlflowError::from_response(status, &json_headers(), &body);
        assert_eq!(e.kind, MlflowErrorKind::Client, "{name}");
        assert_eq!(e.error_code.as_deref(), Some("INVALID_PARAMETER_VALUE"));
        assert!(
            e.message
                .starts_with("Missing value for required parameter")
        );
        assert!(!e.is_retryable());
    }
}

#[test]
fn constraint_violation_is_a_retryable_server_error_without_context() {
    // Only create_assessment, which knows it sent a client id, turns this into
    // AlreadyExists.
    let (status, body) = sample_error("07_create_with_same_client_assessment_id.json");
    let e = MlflowError::from_response(status, &json_headers(), &body);
    assert_eq!(e.kind, MlflowErrorKind::Server);
    assert!(e.is_retryable());
    assert!(e.message.contains("constraint violation"));
}

#[test]
fn html_405_becomes_a_short_client_reason() {
    let body = b"<!doctype html>\n<html lang=en>\n<title>405 Method Not Allowed</title>\n<h1>Method Not Allowed</h1>\n<p>The method is not allowed for the requested URL.</p>\n";
    let mut h = HeaderMap::new();
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    let e = MlflowError::from_response(StatusCode::METHOD_NOT_ALLOWED, &h, body);
    assert_eq!(e.kind, MlflowErrorKind::Client);
    assert_eq!(e.error_code, None);
    assert_eq!(
        e.short(),
        "405: Method Not Allowed: The method is not allowed for the requested URL."
    );
}

#[test]
fn html_404_is_a_missing_endpoint_not_a_missing_trace() {
    let body = b"<!doctype html><title>404 Not Found</title><h1>Not Found</h1><p>The requested URL was not found on the server.</p>";
    let e = MlflowError::from_response(StatusCode::NOT_FOUND, &HeaderMap::new(), body);
    assert_eq!(e.kind, MlflowErrorKind::Client);
    let e = MlflowError::from_response(
        StatusCode::NOT_FOUND,
        &json_headers(),
        br#"{"error_code":"ENDPOINT_NOT_FOUND","message":"No API found for 'POST /x'"}"#,
    );
    assert_eq!(e.kind, MlflowErrorKind::Client);
    let e = MlflowError::from_response(
        StatusCode::NOT_FOUND,
        &json_headers(),
        br#"{"error_code":"NOT_FOUND","message":"Trace not found"}"#,
    );
    assert_eq!(e.kind, MlflowErrorKind::NotFound);
}

#[test]
fn plain_text_403_is_auth() {
    let e = MlflowError::from_response(
        StatusCode::FORBIDDEN,
        &HeaderMap::new(),
        b"Invalid Host header - possible DNS rebinding attack detected",
    );
    assert_eq!(e.kind, MlflowErrorKind::Auth);
    assert_eq!(
        e.short(),
        "403: Invalid Host header - possible DNS rebinding attack detected"
    );
    assert!(!e.is_retryable());
}

#[test]
fn rate_limits_carry_retry_after() {
    let mut h = json_headers();
    h.insert(RETRY_AFTER, HeaderValue::from_static("7"));
    let e = MlflowError::from_response(
        StatusCode::TOO_MANY_REQUESTS,
        &h,
        br#"{"error_code":"REQUEST_LIMIT_EXCEEDED","message":"slow down"}"#,
    );
    assert_eq!(
        e.kind,
        MlflowErrorKind::RateLimited {
            retry_after: Some(Duration::from_secs(7))
        }
    );
    assert_eq!(e.retry_after(), Some(Duration::from_secs(7)));
    assert!(e.is_retryable());
    // A 503 with Retry-After is honoured the same way; without it, it is a server error.
    let e = MlflowError::from_response(StatusCode::SERVICE_UNAVAILABLE, &h, b"");
    assert_eq!(e.retry_after(), Some(Duration::from_secs(7)));
    let e = MlflowError::from_response(StatusCode::SERVICE_UNAVAILABLE, &json_headers(), b"");
    assert_eq!(e.kind, MlflowErrorKind::Server);
    assert_eq!(e.short(), "503: Service Unavailable");
}

#[test]
fn retry_after_forms() {
    let now = httpdate::parse_http_date("Mon, 23 Nov 2026 02:36:36 GMT").expect("date");
    assert_eq!(
        parse_retry_after("120", now),
        Some(Duration::from_secs(120))
    );
    assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
    assert_eq!(
        parse_retry_after("Mon, 23 Nov 2026 02:37:06 GMT", now),
        Some(Duration::from_secs(30))
    );
    assert_eq!(
        parse_retry_after("Mon, 23 Nov 2026 02:00:00 GMT", now),
        Some(Duration::ZERO)
    );
    assert_eq!(parse_retry_after("soon", now), None);
    assert_eq!(parse_retry_after("-5", now), None);
    assert_eq!(
        parse_retry_after("99999999", now),
        Some(Duration::from_secs(24 * 3600))
    );
}

#[test]
fn short_is_bounded_and_single_line() {
    let long = format!("line one\nline two\t{}", "x".repeat(5000));
    let e = MlflowError::from_response(
        StatusCode::BAD_REQUEST,
        &json_headers(),
        serde_json::to_vec(
            &serde_json::json!({"error_code": "INVALID_PARAMETER_VALUE", "message": long}),
        )
        .expect("json")
        .as_slice(),
    );
    let s = e.short();
    assert!(
        s.chars().count() <= SHORT_MAX_CHARS,
        "{}",
        s.chars().count()
    );
    assert!(s.starts_with("400 INVALID_PARAMETER_VALUE: line one line two xxx"));
    assert!(s.ends_with('…'));
    assert!(!s.contains('\n'));
    assert!(e.message.chars().count() <= MESSAGE_MAX_CHARS);
}

#[test]
fn clean_handles_edges() {
    assert_eq!(one_line("  a \r\n b  ", 10), "a b");
    assert_eq!(one_line("abcdef", 3), "ab…");
    assert_eq!(one_line("ab cdef", 4), "ab…");
    assert_eq!(one_line("", 3), "");
    assert_eq!(one_line("ééé", 3), "ééé");
}

#[test]
fn token_failures_are_auth_and_retryable_only_when_unreachable() {
    let e = MlflowError::from_auth(&AuthError::Unreachable {
        endpoint: "https://h/oidc/v1/token".into(),
        reason: "connection refused".into(),
    });
    assert_eq!(e.kind, MlflowErrorKind::Auth);
    assert!(e.is_retryable());
    assert!(e.short().starts_with("auth TOKEN_UNAVAILABLE: "));
    let e = MlflowError::from_auth(&AuthError::Rejected {
        endpoint: "https://h/oidc/v1/token".into(),
        status: 401,
        reason: "invalid_client".into(),
    });
    assert!(!e.is_retryable());
}

#[test]
fn transport_failures() {
    let e = MlflowError::from_exchange(&ExchangeError::Timeout(Duration::from_secs(10)));
    assert_eq!(e.kind, MlflowErrorKind::Timeout);
    assert_eq!(e.short(), "timeout: no response within 10s");
    assert!(e.is_retryable());
    let e = MlflowError::from_exchange(&ExchangeError::Connect("tcp connect error".into()));
    assert_eq!(e.kind, MlflowErrorKind::Connect);
    assert!(e.is_retryable());
    let e = MlflowError::from_exchange(&ExchangeError::TooLarge(10));
    assert_eq!(e.kind, MlflowErrorKind::Decode);
    assert!(!e.is_retryable());
}
