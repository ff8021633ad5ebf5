//! The shared [`AppState`] (built once at start-up), readiness and the metrics scrape.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Response, StatusCode};
use serde_json::json;

use crate::body::{Body, json_response};
use crate::config::Config;
use crate::feedback::Feedback;
use crate::metrics::{Metrics, StateLabel};
use crate::proxy::Proxy;
use crate::review::Review;
use crate::store::{DeliveryState, SharedStore};
use crate::ui::Ui;

/// Everything a request handler needs, built once at start-up.
pub struct AppState {
    pub config: Config,
    pub proxy: Proxy,
    pub feedback: Feedback,
    pub review: Review,
    pub store: SharedStore,
    pub metrics: Arc<Metrics>,
    pub ui: Ui,
}

/// A Prometheus scrape: the gauges mirrored from the store are read now, so that a scrape
/// always shows the store as it is (not as a background task last saw it), then everything is
/// encoded.
pub async fn scrape(state: &AppState) -> Response<Body> {
    refresh_store_gauges(state).await;
    metrics_response(&state.metrics)
}

/// Sets the delivery-state, oldest-pending and pool gauges from the store. The stats query
/// runs first, so the pool gauges count the connection it used; a store that does not answer
/// within 2 s leaves the delivery gauges as they were (the scrape still answers).
async fn refresh_store_gauges(state: &AppState) {
    const STATS_TIMEOUT: Duration = Duration::from_secs(2);
    let metrics = &state.metrics;
    match tokio::time::timeout(STATS_TIMEOUT, state.store.delivery_stats()).await {
        Ok(Ok(s)) => {
            for (state, n) in [
                (DeliveryState::Pending, s.pending),
                (DeliveryState::Waiting, s.waiting),
                (DeliveryState::Done, s.done),
                (DeliveryState::Dead, s.dead),
            ] {
                metrics
                    .deliveries
                    .get_or_create(&StateLabel {
                        state: state.as_str(),
                    })
                    .set(n as i64);
            }
            metrics
                .delivery_oldest_pending_age
                .set(s.oldest_pending.map_or(0.0, |d| d.as_secs_f64()));
        }
        Ok(Err(e)) => tracing::debug!(error = %e, "cannot read delivery stats for a scrape"),
        Err(_) => tracing::debug!("the store did not answer a scrape's stats query within 2s"),
    }
    let pool = state.store.pool_status();
    metrics.store_pool_size.set(pool.size as i64);
    metrics.store_pool_available.set(pool.available as i64);
}

fn metrics_response(metrics: &Metrics) -> Response<Body> {
    let mut res = Response::new(Body::full(metrics.encode()));
    res.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    res
}

/// Readiness on the public port: ready or not, nothing else (the checks name internal hosts
/// and carry connection errors). When not ready, the failing checks are logged at warn; the
/// detailed answer is served on the metrics listener ([`ready_detailed`]).
pub(super) async fn ready(state: &AppState) -> Response<Body> {
    let (ok, details) = readiness(state).await;
    if ok {
        json_response(StatusCode::OK, &json!({"status": "ready"}))
    } else {
        tracing::warn!(checks = %details, "not ready");
        json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"status": "not_ready"}),
        )
    }
}

/// Readiness with every check and the delivery counts, for the metrics listener (an
/// operator's port, not the app's public one).
pub async fn ready_detailed(state: &AppState) -> Response<Body> {
    let (ok, details) = readiness(state).await;
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json_response(status, &details)
}

/// Readiness: the store answers and the agent accepts connections. MLflow is reported but does
/// not fail readiness: feedback is queued while it is down, by design.
async fn readiness(state: &AppState) -> (bool, serde_json::Value) {
    const CHECK_TIMEOUT: Duration = Duration::from_secs(2);
    let store_check = async {
        let t = Instant::now();
        match tokio::time::timeout(CHECK_TIMEOUT, state.store.health()).await {
            Ok(Ok(())) => {
                json!({"ok": true, "kind": state.store.kind(), "latency_ms": t.elapsed().as_millis() as u64})
            }
            Ok(Err(e)) => json!({"ok": false, "kind": state.store.kind(), "error": e.to_string()}),
            Err(_) => {
                json!({"ok": false, "kind": state.store.kind(), "error": "no answer within 2s"})
            }
        }
    };
    let agent_check = tcp_check(state.config.agent.url.clone(), CHECK_TIMEOUT);
    let mlflow_check = async {
        match &state.config.mlflow.tracking_uri {
            None => json!({"ok": true, "configured": false}),
            Some(u) => {
                let mut v = tcp_check(u.clone(), CHECK_TIMEOUT).await;
                v["configured"] = json!(true);
                v
            }
        }
    };
    let stats = async {
        match tokio::time::timeout(CHECK_TIMEOUT, state.store.delivery_stats()).await {
            Ok(Ok(s)) => serde_json::to_value(s).unwrap_or_default(),
            _ => serde_json::Value::Null,
        }
    };
    let (store, agent, mlflow, deliveries) =
        tokio::join!(store_check, agent_check, mlflow_check, stats);
    let ok = store["ok"] == true && agent["ok"] == true;
    (
        ok,
        json!({
            "status": if ok { "ready" } else { "not_ready" },
            "checks": {"store": store, "agent": agent, "mlflow": mlflow},
            "deliveries": deliveries,
        }),
    )
}

/// Whether a TCP connection to the URL's host and port can be opened.
async fn tcp_check(url: url::Url, timeout: Duration) -> serde_json::Value {
    let Some(host) = url.host_str().map(str::to_owned) else {
        return json!({"ok": false, "error": "URL has no host"});
    };
    let port = url.port_or_known_default().unwrap_or(80);
    let target = format!("{}:{port}", host.trim_matches(['[', ']']));
    let t = Instant::now();
    match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(&target)).await {
        Ok(Ok(_)) => json!({"ok": true, "latency_ms": t.elapsed().as_millis() as u64}),
        Ok(Err(e)) => json!({"ok": false, "error": format!("cannot connect to {target}: {e}")}),
        Err(_) => {
            json!({"ok": false, "error": format!("no connection to {target} within {}s", timeout.as_secs())})
        }
    }
}
