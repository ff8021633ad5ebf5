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
//! - a request body that stops arriving: `request_body_timeout` (408; applied by the handlers
//!   that read bodies, see [`crate::body::timed`]).
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

mod track;
mod trim;
pub mod workers;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::task::Poll;
use std::time::{Duration, Instant};

use atomic_waker::AtomicWaker;
use governor::Quota;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use bytes::Bytes;
use tower::{Service, ServiceExt};

use crate::body::BoxError;
use crate::config::ServerConfig;
use track::{Tracked, Tracker, Watched};

/// How long an idle connection told to go away may take to close before it is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// The least time between two "connection limit reached" warnings.
const SATURATION_LOG_EVERY: Duration = Duration::from_secs(60);
/// The least time between two warnings about clients that abandon requests too fast (an attack
/// opens many connections; the rest are logged at debug level).
const RESET_LOG_EVERY: Duration = Duration::from_secs(10);

/// What the server runs: a cloneable tower service that answers every request (its errors are
/// responses already) with a body of bytes. Implemented for every such service.
pub trait HttpService:
    Service<
        Request<Incoming>,
        Response = Response<<Self as HttpService>::Body>,
        Error = Infallible,
        Future: Send + 'static,
    > + Clone
    + Send
    + Sync
    + 'static
{
    type Body: http_body::Body<Data = Bytes, Error: Into<BoxError>> + Unpin + Send + 'static;
}

impl<S, B> HttpService for S
where
    S: Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes, Error: Into<BoxError>> + Unpin + Send + 'static,
{
    type Body = B;
}

