//! The rotation planner: a pure function from (now, journal, policy) to the actions due, and
//! `apply`, which performs one action on a journal in memory. The scheduler persists the
//! result with compare-and-swap before anything uses it, so a crash between two actions
//! leaves a journal the next start continues from.
//!
//! Timeline (SPIRE's shape): the next intermediate is *prepared* at 1/2 of the active one's
//! life and *activated* at 5/6; the old one is *retired* once its last leaf has expired.
//! A root rotation is staged: prepare (new root joins the bundle), activate after a
//! propagation period (new chain signs; its intermediate is also cross-signed by the old
//! root), complete after the old chain's last leaf expired (old root leaves the bundle).

use std::time::Duration;

use rcgen::{Issuer, KeyPair};
use time::OffsetDateTime;

use super::crl;
use super::CaError;
use crate::identity::TrustDomain;
use crate::journal::{AuthorityRecord, Journal, Role, RootRotation, Secret, Status};
use crate::pki::{self, keys, profile, KeyType, PkiError, PublicKeyKind};

#[derive(Debug, Clone, PartialEq)]
pub struct RotationPolicy {
    pub root_ttl: Duration,
    pub intermediate_ttl: Duration,
    /// Fraction of the active intermediate's life at which the next one is prepared.
    pub prepare_at: f64,
    /// ... and at which it takes over.
    pub activate_at: f64,
    /// Fraction of the active root's life at which an automatic root rotation starts.
    pub root_rotate_at: f64,
    /// Propagation period between publishing a new root and signing with it.
    pub activate_after: Duration,
    /// The longest workload TTL: how long an old chain's leaves can outlive its deactivation.
    pub max_leaf_ttl: Duration,
    /// CRL validity (nextUpdate - thisUpdate); CRLs are re-signed at half of it.
    pub crl_validity: Duration,
    /// How long after notAfter a peer with a slow clock may still accept a leaf; every
    /// retirement waits this much longer than the last leaf's notAfter.
    pub skew_margin: Duration,
}

impl Default for RotationPolicy {
    fn default() -> Self {
        Self {
            root_ttl: Duration::from_secs(10 * 365 * 86_400),
            intermediate_ttl: Duration::from_secs(365 * 86_400),
            prepare_at: 0.5,
            activate_at: 5.0 / 6.0,
            root_rotate_at: 5.0 / 6.0,
            activate_after: Duration::from_secs(90 * 86_400),
            max_leaf_ttl: Duration::from_secs(90 * 86_400),
            crl_validity: Duration::from_secs(86_400),
            skew_margin: Duration::from_secs(120),
        }
    }
}

