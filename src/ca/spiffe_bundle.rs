//! This trust domain's bundle in the SPIFFE format, as the bundle endpoint serves it: one
//! `x509-svid` key per root in the trust bundle (exactly one certificate in `x5c`), the
//! `jwt-svid` keys of the JWT bundle, `spiffe_sequence` and `spiffe_refresh_hint`.
//!
//! The sequence is derived from the journal, not counted in memory, so every replica serves
//! the same number for the same state and a restart never goes back: it adds up events that
//! only ever happen once per record in a journal whose authorities are never removed (a root
//! created, a root retired) and the JWT bundle's own persisted sequence (bumped on every key
//! set change). Any change of the served key set moves at least one of them.

use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64STD;
use base64::Engine;
use serde_json::json;

use super::policy::RotationPolicy;
use super::{jwt, CaError};
use crate::journal::{Journal, Role, Status};
use crate::pki::spiffe_bundle::public_jwk;

/// `spiffe_sequence` of `journal`'s bundle: monotonic across restarts and replicas.
pub fn sequence(journal: &Journal) -> u64 {
    let roots = journal.authorities.iter().filter(|a| a.role == Role::Root);
    let created = roots.clone().count() as u64;
    let retired = roots.filter(|a| a.status == Status::Retired).count() as u64;
    created + retired + journal.jwt_bundle_sequence
}

/// `spiffe_refresh_hint`: the JWT bundle's hint (`--jwt-bundle-refresh-hint`, which JWT keys
/// are published 5 of ahead of signing), but never more than a tenth of the root rotation's
/// propagation period (`--activate-after`), so a federated peer polls about ten times
/// between a new root's publication and its first signature. At least one second.
pub fn refresh_hint(policy: &RotationPolicy) -> Duration {
    policy
        .jwt
        .refresh_hint
        .min(policy.activate_after / 10)
        .max(Duration::from_secs(1))
}

/// The SPIFFE bundle of `journal`: pretty-printed JSON, the same bytes for the same journal
/// and hint.
pub fn render(journal: &Journal, hint: Duration) -> Result<String, CaError> {
    let mut keys = Vec::new();
    for root in journal.trusted_roots() {
        let block = ::pem::parse(&root.cert_pem)
            .map_err(|e| CaError::Config(format!("root {}: {e}", root.id)))?;
        let der = block.contents();
        let spki = {
            use x509_parser::prelude::FromDer;
            let (_, c) = x509_parser::certificate::X509Certificate::from_der(der)
                .map_err(|e| CaError::Config(format!("root {}: {e}", root.id)))?;
            c.public_key().raw.to_vec()
        };
        let mut k = public_jwk(&spki).map_err(|e| CaError::Config(e.to_string()))?;
        k["use"] = json!("x509-svid");
        k["x5c"] = json!([B64STD.encode(der)]);
        keys.push(k);
    }
    for k in journal.jwt_keys.iter().filter(|k| k.in_bundle()) {
        keys.push(jwt::jwk(&k.kid, jwt::jwt_key_of(k)?.as_ref())?);
    }
    let set = json!({
        "keys": keys,
        "spiffe_refresh_hint": hint.as_secs(),
        "spiffe_sequence": sequence(journal),
    });
    serde_json::to_string_pretty(&set).map_err(|e| CaError::Config(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::bootstrap;
    use crate::identity::TrustDomain;
    use crate::pki::spiffe_bundle::parse;

    fn journal() -> Journal {
        let td = TrustDomain::new("a.test").unwrap();
        let now = time::OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        let mut j = bootstrap::new_journal(&bootstrap::CaOptions::new(td), now).unwrap();
        let key = jwt::mint_jwt_key(
            crate::pki::KeyType::EcP256,
            now,
            Duration::from_secs(86400),
            Status::Active,
        )
        .unwrap();
        j.jwt_keys.push(key);
        j
    }

    #[test]
    fn renders_every_trusted_root_and_jwt_key_and_parses_back() {
        let mut j = journal();
        let hint = Duration::from_secs(30);
        let doc = render(&j, hint).unwrap();
        let td = TrustDomain::new("a.test").unwrap();
        let b = parse(&td, doc.as_bytes()).unwrap();
        assert_eq!(b.x509_authorities.len(), j.trusted_roots().count());
        assert_eq!(
            b.jwt_keys.len(),
            j.jwt_keys.iter().filter(|k| k.in_bundle()).count()
        );
        assert_eq!(b.refresh_hint, Some(hint));
        assert_eq!(b.sequence, Some(sequence(&j)));
        assert_eq!(render(&j, hint).unwrap(), doc, "same journal, same bytes");
        // Retiring a root changes the key set and moves the sequence forward.
        let before = sequence(&j);
        let root = j
            .authorities
            .iter_mut()
            .find(|a| a.role == Role::Root)
            .unwrap();
        root.status = Status::Retired;
        assert_eq!(sequence(&j), before + 1);
        let b = parse(&td, render(&j, hint).unwrap().as_bytes()).unwrap();
        assert!(b.x509_authorities.is_empty());
        j.jwt_bundle_sequence += 1;
        assert_eq!(sequence(&j), before + 2);
    }

    #[test]
    fn the_hint_is_under_a_tenth_of_the_propagation_period() {
        let mut p = RotationPolicy::default();
        p.jwt.refresh_hint = Duration::from_secs(300);
        p.activate_after = Duration::from_secs(600);
        assert_eq!(refresh_hint(&p), Duration::from_secs(60));
        p.activate_after = Duration::from_secs(90 * 86400);
        assert_eq!(refresh_hint(&p), Duration::from_secs(300));
        p.activate_after = Duration::ZERO;
        assert_eq!(refresh_hint(&p), Duration::from_secs(1));
    }
}
