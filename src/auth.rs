//! Credentials for outbound hops: one [`TokenSource`] abstraction shared by the agent hop, MLflow
//! and the Lakebase password sources.
//!
//! Sources: none · a static bearer from an environment variable · Databricks OAuth M2M (client
//! credentials against `{host}/oidc/v1/token`) · the Databricks CLI (`databricks auth token`).
//! Refreshing sources cache the token and refresh it before it expires; concurrent callers share
//! ONE refresh, and a failed refresh is shared too (briefly), so a broken token endpoint sees one
//! request per burst rather than one per caller.
//!
//! Tokens are [`Secret`]s and the ready-made `authorization` header value is marked sensitive;
//! neither appears in logs or errors. This module does not decide which hop uses which source:
//! see [`TokenSources`].
//!
//! [`password`]: the password of each new Postgres connection (static, the app's OAuth token,
//! or a minted Lakebase credential with its own cache); the store asks it and knows nothing of
//! Databricks.

pub mod password;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwapOption;
use base64::Engine as _;
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use http::{Method, Request};
use serde::Deserialize;
use tokio::sync::Mutex;

use crate::body::Body;
use crate::client::HttpClient;
use crate::config::{AuthSpec, DatabricksConfig, Secret};
use crate::metrics::{Metrics, SourceLabel};

/// Largest token response we read.
const MAX_TOKEN_RESPONSE: usize = 64 * 1024;
/// A failed refresh is reported to every caller that arrives within this window, instead of each
/// of them hitting the token endpoint again.
const FAILURE_MEMORY: Duration = Duration::from_secs(1);
/// Refresh this long before expiry (or at half the lifetime, for short-lived tokens).
const REFRESH_MARGIN: Duration = Duration::from_secs(300);

/// Why a credential could not be obtained.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuthError {
    #[error("token endpoint {endpoint} is unreachable: {reason}")]
    Unreachable { endpoint: String, reason: String },
    #[error("token endpoint {endpoint} answered {status}: {reason}")]
    Rejected {
        endpoint: String,
        status: u16,
        reason: String,
    },
    #[error("token endpoint {endpoint} sent an unusable answer: {reason}")]
    Invalid { endpoint: String, reason: String },
    #[error("`{command}` failed: {reason}")]
    Cli { command: String, reason: String },
}

impl AuthError {
    /// Whether the credential provider refused us (as opposed to being unreachable).
    pub fn is_rejection(&self) -> bool {
        matches!(self, Self::Rejected { .. } | Self::Invalid { .. })
    }
}

/// A token with its expiry and the ready-made header value.
#[derive(Debug)]
pub struct Token {
    pub secret: Secret,
    /// `Bearer <token>`, marked sensitive so that hyper never logs it.
    pub header: HeaderValue,
    /// When the token stops working (`None`: never expires).
    pub expires_at: Option<Instant>,
    /// When to start refreshing it: [`REFRESH_MARGIN`] before expiry, or half-way through the
    /// lifetime for short-lived tokens.
    refresh_at: Option<Instant>,
}

impl Token {
    fn new(token: String, lifetime: Option<Duration>) -> Result<Self, String> {
        let mut header = HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| "token contains characters not allowed in a header".to_owned())?;
        header.set_sensitive(true);
        let now = Instant::now();
        Ok(Self {
            secret: Secret::new(token),
            header,
            expires_at: lifetime.map(|l| now + l),
            refresh_at: lifetime.map(|l| now + l - REFRESH_MARGIN.min(l / 2)),
        })
    }

    /// Usable now, and not so close to expiry that it should be refreshed first.
    fn fresh(&self, now: Instant) -> bool {
        self.refresh_at.is_none_or(|r| now < r)
    }

    fn valid(&self, now: Instant) -> bool {
        self.expires_at.is_none_or(|exp| now < exp)
    }
}

/// Where a hop's bearer token comes from. Cheap to clone.
#[derive(Clone, Debug)]
pub enum TokenSource {
    None,
    Static(Arc<Token>),
    Refreshing(Arc<Refreshing>),
}

impl TokenSource {
    /// The current token, refreshing it first if needed. `None` for [`TokenSource::None`].
    pub async fn token(&self) -> Result<Option<Arc<Token>>, AuthError> {
        match self {
            Self::None => Ok(None),
            Self::Static(t) => Ok(Some(t.clone())),
            Self::Refreshing(r) => r.get().await.map(Some),
        }
    }