impl RotationPolicy {
    /// How long after an intermediate stops signing its last leaf may still be valid.
    fn leaf_grace(&self) -> i64 {
        (self.max_leaf_ttl + self.skew_margin).as_secs() as i64
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    PrepareIntermediate,
    ActivateIntermediate,
    Retire { id: String },
    PrepareRootRotation,
    ActivateRootRotation,
    WithdrawCrossSigned,
    CompleteRootRotation,
    PruneRevocations,
    SignCrl { issuer: String },
}

/// What is due at `now`. Pure: no I/O, no clock, no randomness.
pub fn plan(now: i64, j: &Journal, p: &RotationPolicy) -> Vec<Action> {
    let mut out = Vec::new();
    match &j.root_rotation {
        Some(r) => {
            if let (None, Some(published)) = (r.activated_at, r.bundle_published_at) {
                // Activate after the propagation period, but while the old intermediate
                // can still cover a full-length leaf: never let the signer run out.
                let mut due = published + r.activate_after_secs as i64;
                if let Some(old) = j.get(&r.old_intermediate) {
                    due = due.min(old.not_after - p.leaf_grace());
                }
                if now >= due {
                    out.push(Action::ActivateRootRotation);
                }
            }
            match (r.activated_at, r.cross_withdrawn_at) {
                (Some(at), None) if now >= at + r.retire_after_secs as i64 => {
                    out.push(Action::WithdrawCrossSigned);
                }
                (Some(_), Some(w)) if now >= w + r.old_root_grace_secs as i64 => {
                    out.push(Action::CompleteRootRotation);
                }
                _ => {}
            }
        }
        None => {
            if let Some(root) = j.active_root() {
                if root.age_fraction(now) >= p.root_rotate_at {
                    out.push(Action::PrepareRootRotation);
                }
            }
        }
    }
    // Intermediates rotate as usual, also once a root rotation has activated: the active
    // intermediate then lives under the new root, and letting it expire while the old root
    // is being retired would stop all signing. (Before activation the old intermediate keeps
    // signing, and activation is due before it runs out.) One that takes over while the
    // cross-signed certificate is still served is not cross-signed itself; only workloads
    // that missed the new bundle for that whole window are affected.
    let intermediates_may_rotate = j
        .root_rotation
        .as_ref()
        .is_none_or(|r| r.activated_at.is_some());
    let root_step_now = out.iter().any(|a| {
        matches!(
            a,
            Action::PrepareRootRotation | Action::ActivateRootRotation
        )
    });
    if intermediates_may_rotate && !root_step_now {
        if let Some(active) = j.active_signer() {
            let prepared = j.find(Role::Intermediate, Status::Prepared);
            let age = active.age_fraction(now);
            match prepared {
                None if age >= p.prepare_at => out.push(Action::PrepareIntermediate),
                Some(_) if age >= p.activate_at => out.push(Action::ActivateIntermediate),
                _ => {}
            }
        }
    }
    let in_rotation = |id: &str| {
        j.root_rotation
            .as_ref()
            .is_some_and(|r| r.old_intermediate == id)
    };
    for a in &j.authorities {
        if a.role == Role::Intermediate && a.status == Status::Retiring && !in_rotation(&a.id) {
            let last_leaf = a
                .deactivated_at
                .map_or(a.not_after, |d| (d + p.leaf_grace()).min(a.not_after));
            if now >= last_leaf {
                out.push(Action::Retire { id: a.id.clone() });
            }
        }
    }
    if j.revocations.iter().any(|r| r.not_after < now) {
        out.push(Action::PruneRevocations);
    }
    for a in j.authorities.iter().filter(|a| a.status != Status::Retired) {
        let want = crl::serials_for(j, &a.id);
        let due = match j.crls.iter().find(|c| c.issuer == a.id) {
            None => true,
            Some(c) => {
                // Re-sign at half the validity, counted from signing (thisUpdate is backdated).
                let signed = c.signed_at.max(c.this_update);
                c.serials != want || now >= signed + (c.next_update - signed) / 2
            }
        };
        if due {
            out.push(Action::SignCrl {
                issuer: a.id.clone(),
            });
        }
    }
    out
}

#[cfg(test)]
fn fraction_point(a: &AuthorityRecord, f: f64) -> i64 {
    let start = a.created_at.max(a.not_before);
    start + ((a.not_after - start) as f64 * f) as i64
}

fn key_of(a: &AuthorityRecord) -> Result<KeyPair, CaError> {
    keys::load_private_key_pem(a.key_pem.expose().as_bytes())
        .map_err(|e| CaError::Config(format!("authority {}: {e}", a.id)))
}

fn key_type_of(a: &AuthorityRecord) -> Result<KeyType, CaError> {
    Ok(match keys::key_pair_kind(&key_of(a)?)? {
        PublicKeyKind::EcP256 => KeyType::EcP256,
        PublicKeyKind::EcP384 => KeyType::EcP384,
        PublicKeyKind::Rsa { bits: 3072 } => KeyType::Rsa3072,
        PublicKeyKind::Rsa { bits: 4096 } => KeyType::Rsa4096,
        PublicKeyKind::Rsa { .. } => KeyType::Rsa2048,
    })
}

fn issuer_of(a: &AuthorityRecord) -> Result<Issuer<'static, KeyPair>, CaError> {
    Ok(Issuer::from_ca_cert_pem(&a.cert_pem, key_of(a)?).map_err(PkiError::from)?)
}

