//! The accept loop: HTTP/1.1 and h2c (prior knowledge) on one port, connection lifetimes, and a
//! graceful drain.
//!
//! Every connection has a bounded life in every state (`[server]` in the configuration):
//!
//! - until the protocol is known (first request bytes, or the whole HTTP/2 preface):
//!   `handshake_timeout`;
//! - HTTP/1.1 request headers: `header_read_timeout` (hyper's; it also runs while a keep-alive
//!   connection waits for its next request);
//! - no request in flight, on HTTP/1.1 and HTTP/2 alike: `idle_timeout`. Activity is an open
//!   request or response, counted by the service, not bytes: answered HTTP/2 pings keep no
//!   connection alive, and an open stream (a long SSE answer) always does;
//! - a request body that stops arriving: `request_body_timeout` (408; see [`crate::body`]).
//!
//! At most `max_connections` are open per listener: at the cap the loop stops accepting, so new
//! connections wait in the kernel's backlog and are served in order as soon as one closes (a
//! burst is absorbed instead of refused; the backlog and the client's own timeout bound the
//! wait). A warning says so once per saturation episode (and at most once a minute).
//!
//! A connection whose client abandons requests (HTTP/2 RST_STREAM, a dropped response) faster
//! than `reset_rate` is told to go away (GOAWAY; its in-flight requests finish): hyper's own
//! limits only count resets of streams not yet accepted and resets the server sends.
//!
//! On shutdown the listener is closed first (new connections are refused), then every open
//! connection is told to finish what it is doing (HTTP/1.1: no more keep-alive; HTTP/2: GOAWAY)
//! and given up to the grace period; whatever is still running after that is cut: first asked
//! to end (the `on_cut` of [`serve_with_cut`]: open streams send their final error event), then,
//! after `cut_budget`, dropped. [`serve_with_cut`] returns only once every connection task has
//! ended, so that nothing a connection does (its access line, its message link) happens later.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use http::{Request, Response};
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::body::{Body, BodyTimeout, BoxError};
use crate::config::ServerConfig;

/// The HTTP/2 connection preface; a connection has identified itself once this many bytes came.
const PREFACE_LEN: usize = 24;
/// How long an idle connection told to go away may take to close before it is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// The least time between two "connection limit reached" warnings.
const SATURATION_LOG_EVERY: Duration = Duration::from_secs(60);
/// The least time between two warnings about clients that abandon requests too fast (an attack
/// opens many connections; the rest are logged at debug level).
const RESET_LOG_EVERY: Duration = Duration::from_secs(10);

/// Serves `listener` with `handler` until `shutdown` resolves, then drains for at most `grace`.
pub async fn serve<H, F>(
    listener: TcpListener,
    handler: H,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
    name: &'static str,
    limits: &ServerConfig,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    serve_with_cut(
        listener,
        handler,
        shutdown,
        grace,
        name,
        limits,
        || {},
        Duration::ZERO,
    )
    .await;
}

/// [`serve`], and when the grace period is over: calls `on_cut`, gives the remaining
/// connections `cut_budget` to end, then drops them.
#[allow(clippy::too_many_arguments)]
pub async fn serve_with_cut<H, F>(
    listener: TcpListener,
    handler: H,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
    name: &'static str,
    limits: &ServerConfig,
    on_cut: impl FnOnce(),
    cut_budget: Duration,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    // Connection tasks, so that the cut can drop them and wait for them (a JoinSet: its
    // bookkeeping is per connection, nothing per poll).
    let mut connections = tokio::task::JoinSet::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // Slow clients may not hold a connection open without sending headers.
        .header_read_timeout(limits.header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(30)))
        // hyper's defaults, made explicit: resets of streams not yet accepted, and streams the
        // server itself resets for protocol errors, end the connection past these counts.
        .max_pending_accept_reset_streams(Some(20))
        .max_local_error_reset_streams(Some(1024));
    let builder = Arc::new(builder);
    let lifetimes = Arc::new(Lifetimes::new(limits));
    let max = limits.max_connections.clamp(1, Semaphore::MAX_PERMITS);
    let slots = Arc::new(Semaphore::new(max));
    let stop = CancellationToken::new();
    let mut saturation = Saturation::default();
    tokio::pin!(shutdown);

    loop {
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => {
                saturation.clear(name);
                slot
            }
            Err(_) => {
                saturation.reached(name, max);
                tokio::select! {
                    biased;
                    () = &mut shutdown => break,
                    slot = slots.clone().acquire_owned() => match slot {
                        Ok(slot) => slot,
                        Err(_) => break,
                    },
                }
            }
        };
        let accepted = tokio::select! {
            biased;
            () = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning or exiting.
                tracing::warn!(listener = name, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        while connections.try_join_next().is_some() {}
        connections.spawn(connection(
            stream,
            peer,
            builder.clone(),
            handler.clone(),
            lifetimes.clone(),
            stop.child_token(),
            slot,
        ));
    }

    drop(listener);
    tracing::info!(listener = name, grace = %humantime::format_duration(grace), "shutting down: draining connections");
    stop.cancel();
    // Every connection holds a slot until it ends: all slots back means all drained.
    let all = u32::try_from(max).unwrap_or(u32::MAX);
    tokio::select! {
        _ = slots.acquire_many(all) => {
            tracing::info!(listener = name, "all connections drained");
        }
        () = tokio::time::sleep(grace) => {
            tracing::warn!(listener = name, "grace period elapsed; closing the remaining connections");
            on_cut();
            let ended = async { while connections.join_next().await.is_some() {} };
            if tokio::time::timeout(cut_budget, ended).await.is_err() {
                connections.abort_all();
            }
        }
    }
    while connections.join_next().await.is_some() {}
}