/// Serves `listener` with `service` until `shutdown` resolves, then drains for at most `grace`.
pub async fn serve<S>(
    listener: TcpListener,
    service: S,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
    name: &'static str,
    limits: &ServerConfig,
) where
    S: HttpService,
{
    serve_with_cut(
        listener,
        service,
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
pub async fn serve_with_cut<S>(
    listener: TcpListener,
    service: S,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
    name: &'static str,
    limits: &ServerConfig,
    on_cut: impl FnOnce(),
    cut_budget: Duration,
) where
    S: HttpService,
{
    let slots = Arc::new(Semaphore::new(connection_cap(limits)));
    // While serving: give the allocator's free pages back after bursts of connections (the
    // watcher never ends by itself).
    let trim = trim::after_bursts(slots.clone(), connection_cap(limits));
    let serving = serve_with_slots(
        listener, service, shutdown, grace, name, limits, on_cut, cut_budget, slots,
    );
    tokio::select! {
        () = serving => {}
        () = trim => {}
    }
}

/// The next connection on `listener` (`None` once `shutdown` has resolved), reaping the tasks
/// of connections that ended meanwhile. A finished task keeps its allocation, sized for the
/// connection's future (≈ 2 KiB), until the set hands it back: reaped only when the next
/// connection arrived, a burst of 10,000 streams left ≈ 20 MB behind it until the next one.
async fn accept_reaping<T: 'static>(
    listener: &TcpListener,
    connections: &mut tokio::task::JoinSet<T>,
    shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
) -> Option<std::io::Result<(tokio::net::TcpStream, SocketAddr)>> {
    loop {
        tokio::select! {
            biased;
            () = shutdown.as_mut() => return None,
            accepted = listener.accept() => return Some(accepted),
            // `None` (no tasks) disables this branch until the next call.
            Some(_) = connections.join_next() => {}
        }
    }
}

/// The connection cap of a listener (`server.max_connections`), as semaphore permits.
pub(crate) fn connection_cap(limits: &ServerConfig) -> usize {
    limits.max_connections.clamp(1, Semaphore::MAX_PERMITS)
}

/// [`serve_with_cut`] with the connection cap's semaphore given: listeners that share it
/// (the workers of `server::workers`) share the cap, and each drains until all of them have.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn serve_with_slots<S>(
    listener: TcpListener,
    service: S,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
    name: &'static str,
    limits: &ServerConfig,
    on_cut: impl FnOnce(),
    cut_budget: Duration,
    slots: Arc<Semaphore>,
) where
    S: HttpService,
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
    let max = connection_cap(limits);
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
        let Some(accepted) = accept_reaping(&listener, &mut connections, &mut shutdown).await
        else {
            break;
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
        // While connections keep arriving, the wait above may never get to reap: reap here too.
        while connections.try_join_next().is_some() {}
        connections.spawn(connection(
            stream,
            peer,
            builder.clone(),
            service.clone(),
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

/// Serves one connection; the slot is given back when it ends.
///
/// Its lifetimes are watched by a task of its own ([`watchdog`]) that sleeps until a deadline,
/// the listener's stop or an abuse report, and tells this one what to do through a [`Signal`]
/// (an atomic and a waker). The connection's own poll loop thus costs one atomic load per wake,
/// where a `select!` over the stop token, the abuse notifier and a timer took two locks
/// (tokio's `Notified` re-registers under its waiter list's mutex on every poll).
async fn connection<S>(
    stream: TcpStream,
    peer: SocketAddr,
    builder: Arc<auto::Builder<TokioExecutor>>,
    service: S,
    lifetimes: Arc<Lifetimes>,
    stop: CancellationToken,
    _slot: OwnedSemaphorePermit,
) where
    S: HttpService,
{
    let track = Arc::new(Tracker::new(lifetimes.reset_quota));
    let io = TokioIo::new(Watched {
        inner: stream,
        seen: 0,
        track: track.clone(),
    });
    let service_track = track.clone();
    let service = service_fn(move |req: Request<Incoming>| {
        // Taken before the service runs and moved into the response body: it counts the
        // request as in flight until the body ends, and as abandoned if dropped before that.
        let guard = service_track.begin();
        let fut = service.clone().oneshot(req);
        async move {
            let res = fut.await?;
            Ok::<_, Infallible>(res.map(|body| Tracked { inner: body, guard }))
        }
    });
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);

    let signal = Arc::new(Signal::default());
    // Ends with the connection (dropped here, or with this task when the cut aborts it).
    let _watchdog = AbortOnDrop(tokio::spawn(watchdog(
        track,
        lifetimes,
        stop,
        signal.clone(),
        peer,
    )));
    let mut told_to_go = false;
    let ended = std::future::poll_fn(|cx| {
        signal.waker.register(cx.waker());
        let told = signal.state.load(Ordering::Acquire);
        if told & Signal::CLOSE != 0 {
            return Poll::Ready(None);
        }
        if told & Signal::GO_AWAY != 0 && !told_to_go {
            told_to_go = true;
            conn.as_mut().graceful_shutdown();
        }
        conn.as_mut().poll(cx).map(Some)
    })
    .await;
    if let Some(Err(e)) = ended {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}

/// What a connection's [`watchdog`] tells the connection: a bit set, then a wake-up.
#[derive(Default)]
struct Signal {
    state: AtomicU8,
    waker: AtomicWaker,
}

impl Signal {
    /// Finish what is in flight and close (HTTP/1.1: no keep-alive; HTTP/2: GOAWAY).
    const GO_AWAY: u8 = 1;
    /// Drop the connection now.
    const CLOSE: u8 = 2;

    fn tell(&self, what: u8) {
        self.state.fetch_or(what, Ordering::Release);
        self.waker.wake();
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Watches one connection's lifetimes (see the module's documentation) and tells it through
/// `signal` when to go away or close. Wakes only on its own deadlines, the listener's stop and
/// abuse reports: nothing per request.
async fn watchdog(
    track: Arc<Tracker>,
    lifetimes: Arc<Lifetimes>,
    stop: CancellationToken,
    signal: Arc<Signal>,
    peer: SocketAddr,
) {
    let handshake_deadline = track.start + lifetimes.handshake;
    let first_check = handshake_deadline.min(track.start + lifetimes.idle);
    let timer = tokio::time::sleep_until(first_check.into());
    tokio::pin!(timer);
    let mut going_away = false;
    let mut stopping = false;
    // Set once an idle connection was told to go away: past it, it is dropped.
    let mut close_by: Option<Instant> = None;
    let go_away = |going_away: &mut bool| {
        if !*going_away {
            *going_away = true;
            signal.tell(Signal::GO_AWAY);
        }
    };

    loop {
        tokio::select! {
            biased;
            () = stop.cancelled(), if !stopping => {
                stopping = true;
                go_away(&mut going_away);
            }
            () = track.abusive.notified(), if !going_away => {
                const MSG: &str = "the client abandons requests faster than server.reset_rate allows: telling the connection to go away (HTTP/2 GOAWAY)";
                if lifetimes.may_warn_resets() {
                    tracing::warn!(%peer, "{MSG}");
                } else {
                    tracing::debug!(%peer, "{MSG}");
                }
                go_away(&mut going_away);
            }
            () = &mut timer => {
                let now = Instant::now();
                if !track.identified.load(Ordering::SeqCst) && now >= handshake_deadline {
                    tracing::debug!(%peer, "closing a connection that did not start HTTP within server.handshake_timeout");
                    signal.tell(Signal::CLOSE);
                    return;
                }
                let idle = track.in_flight.load(Ordering::SeqCst) == 0;
                let mut next = now + lifetimes.idle;
                if idle {
                    if let Some(by) = close_by {
                        if now >= by {
                            tracing::debug!(%peer, "an idle connection did not close after being told to go away; closing it");
                            signal.tell(Signal::CLOSE);
                            return;
                        }
                        next = by;
                    } else {
                        let idle_deadline = track.idle_since() + lifetimes.idle;
                        if now >= idle_deadline {
                            tracing::debug!(%peer, "closing a connection idle for server.idle_timeout");
                            go_away(&mut going_away);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Connections that end while the listener waits for the next one are reaped then, not
    /// when the next one arrives (their tasks' allocations would outlast a burst).
    #[tokio::test(start_paused = true)]
    async fn connections_that_ended_are_reaped_while_waiting_for_the_next() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let mut connections = tokio::task::JoinSet::new();
        for _ in 0..3 {
            connections.spawn(async {});
        }
        let shutdown = tokio::time::sleep(Duration::from_secs(1));
        tokio::pin!(shutdown);
        let accepted = accept_reaping(&listener, &mut connections, &mut shutdown).await;
        assert!(
            accepted.is_none(),
            "no client connected: only the shutdown ends the wait"
        );
        assert!(
            connections.is_empty(),
            "{} ended connections were kept",
            connections.len()
        );
    }
}
