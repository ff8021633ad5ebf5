//! The one body type used for every request and response the proxy handles.
//!
//! An enum rather than one boxed trait object: the streaming variants are polled on the hot path,
//! and a `match` costs less than a virtual call and needs no allocation per request. The one
//! exception is the agent's response stream ([`Body::Proxied`]), boxed already: it is a
//! [`ProxiedBody`] trait object so that this leaf module names nothing from `proxy` (one
//! virtual call per frame).
//! Helpers here build the small JSON answers the proxy produces itself; proxied bodies are never
//! collected (see `proxy::ResponseBody`), and bodies the proxy must read are collected only under
//! a cap ([`collect_limited`]).

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Response, StatusCode};
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

/// Errors carried by a body.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A streamed response body behind [`Body::Proxied`] (in practice `proxy::ResponseBody`).
pub trait ProxiedBody:
    http_body::Body<Data = Bytes, Error = BoxError> + Send + std::fmt::Debug
{
}

impl<B> ProxiedBody for B where
    B: http_body::Body<Data = Bytes, Error = BoxError> + Send + std::fmt::Debug
{
}

/// A request or response body.
#[derive(Debug, Default)]
pub enum Body {
    /// No bytes.
    #[default]
    Empty,
    /// Bytes already in memory (our own JSON answers, rewritten request bodies).
    Full(Option<Bytes>),
    /// A client's request body streamed through to the agent untouched (under the request-body
    /// progress timeout).
    Incoming(RequestBody),
    /// An agent's response streamed back through the inspector.
    Proxied(Pin<Box<dyn ProxiedBody>>),
    /// Any other streamed body of ours (a static file).
    Boxed(UnsyncBoxBody<Bytes, BoxError>),
}

impl Body {
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        let bytes = bytes.into();
        if bytes.is_empty() {
            Self::Empty
        } else {
            Self::Full(Some(bytes))
        }
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Self::Empty => Poll::Ready(None),
            Self::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            // Tagged, so that a request the agent client gives up on because of this body is
            // blamed on the client, not the agent (the box is the one `Into<BoxError>` made).
            Self::Incoming(inner) => Pin::new(inner)
                .poll_frame(cx)
                .map_err(|e| Box::new(ClientBodyError(e)) as BoxError),
            Self::Proxied(inner) => inner.as_mut().poll_frame(cx),
            Self::Boxed(inner) => Pin::new(inner).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Empty => true,
            Self::Full(data) => data.is_none(),
            Self::Incoming(inner) => inner.is_end_stream(),
            Self::Proxied(inner) => inner.is_end_stream(),
            Self::Boxed(inner) => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Empty => SizeHint::with_exact(0),
            Self::Full(data) => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
            Self::Incoming(inner) => inner.size_hint(),
            Self::Proxied(inner) => inner.size_hint(),
            Self::Boxed(inner) => inner.size_hint(),
        }
    }
}

/// A client's request body failed while it was streamed on (malformed chunked framing, a body
/// shorter than its length, a client that went away mid-body): the client's fault.
#[derive(Debug, thiserror::Error)]
#[error("the client's request body failed: {0}")]
pub struct ClientBodyError(#[source] pub BoxError);

impl ClientBodyError {
    /// The `ClientBodyError` in `err`'s source chain, if there is one (an outbound client
    /// wraps the body's error in its own).
    pub fn find<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a ClientBodyError> {
        let mut cur = Some(err);
        while let Some(e) = cur {
            if let Some(found) = e.downcast_ref::<ClientBodyError>() {
                return Some(found);
            }
            cur = e.source();
        }
        None
    }
}

/// Why collecting a body failed.
#[derive(Debug, thiserror::Error)]
pub enum CollectError {
    #[error("body is larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("reading the body failed: {0}")]
    Read(BoxError),
}

/// Reads a whole body into memory, failing as soon as it exceeds `limit` bytes.
pub async fn collect_limited<B>(body: B, limit: usize) -> Result<Bytes, CollectError>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    if body.size_hint().lower() > limit as u64 {
        return Err(CollectError::TooLarge { limit });
    }
    match http_body_util::Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) => {
            if e.is::<http_body_util::LengthLimitError>() {
                Err(CollectError::TooLarge { limit })
            } else {
                Err(CollectError::Read(e))
            }
        }
    }
}

