//! JSON Web Key Sets, as a cluster serves them at `/openid/v1/jwks`.

use std::collections::HashMap;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use ring::signature::{self, RsaPublicKeyComponents, UnparsedPublicKey};
use serde::Deserialize;

use super::jws::{Alg, JwsError, Parsed};

#[derive(Debug, Clone)]
enum Key {
    Rsa { n: Vec<u8>, e: Vec<u8> },
    EcP256(Vec<u8>),
    EcP384(Vec<u8>),
}

impl Key {
    fn verify(&self, alg: Alg, msg: &[u8], sig: &[u8]) -> Option<bool> {
        let ok = match (self, alg) {
            (Key::Rsa { n, e }, Alg::RS256 | Alg::RS384 | Alg::RS512) => {
                let params = match alg {
                    Alg::RS256 => &signature::RSA_PKCS1_2048_8192_SHA256,
                    Alg::RS384 => &signature::RSA_PKCS1_2048_8192_SHA384,
                    _ => &signature::RSA_PKCS1_2048_8192_SHA512,
                };
                RsaPublicKeyComponents { n, e }
                    .verify(params, msg, sig)
                    .is_ok()
            }
            (Key::EcP256(pt), Alg::ES256) => {
                UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, pt)
                    .verify(msg, sig)
                    .is_ok()
            }
            (Key::EcP384(pt), Alg::ES384) => {
                UnparsedPublicKey::new(&signature::ECDSA_P384_SHA384_FIXED, pt)
                    .verify(msg, sig)
                    .is_ok()
            }
            _ => return None, // key type does not fit the algorithm
        };
        Some(ok)
    }
}

#[derive(Deserialize)]
struct RawSet {
    keys: Vec<RawKey>,
}

#[derive(Deserialize)]
struct RawKey {
    kty: String,
    kid: Option<String>,
    #[serde(rename = "use")]
    use_: Option<String>,
    n: Option<String>,
    e: Option<String>,
    crv: Option<String>,
    x: Option<String>,
    y: Option<String>,
}

/// A set of verification keys, by kid.
#[derive(Debug, Clone, Default)]
pub struct Jwks {
    by_kid: HashMap<String, Key>,
    all: Vec<Key>,
}

/// Why a JWKS document was refused.
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    /// Not JSON of the shape `{"keys": [...]}`.
    #[error("JWKS is not valid JSON of the form {{\"keys\": [...]}}: {0}")]
    Json(String),
    /// One key is unusable; `index` is its position in `keys`.
    #[error("JWKS key {index}: {reason}")]
    Key {
        /// Position of the key in `keys`.
        index: usize,
        /// Why it is unusable.
        reason: String,
    },
    /// No usable signing key once keys for other uses or of other types are skipped.
    #[error("JWKS holds no usable signing key")]
    Empty,
}

impl Jwks {
    /// Parses a JWKS document, skipping keys whose `use` is not `sig` and key types Kubernetes does
    /// not use.
    pub fn from_json(bytes: &[u8]) -> Result<Self, JwksError> {
        let raw: RawSet =
            serde_json::from_slice(bytes).map_err(|e| JwksError::Json(e.to_string()))?;
        let mut set = Jwks::default();
        for (index, k) in raw.keys.into_iter().enumerate() {
            if k.use_.as_deref().is_some_and(|u| u != "sig") {
                continue; // encryption keys are not for us
            }
            let bad = |reason: &str| JwksError::Key {
                index,
                reason: reason.to_string(),
            };
            let b64 = |v: Option<String>, name: &str| {
                v.ok_or_else(|| bad(&format!("missing {name}")))
                    .and_then(|s| {
                        B64.decode(s)
                            .map_err(|_| bad(&format!("{name} is not base64url")))
                    })
            };
            let key = match k.kty.as_str() {
                "RSA" => Key::Rsa {
                    n: b64(k.n, "n")?,
                    e: b64(k.e, "e")?,
                },
                "EC" => {
                    let (x, y) = (b64(k.x, "x")?, b64(k.y, "y")?);
                    let size = match k.crv.as_deref() {
                        Some("P-256") => 32,
                        Some("P-384") => 48,
                        _ => return Err(bad("crv must be P-256 or P-384")),
                    };
                    if x.len() != size || y.len() != size {
                        return Err(bad("x and y have the wrong length for the curve"));
                    }
                    let point = [&[4u8][..], &x, &y].concat();
                    if size == 32 {
                        Key::EcP256(point)
                    } else {
                        Key::EcP384(point)
                    }
                }
                _ => continue, // OKP and friends: not used by Kubernetes
            };
            if let Some(kid) = k.kid {
                set.by_kid.insert(kid, key.clone());
            }
            set.all.push(key);
        }
        if set.all.is_empty() {
            return Err(JwksError::Empty);
        }
        Ok(set)
    }

    /// How many keys it holds.
    pub fn len(&self) -> usize {
        self.all.len()
    }

    /// Whether it holds no key.
    pub fn is_empty(&self) -> bool {
        self.all.is_empty()
    }

    /// Verifies a parsed token's signature against the key its kid names (or, without a kid,
    /// against every key of the right type).
    pub fn verify(&self, token: &Parsed<'_>) -> Result<(), JwsError> {
        match &token.kid {
            Some(kid) => {
                let key = self
                    .by_kid
                    .get(kid)
                    .ok_or_else(|| JwsError::UnknownKid(kid.chars().take(64).collect()))?;
                match key.verify(token.alg, token.signing_input, &token.signature) {
                    Some(true) => Ok(()),
                    _ => Err(JwsError::BadSignature),
                }
            }
            None => {
                let mut tried = false;
                for key in &self.all {
                    match key.verify(token.alg, token.signing_input, &token.signature) {
                        Some(true) => return Ok(()),
                        Some(false) => tried = true,
                        None => {}
                    }
                }
                Err(if tried {
                    JwsError::BadSignature
                } else {
                    JwsError::NoMatchingKey
                })
            }
        }
    }
}