/// The per-connection limits, shared by all connections of a listener.
struct Lifetimes {
    handshake: Duration,
    idle: Duration,
    body: Duration,
    reset_quota: Option<Quota>,
    created: Instant,
    /// When the last reset warning was logged, in milliseconds since `created` (0: never).
    reset_warned_ms: AtomicU64,
}

impl Lifetimes {
    fn new(c: &ServerConfig) -> Self {
        let reset_quota = c.reset_rate.and_then(|r| {
            let burst = NonZeroU32::new(r.burst)?;
            Quota::with_period(Duration::from_secs_f64(1.0 / r.per_second))
                .map(|q| q.allow_burst(burst))
        });
        Self {
            handshake: c.handshake_timeout,
            idle: c.idle_timeout,
            body: c.request_body_timeout,
            reset_quota,
            created: Instant::now(),
            reset_warned_ms: AtomicU64::new(0),
        }
    }

    /// Whether a reset warning may be logged now (at most one per [`RESET_LOG_EVERY`]).
    fn may_warn_resets(&self) -> bool {
        let now = u64::try_from(self.created.elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let last = self.reset_warned_ms.load(Ordering::Relaxed);
        let every = u64::try_from(RESET_LOG_EVERY.as_millis()).unwrap_or(u64::MAX);
        (last == 0 || now.saturating_sub(last) >= every)
            && self
                .reset_warned_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}

/// Serves one connection and watches its lifetimes; the slot is given back when it ends.
async fn connection<H, F>(
    stream: TcpStream,
    peer: SocketAddr,
    builder: Arc<auto::Builder<TokioExecutor>>,
    handler: H,
    lifetimes: Arc<Lifetimes>,
    stop: CancellationToken,
    _slot: OwnedSemaphorePermit,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let track = Arc::new(Tracker::new(lifetimes.reset_quota));
    let io = TokioIo::new(Watched {
        inner: stream,
        seen: 0,
        track: track.clone(),
    });
    let body_timeout = BodyTimeout(lifetimes.body);
    let service_track = track.clone();
    let service = service_fn(move |mut req: Request<Incoming>| {
        req.extensions_mut().insert(body_timeout);
        // Taken before the handler runs and moved into the response body: it counts the
        // request as in flight until the body ends, and as abandoned if dropped before that.
        let guard = service_track.begin();
        let fut = handler(req);
        async move {
            let res = fut.await;
            Ok::<_, Infallible>(res.map(|body| Tracked { inner: body, guard }))
        }
    });
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);

    let handshake_deadline = track.start + lifetimes.handshake;
    let first_check = handshake_deadline.min(track.start + lifetimes.idle);
    let timer = tokio::time::sleep_until(first_check.into());
    tokio::pin!(timer);
    let mut going_away = false;
    let mut stopping = false;
    // Set once an idle connection was told to go away: past it, it is dropped.
    let mut close_by: Option<Instant> = None;

    loop {
        tokio::select! {
            biased;
            res = conn.as_mut() => {
                if let Err(e) = res {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
                return;
            }
            () = stop.cancelled(), if !stopping => {
                stopping = true;
                if !going_away {
                    going_away = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
            () = track.abusive.notified(), if !going_away => {
                going_away = true;
                const MSG: &str = "the client abandons requests faster than server.reset_rate allows: telling the connection to go away (HTTP/2 GOAWAY)";
                if lifetimes.may_warn_resets() {
                    tracing::warn!(%peer, "{MSG}");
                } else {
                    tracing::debug!(%peer, "{MSG}");
                }
                conn.as_mut().graceful_shutdown();
            }
            () = &mut timer => {
                let now = Instant::now();
                if !track.identified.load(Ordering::SeqCst) && now >= handshake_deadline {
                    tracing::debug!(%peer, "closing a connection that did not start HTTP within server.handshake_timeout");
                    return;
                }
                let idle = track.in_flight.load(Ordering::SeqCst) == 0;
                let mut next = now + lifetimes.idle;
                if idle {
                    if let Some(by) = close_by {
                        if now >= by {
                            tracing::debug!(%peer, "an idle connection did not close after being told to go away; closing it");
                            return;
                        }
                        next = by;
                    } else {
                        let idle_deadline = track.idle_since() + lifetimes.idle;
                        if now >= idle_deadline {
                            tracing::debug!(%peer, "closing a connection idle for server.idle_timeout");
                            if !going_away {
                                going_away = true;
                                conn.as_mut().graceful_shutdown();
                            }
                            close_by = Some(now + CLOSE_GRACE);
                            next = now + CLOSE_GRACE;
                        } else {
                            next = idle_deadline;
                        }
                    }
                }
                if !track.identified.load(Ordering::SeqCst) {
                    next = next.min(handshake_deadline);
                }
                timer.as_mut().reset(next.into());
            }
        }
    }
}

/// What a connection's watchdog knows about it, updated by its IO, its service and its
/// response bodies (atomics: they run on other tasks for HTTP/2).
struct Tracker {
    start: Instant,
    /// The protocol is known: the HTTP/2 preface (or as many bytes) arrived, or a request
    /// started.
    identified: AtomicBool,
    in_flight: AtomicUsize,
    /// When the last request ended, in milliseconds since `start`.
    idle_since_ms: AtomicU64,
    /// Abandoned requests, as a token bucket (`server.reset_rate`).
    resets: Option<DefaultDirectRateLimiter>,
    /// Notified once when the client abandons requests too fast.
    abusive: Notify,
    flagged: AtomicBool,
}

impl Tracker {
    fn new(reset_quota: Option<Quota>) -> Self {
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

    fn begin(self: &Arc<Self>) -> RequestGuard {
        self.identified.store(true, Ordering::SeqCst);
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        RequestGuard {
            track: self.clone(),
            completed: false,
        }
    }

    fn idle_since(&self) -> Instant {
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
struct RequestGuard {
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
struct Tracked {
    inner: Body,
    guard: RequestGuard,
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
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

impl Drop for Tracked {
    fn drop(&mut self) {
        // hyper drops a body without polling it again once it says it has ended.
        if http_body::Body::is_end_stream(&self.inner) {
            self.guard.completed = true;
        }
    }
}

/// The connection's socket, noting when the protocol has been identified (the first
/// [`PREFACE_LEN`] bytes arrived). hyper-util's version detection has no timeout of its own.
struct Watched {
    inner: TcpStream,
    seen: usize,
    track: Arc<Tracker>,
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

/// Logging of the connection cap: once per saturation episode, at most once a minute.
#[derive(Default)]
struct Saturation {
    saturated: bool,
    last_logged: Option<Instant>,
    /// Episodes not logged because of the minimum interval.
    unlogged: u64,
}

impl Saturation {
    fn reached(&mut self, name: &'static str, max: usize) {
        if self.saturated {
            return;
        }
        self.saturated = true;
        let now = Instant::now();
        if self
            .last_logged
            .is_some_and(|t| now.duration_since(t) < SATURATION_LOG_EVERY)
        {
            self.unlogged += 1;
            return;
        }
        self.last_logged = Some(now);
        tracing::warn!(
            listener = name,
            max_connections = max,
            earlier_episodes_not_logged = self.unlogged,
            "connection limit reached (server.max_connections): new connections wait until one closes"
        );
        self.unlogged = 0;
    }

    fn clear(&mut self, name: &'static str) {
        if self.saturated {
            self.saturated = false;
            tracing::debug!(listener = name, "below the connection limit again");
        }
    }
}
