//! Revoking a certificate by serial, and denying an identity (which also revokes its live
//! certificates). Both change only the journal; CRLs are re-signed in the same write.

use time::OffsetDateTime;

use super::{crl, CaError};
use crate::journal::{DeniedIdentity, Journal, Revocation};
use crate::store::index::IssuedEntry;

/// Why a revocation or denial changed nothing.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RevokeError {
    /// The serial is on a CRL already.
    #[error("serial {serial} is already revoked (since {at})")]
    AlreadyRevoked {
        /// The serial, lowercase hex.
        serial: String,
        /// When it was revoked, unix seconds.
        at: i64,
    },
    /// The identity is denied already.
    #[error("{identity} is already denied (since {since}); nothing changed")]
    AlreadyDenied {
        /// The SPIFFE ID.
        identity: String,
        /// When it was denied, unix seconds.
        since: i64,
    },
    /// The reason is not one of `crl::REASONS`.
    #[error("unknown reason {reason:?}; use one of: {}", crl::REASONS.join(", "))]
    Reason {
        /// The name given.
        reason: String,
    },
}

fn check_reason(reason: &str) -> Result<(), RevokeError> {
    crl::reason_code(reason)
        .map(|_| ())
        .ok_or_else(|| RevokeError::Reason {
            reason: reason.to_string(),
        })
}

fn add(j: &mut Journal, e: &IssuedEntry, reason: &str, now: i64) {
    if j.is_revoked(&e.serial).is_none() {
        push(j, e, reason, now);
    }
}

/// Appends the revocation of `e`; the caller has checked it is not revoked yet.
fn push(j: &mut Journal, e: &IssuedEntry, reason: &str, now: i64) {
    j.revocations.push(Revocation {
        serial: e.serial.clone(),
        issuer: e.issuer.clone(),
        identity: Some(e.identity.clone()),
        not_after: e.not_after,
        revoked_at: now,
        reason: reason.to_string(),
    });
}

fn resign(
    j: &mut Journal,
    issuers: impl IntoIterator<Item = String>,
    now: OffsetDateTime,
    validity: std::time::Duration,
) -> Result<(), CaError> {
    let mut issuers: Vec<String> = issuers.into_iter().collect();
    issuers.sort();
    issuers.dedup();
    issuers.retain(|i| j.get(i).is_some());
    for i in &issuers {
        // A CLI on a state directory whose intermediate key is in a PKCS#11 token cannot
        // sign with it: the revocation is journaled now, and the server holding the token
        // re-signs the CRL on its next pass (the planner sees its serials out of date).
        if j.get(i).is_some_and(|a| !super::keysource::reachable(a)) {
            tracing::info!(authority = %i, "this process cannot reach the PKCS#11 token holding this authority's key: its CRL is re-signed by the server's next scheduler pass");
            continue;
        }
        crl::sign(j, i, now, validity)?;
    }
    Ok(())
}

/// Revokes one certificate.
pub fn revoke_serial(
    j: &mut Journal,
    e: &IssuedEntry,
    reason: &str,
    now: OffsetDateTime,
    crl_validity: std::time::Duration,
) -> Result<(), CaError> {
    check_reason(reason).map_err(|e| CaError::Config(e.to_string()))?;
    if let Some(r) = j.is_revoked(&e.serial) {
        return Err(CaError::Config(
            RevokeError::AlreadyRevoked {
                serial: r.serial.clone(),
                at: r.revoked_at,
            }
            .to_string(),
        ));
    }
    add(j, e, reason, now.unix_timestamp());
    resign(j, [e.issuer.clone()], now, crl_validity)
}

/// Denies `identity` from now on and revokes its `live` certificates. Returns how many
/// certificates were newly revoked.
pub fn deny_identity(
    j: &mut Journal,
    identity: &str,
    live: &[IssuedEntry],
    reason: &str,
    now: OffsetDateTime,
    crl_validity: std::time::Duration,
) -> Result<usize, CaError> {
    check_reason(reason).map_err(|e| CaError::Config(e.to_string()))?;
    if let Some(d) = j.is_denied(identity) {
        return Err(CaError::Config(
            RevokeError::AlreadyDenied {
                identity: d.identity.clone(),
                since: d.since,
            }
            .to_string(),
        ));
    }
    j.denied.push(DeniedIdentity {
        identity: identity.to_string(),
        since: now.unix_timestamp(),
        reason: reason.to_string(),
        revocation: None,
    });
    revoke_denied(j, live, now, crl_validity)
}

