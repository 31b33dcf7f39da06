//! The key-backend seam: every signature a CA makes goes through [`CaKey`].
//!
//! Leaves, serving certificates, intermediates and roots, cross-signed certificates and CRLs
//! are all signed by rcgen, and rcgen signs with whatever implements its own
//! [`rcgen::SigningKey`]. [`RcgenKey`] is the one adapter from a `dyn CaKey` to that trait, so
//! a key held elsewhere (a PKCS#11 token, a cloud KMS) can stand in for today's in-memory
//! [`SoftwareKey`] without touching the certificate code. Future JWT-SVIDs sign the JWS
//! signing input with [`CaKey::sign_jws`].

use std::cell::RefCell;
use std::fmt;
use std::sync::Arc;

use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384, PKCS_RSA_SHA256};

use super::{KeyType, PkiError};

/// The signature algorithms a CA key can make; the key decides, not the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SignatureAlgorithm {
    /// ECDSA on P-256 with SHA-256 (X.509 `ecdsa-with-SHA256`, JWS `ES256`).
    EcdsaP256Sha256,
    /// ECDSA on P-384 with SHA-384 (X.509 `ecdsa-with-SHA384`, JWS `ES384`).
    EcdsaP384Sha384,
    /// RSASSA-PKCS1-v1_5 with SHA-256 (X.509 `sha256WithRSAEncryption`, JWS `RS256`), any
    /// modulus size.
    RsaPkcs1Sha256,
}

impl SignatureAlgorithm {
    /// rcgen's description of this algorithm: the OIDs written into certificates and CRLs.
    pub fn rcgen(self) -> &'static rcgen::SignatureAlgorithm {
        match self {
            SignatureAlgorithm::EcdsaP256Sha256 => &PKCS_ECDSA_P256_SHA256,
            SignatureAlgorithm::EcdsaP384Sha384 => &PKCS_ECDSA_P384_SHA384,
            SignatureAlgorithm::RsaPkcs1Sha256 => &PKCS_RSA_SHA256,
        }
    }

    /// The algorithm an rcgen key pair signs with; `None` for one a CA may not use (Ed25519,
    /// RSA-PSS, ...), which citadel refuses as a CA key.
    pub fn of_rcgen(alg: &rcgen::SignatureAlgorithm) -> Option<Self> {
        [
            SignatureAlgorithm::EcdsaP256Sha256,
            SignatureAlgorithm::EcdsaP384Sha384,
            SignatureAlgorithm::RsaPkcs1Sha256,
        ]
        .into_iter()
        .find(|a| a.rcgen() == alg)
    }

    /// The JWS `alg` header value (RFC 7518): `ES256`, `ES384` or `RS256`, all in the JWT-SVID
    /// profile's allowed set.
    pub fn jws_name(self) -> &'static str {
        match self {
            SignatureAlgorithm::EcdsaP256Sha256 => "ES256",
            SignatureAlgorithm::EcdsaP384Sha384 => "ES384",
            SignatureAlgorithm::RsaPkcs1Sha256 => "RS256",
        }
    }

    /// For ECDSA, the length of one of r and s in JWS's fixed-width form (RFC 7518 §3.4).
    fn ecdsa_scalar_len(self) -> Option<usize> {
        match self {
            SignatureAlgorithm::EcdsaP256Sha256 => Some(32),
            SignatureAlgorithm::EcdsaP384Sha384 => Some(48),
            SignatureAlgorithm::RsaPkcs1Sha256 => None,
        }
    }
}

/// Why a key could not sign. Messages never carry key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The key exists but cannot sign right now (token removed, session lost, the HSM timed
    /// out or is overloaded): a later attempt may succeed, so surfaces answer "unavailable".
    #[error("the CA signing key is unavailable: {0}")]
    Unavailable(String),
    /// The key refused this signature for good (wrong mechanism, key not permitted to sign,
    /// a software failure): retrying will not help.
    #[error("the CA signing key failed to sign: {0}")]
    Failed(String),
}

