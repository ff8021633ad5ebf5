//! Outbound HTTP: one pooled hyper client per purpose, built once at start-up.
//!
//! HTTPS goes through rustls (ring provider) with ALPN offering HTTP/2 and HTTP/1.1 (or only
//! HTTP/1.1, [`ClientOptions::http2`]); plain HTTP (local upstreams) uses HTTP/1.1. Trust roots are the system's, falling back to the bundled
//! Mozilla roots when the system has none (minimal containers).
//!
//! [`HttpClient::exchange`] is for the small request/response calls the proxy makes itself
//! (MLflow, token endpoints): it bounds the whole exchange in time and the response in size.
//! Proxied traffic uses [`HttpClient::request`] and is never collected.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::uri::Scheme;
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper_rustls::MaybeHttpsStream;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::net::TcpStream;

use crate::body::{Body, BoxError, CollectError, collect_limited};
use crate::text::chain;

type Connector = LazyTls;
type Stream = MaybeHttpsStream<TokioIo<TcpStream>>;
type ConnectFuture = Pin<Box<dyn Future<Output = Result<Stream, BoxError>> + Send>>;

/// Settings of one client pool.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    pub connect_timeout: Duration,
    pub pool_idle_timeout: Duration,
    pub pool_max_idle_per_host: usize,
    /// Offer HTTP/2 in ALPN. One HTTP/2 connection then carries every request to a host
    /// (hyper-util's pool opens no second one): requests beyond the server's
    /// `SETTINGS_MAX_CONCURRENT_STREAMS` wait for a stream to end.
    pub http2: bool,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            pool_idle_timeout: Duration::from_secs(90),
            pool_max_idle_per_host: 32,
            http2: true,
        }
    }
}

/// A pooled HTTP/1.1 + HTTP/2 client. Cheap to clone (the pool is shared).
#[derive(Clone, Debug)]
pub struct HttpClient {
    inner: Client<Connector, Body>,
}

/// A failed [`HttpClient::exchange`].
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    #[error("no response within {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    #[error("{0}")]
    Connect(String),
    #[error("response body larger than {0} bytes")]
    TooLarge(usize),
    #[error("reading the response failed: {0}")]
    Read(String),
}

impl ExchangeError {
    /// Whether the request may not have reached the server at all.
    pub fn is_connect(&self) -> bool {
        matches!(self, Self::Connect(_))
    }
}

impl HttpClient {
    pub fn new(opts: &ClientOptions) -> Self {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(opts.connect_timeout));
        http.set_keepalive(Some(Duration::from_secs(60)));
        let connector = LazyTls {
            http,
            https: Arc::new(OnceLock::new()),
            http2: opts.http2,
        };
        let inner = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(opts.pool_idle_timeout)
            .pool_max_idle_per_host(opts.pool_max_idle_per_host)
            .build(connector);
        Self { inner }
    }

    /// Sends a request; the response body streams.
    pub fn request(&self, req: Request<Body>) -> hyper_util::client::legacy::ResponseFuture {
        self.inner.request(req)
    }

    /// Sends a small request and reads the whole response (at most `limit` bytes), all within
    /// `timeout`.
    pub async fn exchange(
        &self,
        req: Request<Body>,
        timeout: Duration,
        limit: usize,
    ) -> Result<(http::response::Parts, Bytes), ExchangeError> {
        let fut = async {
            let res: Response<Incoming> = self
                .inner
                .request(req)
                .await
                .map_err(|e| ExchangeError::Connect(chain(&e)))?;
            let (parts, body) = res.into_parts();
            let bytes = collect_limited(body, limit).await.map_err(|e| match e {
                CollectError::TooLarge { limit } => ExchangeError::TooLarge(limit),
                CollectError::Read(e) => ExchangeError::Read(chain(e.as_ref())),
            })?;
            Ok((parts, bytes))
        };
        match tokio::time::timeout(timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(ExchangeError::Timeout(timeout)),
        }
    }
}

