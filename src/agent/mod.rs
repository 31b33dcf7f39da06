//! The sidecar agent: fetches a workload certificate over Istio's CA protocol, renews it
//! ahead of expiry, and hands it to Envoy over SDS and/or to files.
//!
//! Shape (linkerd's `Credentials` idea): the renewal loop publishes [`Credentials`] on a
//! `tokio::sync::watch`; the file writer, the SDS server, the SPIFFE Workload API and the
//! health endpoint subscribe.

pub mod authority;
pub mod crl;
pub mod federation;
pub mod fetch;
pub mod files;
pub mod http;
pub mod jwt;
pub mod renew;
pub mod sds;
pub mod socket;
pub mod workload;

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use time::OffsetDateTime;
use tokio::sync::watch;

use crate::identity::SpiffeId;

/// What the agent currently serves. Immutable; a renewal or a CRL change makes a new one.
#[derive(Clone)]
pub struct Credentials {
    /// The SPIFFE ID the certificate carries.
    pub identity: SpiffeId,
    /// PKCS#8 PEM. Never logged.
    pub key_pem: String,
    /// Leaf then intermediates, PEM (`cert-chain.pem`).
    pub chain_pem: String,
    /// Trust bundle, PEM (`root-cert.pem`).
    pub roots_pem: String,
    /// CRLs, PEM (`ca-crl.pem`), when the agent is given a CRL file.
    pub crl_pem: Option<String>,
    /// The leaf's serial, lowercase hex.
    pub serial_hex: String,
    /// The leaf's notBefore.
    pub not_before: OffsetDateTime,
    /// The leaf's notAfter: renewal is planned from this and `not_before`.
    pub not_after: OffsetDateTime,
    /// Increases with every change; the SDS version.
    pub version: u64,
    /// The foreign trust domains' bundles (`agent::federation`), never merged with ours.
    pub federated: Arc<federation::Federated>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("identity", &self.identity.to_string())
            .field("serial", &self.serial_hex)
            .field("not_after", &self.not_after)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

/// The receiving side: `None` until the first fetch succeeds.
pub type CredentialsRx = watch::Receiver<Option<Arc<Credentials>>>;
/// The sending side, held by the renewal loop.
pub type CredentialsTx = watch::Sender<Option<Arc<Credentials>>>;

/// Counters the agent reports on /metrics.
#[derive(Debug, Default)]
pub struct AgentStats {
    /// Successful fetches (`citadel_agent_renewals_total`).
    pub renewals_ok: AtomicU64,
    /// Failed fetches (`citadel_agent_renewal_failures_total`).
    pub renewals_failed: AtomicU64,
    /// Consecutive failures since the last success.
    pub retries: AtomicU64,
    /// Unix time of the last attempt and its result (1 ok, 0 failed, -1 none yet).
    pub last_attempt: AtomicI64,
    /// Result of the last attempt: 1 ok, 0 failed, -1 none yet.
    pub last_result: AtomicI64,
    /// SDS streams currently open (a gauge).
    pub sds_streams: AtomicI64,
    /// Secrets pushed to Envoy over SDS.
    pub sds_pushes: AtomicU64,
    /// Responses Envoy rejected (NACKed).
    pub sds_nacks: AtomicU64,
    /// SDS calls refused by a limit (too many streams, too many or too long names).
    pub sds_refused: AtomicU64,
    /// Workload API streams currently open (a gauge).
    pub workload_streams: AtomicI64,
    /// Messages sent on Workload API streams.
    pub workload_pushes: AtomicU64,
    /// Workload API calls refused (header, caller, limits).
    pub workload_refused: AtomicU64,
}

impl AgentStats {
    /// Zeroed counters, with `last_result` at -1 (no attempt yet).
    pub fn new() -> Arc<Self> {
        let s = Self::default();
        s.last_result.store(-1, Ordering::Relaxed);
        Arc::new(s)
    }
}
