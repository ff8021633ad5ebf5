//! Configuration: one TOML file plus the environment, turned into a validated, typed [`Config`]
//! before any port is bound.
//!
//! Reading happens in three explicit steps, each testable without touching the process
//! environment:
//!
//! 1. parse the TOML and replace `${VAR}` / `${VAR:-default}` references from an [`Env`];
//! 2. deserialize into the raw mirror of the file (`raw.rs`), rejecting unknown keys;
//! 3. apply the Databricks Apps overlay (`DATABRICKS_APP_PORT`, `DATABRICKS_HOST`,
//!    `DATABRICKS_CLIENT_ID/SECRET`, `MLFLOW_EXPERIMENT_ID`, libpq `PG*`) and validate into typed
//!    values: durations are [`Duration`]s, addresses [`SocketAddr`]s, URLs [`Url`]s, secrets
//!    [`Secret`]s that never print.
//!
//! Errors name the key (`agent.url: …`) so that `check-config` can print one clear line.
//! This module does not open sockets, files other than the config itself, or databases.

mod env;
mod raw;

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use http::{HeaderName, HeaderValue};
use serde::{Serialize, Serializer};
use url::Url;

pub use env::{Env, Missing};
use raw::{Raw, RawSize};

/// Default listen address for local runs.
const DEFAULT_LISTEN: &str = "127.0.0.1:8000";
/// Default agent paths when neither `agent.paths` nor `[[agent.routes]]` is given: the two
/// endpoints of an MLflow agent server.
const DEFAULT_AGENT_PATHS: [&str; 2] = ["/invocations", "/responses"];
/// Paths the proxy serves itself; an agent route may not shadow them.
const RESERVED_PATHS: [&str; 4] = ["/healthz", "/readyz", "/metrics", "/api/feedback"];

/// A configuration problem, naming the key it concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    problems: Vec<Problem>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Problem {
    key: String,
    message: String,
}

impl ConfigError {
    fn one(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            problems: vec![Problem {
                key: key.into(),
                message: message.into(),
            }],
        }
    }

    /// The keys that have problems, in the order found.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.problems.iter().map(|p| p.key.as_str())
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            if p.key.is_empty() {
                f.write_str(&p.message)?;
            } else {
                write!(f, "{}: {}", p.key, p.message)?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// A secret value (client secret, token, password). It never appears in `Debug`, `Display` or
/// serialized output; code that needs the value calls [`Secret::expose`].
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself. Callers must not log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("<redacted>")
    }
}

/// The validated configuration.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    /// Where the main listener binds.
    #[serde(serialize_with = "ser_display")]
    pub listen: SocketAddr,
    /// How long in-flight requests and streams may run after a shutdown signal.
    #[serde(serialize_with = "ser_duration")]
    pub shutdown_grace: Duration,
    pub log: LogConfig,
    pub identity: IdentityConfig,
    pub databricks: DatabricksConfig,
    pub agent: AgentConfig,
    pub mlflow: MlflowConfig,
    pub delivery: DeliveryConfig,
    pub feedback: FeedbackConfig,
    pub store: StoreConfig,
    pub ui: UiConfig,
    pub metrics: MetricsConfig,
    pub server: ServerConfig,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Serialize)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A `tracing` filter directive (`RUST_LOG` syntax); `RUST_LOG` itself wins when set.
    pub level: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct IdentityConfig {
    /// Read the user from `x-forwarded-email` & co. Only safe behind a platform that sets them.
    pub trust_forwarded_headers: bool,
    /// The user assumed when no identity header is present (local development only).
    pub dev_user: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DatabricksConfig {
    /// Workspace URL, always with a scheme and without a trailing slash.
    #[serde(serialize_with = "ser_opt_display")]
    pub host: Option<Url>,
    pub client_id: Option<String>,
    pub client_secret: Option<Secret>,
    pub cli_profile: Option<String>,
    /// The `databricks` executable used by `auth = "databricks-cli"`.
    pub cli_path: String,
    /// Timeout for one token request (OAuth endpoint or CLI run).
    #[serde(serialize_with = "ser_duration")]
    pub token_timeout: Duration,
}

/// How the proxy authenticates one of its upstream hops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthSpec {
    /// No `authorization` header.
    None,
    /// A static bearer token read from an environment variable at start-up.
    BearerEnv { var: String, token: Secret },
    /// Databricks OAuth machine-to-machine (client credentials) with the app's service principal.
    DatabricksOauth,
    /// `databricks auth token` (a developer's U2M login), for local runs against a workspace.
    DatabricksCli,
}

impl AuthSpec {
    fn parse(key: &str, text: &str, env: &Env) -> Result<Self, ConfigError> {
        match text {
            "none" => Ok(Self::None),
            "databricks-oauth" => Ok(Self::DatabricksOauth),
            "databricks-cli" => Ok(Self::DatabricksCli),
            other => match other.strip_prefix("bearer-env:") {
                Some(var) if !var.is_empty() => match env.get(var) {
                    Some(token) => Ok(Self::BearerEnv {
                        var: var.to_owned(),
                        token: Secret::new(token),
                    }),
                    None => Err(ConfigError::one(
                        key,
                        format!("environment variable {var} is not set (needed by \"{text}\")"),
                    )),
                },
                _ => Err(ConfigError::one(
                    key,
                    format!(
                        "unknown auth \"{other}\" (expected \"none\", \"bearer-env:VAR\", \"databricks-oauth\" or \"databricks-cli\")"
                    ),
                )),
            },
        }
    }
}

impl fmt::Display for AuthSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::None => f.write_str("none"),
            Self::BearerEnv { var, .. } => write!(f, "bearer-env:{var}"),
            Self::DatabricksOauth => f.write_str("databricks-oauth"),
            Self::DatabricksCli => f.write_str("databricks-cli"),
        }
    }
}

impl Serialize for AuthSpec {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// One inbound path prefix forwarded to the agent, with its per-route options.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AgentRoute {
    /// Inbound path prefix (segment-aware: `/invocations` matches `/invocations` and
    /// `/invocations/x`, not `/invocationsx`).
    pub path: String,
    /// Replaces `path` in the upstream request path when set.
    pub upstream_path: Option<String>,
    /// Add `databricks_options.return_trace = true` to JSON bodies (Model Serving endpoints).
    pub return_trace: bool,
    /// Add `context.conversation_id` / `context.user_id` to JSON bodies.
    pub context: bool,
    /// Mint a client request id, send it as `x-client-request-id` and
    /// `custom_inputs.client_request_id`.
    pub client_request_id: bool,
    /// Inject `feedback-proxy.meta` / `feedback-proxy.trace` SSE events.
    pub events: bool,
    /// Methods forwarded on this route (`methods`, default `["POST"]`); others are 405.
    #[serde(serialize_with = "ser_methods")]
    pub methods: Vec<http::Method>,
}

