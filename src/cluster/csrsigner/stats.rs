//! The CSR signer's `citadel_csr_*` metrics: certificates written, refusals by reason,
//! approvals, and the time from a CSR's creation to its answer.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds (seconds) of the creation-to-answer histogram: istiod gives up after 60 s.
const BUCKETS: [f64; 11] = [0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0];

/// What the CSR signer did, as `/metrics` shows it.
#[derive(Debug, Default)]
pub struct CsrStats {
    signed: AtomicU64,
    approved: AtomicU64,
    failed: Mutex<BTreeMap<&'static str, u64>>,
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_millis: AtomicU64,
}

impl CsrStats {
    /// One certificate written, `latency` after the CSR was created.
    pub fn signed(&self, latency: Duration) {
        self.signed.fetch_add(1, Ordering::Relaxed);
        self.observe(latency);
    }

    /// One `Failed` condition written, with its reason.
    pub fn failed(&self, reason: &'static str, latency: Duration) {
        *self
            .failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(reason)
            .or_default() += 1;
        self.observe(latency);
    }

    /// One CSR approved by `--csr-auto-approve`.
    pub fn approved(&self) {
        self.approved.fetch_add(1, Ordering::Relaxed);
    }

    fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|&b| secs <= b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_millis.fetch_add(
            d.as_millis().min(u64::MAX as u128) as u64,
            Ordering::Relaxed,
        );
    }

    /// Appends the metrics to a Prometheus text exposition.
    pub fn render(&self, out: &mut String) {
        let _ = writeln!(out, "# HELP citadel_csr_signed_total CertificateSigningRequests answered with a certificate.\n# TYPE citadel_csr_signed_total counter\ncitadel_csr_signed_total {}", self.signed.load(Ordering::Relaxed));
        let _ = writeln!(out, "# HELP citadel_csr_failed_total CertificateSigningRequests answered with a Failed condition, by reason.\n# TYPE citadel_csr_failed_total counter");
        for (reason, n) in self.failed.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = writeln!(out, "citadel_csr_failed_total{{reason=\"{reason}\"}} {n}");
        }
        let _ = writeln!(out, "# HELP citadel_csr_approved_total CertificateSigningRequests citadel approved itself (--csr-auto-approve).\n# TYPE citadel_csr_approved_total counter\ncitadel_csr_approved_total {}", self.approved.load(Ordering::Relaxed));
        let name = "citadel_csr_answer_seconds";
        let _ = writeln!(out, "# HELP {name} From a CertificateSigningRequest's creation (its creationTimestamp, whole seconds) to citadel's answer.\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (b, n) in BUCKETS.iter().zip(&self.buckets) {
            cumulative += n.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cumulative}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(
            out,
            "{name}_sum {}\n{name}_count {count}",
            self.sum_millis.load(Ordering::Relaxed) as f64 / 1000.0
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_latencies_render_as_prometheus_text() {
        let s = CsrStats::default();
        s.signed(Duration::from_millis(300));
        s.signed(Duration::from_secs(4));
        s.failed("RequesterNotAllowed", Duration::from_millis(100));
        s.approved();
        let mut out = String::new();
        s.render(&mut out);
        for line in [
            "citadel_csr_signed_total 2",
            "citadel_csr_failed_total{reason=\"RequesterNotAllowed\"} 1",
            "citadel_csr_approved_total 1",
            "citadel_csr_answer_seconds_bucket{le=\"0.25\"} 1",
            "citadel_csr_answer_seconds_bucket{le=\"0.5\"} 2",
            "citadel_csr_answer_seconds_bucket{le=\"5\"} 3",
            "citadel_csr_answer_seconds_bucket{le=\"+Inf\"} 3",
            "citadel_csr_answer_seconds_count 3",
            "citadel_csr_answer_seconds_sum 4.4",
        ] {
            assert!(out.lines().any(|l| l == line), "{line} missing in\n{out}");
        }
    }
}