/// How much of a refused body is read and dropped before the refusal is sent.
pub const DRAIN_MAX: u64 = 8 << 20;

/// Reads and drops the rest of a body that was refused for its size, when it is small enough
/// (at most [`DRAIN_MAX`] bytes, as far as its declared size or what arrives tells): the client
/// then reads our 413 instead of a broken pipe on its unfinished upload (nginx's lingering
/// close does the same after the answer; hyper has none). Stops at the first error (the
/// body's own progress timeout included) or past the bound.
pub async fn drain<B>(body: &mut B)
where
    B: http_body::Body<Data = Bytes> + Unpin,
{
    if body.size_hint().lower() > DRAIN_MAX {
        return;
    }
    let mut seen: u64 = 0;
    while let Some(Ok(frame)) = body.frame().await {
        if let Some(data) = frame.data_ref() {
            seen += data.len() as u64;
            if seen > DRAIN_MAX {
                return;
            }
        }
    }
}

pub const APPLICATION_JSON: HeaderValue = HeaderValue::from_static("application/json");

/// A JSON response with the given status.
pub fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    // Serializing a `Value` cannot fail; fall back to an empty object rather than panic.
    let bytes = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    let mut res = Response::new(Body::full(bytes));
    *res.status_mut() = status;
    res.headers_mut().insert(CONTENT_TYPE, APPLICATION_JSON);
    res
}

/// A request body as the service receives it: hyper's own (what a socket delivers, no
/// allocation), or any other body boxed (what a test or an embedding caller hands
/// [`crate::app::service`]). An enum so that the socket path pays nothing for the generality.
#[derive(Debug)]
pub enum ReqBody {
    Hyper(Incoming),
    Boxed(UnsyncBoxBody<Bytes, BoxError>),
}

impl ReqBody {
    /// Any body, boxed.
    pub fn boxed<B>(body: B) -> Self
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        Self::Boxed(body.map_err(Into::into).boxed_unsync())
    }
}

impl From<Incoming> for ReqBody {
    fn from(b: Incoming) -> Self {
        Self::Hyper(b)
    }
}

impl From<Body> for ReqBody {
    fn from(b: Body) -> Self {
        Self::boxed(b)
    }
}

impl From<http_body_util::Full<Bytes>> for ReqBody {
    fn from(b: http_body_util::Full<Bytes>) -> Self {
        Self::boxed(b)
    }
}

impl From<http_body_util::Empty<Bytes>> for ReqBody {
    fn from(b: http_body_util::Empty<Bytes>) -> Self {
        Self::boxed(b)
    }
}

impl From<UnsyncBoxBody<Bytes, BoxError>> for ReqBody {
    fn from(b: UnsyncBoxBody<Bytes, BoxError>) -> Self {
        Self::Boxed(b)
    }
}

impl http_body::Body for ReqBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Self::Hyper(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            Self::Boxed(b) => Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Hyper(b) => b.is_end_stream(),
            Self::Boxed(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Hyper(b) => b.size_hint(),
            Self::Boxed(b) => b.size_hint(),
        }
    }
}

/// A request body as read by the handlers: the client's body under the progress timeout.
pub type RequestBody = TimedBody<ReqBody>;

/// `body` under the progress timeout `after` (`server.request_body_timeout`; `None`: none).
/// Whoever reads a request body wraps it with this. (Handed to the handlers by their
/// constructors rather than in each request's extensions: a first extension allocates a map
/// per request.)
pub fn timed(body: ReqBody, after: Option<Duration>) -> RequestBody {
    TimedBody::new(body, after)
}

/// The error a [`TimedBody`] fails with when the client stops sending.
#[derive(Debug, thiserror::Error)]
#[error("the client sent no request body data for {}", humantime::format_duration(*after))]
pub struct BodyTimedOut {
    pub after: Duration,
}