    /// The `authorization` header value for the hop, if any.
    pub async fn authorization(&self) -> Result<Option<HeaderValue>, AuthError> {
        Ok(self.token().await?.map(|t| t.header.clone()))
    }

    /// Whether a request made with this source is authenticated at all.
    pub fn is_none(&self) -> bool {
        matches!(self, Self::None)
    }
}

/// How a refreshing source obtains a new token.
#[derive(Debug)]
enum Fetcher {
    Oauth(Box<OauthFetcher>),
    Cli {
        program: String,
        args: Vec<String>,
        timeout: Duration,
    },
    /// A misconfigured source (which config validation should have prevented): every call
    /// fails with this error.
    Fail(AuthError),
}

#[derive(Debug)]
struct OauthFetcher {
    http: HttpClient,
    endpoint: String,
    basic: HeaderValue,
    timeout: Duration,
}

/// A cached token refreshed on demand, one refresh at a time.
#[derive(Debug)]
pub struct Refreshing {
    label: &'static str,
    fetcher: Fetcher,
    current: ArcSwapOption<Token>,
    /// Held while refreshing; callers that find it taken wait and then reuse the result.
    refresh: Mutex<Option<(Instant, AuthError)>>,
    metrics: Arc<Metrics>,
}

impl Refreshing {
    async fn get(&self) -> Result<Arc<Token>, AuthError> {
        if let Some(t) = self.current.load_full() {
            if t.fresh(Instant::now()) {
                return Ok(t);
            }
        }
        let mut last_failure = self.refresh.lock().await;
        // Someone else may have refreshed while we waited for the lock.
        let now = Instant::now();
        let current = self.current.load_full();
        if let Some(t) = &current {
            if t.fresh(now) {
                return Ok(t.clone());
            }
        }
        if let Some((at, err)) = last_failure.as_ref() {
            if now.duration_since(*at) < FAILURE_MEMORY {
                return match current.filter(|t| t.valid(now)) {
                    Some(t) => Ok(t),
                    None => Err(err.clone()),
                };
            }
        }
        let labels = SourceLabel { source: self.label };
        match self.fetch().await {
            Ok(token) => {
                let token = Arc::new(token);
                self.current.store(Some(token.clone()));
                *last_failure = None;
                self.metrics.token_refreshes.get_or_create(&labels).inc();
                tracing::debug!(source = self.label, "token refreshed");
                Ok(token)
            }
            Err(err) => {
                self.metrics
                    .token_refresh_failures
                    .get_or_create(&labels)
                    .inc();
                *last_failure = Some((Instant::now(), err.clone()));
                match current.filter(|t| t.valid(Instant::now())) {
                    // Still valid: keep using it and try again on a later call.
                    Some(t) => {
                        tracing::warn!(source = self.label, error = %err, "token refresh failed; using the current token until it expires");
                        Ok(t)
                    }
                    None => {
                        tracing::error!(source = self.label, error = %err, "token refresh failed");
                        Err(err)
                    }
                }
            }
        }
    }

    async fn fetch(&self) -> Result<Token, AuthError> {
        match &self.fetcher {
            Fetcher::Oauth(o) => fetch_oauth(&o.http, &o.endpoint, &o.basic, o.timeout).await,
            Fetcher::Cli {
                program,
                args,
                timeout,
            } => fetch_cli(program, args, *timeout).await,
            Fetcher::Fail(err) => Err(err.clone()),
        }
    }
}

#[derive(Deserialize)]
struct OauthResponse {
    access_token: String,
    #[serde(default)]
    expires_in: Option<u64>,
}

#[derive(Deserialize)]
struct OauthErrorBody {
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    error_description: Option<String>,
}

