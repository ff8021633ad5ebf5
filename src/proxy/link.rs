//! Recording message links off the streaming path.
//!
//! Streams hand their [`LinkRecord`]s to a bounded queue with a non-blocking `try_send`; one
//! writer task drains it in batches into the store. A full queue drops the record and counts it
//! (the stream is never slowed down by the store); a store failure is retried a few times with
//! backoff, then logged and counted, and never reaches the stream.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::store::{LinkRecord, SharedStore};

/// Most links written in one store call.
const BATCH: usize = 512;
/// Attempts for one batch before it is dropped.
const ATTEMPTS: u32 = 4;
/// After the first link of a batch arrives, wait this long for more: a store transaction per
/// handful of links costs far more than a few milliseconds' delay in recording them (a vote
/// arriving in that window is still delivered: linking wakes it).
const LINGER: Duration = Duration::from_millis(0);

/// The sending side, cloned into every stream.
#[derive(Clone, Debug)]
pub struct LinkRecorder {
    tx: mpsc::Sender<LinkRecord>,
    metrics: Arc<Metrics>,
}

impl LinkRecorder {
    /// Starts the writer task. It ends once every recorder is dropped and the queue is drained,
    /// or when [`LinkWriter::shutdown`] is called.
    pub fn spawn(store: SharedStore, capacity: usize, metrics: Arc<Metrics>) -> (Self, LinkWriter) {
        let (tx, rx) = mpsc::channel(capacity);
        let stop = CancellationToken::new();
        let task = tokio::spawn(writer(store, rx, metrics.clone(), stop.clone()));
        (Self { tx, metrics }, LinkWriter { task, stop })
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
    /// Stops taking new links, writes what is queued (one attempt each), and waits at most
    /// `budget` for that.
    pub async fn shutdown(self, budget: Duration) {
        self.stop.cancel();
        let abort = self.task.abort_handle();
        if tokio::time::timeout(budget, self.task).await.is_err() {
            abort.abort();
            tracing::warn!("link writer did not finish within {budget:?}; queued links were lost");
        }
    }
}

async fn writer(
    store: SharedStore,
    mut rx: mpsc::Receiver<LinkRecord>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let mut batch = Vec::with_capacity(BATCH);
    let mut stopping = false;
    loop {
        let n = if stopping {
            rx.recv_many(&mut batch, BATCH).await
        } else {
            tokio::select! {
                n = rx.recv_many(&mut batch, BATCH) => n,
                () = stop.cancelled() => {
                    // Refuse new links; what is already queued is still delivered below.
                    rx.close();
                    stopping = true;
                    continue;
                }
            }
        };
        if n == 0 {
            break;
        }
        if n < BATCH && !stopping {
            tokio::time::sleep(LINGER).await;
            while batch.len() < BATCH {
                match rx.try_recv() {
                    Ok(l) => batch.push(l),
                    Err(_) => break,
                }
            }
        }
        let attempts = if stopping { 1 } else { ATTEMPTS };
        let mut delay = Duration::from_millis(100);
        for attempt in 1..=attempts {
            match store.record_links(&batch).await {
                Ok(()) => {
                    metrics.links_recorded.inc_by(batch.len() as u64);
                    break;
                }
                Err(e) if attempt < attempts => {
                    tracing::warn!(error = %e, links = batch.len(), attempt, "recording links failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay *= 4;
                }
                Err(e) => {
                    metrics.link_errors.inc_by(batch.len() as u64);
                    let first = batch.first().map(|l| l.message_id.as_str()).unwrap_or("");
                    tracing::error!(error = %e, links = batch.len(), first_message_id = first, "recording links failed; dropping them");
                }
            }
        }
        batch.clear();
    }
}
