//! The crate's error type and the ONE place where an error becomes an HTTP response.
//!
//! Errors are tagged by who is at fault: the client (4xx), an upstream hop such as the agent or a
//! token endpoint (502/504), a dependency we need to answer at all such as the store (503), or
//! ourselves (500). Response bodies are `{"error": "<human sentence>", "code": "<SNAKE_CASE>",
//! "requestId": "…"}`: never a `Debug` dump, never a secret. The sentence a client sees
//! ([`Error::public_message`]) names no internal URL, host, third-party error text, principal or
//! path; the detailed `Display` goes to the log under the request id ([`Error::respond`]).

use std::time::Duration;

use http::header::{CONNECTION, HeaderValue, RETRY_AFTER};
use http::{Response, StatusCode};
use serde_json::json;

use crate::auth::AuthError;
use crate::body::{Body, json_response};
use crate::store::StoreError;
pub use crate::text::{ECHO_MAX_CHARS, chain, echo, one_line};

/// Everything a request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed; `code` is stable, `message` says which field and what was
    /// expected.
    #[error("{message}")]
    BadRequest { code: &'static str, message: String },
    #[error(
        "no user identity: the request carries no trusted identity header and no dev_user is configured"
    )]
    Unauthenticated,
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("method {method} is not allowed here (allowed: {allowed})")]
    MethodNotAllowed {
        method: http::Method,
        allowed: &'static str,
    },
    #[error("request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("content-type must be application/json")]
    UnsupportedMediaType,
    #[error("too many requests; retry in {} s", retry_after.as_secs().max(1))]
    RateLimited { retry_after: Duration },
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// A credential for an outbound hop could not be obtained.
    #[error("cannot authenticate to {hop}: {source}")]
    Auth {
        hop: &'static str,
        #[source]
        source: AuthError,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("internal error: {0}")]
    Internal(String),
    /// A method an agent route does not list in `agent.routes[].methods`; `allowed` is the
    /// `Allow` header value.
    #[error("method {method} is not allowed on {route} (allowed: {allowed})")]
    RouteMethodNotAllowed {
        method: http::Method,
        route: String,
        allowed: String,
    },
    /// The client stopped sending its request body (`server.request_body_timeout`).
    #[error("the request body sent nothing for {}", humantime::format_duration(*after))]
    RequestBodyTimeout { after: Duration },
    /// The user already has `limit` agent requests open (`agent.max_concurrent_per_user`).
    #[error(
        "too many agent requests open at once for this user (limit {limit}); retry when one has finished"
    )]
    TooManyConcurrent { limit: usize },
    /// A vote names a message the proxy has no link for (never streamed, or not recorded yet).
    #[error("{0}")]
    UnknownMessage(String),
    /// A chat rating names a chat in which the caller has had no answer.
    #[error("{0}")]
    UnknownChat(String),
    /// `agent.auth = "user"` and the platform sent no usable user token
    /// (`x-forwarded-access-token`: the app declares no user API scopes, or the request did not
    /// come through the platform).
    #[error(
        "this agent is called on behalf of the signed-in user, and the platform sent no user token (x-forwarded-access-token): declare user API scopes for the app, or use agent.auth = \"user-or-app\""
    )]
    UserTokenRequired,
    /// More requests of this kind are in flight than the service takes at once
    /// (`feedback.max_in_flight`): shed at once rather than queued.
    #[error("the service is overloaded; retry shortly")]
    Overloaded,
}

impl Error {
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::BadRequest {
            code,
            message: message.into(),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest { .. } => StatusCode::BAD_REQUEST,
            Self::Unauthenticated => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Upstream(e) => e.status(),
            // The hop credential is ours to obtain: a token endpoint that refuses us is an
            // upstream failure (502); one that cannot be reached at all leaves us unable to
            // serve (503).
            Self::Auth { source, .. } => {
                if source.is_rejection() {
                    StatusCode::BAD_GATEWAY
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                }
            }
            Self::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Self::RouteMethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Self::RequestBodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            Self::TooManyConcurrent { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::UnknownMessage(_) | Self::UnknownChat(_) => StatusCode::NOT_FOUND,
            Self::UserTokenRequired => StatusCode::UNAUTHORIZED,
            Self::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            Self::BadRequest { code, .. } => code,
            Self::Unauthenticated => "UNAUTHENTICATED",
            Self::Forbidden(_) => "FORBIDDEN",
            Self::NotFound(_) => "NOT_FOUND",
            Self::MethodNotAllowed { .. } => "METHOD_NOT_ALLOWED",
            Self::PayloadTooLarge { .. } => "PAYLOAD_TOO_LARGE",
            Self::UnsupportedMediaType => "UNSUPPORTED_MEDIA_TYPE",
            Self::RateLimited { .. } => "RATE_LIMITED",
            Self::Upstream(e) => e.code(),
            Self::Auth { .. } => "UPSTREAM_AUTH_FAILED",
            Self::Store(_) => "STORE_UNAVAILABLE",
            Self::Internal(_) => "INTERNAL",
            Self::RouteMethodNotAllowed { .. } => "METHOD_NOT_ALLOWED",
            Self::RequestBodyTimeout { .. } => "REQUEST_TIMEOUT",
            Self::TooManyConcurrent { .. } => "TOO_MANY_CONCURRENT_REQUESTS",
            Self::UnknownMessage(_) => "UNKNOWN_MESSAGE",
            Self::UnknownChat(_) => "UNKNOWN_CHAT",
            Self::UserTokenRequired => "USER_TOKEN_REQUIRED",
            Self::Overloaded => "OVERLOADED",
        }
    }