/// The progress timeout of `err` or of one of its sources, if that is what it is.
pub fn body_timeout_in(err: &(dyn std::error::Error + 'static)) -> Option<Duration> {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(t) = e.downcast_ref::<BodyTimedOut>() {
            return Some(t.after);
        }
        cur = e.source();
    }
    None
}

/// A body that fails with [`BodyTimedOut`] when, while it is being read, the next frame does
/// not arrive within the timeout. Hand-written: neither hyper nor http-body-util has a body
/// progress timeout. Only time spent waiting for the client counts (a reader that is slow to
/// poll, e.g. a busy agent, never trips it), and the timer is re-armed lazily, not per frame.
pub struct TimedBody<B> {
    inner: B,
    timeout: Option<Duration>,
    timer: Option<Pin<Box<Sleep>>>,
    /// When the current wait for the client began (`None` while not waiting).
    waiting_since: Option<Instant>,
}

impl<B> TimedBody<B> {
    pub fn new(inner: B, timeout: Option<Duration>) -> Self {
        Self {
            inner,
            timeout,
            timer: None,
            waiting_since: None,
        }
    }
}

impl<B: std::fmt::Debug> std::fmt::Debug for TimedBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TimedBody")
            .field("inner", &self.inner)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl<B> http_body::Body for TimedBody<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(r) => {
                this.waiting_since = None;
                return Poll::Ready(r.map(|f| f.map_err(Into::into)));
            }
            Poll::Pending => {}
        }
        let Some(timeout) = this.timeout else {
            return Poll::Pending;
        };
        let since = *this.waiting_since.get_or_insert_with(Instant::now);
        let deadline = since + timeout;
        loop {
            let timer = this
                .timer
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
            match timer.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(()) if Instant::now() >= deadline => {
                    this.timeout = None;
                    return Poll::Ready(Some(Err(Box::new(BodyTimedOut { after: timeout }))));
                }
                // Armed for an earlier wait: re-arm for this one.
                Poll::Ready(()) => timer.as_mut().reset(deadline),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tokio::sync::mpsc;

    /// A body fed from a channel.
    struct Chan(mpsc::Receiver<Result<Frame<Bytes>, BoxError>>);

    impl http_body::Body for Chan {
        type Data = Bytes;
        type Error = BoxError;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            self.0.poll_recv(cx)
        }
    }

    fn channel() -> (mpsc::Sender<Result<Frame<Bytes>, BoxError>>, Chan) {
        let (tx, rx) = mpsc::channel(4);
        (tx, Chan(rx))
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_body_fails_after_the_timeout_and_progress_resets_it() {
        let (tx, inner) = channel();
        let mut body = TimedBody::new(inner, Some(Duration::from_secs(30)));
        let start = tokio::time::Instant::now();
        tx.send(Ok(Frame::data(Bytes::from_static(b"a"))))
            .await
            .unwrap();
        assert!(body.frame().await.unwrap().is_ok());
        // Progress every 20 s: never times out.
        for _ in 0..3 {
            let tx = tx.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(20)).await;
                let _ = tx.send(Ok(Frame::data(Bytes::from_static(b"b")))).await;
            });
            assert!(body.frame().await.unwrap().is_ok());
        }
        assert_eq!(start.elapsed(), Duration::from_secs(60));
        // Then silence: fails 30 s later.
        let err = body.frame().await.unwrap().unwrap_err();
        assert_eq!(start.elapsed(), Duration::from_secs(90));
        assert_eq!(body_timeout_in(err.as_ref()), Some(Duration::from_secs(30)));
        drop(tx);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_reader_does_not_count_against_the_client() {
        let (tx, inner) = channel();
        let mut body = TimedBody::new(inner, Some(Duration::from_secs(30)));
        tx.send(Ok(Frame::data(Bytes::from_static(b"a"))))
            .await
            .unwrap();
        // Nobody polls for a minute while data is already buffered.
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(body.frame().await.unwrap().is_ok());
        drop(tx);
        assert!(body.frame().await.is_none());
    }
}
