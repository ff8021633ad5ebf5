//! Recording message links off the streaming path.
//!
//! Streams hand their [`LinkRecord`]s to a bounded queue with a non-blocking `try_send`; one
//! writer task drains it in batches into the store. A full queue drops the record and counts it
//! (the stream is never slowed down by the store).
//!
//! A store that is down does not lose links: the writer keeps draining the queue into a buffer
//! held in memory, merged per message (an answer's open and final link become one entry), and
//! retries with exponential backoff until the store answers again. The buffer is bounded
//! (`agent.link_buffer` messages); past it, links of further messages are given up, counted
//! (`feedback_proxy_links_given_up_total`) and logged once per outage. What is held is exported
//! as `feedback_proxy_links_held`. A vote on an answer whose link was given up can still be
//! resolved through the proxy's client request id (see `feedback::delivery`).
//!
//! A vote on a message the store has no link for asks the writer to write what it has now
//! ([`LinkRecorder::flush`]) before it is refused: the link may be in the queue (a vote sent
//! the instant an answer ended) or held, with the store back but the next retry not yet due.
//!
//! Failures other than an unavailable store (a query the store refuses) are retried a few times,
//! then the offending links are isolated by writing them one by one and only those are dropped
//! (counted as `link_errors`), so one bad link cannot hold the buffer forever.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::store::{LinkRecord, SharedStore, StoreError};

/// Most links written in one store call.
const BATCH: usize = 512;
/// Consecutive refused (not "unavailable") writes before the links are written one by one.
const ATTEMPTS: u32 = 4;
/// After the first link of a batch arrives, wait this long for more: a store transaction per
/// handful of links costs far more than a millisecond's delay in recording them (a vote
/// arriving in that window is still delivered: linking wakes it). Without it, links at 2,000
/// requests/s went to the store three at a time (callgrind: ≈ 5 % more instructions per
/// proxied request than with batches twice that size).
const LINGER: Duration = Duration::from_millis(1);
/// Flush requests waiting for the writer; more wait for room (each is one vote, bounded by
/// its own deadline), and one store write answers all that are waiting.
const FLUSH_REQUESTS: usize = 64;
/// Backoff between retries while the store fails: doubles from the first to the last.
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// The sending side, cloned into every stream.
#[derive(Clone, Debug)]
pub struct LinkRecorder {
    tx: mpsc::Sender<LinkRecord>,
    /// Requests to write everything queued or held now; answered once that was tried.
    flush_tx: mpsc::Sender<oneshot::Sender<()>>,
    metrics: Arc<Metrics>,
}

impl LinkRecorder {
    /// Starts the writer task with a queue of `capacity` links and an outage buffer of at most
    /// `buffer` messages. It ends once every recorder is dropped and the queue is drained, or
    /// when [`LinkWriter::shutdown`] is called.
    pub fn spawn(
        store: SharedStore,
        capacity: usize,
        buffer: usize,
        metrics: Arc<Metrics>,
    ) -> (Self, LinkWriter) {
        let (tx, rx) = mpsc::channel(capacity);
        let (flush_tx, flush_rx) = mpsc::channel(FLUSH_REQUESTS);
        let stop = CancellationToken::new();
        let held = Held::new(buffer, metrics.clone());
        let task = tokio::spawn(writer(
            store,
            rx,
            flush_rx,
            held,
            metrics.clone(),
            stop.clone(),
        ));
        (
            Self {
                tx,
                flush_tx,
                metrics,
            },
            LinkWriter { task, stop },
        )
    }

    /// Asks the writer to write every link it has queued or held now, retry schedule or not,
    /// and waits (at most `within`) until that was tried. For a vote that found no link: its
    /// answer may have ended a moment ago. Whether the attempt finished in time (not whether
    /// it succeeded: the caller reads the store again either way).
    pub async fn flush(&self, within: Duration) -> bool {
        let (reply, done) = oneshot::channel();
        tokio::time::timeout(within, async {
            // A writer that has ended (shutdown) drops the request: nothing to wait for.
            self.flush_tx.send(reply).await.is_ok() && done.await.is_ok()
        })
        .await
        .unwrap_or(false)
    }

