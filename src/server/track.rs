//! What a connection's watchdog knows about it: requests in flight, when it became idle,
//! whether the protocol is known, and clients that abandon requests too fast. Updated by the
//! connection's socket ([`Watched`]), its service and its response bodies ([`Tracked`]) with
//! atomics only: for HTTP/2 they run on other tasks than the watchdog.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use http_body::{Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::body::BoxError;

/// The HTTP/2 connection preface; a connection has identified itself once this many bytes came.
const PREFACE_LEN: usize = 24;

/// What a connection's watchdog knows about it, updated by its IO, its service and its
/// response bodies (atomics: they run on other tasks for HTTP/2).
pub(super) struct Tracker {
    pub(super) start: Instant,
    /// The protocol is known: the HTTP/2 preface (or as many bytes) arrived, or a request
    /// started.
    pub(super) identified: AtomicBool,
    pub(super) in_flight: AtomicUsize,
    /// When the last request ended, in milliseconds since `start`.
    idle_since_ms: AtomicU64,
    /// Abandoned requests, as a token bucket (`server.reset_rate`).
    resets: Option<DefaultDirectRateLimiter>,
    /// Notified once when the client abandons requests too fast.
    pub(super) abusive: Notify,
    flagged: AtomicBool,
}

impl Tracker {
    pub(super) fn new(reset_quota: Option<Quota>) -> Self {
        Self {
            start: Instant::now(),
            identified: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
            resets: reset_quota.map(RateLimiter::direct),
            abusive: Notify::new(),
            flagged: AtomicBool::new(false),
        }
    }

    pub(super) fn begin(self: &Arc<Self>) -> RequestGuard {
        self.identified.store(true, Ordering::SeqCst);
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        RequestGuard {
            track: self.clone(),
            completed: false,
        }
    }

    pub(super) fn idle_since(&self) -> Instant {
        self.start + Duration::from_millis(self.idle_since_ms.load(Ordering::SeqCst))
    }

    fn end(&self, completed: bool) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        // Before the decrement: whoever sees zero in flight also sees when it became idle.
        self.idle_since_ms.fetch_max(ms, Ordering::SeqCst);
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        if !completed {
            if let Some(limiter) = &self.resets {
                if limiter.check().is_err() && !self.flagged.swap(true, Ordering::SeqCst) {
                    self.abusive.notify_one();
                }
            }
        }
    }
}

/// One request in flight; dropped when its response body ends or is dropped.
pub(super) struct RequestGuard {
    track: Arc<Tracker>,
    /// The response was sent in full (or failed on our side): not abandoned by the client.
    completed: bool,
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.track.end(self.completed);
    }
}

/// A response body that reports to its connection's [`Tracker`] when it ends. One field check
/// per frame; nothing allocated or locked.
pub(super) struct Tracked<B: http_body::Body> {
    pub(super) inner: B,
    pub(super) guard: RequestGuard,
}

impl<B> http_body::Body for Tracked<B>
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
        let polled = Pin::new(&mut this.inner).poll_frame(cx).map_err(Into::into);
        if matches!(polled, Poll::Ready(None | Some(Err(_)))) {
            this.guard.completed = true;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> Drop for Tracked<B>
where
    B: http_body::Body,
{
    fn drop(&mut self) {
        // hyper drops a body without polling it again once it says it has ended.
        if http_body::Body::is_end_stream(&self.inner) {
            self.guard.completed = true;
        }
    }
}

/// The connection's socket, noting when the protocol has been identified (the first
/// [`PREFACE_LEN`] bytes arrived). hyper-util's version detection has no timeout of its own.
pub(super) struct Watched {
    pub(super) inner: TcpStream,
    pub(super) seen: usize,
    pub(super) track: Arc<Tracker>,
}

impl AsyncRead for Watched {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if this.seen < PREFACE_LEN {
            this.seen += buf.filled().len() - before;
            if this.seen >= PREFACE_LEN {
                this.track.identified.store(true, Ordering::SeqCst);
            }
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
