//! Key types: generation, loading and describing public keys.
//!
//! ring cannot generate RSA keys, so RSA generation goes through the `rsa` crate and the
//! result is handed to ring (via rcgen) as PKCS#8. The `rsa` crate is used for key
//! *generation* and PKCS#1 conversion only; every signature is made and checked by ring.

use std::fmt;
use std::str::FromStr;

use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384, PKCS_RSA_SHA256};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
};
use x509_parser::public_key::PublicKey;
use x509_parser::x509::SubjectPublicKeyInfo;

use super::PkiError;

/// A key type citadel can generate, for CAs and for its own client keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyType {
    /// ECDSA P-256 (`ec-p256`), the default for new CAs.
    EcP256,
    /// ECDSA P-384 (`ec-p384`).
    EcP384,
    /// RSA 2048 bits (`rsa-2048`), istio-agent's default.
    Rsa2048,
    /// RSA 3072 bits (`rsa-3072`).
    Rsa3072,
    /// RSA 4096 bits (`rsa-4096`).
    Rsa4096,
}

impl KeyType {
    /// Every key type, in the order parse errors list them.
    pub const ALL: [KeyType; 5] = [
        KeyType::EcP256,
        KeyType::EcP384,
        KeyType::Rsa2048,
        KeyType::Rsa3072,
        KeyType::Rsa4096,
    ];

    /// The name used on the command line and in messages, e.g. `ec-p256`.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyType::EcP256 => "ec-p256",
            KeyType::EcP384 => "ec-p384",
            KeyType::Rsa2048 => "rsa-2048",
            KeyType::Rsa3072 => "rsa-3072",
            KeyType::Rsa4096 => "rsa-4096",
        }
    }

    fn rsa_bits(self) -> Option<usize> {
        match self {
            KeyType::Rsa2048 => Some(2048),
            KeyType::Rsa3072 => Some(3072),
            KeyType::Rsa4096 => Some(4096),
            _ => None,
        }
    }

    /// Generates a fresh key pair of this type.
    pub fn generate(self) -> Result<KeyPair, PkiError> {
        match self {
            KeyType::EcP256 => Ok(KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?),
            KeyType::EcP384 => Ok(KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384)?),
            _ => {
                use rsa::pkcs8::EncodePrivateKey;
                let bits = self.rsa_bits().unwrap_or(2048);
                let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, bits)
                    .map_err(|e| PkiError::invalid(format!("RSA-{bits} generation failed: {e}")))?;
                let der = key
                    .to_pkcs8_der()
                    .map_err(|e| PkiError::invalid(format!("RSA key encoding failed: {e}")))?;
                Ok(KeyPair::from_pkcs8_der_and_sign_algo(
                    &PrivatePkcs8KeyDer::from(der.as_bytes()),
                    &PKCS_RSA_SHA256,
                )?)
            }
        }
    }
}

impl fmt::Display for KeyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for KeyType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        KeyType::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| {
                let names: Vec<_> = KeyType::ALL.iter().map(|k| k.as_str()).collect();
                format!(
                    "unknown key type {s:?}; expected one of {}",
                    names.join(", ")
                )
            })
    }
}

/// What kind of public key a CSR or certificate carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PublicKeyKind {
    /// ECDSA P-256.
    EcP256,
    /// ECDSA P-384.
    EcP384,
    /// RSA, of the given modulus size.
    Rsa {
        /// Modulus size in bits.
        bits: u32,
    },
}

impl fmt::Display for PublicKeyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PublicKeyKind::EcP256 => f.write_str("ec-p256"),
            PublicKeyKind::EcP384 => f.write_str("ec-p384"),
            PublicKeyKind::Rsa { bits } => write!(f, "rsa-{bits}"),
        }
    }
}

