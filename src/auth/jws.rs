//! Compact JWS (RFC 7515) signing and verification over ring.
//!
//! jsonwebtoken has no ring backend and its rust_crypto backend verifies only 5-8k tokens/s;
//! ring does RS256 at ~57k/s. The format is small: three base64url parts, a JSON header with
//! `alg` and `kid`, and a signature over `header.payload`.

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use ring::signature::{self, EcdsaKeyPair, KeyPair as _, RsaKeyPair};
use serde::Deserialize;

/// Tokens larger than this are refused before decoding. Real SA tokens are ~1 KiB.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// The JWS algorithms accepted: those Kubernetes issuers use, none of them HMAC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alg {
    /// RSASSA-PKCS1-v1_5 with SHA-256.
    RS256,
    /// RSASSA-PKCS1-v1_5 with SHA-384.
    RS384,
    /// RSASSA-PKCS1-v1_5 with SHA-512.
    RS512,
    /// ECDSA P-256 with SHA-256.
    ES256,
    /// ECDSA P-384 with SHA-384.
    ES384,
}

impl Alg {
    /// The algorithm with this JOSE `alg` name; `None` for any other (including `none` and HMAC).
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "RS256" => Alg::RS256,
            "RS384" => Alg::RS384,
            "RS512" => Alg::RS512,
            "ES256" => Alg::ES256,
            "ES384" => Alg::ES384,
            _ => return None,
        })
    }
    /// The JOSE `alg` name.
    pub fn as_str(self) -> &'static str {
        match self {
            Alg::RS256 => "RS256",
            Alg::RS384 => "RS384",
            Alg::RS512 => "RS512",
            Alg::ES256 => "ES256",
            Alg::ES384 => "ES384",
        }
    }
}

/// Why a token's JWS layer was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwsError {
    /// Over [`MAX_TOKEN_BYTES`]; refused before decoding.
    #[error("token is larger than {MAX_TOKEN_BYTES} bytes")]
    TooLarge,
    /// Not three base64url parts with a JSON header; the text says which part.
    #[error("token is malformed: {0}")]
    Malformed(&'static str),
    /// `alg: none`: unsigned tokens are never accepted.
    #[error("unsigned tokens (alg \"none\") are not accepted")]
    AlgNone,
    /// An `alg` outside [`Alg`] (HMAC included); holds at most 16 characters of it.
    #[error("token algorithm {0:?} is not accepted (RS256, RS384, RS512, ES256, ES384 are)")]
    UnsupportedAlg(String),
    /// The `kid` names no key in the JWKS (the issuer may have rotated its keys).
    #[error("token key id {0:?} is not in the trusted key set")]
    UnknownKid(String),
    /// No `kid`, and no key of the algorithm's type verifies the signature.
    #[error("token has no key id and no trusted key of its type verifies it")]
    NoMatchingKey,
    /// The key was found but the signature does not verify.
    #[error("token signature does not verify")]
    BadSignature,
}

/// A decoded but not yet verified token.
pub struct Parsed<'a> {
    /// From the header.
    pub alg: Alg,
    /// From the header; `None` means every key of the algorithm's type is tried.
    pub kid: Option<String>,
    /// The bytes the signature covers: `header.payload`, still base64url.
    pub signing_input: &'a [u8],
    /// The decoded payload (the claims JSON).
    pub payload: Vec<u8>,
    /// The decoded signature.
    pub signature: Vec<u8>,
}

#[derive(Deserialize)]
struct Header {
    alg: Option<String>,
    kid: Option<String>,
    crit: Option<serde_json::Value>,
}

/// Splits and decodes a compact JWS, refusing oversized tokens, `alg: none`, unknown algorithms and
/// `crit` headers. Verifies nothing.
pub fn parse(token: &str) -> Result<Parsed<'_>, JwsError> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(JwsError::TooLarge);
    }
    let mut parts = token.split('.');
    let (h, p, s) = match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(h), Some(p), Some(s), None) => (h, p, s),
        _ => return Err(JwsError::Malformed("expected three dot-separated parts")),
    };
    let header_bytes = B64
        .decode(h)
        .map_err(|_| JwsError::Malformed("header is not base64url"))?;
    let header: Header = serde_json::from_slice(&header_bytes)
        .map_err(|_| JwsError::Malformed("header is not a JSON object"))?;
    if header.crit.is_some() {
        return Err(JwsError::Malformed(
            "critical header parameters are not supported",
        ));
    }
    let alg_name = header.alg.ok_or(JwsError::Malformed("header has no alg"))?;
    if alg_name.eq_ignore_ascii_case("none") {
        return Err(JwsError::AlgNone);
    }
    let alg = Alg::parse(&alg_name)
        .ok_or_else(|| JwsError::UnsupportedAlg(alg_name.chars().take(16).collect()))?;
    let payload = B64
        .decode(p)
        .map_err(|_| JwsError::Malformed("payload is not base64url"))?;
    let signature = B64
        .decode(s)
        .map_err(|_| JwsError::Malformed("signature is not base64url"))?;
    if signature.is_empty() {
        return Err(JwsError::Malformed("signature is empty"));
    }
    Ok(Parsed {
        alg,
        kid: header.kid,
        signing_input: &token.as_bytes()[..h.len() + 1 + p.len()],
        payload,
        signature,
    })
}