/// The journal entry for a freshly minted authority; its id is the certificate serial.
fn record(
    role: Role,
    status: Status,
    cert: &rcgen::Certificate,
    key: &KeyPair,
    issuer: Option<String>,
    params: &rcgen::CertificateParams,
    now: i64,
) -> AuthorityRecord {
    AuthorityRecord {
        id: params
            .serial_number
            .as_ref()
            .map(|s| hex::encode(s.to_bytes()))
            .unwrap_or_default(),
        role,
        status,
        cert_pem: cert.pem(),
        key_pem: Secret::new(key.serialize_pem()),
        issuer,
        created_at: now,
        activated_at: (status == Status::Active).then_some(now),
        retired_at: None,
        deactivated_at: None,
        not_after: params.not_after.unix_timestamp(),
        not_before: params.not_before.unix_timestamp(),
        cross_cert_pem: None,
    }
}

/// A new self-signed root.
pub fn mint_root(
    td: &TrustDomain,
    kt: KeyType,
    now: OffsetDateTime,
    ttl: Duration,
    status: Status,
) -> Result<AuthorityRecord, CaError> {
    let key = kt.generate()?;
    let serial = pki::random_serial();
    let not_after = crate::clock::checked_add(now, ttl)
        .ok_or_else(|| CaError::Config("the root lifetime is out of range".into()))?;
    let params = profile::root(td, &serial, now - profile::BACKDATE, not_after);
    let cert = params.self_signed(&key).map_err(PkiError::from)?;
    Ok(record(
        Role::Root,
        status,
        &cert,
        &key,
        None,
        &params,
        now.unix_timestamp(),
    ))
}

/// A new intermediate under `parent`, living `ttl` but never past the parent.
pub fn mint_intermediate(
    td: &TrustDomain,
    kt: KeyType,
    parent: &AuthorityRecord,
    now: OffsetDateTime,
    ttl: Duration,
    status: Status,
) -> Result<(AuthorityRecord, KeyPair), CaError> {
    let key = kt.generate()?;
    let serial = pki::random_serial();
    let not_after = crate::clock::checked_add(now, ttl)
        .ok_or_else(|| CaError::Config("the intermediate lifetime is out of range".into()))?
        .min(
            OffsetDateTime::from_unix_timestamp(parent.not_after)
                .map_err(|e| CaError::Config(e.to_string()))?,
        );
    let params = profile::intermediate(td, &serial, now - profile::BACKDATE, not_after);
    let cert = params
        .signed_by(&key, &issuer_of(parent)?)
        .map_err(PkiError::from)?;
    let rec = record(
        Role::Intermediate,
        status,
        &cert,
        &key,
        Some(parent.id.clone()),
        &params,
        now.unix_timestamp(),
    );
    Ok((rec, key))
}

