//! Start-up and idle memory (scenario 7): how long from exec of the proxy to its first
//! `/readyz` 200, on the embedded store with a fresh data directory, and its resident memory
//! once it has served a few requests and sat idle.
//!
//! Each start: a free loopback port and a fresh directory; the config template's `@LISTEN@` and
//! `@STORE_URL@` filled in; the clock read right before the spawn (which returns once exec has
//! succeeded); then `GET /readyz` on a fresh connection every `poll` until one answers 200
//! (refused connections and non-200 answers are retried). The last `idle_starts` starts then
//! send `requests` chat requests (the fast upstream's 1 KiB JSON answer, so the store records
//! their message links) and a `/readyz`, wait `idle`, and read `Rss`/`Pss` (and `RssAnon`/`RssFile`) from /proc. Every
//! proxy is killed (SIGKILL: its data directory is thrown away) before the next starts.
//!
//! Blocking std code on purpose: one process and one poll at a time, nothing to overlap.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::procfs;
use crate::stats::percentile;
use crate::target::CHAT_REQUEST;

pub struct Options {
    pub proxy: PathBuf,
    pub template: PathBuf,
    pub work: PathBuf,
    pub starts: u32,
    pub idle_starts: u32,
    pub requests: u32,
    pub idle: Duration,
    pub poll: Duration,
    pub timeout: Duration,
}

/// Kills and reaps the proxy however the start ends.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn run(o: Options) -> Result<(), String> {
    let template = std::fs::read_to_string(&o.template)
        .map_err(|e| format!("cannot read {}: {e}", o.template.display()))?;
    let mut start_us: Vec<u64> = Vec::new();
    let mut rss: Vec<u64> = Vec::new();
    let mut pss: Vec<u64> = Vec::new();
    let mut anon: Vec<u64> = Vec::new();
    let mut file: Vec<u64> = Vec::new();
    let mut polls: Vec<u64> = Vec::new();
    for i in 0..o.starts {
        let dir = o.work.join(format!("start-{i}"));
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let port = free_port()?;
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let config = dir.join("proxy.toml");
        let text = template.replace("@LISTEN@", &addr.to_string()).replace(
            "@STORE_URL@",
            &format!("sqlite://{}", dir.join("proxy.db").display()),
        );
        std::fs::write(&config, text)
            .map_err(|e| format!("cannot write {}: {e}", config.display()))?;
        let log = std::fs::File::create(dir.join("proxy.log"))
            .map_err(|e| format!("cannot create the log: {e}"))?;
        let log2 = log
            .try_clone()
            .map_err(|e| format!("cannot clone the log: {e}"))?;
        let mut cmd = Command::new(&o.proxy);
        cmd.arg("serve")
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);

        let t0 = Instant::now();
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", o.proxy.display()))?;
        let mut proc = Running(child);
        let mut n = 0u64;
        let ready_after = loop {
            n += 1;
            if readyz_ok(addr) {
                break t0.elapsed();
            }
            if let Ok(Some(status)) = proc.0.try_wait() {
                return Err(format!(
                    "start {i}: the proxy exited ({status}) before /readyz answered 200; see {}",
                    dir.join("proxy.log").display()
                ));
            }
            if t0.elapsed() > o.timeout {
                return Err(format!(
                    "start {i}: no /readyz 200 within {:?}; see {}",
                    o.timeout,
                    dir.join("proxy.log").display()
                ));
            }
            std::thread::sleep(o.poll);
        };
        start_us.push(ready_after.as_micros() as u64);
        polls.push(n);

        if i + o.idle_starts >= o.starts {
            for _ in 0..o.requests {
                let status = http(
                    addr,
                    "POST",
                    "/invocations",
                    &[("content-type", "application/json")],
                    CHAT_REQUEST,
                )?;
                if status != 200 {
                    return Err(format!("start {i}: a chat request answered {status}"));
                }
            }
            if !readyz_ok(addr) {
                return Err(format!("start {i}: /readyz stopped answering 200"));
            }
            std::thread::sleep(o.idle);
            let m = procfs::memory(proc.0.id())?;
            rss.push(m.rss_kib);
            pss.push(m.pss_kib);
            let (a, f) = procfs::rss_split(proc.0.id())?;
            anon.push(a);
            file.push(f);
        }
        drop(proc);
    }
    let mut sorted = start_us.clone();
    sorted.sort_unstable();
    rss.sort_unstable();
    pss.sort_unstable();
    anon.sort_unstable();
    file.sort_unstable();
    let ms = |us: u64| (us as f64 / 10.0).round() / 100.0;
    println!(
        "{}",
        json!({
            "starts": o.starts,
            "start_p50_ms": ms(percentile(&sorted, 50.0)),
            "start_min_ms": ms(sorted.first().copied().unwrap_or(0)),
            "start_max_ms": ms(sorted.last().copied().unwrap_or(0)),
            "start_ms": start_us.iter().map(|&u| ms(u)).collect::<Vec<_>>(),
            "polls_p50": percentile(&{ polls.sort_unstable(); polls }, 50.0),
            "idle_samples": rss.len(),
            "idle_requests": o.requests,
            "idle_secs": o.idle.as_secs_f64(),
            "idle_rss_kib": percentile(&rss, 50.0),
            "idle_rss_max_kib": rss.last().copied().unwrap_or(0),
            "idle_pss_kib": percentile(&pss, 50.0),
            "idle_rss_anon_kib": percentile(&anon, 50.0),
            "idle_rss_file_kib": percentile(&file, 50.0),
        })
    );
    Ok(())
}

fn free_port() -> Result<u16, String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| format!("cannot bind a loopback port: {e}"))?;
    Ok(l.local_addr()
        .map_err(|e| format!("no local address: {e}"))?
        .port())
}

fn readyz_ok(addr: SocketAddr) -> bool {
    matches!(http(addr, "GET", "/readyz", &[], ""), Ok(200))
}

/// One request on a fresh connection (`Connection: close`); the status code. The whole answer
/// is read, so the server has finished with it.
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Result<u16, String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(200))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let _ = s.set_nodelay(true);
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| format!("socket: {e}"))?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes())
        .map_err(|e| format!("write {addr}: {e}"))?;
    let mut answer = Vec::new();
    s.read_to_end(&mut answer)
        .map_err(|e| format!("read {addr}: {e}"))?;
    let line = answer.split(|&b| b == b'\n').next().unwrap_or(&[]);
    std::str::from_utf8(line)
        .ok()
        .and_then(|l| l.split_ascii_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("{addr}: not an HTTP answer"))
}
