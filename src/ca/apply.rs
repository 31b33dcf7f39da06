//! Applying one planned action (or an operator's root rotation) to a journal in memory.
//! Nothing here writes anywhere: the scheduler or `ca::update` commits the result.

use std::time::Duration;

use time::OffsetDateTime;

use super::mint::{cross_sign, key_type_of, mint_intermediate, mint_root};
use super::plan::Action;
use super::policy::RotationPolicy;
use super::{crl, jwt, CaError};

/// Retired JWT keys kept in the journal as history (status output); older ones are dropped.
const RETIRED_JWT_KEYS_KEPT: usize = 4;
use crate::identity::TrustDomain;
use crate::journal::{Journal, Role, RootRotation, Status};
use crate::pki::KeyType;

/// Starts a root rotation: a new root and an intermediate under it, both prepared.
pub fn prepare_root_rotation(
    j: &mut Journal,
    now: OffsetDateTime,
    p: &RotationPolicy,
    trigger: &str,
    activate_after: Duration,
    retire_after: Duration,
) -> Result<(), CaError> {
    if let Some(r) = &j.root_rotation {
        return Err(CaError::Config(format!(
            "a root rotation is already in progress (stage {}, started {})",
            r.stage(),
            r.prepared_at
        )));
    }
    if j.offline_root {
        return Err(CaError::Config(
            "the root key of this CA is held offline: a root rotation is a ceremony (`citadel ca sign-intermediate --new-root-...`, then `citadel ca install-intermediate --new-root ... --cross-cert ...`; docs/operations.md, \"Offline root\")".into(),
        ));
    }
    super::keysource::ensure_can_mint(j)?;
    let td = TrustDomain::new(&j.trust_domain).map_err(|e| CaError::Config(e.to_string()))?;
    let old_root = j
        .active_root()
        .ok_or_else(|| CaError::Config("no active root".into()))?
        .clone();
    let old_int = j
        .active_signer()
        .ok_or_else(|| CaError::Config("no active intermediate".into()))?
        .clone();
    let kt = match p.new_key_type {
        Some(kt) => kt,
        None => key_type_of(&old_root)?,
    };
    let new_root = mint_root(&td, kt, now, p.root_ttl, Status::Prepared)?;
    let (mut new_int, key) = mint_intermediate(
        &td,
        kt,
        &new_root,
        now,
        p.intermediate_ttl,
        Status::Prepared,
        p.crl_distribution_url.as_deref(),
    )?;
    new_int.cross_cert_pem = Some(cross_sign(&td, &new_int, &key, &old_root, now)?);
    // An intermediate prepared under the old root would never be used now.
    for a in j.authorities.iter_mut() {
        if a.role == Role::Intermediate && a.status == Status::Prepared {
            a.status = Status::Retired;
            a.retired_at = Some(now.unix_timestamp());
        }
    }
    j.root_rotation = Some(RootRotation {
        old_root: old_root.id.clone(),
        old_intermediate: old_int.id.clone(),
        new_root: new_root.id.clone(),
        new_intermediate: new_int.id.clone(),
        trigger: trigger.to_string(),
        prepared_at: now.unix_timestamp(),
        bundle_published_at: None,
        activate_after_secs: activate_after.as_secs(),
        activated_at: None,
        retire_after_secs: retire_after.as_secs(),
        cross_withdrawn_at: None,
        old_root_grace_secs: p.leaf_grace() as u64,
    });
    j.authorities.push(new_root);
    j.authorities.push(new_int);
    Ok(())
}

fn set_status(j: &mut Journal, id: &str, status: Status, now: i64) {
    if let Some(a) = j.get_mut(id) {
        match status {
            Status::Active => a.activated_at = Some(now),
            Status::Retiring => a.deactivated_at = Some(now),
            Status::Retired => a.retired_at = Some(now),
            Status::Prepared => {}
        }
        a.status = status;
    }
}

