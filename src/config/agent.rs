//! `[agent]`: the upstream agent, its routes (paths, methods) and streaming limits, with their
//! validation.

use std::time::Duration;

use http::HeaderName;
use serde::Serialize;
use url::Url;

use super::auth::AuthSpec;
use super::env::Env;
use super::raw;
use super::ser::{ser_display, ser_duration, ser_headers, ser_methods};
use super::validate::{Validator, path_has_prefix};

/// Default agent paths when neither `agent.paths` nor `[[agent.routes]]` is given: the two
/// endpoints of an MLflow agent server.
pub(super) const DEFAULT_AGENT_PATHS: [&str; 2] = ["/invocations", "/responses"];

/// Paths the proxy serves itself; an agent route may not shadow them.
pub(super) const RESERVED_PATHS: [&str; 6] = [
    "/healthz",
    "/readyz",
    "/metrics",
    "/api/feedback",
    "/api/review",
    "/review",
];

/// What sits behind a route, which decides how the proxy treats its traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RouteKind {
    /// An agent endpoint (an MLflow agent server, a Model Serving endpoint): every request is a
    /// chat; the proxy mints the message id and links each answer.
    Agent,
    /// The server of Databricks' chat app template (`e2e-chatbot-app-next`), the same app's
    /// trusted backend: everything under the prefix is forwarded to it (its pages, assets and
    /// API) with the platform's identity headers; only `POST <prefix>/api/chat` is a chat, whose
    /// AI SDK UI message stream names the message id (`start`) and the trace id
    /// (`data-traceId`). The proxy's own paths (`/api/feedback…`, `/healthz`, `/readyz`) are
    /// never forwarded: the proxy serves the template's feedback contract itself.
    AiSdkApp,
}

/// One inbound path prefix forwarded to the agent, with its per-route options.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AgentRoute {
    /// Inbound path prefix (segment-aware: `/invocations` matches `/invocations` and
    /// `/invocations/x`, not `/invocationsx`).
    pub path: String,
    /// Replaces `path` in the upstream request path when set.
    pub upstream_path: Option<String>,
    /// What the upstream is (`kind`, default `"agent"`).
    pub kind: RouteKind,
    /// Add `databricks_options.return_trace = true` to JSON bodies (Model Serving endpoints).
    pub return_trace: bool,
    /// Add `context.conversation_id` / `context.user_id` to JSON bodies.
    pub context: bool,
    /// Mint a client request id, send it as `x-client-request-id` and
    /// `custom_inputs.client_request_id`.
    pub client_request_id: bool,
    /// Inject `feedback-proxy.meta` / `feedback-proxy.trace` SSE events.
    pub events: bool,
    /// Methods forwarded on this route (`methods`, default `["POST"]`); others are 405.
    #[serde(serialize_with = "ser_methods")]
    pub methods: Vec<http::Method>,
}

impl AgentRoute {
    /// Whether any option requires the JSON request body to be rewritten.
    pub fn rewrites_body(&self) -> bool {
        self.return_trace || self.context || self.client_request_id
    }

    /// Whether `path` (normalised, under this route) is the chat endpoint of an
    /// [`RouteKind::AiSdkApp`] route: `<prefix>/api/chat` exactly.
    pub fn is_ai_sdk_chat(&self, path: &str) -> bool {
        if self.kind != RouteKind::AiSdkApp {
            return false;
        }
        let rest = if self.path == "/" {
            path
        } else {
            path.get(self.path.len()..).unwrap_or("")
        };
        rest.trim_end_matches('/') == AI_SDK_CHAT_PATH
    }
}

/// The chat endpoint of the chat app template, under its route's prefix.
pub const AI_SDK_CHAT_PATH: &str = "/api/chat";

