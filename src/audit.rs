//! Whether audit lines reach their destination.
//!
//! Every certificate citadel hands out is announced by one `citadel::audit` log line. Like
//! Vault with no working audit device, citadel refuses to hand out a certificate whose audit
//! line could not be written (the caller gets Unavailable and retries), rather than sign in
//! silence; `citadel_audit_write_failures` counts the lines lost.
//!
//! The log writer (installed by the binary) reports each failed write here. Writes happen
//! synchronously on the thread that logs, so the issue path can ask, right after logging its
//! line, whether that very write failed on this thread.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};

thread_local! {
    static FAILED: Cell<bool> = const { Cell::new(false) };
}

static FAILURES: AtomicU64 = AtomicU64::new(0);

/// Called by the log writer when a write failed (disk full, closed pipe).
pub fn write_failed() {
    FAILED.with(|f| f.set(true));
    FAILURES.fetch_add(1, Ordering::Relaxed);
}

/// Clears this thread's flag; call just before logging the line to check.
pub fn begin() {
    FAILED.with(|f| f.set(false));
}

/// Whether a log write on this thread failed since [`begin`].
pub fn failed() -> bool {
    FAILED.with(|f| f.get())
}

/// Log lines lost since start (the metric).
pub fn failures() -> u64 {
    FAILURES.load(Ordering::Relaxed)
}