/// Lifts the denial of `identity` (`citadel revoke --lift`): it may get certificates again.
/// The certificates the denial revoked stay on the CRL until they expire.
pub fn lift_identity(j: &mut Journal, identity: &str) -> Result<DeniedIdentity, String> {
    let i = j
        .denied
        .iter()
        .position(|d| d.identity == identity)
        .ok_or_else(|| format!("{identity} is not denied; nothing changed"))?;
    Ok(j.denied.remove(i))
}

/// When a denial has nothing left to cover and is dropped from the journal by itself (unix
/// seconds): once no certificate of the identity that was issued before it can still be valid.
///
/// A denial refuses new certificates and, for the ones issued before it, renewal by client
/// certificate even where no index knew them (so no CRL lists them). Those were issued at
/// the latest when the denial was written, for at most the longest leaf lifetime
/// (`max_leaf_ttl`, `--max-ttl`); a signer whose clock ran ahead by up to the skew margin
/// dated them that much later, and a replica that installed the denial late signed a few
/// more, each recorded with its notAfter when its sweep revoked it. So the denial ends at
/// the later of `since + max_leaf_ttl` and the last notAfter among the identity's revocations,
/// plus `skew_margin`: the same grace an intermediate gets before it is retired.
pub fn denial_ends_at(j: &Journal, d: &DeniedIdentity, p: &super::policy::RotationPolicy) -> i64 {
    let known = j
        .revocations
        .iter()
        .filter(|r| r.identity.as_deref() == Some(d.identity.as_str()))
        .map(|r| r.not_after)
        .max()
        .unwrap_or(i64::MIN);
    d.since
        .saturating_add(p.max_leaf_ttl.as_secs() as i64)
        .max(known)
        .saturating_add(p.skew_margin.as_secs() as i64)
}

/// Puts on the CRL every certificate in `live` whose identity the journal denies and that is
/// not revoked yet, with the denial's reason, and re-signs the CRLs of their issuers. Returns
/// how many were newly revoked.
///
/// A denial is written by one process (the CLI, a controller) while servers keep signing
/// until they load it; the certificates they sign in between are in their issuance index, and
/// each server runs this over its index once it has installed the denial, so none of them
/// stays valid.
pub fn revoke_denied(
    j: &mut Journal,
    live: &[IssuedEntry],
    now: OffsetDateTime,
    crl_validity: std::time::Duration,
) -> Result<usize, CaError> {
    let ts = now.unix_timestamp();
    let before = j.revocations.len();
    let mut issuers = Vec::new();
    // Looked up in hash sets, not with the journal's linear `is_denied`/`is_revoked`: with
    // 10,000 denials and 100,000 revocations, one scan per live entry made a sweep over the
    // denied identities' 20,000 live certificates take seconds (docs/benchmarks.md).
    let denied: std::collections::HashMap<String, String> = j
        .denied
        .iter()
        .map(|d| (d.identity.clone(), d.reason.clone()))
        .collect();
    let mut revoked: std::collections::HashSet<String> =
        j.revocations.iter().map(|r| r.serial.clone()).collect();
    for e in live.iter().filter(|e| e.not_after >= ts) {
        let Some(reason) = denied.get(&e.identity) else {
            continue;
        };
        if revoked.insert(e.serial.clone()) {
            push(j, e, reason, ts);
            issuers.push(e.issuer.clone());
        }
    }
    let newly = j.revocations.len() - before;
    if newly > 0 {
        resign(j, issuers, now, crl_validity)?;
    }
    Ok(newly)
}

/// Asks the scheduler to sweep the issuance index for denied identities again, now.
///
/// The issue path calls it when it finds, after signing, that the identity was denied in the
/// meantime: that certificate is not handed out, and the sweep puts it on the CRL anyway.
#[derive(Debug, Default)]
pub struct SweepRequest {
    pending: std::sync::atomic::AtomicBool,
    notify: tokio::sync::Notify,
}

impl SweepRequest {
    /// Asks for a sweep and wakes the scheduler.
    pub fn request(&self) {
        self.pending
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.notify.notify_one();
    }

    /// Whether a sweep was asked for since the last call.
    pub fn take(&self) -> bool {
        self.pending
            .swap(false, std::sync::atomic::Ordering::SeqCst)
    }

    /// Waits until a sweep is asked for.
    pub async fn requested(&self) {
        self.notify.notified().await
    }
}
