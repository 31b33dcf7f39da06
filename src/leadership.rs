//! Whether this replica may write right now: the elector's verdict, bounded in time.
//!
//! A flag alone is not enough. A leader that is paused (SIGSTOP, a long GC-like stall, a
//! frozen VM) keeps its flag set while another replica takes the lease; when it resumes, any
//! task that runs before the elector's next renewal attempt would still see "leader". So every
//! successful renewal also sets a deadline on this replica's monotonic clock, shorter than the
//! lease itself, and [`Leadership::leading`] is false past it, whatever the flag says, until
//! the elector renews again. Compare-and-swap on the stored state stays the last line of
//! defence; this keeps a stale leader from even trying.

use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use tokio::time::Instant;

/// A reader: what the scheduler and the controllers consult before writing.
#[derive(Debug, Clone)]
pub struct Leadership {
    rx: watch::Receiver<bool>,
    valid_until: Arc<Mutex<Option<Instant>>>,
}

/// The elector's side.
#[derive(Debug)]
pub struct LeadershipWriter {
    tx: watch::Sender<bool>,
    valid_until: Arc<Mutex<Option<Instant>>>,
}

/// A new pair, not leading.
pub fn channel() -> (LeadershipWriter, Leadership) {
    let (tx, rx) = watch::channel(false);
    let valid_until = Arc::new(Mutex::new(None));
    (
        LeadershipWriter {
            tx,
            valid_until: valid_until.clone(),
        },
        Leadership { rx, valid_until },
    )
}

impl Leadership {
    /// True only while the elector says so AND its last renewal is still valid.
    pub fn leading(&self) -> bool {
        *self.rx.borrow()
            && self
                .valid_until
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_some_and(|u| Instant::now() < u)
    }

    /// The flag's changes, to wake a loop; check [`Leadership::leading`] before acting.
    pub fn changes(&self) -> watch::Receiver<bool> {
        self.rx.clone()
    }
}

impl LeadershipWriter {
    /// Another reader.
    pub fn subscribe(&self) -> Leadership {
        Leadership {
            rx: self.tx.subscribe(),
            valid_until: self.valid_until.clone(),
        }
    }

    /// Records a successful renewal: leading until `until` unless renewed again.
    pub fn renewed(&self, until: Instant) {
        *self.valid_until.lock().unwrap_or_else(|p| p.into_inner()) = Some(until);
    }

    /// Sets the flag; returns whether it changed.
    pub fn set(&self, leading: bool) -> bool {
        if !leading {
            *self.valid_until.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
        self.tx
            .send_if_modified(|v| std::mem::replace(v, leading) != leading)
    }

    /// The flag as last set.
    pub fn flag(&self) -> bool {
        *self.tx.borrow()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A paused leader's flag stays set, but it stops leading when its renewal runs out.
    #[tokio::test(start_paused = true)]
    async fn leading_ends_when_the_renewal_runs_out_whatever_the_flag() {
        let (w, r) = channel();
        assert!(!r.leading());
        w.set(true);
        assert!(!r.leading(), "no renewal yet");
        w.renewed(Instant::now() + Duration::from_secs(2));
        assert!(r.leading());
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(*r.changes().borrow(), "the flag is still set");
        assert!(!r.leading(), "but the renewal ran out");
        w.renewed(Instant::now() + Duration::from_secs(2));
        assert!(r.leading());
        w.set(false);
        assert!(!r.leading());
    }
}
