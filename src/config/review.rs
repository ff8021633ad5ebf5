//! `[review]`: who may see the owner's view (`/review`, `/api/review/*`), how users are shown
//! there, where trace links point, and how numeric votes count as positive or negative; with
//! its validation.

use serde::Serialize;

use super::env::Env;
use super::mlflow::MlflowConfig;
use super::raw;
use super::secret::Secret;
use super::validate::Validator;
use crate::domain::Thresholds;

/// The environment variable read when `review.pseudonym_key` is not in the file.
pub const PSEUDONYM_KEY_ENV: &str = "FEEDBACK_PROXY_PSEUDONYM_KEY";

/// Longest listing page a client may ask for.
pub const MAX_PAGE: u32 = 500;

#[derive(Debug, Clone, Serialize)]
pub struct ReviewConfig {
    /// Reviewers (lower-cased emails / user names). Empty: the review surface is off (404).
    pub users: Vec<String>,
    /// Show users as a stable pseudonym (`user-` and 12 hex digits of an HMAC of the user
    /// under `pseudonym_key`) instead of their email.
    pub pseudonymize_users: bool,
    pub pseudonym_key: Option<Secret>,
    /// Link to a trace in the MLflow UI, with `{trace_id}` and `{experiment_id}` filled in.
    /// `None`: no links.
    pub trace_url: Option<String>,
    #[serde(flatten)]
    pub thresholds: Thresholds,
    /// The MLflow review queue every negatively rated trace is added to (once), through the
    /// delivery outbox. `None`: no queue.
    pub mlflow_queue: Option<String>,
}

/// `[datasets]`: the evaluation dataset kept up to date from the delivery outbox.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DatasetsConfig {
    /// Each negatively rated trace becomes a record of this dataset as its vote is delivered
    /// (the same record `feedback-proxy dataset sync` writes). `None`: only the command does.
    pub auto: Option<String>,
}

impl ReviewConfig {
    /// Whether the review surface is served at all.
    pub fn enabled(&self) -> bool {
        !self.users.is_empty()
    }

    /// Whether `user` (as the identity layer resolved it) is a reviewer.
    pub fn is_reviewer(&self, user: &str) -> bool {
        self.users.iter().any(|r| r.eq_ignore_ascii_case(user))
    }
}

/// The MLflow UI's trace link for a tracking server: the OSS server's single-page app takes
/// `#/experiments/{id}/traces?selectedEvaluationId={trace}` (read from the 3.17.2 UI bundle,
/// which builds exactly this link); a Databricks workspace serves the experiment at
/// `/ml/experiments/{id}/traces` [unverified].
fn default_trace_url(mlflow: &MlflowConfig) -> Option<String> {
    let uri = mlflow.tracking_uri.as_ref()?;
    let base = uri.as_str().trim_end_matches('/');
    let databricks = uri
        .host_str()
        .is_some_and(|h| h.ends_with(".databricks.com") || h.ends_with(".azuredatabricks.net"));
    Some(if databricks {
        format!("{base}/ml/experiments/{{experiment_id}}/traces?selectedEvaluationId={{trace_id}}")
    } else {
        format!("{base}/#/experiments/{{experiment_id}}/traces?selectedEvaluationId={{trace_id}}")
    })
}

impl Validator {
    pub(super) fn review(
        &mut self,
        raw: raw::RawReview,
        env: &Env,
        mlflow: &MlflowConfig,
    ) -> ReviewConfig {
        let mut users = Vec::new();
        for (i, u) in raw.users.unwrap_or_default().into_iter().enumerate() {
            let u = u.trim().to_ascii_lowercase();
            if u.is_empty() || u.len() > 254 || u.chars().any(char::is_control) {
                self.problem(
                    &format!("review.users[{i}]"),
                    "must be a user's email or name (1-254 characters)",
                );
                continue;
            }
            users.push(u);
        }
        let pseudonymize_users = raw.pseudonymize_users.unwrap_or(false);
        let pseudonym_key = raw
            .pseudonym_key
            .or_else(|| env.get(PSEUDONYM_KEY_ENV).map(str::to_owned))
            .filter(|k| !k.is_empty())
            .map(Secret::new);
        if pseudonymize_users {
            match &pseudonym_key {
                None => self.problem(
                    "review.pseudonym_key",
                    format!(
                        "is required with review.pseudonymize_users = true (or set {PSEUDONYM_KEY_ENV}); keep it secret and the same on every replica, or the pseudonyms change"
                    ),
                ),
                Some(k) if k.expose().len() < 16 => self.problem(
                    "review.pseudonym_key",
                    "must be at least 16 characters (it keys the HMAC that hides the emails)",
                ),
                Some(_) => {}
            }
        }
        let trace_url = match raw.trace_url {
            Some(t) if t.is_empty() => None,
            Some(t) => {
                if !t.contains("{trace_id}") {
                    self.problem("review.trace_url", "must contain {trace_id}");
                }
                if !(t.starts_with("https://") || t.starts_with("http://")) {
                    self.problem("review.trace_url", "must be an http:// or https:// URL");
                }
                Some(t)
            }
            None => default_trace_url(mlflow),
        };
        let defaults = Thresholds::default();
        let thresholds = Thresholds {
            positive_from: raw.positive_from.unwrap_or(defaults.positive_from),
            negative_to: raw.negative_to.unwrap_or(defaults.negative_to),
        };
        if !thresholds.positive_from.is_finite()
            || !thresholds.negative_to.is_finite()
            || thresholds.negative_to >= thresholds.positive_from
        {
            self.problem(
                "review.negative_to",
                format!(
                    "must be a number below review.positive_from ({} and {} given)",
                    thresholds.negative_to, thresholds.positive_from
                ),
            );
        }
        ReviewConfig {
            users,
            pseudonymize_users,
            pseudonym_key,
            trace_url,
            thresholds,
            mlflow_queue: self.mlflow_object_name("review.mlflow_queue", raw.mlflow_queue),
        }
    }

    /// A review queue or dataset name: 1-256 characters without control characters and not
    /// both kinds of quote (MLflow's name filters cannot express it). Empty: none.
    pub(super) fn mlflow_object_name(&mut self, key: &str, raw: Option<String>) -> Option<String> {
        let name = raw.map(|n| n.trim().to_owned()).filter(|n| !n.is_empty())?;
        if name.chars().count() > 256
            || name.chars().any(char::is_control)
            || (name.contains('\'') && name.contains('"'))
        {
            self.problem(
                key,
                "must be a name of 1-256 characters, without control characters or both ' and \"",
            );
        }
        Some(name)
    }
}
