//! [`MlflowError`]: every way an MLflow call can fail, classified once so that the delivery
//! worker can decide between "retry", "retry later (`Retry-After`)", "the trace is not there
//! (yet)" and "give up with a reason" without looking at strings.
//!
//! The server's error JSON (`{"error_code", "message", …}`) is kept as code + message; other
//! bodies (405s are HTML, a reverse proxy may answer plain text) are reduced to a one-line
//! reason. Nothing here ever holds a request body, a header or a token: the message is what the
//! server or the transport said, cleaned of control characters and bounded in length.

use crate::text::one_line;
use std::time::{Duration, SystemTime};

use http::StatusCode;
use http::header::{CONTENT_TYPE, HeaderMap, RETRY_AFTER};
use serde::Deserialize;

use crate::auth::AuthError;
use crate::client::ExchangeError;

/// Longest [`MlflowError::short`] answer, in characters.
pub const SHORT_MAX_CHARS: usize = 200;
/// Longest message kept from a server, in characters (error bodies are untrusted input that may
/// end up in the store as a dead-letter reason).
const MESSAGE_MAX_CHARS: usize = 1000;
/// A `Retry-After` beyond this is treated as this: a server asking for days is misconfigured,
/// and the caller's own limits (delivery max age) take over anyway.
const RETRY_AFTER_MAX: Duration = Duration::from_secs(24 * 3600);

/// What went wrong, as far as the caller's next step is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MlflowErrorKind {
    /// The trace or assessment does not exist (JSON 404, `RESOURCE_DOES_NOT_EXIST`). For a trace
    /// that was just produced this is also what "not flushed yet" looks like.
    NotFound,
    /// A create with a client-chosen assessment id that is taken. Open-source MLflow answers
    /// 500 "… due to a constraint violation." (sample 07); a 409 or `RESOURCE_ALREADY_EXISTS`
    /// means the same.
    AlreadyExists,
    /// 429 (or a 503 carrying `Retry-After`): come back after `retry_after` when given.
    RateLimited { retry_after: Option<Duration> },
    /// 5xx: the server failed; the same request may succeed later.
    Server,
    /// Any other 4xx (bad request, 405, 413, an unknown endpoint): the same request will fail
    /// again.
    Client,
    /// No complete answer within the configured timeout (or a 408).
    Timeout,
    /// The connection failed or broke before a complete answer arrived.
    Connect,
    /// 401/403 from MLflow, or no credential could be obtained for it.
    Auth,
    /// Rejected locally before sending (the open-source server silently drops bad fields).
    Invalid,
    /// A success status with a body we cannot read.
    Decode,
}

impl MlflowErrorKind {
    /// A stable snake_case name (logs, dead-letter reasons).
    pub fn label(&self) -> &'static str {
        match self {
            Self::NotFound => "not_found",
            Self::AlreadyExists => "already_exists",
            Self::RateLimited { .. } => "rate_limited",
            Self::Server => "server",
            Self::Client => "client",
            Self::Timeout => "timeout",
            Self::Connect => "connect",
            Self::Auth => "auth",
            Self::Invalid => "invalid",
            Self::Decode => "decode",
        }
    }
}

/// A failed MLflow call.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}", self.short())]
pub struct MlflowError {
    pub kind: MlflowErrorKind,
    /// The HTTP status, when the server answered.
    pub status: Option<u16>,
    /// The server's `error_code` (e.g. `RESOURCE_DOES_NOT_EXIST`); for credential failures
    /// [`TOKEN_UNAVAILABLE`] or [`TOKEN_REJECTED`].
    pub error_code: Option<String>,
    /// One line, at most 1000 characters, no control characters.
    pub message: String,
}

/// `error_code` of an [`MlflowErrorKind::Auth`] error whose token endpoint could not be reached
/// (transient: retryable).
pub const TOKEN_UNAVAILABLE: &str = "TOKEN_UNAVAILABLE";
/// `error_code` of an [`MlflowErrorKind::Auth`] error whose token endpoint refused us.
pub const TOKEN_REJECTED: &str = "TOKEN_REJECTED";

impl MlflowError {
    pub(crate) fn new(kind: MlflowErrorKind, message: impl AsRef<str>) -> Self {
        Self {
            kind,
            status: None,
            error_code: None,
            message: one_line(message.as_ref(), MESSAGE_MAX_CHARS),
        }
    }

    pub(crate) fn invalid(message: impl AsRef<str>) -> Self {
        Self::new(MlflowErrorKind::Invalid, message)
    }

