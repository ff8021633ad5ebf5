//! Thread-per-core serving (`server.workers`): one OS thread per worker, each with a
//! single-threaded tokio runtime and its own copy of the listening socket, as nginx runs one
//! event loop per worker process.
//!
//! Why: on a work-stealing runtime an exchange's tasks (the client connection, the upstream
//! connection, the body between them) are woken across threads, which costs a futex wake-up and
//! a context switch per hop; measured, that was most of the proxy's kernel time. On a worker,
//! a connection, the service it calls and the upstream connections that service checks out of
//! its pool (the pool is per thread, see [`crate::client::PerThread`]) all run on one thread.
//!
//! Every worker accepts from the same listening socket (duplicated descriptors: one accept
//! queue, each worker's event loop registered on it; whichever worker is free takes the next
//! connection). `SO_REUSEPORT` would give each worker a queue of its own but would also let a
//! second process on the same port silently take half the connections, so it is not used.
//!
//! A worker's runtime lives until [`Workers::release`]: tasks spawned on it (pooled upstream
//! and store connections, delivery attempts started by a request) keep running while the rest
//! of the process drains after the listeners have closed.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::{HttpService, connection_cap, serve_with_slots};
use crate::config::ServerConfig;

/// The worker threads of [`serve_on_workers`], held until the process has drained.
pub struct Workers {
    release: CancellationToken,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Workers {
    /// Lets the workers' runtimes end (dropping what still runs on them) and waits for their
    /// threads.
    pub async fn release(self) {
        self.release.cancel();
        let threads = self.threads;
        let joined = tokio::task::spawn_blocking(move || {
            for t in threads {
                if t.join().is_err() {
                    tracing::error!("a serving worker thread panicked");
                }
            }
        });
        let _ = joined.await;
    }
}

/// The settings every worker serves with.
pub struct WorkerSettings<C> {
    pub workers: usize,
    pub grace: Duration,
    pub name: &'static str,
    pub limits: ServerConfig,
    /// Called on every worker when its grace period is over (must be idempotent).
    pub on_cut: C,
    pub cut_budget: Duration,
}

/// Serves `listener` on `settings.workers` threads (see the module's documentation) until
/// `shutdown` resolves, each worker draining as [`super::serve_with_cut`] does. `make_service` is
/// called once on each worker's thread. Returns once every worker's connections have ended;
/// the workers' runtimes stay up until [`Workers::release`].
pub async fn serve_on_workers<S, M, C>(
    listener: TcpListener,
    make_service: M,
    shutdown: impl Future<Output = ()>,
    settings: WorkerSettings<C>,
) -> io::Result<Workers>
where
    S: HttpService,
    M: Fn() -> S + Clone + Send + 'static,
    C: Fn() + Clone + Send + 'static,
{
    let n = settings.workers.max(1);
    let listener = listener.into_std()?;
    let mut sockets = Vec::with_capacity(n);
    for _ in 1..n {
        sockets.push(listener.try_clone()?);
    }
    sockets.push(listener);

    // The connection cap is the listener's: the workers share it.
    let limits = settings.limits.clone();
    let slots = Arc::new(Semaphore::new(connection_cap(&limits)));
    let stop = CancellationToken::new();
    let release = CancellationToken::new();
    let mut threads = Vec::with_capacity(n);
    let mut ended = Vec::with_capacity(n);
    for (i, socket) in sockets.into_iter().enumerate() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (done, done_rx) = tokio::sync::oneshot::channel::<()>();
        ended.push(done_rx);
        let make_service = make_service.clone();
        let on_cut = settings.on_cut.clone();
        let limits = limits.clone();
        let slots = slots.clone();
        let (worker_stop, worker_release) = (stop.clone(), release.clone());
        let (grace, name, cut_budget) = (settings.grace, settings.name, settings.cut_budget);
        let thread = std::thread::Builder::new()
            .name(format!("fp-worker-{i}"))
            .spawn(move || {
                runtime.block_on(async move {
                    match TcpListener::from_std(socket) {
                        Ok(listener) => {
                            serve_with_slots(
                                listener,
                                make_service(),
                                worker_stop.cancelled_owned(),
                                grace,
                                name,
                                &limits,
                                on_cut,
                                cut_budget,
                                slots,
                            )
                            .await;
                        }
                        Err(e) => {
                            tracing::error!(worker = i, error = %e, "a serving worker cannot use the listener");
                        }
                    }
                    let _ = done.send(());
                    worker_release.cancelled().await;
                });
            });
        match thread {
            Ok(t) => threads.push(t),
            Err(e) => {
                // The threads already started end with the stop; this one never ran.
                stop.cancel();
                release.cancel();
                return Err(e);
            }
        }
    }

    // While serving: give the allocator's free pages back after bursts of connections.
    tokio::select! {
        () = shutdown => {}
        () = super::trim::after_bursts(slots.clone(), connection_cap(&limits)) => {}
    }
    stop.cancel();
    for done in ended {
        // An error means the worker's thread ended early (it logged why).
        let _ = done.await;
    }
    Ok(Workers { release, threads })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;

    use bytes::Bytes;
    use http::{Request, Response};
    use http_body_util::Full;
    use hyper::body::Incoming;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn limits() -> ServerConfig {
        crate::config::Config::from_toml_str(
            "[agent]\nurl = \"http://127.0.0.1:9\"\n",
            &crate::config::Env::default(),
        )
        .expect("a minimal config")
        .server
    }

    /// Every request is answered on a worker thread (named `fp-worker-N`), never on the
    /// runtime that called `serve_on_workers`; the workers drain on shutdown and end when
    /// released.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn requests_are_served_on_the_worker_threads() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let make_service = || {
            tower::service_fn(|_req: Request<Incoming>| async {
                let name = std::thread::current().name().unwrap_or("").to_owned();
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(name))))
            })
        };
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let served = tokio::spawn(serve_on_workers(
            listener,
            make_service,
            async {
                let _ = stop_rx.await;
            },
            WorkerSettings {
                workers: 2,
                grace: Duration::from_secs(1),
                name: "test",
                limits: limits(),
                on_cut: || {},
                cut_budget: Duration::ZERO,
            },
        ));
        for _ in 0..8 {
            let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
            s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                .await
                .expect("write");
            let mut res = String::new();
            s.read_to_string(&mut res).await.expect("read");
            let body = res.rsplit("\r\n\r\n").next().unwrap_or("");
            assert!(res.starts_with("HTTP/1.1 200"), "{res}");
            assert!(body.starts_with("fp-worker-"), "served on {body:?}");
        }
        let _ = stop_tx.send(());
        let workers = served.await.expect("joined").expect("workers started");
        workers.release().await;
        assert!(
            tokio::net::TcpStream::connect(addr).await.is_err(),
            "the listener is closed once the workers have drained"
        );
    }
}