/// Certifies `int`'s key and subject under `old_root` too (same serial space, new serial).
fn cross_sign(
    td: &TrustDomain,
    int: &AuthorityRecord,
    int_key: &KeyPair,
    old_root: &AuthorityRecord,
    now: OffsetDateTime,
) -> Result<String, CaError> {
    let serial = pki::random_serial();
    let not_after = OffsetDateTime::from_unix_timestamp(int.not_after.min(old_root.not_after))
        .map_err(|e| CaError::Config(e.to_string()))?;
    // Same subject (CN carries the intermediate's own id) so leaves chain through either.
    let int_serial = hex::decode(&int.id).unwrap_or_default();
    let mut params = profile::intermediate(td, &int_serial, now - profile::BACKDATE, not_after);
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
    Ok(params
        .signed_by(int_key, &issuer_of(old_root)?)
        .map_err(PkiError::from)?
        .pem())
}

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
    let td = TrustDomain::new(&j.trust_domain).map_err(|e| CaError::Config(e.to_string()))?;
    let old_root = j
        .active_root()
        .ok_or_else(|| CaError::Config("no active root".into()))?
        .clone();
    let old_int = j
        .active_signer()
        .ok_or_else(|| CaError::Config("no active intermediate".into()))?
        .clone();
    let kt = key_type_of(&old_root)?;
    let new_root = mint_root(&td, kt, now, p.root_ttl, Status::Prepared)?;
    let (mut new_int, key) = mint_intermediate(
        &td,
        kt,
        &new_root,
        now,
        p.intermediate_ttl,
        Status::Prepared,
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
            let root = j
                .active_root()
                .ok_or_else(|| CaError::Config("no active root".into()))?
                .clone();
            let kt = match j.active_signer() {
                Some(a) => key_type_of(a)?,
                None => key_type_of(&root)?,
            };
            let (rec, _) =
                mint_intermediate(&td, kt, &root, now, p.intermediate_ttl, Status::Prepared)?;
            j.authorities.push(rec);
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
        Action::SignCrl { issuer } => crl::sign(j, issuer, now, p.crl_validity)?,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::bootstrap::{new_journal, CaOptions};

    const DAY: i64 = 86_400;

    /// A fresh root and intermediate with the lifetimes `p` asks for.
    fn journal_for(p: &RotationPolicy, now: OffsetDateTime) -> Journal {
        let mut opts = CaOptions::new(TrustDomain::new("cluster.local").unwrap());
        opts.root_ttl = p.root_ttl;
        opts.intermediate_ttl = p.intermediate_ttl;
        new_journal(&opts, now).unwrap()
    }

    fn setup() -> (Journal, RotationPolicy, i64) {
        let p = RotationPolicy {
            root_ttl: Duration::from_secs(600 * DAY as u64),
            intermediate_ttl: Duration::from_secs(60 * DAY as u64),
            activate_after: Duration::from_secs(2 * DAY as u64),
            max_leaf_ttl: Duration::from_secs(DAY as u64),
            crl_validity: Duration::from_secs(30 * DAY as u64),
            ..RotationPolicy::default()
        };
        let now = time::macros::datetime!(2030-01-01 0:00 UTC);
        let mut j = journal_for(&p, now);
        for id in j
            .authorities
            .iter()
            .map(|a| a.id.clone())
            .collect::<Vec<_>>()
        {
            crl::sign(&mut j, &id, now, p.crl_validity).unwrap();
        }
        (j, p, now.unix_timestamp())
    }

    fn rotation_actions(j: &Journal, p: &RotationPolicy, t: i64) -> Vec<Action> {
        plan(t, j, p)
            .into_iter()
            .filter(|a| !matches!(a, Action::SignCrl { .. }))
            .collect()
    }

    #[test]
    fn intermediate_is_prepared_at_half_and_activated_at_five_sixths() {
        let (mut j, p, t0) = setup();
        let int = j.active_signer().unwrap().clone();
        let half = fraction_point(&int, 0.5);
        assert!(rotation_actions(&j, &p, half - 60).is_empty());
        assert_eq!(
            rotation_actions(&j, &p, half + 60),
            vec![Action::PrepareIntermediate]
        );
        let at = OffsetDateTime::from_unix_timestamp(half + 60).unwrap();
        apply(&mut j, &Action::PrepareIntermediate, at, &p).unwrap();
        let five_sixths = fraction_point(&int, 5.0 / 6.0);
        assert!(
            rotation_actions(&j, &p, five_sixths - 60).is_empty(),
            "prepared waits"
        );
        assert_eq!(
            rotation_actions(&j, &p, five_sixths + 1),
            vec![Action::ActivateIntermediate]
        );
        let at = OffsetDateTime::from_unix_timestamp(five_sixths + 1).unwrap();
        apply(&mut j, &Action::ActivateIntermediate, at, &p).unwrap();
        assert_ne!(j.active_signer().unwrap().id, int.id);
        assert_eq!(j.get(&int.id).unwrap().status, Status::Retiring);
        // Retired once its last possible leaf (max TTL + backdate) has expired.
        let last_leaf = five_sixths + 1 + DAY + 120;
        assert!(rotation_actions(&j, &p, last_leaf - 1).is_empty());
        assert_eq!(
            rotation_actions(&j, &p, last_leaf),
            vec![Action::Retire { id: int.id.clone() }]
        );
        assert!(t0 < half);
    }

    #[test]
    fn root_rotation_stages_wait_for_publication_and_propagation() {
        let (mut j, p, t0) = setup();
        let now = OffsetDateTime::from_unix_timestamp(t0 + DAY).unwrap();
        prepare_root_rotation(
            &mut j,
            now,
            &p,
            "operator",
            p.activate_after,
            p.max_leaf_ttl,
        )
        .unwrap();
        assert_eq!(
            j.trusted_roots().count(),
            2,
            "new root joins the bundle at once"
        );
        assert!(
            prepare_root_rotation(
                &mut j,
                now,
                &p,
                "operator",
                p.activate_after,
                p.max_leaf_ttl
            )
            .is_err(),
            "one at a time"
        );
        // Not published yet: nothing may activate, however long we wait.
        assert!(rotation_actions(&j, &p, t0 + 50 * DAY).is_empty());
        j.root_rotation.as_mut().unwrap().bundle_published_at = Some(t0 + DAY);
        assert!(rotation_actions(&j, &p, t0 + 3 * DAY - 1).is_empty());
        assert_eq!(
            rotation_actions(&j, &p, t0 + 3 * DAY),
            vec![Action::ActivateRootRotation]
        );
        apply(
            &mut j,
            &Action::ActivateRootRotation,
            OffsetDateTime::from_unix_timestamp(t0 + 3 * DAY).unwrap(),
            &p,
        )
        .unwrap();
        let r = j.root_rotation.clone().unwrap();
        assert_eq!(j.active_signer().unwrap().id, r.new_intermediate);
        assert!(j.active_signer().unwrap().cross_cert_pem.is_some());
        assert_eq!(
            j.trusted_roots().count(),
            2,
            "old root still trusted while its leaves live"
        );
        let at = |t| OffsetDateTime::from_unix_timestamp(t).unwrap();
        assert_eq!(
            rotation_actions(&j, &p, t0 + 4 * DAY),
            vec![Action::WithdrawCrossSigned]
        );
        apply(&mut j, &Action::WithdrawCrossSigned, at(t0 + 4 * DAY), &p).unwrap();
        assert!(j.active_signer().unwrap().cross_cert_pem.is_none());
        assert_eq!(
            j.trusted_roots().count(),
            2,
            "old root stays while cross-led chains live"
        );
        assert!(rotation_actions(&j, &p, t0 + 5 * DAY).is_empty());
        let done = t0 + 5 * DAY + 120;
        assert_eq!(
            rotation_actions(&j, &p, done),
            vec![Action::CompleteRootRotation]
        );
        apply(&mut j, &Action::CompleteRootRotation, at(done), &p).unwrap();
        assert!(j.root_rotation.is_none());
        assert_eq!(
            j.trusted_roots().map(|r| r.id.clone()).collect::<Vec<_>>(),
            vec![r.new_root]
        );
        assert!(j.active_signer().unwrap().cross_cert_pem.is_none());
    }

    #[test]
    fn crls_are_resigned_at_half_validity_and_when_revocations_change() {
        let (mut j, p, t0) = setup();
        assert!(plan(t0 + 14 * DAY, &j, &p)
            .iter()
            .all(|a| !matches!(a, Action::SignCrl { .. })));
        assert!(plan(t0 + 16 * DAY, &j, &p)
            .iter()
            .any(|a| matches!(a, Action::SignCrl { .. })));
        let int = j.active_signer().unwrap().id.clone();
        j.revocations.push(crate::journal::Revocation {
            serial: "ab".into(),
            issuer: int.clone(),
            identity: None,
            not_after: t0 + DAY,
            revoked_at: t0,
            reason: "unspecified".into(),
        });
        assert_eq!(plan(t0 + 60, &j, &p), vec![Action::SignCrl { issuer: int }]);
        assert!(plan(t0 + 2 * DAY, &j, &p).contains(&Action::PruneRevocations));
    }

    /// A 40-second intermediate (notBefore backdated 2 minutes) is not "75% old" at birth:
    /// nothing is due right after creation, and one rotation at a time happens later.
    #[test]
    fn backdating_does_not_age_short_intermediates() {
        let p = RotationPolicy {
            intermediate_ttl: Duration::from_secs(40),
            crl_validity: Duration::from_secs(3600),
            ..RotationPolicy::default()
        };
        let now = time::macros::datetime!(2030-01-01 0:00 UTC);
        let j = journal_for(&p, now);
        let t = now.unix_timestamp();
        let rot = |t| {
            plan(t, &j, &p)
                .into_iter()
                .filter(|a| !matches!(a, Action::SignCrl { .. }))
                .collect::<Vec<_>>()
        };
        assert!(rot(t + 1).is_empty());
        assert_eq!(rot(t + 21), vec![Action::PrepareIntermediate]);
    }

    #[test]
    fn a_fresh_short_crl_is_not_due_again_at_once() {
        let p = RotationPolicy {
            crl_validity: Duration::from_secs(60),
            ..RotationPolicy::default()
        };
        let now = time::macros::datetime!(2030-01-01 0:00 UTC);
        let mut j = journal_for(&p, now);
        for a in plan(now.unix_timestamp(), &j, &p) {
            apply(&mut j, &a, now, &p).unwrap();
        }
        let t = now.unix_timestamp();
        assert!(plan(t, &j, &p).is_empty(), "converged after one pass");
        assert!(plan(t + 29, &j, &p).is_empty());
        assert_eq!(plan(t + 30, &j, &p).len(), 2, "both CRLs at half of 60s");
    }

    /// A root rotation that outlasts the new intermediate (found on a real clock with 2-minute
    /// intermediates): the intermediate still rotates, under the new root, so signing never
    /// stops.
    #[test]
    fn intermediates_keep_rotating_under_the_new_root_during_a_long_rotation() {
        let p = RotationPolicy {
            intermediate_ttl: Duration::from_secs(120),
            max_leaf_ttl: Duration::from_secs(60),
            skew_margin: Duration::from_secs(10),
            crl_validity: Duration::from_secs(3600),
            ..RotationPolicy::default()
        };
        let start = time::macros::datetime!(2030-01-01 0:00 UTC);
        let mut j = journal_for(&p, start);
        prepare_root_rotation(
            &mut j,
            start,
            &p,
            "operator",
            Duration::from_secs(60),
            Duration::from_secs(60),
        )
        .unwrap();
        j.root_rotation.as_mut().unwrap().bundle_published_at = Some(start.unix_timestamp());
        for s in (0..400).step_by(5) {
            let now = start + time::Duration::seconds(s);
            for a in plan(now.unix_timestamp(), &j, &p) {
                apply(&mut j, &a, now, &p).unwrap();
            }
            let active = j.active_signer().expect("an active intermediate");
            assert!(
                active.not_after > now.unix_timestamp(),
                "the signer expired at t+{s}s"
            );
        }
        assert!(j.root_rotation.is_none(), "the rotation completed");
    }
}
