//! Where the password of each NEW Postgres connection comes from: one more credential source
//! beside the [`TokenSource`]s (the store asks it; it knows nothing of the store).
//!
//! - `static`: the URL's password or `PGPASSWORD` (or none, for trust / peer auth);
//! - `databricks-oauth`: the app's Databricks OAuth token (cached and refreshed by
//!   [`TokenSource`] itself);
//! - `lakebase-provisioned:INSTANCE`: `POST {host}/api/2.0/database/credentials`
//!   `{"instance_names": [INSTANCE], "request_id": "<uuid>"}` → `{"token", "expiration_time"}`;
//! - `lakebase-autoscaling:ENDPOINT`: `POST {host}/api/2.0/postgres/credentials`
//!   `{"endpoint": ENDPOINT}` → `{"token", "expire_time"}`.
//!
//! Both Lakebase calls carry the app's OAuth bearer. A minted credential is cached until
//! `REFRESH_MARGIN` before it expires, so a burst of new connections costs one call;
//! concurrent callers share one fetch, and a failure is shared for `FAILURE_MEMORY` so a
//! broken endpoint is not hammered. If minting fails while the current credential can still
//! log in, that one is used (the endpoint is retried on a later connection); if the server
//! refuses a cached credential, it is dropped. Postgres checks the password only at login, so
//! existing connections are unaffected by rotation; the pool's maximum lifetime makes them
//! move over.
//!
//! Passwords are [`Secret`]s: never logged, never part of an error. Only the error fields of a
//! Databricks error body (`error_code`, `message`) are echoed.

use std::time::{Duration, Instant, SystemTime};

use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use http::{Method, Request};
use serde::Deserialize;
use tokio::sync::Mutex;

use url::Url;

use crate::auth::TokenSource;
use crate::body::Body;
use crate::client::HttpClient;
use crate::config::{PasswordSource, PgConnect, Secret};
use crate::metrics::{Metrics, SourceLabel};

/// What minting passwords needs from the rest of the process (`store::postgres::Deps`).
#[derive(Clone)]
pub struct PasswordDeps {
    /// The app's Databricks OAuth token source (used by Databricks password sources).
    pub databricks: TokenSource,
    pub databricks_host: Option<Url>,
    pub http: HttpClient,
    pub metrics: std::sync::Arc<Metrics>,
}

/// Why no password could be had; the store reports it as [`StoreError::Unavailable`] with the
/// same text, and it prints as that error did when minting lived in the store (log lines are
/// unchanged).
///
/// [`StoreError::Unavailable`]: crate::store::StoreError::Unavailable
#[derive(Debug, Clone, thiserror::Error)]
#[error("the store is unavailable: {0}")]
pub struct PasswordError(pub String);

/// Mint a new credential this long before the cached one expires (a connection opened with
/// it must still be able to log in; Lakebase tokens live an hour).
const REFRESH_MARGIN: Duration = Duration::from_secs(120);
/// A failed fetch is reported to callers arriving within this window instead of retried.
const FAILURE_MEMORY: Duration = Duration::from_secs(1);
/// A credential this close to expiry is not used for a new login even as a fallback (clock
/// skew, the login itself taking time).
const LOGIN_SLACK: Duration = Duration::from_secs(10);
/// Assumed lifetime when the endpoint's answer has no usable expiry.
const ASSUMED_LIFETIME: Duration = Duration::from_secs(15 * 60);
/// Largest credential response we read.
const MAX_RESPONSE: usize = 64 * 1024;

/// The password source of one pool.
pub struct Credentials {
    source: Source,
    cache: Mutex<Cache>,
    deps: PasswordDeps,
}

enum Source {
    Static(Option<Secret>),
    DatabricksOauth,
    Lakebase(Lakebase),
}

struct Lakebase {
    /// Metrics label and error wording.
    label: &'static str,
    url: Result<String, String>,
    request: LakebaseRequest,
    timeout: Duration,
}

enum LakebaseRequest {
    Provisioned { instance: String },
    Autoscaling { endpoint: String },
}

#[derive(Default)]
struct Cache {
    current: Option<Minted>,
    last_failure: Option<(Instant, PasswordError)>,
}

struct Minted {
    password: Secret,
    /// Reuse until then.
    refresh_at: Instant,
    /// Still good for a login until then (the fallback when minting a new one fails).
    usable_until: Instant,
}

