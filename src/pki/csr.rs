//! Certificate signing requests: size limit, parse, self-signature check, key policy.
//!
//! x509-parser is used instead of rcgen's CSR parser because rcgen rejects any extension it
//! does not know (an openssl CSR with a SubjectKeyIdentifier fails). Only the CSR's
//! self-signature is checked, like istiod: its SANs are replaced by the caller's identity.

use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{OID_PKCS1_SHA1WITHRSA, OID_SHA1_WITH_RSA};
use x509_parser::prelude::FromDer;

use super::keys::PublicKeyKind;

/// CSRs larger than this are refused before any parsing. Real ones are under 2 KiB.
pub const MAX_CSR_BYTES: usize = 64 * 1024;

/// Why a CSR was refused; the server answers InvalidArgument.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CsrError {
    /// Over [`MAX_CSR_BYTES`]; refused before parsing.
    #[error("CSR is {len} bytes; the limit is {MAX_CSR_BYTES}")]
    TooLarge {
        /// The CSR's size in bytes.
        len: usize,
    },
    /// The CSR field was empty or only whitespace.
    #[error("CSR is empty")]
    Empty,
    /// No `CERTIFICATE REQUEST` PEM block.
    #[error("CSR is not PEM with a CERTIFICATE REQUEST block: {0}")]
    NotPem(String),
    /// The PEM block is not a valid PKCS#10 request.
    #[error("CSR is not valid DER: {0}")]
    Malformed(String),
    /// The self-signature does not verify.
    #[error("CSR signature does not verify with its own public key")]
    BadSignature,
    /// Signed with SHA-1.
    #[error("CSR is signed with SHA-1, which is not accepted")]
    WeakSignature,
    /// The key is not P-256, P-384 or RSA 2048-8192; the text says what it is.
    #[error("CSR {0}")]
    UnsupportedKey(String),
}

/// The subject public key taken from a CSR, in the form rcgen needs to certify it.
#[derive(Debug, Clone)]
pub struct SubjectKey {
    spki_der: Vec<u8>,
    raw: Vec<u8>,
    kind: PublicKeyKind,
}

impl SubjectKey {
    /// The key's type and size.
    pub fn kind(&self) -> PublicKeyKind {
        self.kind
    }
    /// The SubjectPublicKeyInfo, DER, exactly as the CSR carried it.
    pub fn spki_der(&self) -> &[u8] {
        &self.spki_der
    }
}

impl rcgen::PublicKeyData for SubjectKey {
    // Re-emit the CSR's SPKI byte for byte instead of rebuilding it from parts.
    fn subject_public_key_info(&self) -> Vec<u8> {
        self.spki_der.clone()
    }
    fn der_bytes(&self) -> &[u8] {
        &self.raw
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        self.kind.rcgen_alg()
    }
}

/// A CSR that parsed and whose self-signature verified.
#[derive(Debug, Clone)]
pub struct VerifiedCsr {
    /// The public key to certify.
    pub key: SubjectKey,
    /// URI SANs the CSR asked for (istio-agent sends its own SPIFFE ID).
    pub uri_sans: Vec<String>,
    /// The subject CN, when the CSR had one. Only for logs: it is never copied into a
    /// certificate (see `profile::workload`).
    pub common_name: Option<String>,
}

/// Parses a PEM CSR (`CERTIFICATE REQUEST` or the legacy `NEW CERTIFICATE REQUEST`).
pub fn parse_pem(pem: &[u8]) -> Result<VerifiedCsr, CsrError> {
    if pem.len() > MAX_CSR_BYTES {
        return Err(CsrError::TooLarge { len: pem.len() });
    }
    if pem.iter().all(u8::is_ascii_whitespace) {
        return Err(CsrError::Empty);
    }
    let block = ::pem::parse(pem).map_err(|e| CsrError::NotPem(e.to_string()))?;
    match block.tag() {
        "CERTIFICATE REQUEST" | "NEW CERTIFICATE REQUEST" => parse_der(block.contents()),
        other => Err(CsrError::NotPem(format!("found a {other:?} block instead"))),
    }
}

/// Parses a DER CSR, checks its self-signature and its key type.
pub fn parse_der(der: &[u8]) -> Result<VerifiedCsr, CsrError> {
    if der.len() > MAX_CSR_BYTES {
        return Err(CsrError::TooLarge { len: der.len() });
    }
    let (rest, csr) =
        X509CertificationRequest::from_der(der).map_err(|e| CsrError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CsrError::Malformed(format!(
            "{} trailing bytes after the request",
            rest.len()
        )));
    }
    let info = &csr.certification_request_info;
    let kind = PublicKeyKind::of_spki(&info.subject_pki)
        .map_err(|e| CsrError::UnsupportedKey(e.to_string()))?;
    let sig_alg = &csr.signature_algorithm.algorithm;
    if *sig_alg == OID_PKCS1_SHA1WITHRSA || *sig_alg == OID_SHA1_WITH_RSA {
        return Err(CsrError::WeakSignature);
    }
    csr.verify_signature().map_err(|_| CsrError::BadSignature)?;

    let mut uri_sans = Vec::new();
    if let Some(exts) = csr.requested_extensions() {
        for ext in exts {
            if let ParsedExtension::SubjectAlternativeName(san) = ext {
                for name in &san.general_names {
                    if let GeneralName::URI(uri) = name {
                        uri_sans.push((*uri).to_string());
                    }
                }
            }
        }
    }
    let common_name = info
        .subject
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_string);
    Ok(VerifiedCsr {
        key: SubjectKey {
            spki_der: info.subject_pki.raw.to_vec(),
            raw: info.subject_pki.subject_public_key.data.to_vec(),
            kind,
        },
        uri_sans,
        common_name,
    })
}

