//! `[mlflow]`: the tracking server, experiment and hop auth, with their validation.

use std::time::Duration;

use serde::Serialize;
use url::Url;

use super::auth::{AuthSpec, DatabricksConfig};
use super::env::Env;
use super::raw;
use super::ser::{ser_duration, ser_opt_display};
use super::validate::Validator;

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
    /// At start-up, create or update an MLflow label schema for each declared name of
    /// `[feedback.names]`, so that MLflow's labelling UI offers the same options.
    pub sync_label_schemas: bool,
}

impl MlflowConfig {
    /// Whether feedback can be delivered at all.
    pub fn enabled(&self) -> bool {
        self.tracking_uri.is_some() && self.experiment_id.is_some()
    }
}

impl Validator {
    pub(super) fn mlflow(
        &mut self,
        raw: raw::RawMlflow,
        env: &Env,
        db: &DatabricksConfig,
    ) -> MlflowConfig {
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
            sync_label_schemas: raw.sync_label_schemas.unwrap_or(false),
        }
    }
}