impl Credentials {
    pub fn new(
        pg: &PgConnect,
        source: &PasswordSource,
        deps: PasswordDeps,
        timeout: Duration,
    ) -> Self {
        let lakebase = |label, path: &str, request| {
            let url = match &deps.databricks_host {
                Some(host) => Ok(format!("{}{path}", host.as_str().trim_end_matches('/'))),
                None => Err(format!(
                    "the {label} password source needs the Databricks host ([databricks] host or DATABRICKS_HOST)"
                )),
            };
            Source::Lakebase(Lakebase {
                label,
                url,
                request,
                timeout,
            })
        };
        let source = match source {
            PasswordSource::Static => Source::Static(pg.password.clone()),
            PasswordSource::DatabricksOauth => Source::DatabricksOauth,
            PasswordSource::LakebaseProvisioned { instance } => lakebase(
                "lakebase-provisioned",
                "/api/2.0/database/credentials",
                LakebaseRequest::Provisioned {
                    instance: instance.clone(),
                },
            ),
            PasswordSource::LakebaseAutoscaling { endpoint } => lakebase(
                "lakebase-autoscaling",
                "/api/2.0/postgres/credentials",
                LakebaseRequest::Autoscaling {
                    endpoint: endpoint.clone(),
                },
            ),
        };
        Self {
            source,
            cache: Mutex::new(Cache::default()),
            deps,
        }
    }

    /// Whether passwords are minted (and so may be rotated under us).
    pub fn is_minted(&self) -> bool {
        matches!(self.source, Source::Lakebase(_))
    }

    /// The password for a new connection (`None`: connect without one).
    pub async fn password(&self) -> Result<Option<Secret>, PasswordError> {
        match &self.source {
            Source::Static(p) => Ok(p.clone()),
            Source::DatabricksOauth => {
                let token = bearer(&self.deps.databricks, "databricks-oauth").await?;
                Ok(Some(token.secret.clone()))
            }
            Source::Lakebase(lb) => self.minted(lb).await.map(Some),
        }
    }

    /// Forgets the cached credential after the server refused it, so that the next connection
    /// mints a fresh one instead of failing until the cache period ends.
    pub async fn invalidate(&self) {
        if self.is_minted() {
            self.cache.lock().await.current = None;
        }
    }

    async fn minted(&self, lb: &Lakebase) -> Result<Secret, PasswordError> {
        // Held across the fetch: concurrent new connections wait for one fetch and share it.
        let mut cache = self.cache.lock().await;
        let now = Instant::now();
        if let Some(m) = &cache.current {
            if now < m.refresh_at {
                return Ok(m.password.clone());
            }
        }
        if let Some((at, err)) = &cache.last_failure {
            if now.duration_since(*at) < FAILURE_MEMORY {
                return usable(&cache.current, now).ok_or_else(|| err.clone());
            }
        }
        let labels = SourceLabel { source: lb.label };
        match self.fetch(lb).await {
            Ok((password, expires_at)) => {
                self.deps
                    .metrics
                    .token_refreshes
                    .get_or_create(&labels)
                    .inc();
                let lifetime = expires_at
                    .and_then(|e| e.duration_since(SystemTime::now()).ok())
                    .unwrap_or(ASSUMED_LIFETIME);
                // A credential closer to expiry than the margin is used for this connection
                // only (it can still log in now), never reused.
                let refresh_at = now + lifetime.saturating_sub(REFRESH_MARGIN);
                cache.current = Some(Minted {
                    password: password.clone(),
                    refresh_at,
                    usable_until: now + lifetime.saturating_sub(LOGIN_SLACK),
                });
                cache.last_failure = None;
                tracing::debug!(source = lb.label, "minted a database credential");
                Ok(password)
            }
            Err(err) => {
                self.deps
                    .metrics
                    .token_refresh_failures
                    .get_or_create(&labels)
                    .inc();
                cache.last_failure = Some((Instant::now(), err.clone()));
                // The endpoint hiccuped, but the credential we have can still log in: use it
                // and try again on a later connection.
                match usable(&cache.current, Instant::now()) {
                    Some(p) => {
                        tracing::warn!(source = lb.label, error = %err, "minting a database credential failed; reusing the current one until it expires");
                        Ok(p)
                    }
                    None => Err(err),
                }
            }
        }
    }