    /// Whether sending the same request again later may succeed.
    ///
    /// [`MlflowErrorKind::NotFound`] is deliberately NOT retryable here: a 404 on a trace means
    /// "not flushed yet" only for a young trace, and only the caller knows how old it is (the
    /// delivery worker retries it up to its own horizon).
    pub fn is_retryable(&self) -> bool {
        match self.kind {
            MlflowErrorKind::RateLimited { .. }
            | MlflowErrorKind::Server
            | MlflowErrorKind::Timeout
            | MlflowErrorKind::Connect => true,
            MlflowErrorKind::Auth => self.error_code.as_deref() == Some(TOKEN_UNAVAILABLE),
            MlflowErrorKind::NotFound
            | MlflowErrorKind::AlreadyExists
            | MlflowErrorKind::Client
            | MlflowErrorKind::Invalid
            | MlflowErrorKind::Decode => false,
        }
    }

    /// How long the server asked us to wait, if it did.
    pub fn retry_after(&self) -> Option<Duration> {
        match self.kind {
            MlflowErrorKind::RateLimited { retry_after } => retry_after,
            _ => None,
        }
    }

    /// One line for users and operators, at most [`SHORT_MAX_CHARS`] characters:
    /// `404 RESOURCE_DOES_NOT_EXIST: Trace with ID 'tr-…' not found.`, `timeout: no response
    /// within 10s`, `invalid: assessment name …`.
    pub fn short(&self) -> String {
        let head = match (self.status, self.error_code.as_deref()) {
            (Some(s), Some(c)) => format!("{s} {c}"),
            (Some(s), None) => s.to_string(),
            (None, Some(c)) => format!("{} {c}", self.kind.label()),
            (None, None) => self.kind.label().to_owned(),
        };
        let line = if self.message.is_empty() {
            head
        } else {
            format!("{head}: {}", self.message)
        };
        one_line(&line, SHORT_MAX_CHARS)
    }

    /// What a client may be shown (`mlflowError`): the kind of failure, the HTTP status and
    /// MLflow's error code when it is a plain code. Never the server's message: it names
    /// service principals, experiment paths and trace ids.
    pub fn public(&self) -> String {
        let code = self.error_code.as_deref().filter(|c| {
            !c.is_empty()
                && c.len() <= 64
                && c.bytes()
                    .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
        });
        match (self.status, code) {
            (Some(s), Some(c)) => format!("MLflow refused the assessment (HTTP {s} {c})"),
            (Some(s), None) => format!("MLflow refused the assessment (HTTP {s})"),
            (None, Some(c)) => format!("MLflow could not be reached ({} {c})", self.kind.label()),
            (None, None) => format!("MLflow could not be reached ({})", self.kind.label()),
        }
    }

    /// A transport failure of [`crate::client::HttpClient::exchange`].
    pub(crate) fn from_exchange(err: &ExchangeError) -> Self {
        let kind = match err {
            ExchangeError::Timeout(_) => MlflowErrorKind::Timeout,
            // A connection that breaks while the answer is being read is, for the caller, the
            // same as one that never connected: the outcome is unknown and a retry is the
            // answer (creates are made idempotent by the client-chosen assessment id).
            ExchangeError::Connect(_) | ExchangeError::Read(_) => MlflowErrorKind::Connect,
            ExchangeError::TooLarge(_) => MlflowErrorKind::Decode,
        };
        Self::new(kind, err.to_string())
    }

    /// A credential for the MLflow hop could not be obtained.
    pub(crate) fn from_auth(err: &AuthError) -> Self {
        let mut e = Self::new(MlflowErrorKind::Auth, err.to_string());
        e.error_code = Some(if err.is_rejection() {
            TOKEN_REJECTED.to_owned()
        } else {
            TOKEN_UNAVAILABLE.to_owned()
        });
        e
    }

    /// A non-success answer from the server.
    pub(crate) fn from_response(status: StatusCode, headers: &HeaderMap, body: &[u8]) -> Self {
        let parsed = parse_error_body(headers, body);
        let code = status.as_u16();
        let error_code = parsed.error_code.filter(|c| !c.is_empty());
        let by_code = error_code.as_deref().and_then(kind_from_error_code);
        let retry_after = headers
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, SystemTime::now()));
        let kind = match (code, by_code) {
            (429, _) => MlflowErrorKind::RateLimited { retry_after },
            // A JSON 404 is the server saying "no such trace/assessment". A 404 with any other
            // body (Flask's HTML page, a proxy's text) means the URL matched no endpoint: a
            // wrong tracking URI, or a trace id the server cannot route (open-source MLflow
            // 404s `trace:/catalog.schema/…` ids in HTML). Retrying that as "not flushed yet"
            // would only delay the inevitable.
            (404, Some(MlflowErrorKind::NotFound)) => MlflowErrorKind::NotFound,
            (404, None) if error_code.is_some() && !endpoint_missing(error_code.as_deref()) => {
                MlflowErrorKind::NotFound
            }
            (404, _) => MlflowErrorKind::Client,
            (408, _) => MlflowErrorKind::Timeout,
            (503, _) if retry_after.is_some() => MlflowErrorKind::RateLimited { retry_after },
            (_, Some(MlflowErrorKind::RateLimited { .. })) => {
                MlflowErrorKind::RateLimited { retry_after }
            }
            (_, Some(k)) if code < 500 => k,
            (401 | 403, _) => MlflowErrorKind::Auth,
            // 501 Not Implemented will not start working on a retry.
            (501, _) => MlflowErrorKind::Client,
            (500..=599, _) => MlflowErrorKind::Server,
            _ => MlflowErrorKind::Client,
        };
        let message = parsed.message.unwrap_or_else(|| {
            status
                .canonical_reason()
                .unwrap_or("unexpected status")
                .to_owned()
        });
        Self {
            kind,
            status: Some(code),
            error_code,
            message: one_line(&message, MESSAGE_MAX_CHARS),
        }
    }
}

