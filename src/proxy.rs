//! Forwarding chat requests to the Agent App (CONTRACT §3).
//!
//! One pooled upstream client, built at start-up. Per request: decide the message / chat ids,
//! optionally rewrite a small JSON body, set the hop headers (the app's bearer token,
//! `x-app-user-email`, `x-mlflow-return-trace-id`), drop what a browser must not pass on, and send.
//! The response streams back through [`ResponseBody`] frame by frame; an upstream that cannot be
//! reached is a 502, one that sends no headers within the configured time a 504. Which headers
//! pass either way is decided in `headers`.
//!
//! With `agent.auth = "user"` / `"user-or-app"` the agent hop acts on behalf of the user: it
//! carries the platform's `x-forwarded-access-token` as `authorization: Bearer …` and as
//! itself (`headers::platform_user_token`).
//!
//! An `ai-sdk-app` route (the chat app template's server behind the proxy) forwards the
//! template's whole site with the platform's identity headers; only `POST <prefix>/api/chat` is
//! an exchange: its chat id is the body's `id`, its message id and trace id come from the UI
//! message stream as it passes (`ResponseBody` learns them from the inspector).
//!
//! What this module deliberately does not do: buffer or compress response bodies, retry
//! requests (chat requests are not idempotent), or interpret agent errors.

mod body;
mod exchange;
pub mod guard;
mod headers;
pub mod limit;
pub mod link;
pub mod request;
pub mod sse;
pub mod streams;
pub mod trace;

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::Uri;
use http::header::HeaderValue;
use http::uri::{Authority, PathAndQuery, Scheme};

pub use body::ResponseBody;
use headers::*;
pub use headers::{X_CHAT_ID, X_CLIENT_REQUEST_ID, X_MESSAGE_ID, X_REQUEST_ID, media_type};
use limit::UserLimiter;
use link::LinkRecorder;

use crate::auth::TokenSource;
use crate::client::{ClientOptions, PerThread};
use crate::config::{AgentConfig, AgentRoute};
use crate::error::Error;
use crate::metrics::{KindLabel, Metrics};
use crate::store::{Claim, LinkRecord, SharedStore};

/// Per-request facts the forwarder needs from the caller.
pub struct Forward<'a> {
    pub route: &'a AgentRoute,
    /// The normalised request path (`route::path::normalize`), forwarded instead of the raw one.
    pub path: &'a str,
    pub user: String,
    pub request_id: HeaderValue,
    pub start: Instant,
}

/// The agent forwarder. One per process.
pub struct Proxy {
    /// One upstream pool per serving thread.
    client: PerThread,
    config: AgentConfig,
    /// `scheme://authority` of the agent.
    origin: String,
    /// The agent URL's path, without a trailing slash (often empty).
    base_path: String,
    /// `origin` parsed once, for building each request's URI from parts (`None` only for an
    /// origin `http` cannot parse, which configuration validation rules out).
    scheme_authority: Option<(Scheme, Authority)>,
    token: TokenSource,
    store: SharedStore,
    links: LinkRecorder,
    metrics: Arc<Metrics>,
    /// Open agent requests per user (`agent.max_concurrent_per_user`).
    limiter: UserLimiter,
    /// `server.request_body_timeout`, for the request bodies forwarded.
    body_timeout: Duration,
    /// Open response bodies, for shutdown to cut.
    streams: Arc<streams::OpenStreams>,
    /// `identity.trust_forwarded_headers`: whether the platform's headers (the user's token,
    /// the identity headers an `ai-sdk-app` upstream receives) may be read at all.
    trust_forwarded: bool,
}

impl Proxy {
    pub fn new(
        config: AgentConfig,
        token: TokenSource,
        store: SharedStore,
        links: LinkRecorder,
        metrics: Arc<Metrics>,
        body_timeout: Duration,
        trust_forwarded: bool,
    ) -> Self {
        let client = PerThread::new(ClientOptions {
            connect_timeout: config.connect_timeout,
            pool_idle_timeout: config.pool_idle_timeout,
            pool_max_idle_per_host: config.pool_max_idle_per_host,
            http2: config.http2,
        });
        let url = &config.url;
        let origin = match url.port() {
            Some(p) => format!("{}://{}:{p}", url.scheme(), url.host_str().unwrap_or("")),
            None => format!("{}://{}", url.scheme(), url.host_str().unwrap_or("")),
        };
        let base_path = url.path().trim_end_matches('/').to_owned();
        let scheme_authority = origin.parse::<Uri>().ok().and_then(|u| {
            let parts = u.into_parts();
            parts.scheme.zip(parts.authority)
        });
        let limiter = UserLimiter::new(config.max_concurrent_per_user);
        Self {
            body_timeout,
            limiter,
            client,
            config,
            origin,
            base_path,
            scheme_authority,
            token,
            store,
            links,
            metrics,
            streams: streams::OpenStreams::new(),
            trust_forwarded,
        }
    }