/// A CA signing key: the one seam between what citadel signs and where the private key lives.
///
/// Why: every CA signature (leaf and serving certificates, intermediates and roots, cross-signs,
/// CRLs, and JWT-SVIDs to come) goes through this trait, via [`RcgenKey`] for everything rcgen
/// builds. The in-memory [`SoftwareKey`] is one implementation; a PKCS#11 key whose private
/// half never leaves the token is meant to be another, held by the same
/// `Arc<dyn CaKey>` in the active signer.
///
/// What an implementation must provide (and what a PKCS#11 backend must therefore do):
/// - [`algorithm`](CaKey::algorithm): fixed for the key's life, one of
///   [`SignatureAlgorithm`]; it decides the algorithm OIDs in everything signed. For PKCS#11:
///   `CKK_EC` on P-256 with `CKM_ECDSA` over a SHA-256 digest (or `CKM_ECDSA_SHA256`), P-384
///   with SHA-384, `CKK_RSA` with `CKM_SHA256_RSA_PKCS`.
/// - [`public_key`](CaKey::public_key): the contents of the SubjectPublicKeyInfo BIT STRING
///   (an uncompressed EC point `04||X||Y`, or a DER PKCS#1 `RSAPublicKey`), read once at load
///   (`CKA_EC_POINT` unwrapped from its OCTET STRING, or `CKA_MODULUS`/`CKA_PUBLIC_EXPONENT`
///   encoded) and returned by reference: rcgen asks for it on every signature.
///   [`spki`] builds the full SubjectPublicKeyInfo from it, which must equal the one in the
///   CA certificate (the signer checks at load).
/// - [`sign`](CaKey::sign): the signature over the whole message (the key hashes), in the
///   encoding X.509 uses: for ECDSA a DER `Ecdsa-Sig-Value` (PKCS#11's `CKM_ECDSA` returns
///   fixed `r||s`; convert with [`ecdsa_fixed_to_der`]), for RSA the PKCS#1 v1.5 signature.
///   It is called synchronously from rcgen on the signing thread (in the server, a tokio
///   worker), so it must not block for long; it may fail, and must report that as a
///   [`KeyError`] rather than panic. `Unavailable` for a failure a retry may cure.
/// - `Send + Sync`: one key signs for every request at once. A backend whose sessions are not
///   thread-safe keeps a pool or a lock inside.
/// - [`sign_jws`](CaKey::sign_jws) has a default (RSA: the same bytes; ECDSA: DER converted to
///   the fixed-width `r||s` JWS wants); a backend that natively produces `r||s` may override
///   it to skip the round trip.
///
/// `Debug` output must never contain private key material.
pub trait CaKey: Send + Sync + fmt::Debug {
    /// The algorithm every signature by this key uses.
    fn algorithm(&self) -> SignatureAlgorithm;

    /// The public key: the SubjectPublicKeyInfo's BIT STRING contents (see the trait docs).
    fn public_key(&self) -> &[u8];

    /// Signs `msg` (not a digest) in X.509's encoding: DER `Ecdsa-Sig-Value` for ECDSA,
    /// PKCS#1 v1.5 for RSA.
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, KeyError>;

    /// Signs a JWS signing input (`base64url(header) '.' base64url(payload)`) in JWS's
    /// encoding (RFC 7518 §3): fixed-width `r||s` for ES256/ES384, PKCS#1 v1.5 for RS256.
    fn sign_jws(&self, signing_input: &[u8]) -> Result<Vec<u8>, KeyError> {
        let sig = self.sign(signing_input)?;
        match self.algorithm().ecdsa_scalar_len() {
            Some(n) => ecdsa_der_to_fixed(&sig, n).ok_or_else(|| {
                KeyError::Failed("the key returned a malformed ECDSA signature".into())
            }),
            None => Ok(sig),
        }
    }
}

/// The DER SubjectPublicKeyInfo of `key`, as it appears in a certificate for it.
pub fn spki(key: &dyn CaKey) -> Vec<u8> {
    rcgen::PublicKeyData::subject_public_key_info(&PublicHalf(key))
}