/// The TLS client configuration, built once: loading system roots reads files.
/// One [`HttpClient`] (and so one connection pool) per thread that uses it, for proxied
/// traffic under thread-per-core serving (`crate::server::workers`): a connection's task is
/// spawned on the runtime of the thread that opened it, so a pool shared between worker
/// threads would hand a request on one thread a connection driven by another, and every
/// chunk would cross threads. On the work-stealing runtime this is one pool per runtime worker
/// thread, which is harmless.
///
/// With HTTP/2 offered to the agent ([`ClientOptions::http2`]) there is one shared client:
/// HTTP/2's point is one connection for all streams, and per-thread pools would multiply the
/// connections (and the races to open them past the agent's stream limit) by the workers.
///
/// Written by hand because it is a thread-local map of a few entries; `thread_local` crates
/// key by type, not by instance.
#[derive(Debug, Clone)]
pub struct PerThread {
    opts: ClientOptions,
    /// Identifies this family of clients in the threads' maps; entries of families that no
    /// longer exist are dropped when a thread adds one.
    id: Arc<u64>,
    /// The one client of an HTTP/2-capable family.
    shared: Option<HttpClient>,
}

thread_local! {
    static POOLS: RefCell<Vec<(Weak<u64>, HttpClient)>> = const { RefCell::new(Vec::new()) };
}

impl PerThread {
    pub fn new(opts: ClientOptions) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let shared = opts.http2.then(|| HttpClient::new(&opts));
        Self {
            opts,
            id: Arc::new(NEXT.fetch_add(1, Ordering::Relaxed)),
            shared,
        }
    }

    /// Sends `req` through this thread's client (built on first use).
    pub fn request(&self, req: Request<Body>) -> hyper_util::client::legacy::ResponseFuture {
        if let Some(client) = &self.shared {
            return client.request(req);
        }
        POOLS.with(|pools| {
            let mut pools = pools.borrow_mut();
            if let Some((_, client)) = pools
                .iter()
                .find(|(id, _)| id.as_ptr() == Arc::as_ptr(&self.id))
            {
                return client.request(req);
            }
            pools.retain(|(id, _)| id.strong_count() > 0);
            let client = HttpClient::new(&self.opts);
            let fut = client.request(req);
            pools.push((Arc::downgrade(&self.id), client));
            fut
        })
    }
}

/// The connector: plain TCP for `http://`, rustls for `https://`, where the TLS configuration
/// (and with it the system's trust roots, about 30 ms of parsing and a few MB of transient
/// memory) is built on the first `https://` connection, not at start-up: a proxy in front of a
/// local agent never pays for it, and [`warm_tls`] builds it off the start-up path where
/// HTTPS is configured. hyper-rustls' connector needs its configuration when it is built; this
/// wrapper is the small part it does not do.
#[derive(Clone)]
pub struct LazyTls {
    http: HttpConnector,
    https: Arc<OnceLock<hyper_rustls::HttpsConnector<HttpConnector>>>,
    http2: bool,
}

impl tower::Service<Uri> for LazyTls {
    type Response = Stream;
    type Error = BoxError;
    type Future = ConnectFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Both connectors are always ready (they hold no capacity of their own).
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        if uri.scheme() == Some(&Scheme::HTTPS) {
            let mut https = self
                .https
                .get_or_init(|| {
                    let builder = hyper_rustls::HttpsConnectorBuilder::new()
                        .with_tls_config(tls_config().as_ref().clone())
                        .https_or_http()
                        .enable_http1();
                    if self.http2 {
                        builder.enable_http2().wrap_connector(self.http.clone())
                    } else {
                        builder.wrap_connector(self.http.clone())
                    }
                })
                .clone();
            Box::pin(async move { https.call(uri).await })
        } else {
            let mut http = self.http.clone();
            Box::pin(async move {
                let tcp = http.call(uri).await?;
                Ok(MaybeHttpsStream::Http(tcp))
            })
        }
    }
}

/// Builds the TLS client configuration (the trust roots) now, on a blocking thread, so that
/// the first HTTPS request does not wait for it.
pub async fn warm_tls() {
    let _ = tokio::task::spawn_blocking(tls_config).await;
}

fn tls_config() -> Arc<rustls::ClientConfig> {
    static CONFIG: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            // Idempotent; makes ring the provider for every rustls user in the process
            // (tokio-postgres-rustls included), so no code path can pick another by accident.
            let _ = rustls::crypto::ring::default_provider().install_default();
            let config = rustls::ClientConfig::builder()
                .with_root_certificates(root_store())
                .with_no_client_auth();
            Arc::new(config)
        })
        .clone()
}

/// System roots, or the bundled Mozilla roots when the system has none.
pub fn root_store() -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        let _ = roots.add(cert);
    }
    if roots.is_empty() {
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    }
    roots
}