/// Every method an [`RouteKind::AiSdkApp`] route forwards by default: the template's API uses
/// all of them.
const ALL_METHODS: [http::Method; 6] = [
    http::Method::GET,
    http::Method::HEAD,
    http::Method::POST,
    http::Method::PUT,
    http::Method::PATCH,
    http::Method::DELETE,
];

#[derive(Debug, Clone, Serialize)]
pub struct AgentConfig {
    /// Base URL of the Agent App (scheme, host, port and an optional base path).
    #[serde(serialize_with = "ser_display")]
    pub url: Url,
    pub routes: Vec<AgentRoute>,
    pub auth: AuthSpec,
    #[serde(serialize_with = "ser_duration")]
    pub connect_timeout: Duration,
    /// How long to wait for the agent's response headers. Agents whose tracking server is down
    /// can stall for minutes before their first byte, hence the generous default.
    #[serde(serialize_with = "ser_duration")]
    pub response_header_timeout: Duration,
    /// The longest silence allowed between two frames of a response body.
    #[serde(serialize_with = "ser_duration")]
    pub idle_timeout: Duration,
    /// Cap on a JSON request body the proxy rewrites (413 past it).
    pub max_rewrite_bytes: usize,
    /// Cap on one SSE event (or a JSON response body) inspected for trace ids; past it the
    /// stream is still forwarded, only inspection stops.
    pub max_inspect_bytes: usize,
    /// Response headers that carry a trace id.
    #[serde(serialize_with = "ser_headers")]
    pub trace_id_headers: Vec<HeaderName>,
    #[serde(serialize_with = "ser_duration")]
    pub pool_idle_timeout: Duration,
    pub pool_max_idle_per_host: usize,
    /// Offer HTTP/2 to an `https://` agent (ALPN). Off (HTTP/1.1, one connection per open
    /// stream) by default: one shared HTTP/2 connection makes chats beyond the agent server's
    /// concurrent-stream limit wait (see `client::ClientOptions::http2`).
    pub http2: bool,
    /// Capacity of the queue of message links waiting to be written to the store.
    pub link_queue: usize,
    /// Agent requests one user may have open at once (429 past it); 0 disables the cap.
    pub max_concurrent_per_user: usize,
    /// Most messages whose links are held in memory while the store is unavailable (past it,
    /// links of further answers are given up and counted).
    pub link_buffer: usize,
    /// How long a chat with a client-chosen message id waits for the store to confirm the id
    /// is free or the caller's before the agent is called; past it (or on a store error) the
    /// client's id is kept and ownership is settled when the link is written.
    #[serde(serialize_with = "ser_duration")]
    pub claim_timeout: Duration,
    /// Agent response headers passed to the browser although the proxy drops them by default
    /// (`set-cookie`, `access-control-*`, `strict-transport-security`, identity headers).
    #[serde(serialize_with = "ser_headers")]
    pub pass_response_headers: Vec<HeaderName>,
}