    /// Queues a link write without waiting.
    pub fn record(&self, link: LinkRecord) {
        if let Err(e) = self.tx.try_send(link) {
            self.metrics.links_dropped.inc();
            let message_id = match &e {
                mpsc::error::TrySendError::Full(l) | mpsc::error::TrySendError::Closed(l) => {
                    l.message_id.clone()
                }
            };
            tracing::warn!(%message_id, "link queue full or closed; link not recorded");
        }
    }
}

/// The writer task, for shutdown.
#[derive(Debug)]
pub struct LinkWriter {
    task: tokio::task::JoinHandle<()>,
    stop: CancellationToken,
}

impl LinkWriter {
    /// Stops taking new links, writes what is queued or held (one attempt each), and waits
    /// until `deadline` at most for that. Returns once the task has ended.
    pub async fn shutdown(mut self, deadline: Instant) {
        self.stop.cancel();
        if tokio::time::timeout_at(deadline, &mut self.task)
            .await
            .is_err()
        {
            self.task.abort();
            let _ = (&mut self.task).await;
            tracing::warn!(
                "the link writer did not finish before the shutdown deadline; queued and held links were lost"
            );
        }
    }
}

/// Links waiting for the store to come back, merged per message.
struct Held {
    links: HashMap<String, LinkRecord>,
    cap: usize,
    metrics: Arc<Metrics>,
    /// The bound was hit in this outage (logged once per outage).
    full_logged: bool,
}

impl Held {
    fn new(cap: usize, metrics: Arc<Metrics>) -> Self {
        Self {
            links: HashMap::new(),
            cap,
            metrics,
            full_logged: false,
        }
    }

    fn is_empty(&self) -> bool {
        self.links.is_empty()
    }

    fn len(&self) -> usize {
        self.links.len()
    }

    /// Adds `link`, merging it into a held link of the same message by the store's rules (see
    /// [`LinkRecord`]); gives it up when the buffer is full.
    fn push(&mut self, link: LinkRecord) {
        if let Some(old) = self.links.get_mut(&link.message_id) {
            if old.user_id == link.user_id {
                merge(old, link);
            } else {
                // The store would ignore it too: a message belongs to the first user linked.
                self.metrics.links_given_up.inc();
                tracing::warn!(message_id = %link.message_id, "a held link of this message belongs to another user; the new link is not recorded");
            }
            return;
        }
        if self.links.len() >= self.cap {
            self.give_up(&link);
            return;
        }
        self.links.insert(link.message_id.clone(), link);
        self.metrics.links_held.set(self.links.len() as i64);
    }

    fn give_up(&mut self, link: &LinkRecord) {
        self.metrics.links_given_up.inc();
        if !self.full_logged {
            self.full_logged = true;
            tracing::error!(
                held = self.links.len(),
                message_id = %link.message_id,
                "the store is still unavailable and agent.link_buffer is full; links of further answers are given up until the store is back (their votes are resolved through the client request id where there is one)"
            );
        }
    }

    /// Takes up to `n` held links.
    fn take(&mut self, n: usize) -> Vec<LinkRecord> {
        let keys: Vec<String> = self.links.keys().take(n).cloned().collect();
        keys.iter().filter_map(|k| self.links.remove(k)).collect()
    }

    /// Puts back links taken with [`Held::take`] whose write failed.
    fn put_back(&mut self, links: Vec<LinkRecord>) {
        for l in links {
            self.links.insert(l.message_id.clone(), l);
        }
    }

    fn written(&mut self) {
        self.metrics.links_held.set(self.links.len() as i64);
        if self.links.is_empty() {
            self.full_logged = false;
        }
    }
}

/// Merges a later write for the same message and user into an earlier one, as the store does.
fn merge(old: &mut LinkRecord, new: LinkRecord) {
    if new.chat_id.is_some() {
        old.chat_id = new.chat_id;
    }
    if new.trace_id.is_some() {
        old.trace_id = new.trace_id;
    }
    if new.client_request_id.is_some() {
        old.client_request_id = new.client_request_id;
    }
    if new.route.is_some() {
        old.route = new.route;
    }
    old.open = new.open;
}