async fn fetch_oauth(
    http: &HttpClient,
    endpoint: &str,
    basic: &HeaderValue,
    timeout: Duration,
) -> Result<Token, AuthError> {
    let req = Request::builder()
        .method(Method::POST)
        .uri(endpoint)
        .header(AUTHORIZATION, basic.clone())
        .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
        .header(ACCEPT, "application/json")
        .body(Body::full("grant_type=client_credentials&scope=all-apis"))
        .map_err(|e| AuthError::Invalid {
            endpoint: endpoint.to_owned(),
            reason: e.to_string(),
        })?;
    let (parts, bytes) = http
        .exchange(req, timeout, MAX_TOKEN_RESPONSE)
        .await
        .map_err(|e| AuthError::Unreachable {
            endpoint: endpoint.to_owned(),
            reason: e.to_string(),
        })?;
    if !parts.status.is_success() {
        // Only the OAuth error fields are echoed; the body could in theory carry anything.
        let reason = serde_json::from_slice::<OauthErrorBody>(&bytes)
            .ok()
            .and_then(|b| match (b.error, b.error_description) {
                (Some(e), Some(d)) => Some(format!("{e}: {d}")),
                (Some(e), None) => Some(e),
                (None, Some(d)) => Some(d),
                (None, None) => None,
            })
            .unwrap_or_else(|| {
                parts
                    .status
                    .canonical_reason()
                    .unwrap_or("error")
                    .to_owned()
            });
        return Err(AuthError::Rejected {
            endpoint: endpoint.to_owned(),
            status: parts.status.as_u16(),
            reason: crate::text::one_line(&reason, 200),
        });
    }
    let body: OauthResponse = serde_json::from_slice(&bytes).map_err(|e| AuthError::Invalid {
        endpoint: endpoint.to_owned(),
        reason: format!("not a token response ({e})"),
    })?;
    // Databricks tokens live one hour; assume so if the endpoint does not say.
    let lifetime = Duration::from_secs(body.expires_in.unwrap_or(3600));
    Token::new(body.access_token, Some(lifetime)).map_err(|reason| AuthError::Invalid {
        endpoint: endpoint.to_owned(),
        reason,
    })
}

#[derive(Deserialize)]
struct CliToken {
    access_token: String,
    #[serde(default)]
    expiry: Option<String>,
}

async fn fetch_cli(program: &str, args: &[String], timeout: Duration) -> Result<Token, AuthError> {
    let command = format!("{program} {}", args.join(" "));
    let run = tokio::process::Command::new(program)
        .args(args)
        .kill_on_drop(true)
        .stdin(std::process::Stdio::null())
        .output();
    let output = match tokio::time::timeout(timeout, run).await {
        Err(_) => {
            return Err(AuthError::Cli {
                command,
                reason: format!("no answer within {}", humantime::format_duration(timeout)),
            });
        }
        Ok(Err(e)) => {
            return Err(AuthError::Cli {
                command,
                reason: format!("cannot run it: {e}"),
            });
        }
        Ok(Ok(o)) => o,
    };
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(AuthError::Cli {
            command,
            reason: format!(
                "exit status {}: {}",
                output.status,
                crate::text::one_line(stderr.trim(), 300)
            ),
        });
    }
    let parsed: CliToken = serde_json::from_slice(&output.stdout).map_err(|e| AuthError::Cli {
        command: command.clone(),
        reason: format!("unexpected output (not a token JSON: {e})"),
    })?;
    let lifetime = parsed
        .expiry
        .as_deref()
        .and_then(|e| humantime::parse_rfc3339_weak(e).ok())
        .map(|exp| {
            exp.duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO)
        });
    Token::new(
        parsed.access_token,
        lifetime.or(Some(Duration::from_secs(600))),
    )
    .map_err(|reason| AuthError::Cli { command, reason })
}

/// The token sources of one process, built once: hops configured with the same spec share one
/// source (and so one cache and one refresh).
pub struct TokenSources {
    by_spec: std::sync::Mutex<HashMap<String, TokenSource>>,
    databricks: DatabricksConfig,
    http: HttpClient,
    metrics: Arc<Metrics>,
}

impl TokenSources {
    pub fn new(databricks: DatabricksConfig, http: HttpClient, metrics: Arc<Metrics>) -> Self {
        Self {
            by_spec: std::sync::Mutex::new(HashMap::new()),
            databricks,
            http,
            metrics,
        }
    }

    /// The source for `spec`, creating it on first use. Config validation guarantees that the
    /// `[databricks]` settings a spec needs are present; if they are not, the source fails
    /// every call with a clear error rather than panicking.
    ///
    /// For the on-behalf-of-user specs this is the app's part ([`AuthSpec::app_part`]): the
    /// user's own token is per request and never cached here.
    pub fn get(&self, spec: &AuthSpec) -> TokenSource {
        let spec = spec.app_part();
        let key = spec.to_string();
        // A poisoned lock only means another thread panicked while inserting; the map is
        // still usable.
        let mut map = self
            .by_spec
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        map.entry(key).or_insert_with(|| self.build(spec)).clone()
    }

