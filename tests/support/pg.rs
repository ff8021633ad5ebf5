//! Test helpers: Postgres (see mod.rs).
//!
//! The test setup (`scripts/lib/10-postgres.sh`) provides a shared Postgres (`FP_TEST_PG_URL`)
//! and two PRIVATE clusters with TLS and password auth: one for the TLS / credential tests
//! (`FP_TEST_PG_TLS_*`), one that the restart test may stop (`FP_TEST_PG_RESTART_*`). Every
//! test works in fresh databases ([`TestDb`]) and drops them afterwards, best-effort.
//! A missing Postgres makes the test FAIL with the setup's reason, never skip.

use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use feedback_proxy::auth::{TokenSource, TokenSources};
use feedback_proxy::client::{ClientOptions, HttpClient};
use feedback_proxy::config::{AuthSpec, Config, DatabricksConfig, Env, Secret, StoreConfig};
use feedback_proxy::metrics::Metrics;
use feedback_proxy::store::postgres::Deps;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio_postgres::{Client, NoTls};
use url::Url;

fn require(name: &str, error_var: &str) -> String {
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => v,
        _ => {
            let reason = std::env::var(error_var)
                .ok()
                .filter(|r| !r.is_empty())
                .unwrap_or_else(|| "the test setup did not run".to_owned());
            panic!(
                "{name} is not set ({reason}). The Postgres tests need the setup of `make test` \
                 (scripts/test.sh, scripts/lib/10-postgres.sh): DATABASE_URL, a Postgres at \
                 127.0.0.1:5432, or the PostgreSQL server binaries (initdb, pg_ctl) to start a \
                 throwaway cluster."
            )
        }
    }
}

/// The shared Postgres (a role that may CREATE DATABASE).
pub fn shared_url() -> String {
    require("FP_TEST_PG_URL", "FP_TEST_PG_ERROR")
}

/// Superuser URL of the private TLS cluster.
pub fn tls_url() -> String {
    require("FP_TEST_PG_TLS_URL", "FP_TEST_PG_TLS_ERROR")
}

/// The CA that signed the private clusters' certificates.
pub fn tls_ca() -> String {
    require("FP_TEST_PG_TLS_CA", "FP_TEST_PG_TLS_ERROR")
}

/// A CA that did not.
pub fn other_ca() -> String {
    require("FP_TEST_PG_OTHER_CA", "FP_TEST_PG_TLS_ERROR")
}

/// `url` with another database, user, password or host.
pub fn with_db(url: &str, db: &str) -> String {
    let mut u = Url::parse(url).expect("test Postgres URL");
    u.set_path(&format!("/{db}"));
    u.to_string()
}

pub fn with_user(url: &str, user: &str, password: Option<&str>) -> String {
    let mut u = Url::parse(url).expect("test Postgres URL");
    u.set_username(user).expect("set user");
    u.set_password(password).expect("set password");
    u.to_string()
}

pub fn with_host(url: &str, host: &str) -> String {
    let mut u = Url::parse(url).expect("test Postgres URL");
    u.set_host(Some(host)).expect("set host");
    u.to_string()
}

/// `url` plus query parameters.
pub fn with_params(url: &str, params: &[(&str, &str)]) -> String {
    let mut u = Url::parse(url).expect("test Postgres URL");
    u.query_pairs_mut().extend_pairs(params);
    u.to_string()
}