    /// Whether this error is worth an error-level log line (our fault or a dependency's), as
    /// opposed to a client mistake that the access log already records.
    pub fn is_server_side(&self) -> bool {
        self.status().is_server_error()
    }

    /// The one sentence a client is shown. Client errors say what was wrong with the request
    /// (values they echo are cut to [`ECHO_MAX_CHARS`] where they are built); upstream,
    /// dependency and internal errors say only what failed, never where or why in detail.
    pub fn public_message(&self) -> String {
        match self {
            Self::BadRequest { message, .. } => message.clone(),
            Self::Forbidden(m) | Self::NotFound(m) => m.clone(),
            Self::MethodNotAllowed { allowed, .. } => {
                format!("this method is not allowed here (allowed: {allowed})")
            }
            Self::Unauthenticated
            | Self::UserTokenRequired
            | Self::PayloadTooLarge { .. }
            | Self::UnsupportedMediaType
            | Self::RateLimited { .. }
            | Self::Overloaded => self.to_string(),
            Self::Upstream(e) => e.public_message().to_owned(),
            Self::Auth { hop, .. } => format!("the proxy cannot authenticate to {hop}"),
            Self::Store(_) => "the vote store is unavailable; try again later".to_owned(),
            Self::Internal(_) => "internal error".to_owned(),
            Self::RouteMethodNotAllowed { allowed, .. } => {
                format!("this method is not allowed on this route (allowed: {allowed})")
            }
            Self::RequestBodyTimeout { .. }
            | Self::TooManyConcurrent { .. }
            | Self::UnknownMessage(_)
            | Self::UnknownChat(_) => self.to_string(),
        }
    }

    /// The response for this error, with the request id in the body. The details (the full
    /// `Display`, with upstream URLs and third-party text) are logged here, once: at error
    /// level for server-side failures, at debug for client mistakes (the access log records
    /// their status).
    pub fn respond(self, request_id: &HeaderValue, route: &'static str) -> Response<Body> {
        let rid = request_id.to_str().unwrap_or("");
        if self.is_server_side() {
            tracing::error!(request_id = rid, route, code = self.code(), error = %self, "request failed");
        } else {
            tracing::debug!(request_id = rid, route, code = self.code(), error = %self, "request refused");
        }
        self.response(Some(rid))
    }

    /// The response for this error without a request id (see [`Error::respond`]). The single
    /// mapping from errors to HTTP.
    pub fn into_response(self) -> Response<Body> {
        self.response(None)
    }

    fn response(self, request_id: Option<&str>) -> Response<Body> {
        let status = self.status();
        let mut body = json!({ "error": self.public_message(), "code": self.code() });
        if let Some(rid) = request_id {
            body["requestId"] = json!(rid);
        }
        let mut res = json_response(status, &body);
        if let Self::RateLimited { retry_after } = &self {
            let secs = retry_after.as_secs_f64().ceil().max(1.0) as u64;
            res.headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from(secs));
        }
        match &self {
            Self::MethodNotAllowed { allowed, .. } => {
                res.headers_mut()
                    .insert(http::header::ALLOW, HeaderValue::from_static(allowed));
            }
            Self::RouteMethodNotAllowed { allowed, .. } => {
                if let Ok(v) = HeaderValue::from_str(allowed) {
                    res.headers_mut().insert(http::header::ALLOW, v);
                }
            }
            // A stream frees its slot when it ends, a vote within its store round trips;
            // there is no better estimate than "soon".
            Self::TooManyConcurrent { .. } | Self::Overloaded => {
                res.headers_mut()
                    .insert(RETRY_AFTER, HeaderValue::from_static("1"));
            }
            // The rest of the body may still be on its way: HTTP/1.1 cannot reuse the
            // connection (HTTP/2 strips the header and ends only the stream).
            Self::RequestBodyTimeout { .. } => {
                res.headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("close"));
            }
            _ => {}
        }
        res
    }
}

