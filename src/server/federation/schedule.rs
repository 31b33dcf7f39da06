//! When to fetch a foreign bundle next: a pure function of the clock's `now` and what the
//! last attempts gave, so the schedule is tested with a `ManualClock` and no sleeping.
//!
//! After a success: at the bundle's `spiffe_refresh_hint` (5 minutes when absent, SPIFFE
//! Federation), never more often than [`MIN_INTERVAL`]. After a failure: back off from 1 s,
//! doubling, but never wait longer than the hint we would poll at anyway, so a broken
//! endpoint is retried at least as often as a working one is polled.

use std::time::Duration;

use time::OffsetDateTime;

use crate::pki::spiffe_bundle::DEFAULT_REFRESH_HINT;

/// A hint below this is raised to it (a peer asking for 0 would otherwise be hammered).
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);

/// What the fetcher knows about one peer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerState {
    /// The refresh hint of the bundle held (`None`: none held, or it had no hint).
    pub hint: Option<Duration>,
    /// When the last attempt ended; `None` before the first.
    pub last_attempt: Option<OffsetDateTime>,
    /// Failed attempts since the last success.
    pub failures: u32,
}

impl PeerState {
    /// The polling interval: the hint, or the default, at least [`MIN_INTERVAL`].
    pub fn interval(&self) -> Duration {
        self.hint.unwrap_or(DEFAULT_REFRESH_HINT).max(MIN_INTERVAL)
    }

    /// Records a success at `now` with the fetched bundle's hint.
    pub fn succeeded(&mut self, now: OffsetDateTime, hint: Option<Duration>) {
        self.hint = hint;
        self.last_attempt = Some(now);
        self.failures = 0;
    }

    /// Records a failure at `now` (the hint of the bundle still held stays).
    pub fn failed(&mut self, now: OffsetDateTime) {
        self.last_attempt = Some(now);
        self.failures = self.failures.saturating_add(1);
    }
}

/// When the next fetch is due.
pub fn next_fetch(state: &PeerState) -> Option<OffsetDateTime> {
    let last = state.last_attempt?;
    let wait = if state.failures == 0 {
        state.interval()
    } else {
        let backoff = Duration::from_secs(1u64 << (state.failures - 1).min(16));
        backoff.min(state.interval())
    };
    Some(crate::clock::checked_add(last, wait).unwrap_or(last))
}

/// How long to wait at `now` before fetching (zero when due, or never tried).
pub fn wait(state: &PeerState, now: OffsetDateTime) -> Duration {
    match next_fetch(state) {
        None => Duration::ZERO,
        Some(at) if at <= now => Duration::ZERO,
        Some(at) => (at - now).try_into().unwrap_or(Duration::ZERO),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{Clock, ManualClock};

    fn clock() -> ManualClock {
        ManualClock::new(OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap())
    }

    #[test]
    fn polls_at_the_hint_and_at_five_minutes_without_one() {
        let c = clock();
        let mut s = PeerState::default();
        assert_eq!(wait(&s, c.now()), Duration::ZERO, "first fetch at once");
        s.succeeded(c.now(), Some(Duration::from_secs(30)));
        assert_eq!(wait(&s, c.now()), Duration::from_secs(30));
        c.advance(time::Duration::seconds(29));
        assert_eq!(wait(&s, c.now()), Duration::from_secs(1));
        c.advance(time::Duration::seconds(1));
        assert_eq!(wait(&s, c.now()), Duration::ZERO);
        s.succeeded(c.now(), None);
        assert_eq!(wait(&s, c.now()), Duration::from_secs(300));
        s.succeeded(c.now(), Some(Duration::ZERO));
        assert_eq!(wait(&s, c.now()), MIN_INTERVAL);
    }

    #[test]
    fn failures_back_off_but_never_past_the_hint() {
        let c = clock();
        let mut s = PeerState::default();
        s.succeeded(c.now(), Some(Duration::from_secs(20)));
        let mut waits = vec![];
        for _ in 0..7 {
            s.failed(c.now());
            waits.push(wait(&s, c.now()).as_secs());
        }
        assert_eq!(waits, vec![1, 2, 4, 8, 16, 20, 20]);
        s.succeeded(c.now(), Some(Duration::from_secs(20)));
        assert_eq!(s.failures, 0);
        assert_eq!(wait(&s, c.now()), Duration::from_secs(20));
        // Many failures never overflow.
        for _ in 0..100 {
            s.failed(c.now());
        }
        assert_eq!(wait(&s, c.now()), Duration::from_secs(20));
    }
}