impl AgentRoute {
    /// Whether any option requires the JSON request body to be rewritten.
    pub fn rewrites_body(&self) -> bool {
        self.return_trace || self.context || self.client_request_id
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct AgentConfig {
    /// Base URL of the Agent App (scheme, host, port and an optional base path).
    #[serde(serialize_with = "ser_display")]
    pub url: Url,
    pub routes: Vec<AgentRoute>,
    pub auth: AuthSpec,
    #[serde(serialize_with = "ser_duration")]
    pub connect_timeout: Duration,
    /// How long to wait for the agent's response headers. Agents whose tracking server is down
    /// can stall for minutes before their first byte, hence the generous default.
    #[serde(serialize_with = "ser_duration")]
    pub response_header_timeout: Duration,
    /// The longest silence allowed between two frames of a response body.
    #[serde(serialize_with = "ser_duration")]
    pub idle_timeout: Duration,
    /// Cap on a JSON request body the proxy rewrites (413 past it).
    pub max_rewrite_bytes: usize,
    /// Cap on one SSE event (or a JSON response body) inspected for trace ids; past it the
    /// stream is still forwarded, only inspection stops.
    pub max_inspect_bytes: usize,
    /// Response headers that carry a trace id.
    #[serde(serialize_with = "ser_headers")]
    pub trace_id_headers: Vec<HeaderName>,
    #[serde(serialize_with = "ser_duration")]
    pub pool_idle_timeout: Duration,
    pub pool_max_idle_per_host: usize,
    /// Offer HTTP/2 to an `https://` agent (ALPN). Off (HTTP/1.1, one connection per open
    /// stream) by default: one shared HTTP/2 connection makes chats beyond the agent server's
    /// concurrent-stream limit wait (see `client::ClientOptions::http2`).
    pub http2: bool,
    /// Capacity of the queue of message links waiting to be written to the store.
    pub link_queue: usize,
    /// Agent requests one user may have open at once (429 past it); 0 disables the cap.
    pub max_concurrent_per_user: usize,
    /// Most messages whose links are held in memory while the store is unavailable (past it,
    /// links of further answers are given up and counted).
    pub link_buffer: usize,
    /// How long a chat with a client-chosen message id waits for the store to confirm the id
    /// is free or the caller's before the agent is called; past it (or on a store error) the
    /// client's id is kept and ownership is settled when the link is written.
    #[serde(serialize_with = "ser_duration")]
    pub claim_timeout: Duration,
    /// Agent response headers passed to the browser although the proxy drops them by default
    /// (`set-cookie`, `access-control-*`, `strict-transport-security`, identity headers).
    #[serde(serialize_with = "ser_headers")]
    pub pass_response_headers: Vec<HeaderName>,
}

#[derive(Debug, Clone, Serialize)]
pub struct MlflowConfig {
    /// Base URL of the tracking server; `None` disables delivery (`no_experiment_id`).
    #[serde(serialize_with = "ser_opt_display")]
    pub tracking_uri: Option<Url>,
    pub experiment_id: Option<String>,
    pub auth: AuthSpec,
    /// Timeout for one MLflow call.
    #[serde(serialize_with = "ser_duration")]
    pub timeout: Duration,
    /// Send a deterministic client-chosen `assessment_id` on create (honoured by open-source
    /// MLflow; an idempotency key that closes the crash window).
    pub client_assessment_ids: bool,
}

impl MlflowConfig {
    /// Whether feedback can be delivered at all.
    pub fn enabled(&self) -> bool {
        self.tracking_uri.is_some() && self.experiment_id.is_some()
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct DeliveryConfig {
    /// How long `POST /api/feedback` waits for the first delivery attempt before answering
    /// `queued`.
    #[serde(serialize_with = "ser_duration")]
    pub inline_deadline: Duration,
    #[serde(serialize_with = "ser_duration")]
    pub poll_interval: Duration,
    pub batch_size: u32,
    /// The most attempts in flight per process; the worker adapts below it (`feedback::pace`).
    pub concurrency: usize,
    /// How long a claimed delivery stays invisible to other workers unless its attempt renews
    /// it (every third of it).
    #[serde(serialize_with = "ser_duration")]
    pub lease: Duration,
    #[serde(serialize_with = "ser_duration")]
    pub backoff_initial: Duration,
    #[serde(serialize_with = "ser_duration")]
    pub backoff_max: Duration,
    /// How long a trace that answers 404 (not flushed yet) is retried.
    #[serde(serialize_with = "ser_duration")]
    pub not_found_horizon: Duration,
    /// How long retryable failures (5xx, timeouts) are retried before dead-lettering.
    #[serde(serialize_with = "ser_duration")]
    pub max_age: Duration,
    /// Run the background worker in this process.
    pub worker: bool,
    /// How often the worker searches MLflow, by the proxy's client request id, for the traces
    /// of votes waiting without one (for at most `max_age` after the vote).
    #[serde(serialize_with = "ser_duration")]
    pub trace_lookup_interval: Duration,
}

/// Kinds of value an assessment name accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct ValueKinds {
    pub bool: bool,
    pub number: bool,
    pub string: bool,
}

impl ValueKinds {
    pub const ANY: Self = Self {
        bool: true,
        number: true,
        string: true,
    };

    /// A human list such as `"bool or number"`.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if self.bool {
            parts.push("bool");
        }
        if self.number {
            parts.push("number");
        }
        if self.string {
            parts.push("string");
        }
        parts.join(" or ")
    }
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct RateLimit {
    pub per_second: f64,
    pub burst: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct FeedbackConfig {
    pub max_body_bytes: usize,
    pub max_comment_bytes: usize,
    pub default_name: String,
    /// Allowed assessment names and the value kinds each accepts.
    pub names: BTreeMap<String, ValueKinds>,
    /// Origins allowed to call the feedback API cross-site; empty sends no CORS headers.
    #[serde(serialize_with = "ser_header_values")]
    pub cors_origins: Vec<HeaderValue>,
    /// Per-user rate limit; `None` disables it.
    pub rate_limit: Option<RateLimit>,
}

/// libpq `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    /// The libpq spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Disable => "disable",
            Self::Allow => "allow",
            Self::Prefer => "prefer",
            Self::Require => "require",
            Self::VerifyCa => "verify-ca",
            Self::VerifyFull => "verify-full",
        }
    }
}

impl FromStr for SslMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "disable" => Self::Disable,
            "allow" => Self::Allow,
            "prefer" => Self::Prefer,
            "require" => Self::Require,
            "verify-ca" => Self::VerifyCa,
            "verify-full" => Self::VerifyFull,
            other => {
                return Err(format!(
                    "unknown sslmode \"{other}\" (expected disable, allow, prefer, require, verify-ca or verify-full)"
                ));
            }
        })
    }
}

/// Where Postgres passwords come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PasswordSource {
    /// The password in the URL or `PGPASSWORD` (or none: trust / peer auth).
    Static,
    /// The app's Databricks OAuth token (Lakebase provisioned tier accepts it directly).
    DatabricksOauth,
    /// `POST /api/2.0/database/credentials` for a provisioned Lakebase instance.
    LakebaseProvisioned { instance: String },
    /// `POST /api/2.0/postgres/credentials` for an autoscaling Lakebase endpoint.
    LakebaseAutoscaling { endpoint: String },
}

impl PasswordSource {
    fn parse(text: &str) -> Result<Self, String> {
        match text {
            "static" => Ok(Self::Static),
            "databricks-oauth" => Ok(Self::DatabricksOauth),
            other => {
                if let Some(instance) = other.strip_prefix("lakebase-provisioned:") {
                    if !instance.is_empty() {
                        return Ok(Self::LakebaseProvisioned {
                            instance: instance.to_owned(),
                        });
                    }
                }
                if let Some(endpoint) = other.strip_prefix("lakebase-autoscaling:") {
                    if !endpoint.is_empty() {
                        return Ok(Self::LakebaseAutoscaling {
                            endpoint: endpoint.to_owned(),
                        });
                    }
                }
                Err(format!(
                    "unknown password source \"{other}\" (expected \"static\", \"databricks-oauth\", \"lakebase-provisioned:INSTANCE\" or \"lakebase-autoscaling:projects/P/branches/B/endpoints/E\")"
                ))
            }
        }
    }