/// A CA key held in memory as PKCS#8, signing with ring through rcgen: today's only backend,
/// and the one whose keys the journal and `cacerts` store.
pub struct SoftwareKey {
    key: KeyPair,
    alg: SignatureAlgorithm,
}

impl SoftwareKey {
    /// Wraps a loaded key pair; refuses an algorithm a CA may not sign with.
    pub fn new(key: KeyPair) -> Result<Self, PkiError> {
        let alg = SignatureAlgorithm::of_rcgen(key.algorithm()).ok_or_else(|| {
            PkiError::UnsupportedKey(
                "a CA key must be ECDSA P-256, ECDSA P-384 or RSA (PKCS#1 v1.5, SHA-256)".into(),
            )
        })?;
        Ok(Self { key, alg })
    }

    /// A fresh key of type `kt`.
    pub fn generate(kt: KeyType) -> Result<Self, PkiError> {
        Self::new(kt.generate()?)
    }

    /// Loads a PEM private key (PKCS#8, PKCS#1 or SEC1; see
    /// [`super::keys::load_private_key_pem`]).
    pub fn from_pem(pem: &[u8]) -> Result<Self, PkiError> {
        Self::new(super::keys::load_private_key_pem(pem)?)
    }

    /// The private key as PKCS#8 PEM, for the journal. Only a software key can be exported.
    pub fn pkcs8_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// This key as the shared handle signers hold.
    pub fn shared(self) -> Arc<dyn CaKey> {
        Arc::new(self)
    }
}

impl fmt::Debug for SoftwareKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SoftwareKey")
            .field("algorithm", &self.alg)
            .finish_non_exhaustive()
    }
}

impl CaKey for SoftwareKey {
    fn algorithm(&self) -> SignatureAlgorithm {
        self.alg
    }

    fn public_key(&self) -> &[u8] {
        rcgen::PublicKeyData::der_bytes(&self.key)
    }

    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, KeyError> {
        // Exactly what rcgen did when it held the KeyPair itself: same bytes, same cost.
        rcgen::SigningKey::sign(&self.key, msg).map_err(|e| KeyError::Failed(e.to_string()))
    }
}

thread_local! {
    /// The last [`KeyError`] an [`RcgenKey`] hit on this thread. rcgen's `SigningKey::sign`
    /// can only return its own `Error::RemoteKeyError`, which carries nothing; rcgen signs
    /// synchronously on the caller's thread, so the caller's `PkiError::from` picks the real
    /// cause up here (see [`take_key_error`]).
    static LAST_KEY_ERROR: RefCell<Option<KeyError>> = const { RefCell::new(None) };
}

/// The cause of the `RemoteKeyError` rcgen just returned on this thread, if an [`RcgenKey`]
/// left one.
pub(crate) fn take_key_error() -> Option<KeyError> {
    LAST_KEY_ERROR.with(|e| e.borrow_mut().take())
}

/// A `dyn CaKey` as rcgen's issuer key: the adapter every rcgen signature goes through
/// (`Issuer<'_, RcgenKey>`, `CertificateParams::self_signed(&RcgenKey)`,
/// `CertificateRevocationListParams::signed_by`).
#[derive(Clone)]
pub struct RcgenKey(Arc<dyn CaKey>);

impl RcgenKey {
    /// Wraps `key` for rcgen.
    pub fn new(key: Arc<dyn CaKey>) -> Self {
        Self(key)
    }

    /// The key behind the adapter.
    pub fn key(&self) -> &Arc<dyn CaKey> {
        &self.0
    }
}

impl fmt::Debug for RcgenKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("RcgenKey").field(&self.0).finish()
    }
}

impl rcgen::PublicKeyData for RcgenKey {
    fn der_bytes(&self) -> &[u8] {
        self.0.public_key()
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        self.0.algorithm().rcgen()
    }
}

impl rcgen::SigningKey for RcgenKey {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        self.0.sign(msg).map_err(|e| {
            LAST_KEY_ERROR.with(|slot| *slot.borrow_mut() = Some(e));
            rcgen::Error::RemoteKeyError
        })
    }
}

