//! The rotation planner: a pure function from (now, journal, policy) to the actions due.
//! `apply` (in `apply.rs`) performs them; the scheduler persists the result with
//! compare-and-swap before anything uses it, so a crash between two actions leaves a journal
//! the next start continues from.
//!
//! Timeline (SPIRE's shape): the next intermediate is *prepared* at 1/2 of the active one's
//! life and *activated* at 5/6; the old one is *retired* once its last leaf has expired.
//! A root rotation is staged: prepare (new root joins the bundle), activate after a
//! propagation period (new chain signs; its intermediate is also cross-signed by the old
//! root), complete after the old chain's last leaf expired (old root leaves the bundle).

use super::crl;
use super::policy::RotationPolicy;
use crate::journal::{Journal, Role, Status};

/// One change the planner finds due; `apply` performs it on the journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Mint the next intermediate under the active root, in status prepared.
    PrepareIntermediate,
    /// Offline root: make the next intermediate's key and record its CSR, for the root's
    /// signature in a ceremony (`ca::offline`).
    RequestIntermediate,
    /// The prepared intermediate starts signing; the active one starts retiring.
    ActivateIntermediate,
    /// Mark a retiring authority retired: its last leaf has expired.
    Retire {
        /// The authority's id.
        id: String,
    },
    /// Start an automatic root rotation: mint a new root and intermediate (prepared).
    PrepareRootRotation,
    /// The new chain starts signing; the old root and intermediate start retiring.
    ActivateRootRotation,
    /// Stop serving the cross-signed certificate of the new intermediate.
    WithdrawCrossSigned,
    /// The old root leaves the bundle; it and everything it issued are retired.
    CompleteRootRotation,
    /// Drop revocations whose certificates have expired.
    PruneRevocations,
    /// Drop the denials that have nothing left to cover
    /// ([`super::revocation::denial_ends_at`]): the identities may get certificates again.
    ExpireDenials {
        /// The identities whose denial ends.
        identities: Vec<String>,
    },
    /// (Re-)sign one authority's CRL: its list changed or half its validity passed.
    SignCrl {
        /// The id of the authority whose CRL is due.
        issuer: String,
    },
    /// Mint the next JWT-SVID signing key, prepared: it joins the JWT bundle at once, and
    /// the scheduler marks it published once that bundle was written.
    PrepareJwtKey,
    /// The published JWT key starts signing; the active one starts retiring.
    ActivateJwtKey,
    /// A retiring JWT key leaves the bundle: every token it signed has expired.
    RetireJwtKey {
        /// The key's `kid`.
        kid: String,
    },
}

