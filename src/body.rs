//! The one body type used for every request and response the proxy handles.
//!
//! An enum rather than a boxed trait object: the streaming variants are polled on the hot path,
//! and a `match` costs less than a virtual call and needs no allocation per request.
//! Helpers here build the small JSON answers the proxy produces itself; proxied bodies are never
//! collected (see `proxy::ResponseBody`), and bodies the proxy must read are collected only under
//! a cap ([`collect_limited`]).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Response, StatusCode};
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::proxy::ResponseBody;

/// Errors carried by a body.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A request or response body.
#[derive(Debug, Default)]
pub enum Body {
    /// No bytes.
    #[default]
    Empty,
    /// Bytes already in memory (our own JSON answers, rewritten request bodies).
    Full(Option<Bytes>),
    /// A client's request body streamed through to the agent untouched.
    Incoming(Incoming),
    /// An agent's response streamed back through the inspector.
    Proxied(Box<ResponseBody>),
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
            Self::Proxied(inner) => Pin::new(inner.as_mut()).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Empty => true,
            Self::Full(data) => data.is_none(),
            Self::Incoming(inner) => inner.is_end_stream(),
            Self::Proxied(inner) => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Empty => SizeHint::with_exact(0),
            Self::Full(data) => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
            Self::Incoming(inner) => inner.size_hint(),
            Self::Proxied(inner) => inner.size_hint(),
        }
    }
}

/// A client's request body failed while it was streamed on (malformed chunked framing, a body
/// shorter than its length, a client that went away mid-body): the client's fault.
#[derive(Debug, thiserror::Error)]
#[error("the client's request body failed: {0}")]
pub struct ClientBodyError(#[source] pub hyper::Error);

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
