//! Prometheus metrics with istiod's `citadel_server_*` names, so existing Istio dashboards
//! and alerts work unchanged. (istiod exports these counters without a `_total` suffix;
//! we keep its names rather than the Prometheus-client convention.)
//!
//! Hand-rolled on atomics: the request path only does relaxed increments.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::Ordering;
use std::sync::Mutex;

use crate::ca::Ca;

use super::instrument::BUCKETS;
pub use super::instrument::{Counter, Histogram};

/// The CA port's counters, under istiod's `citadel_server_*` names.
#[derive(Default)]
pub struct Metrics {
    /// Every CreateCertificate received (`citadel_server_csr_count`).
    pub csr_count: Counter,
    /// Requests whose authentication failed (`citadel_server_authentication_failure_count`).
    pub authentication_failure_count: Counter,
    /// Oversized or unparsable CSRs (`citadel_server_csr_parsing_err_count`).
    pub csr_parsing_err_count: Counter,
    /// Requests refused for their identity: another one asked for, or denied
    /// (`citadel_server_id_extraction_err_count`).
    pub id_extraction_err_count: Counter,
    /// Certificates issued (`citadel_server_success_cert_issuance_count`).
    pub success_cert_issuance_count: Counter,
    /// Requests refused unread because their peer failed authentication too often
    /// (`citadel_auth_throttled_total`).
    pub auth_throttled_count: Counter,
    sign_errors: Mutex<BTreeMap<&'static str, u64>>,
    /// CreateCertificate latency (`citadel_server_csr_latency_seconds`).
    pub latency: Histogram,
    /// Set with several replicas: whether this one leads.
    pub leader: std::sync::OnceLock<tokio::sync::watch::Receiver<bool>>,
    /// Node impersonation (ambient mode): grants, refusals and the pod index.
    pub impersonation: ImpersonationMetrics,
    /// The remote clusters (`--multicluster`), for `citadel_remote_clusters{state}` and the
    /// kubeconfig error counts; set when multicluster is on.
    pub remote_clusters: std::sync::OnceLock<std::sync::Arc<crate::auth::cluster::RemoteClusters>>,
    /// Connections on the CA port: refused, closed, open (`citadel_connections_*`).
    pub connections: std::sync::Arc<super::conn::ConnectionMetrics>,
    /// The plugged-in CA's reloads, for `citadel_ca_plugged_reload_total{result}`.
    pub plugged: std::sync::OnceLock<std::sync::Arc<crate::ca::reload::ReloadStats>>,
    /// Metrics of components above this layer (the Pod Certificates signer's in-memory
    /// requests), registered by the application: each appends its own exposition text.
    pub sources: Mutex<Vec<MetricSource>>,
    /// Other ClusterTrustBundles claiming the Pod Certificates signer name, as the leader
    /// last saw them (set when the ClusterTrustBundle is published).
    pub foreign_trust_bundles: std::sync::OnceLock<std::sync::Arc<std::sync::atomic::AtomicU64>>,
    /// JWT-SVIDs signed (`citadel_jwt_svid_issued_total`).
    pub jwt_svid_issued: Counter,
    /// JWT-SVID and JWT bundle calls refused, by gRPC code (`citadel_jwt_svid_refused_total`).
    jwt_svid_refused: Mutex<BTreeMap<&'static str, u64>>,
}

/// Appends one component's metrics to the exposition text.
pub type MetricSource = Box<dyn Fn(&mut String) + Send + Sync>;

/// Node impersonation's metrics (`citadel_impersonation_*`, `citadel_pod_index_*`): which
/// node accounts got certificates for others, and which check refused the rest.
#[derive(Default)]
pub struct ImpersonationMetrics {
    refusals: [Counter; crate::auth::node::Refusal::ALL.len()],
    /// Keyed by the node account (`ns/sa`): only listed accounts are ever granted, so the
    /// label's cardinality is bounded by `--trusted-node-accounts`.
    issued: Mutex<BTreeMap<String, u64>>,
    /// Requests refused Unavailable because the pod watch was broken too long.
    stale: Counter,
    /// The pod index, for its size and sync state; set when impersonation is configured.
    pub pods: std::sync::OnceLock<std::sync::Arc<crate::auth::pods::PodIndex>>,
}

impl ImpersonationMetrics {
    /// Counts a refusal under its check's label.
    pub fn refused(&self, reason: crate::auth::node::Refusal) {
        if let Some(i) = crate::auth::node::Refusal::ALL
            .iter()
            .position(|r| *r == reason)
        {
            self.refusals[i].inc();
        }
    }