impl Validator {
    pub(super) fn agent(&mut self, raw: raw::RawAgent, env: &Env) -> AgentConfig {
        let url = match raw.url.as_deref() {
            Some(u) => self.http_url("agent.url", u),
            None => {
                self.problem(
                    "agent.url",
                    "is required (the base URL of the Agent App, e.g. \"http://127.0.0.1:5056\")",
                );
                None
            }
        }
        .unwrap_or_else(|| Url::parse("http://127.0.0.1:1").unwrap_or_else(|_| unreachable!()));

        let mut routes = Vec::new();
        let paths = match (&raw.paths, raw.routes.is_empty()) {
            (Some(p), _) => p.clone(),
            (None, true) => DEFAULT_AGENT_PATHS.iter().map(|s| s.to_string()).collect(),
            (None, false) => Vec::new(),
        };
        for (i, p) in paths.iter().enumerate() {
            let key = format!("agent.paths[{i}]");
            if let Some(path) = self.route_path(&key, p) {
                routes.push(AgentRoute {
                    path,
                    upstream_path: None,
                    kind: RouteKind::Agent,
                    return_trace: false,
                    context: false,
                    client_request_id: false,
                    events: false,
                    methods: vec![http::Method::POST],
                });
            }
        }
        for (i, r) in raw.routes.into_iter().enumerate() {
            let key = format!("agent.routes[{i}]");
            let Some(path) = r.path.as_deref() else {
                self.problem(&format!("{key}.path"), "is required");
                continue;
            };
            let Some(path) = self.route_path(&format!("{key}.path"), path) else {
                continue;
            };
            let upstream_path = r
                .upstream_path
                .as_deref()
                .and_then(|u| self.route_path(&format!("{key}.upstream_path"), u));
            let kind = match r.kind.as_deref() {
                None | Some("agent") => RouteKind::Agent,
                Some("ai-sdk-app") => RouteKind::AiSdkApp,
                Some(other) => {
                    self.problem(
                        &format!("{key}.kind"),
                        format!(
                            "unknown kind \"{}\" (expected \"agent\" or \"ai-sdk-app\")",
                            crate::text::one_line(other, 64)
                        ),
                    );
                    RouteKind::Agent
                }
            };
            let methods = match (kind, r.methods.as_deref()) {
                (RouteKind::AiSdkApp, None) => ALL_METHODS.to_vec(),
                (_, m) => self.route_methods(&format!("{key}.methods"), m),
            };
            if kind == RouteKind::AiSdkApp {
                // The template's server speaks for itself: it calls the agent (with its own
                // context and trace options) and writes its own stream.
                for (set, option) in [
                    (r.return_trace, "return_trace"),
                    (r.context, "context"),
                    (r.client_request_id, "client_request_id"),
                    (r.events, "events"),
                ] {
                    if set == Some(true) {
                        self.problem(
                            &format!("{key}.{option}"),
                            "does not apply to kind = \"ai-sdk-app\" (the template's server calls the agent itself)",
                        );
                    }
                }
            }
            routes.push(AgentRoute {
                path,
                upstream_path,
                kind,
                return_trace: r.return_trace.unwrap_or(false),
                context: r.context.unwrap_or(false),
                client_request_id: r.client_request_id.unwrap_or(false),
                events: r.events.unwrap_or(false),
                methods,
            });
        }
        let mut seen = std::collections::BTreeSet::new();
        for r in &routes {
            if !seen.insert(r.path.clone()) {
                self.problem(
                    "agent.routes",
                    format!("path \"{}\" is configured twice", r.path),
                );
            }
            // An ai-sdk-app route may lie over the proxy's own paths: they are served first
            // (see `route::classify`), which is how the template's feedback calls reach the
            // proxy. Any other route must not hide them.
            if r.kind == RouteKind::Agent
                && RESERVED_PATHS
                    .iter()
                    .any(|res| path_has_prefix(res, &r.path) || path_has_prefix(&r.path, res))
            {
                self.problem(
                    "agent.routes",
                    format!(
                        "path \"{}\" overlaps a path the proxy serves itself ({})",
                        r.path,
                        RESERVED_PATHS.join(", ")
                    ),
                );
            }
        }
        // Longest prefix first, so that matching can take the first hit.
        routes.sort_by_key(|r| std::cmp::Reverse(r.path.len()));

        let auth = self.agent_auth("agent.auth", raw.auth.as_deref(), env);
        let mut trace_id_headers = Vec::new();
        for (i, h) in raw.trace_id_headers.unwrap_or_default().iter().enumerate() {
            match HeaderName::from_bytes(h.as_bytes()) {
                Ok(n) => trace_id_headers.push(n),
                Err(_) => self.problem(
                    &format!("agent.trace_id_headers[{i}]"),
                    format!("\"{h}\" is not a valid header name"),
                ),
            }
        }
        let mut pass_response_headers = Vec::new();
        for (i, h) in raw
            .pass_response_headers
            .unwrap_or_default()
            .iter()
            .enumerate()
        {
            match HeaderName::from_bytes(h.as_bytes()) {
                Ok(n) => pass_response_headers.push(n),
                Err(_) => self.problem(
                    &format!("agent.pass_response_headers[{i}]"),
                    format!(
                        "\"{}\" is not a valid header name",
                        crate::text::one_line(h, 64)
                    ),
                ),
            }
        }
        let link_queue = raw.link_queue.unwrap_or(16_384);
        if link_queue == 0 {
            self.problem("agent.link_queue", "must be greater than zero");
        }
        // A 10-minute outage at 50 chats/s.
        let link_buffer = raw.link_buffer.unwrap_or(30_000);
        if link_buffer == 0 {
            self.problem("agent.link_buffer", "must be greater than zero");
        }
        let claim_timeout =
            self.duration("agent.claim_timeout", raw.claim_timeout.as_deref(), "250ms");
        if claim_timeout < Duration::from_millis(1) {
            self.problem("agent.claim_timeout", "must be at least 1ms");
        }
        AgentConfig {
            url,
            routes,
            auth,
            connect_timeout: self.duration(
                "agent.connect_timeout",
                raw.connect_timeout.as_deref(),
                "5s",
            ),
            response_header_timeout: self.duration(
                "agent.response_header_timeout",
                raw.response_header_timeout.as_deref(),
                "120s",
            ),
            idle_timeout: self.duration("agent.idle_timeout", raw.idle_timeout.as_deref(), "300s"),
            max_rewrite_bytes: self.size("agent.max_rewrite_bytes", raw.max_rewrite_bytes, 1 << 20),
            max_inspect_bytes: self.size("agent.max_inspect_bytes", raw.max_inspect_bytes, 1 << 20),
            trace_id_headers,
            pool_idle_timeout: self.duration(
                "agent.pool_idle_timeout",
                raw.pool_idle_timeout.as_deref(),
                "90s",
            ),
            pool_max_idle_per_host: raw.pool_max_idle_per_host.unwrap_or(256),
            // Off by default: see `client::ClientOptions::http2` and config/example.toml.
            http2: raw.http2.unwrap_or(false),
            link_queue,
            max_concurrent_per_user: raw.max_concurrent_per_user.unwrap_or(32),
            link_buffer,
            claim_timeout,
            pass_response_headers,
        }
    }