    /// Whether the password is minted through Databricks (needs `[databricks]` credentials).
    pub fn uses_databricks(&self) -> bool {
        !matches!(self, Self::Static)
    }
}

impl fmt::Display for PasswordSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Static => f.write_str("static"),
            Self::DatabricksOauth => f.write_str("databricks-oauth"),
            Self::LakebaseProvisioned { instance } => write!(f, "lakebase-provisioned:{instance}"),
            Self::LakebaseAutoscaling { endpoint } => write!(f, "lakebase-autoscaling:{endpoint}"),
        }
    }
}

impl Serialize for PasswordSource {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Postgres connection parameters (libpq semantics: URL parts win, `PG*` variables fill in).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PgConnect {
    /// Host names, IP addresses or Unix socket directories (tried in order).
    pub hosts: Vec<String>,
    pub port: u16,
    pub user: String,
    pub dbname: String,
    pub password: Option<Secret>,
    pub sslmode: SslMode,
    /// CA bundle for `verify-ca` / `verify-full` (default: the system roots).
    #[serde(serialize_with = "ser_opt_path")]
    pub sslrootcert: Option<PathBuf>,
    pub application_name: Option<String>,
}

/// Which store backend, and where.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum StoreKind {
    /// An embedded SQLite file (single instance only).
    Sqlite {
        #[serde(serialize_with = "ser_path")]
        path: PathBuf,
    },
    Postgres(PgConnect),
}

impl StoreKind {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Sqlite { .. } => "sqlite",
            Self::Postgres(_) => "postgres",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct StoreConfig {
    pub kind: StoreKind,
    /// Schema holding the proxy's tables (Postgres).
    pub schema: String,
    pub pool_size: usize,
    #[serde(serialize_with = "ser_duration")]
    pub connect_timeout: Duration,
    /// Postgres cancels a statement running (or waiting for a lock) longer than this, so a
    /// stuck database fails requests with a clear error instead of hanging them.
    #[serde(serialize_with = "ser_duration")]
    pub statement_timeout: Duration,
    /// Connections older than this are replaced, so rotated credentials take over.
    #[serde(serialize_with = "ser_duration")]
    pub max_lifetime: Duration,
    pub password: PasswordSource,
    /// Run migrations at start-up.
    pub migrate: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct UiConfig {
    /// Serve this directory at `/` (SPA fallback); `None` serves the embedded reference page.
    #[serde(serialize_with = "ser_opt_path")]
    pub dir: Option<PathBuf>,
    pub enabled: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct MetricsConfig {
    /// A separate listener for `/metrics` (recommended when the main port is public).
    #[serde(serialize_with = "ser_opt_display")]
    pub listen: Option<SocketAddr>,
    /// Also serve `/metrics` on the main port.
    pub on_main_port: bool,
}

/// Connection lifetimes and limits of the listeners (`[server]`).
#[derive(Debug, Clone, Serialize)]
pub struct ServerConfig {
    /// Open connections per listener; past it the listener stops accepting until one closes.
    pub max_connections: usize,
    /// From accept until the protocol is known (first request bytes or the whole HTTP/2
    /// preface).
    #[serde(serialize_with = "ser_duration")]
    pub handshake_timeout: Duration,
    /// HTTP/1.1: time to receive a request's headers, counted from when the connection starts
    /// waiting for them (so it also bounds keep-alive idleness).
    #[serde(serialize_with = "ser_duration")]
    pub header_read_timeout: Duration,
    /// Longest time a connection may stay open with no request in flight (HTTP/2 pings do not
    /// count as activity).
    #[serde(serialize_with = "ser_duration")]
    pub idle_timeout: Duration,
    /// Longest silence while reading a request body (408 past it).
    #[serde(serialize_with = "ser_duration")]
    pub request_body_timeout: Duration,
    /// Requests a client may abandon (HTTP/2 RST_STREAM, or a disconnect) per connection before
    /// the connection is told to go away; `None` disables the check.
    pub reset_rate: Option<RateLimit>,
}

impl Config {
    /// Reads and validates the file at `path` in `env`.
    pub fn load(path: &Path, env: &Env) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::one(
                "",
                format!("cannot read config file {}: {e}", path.display()),
            )
        })?;
        Self::from_toml_str(&text, env)
    }

    /// Parses and validates a configuration given as TOML text.
    pub fn from_toml_str(text: &str, env: &Env) -> Result<Self, ConfigError> {
        let mut value: toml::Value = toml::from_str(text).map_err(|e| {
            // toml's messages span several lines (a snippet with a caret); keep the first
            // line and the position so the error stays one line.
            let line = e
                .span()
                .map(|s| 1 + text[..s.start.min(text.len())].matches('\n').count());
            let msg = e.message().trim().to_owned();
            match line {
                Some(l) => ConfigError::one("", format!("invalid TOML at line {l}: {msg}")),
                None => ConfigError::one("", format!("invalid TOML: {msg}")),
            }
        })?;
        env::interpolate(&mut value, env).map_err(|missing| ConfigError {
            problems: missing
                .into_iter()
                .map(|m| Problem {
                    key: m.key,
                    message: format!("environment variable {} is not set", m.var),
                })
                .collect(),
        })?;
        let raw: Raw = serde_path_to_error::deserialize(value).map_err(|e| {
            let key = e.path().to_string();
            let key = if key == "." { String::new() } else { key };
            ConfigError::one(key, clean_serde_message(&e.inner().to_string()))
        })?;
        Self::from_raw(raw, env)
    }

    fn from_raw(raw: Raw, env: &Env) -> Result<Self, ConfigError> {
        let mut v = Validator::default();

        let listen = match env.get("DATABRICKS_APP_PORT") {
            Some(port) => match port.parse::<u16>() {
                Ok(port) => SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port),
                Err(_) => {
                    v.problem(
                        "listen",
                        format!("DATABRICKS_APP_PORT is not a port number: \"{port}\""),
                    );
                    SocketAddr::from(([0, 0, 0, 0], 8000))
                }
            },
            None => v.addr("listen", raw.listen.as_deref().unwrap_or(DEFAULT_LISTEN)),
        };
        let shutdown_grace = v.duration("shutdown_grace", raw.shutdown_grace.as_deref(), "10s");

        let log = LogConfig {
            format: match raw.log.format.as_deref() {
                None | Some("text") => LogFormat::Text,
                Some("json") => LogFormat::Json,
                Some(other) => {
                    v.problem(
                        "log.format",
                        format!("unknown format \"{other}\" (expected \"text\" or \"json\")"),
                    );
                    LogFormat::Text
                }
            },
            level: {
                let level = raw.log.level.unwrap_or_else(|| "info".to_owned());
                if let Err(e) = tracing_subscriber::EnvFilter::try_new(&level) {
                    v.problem("log.level", format!("invalid filter \"{level}\": {e}"));
                }
                level
            },
        };

        let identity = IdentityConfig {
            trust_forwarded_headers: raw.identity.trust_forwarded_headers.unwrap_or(false),
            dev_user: raw.identity.dev_user.filter(|u| !u.trim().is_empty()),
        };