    /// Counts a request refused (Unavailable) because the pod index was too stale to judge.
    pub fn refused_stale(&self) {
        self.stale.inc();
    }

    /// Counts a certificate issued to `node_account` for another workload.
    pub fn issued(&self, node_account: &str) {
        let mut m = self.issued.lock().unwrap_or_else(|e| e.into_inner());
        match m.get_mut(node_account) {
            Some(v) => *v += 1,
            None => {
                m.insert(node_account.to_string(), 1);
            }
        }
    }

    fn render(&self, out: &mut String) {
        let name = "citadel_impersonation_refusals";
        let _ = writeln!(out, "# HELP {name} Impersonation requests refused, by the check that failed (the caller only sees one vague message).\n# TYPE {name} counter");
        for (r, c) in crate::auth::node::Refusal::ALL.iter().zip(&self.refusals) {
            let _ = writeln!(out, "{name}{{reason=\"{}\"}} {}", r.label(), c.get());
        }
        let name = "citadel_impersonated_issuance_count";
        let _ = writeln!(out, "# HELP {name} Certificates issued to a node account for a workload on its node.\n# TYPE {name} counter");
        for (account, v) in self.issued.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = writeln!(out, "{name}{{node_account=\"{account}\"}} {v}");
        }
        let name = "citadel_impersonation_stale_refusals";
        let _ = writeln!(out, "# HELP {name} Impersonation requests answered Unavailable because the pod watch had been broken longer than --pod-index-max-staleness.\n# TYPE {name} counter\n{name} {}", self.stale.get());
        if let Some(p) = self.pods.get() {
            let _ = writeln!(out, "# HELP citadel_pod_index_stale_seconds Seconds since the pod watch broke without a relist since (0 while healthy).\n# TYPE citadel_pod_index_stale_seconds gauge\ncitadel_pod_index_stale_seconds {}", p.stale_for().map_or(0.0, |d| d.as_secs_f64()));
            let _ = writeln!(out, "# HELP citadel_pod_index_watch_healthy 1 while the pod watch runs (or has relisted since it last broke), 0 while it is broken.\n# TYPE citadel_pod_index_watch_healthy gauge\ncitadel_pod_index_watch_healthy {}", i32::from(p.stale_for().is_none()));
            let _ = writeln!(out, "# HELP citadel_pod_index_pods Pods (not Failed or Succeeded) in the node-impersonation index.\n# TYPE citadel_pod_index_pods gauge\ncitadel_pod_index_pods {}", p.len());
            let _ = writeln!(out, "# HELP citadel_pod_index_synced 1 once the pod watch has delivered its first complete list.\n# TYPE citadel_pod_index_synced gauge\ncitadel_pod_index_synced {}", i32::from(p.is_synced()));
        }
    }
}

impl Metrics {
    /// Counts a signing failure under a fixed label (never free text, to bound cardinality).
    pub fn sign_error(&self, kind: &'static str) {
        *self
            .sign_errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(kind)
            .or_default() += 1;
    }

    /// Counts a refused JWT-SVID (or JWT bundle) call under its gRPC code's name.
    pub fn jwt_svid_refused(&self, code: &'static str) {
        *self
            .jwt_svid_refused
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(code)
            .or_default() += 1;
    }

    /// The Prometheus text exposition of these counters and of `ca`'s signer (expiry, roots,
    /// rotation, CRLs).
    pub fn render(&self, ca: &Ca) -> String {
        let mut out = String::with_capacity(4096);
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        };
        counter(
            &mut out,
            "citadel_server_csr_count",
            "The number of CSRs received by the CA server.",
            self.csr_count.get(),
        );
        counter(
            &mut out,
            "citadel_audit_write_failures",
            "Log lines (audit lines included) that could not be written; while they fail, no certificate is handed out.",
            crate::audit::failures(),
        );
        counter(
            &mut out,
            "citadel_auth_throttled_total",
            "Requests refused without reading their credentials: their peer address failed authentication too often (--auth-failure-burst).",
            self.auth_throttled_count.get(),
        );
        counter(
            &mut out,
            "citadel_server_authentication_failure_count",
            "The number of authentication failures.",
            self.authentication_failure_count.get(),
        );
        counter(
            &mut out,
            "citadel_server_csr_parsing_err_count",
            "The number of errors occurred when parsing the CSR.",
            self.csr_parsing_err_count.get(),
        );
        counter(
            &mut out,
            "citadel_server_id_extraction_err_count",
            "The number of errors occurred when extracting or matching the identity.",
            self.id_extraction_err_count.get(),
        );
        counter(
            &mut out,
            "citadel_server_success_cert_issuance_count",
            "The number of certificates issued successfully.",
            self.success_cert_issuance_count.get(),
        );

