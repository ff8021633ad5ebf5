//! The innermost service of the stack: classifies a request once ([`route::classify`]), sends it
//! to its handler, and is the one way out for errors ([`respond`]): handlers return
//! `Result<Response, Error>`, and every `Err` becomes its JSON response here, logged once in the
//! request's span. It also records the request metric and, for answers the proxy makes itself,
//! the access line (a streamed agent answer writes its own when it ends: it knows its bytes and
//! its duration only then).
//!
//! The feedback API is a service of its own ([`FeedbackEndpoint`]) so that tower-http's CORS
//! layer can wrap it alone, around its errors as much as its answers.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use http::header::{ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue};
use http::{Request, Response, StatusCode};
use serde_json::json;
use tower::limit::ConcurrencyLimit;
use tower::load_shed::LoadShed;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_http::cors::Cors;

use super::state::{self as ops, AppState};
use crate::body::{Body, ReqBody, json_response};
use crate::error::Error;
use crate::identity;
use crate::proxy::{Forward, X_REQUEST_ID};
use crate::review::Page;
use crate::route::{self, Route};

/// A boxed response future: the forwarding future is large, and hyper sizes every
/// connection's task for the largest future its service can return; boxing keeps an idle
/// stream's connection small (the box is freed once the response head is out).
pub type BoxFuture =
    Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send + 'static>>;

/// Classifies and dispatches; see the module documentation. Cloned per request (as tower
/// services are), so everything is behind one `Arc`: the CORS service is cloned only for a
/// feedback request.
#[derive(Clone)]
pub struct Router {
    inner: Arc<Inner>,
}

struct Inner {
    state: Arc<AppState>,
    feedback: Cors<FeedbackEndpoint>,
}

impl Router {
    pub fn new(state: Arc<AppState>, feedback: Cors<FeedbackEndpoint>) -> Self {
        Self {
            inner: Arc::new(Inner { state, feedback }),
        }
    }
}

impl Service<Request<ReqBody>> for Router {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<ReqBody>) -> BoxFuture {
        Box::pin(serve(self.inner.clone(), req))
    }
}

async fn serve(inner: Arc<Inner>, req: Request<ReqBody>) -> Result<Response<Body>, Infallible> {
    let state = &inner.state;
    let start = Instant::now();
    let request_id = request_id(&req);
    let method = req.method().clone();
    // A clone of the URI shares its bytes: no copy of the path per request.
    let uri = req.uri().clone();
    let path = uri.path();
    let route = route::classify(&method, path, &state.config);
    let label = route.label();
    let route_index = route.index();
    tracing::Span::current().record("route", tracing::field::display(label));

    let res = match route {
        Route::FeedbackPreflight => preflight(inner.feedback.clone(), req, &request_id).await,
        Route::FeedbackSubmit
        | Route::FeedbackList { .. }
        | Route::FeedbackRetract { .. }
        | Route::FeedbackSchema
        | Route::FeedbackBatch
        | Route::FeedbackRetractChat { .. } => inner.feedback.clone().oneshot(req).await?,
        route => respond(
            dispatch(state, route, req, &request_id, start).await,
            &request_id,
            label,
        ),
    };

    let status = res.status().as_u16();
    state
        .metrics
        .record_request(route_index, status, start.elapsed().as_secs_f64());
    if !matches!(res.body(), Body::Proxied(_)) {
        let bytes = http_body::Body::size_hint(res.body()).exact().unwrap_or(0);
        tracing::info!(
            target: "feedback_proxy::access",
            request_id = request_id.to_str().unwrap_or(""),
            method = %method,
            path = %path,
            route = label,
            status,
            duration_ms = start.elapsed().as_secs_f64() * 1e3,
            bytes,
            "request"
        );
    }
    Ok(res)
}

/// The one way out for errors: the response for `result`, an error logged once (at error level
/// when it is ours or a dependency's, at debug when it is the client's; in the request's span).
pub fn respond(
    result: Result<Response<Body>, Error>,
    request_id: &HeaderValue,
    label: &'static str,
) -> Response<Body> {
    result.unwrap_or_else(|e| e.respond(request_id, label))
}

/// The request id the stack set (tower-http's `SetRequestId`); a fresh one if this router is
/// called without the stack.
fn request_id<B>(req: &Request<B>) -> HeaderValue {
    req.headers()
        .get(X_REQUEST_ID)
        .cloned()
        .unwrap_or_else(new_request_id)
}

