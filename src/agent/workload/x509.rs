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
        federated_bundles: Default::default(),
    })
}

/// FetchX509Bundles' message: the own trust domain's bundle (always present) and CRLs.
pub fn bundles_response(c: &Credentials) -> Result<X509BundlesResponse, WorkloadError> {
    Ok(X509BundlesResponse {
        crl: crls_der(c)?,
        bundles: [(
            trust_domain_id(c.identity.trust_domain()),
            certs_der(&c.roots_pem, "trust bundle")?,
        )]
        .into(),
    })
}