    fn build(&self, spec: &AuthSpec) -> TokenSource {
        let db = &self.databricks;
        match spec {
            AuthSpec::None => TokenSource::None,
            AuthSpec::BearerEnv { token, .. } => {
                match Token::new(token.expose().to_owned(), None) {
                    Ok(t) => TokenSource::Static(Arc::new(t)),
                    Err(reason) => self.failing("bearer-env", reason),
                }
            }
            AuthSpec::DatabricksOauth => {
                let (Some(host), Some(id), Some(secret)) =
                    (&db.host, &db.client_id, &db.client_secret)
                else {
                    return self.failing(
                        "databricks-oauth",
                        "databricks host, client id and client secret are required".to_owned(),
                    );
                };
                let endpoint = format!("{}/oidc/v1/token", host.as_str().trim_end_matches('/'));
                let creds = base64::engine::general_purpose::STANDARD
                    .encode(format!("{id}:{}", secret.expose()));
                let Ok(mut basic) = HeaderValue::from_str(&format!("Basic {creds}")) else {
                    return self.failing(
                        "databricks-oauth",
                        "client credentials contain characters not allowed in a header".to_owned(),
                    );
                };
                basic.set_sensitive(true);
                TokenSource::Refreshing(Arc::new(Refreshing {
                    label: "databricks-oauth",
                    fetcher: Fetcher::Oauth(Box::new(OauthFetcher {
                        http: self.http.clone(),
                        endpoint,
                        basic,
                        timeout: db.token_timeout,
                    })),
                    current: ArcSwapOption::empty(),
                    refresh: Mutex::new(None),
                    metrics: self.metrics.clone(),
                }))
            }
            AuthSpec::DatabricksCli => {
                let mut args = vec!["auth".to_owned(), "token".to_owned()];
                if let Some(profile) = &db.cli_profile {
                    args.extend(["--profile".to_owned(), profile.clone()]);
                } else if let Some(host) = &db.host {
                    args.extend([
                        "--host".to_owned(),
                        host.as_str().trim_end_matches('/').to_owned(),
                    ]);
                }
                TokenSource::Refreshing(Arc::new(Refreshing {
                    label: "databricks-cli",
                    fetcher: Fetcher::Cli {
                        program: db.cli_path.clone(),
                        args,
                        timeout: db.token_timeout,
                    },
                    current: ArcSwapOption::empty(),
                    refresh: Mutex::new(None),
                    metrics: self.metrics.clone(),
                }))
            }
            // `get` passes only the app's part of these.
            AuthSpec::User => TokenSource::None,
            AuthSpec::UserOrApp => self.build(&AuthSpec::DatabricksOauth),
        }
    }

    /// A source that fails every call with `reason` (a misconfiguration config validation
    /// should already have caught).
    fn failing(&self, label: &'static str, reason: String) -> TokenSource {
        TokenSource::Refreshing(Arc::new(Refreshing {
            label,
            fetcher: Fetcher::Fail(AuthError::Invalid {
                endpoint: label.to_owned(),
                reason,
            }),
            current: ArcSwapOption::empty(),
            refresh: Mutex::new(None),
            metrics: self.metrics.clone(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_freshness_uses_margin_or_half_life() {
        let now = Instant::now();
        let long = Token::new("a".into(), Some(Duration::from_secs(3600))).unwrap();
        assert!(long.fresh(now));
        assert!(!long.fresh(now + Duration::from_secs(3600 - 200)));
        assert!(long.valid(now + Duration::from_secs(3600 - 200)));
        let short = Token::new("b".into(), Some(Duration::from_secs(4))).unwrap();
        assert!(short.fresh(now));
        assert!(!short.fresh(now + Duration::from_secs(3)));
        let forever = Token::new("c".into(), None).unwrap();
        assert!(forever.fresh(now + Duration::from_secs(1 << 30)));
    }

    #[test]
    fn header_is_sensitive_and_debug_hides_token() {
        let t = Token::new("super-secret".into(), None).unwrap();
        assert!(t.header.is_sensitive());
        assert!(!format!("{t:?}").contains("super-secret"));
    }
}
