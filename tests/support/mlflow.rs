//! MLflow for integration tests: the shared tracking server, experiment and example agent that
//! `scripts/test.sh` starts (`FP_TEST_*`), private servers and agents a test can stop and restart
//! (outage tests), a fault-injecting fake tracking server, and small helpers to talk to them.
//!
//! Private processes run in their own process group and are killed with it on drop, so a failed
//! test leaves no `mlflow server` (or its uvicorn child) behind. Nothing here is used by the
//! library: it is test scaffolding only.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use feedback_proxy::auth::TokenSource;
use feedback_proxy::body::Body;
use feedback_proxy::client::{ClientOptions, HttpClient};
use feedback_proxy::metrics::Metrics;
use feedback_proxy::mlflow::{MlflowClient, MlflowErrorKind};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use super::env;

/// Base URL of the shared tracking server (`FP_TEST_MLFLOW_URL`).
pub fn mlflow_url() -> String {
    env("FP_TEST_MLFLOW_URL")
}

/// The shared experiment the example agent traces into (`FP_TEST_EXPERIMENT_ID`).
pub fn experiment_id() -> String {
    env("FP_TEST_EXPERIMENT_ID")
}

/// The venv's Python, with mlflow 3.17.2 (`FP_TEST_PYTHON`).
pub fn python() -> String {
    env("FP_TEST_PYTHON")
}

/// Base URL of the shared example agent (`FP_TEST_AGENT_URL`).
pub fn agent_url() -> String {
    env("FP_TEST_AGENT_URL")
}

/// A client for `base` with no auth and the given timeout, and its metrics.
pub fn client_with(base: &str, timeout: Duration) -> (MlflowClient, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::new());
    let url = url::Url::parse(base).unwrap_or_else(|e| panic!("bad MLflow URL {base}: {e}"));
    let client = MlflowClient::new(
        url,
        HttpClient::new(&ClientOptions::default()),
        TokenSource::None,
        timeout,
        metrics.clone(),
    );
    (client, metrics)
}

/// A client for the shared tracking server.
pub fn client() -> MlflowClient {
    client_with(&mlflow_url(), Duration::from_secs(10)).0
}

/// One small HTTP exchange (no proxy, 30 s cap): status and body parsed as JSON (`Null` when
/// the body is not JSON).
pub async fn http_json(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<serde_json::Value>,
) -> (StatusCode, serde_json::Value, Bytes) {
    let mut b = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let body = match body {
        Some(v) => {
            b = b.header("content-type", "application/json");
            Body::full(serde_json::to_vec(&v).expect("serializable"))
        }
        None => Body::Empty,
    };
    let req = b.body(body).expect("valid request");
    let (parts, bytes) = HttpClient::new(&ClientOptions::default())
        .exchange(req, Duration::from_secs(30), 16 << 20)
        .await
        .unwrap_or_else(|e| panic!("{url}: {e}"));
    let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    (parts.status, json, bytes)
}

/// Creates (or finds) an experiment by name on the server at `base`; returns its id.
pub async fn create_experiment(base: &str, name: &str) -> String {
    let (status, json, _) = http_json(
        Method::POST,
        &format!("{base}/api/2.0/mlflow/experiments/create"),
        &[],
        Some(serde_json::json!({ "name": name })),
    )
    .await;
    if status.is_success() {
        return json["experiment_id"]
            .as_str()
            .expect("experiment_id")
            .to_owned();
    }
    let (status, json, _) = http_json(
        Method::GET,
        &format!("{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name={name}"),
        &[],
        None,
    )
    .await;
    assert!(
        status.is_success(),
        "cannot create or find experiment {name}: {json}"
    );
    json["experiment"]["experiment_id"]
        .as_str()
        .expect("experiment_id")
        .to_owned()
}

/// What the agent answered to one streamed request.
#[derive(Debug)]
pub struct AgentAnswer {
    /// From the `{"trace_id": …}` event (the request asks for it).
    pub trace_id: Option<String>,
    /// The whole SSE body.
    pub body: String,
    /// When `[DONE]` had been read.
    pub done_at: Instant,
}