        let databricks = DatabricksConfig {
            host: raw
                .databricks
                .host
                .or_else(|| env.get("DATABRICKS_HOST").map(str::to_owned))
                .and_then(|h| v.host_url("databricks.host", &h)),
            client_id: raw
                .databricks
                .client_id
                .or_else(|| env.get("DATABRICKS_CLIENT_ID").map(str::to_owned))
                .filter(|s| !s.is_empty()),
            client_secret: raw
                .databricks
                .client_secret
                .or_else(|| env.get("DATABRICKS_CLIENT_SECRET").map(str::to_owned))
                .filter(|s| !s.is_empty())
                .map(Secret::new),
            cli_profile: raw
                .databricks
                .cli_profile
                .or_else(|| env.get("DATABRICKS_CONFIG_PROFILE").map(str::to_owned)),
            cli_path: raw
                .databricks
                .cli_path
                .unwrap_or_else(|| "databricks".to_owned()),
            token_timeout: v.duration(
                "databricks.token_timeout",
                raw.databricks.token_timeout.as_deref(),
                "10s",
            ),
        };

        let agent = v.agent(raw.agent, env);
        let mlflow = v.mlflow(raw.mlflow, env, &databricks);
        let delivery = v.delivery(raw.delivery);
        let feedback = v.feedback(raw.feedback);
        let store = v.store(raw.store, env);
        let ui = UiConfig {
            dir: raw.ui.dir.map(PathBuf::from),
            enabled: raw.ui.enabled.unwrap_or(true),
        };
        let metrics = MetricsConfig {
            listen: raw.metrics.listen.map(|l| v.addr("metrics.listen", &l)),
            on_main_port: raw.metrics.on_main_port.unwrap_or(false),
        };
        let server = v.server(raw.server);

        // Cross-checks: what each auth choice needs from [databricks].
        for (key, auth) in [("agent.auth", &agent.auth), ("mlflow.auth", &mlflow.auth)] {
            v.check_auth(key, auth, &databricks);
        }
        if store.password.uses_databricks() {
            v.check_auth("store.password", &AuthSpec::DatabricksOauth, &databricks);
        }
        if delivery.lease < Duration::from_secs(1) {
            v.problem(
                "delivery.lease",
                "must be at least 1s (attempts renew it every third of its length)",
            );
        }

        v.finish()?;
        Ok(Config {
            listen,
            shutdown_grace,
            log,
            identity,
            databricks,
            agent,
            mlflow,
            delivery,
            feedback,
            store,
            ui,
            metrics,
            server,
        })
    }

    /// The effective configuration as TOML, secrets redacted (for `check-config`).
    pub fn to_redacted_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }

    /// Risky settings worth a warning at start-up.
    pub fn warnings(&self, env: &Env) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(user) = &self.identity.dev_user {
            if env.get("DATABRICKS_APP_NAME").is_some() {
                out.push(format!(
                    "identity.dev_user = \"{user}\" is set while running as a Databricks App: requests without identity headers will act as that user"
                ));
            }
        }
        if !self.identity.trust_forwarded_headers && env.get("DATABRICKS_APP_NAME").is_some() {
            out.push("identity.trust_forwarded_headers is false on Databricks Apps: the platform's user headers are ignored".to_owned());
        }
        if self.identity.trust_forwarded_headers && env.get("DATABRICKS_APP_NAME").is_none() {
            out.push("identity.trust_forwarded_headers is true outside Databricks Apps: any client can claim any identity unless a trusted proxy strips x-forwarded-* headers".to_owned());
        }
        if self.metrics.on_main_port && !self.listen.ip().is_loopback() {
            out.push(
                "metrics.on_main_port = true on a non-loopback listener: /metrics is public"
                    .to_owned(),
            );
        }
        if matches!(self.store.kind, StoreKind::Sqlite { .. })
            && env.get("DATABRICKS_APP_NAME").is_some()
        {
            out.push("the SQLite store is single-instance and lives on the app's ephemeral disk: configure Postgres (Lakebase) for production".to_owned());
        }
        if let StoreKind::Postgres(pg) = &self.store.kind {
            if matches!(
                pg.sslmode,
                SslMode::Disable | SslMode::Allow | SslMode::Prefer
            ) && !pg_hosts_local(&pg.hosts)
            {
                out.push(format!(
                    "store sslmode={} for a remote Postgres host: the connection may be unencrypted",
                    pg.sslmode.as_str()
                ));
            }
        }
        if self.mlflow.tracking_uri.is_some() && self.mlflow.experiment_id.is_none() {
            out.push("mlflow.tracking_uri is set but mlflow.experiment_id is not: feedback will answer no_experiment_id".to_owned());
        }
        let hops = [
            ("agent.url", Some(&self.agent.url), &self.agent.auth),
            (
                "mlflow.tracking_uri",
                self.mlflow.tracking_uri.as_ref(),
                &self.mlflow.auth,
            ),
        ];
        for (key, url, auth) in hops {
            let Some(url) = url else { continue };
            // A token sent in the clear to another machine.
            if url.scheme() == "http" && *auth != AuthSpec::None && !is_local_host(url) {
                out.push(format!(
                    "{key} is plain http:// to {} with auth \"{auth}\": the token crosses the network unencrypted",
                    url.host_str().unwrap_or_default()
                ));
            }
            // Databricks answers every unauthenticated call with 401 (or a login redirect).
            if *auth == AuthSpec::None && self.is_databricks_url(url) {
                out.push(format!(
                    "{key} is a Databricks URL but its auth is \"none\": every call will be rejected (use \"databricks-oauth\")"
                ));
            }
        }
        if let StoreKind::Postgres(pg) = &self.store.kind {
            if self.store.password == PasswordSource::Static
                && pg.password.is_none()
                && !pg_hosts_local(&pg.hosts)
            {
                out.push(format!(
                    "store: Postgres at {} with no password (store.password = \"static\", none in the URL or PGPASSWORD): login fails unless the server trusts this client; Lakebase needs store.password = \"databricks-oauth\"",
                    pg.hosts.join(",")
                ));
            }
        }
        out
    }

    /// Whether `url` is served by Databricks: the workspace host or a Databricks App.
    fn is_databricks_url(&self, url: &Url) -> bool {
        let Some(host) = url.host_str() else {
            return false;
        };
        self.databricks
            .host
            .as_ref()
            .and_then(|h| h.host_str())
            .is_some_and(|h| h.eq_ignore_ascii_case(host))
            || host.to_ascii_lowercase().ends_with(".databricksapps.com")
    }
}

/// Whether every Postgres host is this machine (a Unix socket directory or a loopback name).
fn pg_hosts_local(hosts: &[String]) -> bool {
    hosts
        .iter()
        .all(|h| h.starts_with('/') || h == "localhost" || h.starts_with("127."))
}

