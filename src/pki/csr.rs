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
    /// A CSR for a DNS-form (Linkerd) identity without exactly one DNS SAN, or with a URI,
    /// IP, email or other SAN beside it ([`single_dns_name`]); the text says what it has.
    #[error("CSR must carry exactly one DNS name and no URI, IP or email SAN; it has {0}")]
    NotOneDnsName(String),
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
    /// DNS SANs the CSR asked for (Linkerd's proxy sends its DNS-form identity). Never copied
    /// into a certificate: the issue path compares them with the name it derives itself.
    pub dns_sans: Vec<String>,
    /// The kinds of any other SANs (`IP`, `email`, ...), so a surface that allows none can
    /// refuse them ([`single_dns_name`]).
    pub other_sans: Vec<&'static str>,
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

    let (mut uri_sans, mut dns_sans, mut other_sans) = (Vec::new(), Vec::new(), Vec::new());
    if let Some(exts) = csr.requested_extensions() {
        for ext in exts {
            if let ParsedExtension::SubjectAlternativeName(san) = ext {
                for name in &san.general_names {
                    match name {
                        GeneralName::URI(uri) => uri_sans.push((*uri).to_string()),
                        GeneralName::DNSName(dns) => dns_sans.push((*dns).to_string()),
                        GeneralName::IPAddress(_) => other_sans.push("IP"),
                        GeneralName::RFC822Name(_) => other_sans.push("email"),
                        _ => other_sans.push("other"),
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
        dns_sans,
        other_sans,
        common_name,
    })
}

/// The one DNS SAN of a CSR for a DNS-form identity (Linkerd's rule): exactly one DNS name,
/// no URI, IP, email or other SAN, and an ECDSA key (Linkerd's proxies make P-256 keys, and
/// Linkerd's identity service certifies nothing else). The name is only compared, never
/// copied into a certificate.
pub fn single_dns_name(csr: &VerifiedCsr) -> Result<&str, CsrError> {
    if !matches!(
        csr.key.kind(),
        PublicKeyKind::EcP256 | PublicKeyKind::EcP384
    ) {
        return Err(CsrError::UnsupportedKey(format!(
            "key is {}; a DNS-form (Linkerd) identity needs an ECDSA key",
            csr.key.kind()
        )));
    }
    let mut has: Vec<String> = Vec::new();
    if csr.dns_sans.len() != 1 {
        has.push(format!("{} DNS names", csr.dns_sans.len()));
    }
    if !csr.uri_sans.is_empty() {
        has.push(format!("{} URI", csr.uri_sans.len()));
    }
    has.extend(csr.other_sans.iter().map(|k| format!("an {k} SAN")));
    match (has.is_empty(), csr.dns_sans.first()) {
        (true, Some(name)) => Ok(name.as_str()),
        _ => Err(CsrError::NotOneDnsName(has.join(", "))),
    }
}

/// Builds a CSR the way Linkerd's proxy does: empty subject, one DNS SAN (its identity).
/// For tests and tools.
pub fn build_dns(key: &rcgen::KeyPair, dns_san: &str) -> Result<Vec<u8>, rcgen::Error> {
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.subject_alt_names = vec![rcgen::SanType::DnsName(dns_san.try_into()?)];
    Ok(params.serialize_request(key)?.der().to_vec())
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

    #[test]
    fn a_dns_form_csr_has_one_dns_name_nothing_else_and_an_ecdsa_key() {
        let name = "cart.shop.serviceaccount.identity.linkerd.cluster.local";
        let key = KeyType::EcP256.generate().unwrap();
        let csr = parse_der(&build_dns(&key, name).unwrap()).unwrap();
        assert_eq!(csr.dns_sans, vec![name.to_string()]);
        assert_eq!(single_dns_name(&csr), Ok(name));

        let with = |sans: Vec<rcgen::SanType>, kt: KeyType| {
            let mut p = rcgen::CertificateParams::default();
            p.distinguished_name = rcgen::DistinguishedName::new();
            p.subject_alt_names = sans;
            let der = p
                .serialize_request(&kt.generate().unwrap())
                .unwrap()
                .der()
                .to_vec();
            single_dns_name(&parse_der(&der).unwrap())
                .unwrap_err()
                .to_string()
        };
        let dns = |n: &str| rcgen::SanType::DnsName(n.try_into().unwrap());
        let cases = [
            (vec![], "it has 0 DNS names"),
            (vec![dns(name), dns("b.example")], "it has 2 DNS names"),
            (
                vec![dns(name), rcgen::SanType::URI(ID.try_into().unwrap())],
                "it has 1 URI",
            ),
            (
                vec![dns(name), rcgen::SanType::IpAddress([10, 0, 0, 1].into())],
                "it has an IP SAN",
            ),
            (
                vec![
                    dns(name),
                    rcgen::SanType::Rfc822Name("a@b.c".try_into().unwrap()),
                ],
                "it has an email SAN",
            ),
        ];
        for (sans, want) in cases {
            let got = with(sans, KeyType::EcP256);
            assert!(got.ends_with(want), "{got:?} should end with {want:?}");
        }
        let rsa = with(vec![dns(name)], KeyType::Rsa2048);
        assert!(rsa.contains("needs an ECDSA key"), "{rsa}");
    }
}
