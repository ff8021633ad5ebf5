//! Operator commands that work on the store without serving: `migrate`, and `deliveries list`
//! / `deliveries retry` to see the outbox and requeue dead letters (or parked deliveries, e.g.
//! after configuring MLflow).
//!
//! They open the store exactly as the server does ([`store_deps`]), so a command run next to a
//! deployed proxy with the same config sees the same database.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::SystemTime;

use crate::auth::TokenSources;
use crate::client::{ClientOptions, HttpClient};
use crate::config::{AuthSpec, Config};
use crate::metrics::Metrics;
use crate::store::{
    self, Delivery, DeliveryState, Desired, Migrated, SharedStore, StoreError, VoteKey,
};

/// What the store needs from the rest of the process (password sources for Postgres).
pub fn store_deps(
    config: &Config,
    http: &HttpClient,
    tokens: &TokenSources,
    metrics: Arc<Metrics>,
) -> store::postgres::Deps {
    store::postgres::Deps {
        databricks: tokens.get(&AuthSpec::DatabricksOauth),
        databricks_host: config.databricks.host.clone(),
        http: http.clone(),
        metrics,
    }
}

fn standalone_deps(config: &Config) -> store::postgres::Deps {
    let metrics = Arc::new(Metrics::new());
    let http = HttpClient::new(&ClientOptions::default());
    let tokens = TokenSources::new(config.databricks.clone(), http.clone(), metrics.clone());
    store_deps(config, &http, &tokens, metrics)
}

/// Brings the schema up to date.
pub async fn migrate(config: &Config) -> Result<Migrated, StoreError> {
    store::migrate(&config.store, standalone_deps(config)).await
}

/// Opens the configured store.
pub async fn open_store(config: &Config) -> Result<SharedStore, StoreError> {
    store::open(&config.store, standalone_deps(config)).await
}

/// A table of deliveries (newest first) with a summary line.
pub async fn list_deliveries(
    store: &SharedStore,
    state: Option<DeliveryState>,
    limit: u32,
    json: bool,
) -> Result<String, StoreError> {
    let rows = store.list_deliveries(state, limit).await?;
    if json {
        let items: Vec<serde_json::Value> = rows.iter().map(delivery_json).collect();
        return Ok(serde_json::to_string_pretty(&items).unwrap_or_default() + "\n");
    }
    let stats = store.delivery_stats().await?;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "deliveries: {} pending, {} waiting, {} done, {} dead{}",
        stats.pending,
        stats.waiting,
        stats.done,
        stats.dead,
        stats
            .oldest_pending
            .map(|d| format!(
                " (oldest pending: {})",
                humantime::format_duration(round(d))
            ))
            .unwrap_or_default()
    );
    if rows.is_empty() {
        return Ok(out);
    }
    let _ = writeln!(
        out,
        "{:<8} {:>4} {:>4}  {:<36}  {:<24}  {:<14}  {:<34}  last error",
        "state", "ver", "try", "message", "user", "name", "trace"
    );
    for d in &rows {
        let _ = writeln!(
            out,
            "{:<8} {:>4} {:>4}  {:<36}  {:<24}  {:<14}  {:<34}  {}",
            d.state.as_str(),
            d.version,
            d.attempts,
            d.key.message_id,
            d.key.user_id,
            d.key.name,
            d.trace_id.as_deref().unwrap_or("-"),
            d.last_error.as_deref().unwrap_or("")
        );
    }
    Ok(out)
}

fn round(d: std::time::Duration) -> std::time::Duration {
    std::time::Duration::from_secs(d.as_secs())
}

fn delivery_json(d: &Delivery) -> serde_json::Value {
    let time = |t: SystemTime| humantime::format_rfc3339_millis(t).to_string();
    serde_json::json!({
        "messageId": d.key.message_id,
        "userId": d.key.user_id,
        "name": d.key.name,
        "chatId": d.chat_id,
        "state": d.state.as_str(),
        "desired": match &d.desired {
            Desired::Upsert { value, comment } => serde_json::json!({"value": value.to_json(), "comment": comment}),
            Desired::Delete => serde_json::json!("delete"),
        },
        "version": d.version,
        "attempts": d.attempts,
        "traceId": d.trace_id,
        "assessmentId": d.assessment_id,
        "lastError": d.last_error,
        "enqueuedAt": time(d.enqueued_at),
        "nextAttemptAt": time(d.next_attempt_at),
        "updatedAt": time(d.updated_at),
    })
}

/// Requeues deliveries in `state` (only `key` if given); returns how many.
pub async fn retry_deliveries(
    store: &SharedStore,
    state: DeliveryState,
    key: Option<&VoteKey>,
) -> Result<u64, StoreError> {
    store.requeue(state, key).await
}
