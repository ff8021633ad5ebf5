//! `[databricks]` and the `auth = …` of each outbound hop ([`AuthSpec`]), with the check that a
//! hop's auth has the credentials it needs.

use std::fmt;
use std::time::Duration;

use serde::{Serialize, Serializer};
use url::Url;

use super::env::Env;
use super::secret::Secret;
use super::ser::{ser_duration, ser_opt_display};
use super::validate::{ConfigError, Validator};

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
    /// On-behalf-of-user (agent hop only): the signed-in user's own token, which the platform
    /// hands the app in `x-forwarded-access-token`. Read only when forwarded headers are
    /// trusted; a request without one is refused (401).
    User,
    /// As [`AuthSpec::User`], falling back to the app's service principal
    /// ([`AuthSpec::DatabricksOauth`]) when the platform sent no user token.
    UserOrApp,
}

impl AuthSpec {
    /// Whether the hop sends the signed-in user's token when the platform provides one.
    pub fn on_behalf_of_user(&self) -> bool {
        matches!(self, Self::User | Self::UserOrApp)
    }

    /// The app's own credential for the hop: what is sent when no user token is (or may be)
    /// used. `None` for [`AuthSpec::User`], which never falls back.
    pub fn app_part(&self) -> &AuthSpec {
        match self {
            Self::User => &Self::None,
            Self::UserOrApp => &Self::DatabricksOauth,
            other => other,
        }
    }

    fn parse(key: &str, text: &str, env: &Env) -> Result<Self, ConfigError> {
        match text {
            "none" => Ok(Self::None),
            "databricks-oauth" => Ok(Self::DatabricksOauth),
            "databricks-cli" => Ok(Self::DatabricksCli),
            "user" => Ok(Self::User),
            "user-or-app" => Ok(Self::UserOrApp),
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
                        "unknown auth \"{other}\" (expected \"none\", \"bearer-env:VAR\", \"databricks-oauth\", \"databricks-cli\", or for agent.auth \"user\" or \"user-or-app\")"
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
            Self::User => f.write_str("user"),
            Self::UserOrApp => f.write_str("user-or-app"),
        }
    }
}

impl Serialize for AuthSpec {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl Validator {
    pub(super) fn check_auth(&mut self, key: &str, auth: &AuthSpec, db: &DatabricksConfig) {
        match auth.app_part() {
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
            AuthSpec::None | AuthSpec::BearerEnv { .. } | AuthSpec::User | AuthSpec::UserOrApp => {}
        }
    }

    /// A hop's `auth`. The user's own token (`"user"`, `"user-or-app"`) is refused here: only
    /// the agent hop may act on behalf of the user ([`Validator::agent_auth`]); MLflow keeps
    /// the app's identity, so that votes are written by the app whatever the user may do.
    pub(super) fn auth(&mut self, key: &str, text: Option<&str>, env: &Env) -> AuthSpec {
        let auth = self.agent_auth(key, text, env);
        if auth.on_behalf_of_user() {
            self.problem(
                key,
                format!(
                    "\"{auth}\" is only for agent.auth (this hop keeps the app's identity: use \"databricks-oauth\")"
                ),
            );
            return AuthSpec::None;
        }
        auth
    }

    /// `agent.auth`: any hop auth, or the user's own token.
    pub(super) fn agent_auth(&mut self, key: &str, text: Option<&str>, env: &Env) -> AuthSpec {
        match AuthSpec::parse(key, text.unwrap_or("none"), env) {
            Ok(a) => a,
            Err(e) => {
                self.problems.extend(e.problems);
                AuthSpec::None
            }
        }
    }
}
