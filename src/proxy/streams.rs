//! The open agent response bodies, so that shutdown can end them cleanly.
//!
//! When the grace period is over, [`OpenStreams::cut`] tells every open [`super::ResponseBody`]
//! to end: an SSE stream sends a final `event: error` (code `SHUTTING_DOWN`) and then closes,
//! and each one records its final link and access line as it ends. [`OpenStreams::drained`]
//! resolves once none is left.
//!
//! Why not a `CancellationToken` or `Notify` per body: polling either takes a lock on every
//! poll, and a body is polled for every frame. Here a body registers its waker in its own
//! lock-free [`AtomicWaker`] slot and reads one atomic flag; the registry's mutex is taken only
//! when a stream starts or ends, and once by the cut.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::Waker;

use atomic_waker::AtomicWaker;
use tokio::sync::Notify;

/// The registry of open streams. One per process.
#[derive(Debug, Default)]
pub struct OpenStreams {
    cut: AtomicBool,
    next: AtomicU64,
    open: Mutex<HashMap<u64, Arc<AtomicWaker>>>,
    /// Signalled when the last registered stream ends.
    empty: Notify,
}

impl OpenStreams {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Registers a stream; it stays registered until the handle is dropped.
    pub fn register(self: &Arc<Self>) -> StreamHandle {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let waker = Arc::new(AtomicWaker::new());
        self.lock().insert(id, waker.clone());
        StreamHandle {
            id,
            waker,
            streams: self.clone(),
        }
    }

    /// Tells every open stream (and every stream opened from now on) to end, and wakes them.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        let wakers: Vec<Arc<AtomicWaker>> = self.lock().values().cloned().collect();
        for w in wakers {
            w.wake();
        }
    }

    pub fn is_cut(&self) -> bool {
        self.cut.load(Ordering::SeqCst)
    }

    /// How many streams are registered.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Resolves once no stream is registered.
    pub async fn drained(&self) {
        loop {
            let notified = self.empty.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_empty() {
                return;
            }
            notified.await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<AtomicWaker>>> {
        // The map stays consistent whatever panicked while holding it.
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One stream's registration.
#[derive(Debug)]
pub struct StreamHandle {
    id: u64,
    waker: Arc<AtomicWaker>,
    streams: Arc<OpenStreams>,
}

impl StreamHandle {
    /// Whether the stream must end now (one atomic load; call on every poll).
    pub fn is_cut(&self) -> bool {
        self.streams.is_cut()
    }

    /// Arranges for `waker` to be woken by a cut; returns whether the cut already happened
    /// (call before returning `Pending`).
    pub fn register(&self, waker: &Waker) -> bool {
        self.waker.register(waker);
        self.is_cut()
    }
}

impl Drop for StreamHandle {
    fn drop(&mut self) {
        let empty = {
            let mut open = self.streams.lock();
            open.remove(&self.id);
            open.is_empty()
        };
        if empty {
            self.streams.empty.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    /// A future that is pending until its stream is cut.
    struct UntilCut(StreamHandle);

    impl Future for UntilCut {
        type Output = ();
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            if self.0.is_cut() || self.0.register(cx.waker()) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        }
    }

    #[tokio::test]
    async fn a_cut_wakes_every_open_stream_and_drained_follows_the_last() {
        let streams = OpenStreams::new();
        let a = tokio::spawn(UntilCut(streams.register()));
        let b = tokio::spawn(UntilCut(streams.register()));
        tokio::task::yield_now().await;
        assert_eq!(streams.len(), 2);
        let drained = tokio::spawn({
            let s = streams.clone();
            async move { s.drained().await }
        });
        streams.cut();
        a.await.unwrap();
        b.await.unwrap();
        drained.await.unwrap();
        assert!(streams.is_empty());
        // A stream opened after the cut ends at once.
        UntilCut(streams.register()).await;
    }
}
