//! Giving freed memory back to the system after a burst of work.
//!
//! mimalloc (the fabric's allocator, `src/main.rs`) returns the pages it
//! holds free a second after they empty, but only from inside its own calls
//! on the thread that owns them. A runtime thread that goes idle after a
//! burst (an initial load, a catch-up, a restore) therefore kept the
//! burst's freed pages resident: the benchmark saw about 900 MB resident
//! after loading 100,000 customers of 8 rows, against about 300 MB once
//! those pages were given back (BENCHMARKS.md, run 5).
//!
//! [`watch`] notices the end of a burst (the appliers stop moving) and asks
//! every runtime thread to collect once; [`on_thread_park`], the runtime's
//! park hook, does it when the thread next goes idle. While work flows
//! nothing is collected here: collecting on every park during a load made
//! it measurably slower (pages given back only to be faulted in again).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Bumped at the end of each burst; each thread collects once per bump.
static EPOCH: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static SEEN: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// The runtime's park hook: collect if a burst ended since this thread last did.
pub fn on_thread_park() {
    let epoch = EPOCH.load(Ordering::Relaxed);
    if SEEN.get() == epoch {
        return;
    }
    SEEN.set(epoch);
    collect();
}

/// Asks every runtime thread to give its freed pages back when next idle.
pub fn release_after_burst() {
    EPOCH.fetch_add(1, Ordering::Relaxed);
}

/// Gives this thread's freed pages back now (for measurements on a thread
/// that is no runtime thread).
pub fn collect_now() {
    collect();
}

fn collect() {
    // SAFETY: mi_collect takes no arguments to get wrong; it walks the
    // calling thread's own heap (and pages abandoned by finished threads)
    // and is safe to call at any point outside an allocation, as here. The
    // only unsafe code of the crate (Cargo.toml's lints say so).
    #[allow(unsafe_code)]
    unsafe {
        libmimalloc_sys::mi_collect(false);
    }
}

/// Calls [`release_after_burst`] whenever `progress` (a count that grows
/// while work is done, such as the records applied) stood still for one
/// `interval` after having moved. Runs until the runtime stops.
pub async fn watch(interval: Duration, progress: impl Fn() -> u64) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut bursts = Bursts::new(progress());
    loop {
        tick.tick().await;
        if bursts.ended(progress()) {
            release_after_burst();
        }
    }
}

/// Tells from successive readings of a progress count when a burst ends.
struct Bursts {
    last: u64,
    moved: bool,
}

impl Bursts {
    fn new(start: u64) -> Self {
        // Start-up (a restore) is a burst of its own.
        Bursts {
            last: start,
            moved: true,
        }
    }

    /// True at the first reading that stood still after the count moved.
    fn ended(&mut self, now: u64) -> bool {
        let ended = now == self.last && self.moved;
        self.moved = now != self.last;
        self.last = now;
        ended
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_ends_once_at_the_first_quiet_reading() {
        let mut b = Bursts::new(0);
        // Idle from the start: the start-up burst ends at the first reading.
        assert!(b.ended(0));
        assert!(!b.ended(0));
        // Work flows: nothing while it does.
        assert!(!b.ended(10));
        assert!(!b.ended(25));
        // It stops: once, and not again while it stays idle.
        assert!(b.ended(25));
        assert!(!b.ended(25));
        assert!(!b.ended(25));
    }

    #[test]
    fn a_thread_collects_once_per_release() {
        release_after_burst();
        on_thread_park();
        assert_eq!(SEEN.get(), EPOCH.load(Ordering::Relaxed));
        // Nothing new: the park hook does nothing (and does not move SEEN).
        on_thread_park();
        assert_eq!(SEEN.get(), EPOCH.load(Ordering::Relaxed));
    }
}
