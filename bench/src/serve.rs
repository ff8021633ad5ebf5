//! The HTTP/1.1 accept loop shared by the two stand-in servers (the agent and MLflow).
//!
//! Loopback only, keep-alive on, `TCP_NODELAY` on (as the proxy and nginx set it). Nothing read
//! from the network can make it panic: a failed accept is logged and retried, a broken
//! connection just ends its task. It exits by itself after `exit_after`, so that a harness killed
//! with SIGKILL cannot leave it behind for long.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpSocket};

/// The listen backlog: a burst of a thousand new upstream connections (1,000 SSE streams
/// starting within one event interval) must not overflow the accept queue, or SYN retries
/// (1 s) would show up as time to first byte. Capped by `net.core.somaxconn`.
const BACKLOG: u32 = 4096;

use crate::upstream::SseBody;

/// Every response body the stand-ins send: a whole buffer, or a paced event stream.
pub type BenchBody = Either<Full<Bytes>, SseBody>;

/// A whole-buffer body.
pub fn full(b: impl Into<Bytes>) -> BenchBody {
    Either::Left(Full::new(b.into()))
}

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// Serves `handler` on `listen` with `threads` runtime workers until `exit_after` elapses.
pub fn run_server<F, Fut>(
    listen: SocketAddr,
    threads: usize,
    exit_after: Duration,
    handler: F,
) -> Result<(), String>
where
    F: Fn(Request<Incoming>) -> Fut + Copy + Send + Sync + 'static,
    Fut: Future<Output = Response<BenchBody>> + Send + 'static,
{
    if !listen.ip().is_loopback() {
        return Err(format!("refusing to listen on {listen}: loopback only"));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    rt.block_on(async move {
        let listener = bind(listen).map_err(|e| format!("cannot bind {listen}: {e}"))?;
        let local = listener
            .local_addr()
            .map_err(|e| format!("no local address: {e}"))?;
        println!("listening {local}");
        let deadline = tokio::time::sleep(exit_after);
        tokio::pin!(deadline);
        loop {
            let accepted = tokio::select! {
                () = &mut deadline => {
                    eprintln!("fpbench: exiting after {exit_after:?} (safety limit)");
                    return Ok(());
                }
                a = listener.accept() => a,
            };
            let stream = match accepted {
                Ok((s, _)) => s,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    eprintln!("fpbench: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let fut = handler(req);
                    async move { Ok::<_, Infallible>(fut.await) }
                });
                // A client that goes away mid-response is normal here (idle streams, timeouts).
                let _ = http1::Builder::new()
                    .keep_alive(true)
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    })
}
