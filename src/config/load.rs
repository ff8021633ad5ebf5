//! [`Config`] and reading it: TOML text → `${VAR}` interpolation → the raw mirror → the
//! Databricks Apps overlay → typed, validated sections.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use url::Url;

use super::agent::AgentConfig;
use super::auth::{AuthSpec, DatabricksConfig};
use super::delivery::DeliveryConfig;
use super::env::{self, Env};
use super::feedback::FeedbackConfig;
use super::mlflow::MlflowConfig;
use super::raw::Raw;
use super::review::{DatasetsConfig, ReviewConfig};
use super::secret::Secret;
use super::ser::{ser_display, ser_duration};
use super::server::{IdentityConfig, LogConfig, LogFormat, MetricsConfig, ServerConfig, UiConfig};
use super::store::StoreConfig;
use super::validate::{ConfigError, Problem, Validator, clean_serde_message};

/// Default listen address for local runs.
pub(super) const DEFAULT_LISTEN: &str = "127.0.0.1:8000";

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
    pub review: ReviewConfig,
    pub datasets: DatasetsConfig,
}

/// Whether a URL points at this machine (the loopback name or a loopback address).
pub(super) fn is_local_host(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
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

    pub(super) fn from_raw(raw: Raw, env: &Env) -> Result<Self, ConfigError> {
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
        let review = v.review(raw.review, env, &mlflow);
        let datasets = DatasetsConfig {
            auto: v.mlflow_object_name("datasets.auto", raw.datasets.auto),
        };

        // Cross-checks: what each auth choice needs from [databricks].
        for (key, auth) in [("agent.auth", &agent.auth), ("mlflow.auth", &mlflow.auth)] {
            v.check_auth(key, auth, &databricks);
        }
        // The user's token is only ever the platform's: without trusted forwarded headers
        // a browser could hand the agent any token it likes.
        if agent.auth.on_behalf_of_user() && !identity.trust_forwarded_headers {
            v.problem(
                "agent.auth",
                format!(
                    "\"{}\" needs identity.trust_forwarded_headers = true (the user's token is only taken from the platform's x-forwarded-access-token)",
                    agent.auth
                ),
            );
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
            review,
            datasets,
        })
    }
}
