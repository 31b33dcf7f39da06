//! Waiting for something that happens in another task or process: one helper for the suite.
//! (Waiting on what citadel writes to the API server, conditions and Events, is `wait`, built
//! on `until` here.)

use std::time::{Duration, Instant};

/// Polls `check` every 50 ms until it returns true; panics naming `what` after `secs`.
/// Bounded real time, for things outside our clock (processes, the API server, Envoy).
/// Logic that runs on citadel's clock is tested by moving a `ManualClock` instead.
pub async fn eventually(what: &str, secs: u64, mut check: impl AsyncFnMut() -> bool) {
    until(what, secs, async || {
        if check().await {
            Ok(())
        } else {
            Err(String::new())
        }
    })
    .await
}

/// Polls `check` every 50 ms until it returns `Ok`, and returns that value. `Err` carries
/// what this poll saw instead; after `secs` it panics with `what` and the last of those, so
/// a timeout says what WAS there (the wrong status, another error, nothing at all) rather
/// than only what was not.
pub async fn until<T>(
    what: &str,
    secs: u64,
    mut check: impl AsyncFnMut() -> Result<T, String>,
) -> T {
    let t0 = Instant::now();
    loop {
        let seen = match check().await {
            Ok(v) => return v,
            Err(seen) => seen,
        };
        if t0.elapsed() >= Duration::from_secs(secs) {
            if seen.is_empty() {
                panic!("timed out after {secs}s waiting for: {what}");
            }
            panic!("timed out after {secs}s waiting for: {what}\nlast seen: {seen}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    #[should_panic(expected = "waiting for: five polls\nlast seen: poll 1")]
    async fn a_timeout_says_what_was_seen_last() {
        let mut n = 0;
        super::until("five polls", 0, async || {
            n += 1;
            if n >= 5 {
                Ok(())
            } else {
                Err(format!("poll {n}"))
            }
        })
        .await
    }

    #[tokio::test]
    async fn the_value_that_ended_the_wait_is_returned() {
        let mut n = 0;
        let got = super::until("three polls", 5, async || {
            n += 1;
            if n == 3 {
                Ok(n)
            } else {
                Err(String::new())
            }
        })
        .await;
        assert_eq!(got, 3);
    }
}
