//! What a Revocation does to the journal, as pure functions over it: whether the journal
//! already says so ([`satisfied`]), the change itself ([`apply`]: the denial and this
//! replica's certificates, or the serial), and the journal's side of the status
//! ([`journal_view`]).

use std::time::Duration;

use super::{CrlVersion, RevocationReason, Target};
use crate::ca::{crl, revocation};
use crate::journal::{Journal, Status, ANY_INTERMEDIATE};
use crate::store::index::IssuedEntry;

/// Whether `j` already does everything `target` asks that this replica can do with `mine`
/// (its live index entries for the target): then nothing is written. A denial must also name
/// a Revocation as its holder (one written before denials could be lifted is adopted).
pub fn satisfied(j: &Journal, target: &Target, mine: &[IssuedEntry]) -> bool {
    let all_mine_revoked = mine.iter().all(|e| j.is_revoked(&e.serial).is_some());
    match target {
        Target::Identity(id) => {
            j.is_denied(id).is_some_and(|d| d.revocation.is_some()) && all_mine_revoked
        }
        Target::Serial(s) => j.is_revoked(s).is_some(),
    }
}

/// Applies `target` to the journal: the denial (held by Revocation `holder`,
/// `<namespace>/<name>`) plus this replica's live certificates of the identity, or the serial
/// (precisely if `mine` has it; once, for every unexpired intermediate's CRL, if `fallback`).
/// Returns how many certificates it newly put on a CRL, or `None` when it changed nothing
/// (already applied, or a serial this replica cannot place yet).
#[allow(clippy::too_many_arguments)]
pub fn apply(
    j: &mut Journal,
    target: &Target,
    reason: RevocationReason,
    mine: &[IssuedEntry],
    fallback: bool,
    now: time::OffsetDateTime,
    crl_validity: Duration,
    holder: &str,
) -> Result<Option<usize>, String> {
    let ts = now.unix_timestamp();
    match target {
        Target::Identity(id) => {
            let mut changed = false;
            match j.denied.iter_mut().find(|d| &d.identity == id) {
                None => {
                    j.denied.push(crate::journal::DeniedIdentity {
                        identity: id.clone(),
                        since: ts,
                        reason: reason.as_str().to_string(),
                        revocation: Some(holder.to_string()),
                    });
                    changed = true;
                }
                // Written before denials could be lifted: from now on this Revocation holds it.
                Some(d) if d.revocation.is_none() => {
                    d.revocation = Some(holder.to_string());
                    changed = true;
                }
                Some(_) => {}
            }
            let n =
                revocation::revoke_denied(j, mine, now, crl_validity).map_err(|e| e.to_string())?;
            Ok((changed || n > 0).then_some(n))
        }
        Target::Serial(s) => {
            if j.is_revoked(s).is_some() {
                return Ok(None);
            }
            if let Some(e) = mine.iter().find(|e| &e.serial == s) {
                revocation::revoke_serial(j, e, reason.as_str(), now, crl_validity)
                    .map_err(|e| e.to_string())?;
                return Ok(Some(1));
            }
            if !fallback {
                return Ok(None);
            }
            // Nobody's index knows it: recorded ONCE, for every intermediate that may still
            // have issued it (`Revocation::listed_by`), and kept until the last of them expires.
            let record = crate::journal::Revocation {
                serial: s.clone(),
                issuer: ANY_INTERMEDIATE.to_string(),
                identity: None,
                not_after: 0,
                revoked_at: ts,
                reason: reason.as_str().to_string(),
            };
            let issuers: Vec<(String, i64)> = j
                .authorities
                .iter()
                .filter(|a| a.status != Status::Retired && record.listed_by(a))
                .map(|a| (a.id.clone(), a.not_after))
                .collect();
            let Some(last) = issuers.iter().map(|(_, n)| *n).max() else {
                return Err("no unexpired intermediate to list the serial on".into());
            };
            j.revocations.push(crate::journal::Revocation {
                not_after: last,
                ..record
            });
            for (issuer, _) in &issuers {
                crl::sign(j, issuer, now, crl_validity).map_err(|e| e.to_string())?;
            }
            Ok(Some(1))
        }
    }
}