/// Performs one action on the journal in memory.
pub fn apply(
    j: &mut Journal,
    action: &Action,
    now: OffsetDateTime,
    p: &RotationPolicy,
) -> Result<(), CaError> {
    let ts = now.unix_timestamp();
    let td = TrustDomain::new(&j.trust_domain).map_err(|e| CaError::Config(e.to_string()))?;
    match action {
        Action::PrepareIntermediate => {
            super::keysource::ensure_can_mint(j)?;
            let root = j
                .active_root()
                .ok_or_else(|| CaError::Config("no active root".into()))?
                .clone();
            // The policy's key type (a spec change applies to the next key), else the
            // predecessor's.
            let kt = match (p.new_key_type, j.active_signer()) {
                (Some(kt), _) => kt,
                (None, Some(a)) => key_type_of(a)?,
                (None, None) => key_type_of(&root)?,
            };
            let (rec, _) = mint_intermediate(
                &td,
                kt,
                &root,
                now,
                p.intermediate_ttl,
                Status::Prepared,
                p.crl_distribution_url.as_deref(),
            )?;
            j.authorities.push(rec);
        }
        Action::RequestIntermediate => {
            let kt = match j.active_signer().or_else(|| j.active_root()) {
                Some(a) => key_type_of(a)?,
                None => return Err(CaError::Config("no active authority".into())),
            };
            super::offline::request_intermediate(j, now, kt)?;
        }
        Action::ActivateIntermediate => {
            let next = j
                .find(Role::Intermediate, Status::Prepared)
                .map(|a| a.id.clone());
            let cur = j.active_signer().map(|a| a.id.clone());
            if let Some(next) = next {
                if let Some(cur) = cur {
                    set_status(j, &cur, Status::Retiring, ts);
                }
                set_status(j, &next, Status::Active, ts);
            }
        }
        Action::Retire { id } => set_status(j, id, Status::Retired, ts),
        Action::PrepareRootRotation => {
            prepare_root_rotation(j, now, p, "automatic", p.activate_after, p.max_leaf_ttl)?;
        }
        Action::ActivateRootRotation => {
            let r = j
                .root_rotation
                .clone()
                .ok_or_else(|| CaError::Config("no root rotation".into()))?;
            set_status(j, &r.old_intermediate, Status::Retiring, ts);
            set_status(j, &r.old_root, Status::Retiring, ts);
            set_status(j, &r.new_root, Status::Active, ts);
            set_status(j, &r.new_intermediate, Status::Active, ts);
            if let Some(rr) = j.root_rotation.as_mut() {
                rr.activated_at = Some(ts);
            }
        }
        Action::WithdrawCrossSigned => {
            let r = j
                .root_rotation
                .as_mut()
                .ok_or_else(|| CaError::Config("no root rotation".into()))?;
            r.cross_withdrawn_at = Some(ts);
            let id = r.new_intermediate.clone();
            if let Some(a) = j.get_mut(&id) {
                a.cross_cert_pem = None;
            }
        }
        Action::CompleteRootRotation => {
            let r = j
                .root_rotation
                .take()
                .ok_or_else(|| CaError::Config("no root rotation".into()))?;
            // Everything under the old root goes, including intermediates retiring from
            // before the rotation: their leaves have expired by now as well.
            let under_old: Vec<String> = j
                .authorities
                .iter()
                .filter(|a| {
                    a.issuer.as_deref() == Some(r.old_root.as_str()) && a.status != Status::Retired
                })
                .map(|a| a.id.clone())
                .collect();
            for id in under_old {
                set_status(j, &id, Status::Retired, ts);
            }
            set_status(j, &r.old_root, Status::Retired, ts);
        }
        Action::PruneRevocations => j.revocations.retain(|r| r.not_after >= ts),
        Action::ExpireDenials { identities } => {
            // Re-checked here: the journal may have changed since it was planned.
            let ended: Vec<bool> = j
                .denied
                .iter()
                .map(|d| {
                    identities.contains(&d.identity)
                        && ts >= super::revocation::denial_ends_at(j, d, p)
                })
                .collect();
            let mut ended = ended.into_iter();
            j.denied.retain(|_| !ended.next().unwrap_or(false));
        }
        Action::SignCrl { issuer } => crl::sign(j, issuer, now, p.crl_validity)?,
        Action::PrepareJwtKey => {
            // The CA key type decides the JWT algorithm (ES256, ES384, RS256). An RSA CA's
            // JWT keys are RSA-2048: RS256's usual size, for a key that lives a month, and
            // cheap to make on the scheduler's thread (RSA-4096 generation takes seconds).
            let kt = match j.active_signer().or_else(|| j.active_root()) {
                Some(a) => match key_type_of(a)? {
                    KeyType::Rsa3072 | KeyType::Rsa4096 => KeyType::Rsa2048,
                    kt => kt,
                },
                None => return Err(CaError::Config("no active authority".into())),
            };
            j.jwt_keys
                .push(jwt::mint_jwt_key(kt, now, p.jwt.key_ttl, Status::Prepared)?);
            j.jwt_bundle_sequence += 1;
        }
        Action::ActivateJwtKey => {
            // Re-checked here: only a key whose bundle was published may sign.
            let next = j
                .jwt_keys
                .iter()
                .position(|k| k.status == Status::Prepared && k.published_at.is_some());
            if let Some(next) = next {
                for k in j.jwt_keys.iter_mut().filter(|k| k.status == Status::Active) {
                    k.status = Status::Retiring;
                    k.deactivated_at = Some(ts);
                }
                let k = &mut j.jwt_keys[next];
                k.status = Status::Active;
                k.activated_at = Some(ts);
            }
        }
        Action::RetireJwtKey { kid } => {
            if let Some(k) = j.jwt_keys.iter_mut().find(|k| &k.kid == kid) {
                k.status = Status::Retired;
                k.retired_at = Some(ts);
                j.jwt_bundle_sequence += 1;
            }
            // Keep the last few retired keys as history; older ones only grow the journal.
            let retired = j
                .jwt_keys
                .iter()
                .filter(|k| k.status == Status::Retired)
                .count();
            let mut excess = retired.saturating_sub(RETIRED_JWT_KEYS_KEPT);
            j.jwt_keys.retain(|k| {
                let gone = excess > 0 && k.status == Status::Retired;
                excess -= usize::from(gone);
                !gone
            });
        }
    }
    // A retired authority's CRL is no longer published or re-signed; drop it so status and
    // the next-update gauge only speak of live CRLs.
    let live: std::collections::HashSet<String> = j
        .authorities
        .iter()
        .filter(|a| a.status != Status::Retired)
        .map(|a| a.id.clone())
        .collect();
    j.crls.retain(|c| live.contains(&c.issuer));
    Ok(())
}
