//! Runs the real proxy in-process on 127.0.0.1:0 (the same `App::build` + `serve` that the
//! binary uses) and talks to it over real sockets with HTTP/1.1 or h2c clients.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use feedback_proxy::config::{Config, Env};
use http::Response;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

pub struct TestProxy {
    pub addr: SocketAddr,
    pub state: std::sync::Arc<feedback_proxy::app::AppState>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    pub dir: tempfile::TempDir,
    /// The separate metrics listener, when started with one.
    pub metrics_addr: Option<SocketAddr>,
}

impl TestProxy {
    /// Starts the proxy with this configuration. Without a `[store]` table, an SQLite file in a
    /// temporary directory is used.
    pub async fn start(config: &str) -> Self {
        Self::start_with_env(config, &[]).await
    }

    pub async fn start_with_env(config: &str, env: &[(&str, &str)]) -> Self {
        Self::start_inner(config, env, false).await
    }

    /// The same with a separate metrics listener on 127.0.0.1:0 ([`TestProxy::metrics_url`]).
    pub async fn start_with_metrics_listener(config: &str) -> Self {
        Self::start_inner(config, &[], true).await
    }

    pub fn metrics_url(&self, path: &str) -> String {
        format!(
            "http://{}{path}",
            self.metrics_addr.expect("no metrics listener")
        )
    }

    async fn start_inner(config: &str, env: &[(&str, &str)], metrics: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut text = config.to_owned();
        if !text.contains("[store]") {
            text.push_str(&format!(
                "\n[store]\nurl = \"sqlite://{}/fp.db\"\n",
                dir.path().display()
            ));
        }
        let config = Config::from_toml_str(&text, &Env::from_pairs(env.iter().copied()))
            .unwrap_or_else(|e| panic!("test config invalid: {e}\n{text}"));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics_listener = if metrics {
            Some(TcpListener::bind("127.0.0.1:0").await.unwrap())
        } else {
            None
        };
        let metrics_addr = metrics_listener.as_ref().map(|l| l.local_addr().unwrap());
        let app = feedback_proxy::App::build(config).await.unwrap();
        let state = app.state().clone();
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(async move {
            app.serve(listener, metrics_listener, async {
                let _ = rx.await;
            })
            .await
            .expect("the proxy serves");
        });
        Self {
            addr,
            state,
            stop: Some(tx),
            task: Some(task),
            dir,
            metrics_addr,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Signals shutdown and waits for the drain to finish.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(15), task).await;
        }
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

pub type TestClient = Client<HttpConnector, Full<Bytes>>;

/// An HTTP/1.1 client.
pub fn h1() -> TestClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// An HTTP/2 client with prior knowledge (h2c).
pub fn h2c() -> TestClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// Sends `req` with `body`.
pub async fn send(
    client: &TestClient,
    req: http::request::Builder,
    body: impl Into<Bytes>,
) -> Response<Incoming> {
    client
        .request(req.body(Full::new(body.into())).unwrap())
        .await
        .unwrap()
}

pub async fn body_bytes(res: Response<Incoming>) -> Bytes {
    res.into_body().collect().await.unwrap().to_bytes()
}

pub async fn body_json(res: Response<Incoming>) -> serde_json::Value {
    let bytes = body_bytes(res).await;
    serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&bytes)))
}

/// Captured log output of this test process (a global subscriber, installed once).
pub fn logs() -> &'static std::sync::Mutex<Vec<u8>> {
    use std::sync::{Mutex, OnceLock};
    static LOGS: OnceLock<&'static Mutex<Vec<u8>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf: &'static Mutex<Vec<u8>> = Box::leak(Box::new(Mutex::new(Vec::new())));
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter("debug")
            .with_ansi(false)
            .with_writer(move || LogWriter(buf))
            .finish();
        let _ = tracing::subscriber::set_global_default(subscriber);
        buf
    })
}

/// The captured logs as text.
pub fn log_text() -> String {
    String::from_utf8_lossy(&logs().lock().unwrap()).into_owned()
}

struct LogWriter(&'static std::sync::Mutex<Vec<u8>>);

impl std::io::Write for LogWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// POSTs the vote `body` to `/api/feedback` as `user` (a trusted identity header); the status
/// and the JSON answer.
pub async fn post_vote(
    proxy: &TestProxy,
    user: &str,
    body: &serde_json::Value,
) -> (u16, serde_json::Value) {
    let res = send(
        &h1(),
        http::Request::post(proxy.url("/api/feedback"))
            .header("content-type", "application/json")
            .header("x-forwarded-email", user),
        body.to_string(),
    )
    .await;
    let status = res.status().as_u16();
    (status, body_json(res).await)
}

/// The link of `message_id` once its stream has ended (bounded wait: 20 s).
pub async fn closed_link(
    proxy: &TestProxy,
    message_id: &str,
) -> feedback_proxy::store::MessageLink {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(Some(l)) = proxy.state.store.get_link(message_id).await {
            if !l.open {
                return l;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no closed link for {message_id} within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
