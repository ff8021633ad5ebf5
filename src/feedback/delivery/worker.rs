//! The background worker: claims due deliveries as fast as MLflow keeps up ([`Pace`]), runs
//! them as tracked tasks, and periodically looks up traces for votes waiting without one.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use tokio_util::sync::CancellationToken;

use super::{Deliverer, LOOKUP_BATCH, NO_EXPERIMENT_ID, NO_TRACE_ID};
use crate::feedback::pace::{Pace, Signal};
use crate::store::DeliveryState;

impl Deliverer {
    /// One round of the worker's trace lookup: votes waiting without a trace id (newest first,
    /// at most [`LOOKUP_BATCH`], enqueued within `delivery.max_age`) whose message has no trace
    /// are searched for by client request id; those found are linked, which makes them due.
    pub(super) async fn look_up_waiting(&self) {
        let Some(mlflow) = &self.mlflow else { return };
        let waiting = match self
            .store
            .list_deliveries(Some(DeliveryState::Waiting), LOOKUP_BATCH)
            .await
        {
            Ok(w) => w,
            Err(e) => {
                tracing::debug!(error = %e, "cannot list waiting deliveries for the trace lookup");
                return;
            }
        };
        let now = SystemTime::now();
        for d in waiting {
            let awaits_trace = d
                .last_error
                .as_deref()
                .is_some_and(|r| r.starts_with(NO_TRACE_ID));
            let recent = now
                .duration_since(d.enqueued_at)
                .is_ok_and(|age| age < self.config.max_age);
            if !awaits_trace || d.trace_id.is_some() || !recent {
                continue;
            }
            if let Some(chat) = d.key.rated_chat() {
                super::session::requeue_if_traced(&self.store, &d.key, chat).await;
                continue;
            }
            let crid = match self.store.get_link(&d.key.message_id).await {
                Ok(None) => None,
                // The stream's client request id, when the link has one but no trace (its
                // final link was lost); a link without one was never sent one.
                Ok(Some(l)) if l.user_id == d.key.user_id && l.trace_id.is_none() => {
                    match l.client_request_id {
                        Some(c) => Some(c),
                        None => continue,
                    }
                }
                Ok(Some(_)) => continue,
                Err(e) => {
                    tracing::debug!(error = %e, "cannot read a link for the trace lookup");
                    return;
                }
            };
            match self
                .find_unlinked(mlflow, &d.key, &d.chat_id, crid.as_deref())
                .await
            {
                Ok(_) => {}
                Err(e) if e.is_retryable() => {
                    tracing::debug!(error = %e.short(), "MLflow fails; the trace lookup stops for this round");
                    return;
                }
                Err(e) => {
                    tracing::debug!(key = %d.key, error = %e.short(), "trace lookup failed");
                }
            }
        }
    }

