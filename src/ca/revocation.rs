//! Revoking a certificate by serial, and denying an identity (which also revokes its live
//! certificates). Both change only the journal; CRLs are re-signed in the same write.

use time::OffsetDateTime;

use super::journal::{DeniedIdentity, Journal, Revocation};
use super::{crl, CaError};
use crate::store::index::IssuedEntry;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RevokeError {
    #[error("serial {serial} is already revoked (since {at})")]
    AlreadyRevoked { serial: String, at: i64 },
    #[error("{identity} is already denied (since {since}); nothing changed")]
    AlreadyDenied { identity: String, since: i64 },
    #[error("unknown reason {reason:?}; use one of: {}", crl::REASONS.join(", "))]
    Reason { reason: String },
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
        j.revocations.push(Revocation {
            serial: e.serial.clone(),
            issuer: e.issuer.clone(),
            identity: Some(e.identity.clone()),
            not_after: e.not_after,
            revoked_at: now,
            reason: reason.to_string(),
        });
    }
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
    let ts = now.unix_timestamp();
    j.denied.push(DeniedIdentity {
        identity: identity.to_string(),
        since: ts,
        reason: reason.to_string(),
    });
    let before = j.revocations.len();
    for e in live
        .iter()
        .filter(|e| e.identity == identity && e.not_after >= ts)
    {
        add(j, e, reason, ts);
    }
    let newly = j.revocations.len() - before;
    resign(j, live.iter().map(|e| e.issuer.clone()), now, crl_validity)?;
    Ok(newly)
}