/// A plain (no TLS) admin connection; the test clusters accept those too.
pub async fn connect(url: &str) -> Client {
    let url = with_params(url, &[("sslmode", "disable")]);
    let (client, conn) = tokio_postgres::connect(&url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to the test Postgres: {e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// A unique name for test objects (databases, roles).
pub fn unique(prefix: &str) -> String {
    format!("{prefix}_{}_{:08x}", std::process::id(), fastrand::u32(..))
}

/// A fresh database on a server, dropped (best-effort) when the value goes away.
pub struct TestDb {
    admin_url: String,
    pub name: String,
    /// The same credentials as the admin URL, on this database.
    pub url: String,
}

impl TestDb {
    pub async fn create(admin_url: &str) -> Self {
        Self::create_owned(admin_url, None).await
    }

    /// A database owned by `owner` (so that role can create the proxy's schema in it).
    pub async fn create_owned(admin_url: &str, owner: Option<&str>) -> Self {
        let name = unique("fp_test");
        let admin = connect(admin_url).await;
        let owner = owner.map(|o| format!(" OWNER \"{o}\"")).unwrap_or_default();
        admin
            .batch_execute(&format!("CREATE DATABASE \"{name}\"{owner}"))
            .await
            .unwrap_or_else(|e| panic!("CREATE DATABASE on the test Postgres failed: {e}"));
        Self {
            admin_url: admin_url.to_owned(),
            url: with_db(admin_url, &name),
            name,
        }
    }

    /// An admin connection to this database.
    pub async fn admin(&self) -> Client {
        connect(&self.url).await
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // Drop may run inside the test's runtime (or while unwinding): do the async work on a
        // thread of its own with its own small runtime.
        let (admin_url, name) = (self.admin_url.clone(), self.name.clone());
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let url = with_params(&admin_url, &[("sslmode", "disable")]);
                let Ok(Ok((client, conn))) = tokio::time::timeout(
                    Duration::from_secs(5),
                    tokio_postgres::connect(&url, NoTls),
                )
                .await
                else {
                    return;
                };
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                let _ = tokio::time::timeout(
                    Duration::from_secs(10),
                    client
                        .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)")),
                )
                .await;
            });
        })
        .join();
    }
}

/// The store configuration the proxy would build from this `[store]` table. The `[databricks]`
/// section only satisfies validation of Databricks password sources; the tests pass their own
/// [`Deps`] (fake endpoints, fixed tokens).
pub fn store_config(url: &str, extra_toml: &str) -> StoreConfig {
    let text = format!(
        "[agent]\nurl = \"http://127.0.0.1:1\"\n\n\
         [databricks]\nhost = \"https://workspace.invalid\"\nclient_id = \"id\"\nclient_secret = \"secret\"\n\n\
         [store]\nurl = \"{url}\"\n{extra_toml}\n"
    );
    Config::from_toml_str(&text, &Env::from_pairs(Vec::<(String, String)>::new()))
        .unwrap_or_else(|e| panic!("test store config is invalid: {e}"))
        .store
}

/// Deps with no Databricks credentials (static passwords).
pub fn deps() -> Deps {
    deps_with(None, None)
}

/// Deps whose Databricks host is `host` and whose app token is `bearer`.
pub fn deps_with(host: Option<Url>, bearer: Option<&str>) -> Deps {
    let metrics = Arc::new(Metrics::new());
    let http = HttpClient::new(&ClientOptions::default());
    let databricks = DatabricksConfig {
        host: host.clone(),
        client_id: None,
        client_secret: None,
        cli_profile: None,
        cli_path: "databricks".to_owned(),
        token_timeout: Duration::from_secs(5),
    };
    let tokens = TokenSources::new(databricks, http.clone(), metrics.clone());
    let source = match bearer {
        Some(b) => tokens.get(&AuthSpec::BearerEnv {
            var: "FP_TEST_BEARER".to_owned(),
            token: Secret::new(b),
        }),
        None => TokenSource::None,
    };
    Deps {
        databricks: source,
        databricks_host: host,
        http,
        metrics,
    }
}

/// Backend pids of the sessions with this `application_name`.
pub async fn backend_pids(admin: &Client, application_name: &str) -> Vec<i32> {
    let rows = admin
        .query(
            "SELECT pid FROM pg_stat_activity WHERE application_name = $1 ORDER BY pid",
            &[&application_name],
        )
        .await
        .expect("pg_stat_activity");
    rows.iter().map(|r| r.get(0)).collect()
}

/// Polls `check` every 20 ms until it holds, failing after `limit`.
pub async fn wait_until<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if check().await {
            return;
        }
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The private cluster the restart test may stop and start.
pub struct RestartCluster {
    pub url: String,
    data: String,
    pg_ctl: String,
    os_user: String,
    log: String,
}

