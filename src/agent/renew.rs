//! When to renew, and how to back off. Pure functions over times, so tests move time
//! instead of sleeping; the loop in `run` only sleeps for what they return.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;

use super::fetch::{fetch, FetchConfig};
use super::{AgentStats, Credentials, CredentialsTx};
use crate::clock::SharedClock;
use crate::shutdown::Shutdown;

/// When to renew and how to retry after a failure; the defaults follow istio-agent's renewal point.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RenewPolicy {
    /// Fraction of the certificate's life at which to renew (istio-agent: 0.5).
    pub at: f64,
    /// Plus or minus this fraction of the life, at random (istio-agent: 0.01).
    pub jitter: f64,
    /// Wait before the first retry after a failure; doubles per attempt (with jitter).
    pub retry_initial: Duration,
    /// The longest wait between retries.
    pub retry_max: Duration,
}

impl Default for RenewPolicy {
    fn default() -> Self {
        Self {
            at: 0.5,
            jitter: 0.01,
            retry_initial: Duration::from_secs(1),
            retry_max: Duration::from_secs(60),
        }
    }
}

/// When to renew a certificate valid until `not_after`, received at `received`.
/// `r` is uniform in [-1, 1].
///
/// The life is measured from when we received it, not from notBefore: CAs backdate
/// notBefore (citadel and istiod by 2 minutes), which for short TTLs would put "half-life"
/// in the past and renew in a loop.
pub fn renew_time(
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    received: OffsetDateTime,
    p: &RenewPolicy,
    r: f64,
) -> OffsetDateTime {
    let start = not_before.max(received);
    let life = (not_after - start).max(time::Duration::ZERO);
    let f = (p.at + p.jitter * r.clamp(-1.0, 1.0)).clamp(0.05, 0.95);
    (start + life * f).max(received + MIN_RENEW_INTERVAL)
}

/// Never renew more often than this, whatever the certificate says.
pub const MIN_RENEW_INTERVAL: time::Duration = time::Duration::seconds(1);

/// Exponential backoff with full jitter: attempt 1 waits ~initial, doubling up to max.
/// `r` is uniform in [0, 1].
pub fn backoff(attempt: u32, p: &RenewPolicy, r: f64) -> Duration {
    let exp = p
        .retry_initial
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(16));
    let capped = exp.min(p.retry_max);
    // Between half and all of it, so retries of many agents spread out.
    capped.mul_f64(0.5 + 0.5 * r.clamp(0.0, 1.0))
}

fn random_unit() -> f64 {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 8];
    let _ = ring::rand::SystemRandom::new().fill(&mut b);
    (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
}