/// What is due for the JWT-SVID keys at `now` (see [`crate::ca::policy::JwtKeyPolicy`]):
/// the first key is prepared at once and activates as soon as its bundle is published (no
/// relying party can hold an older bundle with keys in it); later keys are prepared at
/// `prepare_at` of the active key's life and activated at `activate_at`, but never before
/// their bundle has been published for `publish_lead` (a key an operator asked for,
/// `citadel ca rotate-jwt-key`, as soon as that lead has passed); a retiring key leaves the
/// bundle when
/// the longest JWT-SVID it may have signed (plus the skew margin) has expired.
fn plan_jwt(now: i64, j: &Journal, p: &RotationPolicy) -> Vec<Action> {
    let mut out = Vec::new();
    let jp = &p.jwt;
    match (j.active_jwt_key(), j.next_jwt_key()) {
        (None, None) => out.push(Action::PrepareJwtKey),
        (Some(a), None) if a.age_fraction(now) >= jp.prepare_at => out.push(Action::PrepareJwtKey),
        (None, Some(n)) if n.published_at.is_some() => out.push(Action::ActivateJwtKey),
        (Some(a), Some(n)) => {
            if let Some(published) = n.published_at {
                let due = a.age_fraction(now) >= jp.activate_at || n.requested;
                if due && now >= published + jp.publish_lead() {
                    out.push(Action::ActivateJwtKey);
                }
            }
        }
        _ => {}
    }
    for k in &j.jwt_keys {
        if k.status == Status::Retiring
            && now
                >= k.deactivated_at
                    .unwrap_or(now)
                    .saturating_add(p.jwt_grace())
        {
            out.push(Action::RetireJwtKey { kid: k.kid.clone() });
        }
    }
    out
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
        // An offline root's key is not here: its rotation is a ceremony
        // (`ca::offline::sign_root_rotation`), never automatic.
        None if j.offline_root => {}
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
                // Offline root: the request is made once; then only the ceremony can move
                // on (`ca::offline::signature_needed` raises the alarm), and nothing
                // activates without a signed intermediate: the current one keeps signing.
                None if age >= p.prepare_at
                    && j.offline_root
                    && j.intermediate_request.is_none() =>
                {
                    out.push(Action::RequestIntermediate)
                }
                None if age >= p.prepare_at && j.offline_root => {}
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
    out.extend(plan_jwt(now, j, p));
    if j.revocations.iter().any(|r| r.not_after < now) {
        out.push(Action::PruneRevocations);
    }
    let ended: Vec<String> = j
        .denied
        .iter()
        .filter(|d| now >= super::revocation::denial_ends_at(j, d, p))
        .map(|d| d.identity.clone())
        .collect();
    if !ended.is_empty() {
        out.push(Action::ExpireDenials { identities: ended });
    }
    // An offline root's CRL cannot be signed here (its key is not): only intermediates'.
    let key_here = |a: &&crate::journal::AuthorityRecord| !(j.offline_root && a.role == Role::Root);
    for a in j
        .authorities
        .iter()
        .filter(|a| a.status != Status::Retired)
        .filter(key_here)
    {
        let want = crl::serials_for(j, &a.id);
        let due = match j.crls.iter().find(|c| c.issuer == a.id) {
            None => true,
            Some(c) => {
                // Re-sign at half the validity, counted from signing (thisUpdate is backdated),
                // and at once when the policy's validity became shorter than this CRL's (a
                // live `crlValidity` change: a stale CRL must not stay acceptable for longer
                // than the operator now allows). A longer validity applies at the next one.
                let signed = c.signed_at.max(c.this_update);
                c.serials != want
                    || now >= signed + (c.next_update - signed) / 2
                    || c.next_update - signed > p.crl_validity.as_secs() as i64
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
mod tests {
    use super::*;
    use crate::ca::apply::{apply, prepare_root_rotation};
    use crate::identity::TrustDomain;
    use crate::journal::AuthorityRecord;
    use crate::pki::KeyType;
    use std::time::Duration;
    use time::OffsetDateTime;

    fn fraction_point(a: &AuthorityRecord, f: f64) -> i64 {
        let start = a.created_at.max(a.not_before);
        start + ((a.not_after - start) as f64 * f) as i64
    }
    use crate::ca::bootstrap::{new_journal, CaOptions};

    const DAY: i64 = 86_400;

    /// A fresh root and intermediate with the lifetimes `p` asks for.
    fn journal_for(p: &RotationPolicy, now: OffsetDateTime) -> Journal {
        let mut opts = CaOptions::new(TrustDomain::new("cluster.local").unwrap());
        opts.root_ttl = p.root_ttl;
        opts.intermediate_ttl = p.intermediate_ttl;
        let mut j = new_journal(&opts, now).unwrap();
        j.jwt_keys.push(
            crate::ca::jwt::mint_jwt_key(KeyType::EcP256, now, p.jwt.key_ttl, Status::Active)
                .unwrap(),
        );
        j
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
            .filter(|a| !matches!(a, Action::SignCrl { .. }) && !is_jwt(a))
            .collect()
    }

    fn is_jwt(a: &Action) -> bool {
        matches!(
            a,
            Action::PrepareJwtKey | Action::ActivateJwtKey | Action::RetireJwtKey { .. }
        )
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

    /// A live `caKeyType` change: the next intermediate (and the next root) get the policy's
    /// key type; without one they follow their predecessor's.
    #[test]
    fn the_next_intermediate_and_root_take_the_policys_key_type() {
        use crate::ca::mint::key_type_of;
        let (j0, p, t0) = setup();
        let at = OffsetDateTime::from_unix_timestamp(t0 + 60).unwrap();
        let prepared = |j: &Journal| {
            j.find(crate::journal::Role::Intermediate, Status::Prepared)
                .map(|a| key_type_of(a).unwrap())
        };
        let mut j = j0.clone();
        apply(&mut j, &Action::PrepareIntermediate, at, &p).unwrap();
        assert_eq!(prepared(&j), Some(KeyType::EcP256), "follows");
        let p384 = RotationPolicy {
            new_key_type: Some(KeyType::EcP384),
            ..p.clone()
        };
        let mut j = j0.clone();
        apply(&mut j, &Action::PrepareIntermediate, at, &p384).unwrap();
        assert_eq!(prepared(&j), Some(KeyType::EcP384));
        let mut j = j0.clone();
        prepare_root_rotation(&mut j, at, &p384, "test", Duration::ZERO, p.max_leaf_ttl).unwrap();
        let new_root = j.root_rotation.as_ref().unwrap().new_root.clone();
        let root = j.authorities.iter().find(|a| a.id == new_root).unwrap();
        assert_eq!(key_type_of(root).unwrap(), KeyType::EcP384);
    }

    /// A live `crlValidity` change: a shorter validity re-signs every CRL at once (with the
    /// new validity); a longer one waits for the usual half-life re-sign.
    #[test]
    fn a_shorter_crl_validity_resigns_at_once_and_a_longer_one_waits() {
        let (mut j, p, t0) = setup();
        let at = |t| OffsetDateTime::from_unix_timestamp(t).unwrap();
        let is_crl = |a: &Action| matches!(a, Action::SignCrl { .. });
        assert!(!plan(t0 + 60, &j, &p).iter().any(is_crl));
        let shorter = RotationPolicy {
            crl_validity: Duration::from_secs(3600),
            ..p.clone()
        };
        let due = plan(t0 + 60, &j, &shorter);
        let signs = due.iter().filter(|a| is_crl(a)).count();
        assert_eq!(signs, j.crls.len(), "every CRL: {due:?}");
        for a in due.iter().filter(|a| is_crl(a)) {
            apply(&mut j, a, at(t0 + 60), &shorter).unwrap();
        }
        for c in &j.crls {
            assert_eq!(c.next_update - c.signed_at, 3600);
        }
        // Signed with the new validity: not due again before its half-life.
        assert!(!plan(t0 + 120, &j, &shorter).iter().any(is_crl));
        let longer = RotationPolicy {
            crl_validity: Duration::from_secs(60 * DAY as u64),
            ..p.clone()
        };
        assert!(!plan(t0 + 120, &j, &longer).iter().any(is_crl));
    }

    /// Issue 20, M2: a denial is dropped once no certificate it covers can still be valid:
    /// `--max-ttl` after it was written, or the last notAfter of the identity's revoked
    /// certificates if later, plus the skew margin. Failed before: no action ever dropped one.
    #[test]
    fn denials_expire_once_nothing_they_cover_can_be_valid() {
        let (mut j, p, t0) = setup();
        let int = j.active_signer().unwrap().id.clone();
        let deny = |id: &str, since: i64| crate::journal::DeniedIdentity {
            identity: id.into(),
            since,
            reason: "unspecified".into(),
            revocation: Some("citadel/r".into()),
        };
        let (a, b) = ("spiffe://td/ns/a/sa/a", "spiffe://td/ns/a/sa/b");
        j.denied.push(deny(a, t0));
        j.denied.push(deny(b, t0));
        // b had a certificate signed late (a replica installed the denial late) that outlives
        // `since + max_leaf_ttl`.
        let ttl = p.max_leaf_ttl.as_secs() as i64;
        let skew = p.skew_margin.as_secs() as i64;
        j.revocations.push(crate::journal::Revocation {
            serial: "cd".into(),
            issuer: int,
            identity: Some(b.into()),
            not_after: t0 + ttl + 600,
            revoked_at: t0 + 600,
            reason: "unspecified".into(),
        });
        let expiring = |now: i64| {
            plan(now, &j, &p).into_iter().find_map(|a| match a {
                Action::ExpireDenials { identities } => Some(identities),
                _ => None,
            })
        };
        assert_eq!(expiring(t0 + ttl + skew - 1), None);
        assert_eq!(expiring(t0 + ttl + skew), Some(vec![a.to_string()]));
        assert_eq!(
            expiring(t0 + ttl + 600 + skew),
            Some(vec![a.to_string(), b.to_string()])
        );
        let at = |s: i64| time::OffsetDateTime::from_unix_timestamp(s).unwrap();
        let actions = plan(t0 + ttl + skew, &j, &p);
        for x in &actions {
            apply(&mut j, x, at(t0 + ttl + skew), &p).unwrap();
        }
        assert_eq!(
            j.denied
                .iter()
                .map(|d| d.identity.as_str())
                .collect::<Vec<_>>(),
            vec![b]
        );
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

    fn jwt_actions(j: &Journal, p: &RotationPolicy, t: i64) -> Vec<Action> {
        plan(t, j, p).into_iter().filter(is_jwt).collect()
    }

    /// What the scheduler does after a successful publication: every key in the bundle
    /// counts as published from then.
    fn publish(j: &mut Journal, t: i64) {
        for k in j.jwt_keys.iter_mut().filter(|k| k.in_bundle()) {
            k.published_at.get_or_insert(t);
        }
    }

    /// The JWT key schedule on a moved clock: prepared at 1/2 of the active key's life and
    /// in the bundle from then, activated at 5/6 only once published for 5 refresh hints,
    /// retired when its last token (max JWT-SVID TTL + skew) expired.
    #[test]
    fn jwt_keys_move_through_their_stages_on_the_clock() {
        let p = RotationPolicy {
            jwt: crate::ca::policy::JwtKeyPolicy {
                key_ttl: Duration::from_secs(60 * DAY as u64),
                refresh_hint: Duration::from_secs(3 * DAY as u64),
                ..Default::default()
            },
            ..RotationPolicy::default()
        };
        let clock = crate::clock::ManualClock::new(time::macros::datetime!(2030-01-01 0:00 UTC));
        use crate::clock::Clock;
        let t0 = clock.now().unix_timestamp();
        let mut j = journal_for(&p, clock.now());
        let first = j.active_jwt_key().unwrap().kid.clone();
        let step = |j: &mut Journal, clock: &crate::clock::ManualClock| {
            let now = clock.now();
            let actions = jwt_actions(j, &p, now.unix_timestamp());
            for a in &actions {
                apply(j, a, now, &p).unwrap();
            }
            actions
        };
        clock.set(time::OffsetDateTime::from_unix_timestamp(t0 + 30 * DAY - 60).unwrap());
        assert!(step(&mut j, &clock).is_empty(), "nothing before half-life");
        clock.advance(time::Duration::seconds(120));
        assert_eq!(step(&mut j, &clock), vec![Action::PrepareJwtKey]);
        let next = j.next_jwt_key().unwrap().clone();
        assert_eq!(next.stage(), "prepared");
        assert_eq!(j.jwt_bundle_sequence, 1, "the key set changed");
        // In the bundle at once, before it can sign.
        let jwks = crate::ca::jwt::render_jwks(&j, p.jwt.refresh_hint).unwrap();
        assert!(jwks.contains(&next.kid) && jwks.contains(&first));
        // Not published yet: never activated, however late.
        clock.set(time::OffsetDateTime::from_unix_timestamp(t0 + 59 * DAY).unwrap());
        assert!(
            step(&mut j, &clock).is_empty(),
            "unpublished keys never sign"
        );
        assert_eq!(j.active_jwt_key().unwrap().kid, first);
        // Published at day 45: 5/6 is day 50, but 5 hints of 3 days run to day 60.
        publish(&mut j, t0 + 45 * DAY);
        assert_eq!(j.next_jwt_key().unwrap().stage(), "published");
        assert!(
            step(&mut j, &clock).is_empty(),
            "published for less than the lead"
        );
        clock.set(time::OffsetDateTime::from_unix_timestamp(t0 + 60 * DAY).unwrap());
        assert_eq!(step(&mut j, &clock), vec![Action::ActivateJwtKey]);
        assert_eq!(j.active_jwt_key().unwrap().kid, next.kid);
        let old = j.jwt_keys.iter().find(|k| k.kid == first).unwrap();
        assert_eq!(old.stage(), "retiring");
        assert!(crate::ca::jwt::render_jwks(&j, p.jwt.refresh_hint)
            .unwrap()
            .contains(&first));
        // Retired when its longest token and the skew margin have passed.
        let grace = p.jwt_grace();
        clock.advance(time::Duration::seconds(grace - 1));
        // (The new key is at half its life by now: its own successor is prepared.)
        assert_eq!(step(&mut j, &clock), vec![Action::PrepareJwtKey]);
        clock.advance(time::Duration::seconds(1));
        assert_eq!(
            step(&mut j, &clock),
            vec![Action::RetireJwtKey { kid: first.clone() }]
        );
        assert_eq!(j.jwt_bundle_sequence, 3, "prepared, prepared, retired");
        assert!(!crate::ca::jwt::render_jwks(&j, p.jwt.refresh_hint)
            .unwrap()
            .contains(&first));
    }

    /// A journal from before JWT-SVIDs: the first key is prepared at once and activates
    /// as soon as it is published, without the lead (nobody holds an older bundle with keys).
    #[test]
    fn the_first_jwt_key_signs_once_published() {
        let p = RotationPolicy::default();
        let now = time::macros::datetime!(2030-01-01 0:00 UTC);
        let mut j = journal_for(&p, now);
        j.jwt_keys.clear();
        let t = now.unix_timestamp();
        assert_eq!(jwt_actions(&j, &p, t), vec![Action::PrepareJwtKey]);
        apply(&mut j, &Action::PrepareJwtKey, now, &p).unwrap();
        assert!(jwt_actions(&j, &p, t).is_empty(), "waits for publication");
        publish(&mut j, t);
        assert_eq!(jwt_actions(&j, &p, t), vec![Action::ActivateJwtKey]);
        apply(&mut j, &Action::ActivateJwtKey, now, &p).unwrap();
        assert!(j.active_jwt_key().is_some());
        assert!(jwt_actions(&j, &p, t).is_empty(), "converged");
    }

    /// The JWT key follows the CA key type: ES384 keys under a P-384 CA, RSA under RSA.
    #[test]
    fn jwt_keys_follow_the_ca_key_type() {
        let now = time::macros::datetime!(2030-01-01 0:00 UTC);
        for (kt, alg) in [
            (
                KeyType::EcP384,
                crate::pki::cakey::SignatureAlgorithm::EcdsaP384Sha384,
            ),
            (
                KeyType::Rsa2048,
                crate::pki::cakey::SignatureAlgorithm::RsaPkcs1Sha256,
            ),
        ] {
            let mut opts = CaOptions::new(TrustDomain::new("cluster.local").unwrap());
            opts.key_type = kt;
            let mut j = new_journal(&opts, now).unwrap();
            let p = RotationPolicy::default();
            apply(&mut j, &Action::PrepareJwtKey, now, &p).unwrap();
            let key = crate::ca::jwt::jwt_key_of(j.next_jwt_key().unwrap()).unwrap();
            assert_eq!(key.algorithm(), alg);
        }
    }

    /// `citadel ca rotate-jwt-key`: a requested key takes over as soon as its bundle has been
    /// published for the lead, long before 5/6 of the active key's life, never sooner.
    #[test]
    fn a_requested_jwt_key_takes_over_after_the_lead_only() {
        let p = RotationPolicy::default();
        let now = time::macros::datetime!(2030-01-01 0:00 UTC);
        let mut j = journal_for(&p, now);
        let t = now.unix_timestamp();
        apply(&mut j, &Action::PrepareJwtKey, now, &p).unwrap();
        j.jwt_keys.last_mut().unwrap().requested = true;
        assert!(jwt_actions(&j, &p, t + 86_400).is_empty(), "unpublished");
        publish(&mut j, t);
        let lead = p.jwt.publish_lead();
        assert!(jwt_actions(&j, &p, t + lead - 1).is_empty());
        assert_eq!(jwt_actions(&j, &p, t + lead), vec![Action::ActivateJwtKey]);
    }
}