    /// The background worker: claims due deliveries and attempts them until `stop` is
    /// cancelled, as many at a time as MLflow keeps up with ([`Pace`]: at most
    /// `delivery.concurrency`). It claims again as soon as a quarter of the allowed slots are
    /// free (`claim_at_least`), so a backlog drains at MLflow's pace rather than one batch per
    /// `poll_interval`; with nothing due it polls
    /// every `poll_interval`. Attempts are tracked tasks: [`Deliverer::shutdown`] waits for
    /// them until the drain deadline.
    ///
    /// Votes stored while MLflow was not configured (held as `no_experiment_id`) are released
    /// first, so that configuring MLflow delivers the backlog without an operator's help.
    pub async fn run_worker(self: Arc<Self>, stop: CancellationToken) {
        let mut pace = Pace::new(self.config.concurrency);
        // Finished attempts report their signal here; `inflight` counts those not back yet.
        let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<(Signal, Duration)>();
        let mut inflight: usize = 0;
        let mut next_lookup: Option<tokio::time::Instant> = None;
        let mut backlog_released = !self.enabled();
        loop {
            if !backlog_released {
                match self.store.requeue_held(NO_EXPERIMENT_ID).await {
                    Ok(n) => {
                        backlog_released = true;
                        if n > 0 {
                            tracing::info!(
                                deliveries = n,
                                "votes stored while MLflow was not configured are queued for delivery"
                            );
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot release the votes held while MLflow was not configured; trying again")
                    }
                }
            }
            if self.enabled()
                && next_lookup.is_none_or(|at| at <= tokio::time::Instant::now())
                && !self.looking_up.swap(true, Ordering::AcqRel)
            {
                next_lookup = Some(tokio::time::Instant::now() + self.config.trace_lookup_interval);
                let this = self.clone();
                self.spawn_tracked((), async move {
                    this.look_up_waiting().await;
                    this.looking_up.store(false, Ordering::Release);
                });
            }
            let now = Instant::now();
            let allowed = pace.allowed(now);
            let room = allowed
                .saturating_sub(inflight)
                .min(self.config.batch_size as usize);
            let mut more_due = false;
            if room >= claim_at_least(allowed, inflight, self.config.batch_size) && self.enabled() {
                let claimed_at = Instant::now();
                match self.store.claim_due(room as u32, self.config.lease).await {
                    Ok(batch) => {
                        more_due = batch.len() == room;
                        for d in batch {
                            let this = self.clone();
                            let done = Done {
                                tx: done_tx.clone(),
                                signal: Signal::Neutral,
                                started: Instant::now(),
                            };
                            inflight += 1;
                            self.spawn_tracked((), async move {
                                let mut done = done;
                                done.signal = this.attempt(d, claimed_at).await.1;
                            });
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot claim due deliveries");
                    }
                }
            }
            self.metrics.delivery_concurrency_limit.set(pace.limit());
            let allowed = pace.allowed(Instant::now());
            if more_due
                && allowed.saturating_sub(inflight)
                    >= claim_at_least(allowed, inflight, self.config.batch_size)
            {
                // More is due and there is room: claim again without waiting.
                continue;
            }
            // Wait for an attempt to finish (then claim again at once), the poll interval, the
            // end of a Retry-After pause, or the stop.
            let wake = pace
                .paused_until(now)
                .map_or(now + self.config.poll_interval, |p| {
                    p.min(now + self.config.poll_interval)
                });
            tokio::select! {
                biased;
                () = stop.cancelled() => break,
                Some((signal, took)) = done_rx.recv(), if inflight > 0 => {
                    inflight -= 1;
                    pace.observe(signal, Some(took), Instant::now());
                    // Take every other attempt that has finished too, then claim once for all.
                    while let Ok((signal, took)) = done_rx.try_recv() {
                        inflight = inflight.saturating_sub(1);
                        pace.observe(signal, Some(took), Instant::now());
                    }
                }
                () = tokio::time::sleep_until(wake.into()) => {}
            }
        }
        // In-flight attempts are tracked: `Deliverer::shutdown` waits for them.
    }
}

/// The fewest free slots worth a claim: one when nothing is in flight, else a quarter of the
/// allowed concurrency. A claim is a store transaction (an fsync on SQLite); claiming one
/// delivery each time one finishes made it one per vote, beside MLflow's own disk writes, and
/// a quarter keeps the pipeline full while claiming several at once.
fn claim_at_least(allowed: usize, inflight: usize, batch_size: u32) -> usize {
    if inflight == 0 {
        1
    } else {
        (allowed / 4).clamp(1, (batch_size as usize).max(1))
    }
}

/// Reports a worker attempt's end to the worker, also when the attempt panicked or was
/// stopped (then with no signal), so that its slot is always given back.
struct Done {
    tx: tokio::sync::mpsc::UnboundedSender<(Signal, Duration)>,
    signal: Signal,
    /// When the attempt began: its duration tells the pace whether answers queue.
    started: Instant,
}

impl Drop for Done {
    fn drop(&mut self) {
        let _ = self.tx.send((self.signal, self.started.elapsed()));
    }
}

#[cfg(test)]
mod tests {
    use super::claim_at_least;

    #[test]
    fn claims_wait_for_a_quarter_of_the_slots_unless_idle() {
        assert_eq!(claim_at_least(32, 0, 100), 1);
        assert_eq!(claim_at_least(32, 31, 100), 8);
        assert_eq!(claim_at_least(4, 3, 100), 1);
        assert_eq!(claim_at_least(3, 2, 100), 1);
        assert_eq!(claim_at_least(64, 10, 5), 5);
    }
}
