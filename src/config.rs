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
//!    values: durations are [`Duration`](std::time::Duration)s, addresses
//!    [`SocketAddr`](std::net::SocketAddr)s, URLs [`Url`](url::Url)s, secrets
//!    [`Secret`]s that never print.
//!
//! Errors name the key (`agent.url: …`) so that `check-config` can print one clear line.
//! This module does not open sockets, files other than the config itself, or databases.
//!
//! One module per concern, each type beside its validation:
//! - `load`: [`Config`] and the steps above; `warnings`: [`Config::warnings`] and the redacted
//!   TOML `check-config` prints;
//! - `validate`: [`ConfigError`] and the checks every section shares; `redact`: URLs made fit
//!   to echo in a message; `ser`: how typed values print;
//! - the sections: `agent`, `auth` (`[databricks]` and each hop's `auth`), `mlflow`, `delivery`,
//!   `feedback` (with `schema`: the label schemas of `[feedback.names]`), `store`, `server`
//!   (with `[log]`, `[identity]`, `[ui]`, `[metrics]`), `secret`;
//! - `env` and `raw`: the environment and the raw mirror of the file.
//!
//! This module only re-exports.

mod agent;
mod auth;
mod delivery;
mod env;
mod feedback;
mod load;
mod mlflow;
mod raw;
mod redact;
mod review;
mod schema;
#[cfg(test)]
mod schema_tests;
mod secret;
mod ser;
mod server;
mod store;
mod validate;
mod warnings;

pub use agent::{AI_SDK_CHAT_PATH, AgentConfig, AgentRoute, RouteKind};
pub use auth::{AuthSpec, DatabricksConfig};
pub use delivery::DeliveryConfig;
pub use env::{Env, Missing};
pub use feedback::{FeedbackConfig, RateLimit};
pub use load::Config;
pub use mlflow::MlflowConfig;
pub use review::{DatasetsConfig, MAX_PAGE, PSEUDONYM_KEY_ENV, ReviewConfig};
pub use schema::{Kind, LabelSchema, ValueKinds};
pub use secret::Secret;
pub use server::{IdentityConfig, LogConfig, LogFormat, MetricsConfig, ServerConfig, UiConfig};
pub use store::{PasswordSource, PgConnect, SslMode, StoreConfig, StoreKind};
pub use validate::{ConfigError, path_has_prefix, valid_assessment_name};

#[cfg(test)]
use redact::redact_url_text;

#[cfg(test)]
mod tests;