/// The public half of a `dyn CaKey`, as rcgen's subject key (a cross-signed certificate
/// certifies a CA key's public half; [`spki`]).
struct PublicHalf<'a>(&'a dyn CaKey);

impl rcgen::PublicKeyData for PublicHalf<'_> {
    fn der_bytes(&self) -> &[u8] {
        self.0.public_key()
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        self.0.algorithm().rcgen()
    }
}

/// DER `Ecdsa-Sig-Value ::= SEQUENCE { r INTEGER, s INTEGER }` to JWS's `r||s`, each
/// left-padded to `n` bytes; `None` if it is not such a value or a scalar is too long.
pub fn ecdsa_der_to_fixed(der: &[u8], n: usize) -> Option<Vec<u8>> {
    let (tag, body, rest) = der_next(der)?;
    if tag != 0x30 || !rest.is_empty() {
        return None;
    }
    let mut out = Vec::with_capacity(2 * n);
    let mut cursor = body;
    for _ in 0..2 {
        let (tag, int, rest) = der_next(cursor)?;
        if tag != 0x02 {
            return None;
        }
        let start = int.iter().position(|&b| b != 0).unwrap_or(int.len());
        let digits = &int[start..];
        if digits.len() > n {
            return None;
        }
        out.resize(out.len() + n - digits.len(), 0);
        out.extend_from_slice(digits);
        cursor = rest;
    }
    cursor.is_empty().then_some(out)
}

/// JWS/PKCS#11 fixed-width `r||s` to a DER `Ecdsa-Sig-Value` (what X.509 carries); `None`
/// for an odd or empty input.
pub fn ecdsa_fixed_to_der(fixed: &[u8]) -> Option<Vec<u8>> {
    if fixed.is_empty() || !fixed.len().is_multiple_of(2) {
        return None;
    }
    let (r, s) = fixed.split_at(fixed.len() / 2);
    let int = |x: &[u8]| {
        let start = x.iter().position(|&b| b != 0).unwrap_or(x.len() - 1);
        let x = &x[start..];
        let mut v = Vec::with_capacity(x.len() + 1);
        if x[0] & 0x80 != 0 {
            v.push(0);
        }
        v.extend_from_slice(x);
        der_tlv(0x02, &v)
    };
    Some(der_tlv(0x30, &[int(r), int(s)].concat()))
}

/// A DER PKCS#1 `RSAPublicKey ::= SEQUENCE { modulus INTEGER, publicExponent INTEGER }` from
/// the big-endian unsigned modulus and exponent (as a PKCS#11 token gives them): the
/// SubjectPublicKeyInfo BIT STRING contents of an RSA key.
pub fn rsa_public_key_der(modulus: &[u8], exponent: &[u8]) -> Vec<u8> {
    let int = |x: &[u8]| {
        let start = x
            .iter()
            .position(|&b| b != 0)
            .unwrap_or(x.len().saturating_sub(1));
        let x = &x[start.min(x.len())..];
        let mut v = Vec::with_capacity(x.len() + 1);
        if x.first().is_none_or(|b| b & 0x80 != 0) {
            v.push(0);
        }
        v.extend_from_slice(x);
        der_tlv(0x02, &v)
    };
    der_tlv(0x30, &[int(modulus), int(exponent)].concat())
}