impl PublicKeyKind {
    /// Classifies a SubjectPublicKeyInfo, refusing anything but P-256, P-384 and RSA
    /// 2048-8192. Smaller RSA is breakable; larger RSA is a cheap CPU-exhaustion attack.
    pub fn of_spki(spki: &SubjectPublicKeyInfo<'_>) -> Result<Self, PkiError> {
        let alg = &spki.algorithm.algorithm;
        if *alg == OID_KEY_TYPE_EC_PUBLIC_KEY {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok());
            match curve {
                Some(c) if c == OID_EC_P256 => Ok(PublicKeyKind::EcP256),
                Some(c) if c == OID_NIST_EC_P384 => Ok(PublicKeyKind::EcP384),
                Some(c) => Err(PkiError::UnsupportedKey(format!(
                    "EC curve {c} is not accepted; use P-256 or P-384"
                ))),
                None => Err(PkiError::UnsupportedKey(
                    "EC key without a named curve".into(),
                )),
            }
        } else if *alg == OID_PKCS1_RSAENCRYPTION {
            let bits = match spki.parsed() {
                Ok(PublicKey::RSA(rsa)) => modulus_bits(rsa.modulus),
                _ => return Err(PkiError::UnsupportedKey("malformed RSA public key".into())),
            };
            if !(2048..=8192).contains(&bits) {
                return Err(PkiError::UnsupportedKey(format!(
                    "RSA-{bits} is not accepted; use 2048 to 8192 bits"
                )));
            }
            Ok(PublicKeyKind::Rsa { bits })
        } else {
            Err(PkiError::UnsupportedKey(format!(
                "key algorithm {alg} is not accepted; use ECDSA P-256, P-384 or RSA 2048-8192"
            )))
        }
    }

    /// The rcgen algorithm naming this key's family. Used only to describe a subject key;
    /// the issuer's own key decides how a certificate is signed.
    pub(crate) fn rcgen_alg(self) -> &'static rcgen::SignatureAlgorithm {
        match self {
            PublicKeyKind::EcP256 => &PKCS_ECDSA_P256_SHA256,
            PublicKeyKind::EcP384 => &PKCS_ECDSA_P384_SHA384,
            PublicKeyKind::Rsa { .. } => &PKCS_RSA_SHA256,
        }
    }
}

fn modulus_bits(modulus: &[u8]) -> u32 {
    let m = match modulus.iter().position(|&b| b != 0) {
        Some(i) => &modulus[i..],
        None => return 0,
    };
    (m.len() as u32 - 1) * 8 + (8 - m[0].leading_zeros())
}

/// Loads a private key from PEM: PKCS#8 (`PRIVATE KEY`), PKCS#1 (`RSA PRIVATE KEY`) or
/// SEC1 (`EC PRIVATE KEY`), the three forms found in real `cacerts` secrets.
///
/// Errors never include key bytes.
pub fn load_private_key_pem(pem: &[u8]) -> Result<KeyPair, PkiError> {
    let key = PrivateKeyDer::from_pem_slice(pem)
        .map_err(|_| PkiError::invalid("no readable PRIVATE KEY block (PKCS#8, PKCS#1 or SEC1)"))?;
    let unreadable = || PkiError::invalid("the private key could not be loaded");
    match key {
        PrivateKeyDer::Pkcs8(k) => {
            KeyPair::try_from(k.secret_pkcs8_der()).map_err(|_| unreadable())
        }
        PrivateKeyDer::Pkcs1(k) => {
            use rsa::pkcs1::DecodeRsaPrivateKey;
            use rsa::pkcs8::EncodePrivateKey;
            let rsa = rsa::RsaPrivateKey::from_pkcs1_der(k.secret_pkcs1_der())
                .map_err(|_| unreadable())?;
            let der = rsa.to_pkcs8_der().map_err(|_| unreadable())?;
            KeyPair::from_pkcs8_der_and_sign_algo(
                &PrivatePkcs8KeyDer::from(der.as_bytes()),
                &PKCS_RSA_SHA256,
            )
            .map_err(|_| unreadable())
        }
        PrivateKeyDer::Sec1(k) => {
            // Wrap SEC1 in PKCS#8 for each curve we support; ring accepts only the right one.
            for curve in [&OID_EC_P256, &OID_NIST_EC_P384] {
                let pkcs8 = sec1_to_pkcs8(k.secret_sec1_der(), curve.as_bytes());
                if let Ok(kp) = KeyPair::try_from(pkcs8.as_slice()) {
                    return Ok(kp);
                }
            }
            Err(unreadable())
        }
        _ => Err(unreadable()),
    }
}

