//! feedback-proxy: a streaming reverse proxy in front of a Databricks agent app that links each
//! answer to its MLflow trace and delivers user feedback as MLflow assessments.
//!
//! # Map of the crate
//!
//! - [`config`]: TOML + environment → validated, typed [`Config`] (before any port is bound).
//! - [`server`]: accept loop, HTTP/1.1 + h2c, graceful drain; runs any tower `Service`.
//! - [`app`]: the shared [`app::AppState`] and the service stack ([`app::service`]: tower and
//!   tower-http layers around the router, the one way out for errors).
//! - [`route`]: classifies a request once into a [`route::Route`].
//! - [`identity`]: who is calling; which identity headers are trusted.
//! - [`proxy`]: forwarding to the agent (`proxy::exchange`: request, send, respond); `proxy::sse` / `proxy::trace` read trace ids out of
//!   streams as they pass; `proxy::link` records message → trace links off the streaming path.
//! - [`feedback`]: `/api/feedback*` and the delivery of votes to MLflow.
//! - [`review`]: the owner's view (`/review`, `/api/review/*`) and the `export` command.
//! - [`mlflow`]: typed MLflow REST client.
//! - [`store`]: the `Store` trait with Postgres and SQLite backends.
//! - [`auth`]: token sources (static, Databricks OAuth M2M, Databricks CLI) and, in
//!   [`auth::password`], the Postgres password sources (Lakebase minting among them).
//! - [`client`]: the pooled outbound HTTP client.
//! - [`metrics`], [`telemetry`]: Prometheus metrics and logging.
//! - [`admin`]: operator commands on the store (`migrate`, `deliveries list|retry`).
//! - [`error`], [`body`]: the crate error and its one mapping to HTTP; the one body type.
//! - [`domain`]: the types several layers share (vote values, vote keys, message links).
//! - [`text`]: error chains and one-line, bounded strings for logs and messages.
//!
//! ## Layers
//!
//! No module imports one that imports it, directly or not (`scripts/check-layers.py` checks
//! it, and that no module is over 600 lines). Bottom up: leaves (`body`, `text`, `config`,
//! `domain`) → `client`, `metrics` → `auth` → `store` → `mlflow`, `identity`, `error` →
//! `proxy`, `feedback`, `review` → `app` → this crate root. A parent module and its submodules count as
//! different modules, so a parent that re-exports its children keeps what they share in a
//! child of its own (`store::api`, `config::validate`, `mlflow::types`,
//! `store::postgres::handle`).
//!
//! The binary (`main.rs`) only parses the command line and calls into [`App`].

// No unsafe code, with one exception allowed where it is: `server/trim.rs` calls glibc's
// `malloc_trim` (one FFI call, no pointers).
#![deny(unsafe_code)]

pub mod admin;
pub mod app;
pub mod auth;
pub mod body;
pub mod client;
pub mod config;
pub mod domain;
pub mod error;
pub mod feedback;
pub mod identity;
pub mod metrics;
pub mod mlflow;
pub mod proxy;
pub mod review;
pub mod route;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod text;
pub mod ui;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::Config;

