//! Wall-clock time, injected.
//!
//! Every decision that depends on "now" (TTLs, token expiry, serving-cert renewal, and later
//! rotation) asks a [`Clock`] instead of the OS, so tests can jump years without sleeping.
//! tokio's paused clock moves `Instant` but not `SystemTime`, which is why this exists.

use std::sync::{Arc, Mutex};
use time::OffsetDateTime;

/// A source of the current wall-clock time.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// The current wall-clock time, UTC.
    fn now(&self) -> OffsetDateTime;
}

/// The real clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    // The one place the wall clock is read (clippy.toml disallows it everywhere else).
    #[allow(clippy::disallowed_methods)]
    fn now(&self) -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }
}

/// A clock that only moves when told to. For tests and simulations.
#[derive(Debug, Clone)]
pub struct ManualClock {
    now: Arc<Mutex<OffsetDateTime>>,
}

impl ManualClock {
    /// A clock stopped at `start`.
    pub fn new(start: OffsetDateTime) -> Self {
        Self {
            now: Arc::new(Mutex::new(start)),
        }
    }

    /// Moves the clock forward (or backward, with a negative duration).
    pub fn advance(&self, by: time::Duration) {
        let mut now = self.now.lock().unwrap_or_else(|e| e.into_inner());
        *now += by;
    }

    /// Jumps the clock to `to`.
    pub fn set(&self, to: OffsetDateTime) {
        *self.now.lock().unwrap_or_else(|e| e.into_inner()) = to;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> OffsetDateTime {
        *self.now.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// `t + d`, or `None` when it would leave the representable range (a 3-million-day TTL):
/// `OffsetDateTime + Duration` panics instead.
pub fn checked_add(t: OffsetDateTime, d: std::time::Duration) -> Option<OffsetDateTime> {
    time::Duration::try_from(d)
        .ok()
        .and_then(|d| t.checked_add(d))
}

/// The shared handle the rest of the crate passes around.
pub type SharedClock = Arc<dyn Clock>;

/// The real clock, for entry points.
pub fn system() -> SharedClock {
    Arc::new(SystemClock)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_told() {
        let start = time::macros::datetime!(2030-01-01 0:00 UTC);
        let c = ManualClock::new(start);
        assert_eq!(c.now(), start);
        c.advance(time::Duration::days(3650));
        assert_eq!(c.now(), time::macros::datetime!(2039-12-30 0:00 UTC));
    }
}
