//! One CA key inside a token: generated there, found by label, signing through the seam.

use std::sync::Arc;

use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType as CkKeyType, ObjectClass};
use cryptoki::session::Session;

use super::token::{find, find_private_key};
use super::{HsmError, Token};
use crate::pki::cakey::{self, ecdsa_fixed_to_der};
use crate::pki::{CaKey, KeyError, KeyType, SignatureAlgorithm};

/// The mechanisms a token must offer for each key type: key-pair generation and signing.
/// Signing ECDSA uses `CKM_ECDSA` over a digest made here (every module has it; the hashing
/// variants are optional), RSA `CKM_SHA256_RSA_PKCS`.
pub const MECHANISMS: [(KeyType, MechanismType, MechanismType); 5] = [
    (
        KeyType::EcP256,
        MechanismType::ECC_KEY_PAIR_GEN,
        MechanismType::ECDSA,
    ),
    (
        KeyType::EcP384,
        MechanismType::ECC_KEY_PAIR_GEN,
        MechanismType::ECDSA,
    ),
    (
        KeyType::Rsa2048,
        MechanismType::RSA_PKCS_KEY_PAIR_GEN,
        MechanismType::SHA256_RSA_PKCS,
    ),
    (
        KeyType::Rsa3072,
        MechanismType::RSA_PKCS_KEY_PAIR_GEN,
        MechanismType::SHA256_RSA_PKCS,
    ),
    (
        KeyType::Rsa4096,
        MechanismType::RSA_PKCS_KEY_PAIR_GEN,
        MechanismType::SHA256_RSA_PKCS,
    ),
];

/// DER OIDs of the curves, as `CKA_EC_PARAMS` (namedCurve).
const P256_PARAMS: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const P384_PARAMS: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];

/// A CA private key in a PKCS#11 token. Holds the label and the public half only.
pub struct Pkcs11Key {
    token: Arc<Token>,
    label: String,
    alg: SignatureAlgorithm,
    public_key: Vec<u8>,
}

impl std::fmt::Debug for Pkcs11Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pkcs11Key")
            .field("token", &self.token.label())
            .field("label", &self.label)
            .field("algorithm", &self.alg)
            .finish()
    }
}

impl Pkcs11Key {
    /// Generates a key pair of type `kt` inside the token: private half `CKA_TOKEN`,
    /// `CKA_PRIVATE`, `CKA_SENSITIVE`, not `CKA_EXTRACTABLE`, sign only; public half beside it
    /// with the same label and `CKA_ID` (`id`). Refuses a label already in use.
    pub fn generate(
        token: &Arc<Token>,
        kt: KeyType,
        label: &str,
        id: &[u8],
    ) -> Result<Self, HsmError> {
        let (mechanism, public_template) = match kt {
            KeyType::EcP256 | KeyType::EcP384 => (
                Mechanism::EccKeyPairGen,
                vec![Attribute::EcParams(
                    if kt == KeyType::EcP256 {
                        P256_PARAMS
                    } else {
                        P384_PARAMS
                    }
                    .to_vec(),
                )],
            ),
            KeyType::Rsa2048 | KeyType::Rsa3072 | KeyType::Rsa4096 => {
                let bits: u64 = match kt {
                    KeyType::Rsa2048 => 2048,
                    KeyType::Rsa3072 => 3072,
                    _ => 4096,
                };
                (
                    Mechanism::RsaPkcsKeyPairGen,
                    vec![
                        Attribute::ModulusBits(bits.into()),
                        Attribute::PublicExponent(vec![0x01, 0x00, 0x01]),
                    ],
                )
            }
        };
        let common = |private: bool| {
            vec![
                Attribute::Token(true),
                Attribute::Private(private),
                Attribute::Label(label.as_bytes().to_vec()),
                Attribute::Id(id.to_vec()),
            ]
        };
        let mut public = common(false);
        public.extend(public_template);
        public.extend([Attribute::Verify(true), Attribute::Encrypt(false)]);
        let mut private = common(true);
        private.extend([
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Sign(true),
            Attribute::Decrypt(false),
            Attribute::Derive(false),
            Attribute::Unwrap(false),
        ]);
        let public_key = token.admin(|s, t| {
            if find(s, t, label, ObjectClass::PRIVATE_KEY)?.is_some() {
                return Err(HsmError::Config(format!(
                    "PKCS#11 token {t:?} already holds a key labelled {label:?}"
                )));
            }
            let (pubh, _) = s
                .generate_key_pair(&mechanism, &public, &private)
                .map_err(|e| HsmError::call(t, "generate key pair", e))?;
            public_key_of(s, t, label, pubh)
        })?;
        let alg = algorithm_of(kt);
        tracing::info!(target: "citadel::audit", event = "pkcs11_key_generated", token = %token.label(), label = %label, key_type = %kt, "generated a CA key inside the PKCS#11 token (sensitive, not extractable)");
        Ok(Self {
            token: token.clone(),
            label: label.to_string(),
            alg,
            public_key,
        })
    }

