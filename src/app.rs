//! The request handler: one shared [`AppState`], one entry point ([`handle`]) that classifies the
//! request, dispatches it, turns errors into responses, and records the access log and metrics.
//!
//! Agent responses stream: their access log line is written by the response body when the
//! stream ends (it knows the bytes and the duration). Everything else is logged here.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::json;

use crate::body::{Body, json_response};
use crate::config::Config;
use crate::error::Error;
use crate::feedback::Feedback;
use crate::identity;
use crate::metrics::{Metrics, StateLabel};
use crate::proxy::{Forward, Proxy, X_REQUEST_ID};
use crate::review::{Page, Review};
use crate::route::{self, Route};
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

/// Handles one request. Never fails: errors become JSON responses here.
pub async fn handle(state: Arc<AppState>, req: Request<Incoming>) -> Response<Body> {
    let start = Instant::now();
    let request_id = request_id(req.headers());
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let route = route::classify(&method, &path, &state.config);
    let label = route.label();
    let route_index = route.index();

    let result = dispatch(&state, route, req, &request_id, start).await;
    let mut res = match result {
        Ok(res) => res,
        Err(err) => err.respond(&request_id, label),
    };
    res.headers_mut().insert(X_REQUEST_ID, request_id.clone());

    let status = res.status().as_u16();
    state
        .metrics
        .record_request(route_index, status, start.elapsed().as_secs_f64());
    if !matches!(res.body(), Body::Proxied(_)) {
        let bytes = http_body::Body::size_hint(res.body()).exact().unwrap_or(0);
        tracing::info!(
            target: "feedback_proxy::access",
            request_id = request_id.to_str().unwrap_or(""),
            method = %method,
            path = %path,
            route = label,
            status,
            duration_ms = start.elapsed().as_secs_f64() * 1e3,
            bytes,
            "request"
        );
    }
    res
}

async fn dispatch(
    state: &Arc<AppState>,
    route: Route<'_>,
    req: Request<Incoming>,
    request_id: &HeaderValue,
    start: Instant,
) -> Result<Response<Body>, Error> {
    match route {
        Route::Agent {
            route: agent_route,
            path,
        } => {
            // Cross-site and non-JSON requests are refused before anything else (issue 12);
            // a page or asset of the chat app template may be loaded from anywhere (a link
            // from the workspace is a cross-site navigation), as a browser reading it
            // cross-site still gets nothing without CORS.
            let app_read = agent_route.kind == crate::config::RouteKind::AiSdkApp
                && matches!(*req.method(), http::Method::GET | http::Method::HEAD);
            (!app_read)
                .then(|| {
                    crate::proxy::guard::check(
                        crate::proxy::guard::Stance {
                            cors_origins: &state.config.feedback.cors_origins,
                            trust_forwarded_host: state.config.identity.trust_forwarded_headers,
                        },
                        req.method(),
                        req.uri(),
                        req.headers(),
                    )
                })
                .transpose()?;
            let user = identity::user(req.headers(), &state.config.identity)?;
            // Boxed: the forwarding future is large, and hyper sizes every connection's task
            // for the largest future its handler can return; boxing keeps an idle stream's
            // connection small.
            Box::pin(state.proxy.forward(
                req,
                Forward {
                    route: agent_route,
                    path: &path,
                    user,
                    request_id: request_id.clone(),
                    start,
                },
            ))
            .await
        }
        Route::Health => Ok(json_response(StatusCode::OK, &json!({"status": "ok"}))),
        Route::Ready => Ok(ready(state).await),
        Route::Metrics => Ok(scrape(state).await),
        Route::FeedbackSubmit
        | Route::FeedbackList { .. }
        | Route::FeedbackRetract { .. }
        | Route::FeedbackPreflight => state.feedback.handle(route, req, request_id).await,
        Route::FeedbackMethodNotAllowed { allowed } => {
            let mut res = Error::MethodNotAllowed {
                method: req.method().clone(),
                allowed,
            }
            .into_response();
            res.headers_mut()
                .insert(http::header::ALLOW, HeaderValue::from_static(allowed));
            Ok(res)
        }
        Route::AgentBadPath { reason } => Err(Error::bad_request(
            "INVALID_PATH",
            format!("{}: {reason}", req.uri().path()),
        )),
        Route::AgentMethodNotAllowed { route } => Err(Error::RouteMethodNotAllowed {
            method: req.method().clone(),
            route: route.path.clone(),
            allowed: route
                .methods
                .iter()
                .map(http::Method::as_str)
                .collect::<Vec<_>>()
                .join(", "),
        }),
        Route::ReviewSummary | Route::ReviewFeedback | Route::ReviewPage => {
            let page = match route {
                Route::ReviewSummary => Page::Summary,
                Route::ReviewFeedback => Page::Feedback,
                _ => Page::Html,
            };
            state
                .review
                .handle(page, req.method(), req.headers(), req.uri().query())
                .await
        }
        Route::Ui => state.ui.serve(req.method(), req.uri().path()).await,
        Route::NotFound => Err(Error::NotFound(format!(
            "no route for {} {}",
            crate::text::echo(req.method().as_str()),
            crate::text::echo(req.uri().path())
        ))),
    }
}

/// `x-request-id` from the client (or the platform) if it is sane, else a fresh UUID.
fn request_id(headers: &http::HeaderMap) -> HeaderValue {
    if let Some(v) = headers.get(X_REQUEST_ID) {
        let b = v.as_bytes();
        if !b.is_empty() && b.len() <= 128 && b.iter().all(|c| c.is_ascii_graphic()) {
            return v.clone();
        }
    }
    HeaderValue::from_str(&uuid::Uuid::new_v4().to_string())
        .unwrap_or_else(|_| HeaderValue::from_static("invalid"))
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
async fn ready(state: &AppState) -> Response<Body> {
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
