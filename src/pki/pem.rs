//! PEM encoding and decoding of certificates, CSRs and keys.

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

use super::PkiError;

/// Parses every `CERTIFICATE` block in `pem`. Fails if there is none or one is malformed.
pub fn parse_certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PkiError::invalid(format!("malformed PEM: {e}")))?;
    if certs.is_empty() {
        return Err(PkiError::invalid("no CERTIFICATE block found in PEM"));
    }
    Ok(certs)
}

/// Encodes one DER certificate as PEM, with a trailing newline.
pub fn cert_to_pem(der: &[u8]) -> String {
    encode("CERTIFICATE", der)
}

/// Encodes DER under the given PEM tag.
pub fn encode(tag: &str, der: &[u8]) -> String {
    ::pem::encode_config(
        &::pem::Pem::new(tag, der.to_vec()),
        ::pem::EncodeConfig::new().set_line_ending(::pem::LineEnding::LF),
    )
}

/// Concatenates certificates into one PEM bundle.
pub fn certs_to_pem<'a>(ders: impl IntoIterator<Item = &'a CertificateDer<'a>>) -> String {
    ders.into_iter().map(|d| cert_to_pem(d)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_errors() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::default()
            .self_signed(&key)
            .unwrap();
        let pem = format!("{}{}", cert.pem(), cert_to_pem(cert.der()));
        let certs = parse_certs(pem.as_bytes()).unwrap();
        assert_eq!(certs.len(), 2);
        assert_eq!(certs[0].as_ref(), cert.der().as_ref());
        assert!(parse_certs(b"").is_err());
        assert!(
            parse_certs(b"-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n").is_err()
        );
    }
}
