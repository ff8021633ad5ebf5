//! `[server]` connection limits, and the small sections: `[log]`, `[identity]`, `[ui]`,
//! `[metrics]`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use super::feedback::RateLimit;
use super::raw;
use super::ser::{ser_duration, ser_opt_display, ser_opt_path};
use super::validate::Validator;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Serialize)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A `tracing` filter directive (`RUST_LOG` syntax); `RUST_LOG` itself wins when set.
    pub level: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct IdentityConfig {
    /// Read the user from `x-forwarded-email` & co. Only safe behind a platform that sets them.
    pub trust_forwarded_headers: bool,
    /// The user assumed when no identity header is present (local development only).
    pub dev_user: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct UiConfig {
    /// Serve this directory at `/` (SPA fallback); `None` serves the embedded reference page.
    #[serde(serialize_with = "ser_opt_path")]
    pub dir: Option<PathBuf>,
    pub enabled: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct MetricsConfig {
    /// A separate listener for `/metrics` (recommended when the main port is public).
    #[serde(serialize_with = "ser_opt_display")]
    pub listen: Option<SocketAddr>,
    /// Also serve `/metrics` on the main port.
    pub on_main_port: bool,
}

/// Connection lifetimes and limits of the listeners (`[server]`).
#[derive(Debug, Clone, Serialize)]
pub struct ServerConfig {
    /// Serving threads, each with its own single-threaded runtime (`server::workers`); 1 serves
    /// on the shared work-stealing runtime.
    pub workers: usize,
    /// Open connections per listener; past it the listener stops accepting until one closes.
    pub max_connections: usize,
    /// From accept until the protocol is known (first request bytes or the whole HTTP/2
    /// preface).
    #[serde(serialize_with = "ser_duration")]
    pub handshake_timeout: Duration,
    /// HTTP/1.1: time to receive a request's headers, counted from when the connection starts
    /// waiting for them (so it also bounds keep-alive idleness).
    #[serde(serialize_with = "ser_duration")]
    pub header_read_timeout: Duration,
    /// Longest time a connection may stay open with no request in flight (HTTP/2 pings do not
    /// count as activity).
    #[serde(serialize_with = "ser_duration")]
    pub idle_timeout: Duration,
    /// Longest silence while reading a request body (408 past it).
    #[serde(serialize_with = "ser_duration")]
    pub request_body_timeout: Duration,
    /// Requests a client may abandon (HTTP/2 RST_STREAM, or a disconnect) per connection before
    /// the connection is told to go away; `None` disables the check.
    pub reset_rate: Option<RateLimit>,
}

impl Validator {
    pub(super) fn server(&mut self, raw: raw::RawServer) -> ServerConfig {
        let workers = raw.workers.unwrap_or_else(default_workers);
        if !(1..=1024).contains(&workers) {
            self.problem("server.workers", "must be between 1 and 1024");
        }
        let max_connections = raw.max_connections.unwrap_or(2048);
        if !(1..=1_000_000).contains(&max_connections) {
            self.problem("server.max_connections", "must be between 1 and 1000000");
        }
        let handshake_timeout = self.positive_duration(
            "server.handshake_timeout",
            raw.handshake_timeout.as_deref(),
            "10s",
        );
        let header_read_timeout = self.positive_duration(
            "server.header_read_timeout",
            raw.header_read_timeout.as_deref(),
            "30s",
        );
        let idle_timeout =
            self.positive_duration("server.idle_timeout", raw.idle_timeout.as_deref(), "60s");
        let request_body_timeout = self.positive_duration(
            "server.request_body_timeout",
            raw.request_body_timeout.as_deref(),
            "30s",
        );
        let reset_rate = match (raw.reset_rate.per_second, raw.reset_rate.burst) {
            (Some(0.0), _) => None,
            (rate, burst) => {
                let per_second = rate.unwrap_or(10.0);
                let burst = burst.unwrap_or(100);
                if !(per_second.is_finite() && per_second > 0.0) {
                    self.problem(
                        "server.reset_rate.per_second",
                        "must be a positive number (0 disables the limit)",
                    );
                }
                if burst == 0 {
                    self.problem("server.reset_rate.burst", "must be at least 1");
                }
                Some(RateLimit { per_second, burst })
            }
        };
        ServerConfig {
            workers,
            max_connections,
            handshake_timeout,
            header_read_timeout,
            idle_timeout,
            request_body_timeout,
            reset_rate,
        }
    }
}

/// `server.workers` when not set: one per CPU this process may use (as nginx's
/// `worker_processes auto`), at most 64.
fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(64))
}