    /// The open response bodies (shutdown cuts them through this).
    pub fn streams(&self) -> &Arc<streams::OpenStreams> {
        &self.streams
    }

    /// The agent's `scheme://host:port`, for messages and readiness checks.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The per-user cap on open agent requests.
    pub fn limiter(&self) -> &UserLimiter {
        &self.limiter
    }

    /// The message id for this exchange and whether its open link is already written.
    ///
    /// A client-chosen id is confirmed with the store BEFORE the agent is called, because the
    /// agent must receive the id the proxy settles on: the client's if it is free or already
    /// theirs, otherwise (it belongs to another user) a fresh one. If the store fails or has
    /// not answered within `agent.claim_timeout`, the client's id is kept (the UI must be able
    /// to vote with the id it chose) and ownership is settled when the link is written: links
    /// never change owner, the first user linked to an id owns it, and only a vote by the
    /// link's owner is accepted, so a kept id can at worst turn out not to be votable by this
    /// user; it can never let anyone else vote on this answer. A minted id needs no store
    /// round trip here: nobody else can hold it.
    async fn message_id(
        &self,
        candidate: Option<String>,
        chat_id: &Option<String>,
        user: &str,
        route: &Arc<str>,
    ) -> (String, bool) {
        let Some(id) = candidate else {
            return (request::mint_message_id(), false);
        };
        let link = LinkRecord {
            message_id: id.clone(),
            chat_id: chat_id.clone(),
            user_id: user.to_owned(),
            trace_id: None,
            client_request_id: None,
            open: true,
            route: Some(route.clone()),
        };
        let timeout = self.config.claim_timeout;
        match tokio::time::timeout(timeout, self.store.claim_message(&link)).await {
            Ok(Ok(Claim::Created | Claim::Owned)) => (id, true),
            Ok(Ok(Claim::OtherUser)) => {
                let fresh = request::mint_message_id();
                tracing::warn!(client_message_id = %id, message_id = %fresh, "client message id belongs to another user; minted a fresh one");
                (fresh, false)
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, message_id = %id, "cannot confirm the client message id; keeping it (ownership is settled when the link is written)");
                (id, false)
            }
            Err(_) => {
                tracing::warn!(message_id = %id, timeout = ?timeout, "the store did not confirm the client message id in time (agent.claim_timeout); keeping it (ownership is settled when the link is written)");
                (id, false)
            }
        }
    }

    fn upstream_uri(
        &self,
        route: &AgentRoute,
        path: &str,
        query: Option<&str>,
    ) -> Result<Uri, Error> {
        let rest = if route.path == "/" {
            path
        } else {
            &path[route.path.len().min(path.len())..]
        };
        let mapped = route.upstream_path.as_deref().unwrap_or(&route.path);
        let mapped = if mapped == "/" && !rest.is_empty() {
            ""
        } else {
            mapped
        };
        let invalid = |e: &dyn std::fmt::Display| {
            Error::bad_request("INVALID_PATH", format!("cannot forward path: {e}"))
        };
        let mut s = String::with_capacity(
            self.base_path.len() + mapped.len() + rest.len() + query.map_or(0, |q| q.len() + 1) + 1,
        );
        s.push_str(&self.base_path);
        s.push_str(mapped);
        s.push_str(rest);
        if s.is_empty() {
            s.push('/');
        }
        if let Some(q) = query {
            s.push('?');
            s.push_str(q);
        }
        // Only the path is parsed per request; scheme and authority were parsed at start-up.
        let Some((scheme, authority)) = &self.scheme_authority else {
            return Err(invalid(&format!(
                "the agent URL {} is not a valid origin",
                self.origin
            )));
        };
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(scheme.clone());
        parts.authority = Some(authority.clone());
        parts.path_and_query =
            Some(PathAndQuery::from_maybe_shared(bytes::Bytes::from(s)).map_err(|e| invalid(&e))?);
        Uri::from_parts(parts).map_err(|e| invalid(&e))
    }

    fn count_error(&self, kind: &'static str) {
        self.metrics
            .upstream_errors
            .get_or_create(&KindLabel { kind })
            .inc();
    }
}