/// Whether a URL points at this machine (the loopback name or a loopback address).
fn is_local_host(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

/// serde's messages list every expected field in backticks; keep them but call it a key.
fn clean_serde_message(msg: &str) -> String {
    // toml appends "\nin `table`"; the key path already says where.
    let msg = msg.lines().next().unwrap_or_default();
    let msg = msg.replace("unknown field", "unknown key");
    // The path is already printed as the key; drop serde's trailing position info if any.
    match msg.find(" at line ") {
        Some(i) => msg[..i].to_owned(),
        None => msg,
    }
}

/// Collects problems while building typed values, so that one run reports all of them.
#[derive(Default)]
struct Validator {
    problems: Vec<Problem>,
}

impl Validator {
    fn problem(&mut self, key: &str, message: impl Into<String>) {
        self.problems.push(Problem {
            key: key.to_owned(),
            message: message.into(),
        });
    }

    fn finish(self) -> Result<(), ConfigError> {
        if self.problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError {
                problems: self.problems,
            })
        }
    }

    fn duration(&mut self, key: &str, text: Option<&str>, default: &str) -> Duration {
        let text = text.unwrap_or(default);
        match humantime::parse_duration(text) {
            Ok(d) => d,
            Err(e) => {
                self.problem(
                    key,
                    format!(
                        "invalid duration \"{text}\" ({e}; examples: \"500ms\", \"10s\", \"15m\")"
                    ),
                );
                humantime::parse_duration(default).unwrap_or_default()
            }
        }
    }

    fn size(&mut self, key: &str, raw: Option<RawSize>, default: u64) -> usize {
        let bytes = match raw {
            None => default,
            Some(RawSize::Bytes(n)) => n,
            Some(RawSize::Text(t)) => match t.trim().parse::<bytesize::ByteSize>() {
                Ok(b) => b.as_u64(),
                Err(e) => {
                    self.problem(
                        key,
                        format!("invalid size \"{t}\" ({e}; examples: 4096, \"64KiB\", \"1MiB\")"),
                    );
                    default
                }
            },
        };
        if bytes == 0 {
            self.problem(key, "must be greater than zero");
        }
        usize::try_from(bytes).unwrap_or(usize::MAX)
    }

    fn addr(&mut self, key: &str, text: &str) -> SocketAddr {
        match text.parse::<SocketAddr>() {
            Ok(a) => a,
            Err(_) => {
                self.problem(
                    key,
                    format!(
                        "invalid address \"{text}\" (expected IP:PORT, e.g. \"127.0.0.1:8000\")"
                    ),
                );
                SocketAddr::from(([127, 0, 0, 1], 0))
            }
        }
    }

    /// An http(s) base URL. Without a path, or with one (kept as a base path).
    fn http_url(&mut self, key: &str, text: &str) -> Option<Url> {
        match Url::parse(text) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {
                if u.query().is_some() || u.fragment().is_some() {
                    self.problem(
                        key,
                        format!(
                            "URL \"{}\" must not have a query or fragment",
                            redact_url_text(text)
                        ),
                    );
                    return None;
                }
                if !u.username().is_empty() || u.password().is_some() {
                    self.problem(
                        key,
                        "URL must not embed credentials (use the auth setting)".to_owned(),
                    );
                    return None;
                }
                Some(u)
            }
            Ok(_) => {
                self.problem(
                    key,
                    format!(
                        "invalid URL \"{}\" (expected http:// or https:// with a host)",
                        redact_url_text(text)
                    ),
                );
                None
            }
            Err(e) => {
                self.problem(
                    key,
                    format!("invalid URL \"{}\" ({e})", redact_url_text(text)),
                );
                None
            }
        }
    }

    /// A workspace host, as `DATABRICKS_HOST` gives it: with or without a scheme.
    fn host_url(&mut self, key: &str, text: &str) -> Option<Url> {
        let trimmed = text.trim().trim_end_matches('/');
        let with_scheme = if trimmed.contains("://") {
            trimmed.to_owned()
        } else {
            format!("https://{trimmed}")
        };
        self.http_url(key, &with_scheme)
    }

    fn check_auth(&mut self, key: &str, auth: &AuthSpec, db: &DatabricksConfig) {
        match auth {
            AuthSpec::DatabricksOauth => {
                let mut missing = Vec::new();
                if db.host.is_none() {
                    missing.push("databricks.host (DATABRICKS_HOST)");
                }
                if db.client_id.is_none() {
                    missing.push("databricks.client_id (DATABRICKS_CLIENT_ID)");
                }
                if db.client_secret.is_none() {
                    missing.push("databricks.client_secret (DATABRICKS_CLIENT_SECRET)");
                }
                if !missing.is_empty() {
                    self.problem(
                        key,
                        format!("databricks-oauth needs {}", missing.join(", ")),
                    );
                }
            }
            AuthSpec::DatabricksCli => {
                if db.host.is_none() && db.cli_profile.is_none() {
                    self.problem(
                        key,
                        "databricks-cli needs databricks.host or databricks.cli_profile",
                    );
                }
            }
            AuthSpec::None | AuthSpec::BearerEnv { .. } => {}
        }
    }

    fn agent(&mut self, raw: raw::RawAgent, env: &Env) -> AgentConfig {
        let url = match raw.url.as_deref() {
            Some(u) => self.http_url("agent.url", u),
            None => {
                self.problem(
                    "agent.url",
                    "is required (the base URL of the Agent App, e.g. \"http://127.0.0.1:5056\")",
                );
                None
            }
        }
        .unwrap_or_else(|| Url::parse("http://127.0.0.1:1").unwrap_or_else(|_| unreachable!()));

        let mut routes = Vec::new();
        let paths = match (&raw.paths, raw.routes.is_empty()) {
            (Some(p), _) => p.clone(),
            (None, true) => DEFAULT_AGENT_PATHS.iter().map(|s| s.to_string()).collect(),
            (None, false) => Vec::new(),
        };
        for (i, p) in paths.iter().enumerate() {
            let key = format!("agent.paths[{i}]");
            if let Some(path) = self.route_path(&key, p) {
                routes.push(AgentRoute {
                    path,
                    upstream_path: None,
                    return_trace: false,
                    context: false,
                    client_request_id: false,
                    events: false,
                    methods: vec![http::Method::POST],
                });
            }
        }
        for (i, r) in raw.routes.into_iter().enumerate() {
            let key = format!("agent.routes[{i}]");
            let Some(path) = r.path.as_deref() else {
                self.problem(&format!("{key}.path"), "is required");
                continue;
            };
            let Some(path) = self.route_path(&format!("{key}.path"), path) else {
                continue;
            };
            let upstream_path = r
                .upstream_path
                .as_deref()
                .and_then(|u| self.route_path(&format!("{key}.upstream_path"), u));
            let methods = self.route_methods(&format!("{key}.methods"), r.methods.as_deref());
            routes.push(AgentRoute {
                path,
                upstream_path,
                return_trace: r.return_trace.unwrap_or(false),
                context: r.context.unwrap_or(false),
                client_request_id: r.client_request_id.unwrap_or(false),
                events: r.events.unwrap_or(false),
                methods,
            });
        }
        let mut seen = std::collections::BTreeSet::new();
        for r in &routes {
            if !seen.insert(r.path.clone()) {
                self.problem(
                    "agent.routes",
                    format!("path \"{}\" is configured twice", r.path),
                );
            }
            if RESERVED_PATHS
                .iter()
                .any(|res| path_has_prefix(res, &r.path) || path_has_prefix(&r.path, res))
            {
                self.problem(
                    "agent.routes",
                    format!(
                        "path \"{}\" overlaps a path the proxy serves itself ({})",
                        r.path,
                        RESERVED_PATHS.join(", ")
                    ),
                );
            }
        }
        // Longest prefix first, so that matching can take the first hit.
        routes.sort_by_key(|r| std::cmp::Reverse(r.path.len()));

        let auth = self.auth("agent.auth", raw.auth.as_deref(), env);
        let mut trace_id_headers = Vec::new();
        for (i, h) in raw.trace_id_headers.unwrap_or_default().iter().enumerate() {
            match HeaderName::from_bytes(h.as_bytes()) {
                Ok(n) => trace_id_headers.push(n),
                Err(_) => self.problem(
                    &format!("agent.trace_id_headers[{i}]"),
                    format!("\"{h}\" is not a valid header name"),
                ),
            }
        }
        let mut pass_response_headers = Vec::new();
        for (i, h) in raw
            .pass_response_headers
            .unwrap_or_default()
            .iter()
            .enumerate()
        {
            match HeaderName::from_bytes(h.as_bytes()) {
                Ok(n) => pass_response_headers.push(n),
                Err(_) => self.problem(
                    &format!("agent.pass_response_headers[{i}]"),
                    format!(
                        "\"{}\" is not a valid header name",
                        crate::text::one_line(h, 64)
                    ),
                ),
            }
        }
        let link_queue = raw.link_queue.unwrap_or(16_384);
        if link_queue == 0 {
            self.problem("agent.link_queue", "must be greater than zero");
        }
        // A 10-minute outage at 50 chats/s.
        let link_buffer = raw.link_buffer.unwrap_or(30_000);
        if link_buffer == 0 {
            self.problem("agent.link_buffer", "must be greater than zero");
        }
        let claim_timeout =
            self.duration("agent.claim_timeout", raw.claim_timeout.as_deref(), "250ms");
        if claim_timeout < Duration::from_millis(1) {
            self.problem("agent.claim_timeout", "must be at least 1ms");
        }
        AgentConfig {
            url,
            routes,
            auth,
            connect_timeout: self.duration(
                "agent.connect_timeout",
                raw.connect_timeout.as_deref(),
                "5s",
            ),
            response_header_timeout: self.duration(
                "agent.response_header_timeout",
                raw.response_header_timeout.as_deref(),
                "120s",
            ),
            idle_timeout: self.duration("agent.idle_timeout", raw.idle_timeout.as_deref(), "300s"),
            max_rewrite_bytes: self.size("agent.max_rewrite_bytes", raw.max_rewrite_bytes, 1 << 20),
            max_inspect_bytes: self.size("agent.max_inspect_bytes", raw.max_inspect_bytes, 1 << 20),
            trace_id_headers,
            pool_idle_timeout: self.duration(
                "agent.pool_idle_timeout",
                raw.pool_idle_timeout.as_deref(),
                "90s",
            ),
            pool_max_idle_per_host: raw.pool_max_idle_per_host.unwrap_or(256),
            // Off by default: see `client::ClientOptions::http2` and config/example.toml.
            http2: raw.http2.unwrap_or(false),
            link_queue,
            max_concurrent_per_user: raw.max_concurrent_per_user.unwrap_or(32),
            link_buffer,
            claim_timeout,
            pass_response_headers,
        }
    }

    fn route_path(&mut self, key: &str, p: &str) -> Option<String> {
        if !p.starts_with('/') || p.contains(['?', '#', ' ']) {
            self.problem(
                key,
                format!("\"{p}\" is not a path (expected something like \"/invocations\")"),
            );
            return None;
        }
        let trimmed = p.trim_end_matches('/');
        Some(if trimmed.is_empty() { "/" } else { trimmed }.to_owned())
    }

    /// An agent route's methods: default POST; only methods with a meaning for a chat endpoint.
    fn route_methods(&mut self, key: &str, raw: Option<&[String]>) -> Vec<http::Method> {
        use http::Method;
        let Some(raw) = raw else {
            return vec![Method::POST];
        };
        if raw.is_empty() {
            self.problem(
                key,
                "lists no methods (leave it out for the default [\"POST\"])",
            );
        }
        let mut methods = Vec::new();
        for m in raw {
            let method = match m.as_str() {
                "GET" => Method::GET,
                "HEAD" => Method::HEAD,
                "POST" => Method::POST,
                "PUT" => Method::PUT,
                "PATCH" => Method::PATCH,
                "DELETE" => Method::DELETE,
                other => {
                    self.problem(
                        key,
                        format!(
                            "unsupported method \"{other}\" (expected GET, HEAD, POST, PUT, PATCH or DELETE, in capitals)"
                        ),
                    );
                    continue;
                }
            };
            if !methods.contains(&method) {
                methods.push(method);
            }
        }
        methods
    }

    fn auth(&mut self, key: &str, text: Option<&str>, env: &Env) -> AuthSpec {
        match AuthSpec::parse(key, text.unwrap_or("none"), env) {
            Ok(a) => a,
            Err(e) => {
                self.problems.extend(e.problems);
                AuthSpec::None
            }
        }
    }

    fn mlflow(&mut self, raw: raw::RawMlflow, env: &Env, db: &DatabricksConfig) -> MlflowConfig {
        let uri_text = raw
            .tracking_uri
            .or_else(|| env.get("MLFLOW_TRACKING_URI").map(str::to_owned))
            .filter(|s| !s.is_empty());
        let tracking_uri = match uri_text.as_deref() {
            None => None,
            Some("databricks") => {
                if db.host.is_none() {
                    self.problem(
                        "mlflow.tracking_uri",
                        "\"databricks\" needs databricks.host (DATABRICKS_HOST)",
                    );
                }
                db.host.clone()
            }
            Some(u) if u.starts_with("databricks://") => {
                self.problem(
                    "mlflow.tracking_uri",
                    "profile URIs (databricks://PROFILE) are not supported; use \"databricks\" with databricks.cli_profile",
                );
                None
            }
            Some(u) => self.http_url("mlflow.tracking_uri", u),
        };
        let experiment_id = raw
            .experiment_id
            .or_else(|| env.get("MLFLOW_EXPERIMENT_ID").map(str::to_owned))
            .filter(|s| !s.trim().is_empty());
        MlflowConfig {
            tracking_uri,
            experiment_id,
            auth: self.auth("mlflow.auth", raw.auth.as_deref(), env),
            timeout: self.duration("mlflow.timeout", raw.timeout.as_deref(), "10s"),
            client_assessment_ids: raw.client_assessment_ids.unwrap_or(true),
        }
    }

    fn delivery(&mut self, raw: raw::RawDelivery) -> DeliveryConfig {
        let d = DeliveryConfig {
            inline_deadline: self.duration(
                "delivery.inline_deadline",
                raw.inline_deadline.as_deref(),
                "2s",
            ),
            poll_interval: self.duration(
                "delivery.poll_interval",
                raw.poll_interval.as_deref(),
                "1s",
            ),
            batch_size: raw.batch_size.unwrap_or(32),
            concurrency: raw.concurrency.unwrap_or(32),
            lease: self.duration("delivery.lease", raw.lease.as_deref(), "6s"),
            backoff_initial: self.duration(
                "delivery.backoff_initial",
                raw.backoff_initial.as_deref(),
                "1s",
            ),
            backoff_max: self.duration("delivery.backoff_max", raw.backoff_max.as_deref(), "5m"),
            not_found_horizon: self.duration(
                "delivery.not_found_horizon",
                raw.not_found_horizon.as_deref(),
                "15m",
            ),
            max_age: self.duration("delivery.max_age", raw.max_age.as_deref(), "24h"),
            worker: raw.worker.unwrap_or(true),
            trace_lookup_interval: self.duration(
                "delivery.trace_lookup_interval",
                raw.trace_lookup_interval.as_deref(),
                "1m",
            ),
        };
        if d.trace_lookup_interval.is_zero() {
            self.problem(
                "delivery.trace_lookup_interval",
                "must be greater than zero",
            );
        }
        if d.batch_size == 0 {
            self.problem("delivery.batch_size", "must be greater than zero");
        }
        if d.concurrency == 0 {
            self.problem("delivery.concurrency", "must be greater than zero");
        }
        if d.backoff_initial.is_zero() || d.backoff_initial > d.backoff_max {
            self.problem(
                "delivery.backoff_initial",
                "must be greater than zero and at most delivery.backoff_max",
            );
        }
        if d.poll_interval.is_zero() {
            self.problem("delivery.poll_interval", "must be greater than zero");
        }
        d
    }

    fn feedback(&mut self, raw: raw::RawFeedback) -> FeedbackConfig {
        let mut names = BTreeMap::new();
        match raw.names {
            None => {
                names.insert("user_feedback".to_owned(), ValueKinds::ANY);
                names.insert(
                    "rating".to_owned(),
                    ValueKinds {
                        number: true,
                        ..ValueKinds::default()
                    },
                );
            }
            Some(map) => {
                for (name, kinds) in map {
                    let key = format!("feedback.names.{name}");
                    if !valid_assessment_name(&name) {
                        self.problem(
                            &key,
                            "assessment names are 1-64 characters of letters, digits, '_', '-', '.' or ' '",
                        );
                        continue;
                    }
                    let mut k = ValueKinds::default();
                    for kind in &kinds {
                        match kind.as_str() {
                            "bool" => k.bool = true,
                            "number" => k.number = true,
                            "string" => k.string = true,
                            other => self.problem(
                                &key,
                                format!(
                                    "unknown value kind \"{other}\" (expected \"bool\", \"number\" or \"string\")"
                                ),
                            ),
                        }
                    }
                    if kinds.is_empty() {
                        self.problem(&key, "lists no value kinds");
                    }
                    names.insert(name, k);
                }
            }
        }
        let default_name = raw
            .default_name
            .unwrap_or_else(|| "user_feedback".to_owned());
        if !names.contains_key(&default_name) {
            self.problem(
                "feedback.default_name",
                format!("\"{default_name}\" is not one of feedback.names"),
            );
        }
        let mut cors_origins = Vec::new();
        for (i, o) in raw.cors_origins.unwrap_or_default().iter().enumerate() {
            let key = format!("feedback.cors_origins[{i}]");
            match Url::parse(o) {
                Ok(u) if u.path() == "/" && matches!(u.scheme(), "http" | "https") => {
                    match HeaderValue::from_str(o.trim_end_matches('/')) {
                        Ok(v) => cors_origins.push(v),
                        Err(_) => self.problem(&key, format!("\"{o}\" is not a valid origin")),
                    }
                }
                _ => self.problem(
                    &key,
                    format!("\"{o}\" is not an origin (expected scheme://host[:port])"),
                ),
            }
        }
        let rate_limit = match (raw.rate_limit.per_second, raw.rate_limit.burst) {
            (Some(0.0), _) => None,
            (rate, burst) => {
                let per_second = rate.unwrap_or(10.0);
                let burst = burst.unwrap_or(50);
                if !(per_second.is_finite() && per_second > 0.0) {
                    self.problem(
                        "feedback.rate_limit.per_second",
                        "must be a positive number (0 disables the limit)",
                    );
                }
                if burst == 0 {
                    self.problem("feedback.rate_limit.burst", "must be at least 1");
                }
                Some(RateLimit { per_second, burst })
            }
        };
        FeedbackConfig {
            max_body_bytes: self.size("feedback.max_body_bytes", raw.max_body_bytes, 64 << 10),
            max_comment_bytes: self.size("feedback.max_comment_bytes", raw.max_comment_bytes, 4096),
            default_name,
            names,
            cors_origins,
            rate_limit,
        }
    }

    fn store(&mut self, raw: raw::RawStore, env: &Env) -> StoreConfig {
        let connect_timeout = self.duration(
            "store.connect_timeout",
            raw.connect_timeout.as_deref(),
            "5s",
        );
        let kind = match raw.url.as_deref() {
            Some(u) if u.starts_with("sqlite:") => self.sqlite_path(u),
            Some(u) if u.starts_with("postgres://") || u.starts_with("postgresql://") => {
                self.pg_url(u, env)
            }
            Some(u) => {
                self.problem(
                    "store.url",
                    format!(
                        "unsupported store \"{}\" (expected sqlite://PATH or postgres://…)",
                        redact_url(u)
                    ),
                );
                StoreKind::Sqlite {
                    path: PathBuf::from("feedback-proxy.db"),
                }
            }
            None if env.get("PGHOST").is_some() => StoreKind::Postgres(pg_from_env(env, self)),
            None => StoreKind::Sqlite {
                path: PathBuf::from("feedback-proxy.db"),
            },
        };
        let schema = raw.schema.unwrap_or_else(|| "feedback_proxy".to_owned());
        if !valid_identifier(&schema) {
            self.problem(
                "store.schema",
                format!(
                    "\"{schema}\" is not a plain SQL identifier (lowercase letters, digits, '_')"
                ),
            );
        }
        let password = match raw.password.as_deref() {
            None => PasswordSource::Static,
            Some(p) => match PasswordSource::parse(p) {
                Ok(s) => s,
                Err(e) => {
                    self.problem("store.password", e);
                    PasswordSource::Static
                }
            },
        };
        if password.uses_databricks() && matches!(kind, StoreKind::Sqlite { .. }) {
            self.problem(
                "store.password",
                "a Databricks password source needs a Postgres store",
            );
        }
        let pool_size = raw.pool_size.unwrap_or(16);
        if pool_size == 0 {
            self.problem("store.pool_size", "must be greater than zero");
        }
        let statement_timeout = self.duration(
            "store.statement_timeout",
            raw.statement_timeout.as_deref(),
            "10s",
        );
        if statement_timeout < Duration::from_millis(1) {
            // Postgres reads 0 as "no limit"; a stuck database would hang requests again.
            self.problem("store.statement_timeout", "must be at least 1ms");
        }
        StoreConfig {
            kind,
            schema,
            pool_size,
            connect_timeout,
            statement_timeout,
            max_lifetime: self.duration("store.max_lifetime", raw.max_lifetime.as_deref(), "45m"),
            password,
            migrate: raw.migrate.unwrap_or(true),
        }
    }

    fn positive_duration(&mut self, key: &str, text: Option<&str>, default: &str) -> Duration {
        let d = self.duration(key, text, default);
        if d.is_zero() {
            self.problem(key, "must be greater than zero");
        }
        d
    }

    fn server(&mut self, raw: raw::RawServer) -> ServerConfig {
        let max_connections = raw.max_connections.unwrap_or(2048);
        if !(1..=1_000_000).contains(&max_connections) {
            self.problem("server.max_connections", "must be between 1 and 1000000");
        }
        let handshake_timeout = self.positive_duration(
            "server.handshake_timeout",
            raw.handshake_timeout.as_deref(),
            "10s",
        );
        let header_read_timeout = self.positive_duration(
            "server.header_read_timeout",
            raw.header_read_timeout.as_deref(),
            "30s",
        );
        let idle_timeout =
            self.positive_duration("server.idle_timeout", raw.idle_timeout.as_deref(), "60s");
        let request_body_timeout = self.positive_duration(
            "server.request_body_timeout",
            raw.request_body_timeout.as_deref(),
            "30s",
        );
        let reset_rate = match (raw.reset_rate.per_second, raw.reset_rate.burst) {
            (Some(0.0), _) => None,
            (rate, burst) => {
                let per_second = rate.unwrap_or(10.0);
                let burst = burst.unwrap_or(100);
                if !(per_second.is_finite() && per_second > 0.0) {
                    self.problem(
                        "server.reset_rate.per_second",
                        "must be a positive number (0 disables the limit)",
                    );
                }
                if burst == 0 {
                    self.problem("server.reset_rate.burst", "must be at least 1");
                }
                Some(RateLimit { per_second, burst })
            }
        };
        ServerConfig {
            max_connections,
            handshake_timeout,
            header_read_timeout,
            idle_timeout,
            request_body_timeout,
            reset_rate,
        }
    }

    fn sqlite_path(&mut self, u: &str) -> StoreKind {
        // sqlite://relative/path, sqlite:///absolute/path, sqlite:relative
        let rest = u
            .strip_prefix("sqlite://")
            .or_else(|| u.strip_prefix("sqlite:"))
            .unwrap_or_default();
        let rest = rest.split('?').next().unwrap_or_default();
        if rest.is_empty() {
            self.problem(
                "store.url",
                "sqlite URL has no file path (e.g. \"sqlite://feedback-proxy.db\")",
            );
        }
        StoreKind::Sqlite {
            path: PathBuf::from(rest),
        }
    }

    fn pg_url(&mut self, u: &str, env: &Env) -> StoreKind {
        let mut pg = pg_from_env(env, self);
        let url = match Url::parse(u) {
            Ok(url) => url,
            Err(e) => {
                self.problem(
                    "store.url",
                    format!("invalid Postgres URL \"{}\" ({e})", redact_url(u)),
                );
                return StoreKind::Postgres(pg);
            }
        };
        if let Some(host) = url.host_str().filter(|h| !h.is_empty()) {
            pg.hosts = host
                .split(',')
                .map(|h| h.trim_matches(['[', ']']).to_owned())
                .collect();
        }
        if let Some(port) = url.port() {
            pg.port = port;
        }
        if !url.username().is_empty() {
            pg.user = percent_decode(url.username());
        }
        if let Some(pw) = url.password() {
            pg.password = Some(Secret::new(percent_decode(pw)));
        }
        let db = url.path().trim_start_matches('/');
        if !db.is_empty() {
            pg.dbname = percent_decode(db);
        }
        for (k, v) in url.query_pairs() {
            match k.as_ref() {
                "sslmode" => match v.parse() {
                    Ok(m) => pg.sslmode = m,
                    Err(e) => self.problem("store.url", e),
                },
                "sslrootcert" => pg.sslrootcert = Some(PathBuf::from(v.as_ref())),
                "application_name" => pg.application_name = Some(v.into_owned()),
                "host" => pg.hosts = v.split(',').map(str::to_owned).collect(),
                "port" => match v.parse() {
                    Ok(p) => pg.port = p,
                    Err(_) => self.problem("store.url", format!("invalid port \"{v}\"")),
                },
                "user" => pg.user = v.into_owned(),
                "dbname" => pg.dbname = v.into_owned(),
                "password" => pg.password = Some(Secret::new(v.into_owned())),
                other => self.problem(
                    "store.url",
                    format!(
                        "unsupported parameter \"{other}\" (supported: sslmode, sslrootcert, application_name, host, port, user, dbname, password)"
                    ),
                ),
            }
        }
        StoreKind::Postgres(pg)
    }
}