/// One DER TLV: (tag, contents, what follows). Short and long (up to 2-octet) lengths.
fn der_next(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = match first {
        l if l < 0x80 => (l as usize, rest),
        0x81 => {
            let (&l, rest) = rest.split_first()?;
            (l as usize, rest)
        }
        0x82 => {
            let (hi, rest) = rest.split_first_chunk::<2>()?;
            (u16::from_be_bytes(*hi) as usize, rest)
        }
        _ => return None,
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

fn der_tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else if len < 0x100 {
        out.extend_from_slice(&[0x81, len as u8]);
    } else {
        out.push(0x82);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    }
    out.extend_from_slice(content);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::{self, UnparsedPublicKey};

    #[test]
    fn jws_signatures_verify_with_ring_fixed_and_pkcs1() {
        let msg = b"eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ4In0";
        for (kt, alg, verify) in [
            (
                KeyType::EcP256,
                "ES256",
                &signature::ECDSA_P256_SHA256_FIXED as &dyn signature::VerificationAlgorithm,
            ),
            (
                KeyType::EcP384,
                "ES384",
                &signature::ECDSA_P384_SHA384_FIXED,
            ),
            (
                KeyType::Rsa2048,
                "RS256",
                &signature::RSA_PKCS1_2048_8192_SHA256,
            ),
        ] {
            let key = SoftwareKey::generate(kt).unwrap();
            assert_eq!(key.algorithm().jws_name(), alg);
            let sig = key.sign_jws(msg).unwrap();
            UnparsedPublicKey::new(verify, key.public_key())
                .verify(msg, &sig)
                .unwrap_or_else(|_| panic!("{alg} JWS signature verifies"));
            // And the X.509 form verifies as ASN.1 (ECDSA) or is the same bytes (RSA).
            let x509 = key.sign(msg).unwrap();
            if let Some(n) = key.algorithm().ecdsa_scalar_len() {
                assert_eq!(sig.len(), 2 * n);
                let asn1: &dyn signature::VerificationAlgorithm = if n == 32 {
                    &signature::ECDSA_P256_SHA256_ASN1
                } else {
                    &signature::ECDSA_P384_SHA384_ASN1
                };
                UnparsedPublicKey::new(asn1, key.public_key())
                    .verify(msg, &x509)
                    .unwrap();
                // fixed -> DER -> fixed round-trips.
                let der = ecdsa_fixed_to_der(&sig).unwrap();
                assert_eq!(ecdsa_der_to_fixed(&der, n).unwrap(), sig);
                UnparsedPublicKey::new(asn1, key.public_key())
                    .verify(msg, &der)
                    .unwrap();
            } else {
                assert_eq!(x509, sig, "RSA PKCS#1 v1.5 is deterministic");
            }
        }
    }

    #[test]
    fn an_rsa_public_key_from_modulus_and_exponent_is_the_one_in_the_spki() {
        // What a PKCS#11 token hands out (CKA_MODULUS, CKA_PUBLIC_EXPONENT) rebuilds the exact
        // RSAPublicKey a software key reports, whose first INTEGER needs a 0x00 pad.
        let key = SoftwareKey::generate(KeyType::Rsa2048).unwrap();
        let der = key.public_key();
        let (_, seq, _) = der_next(der).unwrap();
        let (_, n, rest) = der_next(seq).unwrap();
        let (_, e, _) = der_next(rest).unwrap();
        assert_eq!(n[0], 0, "a 2048-bit modulus has its top bit set");
        assert_eq!(rsa_public_key_der(&n[1..], e), der);
        assert_eq!(
            rsa_public_key_der(&[0, 0, 1, 2], &[1, 0, 1]),
            vec![0x30, 0x09, 0x02, 0x02, 1, 2, 0x02, 0x03, 1, 0, 1]
        );
    }

    #[test]
    fn der_conversion_pads_strips_and_refuses_garbage() {
        // r = 0x01 (padded), s = 0x80.. (DER needs a leading 0x00).
        let mut fixed = vec![0u8; 64];
        fixed[31] = 1;
        fixed[32] = 0x80;
        let der = ecdsa_fixed_to_der(&fixed).unwrap();
        assert_eq!(&der[..5], &[0x30, 0x26, 0x02, 0x01, 0x01]);
        assert_eq!(&der[5..8], &[0x02, 0x21, 0x00]);
        assert_eq!(ecdsa_der_to_fixed(&der, 32).unwrap(), fixed);
        assert_eq!(ecdsa_der_to_fixed(&der, 16), None, "s is too long");
        assert_eq!(ecdsa_der_to_fixed(&[0x30, 0x00], 32), None);
        assert_eq!(ecdsa_der_to_fixed(&[0x30, 0x05, 0x02], 32), None);
        assert_eq!(
            ecdsa_der_to_fixed(&[der.clone(), vec![0]].concat(), 32),
            None
        );
        assert_eq!(ecdsa_fixed_to_der(&[1, 2, 3]), None);
    }

    #[test]
    fn refuses_keys_a_ca_may_not_use_and_hides_the_key() {
        let ed = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        assert!(matches!(
            SoftwareKey::new(ed),
            Err(PkiError::UnsupportedKey(_))
        ));
        let key = SoftwareKey::generate(KeyType::EcP256).unwrap();
        let alone = format!("{key:?}");
        let shown = format!("{alone} {:?}", RcgenKey::new(key.shared()));
        assert!(!shown.contains("PRIVATE"), "{shown}");
        assert!(shown.contains("EcdsaP256Sha256"), "{shown}");
    }

    #[derive(Debug)]
    struct Broken(SignatureAlgorithm, Vec<u8>);

    impl CaKey for Broken {
        fn algorithm(&self) -> SignatureAlgorithm {
            self.0
        }
        fn public_key(&self) -> &[u8] {
            &self.1
        }
        fn sign(&self, _: &[u8]) -> Result<Vec<u8>, KeyError> {
            Err(KeyError::Unavailable("token removed".into()))
        }
    }

    #[test]
    fn a_failing_key_surfaces_its_cause_through_rcgen() {
        let real = SoftwareKey::generate(KeyType::EcP256).unwrap();
        let broken = RcgenKey::new(Arc::new(Broken(
            real.algorithm(),
            real.public_key().to_vec(),
        )));
        let params = rcgen::CertificateParams::default();
        let err = PkiError::from(params.self_signed(&broken).unwrap_err());
        assert!(
            matches!(&err, PkiError::Key(KeyError::Unavailable(m)) if m == "token removed"),
            "{err:?}"
        );
        // The slot is consumed: an unrelated later error does not inherit the cause.
        assert_eq!(take_key_error(), None);
    }

    #[test]
    fn the_seam_signs_byte_for_byte_what_the_bare_key_pair_signed() {
        // RSA PKCS#1 v1.5 signatures are deterministic, so a root, a leaf and a CRL signed
        // through the seam equal, byte for byte, those rcgen signed with the KeyPair itself
        // before the seam existed.
        use crate::identity::{ServiceAccount, TrustDomain};
        use crate::pki::profile;
        let td = TrustDomain::new("cluster.local").unwrap();
        let nb = time::macros::datetime!(2030-01-01 00:00 UTC);
        let na = time::macros::datetime!(2031-01-01 00:00 UTC);
        let bare = KeyType::Rsa2048.generate().unwrap();
        let seam = RcgenKey::new(
            SoftwareKey::from_pem(bare.serialize_pem().as_bytes())
                .unwrap()
                .shared(),
        );

        let root = profile::root(&td, &[7; 16], nb, na);
        let root_bare = root.self_signed(&bare).unwrap();
        assert_eq!(root_bare.der(), root.self_signed(&seam).unwrap().der());

        let old = rcgen::Issuer::from_ca_cert_der(root_bare.der(), &bare).unwrap();
        let new = rcgen::Issuer::from_ca_cert_der(root_bare.der(), seam.clone()).unwrap();
        let id = td.service_account_id(&ServiceAccount::new("shop", "cart").unwrap());
        let leaf = profile::workload(&id, &[9; 16], nb, na).unwrap();
        let subject = KeyType::EcP256.generate().unwrap();
        assert_eq!(
            leaf.signed_by(&subject, &old).unwrap().der(),
            leaf.signed_by(&subject, &new).unwrap().der()
        );

        let crl = rcgen::CertificateRevocationListParams {
            this_update: nb,
            next_update: na,
            crl_number: rcgen::SerialNumber::from(3u64),
            issuing_distribution_point: None,
            revoked_certs: vec![rcgen::RevokedCertParams {
                serial_number: rcgen::SerialNumber::from_slice(&[9; 16]),
                revocation_time: nb,
                reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                invalidity_date: None,
            }],
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        assert_eq!(
            crl.signed_by(&old).unwrap().der(),
            crl.signed_by(&new).unwrap().der()
        );
    }
}