/// How a flush of the held links ended.
enum Flush {
    /// Everything held was written (or isolated and dropped).
    Done,
    /// The store failed; what was not written is still held.
    Failed(StoreError),
}

async fn writer(
    store: SharedStore,
    mut rx: mpsc::Receiver<LinkRecord>,
    mut flush_rx: mpsc::Receiver<oneshot::Sender<()>>,
    mut held: Held,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let mut batch = Vec::with_capacity(BATCH);
    let mut stopping = false;
    // While the store fails: when to try again, the backoff, and refused writes in a row.
    let mut retry_at: Option<Instant> = None;
    let mut delay = RETRY_FIRST;
    let mut refused = 0u32;
    let mut outage_since: Option<Instant> = None;
    loop {
        let far = Instant::now() + Duration::from_secs(86_400);
        let mut replies = Vec::new();
        let wake = tokio::select! {
            biased;
            () = stop.cancelled(), if !stopping => {
                // Refuse new links; what is already queued or held is still written below.
                rx.close();
                stopping = true;
                continue;
            }
            // Before new links: under a steady flow of links a due retry must not starve.
            () = tokio::time::sleep_until(retry_at.unwrap_or(far)), if retry_at.is_some() => Wake::Retry,
            Some(reply) = flush_rx.recv(), if !stopping => {
                replies.push(reply);
                Wake::Flush
            }
            n = rx.recv_many(&mut batch, BATCH) => if n == 0 { Wake::Closed } else { Wake::Links },
        };
        let asked = matches!(wake, Wake::Flush);
        if asked {
            // Everything queued joins what is held, and all of it is written now; every flush
            // request waiting is answered by this one attempt.
            while let Ok(r) = flush_rx.try_recv() {
                replies.push(r);
            }
            while let Ok(l) = rx.try_recv() {
                held.push(l);
            }
            if held.is_empty() {
                for r in replies {
                    let _ = r.send(());
                }
                continue;
            }
        }
        if let Wake::Closed = wake {
            // The queue is closed and drained: one last attempt for what is held.
            if !held.is_empty() {
                if let Flush::Failed(e) = flush(&store, &mut held, &metrics, &mut refused).await {
                    let lost = held.len();
                    metrics.link_errors.inc_by(lost as u64);
                    metrics.links_held.set(0);
                    tracing::error!(error = %e, links = lost, "the store is unavailable at shutdown; held message links were not recorded");
                }
            }
            break;
        }
        if let Wake::Links = wake {
            if held.is_empty() {
                // The usual case: the store is up; gather what comes within the linger, then
                // write the batch.
                if batch.len() < BATCH && !stopping {
                    tokio::time::sleep(LINGER).await;
                }
                while batch.len() < BATCH {
                    match rx.try_recv() {
                        Ok(l) => batch.push(l),
                        Err(_) => break,
                    }
                }
                match store.record_links(&batch).await {
                    Ok(()) => {
                        metrics.links_recorded.inc_by(batch.len() as u64);
                        batch.clear();
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, links = batch.len(), "recording links failed; holding them until the store answers");
                        outage_since = Some(Instant::now());
                        if !matches!(e, StoreError::Unavailable(_)) {
                            refused += 1;
                        }
                        delay = RETRY_FIRST;
                        retry_at = Some(Instant::now() + delay);
                    }
                }
            }
            // Held links are older: these join them (merged per message) rather than overtake.
            for l in batch.drain(..) {
                held.push(l);
            }
            continue;
        }
        // Time to retry what is held.
        match flush(&store, &mut held, &metrics, &mut refused).await {
            Flush::Done => {
                if let Some(since) = outage_since.take() {
                    tracing::info!(
                        after_ms = since.elapsed().as_millis() as u64,
                        "the store answers again; held message links were written"
                    );
                }
                retry_at = None;
            }
            Flush::Failed(e) if asked => {
                // An extra attempt on a vote's behalf: it starts an outage's schedule if none
                // runs, and never lengthens one (many votes must not push retries out).
                if retry_at.is_none() {
                    tracing::warn!(error = %e, links = held.len(), "recording links failed; holding them until the store answers");
                    outage_since.get_or_insert_with(Instant::now);
                    delay = RETRY_FIRST;
                    retry_at = Some(Instant::now() + delay);
                }
            }
            Flush::Failed(e) => {
                delay = (delay * 2).min(RETRY_MAX);
                tracing::debug!(error = %e, held = held.len(), retry_in = ?delay, "the store still fails; links stay held");
                retry_at = Some(Instant::now() + delay);
            }
        }
        for r in replies {
            let _ = r.send(());
        }
    }
}