use app::AppState;
use auth::TokenSources;
use client::{ClientOptions, HttpClient};
use metrics::Metrics;
use proxy::Proxy;
use proxy::link::{LinkRecorder, LinkWriter};
use store::StoreError;

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot open the store: {0}")]
    Store(#[from] StoreError),
    #[error("cannot start the serving workers: {0}")]
    Workers(std::io::Error),
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// A built proxy, ready to serve: clients, store and background tasks are up.
pub struct App {
    state: Arc<AppState>,
    link_writer: LinkWriter,
    /// Stops the background tasks (delivery worker, housekeeping).
    stop: CancellationToken,
    background: Vec<tokio::task::JoinHandle<()>>,
}

impl App {
    /// Builds everything expensive once: HTTP clients, token sources, the store (running
    /// migrations), the link writer.
    pub async fn build(config: Config) -> Result<Self, StartError> {
        let metrics = Arc::new(Metrics::new());
        let https = std::iter::once(Some(&config.agent.url))
            .chain([
                config.mlflow.tracking_uri.as_ref(),
                config.databricks.host.as_ref(),
            ])
            .flatten()
            .any(|u| u.scheme() == "https");
        if https {
            // The trust roots are loaded off the start-up path (see `client::LazyTls`).
            tokio::spawn(client::warm_tls());
        }
        let http = HttpClient::new(&ClientOptions::default());
        let tokens = TokenSources::new(config.databricks.clone(), http.clone(), metrics.clone());

        let store = store::open(
            &config.store,
            admin::store_deps(&config, &http, &tokens, metrics.clone()),
        )
        .await?;

        let (links, link_writer) = LinkRecorder::spawn(
            store.clone(),
            config.agent.link_queue,
            config.agent.link_buffer,
            metrics.clone(),
        );
        let proxy = Proxy::new(
            config.agent.clone(),
            tokens.get(&config.agent.auth),
            store.clone(),
            links.clone(),
            metrics.clone(),
            config.server.request_body_timeout,
            config.identity.trust_forwarded_headers,
        );
        let mlflow = config.mlflow.tracking_uri.clone().map(|base| {
            mlflow::MlflowClient::new(
                base,
                http.clone(),
                tokens.get(&config.mlflow.auth),
                config.mlflow.timeout,
                metrics.clone(),
            )
        });
        let label_sync = mlflow.clone().filter(|_| config.mlflow.sync_label_schemas);
        let deliverer = Arc::new(feedback::delivery::Deliverer::with_follow_ups(
            store.clone(),
            mlflow,
            &config.mlflow,
            config.delivery.clone(),
            metrics.clone(),
            feedback::delivery::follow::FollowUps::new(
                config.review.mlflow_queue.clone(),
                config.datasets.auto.clone(),
                config.review.thresholds,
            ),
        ));
        let feedback = feedback::Feedback::new(
            config.feedback.clone(),
            config.identity.clone(),
            store.clone(),
            deliverer.clone(),
            metrics.clone(),
            config.server.request_body_timeout,
            links,
        );
        let ui = ui::Ui::new(&config.ui);
        let review = review::Review::new(&config, store.clone());
        let state = Arc::new(AppState {
            proxy,
            feedback,
            review,
            store,
            metrics,
            ui,
            config,
        });

        let stop = CancellationToken::new();
        let mut background = Vec::new();
        if state.config.delivery.worker {
            background.push(tokio::spawn(deliverer.run_worker(stop.child_token())));
        }
        background.push(tokio::spawn(housekeeping(
            state.clone(),
            stop.child_token(),
        )));
        if state.config.mlflow.sync_label_schemas {
            match (label_sync, state.config.mlflow.experiment_id.clone()) {
                (Some(client), Some(experiment_id)) => {
                    let names = state.config.feedback.names.clone();
                    let stop = stop.child_token();
                    background.push(tokio::spawn(async move {
                        tokio::select! {
                            _ = feedback::label_sync::sync(&client, &experiment_id, &names) => {}
                            () = stop.cancelled() => {}
                        }
                    }));
                }
                _ => tracing::warn!(
                    "mlflow.sync_label_schemas is on but MLflow is not configured (tracking_uri and experiment_id): no label schema is synced"
                ),
            }
        }
        Ok(Self {
            state,
            link_writer,
            stop,
            background,
        })
    }

    pub fn state(&self) -> &Arc<AppState> {
        &self.state
    }

    /// Serves until `shutdown` resolves, then drains within the configured grace period.
    /// Fails only if the serving workers cannot start (`server.workers`).
    pub async fn serve(
        self,
        listener: TcpListener,
        metrics_listener: Option<TcpListener>,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), StartError> {
        let grace = self.state.config.shutdown_grace;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);

        let metrics_task = metrics_listener.map(|l| {
            let state = self.state.clone();
            let limits = self.state.config.server.clone();
            let mut rx = stop_rx.clone();
            tokio::spawn(async move {
                // `/readyz` here is the detailed readiness (checks, delivery counts) that the
                // public port no longer shows; every other path is the metrics.
                let service =
                    tower::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let state = state.clone();
                        async move {
                            Ok::<_, std::convert::Infallible>(if req.uri().path() == "/readyz" {
                                app::ready_detailed(&state).await
                            } else {
                                app::scrape(&state).await
                            })
                        }
                    });
                server::serve(
                    l,
                    service,
                    async move {
                        let _ = rx.wait_for(|s| *s).await;
                    },
                    Duration::from_secs(1),
                    "metrics",
                    &limits,
                )
                .await;
            })
        });

        // One drain deadline: connections get the grace period; what is still open then is cut
        // (streams end with an error event, recording their final link and access line) and
        // the rest — delivery attempts, queued and held links — must be done `tail` later. The
        // process then exits within the grace period plus at most a second (the platform
        // kills at 15 s).
        let tail = drain_tail(grace);
        let began = Arc::new(std::sync::OnceLock::new());
        let streams = self.state.proxy.streams().clone();
        let shutdown = {
            let began = began.clone();
            async move {
                shutdown.await;
                let _ = began.set(tokio::time::Instant::now());
                let _ = stop_tx.send(true);
            }
        };
        let workers = self.state.config.server.workers;
        let mut held = None;
        let mut failed = None;
        if workers > 1 {
            let state = self.state.clone();
            let settings = server::workers::WorkerSettings {
                workers,
                grace,
                name: "main",
                limits: self.state.config.server.clone(),
                on_cut: move || streams.cut(),
                cut_budget: tail / 2,
            };
            match server::workers::serve_on_workers(
                listener,
                move || app::service(state.clone()),
                shutdown,
                settings,
            )
            .await
            {
                Ok(w) => held = Some(w),
                Err(e) => failed = Some(e),
            }
        } else {
            server::serve_with_cut(
                listener,
                app::service(self.state.clone()),
                shutdown,
                grace,
                "main",
                &self.state.config.server,
                move || streams.cut(),
                tail / 2,
            )
            .await;
        }
        let deadline = began
            .get()
            .copied()
            .unwrap_or_else(tokio::time::Instant::now)
            + grace
            + tail;

        if let Some(t) = metrics_task {
            until_deadline(deadline, t).await;
        }
        // Let in-flight deliveries record their outcome and queued or held link writes reach
        // the store, until the deadline; whatever is left then is dropped (deliveries stay in
        // the outbox) so that nothing runs, or logs, after this returns.
        self.stop.cancel();
        let deliverer = self.state.feedback.deliverer().clone();
        let background = async {
            for t in self.background {
                until_deadline(deadline, t).await;
            }
            deliverer.shutdown(deadline).await;
        };
        tokio::join!(background, self.link_writer.shutdown(deadline));
        if let Some(w) = held {
            w.release().await;
        }
        failed.map_or(Ok(()), |e| Err(StartError::Workers(e)))
    }
}

/// The part of the drain deadline after the grace period: time to cut what is still open and
/// to finish writing (a quarter of the grace period, at most one second).
fn drain_tail(grace: Duration) -> Duration {
    (grace / 4).min(Duration::from_secs(1))
}

/// Waits for `task` until `deadline`, then aborts it and waits for it to end.
async fn until_deadline(deadline: tokio::time::Instant, mut task: tokio::task::JoinHandle<()>) {
    if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
        task.abort();
        let _ = task.await;
    }
}

/// Periodic upkeep that must not grow state without bound.
async fn housekeeping(state: Arc<AppState>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => state.feedback.prune_rate_limits(),
        }
    }
}

/// Builds the proxy from `config` and serves `listener` until `shutdown` resolves.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), StartError> {
    let metrics_listener = match config.metrics.listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Bind { addr, source })?,
        ),
        None => None,
    };
    App::build(config)
        .await?
        .serve(listener, metrics_listener, shutdown)
        .await
}