/// Streams one question to the agent at `agent` with `x-mlflow-return-trace-id: true`.
/// `client_request_id` is sent as `custom_inputs.client_request_id`; `user` as
/// `x-app-user-email`.
pub async fn ask_agent(
    agent: &str,
    text: &str,
    client_request_id: Option<&str>,
    user: Option<&str>,
) -> AgentAnswer {
    let mut body = serde_json::json!({
        "input": [{"role": "user", "content": text}],
        "stream": true,
        "custom_inputs": {"chunk_delay_ms": 0},
    });
    if let Some(c) = client_request_id {
        body["custom_inputs"]["client_request_id"] = c.into();
    }
    let mut headers = vec![("x-mlflow-return-trace-id", "true")];
    if let Some(u) = user {
        headers.push(("x-app-user-email", u));
    }
    let (status, _, bytes) = http_json(
        Method::POST,
        &format!("{agent}/invocations"),
        &headers,
        Some(body),
    )
    .await;
    let done_at = Instant::now();
    let body = String::from_utf8_lossy(&bytes).into_owned();
    assert!(status.is_success(), "agent answered {status}: {body}");
    assert!(body.contains("data: [DONE]"), "stream did not end: {body}");
    let trace_id = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok())
        .find_map(|v| {
            v.get("trace_id")
                .and_then(|t| t.as_str())
                .map(str::to_owned)
        });
    AgentAnswer {
        trace_id,
        body,
        done_at,
    }
}