/// A token's claims WITHOUT verifying anything. Only for hints that grant nothing: which
/// identity to put in a CSR, when a token file has expired, how long to cache a review that
/// the API server already approved.
pub fn unverified_claims(token: &str) -> Option<serde_json::Value> {
    if token.len() > MAX_TOKEN_BYTES {
        return None;
    }
    let payload = token.split('.').nth(1)?;
    serde_json::from_slice(&B64.decode(payload).ok()?).ok()
}

/// A key that signs tokens: dev tokens, the benchmark and tests.
pub enum SigningKey {
    /// RS256 key.
    Rsa(RsaKeyPair),
    /// ES256 key.
    EcP256(EcdsaKeyPair),
}

impl SigningKey {
    /// A fresh P-256 key, for tests that sign tokens (one helper instead of one per module).
    #[cfg(test)]
    pub(crate) fn generate_p256() -> Self {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = ring::signature::EcdsaKeyPair::generate_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &rng,
        )
        .expect("ring generates a P-256 key");
        Self::from_pkcs8_pem(&crate::pki::pem::encode("PRIVATE KEY", pkcs8.as_ref()))
            .expect("its own PKCS#8 loads")
    }

    /// Loads a PKCS#8 key (PEM `PRIVATE KEY`).
    pub fn from_pkcs8_pem(pem: &str) -> Result<Self, String> {
        let der = ::pem::parse(pem)
            .map_err(|_| "not a PEM private key".to_string())?
            .into_contents();
        if let Ok(k) = RsaKeyPair::from_pkcs8(&der) {
            return Ok(SigningKey::Rsa(k));
        }
        let rng = ring::rand::SystemRandom::new();
        EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &der, &rng)
            .map(SigningKey::EcP256)
            .map_err(|_| "the key is neither RSA nor EC P-256 PKCS#8".to_string())
    }

    /// The algorithm its signatures use: RS256 or ES256.
    pub fn alg(&self) -> Alg {
        match self {
            SigningKey::Rsa(_) => Alg::RS256,
            SigningKey::EcP256(_) => Alg::ES256,
        }
    }

    /// The public half as a JWK, with the Kubernetes-style kid.
    pub fn public_jwk(&self) -> serde_json::Value {
        match self {
            SigningKey::Rsa(k) => {
                let c: signature::RsaPublicKeyComponents<Vec<u8>> = k.public().into();
                serde_json::json!({"kty":"RSA","alg":"RS256","use":"sig","kid":self.kid(),"n":B64.encode(&c.n),"e":B64.encode(&c.e)})
            }
            SigningKey::EcP256(k) => {
                let point = k.public_key().as_ref();
                serde_json::json!({"kty":"EC","crv":"P-256","alg":"ES256","use":"sig","kid":self.kid(),
                    "x":B64.encode(&point[1..33]),"y":B64.encode(&point[33..65])})
            }
        }
    }

    /// kid = base64url(SHA-256(public key bytes)), stable for a given key.
    pub fn kid(&self) -> String {
        let pk: &[u8] = match self {
            SigningKey::Rsa(k) => k.public().as_ref(),
            SigningKey::EcP256(k) => k.public_key().as_ref(),
        };
        B64.encode(ring::digest::digest(&ring::digest::SHA256, pk).as_ref())
    }

    /// Signs `claims` into a compact JWS with this key's kid.
    pub fn sign(&self, claims: &serde_json::Value) -> String {
        let header =
            serde_json::json!({"alg": self.alg().as_str(), "kid": self.kid(), "typ": "JWT"});
        let input = format!(
            "{}.{}",
            B64.encode(header.to_string()),
            B64.encode(claims.to_string())
        );
        let rng = ring::rand::SystemRandom::new();
        let sig = match self {
            SigningKey::Rsa(k) => {
                let mut sig = vec![0; k.public().modulus_len()];
                k.sign(
                    &signature::RSA_PKCS1_SHA256,
                    &rng,
                    input.as_bytes(),
                    &mut sig,
                )
                .expect("RSA signing failed");
                sig
            }
            SigningKey::EcP256(k) => k
                .sign(&rng, input.as_bytes())
                .expect("ECDSA signing failed")
                .as_ref()
                .to_vec(),
        };
        format!("{input}.{}", B64.encode(sig))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_rejects_malformed_shapes() {
        assert_eq!(
            parse("a.b").err(),
            Some(JwsError::Malformed("expected three dot-separated parts"))
        );
        assert_eq!(
            parse("a.b.c.d").err(),
            Some(JwsError::Malformed("expected three dot-separated parts"))
        );
        assert_eq!(
            parse("!!.b.c").err(),
            Some(JwsError::Malformed("header is not base64url"))
        );
        let none = format!("{}.{}.", B64.encode(r#"{"alg":"none"}"#), B64.encode("{}"));
        assert_eq!(parse(&none).err(), Some(JwsError::AlgNone));
        let hs = format!(
            "{}.{}.c2ln",
            B64.encode(r#"{"alg":"HS256"}"#),
            B64.encode("{}")
        );
        assert_eq!(
            parse(&hs).err(),
            Some(JwsError::UnsupportedAlg("HS256".into()))
        );
        let big = "a".repeat(MAX_TOKEN_BYTES + 1);
        assert_eq!(parse(&big).err(), Some(JwsError::TooLarge));
    }
}