    /// The key labelled `label`, which must be the one whose SubjectPublicKeyInfo is `spki`
    /// (from the journal and the certificate): the token's public twin is read and compared,
    /// and the private half must exist.
    pub fn open(token: &Arc<Token>, label: &str, spki: &[u8]) -> Result<Self, HsmError> {
        let public_key = token.admin(|s, t| {
            find_private_key(s, t, label)?;
            let pubh = find(s, t, label, ObjectClass::PUBLIC_KEY)?.ok_or_else(|| {
                HsmError::KeyNotFound {
                    token: t.to_string(),
                    label: format!("{label} (public key)"),
                }
            })?;
            public_key_of(s, t, label, pubh)
        })?;
        let kind = crate::pki::keys::spki_kind(spki)
            .map_err(|e| HsmError::Config(format!("key {label:?}: {e}")))?;
        let alg = match kind {
            crate::pki::PublicKeyKind::EcP256 => SignatureAlgorithm::EcdsaP256Sha256,
            crate::pki::PublicKeyKind::EcP384 => SignatureAlgorithm::EcdsaP384Sha384,
            crate::pki::PublicKeyKind::Rsa { .. } => SignatureAlgorithm::RsaPkcs1Sha256,
        };
        let key = Self {
            token: token.clone(),
            label: label.to_string(),
            alg,
            public_key,
        };
        if cakey::spki(&key) != spki {
            return Err(HsmError::KeyMismatch {
                token: token.label().to_string(),
                label: label.to_string(),
            });
        }
        Ok(key)
    }

    /// Destroys the key pair labelled `label` (both halves); nothing there is not an error.
    pub fn destroy(token: &Arc<Token>, label: &str) -> Result<bool, HsmError> {
        let destroyed = token.admin(|s, t| {
            let mut any = false;
            for class in [ObjectClass::PRIVATE_KEY, ObjectClass::PUBLIC_KEY] {
                if let Some(h) = find(s, t, label, class)? {
                    s.destroy_object(h)
                        .map_err(|e| HsmError::call(t, "destroy object", e))?;
                    any = true;
                }
            }
            Ok(any)
        })?;
        token.forget(label);
        if destroyed {
            tracing::info!(target: "citadel::audit", event = "pkcs11_key_destroyed", token = %token.label(), label = %label, "destroyed a retired CA key in the PKCS#11 token");
        }
        Ok(destroyed)
    }

    /// The key's label in the token.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// This key as the shared handle signers hold.
    pub fn shared(self) -> Arc<dyn CaKey> {
        Arc::new(self)
    }

    /// The signature in the token's own encoding (`r||s` for ECDSA).
    fn sign_raw(&self, msg: &[u8]) -> Result<Vec<u8>, KeyError> {
        let digest = |alg| ring::digest::digest(alg, msg).as_ref().to_vec();
        let (mechanism, data) = match self.alg {
            SignatureAlgorithm::EcdsaP256Sha256 => {
                (Mechanism::Ecdsa, digest(&ring::digest::SHA256))
            }
            SignatureAlgorithm::EcdsaP384Sha384 => {
                (Mechanism::Ecdsa, digest(&ring::digest::SHA384))
            }
            SignatureAlgorithm::RsaPkcs1Sha256 => (Mechanism::Sha256RsaPkcs, msg.to_vec()),
        };
        Ok(self.token.sign(&self.label, &mechanism, &data)?)
    }
}

impl CaKey for Pkcs11Key {
    fn algorithm(&self) -> SignatureAlgorithm {
        self.alg
    }

