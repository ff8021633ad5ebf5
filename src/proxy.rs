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

use crate::body::ReqBody;
use http::header::{
    ACCEPT_ENCODING, AUTHORIZATION, CACHE_CONTROL, CONTENT_LENGTH, HeaderMap, HeaderValue,
};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri};

pub use body::ResponseBody;
use body::{BodyOptions, LinkMode, StreamEnd};
use headers::*;
pub use headers::{X_CHAT_ID, X_CLIENT_REQUEST_ID, X_MESSAGE_ID, X_REQUEST_ID, media_type};
use limit::UserLimiter;
use link::LinkRecorder;
use request::{ClientIds, Rewrite};
use sse::Inspector;
use trace::HeaderId;

use crate::auth::TokenSource;
use crate::body::{Body, ClientBodyError, CollectError, body_timeout_in, collect_limited};
use crate::client::{ClientOptions, HttpClient};
use crate::config::{AgentConfig, AgentRoute, AuthSpec, RouteKind};
use crate::error::{Error, UpstreamError};
use crate::identity::{APP_USER_EMAIL, FORWARDED_ACCESS_TOKEN};
use crate::metrics::{KindLabel, Metrics};
use crate::store::{Claim, LinkRecord, SharedStore};
use crate::text::chain;

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
    client: HttpClient,
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
        let client = HttpClient::new(&ClientOptions {
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

    /// Forwards one request to the agent and returns the (streaming) response.
    pub async fn forward(
        &self,
        req: Request<ReqBody>,
        fwd: Forward<'_>,
    ) -> Result<Response<Body>, Error> {
        let route = fwd.route;
        let ai_sdk = route.kind == RouteKind::AiSdkApp;
        // On an ai-sdk-app route only the template's chat endpoint is an exchange with an
        // answer to link; its pages, assets and other API calls just pass.
        let exchange =
            !ai_sdk || (req.method() == http::Method::POST && route.is_ai_sdk_chat(fwd.path));
        // Held until the response body ends or is dropped (client gone): a client cannot make
        // the proxy open agent requests without bound, however fast it cancels them.
        let permit = if exchange {
            self.limiter
                .try_acquire(&fwd.user)
                .ok_or(Error::TooManyConcurrent {
                    limit: self.limiter.limit(),
                })?
        } else {
            None
        };
        let (parts, incoming) = req.into_parts();
        let incoming = crate::body::timed(incoming, Some(self.body_timeout));
        let cap = self.config.max_rewrite_bytes;

        let header_ids = ClientIds {
            message_id: header_id(&parts.headers, &X_MESSAGE_ID),
            chat_id: header_id(&parts.headers, &X_CHAT_ID),
        };
        let json_request = is_json(&parts.headers);
        let content_length = parts
            .headers
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let rewrite = json_request && route.rewrites_body();
        let want_peek = !ai_sdk
            && json_request
            && (header_ids.message_id.is_none() || header_ids.chat_id.is_none());
        // The template's chat body is small (one message, or the conversation in its
        // ephemeral mode) and names the chat: it is always read, under the cap.
        let read_body = rewrite
            || (ai_sdk && exchange && json_request)
            || (want_peek && content_length.is_some_and(|l| l > 0 && l <= cap as u64));

        let (buffered, incoming) = if read_body {
            let bytes = collect_limited(incoming, cap).await.map_err(|e| match e {
                CollectError::TooLarge { limit } => Error::PayloadTooLarge { limit },
                CollectError::Read(e) => match body_timeout_in(e.as_ref()) {
                    Some(after) => Error::RequestBodyTimeout { after },
                    None => Error::bad_request(
                        "BODY_READ_FAILED",
                        format!("reading the request body failed: {}", chain(e.as_ref())),
                    ),
                },
            })?;
            (Some(bytes), None)
        } else {
            (None, Some(incoming))
        };
        let body_ids = match (&buffered, want_peek, ai_sdk) {
            (Some(b), _, true) => ClientIds {
                message_id: None,
                chat_id: request::ai_sdk_chat_id(b),
            },
            (Some(b), true, false) => request::peek_ids(b),
            _ => ClientIds::default(),
        };
        // The route the link records, for the review surface's route filter.
        let route_name: Arc<str> = Arc::from(route.path.as_str());
        let (chat_id, (message_id, claimed)) = if ai_sdk {
            // The template mints the answer's id and names it in its stream; the link is
            // written once it is known (`LinkMode::FromStream`).
            (body_ids.chat_id, (String::new(), false))
        } else {
            let chat_id = header_ids.chat_id.or(body_ids.chat_id);
            let id = self
                .message_id(
                    header_ids.message_id.or(body_ids.message_id.clone()),
                    &chat_id,
                    &fwd.user,
                    &route_name,
                )
                .await;
            (chat_id, id)
        };
        if !message_id.is_empty() {
            tracing::Span::current().record("message_id", tracing::field::display(&message_id));
        }
        let client_request_id = route
            .client_request_id
            .then(|| request::client_request_id_for(&message_id, &fwd.user));
        // A `messageId` the body carries must name the settled id too (the agent must never
        // see an id that was refused for this user).
        let body_message_id = body_ids
            .message_id
            .as_deref()
            .filter(|b| *b != message_id)
            .map(|_| message_id.as_str());

        let body = match (buffered, incoming) {
            (Some(bytes), _) => {
                let rewritten = if rewrite || body_message_id.is_some() {
                    request::rewrite(
                        &bytes,
                        Rewrite {
                            route,
                            chat_id: chat_id.as_deref(),
                            user: &fwd.user,
                            client_request_id: client_request_id.as_deref(),
                            message_id: body_message_id,
                        },
                    )
                } else {
                    None
                };
                Body::full(rewritten.unwrap_or(bytes))
            }
            (None, Some(incoming)) => Body::Incoming(incoming),
            (None, None) => Body::Empty,
        };

        let uri = self.upstream_uri(route, fwd.path, parts.uri.query())?;
        let mut headers = HeaderMap::with_capacity(parts.headers.len() + 6);
        copy_request_headers(&parts.headers, &mut headers);
        if let Some(len) = body_len(&body) {
            headers.insert(CONTENT_LENGTH, HeaderValue::from(len));
        }
        // On behalf of the user: the platform's token for the user, else (user-or-app) the
        // app's own; the app's own for every other auth.
        let user_token = self
            .config
            .auth
            .on_behalf_of_user()
            .then(|| platform_user_token(&parts.headers, self.trust_forwarded))
            .flatten();
        if let Some(token) = &user_token {
            headers.insert(
                AUTHORIZATION,
                bearer(token).ok_or(Error::UserTokenRequired)?,
            );
            headers.insert(FORWARDED_ACCESS_TOKEN, token.clone());
        } else if self.config.auth == AuthSpec::User {
            return Err(Error::UserTokenRequired);
        } else if let Some(auth) = self.token.authorization().await.map_err(|source| {
            self.count_error("auth");
            Error::Auth {
                hop: "the agent",
                source,
            }
        })? {
            headers.insert(AUTHORIZATION, auth);
        }
        let user = HeaderValue::from_str(&fwd.user).map_err(|_| {
            Error::bad_request(
                "INVALID_IDENTITY",
                "the user id contains characters that cannot be sent in a header",
            )
        })?;
        if ai_sdk {
            set_app_identity(&parts.headers, &mut headers, &user, self.trust_forwarded);
        } else {
            // The agent learns the id the proxy settled on, never a client's refused one.
            if let Ok(v) = HeaderValue::from_str(&message_id) {
                headers.insert(X_MESSAGE_ID, v);
            }
            headers.insert(X_MLFLOW_RETURN_TRACE_ID, HeaderValue::from_static("true"));
        }
        headers.insert(APP_USER_EMAIL, user);
        headers.insert(ACCEPT_ENCODING, HeaderValue::from_static("identity"));
        headers.insert(X_REQUEST_ID, fwd.request_id.clone());
        if let Some(crid) = &client_request_id {
            if let Ok(v) = HeaderValue::from_str(crid) {
                headers.insert(X_CLIENT_REQUEST_ID, v);
            }
        }

        let mut up = Request::new(body);
        *up.method_mut() = parts.method.clone();
        *up.uri_mut() = uri;
        *up.headers_mut() = headers;

        let sent =
            tokio::time::timeout(self.config.response_header_timeout, self.client.request(up))
                .await;
        let res = match sent {
            Err(_) => {
                self.count_error("header_timeout");
                return Err(UpstreamError::HeaderTimeout {
                    upstream: self.origin.clone(),
                    after: self.config.response_header_timeout,
                }
                .into());
            }
            Ok(Err(e)) => {
                if let Some(after) = body_timeout_in(&e) {
                    // The client stalled its body; the agent request was aborted with it.
                    return Err(Error::RequestBodyTimeout { after });
                }
                let reason = chain(&e);
                if let Some(body) = ClientBodyError::find(&e) {
                    // The request body from the client broke (bad chunked framing, cut
                    // short): a 400 and a client error, not an agent failure.
                    return Err(Error::bad_request(
                        "BODY_READ_FAILED",
                        format!(
                            "reading the request body failed: {}",
                            chain(body.0.as_ref())
                        ),
                    ));
                }
                return Err(if e.is_connect() {
                    self.count_error("unreachable");
                    UpstreamError::Unreachable {
                        upstream: self.origin.clone(),
                        reason,
                    }
                } else {
                    self.count_error("protocol");
                    UpstreamError::Protocol {
                        upstream: self.origin.clone(),
                        reason,
                    }
                }
                .into());
            }
            Ok(Ok(res)) => res,
        };

        let (mut rparts, rbody) = res.into_parts();
        strip_hop_by_hop(&mut rparts.headers);
        strip_agent_only(&mut rparts.headers, &self.config.pass_response_headers);
        // One look at the media type serves both questions below.
        let media = media_type(&rparts.headers);
        let sse = media.is_some_and(is_event_stream_type);
        let json_response = !sse && media.is_some_and(is_json_type);
        if sse {
            rparts.headers.insert(
                CACHE_CONTROL,
                HeaderValue::from_static("no-cache, no-transform"),
            );
            rparts
                .headers
                .insert(X_ACCEL_BUFFERING, HeaderValue::from_static("no"));
            // Injected events change the length; chunked framing is the norm for SSE anyway.
            rparts.headers.remove(CONTENT_LENGTH);
        }
        let (header_trace, header_rejected) = if ai_sdk {
            (None, false)
        } else {
            if let Ok(v) = HeaderValue::from_str(&message_id) {
                rparts.headers.insert(X_MESSAGE_ID, v);
            }
            match trace::from_headers(&rparts.headers, &self.config.trace_id_headers) {
                HeaderId::Found(f) => (Some(f), false),
                HeaderId::Rejected => (None, true),
                HeaderId::Absent => (None, false),
            }
        };
        let max = self.config.max_inspect_bytes;
        let (inspector, links) = match (ai_sdk, exchange, &header_trace, sse) {
            (true, true, _, true) => (Some(Inspector::ui_messages(max)), LinkMode::FromStream),
            // An answer that is not a UI message stream (an error) names no message.
            (true, _, _, _) => (None, LinkMode::Off),
            (false, _, Some(_), _) => (None, LinkMode::Record),
            (false, _, None, true) => (Some(Inspector::sse(max)), LinkMode::Record),
            (false, _, None, false) if json_response => {
                (Some(Inspector::json(max)), LinkMode::Record)
            }
            (false, _, None, false) => (None, LinkMode::Record),
        };
        let end = StreamEnd {
            link: LinkRecord {
                message_id,
                chat_id,
                user_id: fwd.user,
                trace_id: header_trace.as_ref().map(|f| f.id.clone()),
                client_request_id,
                open: true,
                route: Some(route_name),
            },
            links,
            header_trace,
            header_rejected,
            claimed,
            recorder: self.links.clone(),
            metrics: self.metrics.clone(),
            request_id: fwd.request_id.to_str().unwrap_or("").to_owned(),
            span: tracing::Span::current(),
            method: parts.method,
            uri: parts.uri,
            status: rparts.status.as_u16(),
            start: fwd.start,
            upstream: self.origin.clone(),
            permit,
        };
        let body = ResponseBody::new(
            rbody,
            BodyOptions {
                inspector,
                sse,
                events: route.events,
                idle_timeout: self.config.idle_timeout,
                streams: self.streams.clone(),
            },
            end,
        );
        Ok(Response::from_parts(rparts, Body::Proxied(Box::pin(body))))
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

fn body_len(body: &Body) -> Option<u64> {
    match body {
        Body::Full(Some(b)) => Some(b.len() as u64),
        Body::Empty => None,
        _ => None,
    }
}
