//! Operator commands that work on the store without serving: `migrate`, `dataset sync`, and `deliveries list`
//! (paged) / `deliveries stats` / `deliveries retry` to see the outbox and requeue dead letters (or parked deliveries, e.g.
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
    self, Delivery, DeliveryCursor, DeliveryState, Desired, Migrated, SharedStore, StoreError,
    VoteKey,
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

/// An MLflow client for the configured tracking server (`None`: none is configured), built as
/// the server builds its own.
pub fn mlflow_client(config: &Config) -> Option<crate::mlflow::MlflowClient> {
    let base = config.mlflow.tracking_uri.clone()?;
    let metrics = Arc::new(Metrics::new());
    let http = HttpClient::new(&ClientOptions::default());
    let tokens = TokenSources::new(config.databricks.clone(), http.clone(), metrics.clone());
    Some(crate::mlflow::MlflowClient::new(
        base,
        http,
        tokens.get(&config.mlflow.auth),
        config.mlflow.timeout,
        metrics,
    ))
}

/// `dataset sync`: opens the store and MLflow as the server would, then runs
/// [`crate::review::dataset::sync`].
pub async fn dataset_sync(
    config: &Config,
    args: &crate::review::dataset::SyncArgs,
    progress: impl FnMut(&str),
) -> Result<crate::review::dataset::Report, crate::review::dataset::SyncError> {
    use crate::review::dataset::{SyncError, sync};
    let Some(mlflow) = mlflow_client(config) else {
        return Err(SyncError::Usage(
            "dataset sync needs [mlflow] tracking_uri (or MLFLOW_TRACKING_URI)".to_owned(),
        ));
    };
    let store = open_store(config).await?;
    let exp = config.mlflow.experiment_id.as_deref();
    sync(
        &store,
        &mlflow,
        exp,
        config.review.thresholds,
        args,
        progress,
    )
    .await
}

/// One page of a delivery listing.
pub struct Page {
    /// The listing: a table with a summary line, or a JSON array of the rows.
    pub out: String,
    /// The `--after` value of the next page, when there are more rows.
    pub next: Option<String>,
}

/// Why an operator command's arguments cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("--after: not a cursor printed by `deliveries list` ({0:.40})")]
    BadCursor(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A page of deliveries (newest first): `limit` rows after the cursor `after` (from the
/// previous page's [`Page::next`]). Text: a summary line with the counts by state, then a
/// table; JSON: an array of the rows.
pub async fn list_deliveries(
    store: &SharedStore,
    state: Option<DeliveryState>,
    limit: u32,
    after: Option<&str>,
    json: bool,
) -> Result<Page, AdminError> {
    let after = match after {
        Some(a) => {
            Some(DeliveryCursor::decode(a).ok_or_else(|| AdminError::BadCursor(a.to_owned()))?)
        }
        None => None,
    };
    // One row more than asked tells whether another page follows.
    let mut rows = store
        .list_deliveries_after(state, limit.saturating_add(1), after.as_ref())
        .await?;
    let next = if rows.len() > limit as usize {
        rows.truncate(limit as usize);
        rows.last().map(|d| DeliveryCursor::of(d).encode())
    } else {
        None
    };
    if json {
        let items: Vec<serde_json::Value> = rows.iter().map(delivery_json).collect();
        let out = serde_json::to_string_pretty(&items).unwrap_or_default() + "\n";
        return Ok(Page { out, next });
    }
    let out = delivery_table(store, &rows, next.as_deref()).await?;
    Ok(Page { out, next })
}

async fn delivery_table(
    store: &SharedStore,
    rows: &[Delivery],
    next: Option<&str>,
) -> Result<String, StoreError> {
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
    for d in rows {
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
    if let Some(next) = next {
        let _ = writeln!(out, "more: --after {next}");
    }
    Ok(out)
}

/// How many dead-letter reasons `deliveries stats` shows.
const DEAD_REASONS: u32 = 10;

/// Counts per state, the age of the oldest pending delivery, and the most common reasons of
/// dead letters: what an operator watching a drain needs, whatever the size of the outbox.
pub async fn delivery_stats(store: &SharedStore, json: bool) -> Result<String, StoreError> {
    let stats = store.delivery_stats().await?;
    let reasons = store.dead_reasons(DEAD_REASONS).await?;
    if json {
        let v = serde_json::json!({
            "pending": stats.pending,
            "waiting": stats.waiting,
            "done": stats.done,
            "dead": stats.dead,
            "oldestPendingSeconds": stats.oldest_pending.map(|d| d.as_secs_f64()),
            "deadReasons": reasons
                .iter()
                .map(|(reason, count)| serde_json::json!({"reason": reason, "count": count}))
                .collect::<Vec<_>>(),
        });
        return Ok(serde_json::to_string_pretty(&v).unwrap_or_default() + "\n");
    }
    let mut out = String::new();
    for (state, n) in [
        ("pending", stats.pending),
        ("waiting", stats.waiting),
        ("done", stats.done),
        ("dead", stats.dead),
    ] {
        let _ = writeln!(out, "{state:<8} {n:>10}");
    }
    let _ = writeln!(
        out,
        "oldest pending: {}",
        stats.oldest_pending.map_or_else(
            || "-".to_owned(),
            |d| humantime::format_duration(round(d)).to_string()
        )
    );
    if !reasons.is_empty() {
        let _ = writeln!(out, "dead letters by reason:");
        for (reason, n) in &reasons {
            let _ = writeln!(out, "{n:>10}  {reason}");
        }
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
