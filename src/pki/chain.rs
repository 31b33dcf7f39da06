//! Reading certificates and checking chains.
//!
//! Workload chains are verified with rustls-webpki, the same code path TLS peers use, so
//! "verifies here" means "a rustls client will accept it". CA-to-CA links (plugged-in CAs,
//! status output) are checked with x509-parser, because webpki only verifies end entities.

use rustls_pki_types::{CertificateDer, UnixTime};
use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::FromDer;

use super::keys::PublicKeyKind;
use super::PkiError;

/// What operators and tests want to know about a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// Subject DN, as x509-parser prints it.
    pub subject: String,
    /// Issuer DN, as x509-parser prints it.
    pub issuer: String,
    /// Serial, lowercase hex (see [`serial_hex`]).
    pub serial_hex: String,
    /// notBefore.
    pub not_before: OffsetDateTime,
    /// notAfter.
    pub not_after: OffsetDateTime,
    /// basicConstraints CA flag; false when the extension is absent.
    pub is_ca: bool,
    /// basicConstraints pathLenConstraint, if any.
    pub path_len: Option<u32>,
    /// The public key's type, or why it is not one citadel knows.
    pub key: Result<PublicKeyKind, String>,
    /// Every URI SAN, in order (a SPIFFE ID for workload certificates).
    pub uri_sans: Vec<String>,
    /// Subject equals issuer and the certificate's signature verifies with its own key.
    pub self_signed: bool,
    /// It carries `profile::NODE_ISSUED_OID`: citadel issued it to a node proxy on a
    /// workload's behalf.
    pub node_issued: bool,
}

/// Parses one DER certificate; trailing bytes are an error.
pub fn parse(der: &[u8]) -> Result<X509Certificate<'_>, PkiError> {
    let (rest, cert) = X509Certificate::from_der(der)
        .map_err(|e| PkiError::invalid(format!("unreadable certificate: {e}")))?;
    if !rest.is_empty() {
        return Err(PkiError::invalid("trailing bytes after certificate"));
    }
    Ok(cert)
}

/// Parses and describes one DER certificate.
pub fn describe(der: &[u8]) -> Result<CertInfo, PkiError> {
    let c = parse(der)?;
    let bc = c.basic_constraints().ok().flatten().map(|e| e.value);
    let mut uri_sans = Vec::new();
    let node_oid = x509_parser::der_parser::oid::Oid::from(super::profile::NODE_ISSUED_OID)
        .map_err(|_| PkiError::invalid("bad built-in OID"))?;
    let node_issued = c.extensions().iter().any(|e| e.oid == node_oid);
    for ext in c.extensions() {
        if let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() {
            for n in &san.general_names {
                if let GeneralName::URI(u) = n {
                    uri_sans.push(u.to_string());
                }
            }
        }
    }
    Ok(CertInfo {
        subject: c.subject().to_string(),
        issuer: c.issuer().to_string(),
        serial_hex: serial_hex(c.raw_serial()),
        not_before: c.validity().not_before.to_datetime(),
        not_after: c.validity().not_after.to_datetime(),
        is_ca: bc.map(|b| b.ca).unwrap_or(false),
        path_len: bc.and_then(|b| b.path_len_constraint),
        key: PublicKeyKind::of_spki(c.public_key()).map_err(|e| e.to_string()),
        uri_sans,
        self_signed: c.subject().as_raw() == c.issuer().as_raw()
            && c.verify_signature(None).is_ok(),
        node_issued,
    })
}

/// Lowercase hex of a serial's minimal big-endian bytes (no DER sign octet), the form used
/// in audit logs, the issuance index and `citadel revoke --serial`.
pub fn serial_hex(raw: &[u8]) -> String {
    let start = raw
        .iter()
        .position(|&b| b != 0)
        .unwrap_or(raw.len().saturating_sub(1));
    hex::encode(&raw[start..])
}

/// Checks that `parent` is a CA that signed `child`.
pub fn check_issued_by(child: &[u8], parent: &[u8]) -> Result<(), PkiError> {
    let c = parse(child)?;
    let p = parse(parent)?;
    let ca = p
        .basic_constraints()
        .ok()
        .flatten()
        .is_some_and(|bc| bc.value.ca);
    if !ca {
        return Err(PkiError::invalid(format!(
            "{:?} is not a CA certificate (basicConstraints CA:true missing)",
            p.subject().to_string()
        )));
    }
    if c.issuer().as_raw() != p.subject().as_raw() {
        return Err(PkiError::invalid(format!(
            "{:?} was issued by {:?}, not by {:?}",
            c.subject().to_string(),
            c.issuer().to_string(),
            p.subject().to_string()
        )));
    }
    c.verify_signature(Some(p.public_key())).map_err(|_| {
        PkiError::invalid(format!(
            "the signature on {:?} does not verify with the key of {:?}",
            c.subject().to_string(),
            p.subject().to_string()
        ))
    })
}

/// Whether a CA certificate may sign certificates: no keyUsage extension (RFC 5280: every
/// use allowed) or one with keyCertSign. Verifiers refuse a chain through a CA whose
/// keyUsage lacks it.
pub fn may_sign_certificates(der: &[u8]) -> Result<bool, PkiError> {
    let c = parse(der)?;
    let ku = c
        .key_usage()
        .map_err(|e| PkiError::invalid(format!("unreadable keyUsage: {e}")))?;
    Ok(ku.is_none_or(|k| k.value.key_cert_sign()))
}

/// Whether `key`'s public half is the one certified in `cert_der`.
pub fn key_matches_cert(key: &rcgen::KeyPair, cert_der: &[u8]) -> Result<bool, PkiError> {
    spki_matches_cert(
        &rcgen::PublicKeyData::subject_public_key_info(key),
        cert_der,
    )
}

/// Whether the DER SubjectPublicKeyInfo `spki` is the one certified in `cert_der`.
pub fn spki_matches_cert(spki: &[u8], cert_der: &[u8]) -> Result<bool, PkiError> {
    let c = parse(cert_der)?;
    Ok(c.public_key().raw == spki)
}

/// Which end of a TLS connection a leaf is checked for.
#[derive(Debug, Clone, Copy)]
pub enum Usage {
    /// The certificate must allow TLS client authentication (a workload renewing).
    ClientAuth,
    /// The certificate must allow TLS server authentication.
    ServerAuth,
}

/// Verifies a leaf up to one of `roots` with rustls-webpki, at time `now`.
pub fn verify_leaf(
    leaf: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    roots: &[CertificateDer<'_>],
    now: OffsetDateTime,
    usage: Usage,
) -> Result<(), PkiError> {
    let ee = webpki::EndEntityCert::try_from(leaf)
        .map_err(|e| PkiError::invalid(format!("unreadable leaf certificate: {e}")))?;
    let anchors = roots
        .iter()
        .map(|r| webpki::anchor_from_trusted_cert(r).map(|a| a.to_owned()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PkiError::invalid(format!("unusable trust anchor: {e}")))?;
    let secs = u64::try_from(now.unix_timestamp()).unwrap_or(0);
    let time = UnixTime::since_unix_epoch(std::time::Duration::from_secs(secs));
    let eku = match usage {
        Usage::ClientAuth => webpki::KeyUsage::client_auth(),
        Usage::ServerAuth => webpki::KeyUsage::server_auth(),
    };
    ee.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &anchors,
        intermediates,
        time,
        eku,
        None,
        None,
    )
    .map(|_| ())
    .map_err(|e| PkiError::invalid(format!("chain does not verify: {e}")))
}