/// libpq defaults from `PG*` variables (what a Databricks Lakebase resource injects).
fn pg_from_env(env: &Env, v: &mut Validator) -> PgConnect {
    let user = env
        .get("PGUSER")
        .or_else(|| env.get("USER"))
        .unwrap_or("postgres")
        .to_owned();
    let sslmode = match env.get("PGSSLMODE") {
        None => SslMode::Prefer,
        Some(m) => m.parse().unwrap_or_else(|e: String| {
            v.problem("store.url", format!("PGSSLMODE: {e}"));
            SslMode::Prefer
        }),
    };
    let port = match env.get("PGPORT") {
        None => 5432,
        Some(p) => p.parse().unwrap_or_else(|_| {
            v.problem("store.url", format!("PGPORT is not a port number: \"{p}\""));
            5432
        }),
    };
    PgConnect {
        hosts: env
            .get("PGHOST")
            .unwrap_or("localhost")
            .split(',')
            .map(str::to_owned)
            .collect(),
        port,
        dbname: env.get("PGDATABASE").unwrap_or(&user).to_owned(),
        user,
        password: env.get("PGPASSWORD").map(Secret::new),
        sslmode,
        sslrootcert: env.get("PGSSLROOTCERT").map(PathBuf::from),
        application_name: env.get("PGAPPNAME").map(str::to_owned),
    }
}

fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

/// A URL with any password replaced, for error messages.
fn redact_url(u: &str) -> String {
    match Url::parse(u) {
        Ok(mut url) if url.password().is_some() => {
            let _ = url.set_password(Some("<redacted>"));
            url.to_string()
        }
        Ok(url) => url.to_string(),
        Err(_) => "<unparseable URL>".to_owned(),
    }
}

/// `text` fit to quote in an error message: a userinfo password and the values of query
/// parameters named like credentials become `<redacted>`. Written by hand rather than with
/// `url`: the text is quoted back precisely when it does not parse (a password with a raw `/`,
/// `@` or `?` is a common reason), so it is read leniently and redacts too much rather than too
/// little: everything between the first `:` after the scheme and the last `@` counts as the
/// password.
fn redact_url_text(text: &str) -> String {
    const REDACTED: &str = "<redacted>";
    let (scheme, rest) = match text.find("://") {
        Some(i) => text.split_at(i + 3),
        None => ("", text),
    };
    let mut out = String::with_capacity(text.len() + REDACTED.len());
    out.push_str(scheme);
    let rest = match rest.rfind('@') {
        Some(at) => {
            let userinfo = &rest[..at];
            match userinfo.find(':') {
                Some(colon) => {
                    out.push_str(&userinfo[..=colon]);
                    out.push_str(REDACTED);
                }
                None => out.push_str(userinfo),
            }
            out.push('@');
            &rest[at + 1..]
        }
        None => rest,
    };
    let Some(q) = rest.find('?') else {
        out.push_str(rest);
        return out;
    };
    out.push_str(&rest[..=q]);
    let (query, fragment) = match rest[q + 1..].find('#') {
        Some(h) => rest[q + 1..].split_at(h),
        None => (&rest[q + 1..], ""),
    };
    for (i, pair) in query.split('&').enumerate() {
        if i > 0 {
            out.push('&');
        }
        match pair.split_once('=') {
            Some((k, _)) if credential_name(k) => {
                out.push_str(k);
                out.push('=');
                out.push_str(REDACTED);
            }
            _ => out.push_str(pair),
        }
    }
    out.push_str(fragment);
    out
}

