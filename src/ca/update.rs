//! One compare-and-swap loop over the stored journal, for every writer outside the
//! scheduler's own plan/apply pass: `citadel revoke`, `citadel ca rotate-root`, and the
//! scheduler's revocation sweep.
//!
//! The change is applied to a fresh copy of what is stored and written only if nobody wrote
//! in between; on a conflict it is re-applied to the newer journal. The CRLs derived from the
//! committed journal are published afterwards, so a crash in between is repaired by the next
//! publish (publishing is idempotent).

use super::{crl, CaError};
use crate::journal::Journal;
use crate::store::{Revision, Store, StoreError};

/// How many times a change is re-applied after conflicting writes before giving up.
const ATTEMPTS: u32 = 20;
/// Backoff after the first conflict; doubled each time up to [`MAX_BACKOFF`], with full
/// jitter, so a storm of writers (replicas, CLIs, controllers) spreads out instead of
/// re-colliding in lockstep. Twenty attempts cover about ten seconds of contention.
const FIRST_BACKOFF: std::time::Duration = std::time::Duration::from_millis(10);
const MAX_BACKOFF: std::time::Duration = std::time::Duration::from_millis(640);

/// A uniformly random duration in `[0, max)` (full jitter).
fn jitter(max: std::time::Duration) -> std::time::Duration {
    let mut b = [0u8; 8];
    let r = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
        .map(|()| u64::from_le_bytes(b))
        .unwrap_or(u64::MAX / 2);
    max.mul_f64(r as f64 / u64::MAX as f64)
}

/// Why an update did not happen.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    /// The store holds no journal (a plugged-in CA, or the wrong state directory).
    #[error("{0} holds no CA journal: this needs citadel's own CA (for a plugged-in CA, revoke upstream and update ca-crl.pem)")]
    NoJournal(String),
    /// The change itself refused (already revoked, wrong trust domain, ...).
    #[error("{0}")]
    Refused(String),
    /// Kept losing the compare-and-swap race; nothing was written.
    #[error("the CA journal kept changing; try again")]
    Contended,
    /// Reading or writing the store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The updated journal did not produce a valid signer or CRL.
    #[error(transparent)]
    Ca(#[from] CaError),
    /// Revocations would take the journal past the store's revocation ceiling
    /// ([`Store::revocation_ceiling`]); nothing was written.
    #[error(
        "the CA journal would be {bytes} bytes with this change, over the {ceiling} bytes \
             revocations may fill ({revocations} unexpired revocations, {denied} denied \
             identities; the rest is kept for rotation and CRLs); nothing was written. Delete \
             Revocations of identities that need no denial any more, or wait until revoked \
             certificates expire"
    )]
    JournalFull {
        /// The size the journal would have had.
        bytes: usize,
        /// The ceiling.
        ceiling: usize,
        /// Revocation records in the journal the change was refused on.
        revocations: usize,
        /// Denials in it.
        denied: usize,
    },
}

/// Refuses `j` if it is over `ceiling` bytes as stored (the store writes this same JSON).
pub fn check_ceiling(j: &Journal, ceiling: Option<usize>) -> Result<(), UpdateError> {
    let Some(ceiling) = ceiling else {
        return Ok(());
    };
    let bytes = serde_json::to_vec(j)
        .map_err(|e| UpdateError::Refused(format!("cannot encode the journal: {e}")))?
        .len();
    if bytes <= ceiling {
        return Ok(());
    }
    Err(UpdateError::JournalFull {
        bytes,
        ceiling,
        revocations: j.revocations.len(),
        denied: j.denied.len(),
    })
}

/// Applies `change` to the stored journal with compare-and-swap, retrying on conflicts, then
/// publishes the CRLs. Returns what `change` returned, the committed journal and its revision.
pub async fn update_journal<T>(
    store: &dyn Store,
    mut change: impl FnMut(&mut Journal) -> Result<T, String>,
) -> Result<(T, Journal, Revision), UpdateError> {
    let written = update(store, None, |j| change(j).map(Some)).await?;
    // `change` never answers "unchanged" here, so there always is a write.
    written.ok_or(UpdateError::Contended)
}

/// [`update_journal`] for a change that adds revocations or denials: refused with
/// [`UpdateError::JournalFull`] BEFORE writing when the result would pass the store's
/// [`Store::revocation_ceiling`], so revocations can never take the room rotation and CRL
/// re-signing need. `change` answers `None` when the journal already says what it wants:
/// then nothing is written and this returns `None`.
pub async fn update_revocations<T>(
    store: &dyn Store,
    change: impl FnMut(&mut Journal) -> Result<Option<T>, String>,
) -> Result<Option<(T, Journal, Revision)>, UpdateError> {
    update(store, store.revocation_ceiling(), change).await
}

/// The one compare-and-swap loop: `change` on a fresh copy, the ceiling checked, written.
/// `None` from `change` means nothing to write.
pub async fn update<T>(
    store: &dyn Store,
    ceiling: Option<usize>,
    mut change: impl FnMut(&mut Journal) -> Result<Option<T>, String>,
) -> Result<Option<(T, Journal, Revision)>, UpdateError> {
    for attempt in 0..ATTEMPTS {
        let cur = store
            .load_journal()
            .await?
            .ok_or_else(|| UpdateError::NoJournal(store.describe()))?;
        let mut j = cur.value.clone();
        let Some(out) = change(&mut j).map_err(UpdateError::Refused)? else {
            return Ok(None);
        };
        if let Err(e) = check_ceiling(&j, ceiling) {
            super::keysource::settle(&cur.value, &j, false);
            return Err(e);
        }
        match store.save_journal(&j, Some(&cur.revision)).await {
            Ok(rev) => {
                super::keysource::settle(&cur.value, &j, true);
                store.publish_crl(&crl::bundle(&j)).await?;
                return Ok(Some((out, j, rev)));
            }
            Err(StoreError::Conflict) => {
                super::keysource::settle(&cur.value, &j, false);
                let backoff = FIRST_BACKOFF
                    .saturating_mul(1 << attempt.min(10))
                    .min(MAX_BACKOFF);
                tokio::time::sleep(jitter(backoff)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(UpdateError::Contended)
}
