//! `[feedback]`: accepted assessment names and their label schemas (`schema.rs`), comment
//! limits, rate limits, with their validation.

use std::collections::BTreeMap;

use http::HeaderValue;
use serde::Serialize;
use url::Url;

use super::raw;
use super::schema::{Kind, LabelSchema, default_names};
use super::ser::ser_header_values;
use super::validate::{Validator, valid_assessment_name};

#[derive(Debug, Clone, Copy, Serialize)]
pub struct RateLimit {
    pub per_second: f64,
    pub burst: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct FeedbackConfig {
    pub max_body_bytes: usize,
    /// Largest `POST /api/feedback/batch` body (413 past it).
    pub max_batch_bytes: usize,
    pub max_comment_bytes: usize,
    /// Longest correction (`expectedResponse`) accepted; at most the 16 KiB the MLflow client
    /// sends as one value.
    pub max_expected_response_bytes: usize,
    pub default_name: String,
    /// Allowed assessment names and the label schema of each.
    pub names: BTreeMap<String, LabelSchema>,
    /// The categorical name whose values the reference page offers as reasons on a thumbs-down
    /// (`None`: no reasons).
    pub reason_name: Option<String>,
    /// Origins allowed to call the feedback API cross-site; empty sends no CORS headers.
    #[serde(serialize_with = "ser_header_values")]
    pub cors_origins: Vec<HeaderValue>,
    /// Per-user rate limit; `None` disables it.
    pub rate_limit: Option<RateLimit>,
    /// Feedback requests in flight at once, all users together; past it a request is shed at
    /// once (503 `OVERLOADED`) instead of queueing on the store's pool.
    pub max_in_flight: usize,
}

impl Validator {
    pub(super) fn feedback(&mut self, raw: raw::RawFeedback) -> FeedbackConfig {
        let mut names = BTreeMap::new();
        match raw.names {
            None => names = default_names(),
            Some(map) => {
                for (name, spec) in map {
                    let key = format!("feedback.names.{name}");
                    if name == crate::domain::EXPECTED_RESPONSE {
                        self.problem(
                            &key,
                            "\"expected_response\" is the name of corrections (the expectedResponse field); choose another name",
                        );
                        continue;
                    }
                    if !valid_assessment_name(&name) {
                        self.problem(
                            &key,
                            "assessment names are 1-64 characters of letters, digits, '_', '-', '.' or ' '",
                        );
                        continue;
                    }
                    if let Some(schema) = self.label_schema(&key, &spec) {
                        names.insert(name, schema);
                    }
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
        let reason_name = match raw.reason_name {
            // The default: `reason` when it is one of the names.
            None => names.contains_key("reason").then(|| "reason".to_owned()),
            Some(n) if n.is_empty() => None,
            Some(n) => {
                match names.get(&n).map(|s| &s.kind) {
                    Some(Kind::Categorical { .. }) => {}
                    Some(_) => self.problem(
                        "feedback.reason_name",
                        format!("\"{n}\" is not a categorical name (kind = \"categorical\")"),
                    ),
                    None => self.problem(
                        "feedback.reason_name",
                        format!("\"{n}\" is not one of feedback.names (\"\" offers no reasons)"),
                    ),
                }
                Some(n)
            }
        };
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
        let max_in_flight = raw.max_in_flight.unwrap_or(1024);
        if !(1..=1_000_000).contains(&max_in_flight) {
            self.problem("feedback.max_in_flight", "must be between 1 and 1000000");
        }
        let max_expected_response_bytes = self.size(
            "feedback.max_expected_response_bytes",
            raw.max_expected_response_bytes,
            8192,
        );
        // `mlflow::validate::MAX_STRING_VALUE_BYTES`: the longest value the client sends.
        if max_expected_response_bytes > 16 * 1024 {
            self.problem(
                "feedback.max_expected_response_bytes",
                "must be at most 16KiB (16384), the longest value sent to MLflow",
            );
        }
        FeedbackConfig {
            max_in_flight,
            max_expected_response_bytes,
            max_body_bytes: self.size("feedback.max_body_bytes", raw.max_body_bytes, 64 << 10),
            max_batch_bytes: self.size("feedback.max_batch_bytes", raw.max_batch_bytes, 1 << 20),
            max_comment_bytes: self.size("feedback.max_comment_bytes", raw.max_comment_bytes, 4096),
            default_name,
            names,
            reason_name,
            cors_origins,
            rate_limit,
        }
    }
}
