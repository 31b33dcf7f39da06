//! The certificate authority: the journal of authorities, the active signer (hot-swapped
//! while serving), TTL policy, and loading or creating CA material.
//!
//! Depends on `pki/`, `identity` and `store/`; knows nothing of gRPC.

pub mod apply;
pub mod backup;
pub mod bootstrap;
pub mod crl;
pub mod issue;
pub mod jwt;
pub mod jwtkeys;
pub mod keysource;
pub mod mint;
pub mod offline;
pub mod plan;
pub mod plugged;
pub mod policy;
pub mod reload;
pub mod revocation;
pub mod scheduler;
pub mod signer;
pub mod spiffe_bundle;
pub mod update;

#[cfg(test)]
mod key_seam_tests;

use std::sync::Arc;

use arc_swap::ArcSwapOption;
use tokio::sync::watch;

pub use signer::{Issued, SignError, Signer};

use crate::pki::PkiError;
use crate::store::StoreError;

/// Why CA material could not be loaded, created or changed.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// A plugged-in CA file is missing or wrong; names the file.
    #[error("{file}: {reason}")]
    Plugged {
        /// The file, as its source names it.
        file: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Reading or writing the store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A certificate or key is unusable.
    #[error("CA material is invalid: {0}")]
    Pki(#[from] PkiError),
    /// Anything else, explained in the message.
    #[error("{0}")]
    Config(String),
}

/// The live CA: the signer every request uses, swappable without a restart.
///
/// Readers take a cheap `Arc` snapshot per request (`ArcSwap`), so a swap never blocks
/// signing and an in-flight request finishes with the signer it started with.
#[derive(Debug)]
pub struct Ca {
    signer: ArcSwapOption<Signer>,
    /// The JWT-SVID key and bundle, installed beside the signer from the same journal.
    jwt: ArcSwapOption<jwtkeys::JwtKeys>,
    generation: watch::Sender<u64>,
    step_failures: std::sync::atomic::AtomicU64,
    /// Offline root: what the last scheduler pass found waiting for the root's signature,
    /// with the seconds left until its deadline at that pass's time.
    intermediate_needed: std::sync::Mutex<Option<(offline::SignatureNeeded, i64)>>,
}

impl Default for Ca {
    fn default() -> Self {
        Self {
            signer: ArcSwapOption::empty(),
            jwt: ArcSwapOption::empty(),
            generation: watch::channel(0).0,
            step_failures: Default::default(),
            intermediate_needed: Default::default(),
        }
    }
}

impl Ca {
    /// A CA with no signer yet: requests are Unavailable until [`Ca::install`].
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The current signer, or `None` while the CA is not ready.
    pub fn current(&self) -> Option<Arc<Signer>> {
        self.signer.load_full()
    }

    /// Makes `signer` the one new requests use, and tells subscribers.
    pub fn install(&self, signer: Signer) {
        self.signer.store(Some(Arc::new(signer)));
        self.generation.send_modify(|g| *g += 1);
    }

    /// The installed JWT-SVID state, or `None` when this CA has none (not loaded yet, or a
    /// plugged-in CA, which keeps no journal for JWT keys).
    pub fn jwt_current(&self) -> Option<Arc<jwtkeys::JwtKeys>> {
        self.jwt.load_full()
    }

    /// Makes `keys` the JWT key and bundle new requests use.
    pub fn install_jwt(&self, keys: jwtkeys::JwtKeys) {
        self.jwt.store(Some(Arc::new(keys)));
    }

    /// Counts a scheduler pass that failed (a step that could not be journaled, a store that
    /// could not be read); it is retried, and the CA signs with what it has meanwhile.
    pub fn note_step_failure(&self) {
        self.step_failures
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Scheduler passes that failed since start (`citadel_ca_step_failures_total`).
    pub fn step_failures(&self) -> u64 {
        self.step_failures
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Records what the scheduler's pass at its clock's `now` found waiting for an offline
    /// root's signature (`None`: nothing), for `citadel_ca_offline_intermediate_needed_seconds`.
    pub fn note_intermediate_needed(&self, needed: Option<offline::SignatureNeeded>, now: i64) {
        *self
            .intermediate_needed
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = needed.map(|n| {
            let left = n.deadline - now;
            (n, left)
        });
    }

    /// What [`Ca::note_intermediate_needed`] last recorded: the request and the seconds left
    /// until a signed intermediate is due (negative: overdue).
    pub fn intermediate_needed(&self) -> Option<(offline::SignatureNeeded, i64)> {
        self.intermediate_needed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Fires whenever a new signer (and so possibly a new trust bundle) is installed.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }
}
