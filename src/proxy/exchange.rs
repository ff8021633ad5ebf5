//! One exchange with the agent, in three phases: [`Proxy::forward`] runs the request phase
//! (ids, body, hop headers: what the agent receives), the send phase (the response head under
//! `agent.response_header_timeout`, failures mapped to errors) and the response phase (header
//! rules, the inspector chosen, the body wrapped for passthrough and the stream's end). The
//! header rules themselves are in `headers.rs`.

use std::sync::Arc;
use std::time::Instant;

use http::header::{
    ACCEPT_ENCODING, AUTHORIZATION, CACHE_CONTROL, CONTENT_LENGTH, HeaderMap, HeaderValue,
};
use http::{Request, Response};
use hyper::body::Incoming;

use super::body::{BodyOptions, LinkMode, ResponseBody, StreamEnd};
use super::headers::*;
use super::limit::UserPermit;
use super::request::{self, ClientIds, Rewrite};
use super::sse::Inspector;
use super::trace::{self, HeaderId};
use super::{Forward, Proxy};
use crate::body::{Body, ClientBodyError, CollectError, ReqBody, body_timeout_in, collect_limited};
use crate::config::{AgentRoute, AuthSpec, RouteKind};
use crate::error::{Error, UpstreamError};
use crate::identity::{APP_USER_EMAIL, FORWARDED_ACCESS_TOKEN};
use crate::store::LinkRecord;
use crate::text::chain;

/// What the request phase settled, for the response phase.
struct Exchange<'a> {
    route: &'a AgentRoute,
    ai_sdk: bool,
    /// Whether this is an exchange with an answer to link (every request on an agent route;
    /// on an `ai-sdk-app` route only the template's chat endpoint).
    exchange: bool,
    permit: Option<UserPermit>,
    message_id: String,
    chat_id: Option<String>,
    user: String,
    client_request_id: Option<String>,
    claimed: bool,
    route_name: Arc<str>,
    request_id: HeaderValue,
    method: http::Method,
    uri: http::Uri,
    start: Instant,
}

impl Proxy {
    /// Forwards one request to the agent and returns the (streaming) response.
    pub async fn forward(
        &self,
        req: Request<ReqBody>,
        fwd: Forward<'_>,
    ) -> Result<Response<Body>, Error> {
        let (up, ex) = self.request(req, fwd).await?;
        let res = self.send(up).await?;
        Ok(self.respond(res, ex))
    }

    /// The request phase: what the agent receives, and what the response phase needs.
    async fn request<'a>(
        &self,
        req: Request<ReqBody>,
        fwd: Forward<'a>,
    ) -> Result<(Request<Body>, Exchange<'a>), Error> {
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

        let ex = Exchange {
            route,
            ai_sdk,
            exchange,
            permit,
            message_id,
            chat_id,
            user: fwd.user,
            client_request_id,
            claimed,
            route_name,
            request_id: fwd.request_id,
            method: parts.method,
            uri: parts.uri,
            start: fwd.start,
        };
        Ok((up, ex))
    }

    /// The send phase: the agent's response head, or the error that stands for its failure.
    async fn send(&self, up: Request<Body>) -> Result<Response<Incoming>, Error> {
        let sent =
            tokio::time::timeout(self.config.response_header_timeout, self.client.request(up))
                .await;
        match sent {
            Err(_) => {
                self.count_error("header_timeout");
                Err(UpstreamError::HeaderTimeout {
                    upstream: self.origin.clone(),
                    after: self.config.response_header_timeout,
                }
                .into())
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
                Err(if e.is_connect() {
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
                .into())
            }
            Ok(Ok(res)) => Ok(res),
        }
    }

    /// The response phase: header rules, the inspector, the body wrapped for the stream's end.
    fn respond(&self, res: Response<Incoming>, ex: Exchange<'_>) -> Response<Body> {
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
        let (header_trace, header_rejected) = if ex.ai_sdk {
            (None, false)
        } else {
            if let Ok(v) = HeaderValue::from_str(&ex.message_id) {
                rparts.headers.insert(X_MESSAGE_ID, v);
            }
            match trace::from_headers(&rparts.headers, &self.config.trace_id_headers) {
                HeaderId::Found(f) => (Some(f), false),
                HeaderId::Rejected => (None, true),
                HeaderId::Absent => (None, false),
            }
        };
        let max = self.config.max_inspect_bytes;
        let (inspector, links) = match (ex.ai_sdk, ex.exchange, &header_trace, sse) {
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
                message_id: ex.message_id,
                chat_id: ex.chat_id,
                user_id: ex.user,
                trace_id: header_trace.as_ref().map(|f| f.id.clone()),
                client_request_id: ex.client_request_id,
                open: true,
                route: Some(ex.route_name),
            },
            links,
            header_trace,
            header_rejected,
            claimed: ex.claimed,
            recorder: self.links.clone(),
            metrics: self.metrics.clone(),
            request_id: ex.request_id.to_str().unwrap_or("").to_owned(),
            span: tracing::Span::current(),
            method: ex.method,
            uri: ex.uri,
            status: rparts.status.as_u16(),
            start: ex.start,
            upstream: self.origin.clone(),
            permit: ex.permit,
        };
        let body = ResponseBody::new(
            rbody,
            BodyOptions {
                inspector,
                sse,
                events: ex.route.events,
                idle_timeout: self.config.idle_timeout,
                streams: self.streams.clone(),
            },
            end,
        );
        Response::from_parts(rparts, Body::Proxied(Box::pin(body)))
    }
}

fn body_len(body: &Body) -> Option<u64> {
    match body {
        Body::Full(Some(b)) => Some(b.len() as u64),
        Body::Empty => None,
        _ => None,
    }
}
