//! Progress of long work — a source's initial snapshot, a restore from
//! snapshot files — for the log, the status page and the catalog API:
//! what is done, of how much when that is known, how fast, and how long is
//! left at that pace.
//!
//! Counting is an atomic add (a source counts every row it reads); the
//! log line comes at most every [`LOG_EVERY`], from whichever call crosses
//! it, and once more when the work ends.

use parking_lot::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// At most one progress log line this often per piece of work.
pub const LOG_EVERY: Duration = Duration::from_secs(5);
const UNKNOWN: u64 = u64::MAX;

/// One piece of long work, at most one at a time per owner.
#[derive(Debug, Default)]
pub struct Progress {
    work: Mutex<Option<Work>>,
    done: AtomicU64,
    total: AtomicU64,
    /// Milliseconds since `started` of the last log line.
    logged_ms: AtomicU64,
    /// Work is under way (one load, for callers on a hot path).
    active: std::sync::atomic::AtomicBool,
}

#[derive(Debug, Clone)]
struct Work {
    what: String,
    unit: &'static str,
    started: Instant,
}

/// Where a piece of work stands.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// What is being done, e.g. `initial snapshot of public.customers`.
    pub what: String,
    /// What is counted: `rows`, `bytes`.
    pub unit: &'static str,
    pub done: u64,
    /// How much there is in all, when known (an estimate for some sources).
    pub total: Option<u64>,
    pub elapsed: Duration,
    /// Units per second since the work started.
    pub per_second: f64,
    /// At that pace, how long is left (`total` known and not passed).
    pub left: Option<Duration>,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {} ", self.what, self.done)?;
        if let Some(t) = self.total {
            write!(f, "of {t} ")?;
        }
        write!(f, "{}, {:.0}/s", self.unit, self.per_second)?;
        if let Some(l) = self.left {
            write!(f, ", about {}s left", l.as_secs())?;
        }
        Ok(())
    }
}

impl Progress {
    /// Starts a piece of work (ending any earlier one).
    pub fn start(&self, what: impl Into<String>, unit: &'static str, total: Option<u64>) {
        let mut w = self.work.lock();
        self.done.store(0, Ordering::Relaxed);
        self.total
            .store(total.unwrap_or(UNKNOWN), Ordering::Relaxed);
        self.logged_ms.store(0, Ordering::Relaxed);
        *w = Some(Work {
            what: what.into(),
            unit,
            started: Instant::now(),
        });
        self.active.store(true, Ordering::Release);
    }

    /// Work is under way.
    pub fn active(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }

    /// The total is known now (or better known).
    pub fn set_total(&self, total: u64) {
        self.total.store(total, Ordering::Relaxed);
    }

    /// `n` more units done; logs where the work stands at most every
    /// [`LOG_EVERY`].
    pub fn advance(&self, n: u64) {
        let done = self.done.fetch_add(n, Ordering::Relaxed) + n;
        // The clock is looked at when the count crosses a multiple of 1024
        // (a source counts each row), or for a large step.
        let crossed = n >= 1024 || done % 1024 < n;
        if !crossed {
            return;
        }
        let Some(r) = self.report() else { return };
        let now_ms = r.elapsed.as_millis() as u64;
        let last = self.logged_ms.load(Ordering::Relaxed);
        if now_ms >= last + LOG_EVERY.as_millis() as u64
            && self
                .logged_ms
                .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::info!(
                done = r.done,
                total = r.total,
                per_second = r.per_second as u64,
                left_s = r.left.map(|l| l.as_secs()),
                "progress: {r}"
            );
        }
    }

    /// The work is done: one last line, and no more report.
    pub fn finish(&self) {
        if let Some(r) = self.report() {
            tracing::info!(
                done = r.done,
                elapsed_ms = r.elapsed.as_millis() as u64,
                per_second = r.per_second as u64,
                "done: {} {} {} in {:.1}s",
                r.what,
                r.done,
                r.unit,
                r.elapsed.as_secs_f64()
            );
        }
        self.abandon();
    }

    /// The work stopped unfinished (an error; it starts over): no report.
    pub fn abandon(&self) {
        *self.work.lock() = None;
        self.active.store(false, Ordering::Release);
    }

    /// Where the work stands, `None` when there is none.
    pub fn report(&self) -> Option<Report> {
        let w = self.work.lock().clone()?;
        let done = self.done.load(Ordering::Relaxed);
        let total = match self.total.load(Ordering::Relaxed) {
            UNKNOWN => None,
            t => Some(t),
        };
        let elapsed = w.started.elapsed();
        let secs = elapsed.as_secs_f64();
        let per_second = if secs > 0.0 { done as f64 / secs } else { 0.0 };
        let left = match total {
            Some(t) if t > done && per_second > 0.0 => {
                Some(Duration::from_secs_f64((t - done) as f64 / per_second))
            }
            // Nothing done yet: no pace to tell the time left by.
            Some(t) if t > done => None,
            Some(_) => Some(Duration::ZERO),
            None => None,
        };
        Some(Report {
            what: w.what,
            unit: w.unit,
            done,
            total,
            elapsed,
            per_second,
            left,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_what_is_done_of_how_much_and_what_is_left() {
        let p = Progress::default();
        assert_eq!(p.report(), None);
        p.start("initial snapshot of t", "rows", Some(1000));
        assert_eq!(p.report().unwrap().left, None, "no pace yet");
        std::thread::sleep(Duration::from_millis(20));
        for _ in 0..250 {
            p.advance(1);
        }
        let r = p.report().unwrap();
        assert_eq!((r.done, r.total, r.unit), (250, Some(1000), "rows"));
        assert!(r.per_second > 0.0);
        // 750 left at the pace of 250 in the time so far: about 3x it.
        let left = r.left.unwrap().as_secs_f64();
        assert!(left > r.elapsed.as_secs_f64() * 2.0, "{r}");
        assert!(
            r.to_string()
                .starts_with("initial snapshot of t: 250 of 1000 rows")
        );
        // More done than the estimate: nothing left, not negative.
        p.advance(2000);
        assert_eq!(p.report().unwrap().left, Some(Duration::ZERO));
        p.finish();
        assert_eq!(p.report(), None);
        // Without a total: no time left is claimed.
        p.start("restore", "bytes", None);
        p.advance(10);
        assert_eq!(p.report().unwrap().left, None);
    }
}
