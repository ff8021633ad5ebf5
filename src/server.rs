//! The accept loop: HTTP/1.1 and h2c (prior knowledge) on one port, and a graceful drain.
//!
//! On shutdown the listener is closed first (new connections are refused), then every open
//! connection is told to finish what it is doing (HTTP/1.1: no more keep-alive; HTTP/2: GOAWAY)
//! and given up to the grace period; whatever is still running after that is cut: first asked
//! to end (the `on_cut` of [`serve_with_cut`]: open streams send their final error event), then,
//! after `cut_budget`, dropped. [`serve_with_cut`] returns only once every connection task has
//! ended, so that nothing a connection does (its access line, its message link) happens later.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

use crate::body::Body;

/// Serves `listener` with `handler` until `shutdown` resolves, then drains for at most `grace`.
pub async fn serve<H, F>(
    listener: TcpListener,
    handler: H,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
    name: &'static str,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    serve_with_cut(
        listener,
        handler,
        shutdown,
        grace,
        name,
        || {},
        Duration::ZERO,
    )
    .await;
}

/// [`serve`], and when the grace period is over: calls `on_cut`, gives the remaining
/// connections `cut_budget` to end, then drops them.
pub async fn serve_with_cut<H, F>(
    listener: TcpListener,
    handler: H,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
    name: &'static str,
    on_cut: impl FnOnce(),
    cut_budget: Duration,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    // Connection tasks, so that the cut can drop them and wait for them (a JoinSet: its
    // bookkeeping is per connection, nothing per poll).
    let mut connections = tokio::task::JoinSet::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // Slow clients may not hold a connection open without sending headers.
        .header_read_timeout(Duration::from_secs(30));
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(30)));
    let builder = Arc::new(builder);
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);

    loop {
        let accepted = tokio::select! {
            biased;
            () = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning or exiting.
                tracing::warn!(listener = name, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        let service = service_fn(move |req| {
            let handler = handler.clone();
            async move { Ok::<_, Infallible>(handler(req).await) }
        });
        let conn = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let conn = graceful.watch(conn);
        while connections.try_join_next().is_some() {}
        connections.spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }

    drop(listener);
    tracing::info!(listener = name, grace = %humantime::format_duration(grace), "shutting down: draining connections");
    tokio::select! {
        () = graceful.shutdown() => {
            tracing::info!(listener = name, "all connections drained");
        }
        () = tokio::time::sleep(grace) => {
            tracing::warn!(listener = name, "grace period elapsed; closing the remaining connections");
            on_cut();
            let ended = async { while connections.join_next().await.is_some() {} };
            if tokio::time::timeout(cut_budget, ended).await.is_err() {
                connections.abort_all();
            }
        }
    }
    while connections.join_next().await.is_some() {}
}