        let _ = writeln!(out, "# HELP citadel_server_csr_sign_err_count The number of errors occurred when signing the CSR.\n# TYPE citadel_server_csr_sign_err_count counter");
        for (kind, v) in self
            .sign_errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "citadel_server_csr_sign_err_count{{error=\"{kind}\"}} {v}"
            );
        }

        counter(
            &mut out,
            "citadel_jwt_svid_issued_total",
            "JWT-SVIDs signed (citadel.v1.JwtSvidService/FetchJwtSvid).",
            self.jwt_svid_issued.get(),
        );
        let _ = writeln!(out, "# HELP citadel_jwt_svid_refused_total JWT-SVID service calls refused, by gRPC code.\n# TYPE citadel_jwt_svid_refused_total counter");
        for (code, v) in self
            .jwt_svid_refused
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(out, "citadel_jwt_svid_refused_total{{code=\"{code}\"}} {v}");
        }

        let name = "citadel_server_csr_latency_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} Time to handle a CreateCertificate request.\n# TYPE {name} histogram"
        );
        let mut cumulative = 0;
        for (i, b) in BUCKETS.iter().enumerate() {
            cumulative += self.latency.buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cumulative}");
        }
        let count = self.latency.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.latency.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {count}");

        if let Some(signer) = ca.current() {
            let gauge = |out: &mut String, name: &str, help: &str, v: i64| {
                let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
            };
            gauge(
                &mut out,
                "citadel_server_root_cert_expiry_timestamp",
                "Unix time the root anchoring the signing chain expires.",
                signer.anchor_root().not_after.unix_timestamp(),
            );
            gauge(
                &mut out,
                "citadel_server_cert_chain_expiry_timestamp",
                "Unix time the first CA in the signing chain expires.",
                signer.chain_not_after().unix_timestamp(),
            );
            gauge(
                &mut out,
                "citadel_server_trust_bundle_roots",
                "The number of roots in the trust bundle.",
                signer.roots_der().len() as i64,
            );
            gauge(
                &mut out,
                "citadel_ca_intermediate_expiry_timestamp",
                "Unix time the signing (intermediate) CA expires.",
                signer.signing_cert().not_after.unix_timestamp(),
            );
            gauge(
                &mut out,
                "citadel_ca_root_rotation_stage",
                "Root rotation stage: 0 none, 1 new root published, 2 new chain active.",
                signer.rotation_stage() as i64,
            );
            gauge(
                &mut out,
                "citadel_ca_crl_entries",
                "Revoked certificates listed in the CRLs.",
                signer.revocations().crl_entries as i64,
            );
            gauge(
                &mut out,
                "citadel_ca_revoked_identities",
                "Identities denied new certificates.",
                signer.revocations().denied_identities.len() as i64,
            );
            if let Some(due) = signer.rotation_due() {
                gauge(
                    &mut out,
                    "citadel_ca_root_rotation_next_stage_due_timestamp",
                    "Unix time the root rotation's next stage is due (present only during a rotation, once known).",
                    due,
                );
            }
            if let Some(next) = signer.revocations().crl_next_update {
                gauge(
                    &mut out,
                    "citadel_ca_crl_next_update_timestamp",
                    "Unix time the earliest CRL must be re-signed by.",
                    next,
                );
            }
        }
        if let Some((needed, left)) = ca.intermediate_needed() {
            let _ = writeln!(out, "# HELP citadel_ca_offline_intermediate_needed_seconds Offline root: seconds until a root-signed intermediate must be installed (the active one's activation point; negative: overdue). Present only while a request waits: `citadel ca intermediate-csr` prints it, docs/operations.md has the ceremony.\n# TYPE citadel_ca_offline_intermediate_needed_seconds gauge\ncitadel_ca_offline_intermediate_needed_seconds{{request=\"{}\"}} {left}", needed.request);
            if let Some(exp) = needed.signer_expires {
                let _ = writeln!(out, "# HELP citadel_ca_offline_signer_expiry_timestamp Offline root: unix time the current intermediate stops signing if no signed successor is installed.\n# TYPE citadel_ca_offline_signer_expiry_timestamp gauge\ncitadel_ca_offline_signer_expiry_timestamp {exp}");
            }
        }
        counter(
            &mut out,
            "citadel_ca_step_failures_total",
            "Scheduler passes that failed (rotation, CRL or revocation steps that could not be journaled); each is retried while the CA signs with what it has.",
            ca.step_failures(),
        );
        if let Some(p) = self.plugged.get() {
            use std::sync::atomic::Ordering::Relaxed;
            let _ = writeln!(out, "# HELP citadel_ca_plugged_reload_total Changes to the plugged-in CA material (cacerts Secret or --ca-certs-dir): installed, or refused (the previous CA kept signing; the log and a Warning Event say why).\n# TYPE citadel_ca_plugged_reload_total counter\ncitadel_ca_plugged_reload_total{{result=\"installed\"}} {}\ncitadel_ca_plugged_reload_total{{result=\"refused\"}} {}", p.installed.load(Relaxed), p.refused.load(Relaxed));
            let _ = writeln!(out, "# HELP citadel_ca_plugged_previous_roots_dropped_total Previous plugged-in roots dropped from the trust bundle once every certificate they signed had expired.\n# TYPE citadel_ca_plugged_previous_roots_dropped_total counter\ncitadel_ca_plugged_previous_roots_dropped_total {}", p.roots_dropped.load(Relaxed));
        }
        if let Some(f) = self.foreign_trust_bundles.get() {
            let _ = writeln!(out, "# HELP citadel_foreign_trust_bundles ClusterTrustBundles claiming citadel's signer name that citadel did not write (kubelet adds their roots to what pods trust; the log and a Warning Event name each). Kept by the leader.\n# TYPE citadel_foreign_trust_bundles gauge\ncitadel_foreign_trust_bundles {}", f.load(std::sync::atomic::Ordering::Relaxed));
        }
        if let Some(l) = self.leader.get() {
            let _ = writeln!(out, "# HELP citadel_leader 1 if this replica holds the leader lease.\n# TYPE citadel_leader gauge\ncitadel_leader {}", i32::from(*l.borrow()));
        }
        self.impersonation.render(&mut out);
        self.connections.render(&mut out);
        for source in self
            .sources
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            source(&mut out);
        }
        if let Some(r) = self.remote_clusters.get() {
            let (known, reachable) = r.counts();
            let _ = writeln!(out, "# HELP citadel_remote_clusters Remote clusters whose tokens are accepted (known), and of those, the ones whose API server answered its last probe (reachable).\n# TYPE citadel_remote_clusters gauge\ncitadel_remote_clusters{{state=\"known\"}} {known}\ncitadel_remote_clusters{{state=\"reachable\"}} {reachable}");
            let _ = writeln!(out, "# HELP citadel_remote_cluster_kubeconfigs_invalid Remote-cluster Secret keys whose kubeconfig is unusable right now (their cluster's tokens are refused).\n# TYPE citadel_remote_cluster_kubeconfigs_invalid gauge\ncitadel_remote_cluster_kubeconfigs_invalid {}", r.invalid.load(std::sync::atomic::Ordering::Relaxed));
            let _ = writeln!(out, "# HELP citadel_remote_cluster_id_conflicts Cluster ids that more than one remote-cluster Secret claims right now; none of them is trusted for that id (the log and a Warning Event on each Secret name them all).\n# TYPE citadel_remote_cluster_id_conflicts gauge\ncitadel_remote_cluster_id_conflicts {}", r.conflicts.load(std::sync::atomic::Ordering::Relaxed));
            let _ = writeln!(out, "# HELP citadel_remote_cluster_kubeconfig_errors Remote-cluster kubeconfigs that could not be loaded (each content counted once).\n# TYPE citadel_remote_cluster_kubeconfig_errors counter\ncitadel_remote_cluster_kubeconfig_errors {}", r.kubeconfig_errors.load(std::sync::atomic::Ordering::Relaxed));
        }
        let _ = writeln!(
            out,
            "# HELP citadel_build_info Build information.\n# TYPE citadel_build_info gauge\ncitadel_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn histogram_is_cumulative_and_counts() {
        let m = Metrics::default();
        m.latency.observe(Duration::from_micros(300));
        m.latency.observe(Duration::from_millis(3));
        m.latency.observe(Duration::from_secs(10));
        m.csr_count.inc();
        m.sign_error("ca_expired");
        let text = m.render(&Ca::default());
        assert!(text.contains("citadel_server_csr_latency_seconds_bucket{le=\"0.0005\"} 1\n"));
        assert!(text.contains("citadel_server_csr_latency_seconds_bucket{le=\"0.005\"} 2\n"));
        assert!(text.contains("citadel_server_csr_latency_seconds_bucket{le=\"+Inf\"} 3\n"));
        assert!(text.contains("citadel_server_csr_count 1\n"));
        assert!(text.contains("citadel_server_csr_sign_err_count{error=\"ca_expired\"} 1\n"));
    }
}
