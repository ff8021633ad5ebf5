//! Giving the heap back after a burst of connections ends.
//!
//! glibc's malloc keeps what freed connections leave in its arenas for reuse: after 10,000 idle
//! streams closed, the proxy stayed at ≈ 400 MB resident against 18 MB before them
//! (docs/BENCHMARKS.md, "Memory"). `malloc_trim(0)` returns the free pages of every arena to the
//! kernel; live allocations are untouched. It walks and locks each arena in turn (tens of ms after
//! thousands of streams), so it is called only when a burst has ended, not in steady state:
//! [`after_bursts`] watches the number of open connections (the listener's connection slots)
//! and trims once at least [`BURST`] connections have closed since the highest count seen, at
//! most half of that count is still open, and the count has stopped falling (so that one trim
//! follows a burst's whole close, not its first part).
//! Elsewhere than glibc this does nothing (musl and the other allocators give large blocks back
//! themselves, and have no such call).
//!
//! Written here because it is one libc call: no maintained crate wraps it.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;

/// Closed connections (from the highest count seen) that make a burst: at ≈ 40 KiB each, about
/// 10 MB held by the allocator.
const BURST: usize = 256;

/// How often the open count is looked at, and the least time between two trims.
const TICK: Duration = Duration::from_millis(250);
const MIN_GAP: Duration = Duration::from_millis(500);

/// Whether to trim, given the highest number of open connections since the last trim, the
/// number open one tick ago and the number open now.
fn burst_ended(high: usize, before: usize, open: usize) -> bool {
    high.saturating_sub(open) >= BURST
        && open <= high / 2
        && before.saturating_sub(open) < BURST / 4
}

/// Watches `slots` (a listener's connection slots, `cap` in all) and trims the allocator when a
/// burst of connections has ended. Runs until dropped.
pub(crate) async fn after_bursts(slots: Arc<Semaphore>, cap: usize) {
    watch(slots, cap, release).await
}

/// [`after_bursts`] with the trim given (a test counts its calls).
async fn watch(slots: Arc<Semaphore>, cap: usize, release: fn() -> bool) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let (mut high, mut before) = (0, 0);
    let mut last: Option<tokio::time::Instant> = None;
    loop {
        tick.tick().await;
        let open = cap.saturating_sub(slots.available_permits());
        high = high.max(open);
        let ended = burst_ended(high, before, open);
        before = open;
        if ended && last.is_none_or(|t| t.elapsed() >= MIN_GAP) {
            let started = std::time::Instant::now();
            let released = tokio::task::spawn_blocking(release).await.unwrap_or(false);
            tracing::debug!(
                closed = high - open,
                open,
                released,
                took_us = started.elapsed().as_micros() as u64,
                "a burst of connections ended: gave the allocator's free pages back"
            );
            high = open;
            last = Some(tokio::time::Instant::now());
        }
    }
}

/// `malloc_trim(0)`: whether glibc gave any memory back.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn release() -> bool {
    // SAFETY: `malloc_trim` takes no pointers and has no caller-side invariants; glibc locks
    // each arena while it trims it, as every other allocator call does.
    unsafe { libc::malloc_trim(0) == 1 }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_has_ended_when_enough_closed_at_most_half_remain_and_the_count_settled() {
        // Steady state, small churn, or a burst still half open: no trim.
        assert!(!burst_ended(0, 0, 0));
        assert!(!burst_ended(64, 0, 0), "fewer than BURST closed");
        assert!(
            !burst_ended(BURST * 4, BURST * 3, BURST * 3),
            "more than half still open"
        );
        assert!(!burst_ended(BURST * 2, BURST + 1, BURST + 1));
        // Still falling fast: wait for the rest of the close.
        assert!(!burst_ended(10_000, 2_000, 24));
        assert!(!burst_ended(BURST, BURST, 0));
        // Ended: a large burst gone, or the rest at half, and the count settled.
        assert!(burst_ended(BURST, 0, 0));
        assert!(burst_ended(10_000, 30, 24));
        assert!(burst_ended(BURST * 2, BURST, BURST));
        // Never underflows when the count rose since.
        assert!(!burst_ended(10, 5, 20));
    }

    static TRIMS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

    fn counted() -> bool {
        TRIMS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        true
    }

    fn trims() -> usize {
        TRIMS.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The watcher trims once after the open count falls from a burst's height, and not for a
    /// small churn (paused clock: the ticks are virtual; the trim runs on a blocking thread, so
    /// the test waits for its count, tick by tick, instead of a fixed time).
    #[tokio::test(start_paused = true)]
    async fn the_watcher_trims_once_after_a_burst_and_not_for_churn() {
        let cap = 10_000;
        let slots = Arc::new(Semaphore::new(cap));
        let watcher = tokio::spawn(watch(slots.clone(), cap, counted));
        let burst = slots
            .clone()
            .acquire_many_owned(BURST as u32 * 2)
            .await
            .expect("slots");
        tokio::time::sleep(TICK * 3).await;
        assert_eq!(trims(), 0, "no trim while the burst is open");
        drop(burst);
        for _ in 0..1_000 {
            if trims() == 1 {
                break;
            }
            tokio::time::sleep(TICK).await;
        }
        assert_eq!(trims(), 1, "one trim once the burst closed");
        // Churn below a burst's size, well past the minimum gap: no more trims.
        for _ in 0..5 {
            let few = slots.clone().acquire_many_owned(16).await.expect("slots");
            tokio::time::sleep(MIN_GAP).await;
            drop(few);
            tokio::time::sleep(MIN_GAP).await;
        }
        assert_eq!(trims(), 1, "small churn does not trim");
        watcher.abort();
    }
}