    async fn fetch(&self, lb: &Lakebase) -> Result<(Secret, Option<SystemTime>), PasswordError> {
        let url = lb.url.as_ref().map_err(|e| PasswordError(e.clone()))?;
        let fail = |reason: String| {
            PasswordError(format!(
                "cannot obtain a database credential ({}) from {url}: {reason}",
                lb.label
            ))
        };
        let token = bearer(&self.deps.databricks, lb.label).await?;
        let body = match &lb.request {
            LakebaseRequest::Provisioned { instance } => serde_json::json!({
                "instance_names": [instance],
                "request_id": uuid::Uuid::new_v4().to_string(),
            }),
            LakebaseRequest::Autoscaling { endpoint } => {
                serde_json::json!({ "endpoint": endpoint })
            }
        };
        let req = Request::builder()
            .method(Method::POST)
            .uri(url.as_str())
            .header(AUTHORIZATION, token.header.clone())
            .header(CONTENT_TYPE, "application/json")
            .header(ACCEPT, "application/json")
            .body(Body::full(body.to_string()))
            .map_err(|e| fail(format!("invalid request ({e})")))?;
        let (parts, bytes) = self
            .deps
            .http
            .exchange(req, lb.timeout, MAX_RESPONSE)
            .await
            .map_err(|e| fail(e.to_string()))?;
        if !parts.status.is_success() {
            return Err(fail(format!(
                "HTTP {}: {}",
                parts.status.as_u16(),
                error_reason(&bytes, parts.status)
            )));
        }
        let answer: CredentialAnswer = serde_json::from_slice(&bytes)
            .map_err(|e| fail(format!("not a credential response ({e})")))?;
        if answer.token.is_empty() {
            return Err(fail("the response holds an empty token".to_owned()));
        }
        let expires_at = answer.expiry.as_deref().and_then(parse_timestamp);
        if expires_at.is_none() {
            tracing::warn!(
                source = lb.label,
                "credential response has no usable expiry; assuming {}",
                humantime::format_duration(ASSUMED_LIFETIME)
            );
        }
        Ok((Secret::new(answer.token), expires_at))
    }
}

fn usable(current: &Option<Minted>, now: Instant) -> Option<Secret> {
    current
        .as_ref()
        .filter(|m| now < m.usable_until)
        .map(|m| m.password.clone())
}

async fn bearer(
    source: &TokenSource,
    label: &str,
) -> Result<std::sync::Arc<crate::auth::Token>, PasswordError> {
    match source.token().await {
        Ok(Some(t)) => Ok(t),
        Ok(None) => Err(PasswordError(format!(
            "the {label} password source needs Databricks OAuth credentials ([databricks] client_id / client_secret)"
        ))),
        Err(e) => Err(PasswordError(format!(
            "cannot obtain the Databricks token for the {label} password source: {e}"
        ))),
    }
}

#[derive(Deserialize)]
struct CredentialAnswer {
    token: String,
    /// `expiration_time` (provisioned) or `expire_time` (autoscaling).
    #[serde(default, alias = "expiration_time", alias = "expire_time")]
    expiry: Option<String>,
}

#[derive(Deserialize)]
struct DatabricksError {
    #[serde(default)]
    error_code: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

fn error_reason(bytes: &[u8], status: http::StatusCode) -> String {
    let parsed = serde_json::from_slice::<DatabricksError>(bytes).ok();
    let reason = match parsed {
        Some(DatabricksError {
            error_code: Some(c),
            message: Some(m),
        }) => format!("{c}: {m}"),
        Some(DatabricksError {
            error_code: Some(c),
            message: None,
        }) => c,
        Some(DatabricksError {
            error_code: None,
            message: Some(m),
        }) => m,
        _ => status.canonical_reason().unwrap_or("error").to_owned(),
    };
    crate::text::one_line(&reason, 300)
}

/// RFC 3339 with any UTC offset (humantime alone only takes `Z` / `+00:00`).
fn parse_timestamp(s: &str) -> Option<SystemTime> {
    let s = s.trim();
    if let Ok(t) = humantime::parse_rfc3339_weak(s) {
        return Some(t);
    }
    let (base, offset) = s.split_at(s.len().checked_sub(6)?);
    let sign = match offset.as_bytes().first()? {
        b'+' => 1i64,
        b'-' => -1i64,
        _ => return None,
    };
    let (h, m) = offset[1..].split_once(':')?;
    let secs = (h.parse::<i64>().ok()? * 3600 + m.parse::<i64>().ok()? * 60) * sign;
    let local = humantime::parse_rfc3339_weak(base).ok()?;
    // 10:00+02:00 is 08:00 UTC.
    if secs >= 0 {
        local.checked_sub(Duration::from_secs(secs.unsigned_abs()))
    } else {
        local.checked_add(Duration::from_secs(secs.unsigned_abs()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_with_offsets() {
        let z = parse_timestamp("2030-01-01T10:00:00Z").unwrap();
        assert_eq!(parse_timestamp("2030-01-01T12:00:00+02:00"), Some(z));
        assert_eq!(parse_timestamp("2030-01-01T08:30:00-01:30"), Some(z));
        assert_eq!(
            parse_timestamp("2030-01-01T10:00:00.250Z"),
            z.checked_add(Duration::from_millis(250))
        );
        assert_eq!(parse_timestamp("soon"), None);
    }

    #[test]
    fn error_reason_echoes_only_databricks_fields() {
        let r = error_reason(
            br#"{"error_code":"PERMISSION_DENIED","message":"no access","details":"x"}"#,
            http::StatusCode::FORBIDDEN,
        );
        assert_eq!(r, "PERMISSION_DENIED: no access");
        assert_eq!(
            error_reason(b"<html>", http::StatusCode::BAD_GATEWAY),
            "Bad Gateway"
        );
    }
}