    fn public_key(&self) -> &[u8] {
        &self.public_key
    }

    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, KeyError> {
        let sig = self.sign_raw(msg)?;
        match self.alg {
            SignatureAlgorithm::RsaPkcs1Sha256 => Ok(sig),
            _ => ecdsa_fixed_to_der(&sig).ok_or_else(|| {
                KeyError::Failed(format!(
                    "PKCS#11 key {:?} returned a malformed ECDSA signature",
                    self.label
                ))
            }),
        }
    }

    /// The token already answers ECDSA in JWS's `r||s`: no DER round trip.
    fn sign_jws(&self, signing_input: &[u8]) -> Result<Vec<u8>, KeyError> {
        self.sign_raw(signing_input)
    }
}

fn algorithm_of(kt: KeyType) -> SignatureAlgorithm {
    match kt {
        KeyType::EcP256 => SignatureAlgorithm::EcdsaP256Sha256,
        KeyType::EcP384 => SignatureAlgorithm::EcdsaP384Sha384,
        _ => SignatureAlgorithm::RsaPkcs1Sha256,
    }
}

/// The SubjectPublicKeyInfo BIT STRING contents of a public-key object: the EC point
/// (`CKA_EC_POINT`, a DER OCTET STRING around `04||X||Y` per the standard, bare in some
/// modules), or a DER `RSAPublicKey` from `CKA_MODULUS` and `CKA_PUBLIC_EXPONENT`.
fn public_key_of(
    s: &Session,
    token: &str,
    label: &str,
    h: cryptoki::object::ObjectHandle,
) -> Result<Vec<u8>, HsmError> {
    let attrs = s
        .get_attributes(
            h,
            &[
                AttributeType::KeyType,
                AttributeType::EcPoint,
                AttributeType::Modulus,
                AttributeType::PublicExponent,
            ],
        )
        .map_err(|e| HsmError::call(token, "read public key", e))?;
    let (mut kt, mut point, mut n, mut e) = (None, None, None, None);
    for a in attrs {
        match a {
            Attribute::KeyType(k) => kt = Some(k),
            Attribute::EcPoint(p) => point = Some(p),
            Attribute::Modulus(m) => n = Some(m),
            Attribute::PublicExponent(x) => e = Some(x),
            _ => {}
        }
    }
    let bad = || {
        HsmError::Config(format!(
            "the public key {label:?} in token {token:?} is unreadable"
        ))
    };
    if kt == Some(CkKeyType::EC) {
        unwrap_ec_point(&point.ok_or_else(bad)?).ok_or_else(bad)
    } else if kt == Some(CkKeyType::RSA) {
        Ok(cakey::rsa_public_key_der(
            &n.ok_or_else(bad)?,
            &e.ok_or_else(bad)?,
        ))
    } else {
        Err(HsmError::Config(format!(
            "the key {label:?} in token {token:?} is neither EC nor RSA"
        )))
    }
}

/// `CKA_EC_POINT` to the bare uncompressed point: the standard's DER OCTET STRING unwrapped,
/// or the value itself when a module returns it bare.
fn unwrap_ec_point(v: &[u8]) -> Option<Vec<u8>> {
    // An uncompressed P-256 or P-384 point is 65 or 97 bytes; wrapped, 67 or 99.
    let bare =
        |p: &[u8]| (p.first() == Some(&0x04) && matches!(p.len(), 65 | 97)).then(|| p.to_vec());
    bare(v).or_else(|| match v {
        [0x04, len, rest @ ..] if usize::from(*len) == rest.len() => bare(rest),
        [0x04, 0x81, len, rest @ ..] if usize::from(*len) == rest.len() => bare(rest),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ec_points_are_unwrapped_from_their_octet_string_or_taken_bare() {
        let point: Vec<u8> = std::iter::once(0x04).chain(1..=64u8).collect();
        let mut wrapped = vec![0x04, 65];
        wrapped.extend(&point);
        assert_eq!(unwrap_ec_point(&wrapped).unwrap(), point);
        assert_eq!(unwrap_ec_point(&point).unwrap(), point);
        let p384: Vec<u8> = std::iter::once(0x04).chain(1..=96u8).collect();
        let mut wrapped = vec![0x04, 0x61];
        wrapped.extend(&p384);
        assert_eq!(unwrap_ec_point(&wrapped).unwrap(), p384);
        assert_eq!(unwrap_ec_point(&[0x02, 1, 2]), None);
        assert_eq!(unwrap_ec_point(&[]), None);
    }
}
