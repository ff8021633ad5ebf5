//! Postgres / Lakebase backend. PLACEHOLDER: being implemented in the store change.

use std::sync::Arc;

use url::Url;

use super::*;
use crate::auth::TokenSource;
use crate::client::HttpClient;
use crate::config::PgConnect;
use crate::metrics::Metrics;

/// What the Postgres backend needs from the rest of the process (password sources).
#[derive(Clone)]
pub struct Deps {
    /// The app's Databricks OAuth token source (used by Databricks password sources).
    pub databricks: TokenSource,
    pub databricks_host: Option<Url>,
    pub http: HttpClient,
    pub metrics: Arc<Metrics>,
}

/// Connects (and migrates, if configured).
pub async fn open(
    _pg: &PgConnect,
    _config: &StoreConfig,
    _deps: Deps,
) -> Result<SharedStore, StoreError> {
    Err(StoreError::Unavailable(
        "the Postgres store is not implemented in this build".into(),
    ))
}