async fn dispatch(
    state: &Arc<AppState>,
    route: Route<'_>,
    req: Request<ReqBody>,
    request_id: &HeaderValue,
    start: Instant,
) -> Result<Response<Body>, Error> {
    match route {
        Route::Agent {
            route: agent_route,
            path,
        } => {
            // Cross-site and non-JSON requests are refused before anything else (issue 12);
            // a page or asset of the chat app template may be loaded from anywhere (a link
            // from the workspace is a cross-site navigation), as a browser reading it
            // cross-site still gets nothing without CORS.
            let app_read = agent_route.kind == crate::config::RouteKind::AiSdkApp
                && matches!(*req.method(), http::Method::GET | http::Method::HEAD);
            if !app_read {
                crate::proxy::guard::check(
                    crate::proxy::guard::Stance {
                        cors_origins: &state.config.feedback.cors_origins,
                        trust_forwarded_host: state.config.identity.trust_forwarded_headers,
                    },
                    req.method(),
                    req.uri(),
                    req.headers(),
                )?;
            }
            let user = identity::user(req.headers(), &state.config.identity)?;
            state
                .proxy
                .forward(
                    req,
                    Forward {
                        route: agent_route,
                        path: &path,
                        user,
                        request_id: request_id.clone(),
                        start,
                    },
                )
                .await
        }
        Route::Health => Ok(json_response(StatusCode::OK, &json!({"status": "ok"}))),
        Route::Ready => Ok(ops::ready(state).await),
        Route::Metrics => Ok(ops::scrape(state).await),
        Route::FeedbackMethodNotAllowed { allowed } => Err(Error::MethodNotAllowed {
            method: req.method().clone(),
            allowed,
        }),
        Route::AgentBadPath { reason } => Err(Error::bad_request(
            "INVALID_PATH",
            format!("{}: {reason}", req.uri().path()),
        )),
        Route::AgentMethodNotAllowed { route } => Err(Error::RouteMethodNotAllowed {
            method: req.method().clone(),
            route: route.path.clone(),
            allowed: route
                .methods
                .iter()
                .map(http::Method::as_str)
                .collect::<Vec<_>>()
                .join(", "),
        }),
        Route::ReviewSummary | Route::ReviewFeedback | Route::ReviewPage => {
            let page = match route {
                Route::ReviewSummary => Page::Summary,
                Route::ReviewFeedback => Page::Feedback,
                _ => Page::Html,
            };
            state
                .review
                .handle(page, req.method(), req.headers(), req.uri().query())
                .await
        }
        Route::Ui => state.ui.serve(req).await,
        // Routed to the feedback endpoint before this.
        Route::FeedbackSubmit
        | Route::FeedbackList { .. }
        | Route::FeedbackRetract { .. }
        | Route::FeedbackSchema
        | Route::FeedbackBatch
        | Route::FeedbackRetractChat { .. }
        | Route::FeedbackPreflight => Err(Error::Internal("feedback route not dispatched".into())),
        Route::NotFound => Err(Error::NotFound(format!(
            "no route for {} {}",
            crate::text::echo(req.method().as_str()),
            crate::text::echo(req.uri().path())
        ))),
    }
}

/// A CORS preflight to the feedback API. tower-http's layer answers it (origin, methods,
/// headers, max age); the contract's statuses are kept: 204 for an allowed origin, 403
/// `FORBIDDEN` for any other (a preflight the layer answers without an allowed origin).
async fn preflight(
    feedback: Cors<FeedbackEndpoint>,
    req: Request<ReqBody>,
    request_id: &HeaderValue,
) -> Response<Body> {
    let Ok(mut res) = feedback.oneshot(req).await;
    let result = if res.headers().contains_key(ACCESS_CONTROL_ALLOW_ORIGIN) {
        *res.status_mut() = StatusCode::NO_CONTENT;
        Ok(res)
    } else {
        Err(Error::Forbidden(
            "cross-origin requests to the feedback API are not allowed (see feedback.cors_origins)"
                .into(),
        ))
    };
    respond(result, request_id, route::LABELS[7])
}

/// `/api/feedback*` as a service, so that the CORS layer can wrap it alone. Inside it, tower's
/// load shedding over a concurrency limit (`feedback.max_in_flight`): past the limit a vote is
/// refused at once (503 `OVERLOADED`, `Retry-After: 1`) rather than queued on the store's pool
/// until its connect timeout.
#[derive(Clone)]
pub struct FeedbackEndpoint {
    inner: LoadShed<ConcurrencyLimit<FeedbackHandler>>,
}

impl FeedbackEndpoint {
    pub fn new(state: Arc<AppState>) -> Self {
        let limit = state.config.feedback.max_in_flight;
        let inner = ServiceBuilder::new()
            .load_shed()
            .concurrency_limit(limit)
            .service(FeedbackHandler { state });
        Self { inner }
    }
}

impl Service<Request<ReqBody>> for FeedbackEndpoint {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<ReqBody>) -> BoxFuture {
        let request_id = request_id(&req);
        let shed = self.inner.clone().oneshot(req);
        Box::pin(async move {
            Ok(match shed.await {
                Ok(res) => res,
                // The handler never fails (its errors are responses): this is the shedding.
                Err(_) => respond(Err(Error::Overloaded), &request_id, route::LABELS[4]),
            })
        })
    }
}

/// The feedback handlers, errors turned into responses.
#[derive(Clone)]
pub struct FeedbackHandler {
    state: Arc<AppState>,
}

impl Service<Request<ReqBody>> for FeedbackHandler {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<ReqBody>) -> BoxFuture {
        let state = self.state.clone();
        Box::pin(async move {
            let request_id = request_id(&req);
            let path = req.uri().path().to_owned();
            let route = route::classify(req.method(), &path, &state.config);
            let label = route.label();
            Ok(respond(
                state.feedback.handle(route, req).await,
                &request_id,
                label,
            ))
        })
    }
}

/// A fresh request id (a UUID), for a router called without the stack.
pub fn new_request_id() -> HeaderValue {
    HeaderValue::from_str(&uuid::Uuid::new_v4().to_string())
        .unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}