/// DER: PrivateKeyInfo { 0, AlgorithmIdentifier { id-ecPublicKey, curve }, OCTET STRING sec1 }.
fn sec1_to_pkcs8(sec1: &[u8], curve_oid_content: &[u8]) -> Vec<u8> {
    let ec_oid = OID_KEY_TYPE_EC_PUBLIC_KEY;
    let alg = der_tlv(
        0x30,
        &[
            der_tlv(0x06, ec_oid.as_bytes()),
            der_tlv(0x06, curve_oid_content),
        ]
        .concat(),
    );
    let body = [der_tlv(0x02, &[0]), alg, der_tlv(0x04, sec1)].concat();
    der_tlv(0x30, &body)
}

fn der_tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|&&b| b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
    out.extend_from_slice(content);
    out
}

/// The key type of a key pair we hold, for status output and audit logs.
pub fn key_pair_kind(kp: &KeyPair) -> Result<PublicKeyKind, PkiError> {
    spki_kind(&rcgen::PublicKeyData::subject_public_key_info(kp))
}

/// The key type of a DER SubjectPublicKeyInfo (e.g. [`super::cakey::spki`] of a CA key).
pub fn spki_kind(spki_der: &[u8]) -> Result<PublicKeyKind, PkiError> {
    let (_, spki) = <SubjectPublicKeyInfo as x509_parser::prelude::FromDer<_>>::from_der(spki_der)
        .map_err(|_| PkiError::invalid("unreadable public key"))?;
    PublicKeyKind::of_spki(&spki)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_type_names_round_trip() {
        for k in KeyType::ALL {
            assert_eq!(k.as_str().parse::<KeyType>().unwrap(), k);
        }
        let err = "ed25519".parse::<KeyType>().unwrap_err();
        assert!(err.contains("ec-p256, ec-p384, rsa-2048"), "{err}");
    }

    #[test]
    fn generates_and_classifies_ec_and_rsa() {
        for (kt, want) in [
            (KeyType::EcP256, PublicKeyKind::EcP256),
            (KeyType::EcP384, PublicKeyKind::EcP384),
            (KeyType::Rsa2048, PublicKeyKind::Rsa { bits: 2048 }),
        ] {
            let kp = kt.generate().unwrap();
            assert_eq!(key_pair_kind(&kp).unwrap(), want);
            // Reloading the PEM we would write gives the same public key.
            let again = load_private_key_pem(kp.serialize_pem().as_bytes()).unwrap();
            assert_eq!(again.public_key_raw(), kp.public_key_raw());
        }
    }

    #[test]
    fn loads_sec1_and_pkcs1_forms() {
        // SEC1: build from a generated PKCS#8 key by stripping the wrapper openssl-style.
        let kp = KeyType::EcP384.generate().unwrap();
        let (_, info) = x509_parser::der_parser::parse_der(kp.serialized_der()).unwrap();
        let seq = info.as_sequence().unwrap();
        let sec1 = seq[2].as_slice().unwrap();
        let pem = super::super::pem::encode("EC PRIVATE KEY", sec1);
        let loaded = load_private_key_pem(pem.as_bytes()).unwrap();
        assert_eq!(loaded.public_key_raw(), kp.public_key_raw());

        use rsa::pkcs1::EncodeRsaPrivateKey;
        use rsa::pkcs8::DecodePrivateKey;
        let rsa_kp = KeyType::Rsa2048.generate().unwrap();
        let rsa = rsa::RsaPrivateKey::from_pkcs8_der(rsa_kp.serialized_der()).unwrap();
        let pkcs1 = rsa.to_pkcs1_der().unwrap();
        let pem = super::super::pem::encode("RSA PRIVATE KEY", pkcs1.as_bytes());
        let loaded = load_private_key_pem(pem.as_bytes()).unwrap();
        assert_eq!(loaded.public_key_raw(), rsa_kp.public_key_raw());
    }

    #[test]
    fn garbage_keys_are_refused_without_echo() {
        let err =
            load_private_key_pem(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
                .unwrap_err()
                .to_string();
        assert!(!err.contains("AAAA"), "{err}");
        assert!(load_private_key_pem(b"not a key").is_err());
    }

    #[test]
    fn modulus_bit_count() {
        assert_eq!(modulus_bits(&[0x00, 0x80, 0x00]), 16);
        assert_eq!(modulus_bits(&[0x01, 0x00]), 9);
        assert_eq!(modulus_bits(&[]), 0);
    }
}