impl RestartCluster {
    pub fn get() -> Self {
        Self {
            url: require("FP_TEST_PG_RESTART_URL", "FP_TEST_PG_TLS_ERROR"),
            data: require("FP_TEST_PG_RESTART_DATA", "FP_TEST_PG_TLS_ERROR"),
            pg_ctl: require("FP_TEST_PG_CTL", "FP_TEST_PG_TLS_ERROR"),
            os_user: std::env::var("FP_TEST_PG_OS_USER").unwrap_or_default(),
            log: std::env::var("FP_TEST_PG_RESTART_LOG").unwrap_or_default(),
        }
    }

    fn pg_ctl(&self, args: &[&str]) -> std::process::Output {
        let mut cmd = if self.os_user.is_empty() {
            Command::new(&self.pg_ctl)
        } else {
            let mut c = Command::new("runuser");
            c.args(["-u", &self.os_user, "--", &self.pg_ctl]);
            c
        };
        cmd.args(["-D", &self.data]).args(args);
        cmd.output().expect("run pg_ctl")
    }

    /// Fast shutdown (what a managed Postgres restart looks like to clients), waiting for it.
    pub fn stop(&self) {
        let out = self.pg_ctl(&["-m", "fast", "-w", "-t", "30", "stop"]);
        assert!(
            out.status.success(),
            "pg_ctl stop failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Starts it and waits until it accepts connections.
    pub fn start(&self) {
        let mut args = vec!["-w", "-t", "30"];
        if !self.log.is_empty() {
            args.extend(["-l", self.log.as_str()]);
        }
        args.push("start");
        let out = self.pg_ctl(&args);
        assert!(
            out.status.success(),
            "pg_ctl start failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn is_running(&self) -> bool {
        self.pg_ctl(&["status"]).status.success()
    }
}

/// Starts the cluster again if a test left it stopped (e.g. by panicking half-way).
pub struct EnsureRunning<'a>(pub &'a RestartCluster);

impl Drop for EnsureRunning<'_> {
    fn drop(&mut self) {
        if !self.0.is_running() {
            self.0.start();
        }
    }
}

/// A fake Databricks credential endpoint: answers both Lakebase credential APIs with the
/// current password, records every call.
pub struct FakeCredentials {
    pub url: Url,
    pub state: Arc<CredentialState>,
}

pub struct CredentialState {
    /// The password handed out.
    pub password: Mutex<String>,
    /// Lifetime of handed-out credentials.
    pub lifetime: Mutex<Duration>,
    /// Answer with this status and body instead, when set.
    pub fail: Mutex<Option<(u16, String)>>,
    pub calls: AtomicUsize,
    /// When each call was answered.
    pub answered_at: Mutex<Vec<Instant>>,
    /// (path, authorization header, JSON body) of each call.
    pub requests: Mutex<Vec<(String, String, serde_json::Value)>>,
}

impl CredentialState {
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl FakeCredentials {
    pub async fn start(password: &str, lifetime: Duration) -> Self {
        let state = Arc::new(CredentialState {
            password: Mutex::new(password.to_owned()),
            lifetime: Mutex::new(lifetime),
            fail: Mutex::new(None),
            calls: AtomicUsize::new(0),
            answered_at: Mutex::new(Vec::new()),
            requests: Mutex::new(Vec::new()),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr: SocketAddr = listener.local_addr().expect("addr");
        let st = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let st = st.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| answer(st.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Self {
            url: Url::parse(&format!("http://{addr}")).expect("url"),
            state,
        }
    }
}

async fn answer(
    st: Arc<CredentialState>,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let path = req.uri().path().to_owned();
    let auth = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    st.requests
        .lock()
        .expect("lock")
        .push((path.clone(), auth, json));
    st.calls.fetch_add(1, Ordering::SeqCst);
    if let Some((status, body)) = st.fail.lock().expect("lock").clone() {
        return Ok(Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .expect("response"));
    }
    let expiry = SystemTime::now() + *st.lifetime.lock().expect("lock");
    let expiry = humantime::format_rfc3339_millis(expiry).to_string();
    let token = st.password.lock().expect("lock").clone();
    let body = if path.ends_with("/postgres/credentials") {
        serde_json::json!({ "token": token, "expire_time": expiry })
    } else {
        serde_json::json!({ "token": token, "expiration_time": expiry })
    };
    st.answered_at.lock().expect("lock").push(Instant::now());
    Ok(Response::builder()
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("response"))
}
