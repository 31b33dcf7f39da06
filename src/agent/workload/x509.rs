//! The X.509 messages of the Workload API, built from the agent's [`Credentials`]: one SVID
//! (the agent serves one identity), its own trust domain's bundle, and the CRLs. Each message
//! carries the full state, so a later message replaces an earlier one entirely.

use super::WorkloadError;
use crate::agent::Credentials;
use crate::identity::TrustDomain;
use crate::pki::pem;
use crate::workload_proto::{X509BundlesResponse, X509svid, X509svidResponse};

/// The key of a bundle in the Workload API's maps: the trust domain's SPIFFE ID.
pub fn trust_domain_id(td: &TrustDomain) -> String {
    format!("spiffe://{}", td.as_str())
}

/// Concatenated DER of every certificate in `pem_text`.
fn certs_der(pem_text: &str, what: &str) -> Result<Vec<u8>, WorkloadError> {
    let certs = pem::parse_certs(pem_text.as_bytes())
        .map_err(|e| WorkloadError::Internal(format!("{what}: {e}")))?;
    Ok(certs.iter().flat_map(|c| c.as_ref().to_vec()).collect())
}

/// Each PEM `X509 CRL` block as DER.
fn crls_der(c: &Credentials) -> Result<Vec<Vec<u8>>, WorkloadError> {
    let Some(crl) = &c.crl_pem else {
        return Ok(Vec::new());
    };
    let blocks = ::pem::parse_many(crl.as_bytes())
        .map_err(|e| WorkloadError::Internal(format!("CRL: {e}")))?;
    Ok(blocks
        .into_iter()
        .filter(|b| b.tag() == "X509 CRL")
        .map(|b| b.into_contents())
        .collect())
}

/// The PKCS#8 DER of the key (the agent holds it as PEM `PRIVATE KEY`).
fn key_der(c: &Credentials) -> Result<Vec<u8>, WorkloadError> {
    let block = ::pem::parse(c.key_pem.as_bytes())
        .map_err(|_| WorkloadError::Internal("the private key is not PEM".into()))?;
    if block.tag() != "PRIVATE KEY" {
        return Err(WorkloadError::Internal(
            "the private key is not PKCS#8".into(),
        ));
    }
    Ok(block.into_contents())
}

/// FetchX509SVID's message: the SVID (chain leaf first, PKCS#8 key, own bundle) and CRLs.
pub fn svid_response(c: &Credentials) -> Result<X509svidResponse, WorkloadError> {
    Ok(X509svidResponse {
        svids: vec![X509svid {
            spiffe_id: c.identity.to_string(),
            x509_svid: certs_der(&c.chain_pem, "certificate chain")?,
            x509_svid_key: key_der(c)?,
            bundle: certs_der(&c.roots_pem, "trust bundle")?,
            hint: String::new(),
        }],
        crl: crls_der(c)?,
        federated_bundles: federated_der(c),
    })
}

/// FetchX509Bundles' message: the own trust domain's bundle (always present), the foreign
/// trust domains' bundles (each under its own key, never merged with ours) and CRLs.
pub fn bundles_response(c: &Credentials) -> Result<X509BundlesResponse, WorkloadError> {
    let mut bundles = federated_der(c);
    bundles.insert(
        trust_domain_id(c.identity.trust_domain()),
        certs_der(&c.roots_pem, "trust bundle")?,
    );
    Ok(X509BundlesResponse {
        crl: crls_der(c)?,
        bundles,
    })
}

/// The foreign trust domains' X.509 authorities (concatenated DER), keyed by the trust
/// domain's SPIFFE ID. An empty bundle is sent as an empty value: that trust domain's SVIDs
/// are all invalid.
fn federated_der(c: &Credentials) -> std::collections::HashMap<String, Vec<u8>> {
    c.federated
        .bundles
        .values()
        .filter(|b| &b.trust_domain != c.identity.trust_domain())
        .map(|b| {
            (
                trust_domain_id(&b.trust_domain),
                b.x509_authorities
                    .iter()
                    .flat_map(|d| d.as_ref().to_vec())
                    .collect(),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use super::*;
    use crate::agent::federation::Federated;
    use crate::pki::spiffe_bundle::SpiffeBundle;

    fn ca_cert() -> rcgen::Certificate {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::default();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.self_signed(&key).unwrap()
    }

    fn creds(federated: Federated) -> Credentials {
        let key = rcgen::KeyPair::generate().unwrap();
        let own = ca_cert();
        Credentials {
            identity: crate::identity::SpiffeId::parse("spiffe://a.test/ns/shop/sa/cart").unwrap(),
            key_pem: key.serialize_pem(),
            chain_pem: own.pem(),
            roots_pem: own.pem(),
            crl_pem: None,
            serial_hex: "01".into(),
            not_before: time::OffsetDateTime::UNIX_EPOCH,
            not_after: time::OffsetDateTime::UNIX_EPOCH,
            version: 1,
            federated: Arc::new(federated),
        }
    }

    fn bundle(td: &str, roots: Vec<rustls_pki_types::CertificateDer<'static>>) -> SpiffeBundle {
        SpiffeBundle {
            trust_domain: TrustDomain::new(td).unwrap(),
            x509_authorities: roots,
            jwt_keys: vec![],
            sequence: Some(1),
            refresh_hint: None,
        }
    }

    #[test]
    fn federated_bundles_go_out_per_trust_domain_never_merged_and_never_as_ours() {
        let b_root = ca_cert();
        let mut m = BTreeMap::new();
        m.insert(
            "b.test".to_string(),
            Arc::new(bundle("b.test", vec![b_root.der().clone()])),
        );
        m.insert("c.test".to_string(), Arc::new(bundle("c.test", vec![])));
        // A bundle filed under our own trust domain is never handed out as federated.
        m.insert(
            "a.test".to_string(),
            Arc::new(bundle("a.test", vec![ca_cert().der().clone()])),
        );
        let c = creds(Federated::new(m, &[]));
        let svid = svid_response(&c).unwrap();
        let mut keys: Vec<_> = svid.federated_bundles.keys().cloned().collect();
        keys.sort();
        assert_eq!(keys, ["spiffe://b.test", "spiffe://c.test"]);
        assert_eq!(
            svid.federated_bundles["spiffe://b.test"],
            b_root.der().to_vec()
        );
        assert!(svid.federated_bundles["spiffe://c.test"].is_empty());
        assert_eq!(svid.svids[0].bundle, certs_der(&c.roots_pem, "t").unwrap());
        let all = bundles_response(&c).unwrap();
        assert_eq!(all.bundles.len(), 3);
        assert_eq!(
            all.bundles["spiffe://a.test"],
            certs_der(&c.roots_pem, "t").unwrap(),
            "ours is ours alone"
        );
        assert_eq!(all.bundles["spiffe://b.test"], b_root.der().to_vec());
    }
}
