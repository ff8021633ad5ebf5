//! The configuration file exactly as written: serde structs mirroring the TOML.
//!
//! Nothing here is validated beyond its TOML type; the section modules of `config` turn these
//! into the typed [`Config`](super::Config). Every table denies unknown keys, so a typo is an error that names
//! the key instead of a silently ignored setting.

use std::collections::BTreeMap;

use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Raw {
    pub listen: Option<String>,
    pub shutdown_grace: Option<String>,
    #[serde(default)]
    pub log: RawLog,
    #[serde(default)]
    pub identity: RawIdentity,
    #[serde(default)]
    pub databricks: RawDatabricks,
    #[serde(default)]
    pub agent: RawAgent,
    #[serde(default)]
    pub mlflow: RawMlflow,
    #[serde(default)]
    pub delivery: RawDelivery,
    #[serde(default)]
    pub feedback: RawFeedback,
    #[serde(default)]
    pub store: RawStore,
    #[serde(default)]
    pub ui: RawUi,
    #[serde(default)]
    pub metrics: RawMetrics,
    #[serde(default)]
    pub server: RawServer,
    #[serde(default)]
    pub review: RawReview,
    #[serde(default)]
    pub datasets: RawDatasets,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDatasets {
    pub auto: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawReview {
    pub users: Option<Vec<String>>,
    pub pseudonymize_users: Option<bool>,
    pub pseudonym_key: Option<String>,
    pub trace_url: Option<String>,
    pub positive_from: Option<f64>,
    pub negative_to: Option<f64>,
    pub mlflow_queue: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    pub format: Option<String>,
    pub level: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawIdentity {
    pub trust_forwarded_headers: Option<bool>,
    pub dev_user: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDatabricks {
    pub host: Option<String>,
    pub client_id: Option<String>,
    pub client_secret: Option<String>,
    pub cli_profile: Option<String>,
    pub cli_path: Option<String>,
    pub token_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAgent {
    pub url: Option<String>,
    pub paths: Option<Vec<String>>,
    pub auth: Option<String>,
    pub connect_timeout: Option<String>,
    pub response_header_timeout: Option<String>,
    pub idle_timeout: Option<String>,
    pub max_rewrite_bytes: Option<RawSize>,
    pub max_inspect_bytes: Option<RawSize>,
    pub trace_id_headers: Option<Vec<String>>,
    pub pool_idle_timeout: Option<String>,
    pub pool_max_idle_per_host: Option<usize>,
    pub http2: Option<bool>,
    pub link_queue: Option<usize>,
    pub max_concurrent_per_user: Option<usize>,
    pub link_buffer: Option<usize>,
    pub claim_timeout: Option<String>,
    pub pass_response_headers: Option<Vec<String>>,
    #[serde(default)]
    pub routes: Vec<RawRoute>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub path: Option<String>,
    pub kind: Option<String>,
    pub upstream_path: Option<String>,
    pub return_trace: Option<bool>,
    pub context: Option<bool>,
    pub client_request_id: Option<bool>,
    pub events: Option<bool>,
    pub methods: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMlflow {
    pub tracking_uri: Option<String>,
    pub experiment_id: Option<String>,
    pub auth: Option<String>,
    pub timeout: Option<String>,
    pub client_assessment_ids: Option<bool>,
    pub sync_label_schemas: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDelivery {
    pub inline_deadline: Option<String>,
    pub poll_interval: Option<String>,
    pub batch_size: Option<u32>,
    pub concurrency: Option<usize>,
    pub lease: Option<String>,
    pub backoff_initial: Option<String>,
    pub backoff_max: Option<String>,
    pub not_found_horizon: Option<String>,
    pub max_age: Option<String>,
    pub worker: Option<bool>,
    pub trace_lookup_interval: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFeedback {
    pub max_body_bytes: Option<RawSize>,
    pub max_batch_bytes: Option<RawSize>,
    pub max_comment_bytes: Option<RawSize>,
    pub max_expected_response_bytes: Option<RawSize>,
    pub default_name: Option<String>,
    /// A list of value kinds or a schema table per name (`schema.rs` reads them, naming keys).
    pub names: Option<BTreeMap<String, toml::Value>>,
    pub reason_name: Option<String>,
    pub cors_origins: Option<Vec<String>>,
    pub max_in_flight: Option<usize>,
    #[serde(default)]
    pub rate_limit: RawRateLimit,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimit {
    pub per_second: Option<f64>,
    pub burst: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStore {
    pub url: Option<String>,
    pub schema: Option<String>,
    pub pool_size: Option<usize>,
    pub connect_timeout: Option<String>,
    pub statement_timeout: Option<String>,
    pub max_lifetime: Option<String>,
    pub password: Option<String>,
    pub migrate: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUi {
    pub dir: Option<String>,
    pub enabled: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMetrics {
    pub listen: Option<String>,
    pub on_main_port: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    pub workers: Option<usize>,
    pub max_connections: Option<usize>,
    pub handshake_timeout: Option<String>,
    pub header_read_timeout: Option<String>,
    pub idle_timeout: Option<String>,
    pub request_body_timeout: Option<String>,
    #[serde(default)]
    pub reset_rate: RawRateLimit,
}

/// A byte size: an integer number of bytes or a string such as `"64KiB"` or `"1MiB"`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawSize {
    Bytes(u64),
    Text(String),
}
