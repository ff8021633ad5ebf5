//! Small programmable HTTP servers on 127.0.0.1:0 standing in for the agent (and token
//! endpoints) in fault-injection tests: they record what they receive, stream bodies on command,
//! stall, or cut the connection mid-stream.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// What the fake upstream received.
#[derive(Debug, Clone)]
pub struct Received {
    pub version: http::Version,
    pub method: Method,
    pub uri: http::Uri,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// A response body fed from a channel: `Ok` chunks are sent as they come, an `Err` aborts the
/// connection (the client sees a broken body), the sender dropping ends the body cleanly.
pub struct ChannelBody {
    rx: mpsc::Receiver<Result<Bytes, std::io::Error>>,
}

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        self.rx.poll_recv(cx).map(|o| o.map(|r| r.map(Frame::data)))
    }
}

pub type TestBody = http_body_util::Either<http_body_util::Full<Bytes>, ChannelBody>;

/// The sending side of a streamed response.
pub struct Streamer {
    tx: mpsc::Sender<Result<Bytes, std::io::Error>>,
}

impl Streamer {
    /// Sends a chunk; returns the instant it was handed to hyper, or `None` if the client is
    /// gone.
    pub async fn send(&self, chunk: impl Into<Bytes>) -> Option<Instant> {
        let t = Instant::now();
        self.tx.send(Ok(chunk.into())).await.ok().map(|()| t)
    }

    /// Cuts the connection mid-body.
    pub async fn abort(&self) {
        let _ = self
            .tx
            .send(Err(std::io::Error::other("upstream died")))
            .await;
    }

    /// Resolves when the client side (the body) is dropped: the connection was closed.
    pub async fn closed(&self) {
        self.tx.closed().await
    }
}

/// A streamed response and its sender.
pub fn streamed(status: u16, content_type: &str) -> (Response<TestBody>, Streamer) {
    let (tx, rx) = mpsc::channel(64);
    let mut res = Response::new(http_body_util::Either::Right(ChannelBody { rx }));
    *res.status_mut() = StatusCode::from_u16(status).unwrap();
    res.headers_mut()
        .insert(http::header::CONTENT_TYPE, content_type.parse().unwrap());
    (res, Streamer { tx })
}

/// A complete response.
pub fn full(status: u16, content_type: &str, body: impl Into<Bytes>) -> Response<TestBody> {
    let mut res = Response::new(http_body_util::Either::Left(http_body_util::Full::new(
        body.into(),
    )));
    *res.status_mut() = StatusCode::from_u16(status).unwrap();
    res.headers_mut()
        .insert(http::header::CONTENT_TYPE, content_type.parse().unwrap());
    res
}

type Handler =
    Arc<dyn Fn(Received) -> Pin<Box<dyn Future<Output = Response<TestBody>> + Send>> + Send + Sync>;

/// The HTTP/2 concurrent-stream limit of the TLS fake upstream (far below the 100–250 of real
/// servers, so that a test reaches it with a handful of streams).
pub const TLS_MAX_CONCURRENT_STREAMS: u32 = 2;

/// A fake upstream: every request is recorded, then answered by the handler.
pub struct Upstream {
    pub addr: SocketAddr,
    tls: bool,
    received: Arc<Mutex<Vec<Received>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    pub async fn start<F, Fut>(handler: F) -> Self
    where
        F: Fn(Received) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<TestBody>> + Send + 'static,
    {
        Self::start_with(None, handler).await
    }

    /// The same over TLS with this acceptor (HTTP/1.1 or HTTP/2, as ALPN decides); its
    /// [`Upstream::url`] is `https://localhost:PORT`. Its HTTP/2 allows
    /// [`TLS_MAX_CONCURRENT_STREAMS`] streams per connection, as servers in production cap it.
    pub async fn start_tls<F, Fut>(tls: tokio_rustls::TlsAcceptor, handler: F) -> Self
    where
        F: Fn(Received) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<TestBody>> + Send + 'static,
    {
        Self::start_with(Some(tls), handler).await
    }

    async fn start_with<F, Fut>(tls: Option<tokio_rustls::TlsAcceptor>, handler: F) -> Self
    where
        F: Fn(Received) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<TestBody>> + Send + 'static,
    {
        let is_tls = tls.is_some();
        let handler: Handler = Arc::new(move |r| Box::pin(handler(r)));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let rec = received.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let handler = handler.clone();
                let rec = rec.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let handler = handler.clone();
                        let rec = rec.clone();
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body
                                .collect()
                                .await
                                .map(|c| c.to_bytes())
                                .unwrap_or_default();
                            let r = Received {
                                version: parts.version,
                                method: parts.method,
                                uri: parts.uri,
                                headers: parts.headers,
                                body,
                            };
                            rec.lock().unwrap().push(r.clone());
                            Ok::<_, Infallible>(handler(r).await)
                        }
                    });
                    let mut server =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    server
                        .http2()
                        .max_concurrent_streams(TLS_MAX_CONCURRENT_STREAMS);
                    match tls {
                        None => {
                            let _ = server.serve_connection(TokioIo::new(stream), svc).await;
                        }
                        Some(tls) => {
                            if let Ok(stream) = tls.accept(stream).await {
                                let _ = server.serve_connection(TokioIo::new(stream), svc).await;
                            }
                        }
                    }
                });
            }
        });
        Self {
            addr,
            tls: is_tls,
            received,
            task,
        }
    }

    pub fn url(&self) -> String {
        if self.tls {
            format!("https://localhost:{}", self.addr.port())
        } else {
            format!("http://{}", self.addr)
        }
    }

    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.received.lock().unwrap().len()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An agent that answers every request with `events` SSE events `data: {"i": N}`, `gap` apart
/// (over TLS with `tls`). The stream stops early if the client goes away.
pub async fn sse_agent(
    tls: Option<tokio_rustls::TlsAcceptor>,
    events: usize,
    gap: Duration,
) -> Upstream {
    Upstream::start_with(tls, move |_r| async move {
        let (res, streamer) = streamed(200, "text/event-stream");
        tokio::spawn(async move {
            for i in 0..events {
                if streamer
                    .send(format!("data: {{\"i\": {i}}}\n\n"))
                    .await
                    .is_none()
                {
                    return;
                }
                tokio::time::sleep(gap).await;
            }
        });
        res
    })
    .await
}

/// A TCP listener that accepts connections and never answers.
pub async fn silent() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    (addr, task)
}

/// An address nothing listens on.
pub async fn closed_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    addr
}

/// Waits (bounded) until `f` holds.
pub async fn eventually(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