/// Whether a query parameter name looks like it carries a credential.
fn credential_name(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    [
        "token",
        "secret",
        "pass",
        "pwd",
        "key",
        "auth",
        "credential",
        "sig",
    ]
    .iter()
    .any(|w| n.contains(w))
}

/// Segment-aware prefix test: `/a` is a prefix of `/a` and `/a/b`, not of `/ab`.
pub fn path_has_prefix(path: &str, prefix: &str) -> bool {
    if prefix == "/" {
        return true;
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

fn valid_identifier(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && !s.as_bytes()[0].is_ascii_digit()
}

/// Assessment names we accept in config (and therefore on the wire).
pub fn valid_assessment_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ' '))
}

fn ser_duration<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_duration(*d))
}

fn ser_display<T: fmt::Display, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

fn ser_opt_display<T: fmt::Display, S: Serializer>(v: &Option<T>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => s.collect_str(v),
        None => s.serialize_none(),
    }
}

fn ser_path<S: Serializer>(p: &Path, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&p.display())
}

fn ser_opt_path<S: Serializer>(p: &Option<PathBuf>, s: S) -> Result<S::Ok, S::Error> {
    match p {
        Some(p) => s.collect_str(&p.display()),
        None => s.serialize_none(),
    }
}

fn ser_headers<S: Serializer>(v: &[HeaderName], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(v.iter().map(HeaderName::as_str))
}

fn ser_methods<S: Serializer>(v: &[http::Method], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(v.iter().map(http::Method::as_str))
}

fn ser_header_values<S: Serializer>(v: &[HeaderValue], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(v.iter().map(|h| h.to_str().unwrap_or("<non-ascii>")))
}

#[cfg(test)]
mod tests;