/// What woke the writer.
enum Wake {
    /// Links arrived (in `batch`).
    Links,
    /// The queue is closed and empty.
    Closed,
    /// The retry of held links is due.
    Retry,
    /// A vote found no link: write what is queued or held now (answer when tried).
    Flush,
}

/// Writes the held links in batches. A refused batch (not an outage) is retried on later
/// flushes; after [`ATTEMPTS`] refusals in a row its links are written one by one and those the
/// store still refuses are dropped and counted.
async fn flush(
    store: &SharedStore,
    held: &mut Held,
    metrics: &Metrics,
    refused: &mut u32,
) -> Flush {
    while !held.is_empty() {
        let chunk = held.take(BATCH);
        match store.record_links(&chunk).await {
            Ok(()) => {
                *refused = 0;
                metrics.links_recorded.inc_by(chunk.len() as u64);
                held.written();
            }
            Err(e @ StoreError::Unavailable(_)) => {
                *refused = 0;
                held.put_back(chunk);
                return Flush::Failed(e);
            }
            Err(e) if *refused + 1 < ATTEMPTS => {
                *refused += 1;
                held.put_back(chunk);
                return Flush::Failed(e);
            }
            Err(_) => {
                *refused = 0;
                let mut rest = chunk.into_iter();
                while let Some(link) = rest.next() {
                    match store.record_links(std::slice::from_ref(&link)).await {
                        Ok(()) => {
                            metrics.links_recorded.inc();
                        }
                        Err(e @ StoreError::Unavailable(_)) => {
                            held.put_back(std::iter::once(link).chain(rest).collect());
                            return Flush::Failed(e);
                        }
                        Err(e) => {
                            metrics.link_errors.inc();
                            tracing::error!(error = %e, message_id = %link.message_id, "the store refuses this message link; dropping it");
                        }
                    }
                }
                held.written();
            }
        }
    }
    Flush::Done
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(id: &str, user: &str) -> LinkRecord {
        LinkRecord {
            message_id: id.into(),
            chat_id: None,
            user_id: user.into(),
            trace_id: None,
            client_request_id: None,
            open: true,
            route: None,
        }
    }

    #[test]
    fn held_links_merge_per_message_and_stop_at_the_cap() {
        let metrics = Arc::new(Metrics::new());
        let mut held = Held::new(2, metrics.clone());
        held.push(LinkRecord {
            chat_id: Some("c".into()),
            client_request_id: Some("req-1".into()),
            ..link("m1", "u")
        });
        held.push(LinkRecord {
            trace_id: Some("tr-1".into()),
            open: false,
            ..link("m1", "u")
        });
        held.push(link("m2", "u"));
        // Full: a third message is given up, another user's write to m1 too.
        held.push(link("m3", "u"));
        held.push(link("m1", "mallory"));
        assert_eq!(held.len(), 2);
        assert_eq!(metrics.links_given_up.get(), 2);
        assert_eq!(metrics.links_held.get(), 2);
        let m1 = &held.links["m1"];
        assert_eq!(m1.chat_id.as_deref(), Some("c"));
        assert_eq!(m1.trace_id.as_deref(), Some("tr-1"));
        assert_eq!(m1.client_request_id.as_deref(), Some("req-1"));
        assert_eq!(m1.user_id, "u");
        assert!(!m1.open);
        let taken = held.take(10);
        assert_eq!(taken.len(), 2);
        held.written();
        assert_eq!(metrics.links_held.get(), 0);
        assert!(!held.full_logged);
    }
}
