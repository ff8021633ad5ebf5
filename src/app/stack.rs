//! The service stack, built once: tower and tower-http layers around our [`Router`].
//!
//! Outermost first, each with why it is there and why in this place:
//!
//! 0. `MapRequest(into ReqBody)` (tower): the stack is generic over the request body; a
//!    socket's `Incoming` passes unboxed, anything else (a test's `Full`) is boxed once.
//! 1. `SetSensitiveRequestHeaders` (tower-http): marks the credentials a request brings
//!    (`authorization`, `cookie`, the platform's user token) sensitive before anything below
//!    could print a header map, so no log line or `Debug` shows them.
//! 2. `MapRequest(sanitize_request_id)` (tower): drops a client's `x-request-id` that we would
//!    not echo into logs and answers (empty, over 128 bytes, not visible ASCII), so the next
//!    layer mints one instead.
//! 3. `SetRequestId` (tower-http): every request has an id (the client's or the platform's if it
//!    is sane, else a UUID). Before the span, so the span carries it.
//! 4. `PropagateRequestId` (tower-http): the id is on every response, errors and successes alike.
//! 5. `Trace` (tower-http): one `request` span per request (request id; the router
//!    records the route and the proxy the message id), entered while the handler runs and while
//!    the response body is polled, so every line a request logs, the streamed answer's final
//!    access line included, carries its request id. Its own event hooks are off: the access
//!    line is ours (it knows the route, and for a stream, the bytes).
//! 6. [`Router`] (ours): classifies, dispatches, turns errors into responses (the one way out),
//!    records metrics and the access line. Inside it, the feedback API alone is wrapped in
//!    tower-http's `Cors` (the origins of `feedback.cors_origins`).
//!
//! Kept by hand, because no library does it (one line each): the per-frame idle timer that
//! ends a silent SSE stream with an error event (`proxy::body`), the allocation-free SSE framer
//! (`proxy::sse::frame`), the store-driven delivery backoff (`feedback::delivery::policy`), the
//! connection lifetimes and abandoned-request limit (`server`: hyper's timers cover only the
//! header read).

use std::sync::Arc;

use http::header::{AUTHORIZATION, CONTENT_TYPE, COOKIE, HeaderName, HeaderValue};
use http::{Method, Request};
use tower::{Layer, ServiceBuilder};
use tower_http::cors::{AllowCredentials, AllowOrigin, CorsLayer};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;
use tower_http::trace::{MakeSpan, TraceLayer};

use super::router::{FeedbackEndpoint, Router};
use super::state::AppState;
use crate::body::ReqBody;
use crate::config::FeedbackConfig;
use crate::proxy::X_REQUEST_ID;

/// The platform's token for the signed-in user (on-behalf-of-user calls).
const X_FORWARDED_ACCESS_TOKEN: HeaderName = HeaderName::from_static("x-forwarded-access-token");

/// The response body the stack hands the server: ours, inside tower-http's trace wrapper
/// (which enters the request's span while the body is polled).
pub type ResponseBody = tower_http::trace::ResponseBody<
    crate::body::Body,
    tower_http::classify::NeverClassifyEos<tower_http::classify::ServerErrorsFailureClass>,
    (),
    (),
    (),
>;

/// The whole service: what the server runs for every request, and what a test can call
/// without a socket (any request body that converts into [`ReqBody`]).
pub fn service<B>(
    state: Arc<AppState>,
) -> impl tower::Service<
    Request<B>,
    Response = http::Response<ResponseBody>,
    Error = std::convert::Infallible,
    Future: Send + 'static,
> + Clone
+ Send
+ Sync
+ 'static
where
    B: Into<ReqBody> + Send + 'static,
{
    let feedback = cors(&state.config.feedback).layer(FeedbackEndpoint::new(state.clone()));
    ServiceBuilder::new()
        .map_request(|req: Request<B>| req.map(Into::<ReqBody>::into))
        .layer(SetSensitiveRequestHeadersLayer::new([
            AUTHORIZATION,
            COOKIE,
            X_FORWARDED_ACCESS_TOKEN,
        ]))
        .map_request(sanitize_request_id::<ReqBody>)
        .layer(SetRequestIdLayer::new(X_REQUEST_ID, MakeRequestUuid))
        .layer(PropagateRequestIdLayer::new(X_REQUEST_ID))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(RequestSpan)
                .on_request(())
                .on_response(())
                .on_body_chunk(())
                .on_eos(())
                .on_failure(()),
        )
        .service(Router::new(state, feedback))
}

/// CORS for the feedback API: only the listed origins (compared as the contract always did,
/// case-insensitively), with credentials; methods and headers the API takes; preflights cached
/// for ten minutes. A predicate rather than a list, because a list panics on `*` and compares
/// exactly.
fn cors(config: &FeedbackConfig) -> CorsLayer {
    let origins: Arc<[HeaderValue]> = config.cors_origins.clone().into();
    let allowed = move |origin: &HeaderValue| {
        origins
            .iter()
            .any(|o| o.as_bytes().eq_ignore_ascii_case(origin.as_bytes()))
    };
    let for_credentials = allowed.clone();
    CorsLayer::new()
        .allow_origin(AllowOrigin::predicate(move |origin, _| allowed(origin)))
        .allow_credentials(AllowCredentials::predicate(move |origin, _| {
            for_credentials(origin)
        }))
        .allow_methods([Method::GET, Method::POST, Method::DELETE])
        .allow_headers([CONTENT_TYPE])
        .max_age(std::time::Duration::from_secs(600))
}

/// Drops an `x-request-id` we would not echo (see the module documentation).
fn sanitize_request_id<B>(mut req: Request<B>) -> Request<B> {
    let sane = req.headers().get(X_REQUEST_ID).is_none_or(|v| {
        let b = v.as_bytes();
        !b.is_empty() && b.len() <= 128 && b.iter().all(u8::is_ascii_graphic)
    });
    if !sane {
        req.headers_mut().remove(X_REQUEST_ID);
    }
    req
}

/// The `request` span: its request id now (method and path are on the access line); `route` (the router) and `message_id`
/// (the proxy) are recorded once known.
#[derive(Clone, Copy)]
struct RequestSpan;

impl<B> MakeSpan<B> for RequestSpan {
    fn make_span(&mut self, req: &Request<B>) -> tracing::Span {
        // The id is read inside the macro: a field's value is only evaluated when the span is
        // enabled (not at the benchmark's `warn`).
        tracing::info_span!(
            "request",
            request_id = %req
                .headers()
                .get(X_REQUEST_ID)
                .and_then(|v| v.to_str().ok())
                .unwrap_or(""),
            route = tracing::field::Empty,
            message_id = tracing::field::Empty,
        )
    }
}