/// Builds a CSR the way istio-agent does: empty subject, one URI SAN.
/// Used by `citadel request`, the benchmark and tests.
pub fn build(key: &rcgen::KeyPair, uri_san: &str) -> Result<String, rcgen::Error> {
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.subject_alt_names = vec![rcgen::SanType::URI(uri_san.try_into()?)];
    params.serialize_request(key)?.pem()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::KeyType;

    const ID: &str = "spiffe://cluster.local/ns/shop/sa/cart";

    #[test]
    fn ec_and_rsa_csrs_verify() {
        for (kt, kind) in [
            (KeyType::EcP256, PublicKeyKind::EcP256),
            (KeyType::EcP384, PublicKeyKind::EcP384),
            (KeyType::Rsa2048, PublicKeyKind::Rsa { bits: 2048 }),
        ] {
            let key = kt.generate().unwrap();
            let csr = parse_pem(build(&key, ID).unwrap().as_bytes()).unwrap();
            assert_eq!(csr.key.kind(), kind);
            assert_eq!(csr.uri_sans, vec![ID.to_string()]);
            assert_eq!(csr.common_name, None);
            assert_eq!(
                csr.key.spki_der(),
                rcgen::PublicKeyData::subject_public_key_info(&key).as_slice()
            );
        }
    }

    #[test]
    fn unknown_extensions_are_tolerated_and_cn_kept() {
        let key = KeyType::EcP256.generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "cart.shop");
        params.subject_alt_names = vec![rcgen::SanType::URI(ID.try_into().unwrap())];
        // A private-arc extension nobody knows, plus an extra critical one.
        let mut ext = rcgen::CustomExtension::from_oid_content(
            &[1, 3, 6, 1, 4, 1, 99999, 1],
            vec![0x05, 0x00],
        );
        ext.set_criticality(true);
        params.custom_extensions = vec![ext];
        let pem = params.serialize_request(&key).unwrap().pem().unwrap();
        let csr = parse_pem(pem.as_bytes()).unwrap();
        assert_eq!(csr.common_name.as_deref(), Some("cart.shop"));
        assert_eq!(csr.uri_sans, vec![ID.to_string()]);
    }

    #[test]
    fn tampered_csr_fails_signature() {
        let key = KeyType::EcP256.generate().unwrap();
        let pem = build(&key, ID).unwrap();
        let mut der = ::pem::parse(pem.as_bytes()).unwrap().into_contents();
        // Flip a byte inside the URI SAN, which sits in the signed part.
        let at = der
            .windows(4)
            .position(|w| w == b"cart")
            .expect("SAN bytes present");
        der[at] = b'k';
        assert_eq!(parse_der(&der).unwrap_err(), CsrError::BadSignature);
    }

    #[test]
    fn wrong_key_types_and_garbage_are_refused() {
        let ed = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let err = parse_pem(build(&ed, ID).unwrap().as_bytes()).unwrap_err();
        assert!(matches!(err, CsrError::UnsupportedKey(_)), "{err:?}");

        assert_eq!(parse_pem(b"  \n").unwrap_err(), CsrError::Empty);
        assert!(matches!(
            parse_pem(b"hello").unwrap_err(),
            CsrError::NotPem(_)
        ));
        let cert_pem = crate::pki::pem::encode("CERTIFICATE", b"\x30\x00");
        assert!(matches!(
            parse_pem(cert_pem.as_bytes()).unwrap_err(),
            CsrError::NotPem(_)
        ));
        let junk = crate::pki::pem::encode("CERTIFICATE REQUEST", b"\x30\x03\x02\x01\x00");
        assert!(matches!(
            parse_pem(junk.as_bytes()).unwrap_err(),
            CsrError::Malformed(_)
        ));
        let big = vec![b'A'; MAX_CSR_BYTES + 1];
        assert_eq!(
            parse_pem(&big).unwrap_err(),
            CsrError::TooLarge {
                len: MAX_CSR_BYTES + 1
            }
        );
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let key = KeyType::EcP256.generate().unwrap();
        let mut der = ::pem::parse(build(&key, ID).unwrap().as_bytes())
            .unwrap()
            .into_contents();
        der.push(0);
        assert!(matches!(
            parse_der(&der).unwrap_err(),
            CsrError::Malformed(_)
        ));
    }
}
