//! Waiting for something that happens in another task or process: one helper for the suite.

use std::time::{Duration, Instant};

/// Polls `check` every 50 ms until it returns true; panics naming `what` after `secs`.
/// Bounded real time, for things outside our clock (processes, the API server, Envoy).
/// Logic that runs on citadel's clock is tested by moving a `ManualClock` instead.
pub async fn eventually(what: &str, secs: u64, mut check: impl AsyncFnMut() -> bool) {
    let t0 = Instant::now();
    while !check().await {
        assert!(
            t0.elapsed() < Duration::from_secs(secs),
            "timed out after {secs}s waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