    pub(super) fn route_path(&mut self, key: &str, p: &str) -> Option<String> {
        if !p.starts_with('/') || p.contains(['?', '#', ' ']) {
            self.problem(
                key,
                format!("\"{p}\" is not a path (expected something like \"/invocations\")"),
            );
            return None;
        }
        let trimmed = p.trim_end_matches('/');
        Some(if trimmed.is_empty() { "/" } else { trimmed }.to_owned())
    }

    /// An agent route's methods: default POST; only methods with a meaning for a chat endpoint.
    pub(super) fn route_methods(&mut self, key: &str, raw: Option<&[String]>) -> Vec<http::Method> {
        use http::Method;
        let Some(raw) = raw else {
            return vec![Method::POST];
        };
        if raw.is_empty() {
            self.problem(
                key,
                "lists no methods (leave it out for the default [\"POST\"])",
            );
        }
        let mut methods = Vec::new();
        for m in raw {
            let method = match m.as_str() {
                "GET" => Method::GET,
                "HEAD" => Method::HEAD,
                "POST" => Method::POST,
                "PUT" => Method::PUT,
                "PATCH" => Method::PATCH,
                "DELETE" => Method::DELETE,
                other => {
                    self.problem(
                        key,
                        format!(
                            "unsupported method \"{other}\" (expected GET, HEAD, POST, PUT, PATCH or DELETE, in capitals)"
                        ),
                    );
                    continue;
                }
            };
            if !methods.contains(&method) {
                methods.push(method);
            }
        }
        methods
    }
}
