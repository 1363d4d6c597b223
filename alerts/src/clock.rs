//! Time as the engine sees it: the system clock in the server, a clock moved by
//! hand in tests, so that `for` and `keep_firing_for` are tested without sleeping.
//!
//! The clock dates state changes, notifications and retries. It does not pace
//! the scheduler, whose ticks are the runtime's.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use citytsdb_storage::units;

/// A source of the current time.
pub trait Clock: Send + Sync {
    /// Unix nanoseconds now.
    fn now_nanos(&self) -> i64;
}

/// The system's wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_nanos(&self) -> i64 {
        units::now_nanos()
    }
}

/// A clock that stands still until it is set or advanced.
#[derive(Debug, Default)]
pub struct ManualClock {
    now: AtomicI64,
}

impl ManualClock {
    /// A clock showing `now` (Unix nanoseconds).
    pub fn new(now: i64) -> Self {
        Self {
            now: AtomicI64::new(now),
        }
    }

    /// Shows `now` from here on.
    pub fn set(&self, now: i64) {
        self.now.store(now, Ordering::SeqCst);
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        let by = i64::try_from(by.as_nanos()).unwrap_or(i64::MAX);
        self.now
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |t| {
                Some(t.saturating_add(by))
            })
            .ok();
    }
}

impl Clock for ManualClock {
    fn now_nanos(&self) -> i64 {
        self.now.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_when_told() {
        let c = ManualClock::new(1_000);
        assert_eq!(c.now_nanos(), 1_000);
        c.advance(Duration::from_micros(2));
        assert_eq!(c.now_nanos(), 3_000);
        c.set(7);
        assert_eq!(c.now_nanos(), 7);
        assert!(SystemClock.now_nanos() > 1_700_000_000_000_000_000);
    }
}
