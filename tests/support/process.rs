//! The real `feedback-proxy` binary as a child process: for what only a process shows (signals,
//! exit codes) or needs (its own environment, e.g. `SSL_CERT_FILE`).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use http::Request;

use super::proxy::h1;

pub struct ProxyProcess {
    pub child: Child,
    pub port: u16,
    dir: tempfile::TempDir,
}

impl ProxyProcess {
    /// Starts `feedback-proxy serve` on a free loopback port with `config` (TOML without
    /// `listen` and `[store]`, which are added: an SQLite file in a temporary directory) and
    /// `env` added to the environment. Output goes to a log file ([`ProxyProcess::log`]).
    pub fn spawn(config: &str, env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let path = dir.path().join("proxy.toml");
        std::fs::write(
            &path,
            format!(
                "listen = \"127.0.0.1:{port}\"\n{config}\n[store]\nurl = \"sqlite://{}/fp.db\"\n",
                dir.path().display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("proxy.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_feedback-proxy"))
            .args(["serve", "--config"])
            .arg(&path)
            .env_remove("DATABRICKS_APP_PORT")
            .envs(env.iter().copied())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap();
        Self { child, port, dir }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// The SQLite file of the proxy's store.
    pub fn db_path(&self) -> std::path::PathBuf {
        self.dir.path().join("fp.db")
    }

    /// Everything the process printed so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("proxy.log")).unwrap_or_default()
    }

    /// Waits (at most 20 s) until `/healthz` answers 200.
    pub async fn wait_healthy(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Ok(res)) = tokio::time::timeout(
                Duration::from_secs(1),
                h1().request(
                    Request::get(self.url("/healthz"))
                        .body(http_body_util::Full::new(bytes::Bytes::new()))
                        .unwrap(),
                ),
            )
            .await
            {
                if res.status() == 200 {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "proxy not healthy: {}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn sigterm(&self) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
    }

    /// Waits for the exit status, at most `within`.
    pub async fn exit_status(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "did not exit within {within:?}: {}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