/// The journal's side of the status: when it was applied, how many certificates are on a CRL
/// because of it, and which current CRLs list them. `None` if the journal does not carry it.
pub fn journal_view(j: &Journal, target: &Target) -> Option<(i64, u64, Vec<CrlVersion>)> {
    let (applied_at, revoked): (i64, Vec<&crate::journal::Revocation>) = match target {
        Target::Identity(id) => {
            let d = j.is_denied(id)?;
            let r: Vec<_> = j
                .revocations
                .iter()
                .filter(|r| r.identity.as_deref() == Some(id.as_str()))
                .collect();
            (d.since, r)
        }
        Target::Serial(s) => {
            let r: Vec<_> = j.revocations.iter().filter(|r| &r.serial == s).collect();
            (r.iter().map(|r| r.revoked_at).min()?, r)
        }
    };
    let mut serials: Vec<&str> = revoked.iter().map(|r| r.serial.as_str()).collect();
    serials.sort();
    serials.dedup();
    let mut crls: Vec<CrlVersion> = j
        .crls
        .iter()
        .filter(|c| {
            j.get(&c.issuer)
                .is_some_and(|a| revoked.iter().any(|r| r.listed_by(a)))
        })
        .map(|c| CrlVersion {
            issuer: c.issuer.clone(),
            number: c.number,
        })
        .collect();
    crls.sort_by(|a, b| a.issuer.cmp(&b.issuer));
    Some((applied_at, serials.len() as u64, crls))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca() -> (Journal, time::OffsetDateTime) {
        let now = time::OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        let opts = crate::ca::bootstrap::CaOptions::new(
            crate::identity::TrustDomain::new("cluster.local").unwrap(),
        );
        (crate::ca::bootstrap::new_journal(&opts, now).unwrap(), now)
    }

    /// Issue 20, M2: a serial nobody's index knows is one journal record, listed on the CRL
    /// of every intermediate that could have issued it (not one record per intermediate),
    /// and not on the CRL of an intermediate made after it was revoked.
    #[test]
    fn an_unknown_serial_is_recorded_once_for_every_intermediate() {
        let (mut j, now) = ca();
        let p = crate::ca::policy::RotationPolicy::default();
        crate::ca::apply::apply(
            &mut j,
            &crate::ca::plan::Action::PrepareIntermediate,
            now,
            &p,
        )
        .unwrap();
        let ints: Vec<String> = j
            .authorities
            .iter()
            .filter(|a| a.role == crate::journal::Role::Intermediate)
            .map(|a| a.id.clone())
            .collect();
        assert_eq!(ints.len(), 2);
        let t = Target::Serial("0a0b0c".into());
        let v = Duration::from_secs(3600);
        let n = apply(
            &mut j,
            &t,
            RevocationReason::KeyCompromise,
            &[],
            true,
            now,
            v,
            "ns/r",
        );
        assert_eq!(n, Ok(Some(1)));
        assert_eq!(j.revocations.len(), 1, "one record");
        assert_eq!(j.revocations[0].issuer, ANY_INTERMEDIATE);
        for i in &ints {
            assert_eq!(crl::serials_for(&j, i), vec!["0a0b0c".to_string()], "{i}");
            let c = j.crls.iter().find(|c| &c.issuer == i).unwrap();
            assert_eq!(c.serials, vec!["0a0b0c".to_string()]);
        }
        let (_, _, crls) = journal_view(&j, &t).unwrap();
        assert_eq!(crls.len(), 2);
        // Applying again changes nothing.
        let n = apply(
            &mut j,
            &t,
            RevocationReason::KeyCompromise,
            &[],
            true,
            now,
            v,
            "ns/r",
        );
        assert_eq!(n, Ok(None));
        // An intermediate made later cannot have issued it: its CRL does not list it.
        let later = now + time::Duration::hours(1);
        j.get_mut(&ints[1]).unwrap().status = crate::journal::Status::Active;
        j.get_mut(&ints[0]).unwrap().status = crate::journal::Status::Retiring;
        crate::ca::apply::apply(
            &mut j,
            &crate::ca::plan::Action::PrepareIntermediate,
            later,
            &p,
        )
        .unwrap();
        let newest = j.authorities.last().unwrap().id.clone();
        assert!(crl::serials_for(&j, &newest).is_empty());
        // The signer refuses it under any issuer (the revocation view's "any issuer").
        let signer = crate::ca::bootstrap::signer_from_journal(
            &j,
            &crate::identity::TrustDomain::new("cluster.local").unwrap(),
        )
        .unwrap();
        assert!(signer.revocations().revokes(b"whatever issuer", "0a0b0c"));
    }

    /// A denial names the Revocation that holds it; one from before (no holder) is adopted.
    #[test]
    fn a_denial_is_held_by_its_revocation() {
        let (mut j, now) = ca();
        let t = Target::Identity("spiffe://cluster.local/ns/shop/sa/cart".into());
        let v = Duration::from_secs(3600);
        let r = RevocationReason::Unspecified;
        assert_eq!(
            apply(&mut j, &t, r, &[], false, now, v, "citadel/a"),
            Ok(Some(0))
        );
        assert_eq!(j.denied[0].revocation.as_deref(), Some("citadel/a"));
        assert!(satisfied(&j, &t, &[]));
        assert_eq!(
            apply(&mut j, &t, r, &[], false, now, v, "citadel/b"),
            Ok(None)
        );
        j.denied[0].revocation = None;
        assert!(!satisfied(&j, &t, &[]));
        assert_eq!(
            apply(&mut j, &t, r, &[], false, now, v, "citadel/b"),
            Ok(Some(0))
        );
        assert_eq!(j.denied[0].revocation.as_deref(), Some("citadel/b"));
        assert_eq!(j.denied.len(), 1);
    }

    /// Issue 20, M2: a revocation write that would pass the store's ceiling is refused before
    /// anything is written, with the numbers; the CA's own writes are not bounded by it.
    #[tokio::test]
    async fn revocation_writes_stop_at_the_ceiling_and_rotation_does_not() {
        let (j, now) = ca();
        let size = serde_json::to_vec(&j).unwrap().len();
        let store =
            crate::store::mem::MemStore::with_journal(j).with_revocation_ceiling(size + 1000);
        let v = Duration::from_secs(3600);
        let mut i = 0;
        let err = loop {
            let t = Target::Identity(format!("spiffe://cluster.local/ns/shop/sa/w{i}"));
            i += 1;
            match crate::ca::update::update_revocations(&store, |j| {
                apply(
                    j,
                    &t,
                    RevocationReason::Unspecified,
                    &[],
                    false,
                    now,
                    v,
                    "c/x",
                )
            })
            .await
            {
                Ok(_) => continue,
                Err(e) => break e,
            }
        };
        assert!(
            matches!(err, crate::ca::update::UpdateError::JournalFull { ceiling, .. } if ceiling == size + 1000),
            "{err}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains("nothing was written") && msg.contains(&format!("{}", size + 1000)),
            "{msg}"
        );
        let stored = store.journal().unwrap();
        assert!(serde_json::to_vec(&stored).unwrap().len() <= size + 1000);
        assert_eq!(stored.denied.len(), i - 1);
        // Rotation still writes past it.
        let p = crate::ca::policy::RotationPolicy::default();
        crate::ca::update::update_journal(&store, |j| {
            crate::ca::apply::apply(j, &crate::ca::plan::Action::PrepareIntermediate, now, &p)
                .map_err(|e| e.to_string())
        })
        .await
        .unwrap();
        assert!(serde_json::to_vec(&store.journal().unwrap()).unwrap().len() > size + 1000);
    }
}
