//! Outbound HTTP: one pooled hyper client per purpose, built once at start-up.
//!
//! HTTPS goes through rustls (ring provider) with ALPN offering HTTP/2 and HTTP/1.1 (or only
//! HTTP/1.1, [`ClientOptions::http2`]); plain HTTP (local upstreams) uses HTTP/1.1. Trust roots are the system's, falling back to the bundled
//! Mozilla roots when the system has none (minimal containers).
//!
//! [`HttpClient::exchange`] is for the small request/response calls the proxy makes itself
//! (MLflow, token endpoints): it bounds the whole exchange in time and the response in size.
//! Proxied traffic uses [`HttpClient::request`] and is never collected.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::body::{Body, CollectError, collect_limited};
use crate::text::chain;

type Connector = hyper_rustls::HttpsConnector<HttpConnector>;

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
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls_config().as_ref().clone())
            .https_or_http()
            .enable_http1();
        let https = if opts.http2 {
            https.enable_http2().wrap_connector(http)
        } else {
            https.wrap_connector(http)
        };
        let inner = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(opts.pool_idle_timeout)
            .pool_max_idle_per_host(opts.pool_max_idle_per_host)
            .build(https);
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
