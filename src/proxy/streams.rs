//! The open agent response bodies, so that shutdown can end them cleanly.
//!
//! When the grace period is over, [`OpenStreams::cut`] tells every open [`super::ResponseBody`]
//! to end: an SSE stream sends a final `event: error` (code `SHUTTING_DOWN`) and then closes,
//! and each one records its final link and access line as it ends. [`OpenStreams::drained`]
//! resolves once none is left.
//!
//! Why not a `CancellationToken` or `Notify` per body: polling either takes a lock on every
//! poll, and a body is polled for every frame. Here a body reads one atomic flag, and counts
//! itself open with one atomic add. Only a body that has to wait for the agent (one that
//! returns `Pending`) puts a lock-free [`AtomicWaker`] slot into the registry, once, for the
//! cut to wake: the registry's mutex is taken when such a stream starts waiting and when it
//! ends, and once by the cut. Most JSON answers arrive whole and never wait, so they cost
//! two atomic operations instead of an allocation and two locked map updates.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::Waker;

use atomic_waker::AtomicWaker;
use tokio::sync::Notify;

/// The registry of open streams. One per process.
#[derive(Debug, Default)]
pub struct OpenStreams {
    cut: AtomicBool,
    /// Registered streams, waiting or not.
    open: AtomicUsize,
    next: AtomicU64,
    /// The wakers of the streams that have waited at least once.
    waiting: Mutex<HashMap<u64, Arc<AtomicWaker>>>,
    /// Signalled when the last registered stream ends.
    empty: Notify,
}

impl OpenStreams {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Registers a stream; it stays registered until the handle is dropped.
    pub fn register(self: &Arc<Self>) -> StreamHandle {
        self.open.fetch_add(1, Ordering::SeqCst);
        StreamHandle {
            slot: None,
            streams: self.clone(),
        }
    }

    /// Tells every open stream (and every stream opened from now on) to end, and wakes them.
    pub fn cut(&self) {
        // Before the wakers are read: a stream that puts its waker in after this read sees
        // the flag when it checks it, right after (see [`StreamHandle::register`]).
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
        self.open.load(Ordering::SeqCst)
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
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One stream's registration.
#[derive(Debug)]
pub struct StreamHandle {
    /// The stream's id and waker slot in the registry, once it has waited.
    slot: Option<(u64, Arc<AtomicWaker>)>,
    streams: Arc<OpenStreams>,
}

impl StreamHandle {
    /// Whether the stream must end now (one atomic load; call on every poll).
    pub fn is_cut(&self) -> bool {
        self.streams.is_cut()
    }

    /// Arranges for `waker` to be woken by a cut; returns whether the cut already happened
    /// (call before returning `Pending`).
    pub fn register(&mut self, waker: &Waker) -> bool {
        let slot = match &self.slot {
            Some((_, slot)) => slot,
            None => {
                let id = self.streams.next.fetch_add(1, Ordering::Relaxed);
                let slot = Arc::new(AtomicWaker::new());
                self.streams.lock().insert(id, slot.clone());
                &self.slot.insert((id, slot)).1
            }
        };
        slot.register(waker);
        self.is_cut()
    }
}

impl Drop for StreamHandle {
    fn drop(&mut self) {
        if let Some((id, _)) = self.slot.take() {
            self.streams.lock().remove(&id);
        }
        if self.streams.open.fetch_sub(1, Ordering::SeqCst) == 1 {
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
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
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
