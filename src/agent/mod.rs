//! The sidecar agent: fetches a workload certificate over Istio's CA protocol, renews it
//! ahead of expiry, and hands it to Envoy over SDS and/or to files.
//!
//! Shape (linkerd's `Credentials` idea): the renewal loop publishes [`Credentials`] on a
//! `tokio::sync::watch`; the file writer, the SDS server and the health endpoint subscribe.

pub mod crl;
pub mod fetch;
pub mod files;
pub mod http;
pub mod renew;
pub mod sds;

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use time::OffsetDateTime;
use tokio::sync::watch;

use crate::identity::SpiffeId;

/// What the agent currently serves. Immutable; a renewal or a CRL change makes a new one.
#[derive(Clone)]
pub struct Credentials {
    pub identity: SpiffeId,
    /// PKCS#8 PEM. Never logged.
    pub key_pem: String,
    /// Leaf then intermediates, PEM (`cert-chain.pem`).
    pub chain_pem: String,
    /// Trust bundle, PEM (`root-cert.pem`).
    pub roots_pem: String,
    /// CRLs, PEM (`ca-crl.pem`), when the agent is given a CRL file.
    pub crl_pem: Option<String>,
    pub serial_hex: String,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    /// Increases with every change; the SDS version.
    pub version: u64,
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

pub type CredentialsRx = watch::Receiver<Option<Arc<Credentials>>>;
pub type CredentialsTx = watch::Sender<Option<Arc<Credentials>>>;

/// Counters the agent reports on /metrics.
#[derive(Debug, Default)]
pub struct AgentStats {
    pub renewals_ok: AtomicU64,
    pub renewals_failed: AtomicU64,
    /// Consecutive failures since the last success.
    pub retries: AtomicU64,
    /// Unix time of the last attempt and its result (1 ok, 0 failed, -1 none yet).
    pub last_attempt: AtomicI64,
    pub last_result: AtomicI64,
    pub sds_streams: AtomicI64,
    pub sds_pushes: AtomicU64,
    pub sds_nacks: AtomicU64,
}

impl AgentStats {
    pub fn new() -> Arc<Self> {
        let s = Self::default();
        s.last_result.store(-1, Ordering::Relaxed);
        Arc::new(s)
    }
}