/// Fetches at start, then renews on schedule; on failure retries with backoff while the
/// current certificate (if any) keeps being served. Returns after the first success when
/// `once`.
pub async fn run(
    cfg: FetchConfig,
    policy: RenewPolicy,
    clock: SharedClock,
    tx: CredentialsTx,
    stats: Arc<AgentStats>,
    once: bool,
    shutdown: Shutdown,
) -> Result<(), String> {
    let mut attempt: u32 = 0;
    loop {
        let now = clock.now();
        let current: Option<Arc<Credentials>> = tx.borrow().clone();
        let version = current.as_ref().map_or(1, |c| c.version + 1);
        stats
            .last_attempt
            .store(now.unix_timestamp(), Ordering::Relaxed);
        let wait = match fetch(&cfg, current.as_deref(), now, version).await {
            Ok(creds) => {
                attempt = 0;
                stats.retries.store(0, Ordering::Relaxed);
                stats.renewals_ok.fetch_add(1, Ordering::Relaxed);
                stats.last_result.store(1, Ordering::Relaxed);
                let next = renew_time(
                    creds.not_before,
                    creds.not_after,
                    now,
                    &policy,
                    random_unit() * 2.0 - 1.0,
                );
                tracing::info!(identity = %creds.identity, serial = %creds.serial_hex, not_after = %creds.not_after, renew_at = %next, "certificate obtained");
                // Version and CRL are taken from the value current *now*: the CRL follower may
                // have published a newer CRL (and version) while we were fetching.
                tx.send_modify(|cur| {
                    let mut next = creds;
                    if let Some(c) = cur.as_ref() {
                        next.version = c.version + 1;
                        next.crl_pem = c.crl_pem.clone();
                    }
                    *cur = Some(Arc::new(next));
                });
                if once {
                    return Ok(());
                }
                (next - clock.now()).try_into().unwrap_or(Duration::ZERO)
            }
            Err(e) => {
                attempt += 1;
                stats.retries.store(attempt as u64, Ordering::Relaxed);
                stats.renewals_failed.fetch_add(1, Ordering::Relaxed);
                stats.last_result.store(0, Ordering::Relaxed);
                let delay = backoff(attempt, &policy, random_unit());
                match &current {
                    Some(c) if c.not_after > now => tracing::warn!(
                        error = %e, attempt, retry_in = ?delay, serving = %c.serial_hex, expires = %c.not_after,
                        "CERTIFICATE RENEWAL FAILED; still serving the current certificate until it expires"
                    ),
                    Some(c) => {
                        tracing::error!(error = %e, attempt, retry_in = ?delay, expired = %c.not_after, "CERTIFICATE EXPIRED and renewal failed; Envoy has no valid certificate")
                    }
                    None => {
                        tracing::warn!(error = %e, attempt, retry_in = ?delay, "no certificate yet; retrying")
                    }
                }
                if once && !e.retryable() {
                    return Err(e.to_string());
                }
                delay
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.wait() => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renews_at_half_life_within_jitter() {
        let nb = time::macros::datetime!(2030-01-01 0:00 UTC);
        let na = nb + time::Duration::hours(24);
        let p = RenewPolicy::default();
        assert_eq!(
            renew_time(nb, na, nb, &p, 0.0),
            nb + time::Duration::hours(12)
        );
        let early = renew_time(nb, na, nb, &p, -1.0);
        let late = renew_time(nb, na, nb, &p, 1.0);
        assert_eq!(late - early, time::Duration::hours(24) * 0.02);
        assert!(early > nb + time::Duration::hours(11) && late < nb + time::Duration::hours(13));
    }

    #[test]
    fn backdated_short_certificates_do_not_renew_in_a_loop() {
        // Issued "now" for 20s, but notBefore backdated 2 minutes by the CA.
        let now = time::macros::datetime!(2030-01-01 12:00 UTC);
        let (nb, na) = (
            now - time::Duration::minutes(2),
            now + time::Duration::seconds(20),
        );
        let p = RenewPolicy {
            jitter: 0.0,
            ..Default::default()
        };
        assert_eq!(
            renew_time(nb, na, now, &p, 0.0),
            now + time::Duration::seconds(10),
            "half of what is left when received"
        );
        // Already expired on arrival (clock skew): still wait the minimum, never spin.
        let at = renew_time(
            nb,
            now - time::Duration::seconds(5),
            now,
            &RenewPolicy::default(),
            0.0,
        );
        assert_eq!(at, now + MIN_RENEW_INTERVAL);
    }

    #[test]
    fn backoff_grows_and_caps() {
        let p = RenewPolicy {
            retry_initial: Duration::from_millis(100),
            retry_max: Duration::from_secs(2),
            ..Default::default()
        };
        let full: Vec<_> = (1..=8).map(|a| backoff(a, &p, 1.0)).collect();
        assert_eq!(full[0], Duration::from_millis(100));
        assert_eq!(full[1], Duration::from_millis(200));
        assert_eq!(full[4], Duration::from_millis(1600));
        assert_eq!(full[7], Duration::from_secs(2), "capped");
        assert_eq!(
            backoff(3, &p, 0.0),
            Duration::from_millis(200),
            "jitter keeps at least half"
        );
        assert_eq!(
            backoff(u32::MAX, &p, 1.0),
            Duration::from_secs(2),
            "no overflow"
        );
    }
}