/// A failure talking to the agent.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("the agent at {upstream} is unreachable: {reason}")]
    Unreachable { upstream: String, reason: String },
    #[error("the agent at {upstream} sent no response headers within {}", humantime::format_duration(*after))]
    HeaderTimeout { upstream: String, after: Duration },
    #[error("the agent at {upstream} failed: {reason}")]
    Protocol { upstream: String, reason: String },
}

impl UpstreamError {
    /// What a client is told: which kind of failure, not where or why.
    pub fn public_message(&self) -> &'static str {
        match self {
            Self::Unreachable { .. } => "the agent is unreachable",
            Self::HeaderTimeout { .. } => "the agent did not answer in time",
            Self::Protocol { .. } => "the agent failed to answer",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::HeaderTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Self::Unreachable { .. } | Self::Protocol { .. } => StatusCode::BAD_GATEWAY,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            Self::Unreachable { .. } => "UPSTREAM_UNREACHABLE",
            Self::HeaderTimeout { .. } => "UPSTREAM_TIMEOUT",
            Self::Protocol { .. } => "UPSTREAM_ERROR",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn body_json(res: Response<Body>) -> serde_json::Value {
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[tokio::test]
    async fn errors_become_json_with_code() {
        let res =
            Error::bad_request("INVALID_FIELD", "isUpvoted: expected a boolean").into_response();
        assert_eq!(res.status(), 400);
        assert_eq!(
            res.headers()[http::header::CONTENT_TYPE],
            "application/json"
        );
        let v = body_json(res).await;
        assert_eq!(v["code"], "INVALID_FIELD");
        assert_eq!(v["error"], "isUpvoted: expected a boolean");
    }

    #[tokio::test]
    async fn rate_limit_sets_retry_after() {
        let res = Error::RateLimited {
            retry_after: Duration::from_millis(1200),
        }
        .into_response();
        assert_eq!(res.status(), 429);
        assert_eq!(res.headers()[RETRY_AFTER], "2");
    }

    #[tokio::test]
    async fn connection_limit_errors() {
        let res = Error::TooManyConcurrent { limit: 3 }.into_response();
        assert_eq!(res.status(), 429);
        assert_eq!(res.headers()[RETRY_AFTER], "1");
        let v = body_json(res).await;
        assert_eq!(v["code"], "TOO_MANY_CONCURRENT_REQUESTS");
        let res = Error::RequestBodyTimeout {
            after: Duration::from_secs(30),
        }
        .into_response();
        assert_eq!(res.status(), 408);
        assert_eq!(res.headers()[CONNECTION], "close");
        assert_eq!(body_json(res).await["code"], "REQUEST_TIMEOUT");
    }

    #[tokio::test]
    async fn server_side_details_stay_out_of_the_body() {
        let rid = HeaderValue::from_static("req-42");
        let e = Error::from(UpstreamError::Unreachable {
            upstream: "http://10.1.2.3:8000".into(),
            reason: "connection refused".into(),
        });
        let v = body_json(e.respond(&rid, "agent")).await;
        assert_eq!(v["code"], "UPSTREAM_UNREACHABLE");
        assert_eq!(v["error"], "the agent is unreachable");
        assert_eq!(v["requestId"], "req-42");
        let v =
            body_json(Error::Internal("cannot read /srv/secret".into()).respond(&rid, "ui")).await;
        assert_eq!(v["error"], "internal error");
        assert_eq!(echo(&"x".repeat(100)).chars().count(), ECHO_MAX_CHARS);
    }

    #[test]
    fn upstream_errors_map_to_gateway_statuses() {
        let e = Error::from(UpstreamError::HeaderTimeout {
            upstream: "http://a".into(),
            after: Duration::from_secs(120),
        });
        assert_eq!(e.status(), 504);
        assert!(e.to_string().contains("2m") || e.to_string().contains("120"));
        let e = Error::from(UpstreamError::Unreachable {
            upstream: "http://a".into(),
            reason: "connection refused".into(),
        });
        assert_eq!(e.status(), 502);
        assert_eq!(e.code(), "UPSTREAM_UNREACHABLE");
    }
}