/// Polls until the trace is visible with its full info (or `limit` passes); returns how long
/// it took and whether the first probe answered NotFound.
///
/// A trace can appear in two steps: first a bare record made from its spans (no client request
/// id, no metadata), then, tens of milliseconds later, the full info with
/// `mlflow.trace.infoFinalized = "true"`. Tests that read the client request id or the user
/// must wait for the second.
pub async fn wait_for_trace(
    client: &MlflowClient,
    trace_id: &str,
    limit: Duration,
) -> (Duration, bool) {
    let start = Instant::now();
    let mut first_not_found = None;
    loop {
        match client.get_trace_info(trace_id).await {
            Ok(info)
                if info
                    .metadata
                    .get("mlflow.trace.infoFinalized")
                    .is_some_and(|v| v == "true") =>
            {
                return (start.elapsed(), first_not_found.unwrap_or(false));
            }
            Ok(_) => {
                first_not_found.get_or_insert(false);
            }
            Err(e) if e.kind == MlflowErrorKind::NotFound => {
                first_not_found.get_or_insert(true);
            }
            Err(e) => panic!("get_trace_info({trace_id}): {e}"),
        }
        assert!(
            start.elapsed() < limit,
            "trace {trace_id} not visible after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Runs a Python snippet with the venv's Python; `args` become `sys.argv[1:]`. Returns stdout;
/// panics with stderr when it fails.
pub async fn run_python(code: &str, args: &[&str]) -> String {
    let out = tokio::process::Command::new(python())
        .arg("-I")
        .arg("-c")
        .arg(code)
        .args(args)
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env("no_proxy", "127.0.0.1,localhost")
        .output()
        .await
        .expect("python runs");
    assert!(
        out.status.success(),
        "python failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A free TCP port on 127.0.0.1 (free when asked; a process that binds it later may race).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// A process in its own process group, killed with its children on stop/drop.
struct Group {
    child: Child,
}

impl Group {
    fn spawn(mut cmd: Command, log: &Path) -> Self {
        let out = std::fs::File::create(log).expect("log file");
        let err = out.try_clone().expect("log file");
        cmd.stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .env("NO_PROXY", "127.0.0.1,localhost")
            .env("no_proxy", "127.0.0.1,localhost")
            .process_group(0);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        Self { child }
    }

    fn pgid(&self) -> String {
        format!("-{}", self.child.id())
    }

    fn signal(&self, sig: &str) -> bool {
        Command::new("kill")
            .args([sig, "--", &self.pgid()])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    fn alive(&self) -> bool {
        self.signal("-0")
    }

    /// Whether the group leader has exited (it is reaped here).
    fn leader_exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    fn stop(&mut self) {
        if self.alive() {
            self.signal("-TERM");
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                let _ = self.child.try_wait();
                if !self.alive() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            if self.alive() {
                self.signal("-KILL");
            }
        }
        let _ = self.child.wait();
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.stop();
    }
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// Waits until `GET url` answers 2xx; panics with the log tail if the process dies or
/// `limit` passes.
async fn wait_healthy(url: &str, group: &mut Group, log: &Path, limit: Duration, what: &str) {
    let http = HttpClient::new(&ClientOptions::default());
    let start = Instant::now();
    loop {
        let req = Request::get(url).body(Body::Empty).expect("request");
        if let Ok((parts, _)) = http.exchange(req, Duration::from_secs(2), 1 << 16).await {
            if parts.status.is_success() {
                return;
            }
        }
        if group.leader_exited() {
            panic!(
                "{what} exited before answering; last lines of {}:\n{}",
                log.display(),
                log_tail(log)
            );
        }
        if start.elapsed() > limit {
            panic!(
                "{what} did not answer {url} within {limit:?}; last lines of {}:\n{}",
                log.display(),
                log_tail(log)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The scratch directory for private servers: under `FP_TEST_TMP` when set (the test script
/// removes it), else the system's.
fn scratch_dir(prefix: &str) -> tempfile::TempDir {
    let parent = std::env::var_os("FP_TEST_TMP")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(parent)
        .expect("scratch directory")
}

/// How long a private `mlflow server` may take to answer (10–20 s idle; more under load).
const MLFLOW_START_LIMIT: Duration = Duration::from_secs(120);
const AGENT_START_LIMIT: Duration = Duration::from_secs(60);

/// A private `mlflow server` with its own port, SQLite db and artifact directory. `stop()`
/// and `start()` keep port and data, for outage tests; dropped → killed.
pub struct MlflowServer {
    port: u16,
    dir: tempfile::TempDir,
    group: Option<Group>,
}

impl MlflowServer {
    /// Starts a server and waits until it answers `/health`.
    pub async fn spawn() -> Self {
        let mut server = Self {
            port: free_port(),
            dir: scratch_dir("mlflow-server."),
            group: None,
        };
        server.start().await;
        server
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn log(&self) -> PathBuf {
        self.dir.path().join("mlflow.log")
    }

    /// (Re)starts the server on the same port and data; waits until healthy.
    pub async fn start(&mut self) {
        assert!(self.group.is_none(), "already running");
        let dir = self.dir.path();
        let mlflow = Path::new(&python())
            .parent()
            .expect("venv bin directory")
            .join("mlflow");
        let mut cmd = Command::new(mlflow);
        cmd.args(["server", "--host", "127.0.0.1", "--workers", "1"])
            .arg("--port")
            .arg(self.port.to_string())
            .arg("--backend-store-uri")
            .arg(format!("sqlite:///{}", dir.join("mlflow.db").display()))
            .arg("--default-artifact-root")
            .arg(dir.join("artifacts"))
            // No server-side job runners: seven extra processes that nothing here uses.
            .env("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false");
        let log = self.log();
        let mut group = Group::spawn(cmd, &log);
        let health = format!("{}/health", self.url());
        wait_healthy(
            &health,
            &mut group,
            &log,
            MLFLOW_START_LIMIT,
            "mlflow server",
        )
        .await;
        self.group = Some(group);
    }

    /// Stops the server (and its children); the port is free afterwards.
    pub fn stop(&mut self) {
        if let Some(mut g) = self.group.take() {
            g.stop();
        }
    }

    pub fn is_running(&self) -> bool {
        self.group.as_ref().is_some_and(Group::alive)
    }
}

/// The example agent (`examples/agent/agent.py`) on its own port, traced to a given server.
pub struct AgentProcess {
    port: u16,
    dir: tempfile::TempDir,
    tracking_url: String,
    experiment_id: String,
    env: BTreeMap<String, String>,
    group: Option<Group>,
}

impl AgentProcess {
    pub async fn spawn(tracking_url: &str, experiment_id: &str) -> Self {
        Self::spawn_with_env(tracking_url, experiment_id, &[]).await
    }

    /// With extra environment, e.g. `("MLFLOW_ASYNC_TRACE_LOGGING_MAX_INTERVAL_MILLIS",
    /// "2000")` or `("AGENT_CHUNK_DELAY_MS", "200")`.
    pub async fn spawn_with_env(
        tracking_url: &str,
        experiment_id: &str,
        env: &[(&str, &str)],
    ) -> Self {
        let mut agent = Self {
            port: free_port(),
            dir: scratch_dir("agent."),
            tracking_url: tracking_url.to_owned(),
            experiment_id: experiment_id.to_owned(),
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            group: None,
        };
        agent.start().await;
        agent
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn log(&self) -> PathBuf {
        self.dir.path().join("agent.log")
    }

    pub async fn start(&mut self) {
        assert!(self.group.is_none(), "already running");
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/agent/agent.py");
        let mut cmd = Command::new(python());
        cmd.arg(script)
            .args(["--host", "127.0.0.1", "--port"])
            .arg(self.port.to_string())
            .env("MLFLOW_TRACKING_URI", &self.tracking_url)
            .env("MLFLOW_EXPERIMENT_ID", &self.experiment_id)
            .envs(&self.env);
        let log = self.log();
        let mut group = Group::spawn(cmd, &log);
        let health = format!("{}/health", self.url());
        wait_healthy(
            &health,
            &mut group,
            &log,
            AGENT_START_LIMIT,
            "example agent",
        )
        .await;
        self.group = Some(group);
    }

    pub fn stop(&mut self) {
        if let Some(mut g) = self.group.take() {
            g.stop();
        }
    }
}

/// A request as the fake server received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: Method,
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// What the fake answers.
pub enum FakeReply {
    /// A response with this status, extra headers and body.
    Status(StatusCode, Vec<(&'static str, String)>, Bytes),
    /// Never answer (the connection stays open until the client gives up).
    Hang,
    /// Close the connection without answering (after the request was read: "applied, then the
    /// connection dropped").
    Drop,
}

impl FakeReply {
    pub fn json(status: u16, body: serde_json::Value) -> Self {
        Self::Status(
            StatusCode::from_u16(status).expect("status"),
            vec![("content-type", "application/json".to_owned())],
            Bytes::from(serde_json::to_vec(&body).expect("json")),
        )
    }
}

type Handler = dyn Fn(&Recorded) -> FakeReply + Send + Sync;

/// A fault-injecting stand-in for the tracking server on 127.0.0.1:0 (HTTP/1.1). Records every
/// request; the handler decides each answer. Stops when dropped.
pub struct FakeMlflow {
    pub addr: SocketAddr,
    requests: Arc<Mutex<Vec<Recorded>>>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeMlflow {
    pub async fn start(handler: impl Fn(&Recorded) -> FakeReply + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let requests = Arc::new(Mutex::new(Vec::new()));
        let handler: Arc<Handler> = Arc::new(handler);
        let recorded = requests.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let handler = handler.clone();
                let recorded = recorded.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let handler = handler.clone();
                        let recorded = recorded.clone();
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body
                                .collect()
                                .await
                                .map(|c| c.to_bytes())
                                .unwrap_or_default();
                            let rec = Recorded {
                                method: parts.method,
                                path: parts.uri.path().to_owned(),
                                headers: parts.headers,
                                body,
                            };
                            recorded.lock().expect("lock").push(rec.clone());
                            match handler(&rec) {
                                FakeReply::Status(status, headers, body) => {
                                    let mut res = Response::new(http_body_util::Full::new(body));
                                    *res.status_mut() = status;
                                    for (k, v) in headers {
                                        res.headers_mut()
                                            .insert(k, v.parse().expect("header value"));
                                    }
                                    Ok::<_, FakeDrop>(res)
                                }
                                FakeReply::Hang => {
                                    std::future::pending::<()>().await;
                                    Err(FakeDrop)
                                }
                                FakeReply::Drop => Err(FakeDrop),
                            }
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Self {
            addr,
            requests,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().expect("lock").clone()
    }
}

impl Drop for FakeMlflow {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The error a fake service returns to make hyper drop the connection unanswered.
#[derive(Debug)]
pub struct FakeDrop;

impl std::fmt::Display for FakeDrop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("fake server dropped the connection")
    }
}

impl std::error::Error for FakeDrop {}