/// Server error codes that say more than the status does.
fn kind_from_error_code(code: &str) -> Option<MlflowErrorKind> {
    Some(match code {
        "RESOURCE_DOES_NOT_EXIST" | "NOT_FOUND" => MlflowErrorKind::NotFound,
        "RESOURCE_ALREADY_EXISTS" | "ALREADY_EXISTS" => MlflowErrorKind::AlreadyExists,
        "REQUEST_LIMIT_EXCEEDED" | "RESOURCE_EXHAUSTED" | "TOO_MANY_REQUESTS" => {
            MlflowErrorKind::RateLimited { retry_after: None }
        }
        "PERMISSION_DENIED" | "UNAUTHENTICATED" | "UNAUTHORIZED" => MlflowErrorKind::Auth,
        _ => return None,
    })
}

/// Databricks' codes for "no such API" (as opposed to "no such object").
fn endpoint_missing(code: Option<&str>) -> bool {
    matches!(code, Some("ENDPOINT_NOT_FOUND" | "FEATURE_DISABLED"))
}

#[derive(Default)]
struct ParsedError {
    error_code: Option<String>,
    message: Option<String>,
}

#[derive(Deserialize)]
struct ErrorBody {
    #[serde(default)]
    error_code: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

/// `{"error_code", "message"}` when the body is that JSON; otherwise a one-line summary of
/// whatever text it is (HTML pages reduced to their title and first paragraph).
fn parse_error_body(headers: &HeaderMap, body: &[u8]) -> ParsedError {
    if let Ok(b) = serde_json::from_slice::<ErrorBody>(body) {
        if b.error_code.is_some() || b.message.is_some() {
            return ParsedError {
                error_code: b.error_code,
                message: b.message.filter(|m| !m.trim().is_empty()),
            };
        }
    }
    let text = String::from_utf8_lossy(&body[..body.len().min(16 * 1024)]);
    let is_html = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("html"))
        || text.trim_start().starts_with('<');
    let summary = if is_html {
        html_summary(&text)
    } else {
        one_line(&text, 160)
    };
    ParsedError {
        error_code: None,
        message: (!summary.is_empty()).then_some(summary),
    }
}

/// `<title>405 Method Not Allowed</title><h1>…</h1><p>The method is not allowed…</p>` →
/// `Method Not Allowed: The method is not allowed…`.
fn html_summary(html: &str) -> String {
    let title = between(html, "<title>", "</title>").map(|t| {
        let t = one_line(&strip_tags(t), 100);
        // Flask's titles repeat the status code the caller already has.
        match t.split_once(' ') {
            Some((n, rest)) if n.len() == 3 && n.bytes().all(|b| b.is_ascii_digit()) => {
                rest.to_owned()
            }
            _ => t,
        }
    });
    let para = between(html, "<p>", "</p>").map(|p| one_line(&strip_tags(p), 120));
    let out = match (title, para) {
        (Some(t), Some(p)) if !t.is_empty() && !p.is_empty() => format!("{t}: {p}"),
        (Some(t), _) if !t.is_empty() => t,
        (_, Some(p)) if !p.is_empty() => p,
        _ => one_line(&strip_tags(html), 160),
    };
    one_line(&out, 160)
}

fn between<'a>(s: &'a str, open: &str, close: &str) -> Option<&'a str> {
    let lower = s.to_ascii_lowercase();
    let start = lower.find(open)? + open.len();
    let end = start + lower[start..].find(close)?;
    s.get(start..end)
}

fn strip_tags(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut in_tag = false;
    for c in s.chars() {
        match c {
            '<' => in_tag = true,
            '>' if in_tag => {
                in_tag = false;
                out.push(' ');
            }
            _ if !in_tag => out.push(c),
            _ => {}
        }
    }
    out
}

/// `Retry-After`: delay-seconds or an HTTP date (RFC 9110 §10.2.3). A date in the past means
/// "now" (zero); anything unparseable is ignored.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    let d = if let Ok(secs) = value.parse::<u64>() {
        Duration::from_secs(secs)
    } else {
        let at = httpdate::parse_http_date(value).ok()?;
        at.duration_since(now).unwrap_or(Duration::ZERO)
    };
    Some(d.min(RETRY_AFTER_MAX))
}

#[cfg(test)]
mod tests;
