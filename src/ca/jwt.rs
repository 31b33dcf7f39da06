//! JWT-SVIDs: the CA's JWT signing keys (made here, scheduled by `plan`, kept in the journal),
//! the JWT bundle they form (a JWK Set, [`render_jwks`]), the installed snapshot the issue
//! path signs with ([`JwtKeys`]), and the JWS itself ([`sign_jwt_svid`]).
//!
//! The profile (SPIFFE JWT-SVID): JWS compact serialization; the header holds exactly `alg`,
//! `kid` and `typ: JWT`; `alg` follows the key (ES256 for P-256, ES384 for P-384, RS256 for
//! RSA: the CA key type); the claims are `sub` (the SPIFFE ID), `aud` (one or more, always an
//! array), `exp` and `iat`. The bundle holds only `use: jwt-svid` keys, each with its `kid`.
//! Signatures go through [`CaKey::sign_jws`], so a key held in an HSM can sign later.

use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use serde_json::json;
use time::OffsetDateTime;

use super::issue::{permitted, IssueFailure};
use super::{Ca, CaError};
use crate::identity::SpiffeId;
use crate::journal::{Journal, JwtKeyRecord, Secret, Status};
use crate::pki::cakey::{self, CaKey, KeyError, SignatureAlgorithm, SoftwareKey};
use crate::pki::KeyType;

pub use super::jwtkeys::{JwtKeys, JwtSigningKey};

/// A fresh JWT signing key of type `kt`, in status `status`, planned to live `ttl`.
pub fn mint_jwt_key(
    kt: KeyType,
    now: OffsetDateTime,
    ttl: Duration,
    status: Status,
) -> Result<JwtKeyRecord, CaError> {
    let key = SoftwareKey::generate(kt)?;
    let kid = B64.encode(crate::pki::try_random_serial()?);
    let created = now.unix_timestamp();
    Ok(JwtKeyRecord {
        kid,
        status,
        key_pem: Secret::new(key.pkcs8_pem()),
        created_at: created,
        published_at: None,
        activated_at: (status == Status::Active).then_some(created),
        deactivated_at: None,
        retired_at: None,
        not_after: created.saturating_add(ttl.as_secs() as i64),
        requested: false,
    })
}

/// The signing key of a JWT key record: the one place such a record becomes a [`CaKey`].
pub fn jwt_key_of(k: &JwtKeyRecord) -> Result<Arc<dyn CaKey>, CaError> {
    SoftwareKey::from_pem(k.key_pem.expose().as_bytes())
        .map(SoftwareKey::shared)
        .map_err(|e| CaError::Config(format!("JWT key {}: {e}", k.kid)))
}

/// The JWK (RFC 7517) of one public key, as the SPIFFE bundle format wants it: `kty`, the
/// key's parameters, `kid` and `use: jwt-svid`.
pub fn jwk(kid: &str, key: &dyn CaKey) -> Result<serde_json::Value, CaError> {
    let b = |bytes: &[u8]| B64.encode(bytes);
    let unsigned = |bytes: &[u8]| {
        let start = bytes.iter().position(|&x| x != 0).unwrap_or(bytes.len());
        B64.encode(&bytes[start..])
    };
    Ok(match key.algorithm() {
        alg @ (SignatureAlgorithm::EcdsaP256Sha256 | SignatureAlgorithm::EcdsaP384Sha384) => {
            let (crv, n) = if alg == SignatureAlgorithm::EcdsaP256Sha256 {
                ("P-256", 32)
            } else {
                ("P-384", 48)
            };
            let point = key.public_key();
            if point.len() != 1 + 2 * n || point[0] != 4 {
                return Err(CaError::Config(format!(
                    "JWT key {kid}: not an uncompressed {crv} point"
                )));
            }
            json!({"kty": "EC", "crv": crv, "x": b(&point[1..1 + n]), "y": b(&point[1 + n..]),
                   "kid": kid, "use": "jwt-svid"})
        }
        SignatureAlgorithm::RsaPkcs1Sha256 => {
            use x509_parser::prelude::FromDer;
            let spki = cakey::spki(key);
            let (_, info) = x509_parser::x509::SubjectPublicKeyInfo::from_der(&spki)
                .map_err(|e| CaError::Config(format!("JWT key {kid}: {e}")))?;
            let Ok(x509_parser::public_key::PublicKey::RSA(rsa)) = info.parsed() else {
                return Err(CaError::Config(format!("JWT key {kid}: not an RSA key")));
            };
            json!({"kty": "RSA", "n": unsigned(rsa.modulus), "e": unsigned(rsa.exponent),
                   "kid": kid, "use": "jwt-svid"})
        }
    })
}

/// The JWT bundle of `journal`: a JWK Set of every key not retired (prepared keys included,
/// so they are published before they sign), with `spiffe_sequence` and
/// `spiffe_refresh_hint`. Pretty-printed JSON, the same bytes for the same journal: what the
/// bundle RPC, the file store, the ConfigMap and a future bundle endpoint all serve.
pub fn render_jwks(journal: &Journal, refresh_hint: Duration) -> Result<String, CaError> {
    let keys = journal
        .jwt_keys
        .iter()
        .filter(|k| k.in_bundle())
        .map(|k| jwk(&k.kid, jwt_key_of(k)?.as_ref()))
        .collect::<Result<Vec<_>, _>>()?;
    let set = json!({
        "keys": keys,
        "spiffe_refresh_hint": refresh_hint.as_secs(),
        "spiffe_sequence": journal.jwt_bundle_sequence,
    });
    serde_json::to_string_pretty(&set).map_err(|e| CaError::Config(e.to_string()))
}

impl JwtKeys {
    /// The state `journal` describes under `policy`.
    pub fn from_journal(
        journal: &Journal,
        policy: &super::policy::JwtKeyPolicy,
    ) -> Result<Self, CaError> {
        let active = match journal.active_jwt_key() {
            Some(k) => Some(JwtSigningKey {
                kid: k.kid.clone(),
                key: jwt_key_of(k)?,
            }),
            None => None,
        };
        Ok(Self {
            trust_domain: journal.trust_domain.clone(),
            active,
            jwks: render_jwks(journal, policy.refresh_hint)?,
            sequence: journal.jwt_bundle_sequence,
            svid_ttl: policy.svid_ttl,
        })
    }
}

/// A signed JWT-SVID.
#[derive(Debug, Clone)]
pub struct JwtSvid {
    /// The JWS compact serialization. Never logged.
    pub token: String,
    /// The key that signed it.
    pub kid: String,
    /// `iat`.
    pub issued_at: OffsetDateTime,
    /// `exp`.
    pub expires_at: OffsetDateTime,
}

/// Why no JWT-SVID was signed.
#[derive(Debug, thiserror::Error)]
pub enum JwtFailure {
    /// The same refusals as for certificates: no signer loaded yet, or the identity denied.
    #[error(transparent)]
    Refused(IssueFailure),
    /// No JWT key is active yet (the first one waits for its bundle to be published), or
    /// this CA keeps no journal (a plugged-in CA).
    #[error("no JWT-SVID signing key is active yet")]
    NoKey,
    /// The key could not sign.
    #[error(transparent)]
    Sign(KeyError),
}

/// The JWS header and claims of a JWT-SVID, in this exact shape (no other member).
pub fn signing_input(
    alg: SignatureAlgorithm,
    kid: &str,
    sub: &str,
    audience: &[String],
    iat: i64,
    exp: i64,
) -> String {
    let header = json!({"alg": alg.jws_name(), "kid": kid, "typ": "JWT"});
    let claims = json!({"aud": audience, "exp": exp, "iat": iat, "sub": sub});
    format!(
        "{}.{}",
        B64.encode(header.to_string()),
        B64.encode(claims.to_string())
    )
}

/// Signs a JWT-SVID for `id` with the installed JWT key, after the same deny checks as a
/// certificate ([`permitted`]), and re-checks the deny list after signing: a denial installed
/// meanwhile refuses the token rather than hand it out.
pub fn sign_jwt_svid(
    ca: &Ca,
    id: &SpiffeId,
    audience: &[String],
    now: OffsetDateTime,
) -> Result<JwtSvid, JwtFailure> {
    let want = id.to_string();
    permitted(ca, &want).map_err(JwtFailure::Refused)?;
    let keys = ca.jwt_current().ok_or(JwtFailure::NoKey)?;
    let active = keys.active.as_ref().ok_or(JwtFailure::NoKey)?;
    let ttl = time::Duration::try_from(keys.svid_ttl).unwrap_or(time::Duration::minutes(5));
    let expires_at = now + ttl;
    let input = signing_input(
        active.key.algorithm(),
        &active.kid,
        &want,
        audience,
        now.unix_timestamp(),
        expires_at.unix_timestamp(),
    );
    let sig = active
        .key
        .sign_jws(input.as_bytes())
        .map_err(JwtFailure::Sign)?;
    permitted(ca, &want).map_err(JwtFailure::Refused)?;
    Ok(JwtSvid {
        token: format!("{input}.{}", B64.encode(sig)),
        kid: active.kid.clone(),
        issued_at: now,
        expires_at,
    })
}

/// What the audit line of one JWT-SVID says (never the token: it is a bearer credential).
#[derive(Debug, Clone, Copy)]
pub struct JwtAudit<'a> {
    /// The SPIFFE ID in `sub`.
    pub identity: &'a str,
    /// The key that signed it.
    pub kid: &'a str,
    /// The `aud` claim (caller text: logged through [`crate::audit::shown`]).
    pub audience: &'a [String],
    /// `exp`.
    pub expires_at: OffsetDateTime,
    /// How the caller was authenticated.
    pub auth: &'a str,
    /// The caller's pod, when known.
    pub pod: &'a str,
    /// The remote cluster that vouched for the caller's token; empty for the local one.
    pub cluster: &'a str,
}

/// Writes the one `citadel::audit` line for a JWT-SVID; false when it could not be written,
/// and then the token must not be handed out (see [`crate::audit`]).
pub fn audit_jwt_issued(r: &JwtAudit<'_>) -> bool {
    let audience: Vec<String> = r
        .audience
        .iter()
        .map(|a| crate::audit::shown(a).to_string())
        .collect();
    crate::audit::begin();
    tracing::info!(
        target: "citadel::audit",
        event = "jwt_svid_issued",
        identity = %r.identity,
        kid = %r.kid,
        audience = %audience.join(","),
        expires_at = %r.expires_at.format(&time::format_description::well_known::Rfc3339).unwrap_or_default(),
        auth = %r.auth,
        pod = %crate::audit::shown(r.pod),
        cluster = r.cluster,
        "issued JWT-SVID"
    );
    !crate::audit::failed()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::bootstrap::{new_journal, signer_from_journal, CaOptions};
    use crate::identity::{ServiceAccount, TrustDomain};
    use crate::journal::DeniedIdentity;
    use ring::signature;

    fn ca_with(kt: KeyType, now: OffsetDateTime) -> (Arc<Ca>, Journal, SpiffeId) {
        let td = TrustDomain::new("cluster.local").unwrap();
        let mut opts = CaOptions::new(td.clone());
        opts.key_type = kt;
        let mut j = new_journal(&opts, now).unwrap();
        j.jwt_keys
            .push(mint_jwt_key(kt, now, Duration::from_secs(86_400), Status::Active).unwrap());
        j.jwt_bundle_sequence = 1;
        let ca = Ca::new();
        ca.install(signer_from_journal(&j, &td).unwrap());
        ca.install_jwt(JwtKeys::from_journal(&j, &Default::default()).unwrap());
        let id = td.service_account_id(&ServiceAccount::new("shop", "cart").unwrap());
        (ca, j, id)
    }

    fn part(token: &str, i: usize) -> serde_json::Value {
        let p = token.split('.').nth(i).unwrap();
        serde_json::from_slice(&B64.decode(p).unwrap()).unwrap()
    }

    /// Verifies `token` with ring against the bundle's JWK for its kid, the way a relying
    /// party would: only the published bundle, nothing from the CA's memory.
    fn verify_with_bundle(token: &str, jwks: &str) -> Result<(), String> {
        let set: serde_json::Value = serde_json::from_str(jwks).unwrap();
        let kid = part(token, 0)["kid"].as_str().unwrap().to_string();
        let k = set["keys"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["kid"] == kid.as_str())
            .ok_or("kid not in the bundle")?;
        let d = |f: &str| B64.decode(k[f].as_str().unwrap()).unwrap();
        let (input, sig) = token.rsplit_once('.').unwrap();
        let sig = B64.decode(sig).unwrap();
        let ok = match k["kty"].as_str().unwrap() {
            "EC" => {
                let alg: &dyn signature::VerificationAlgorithm = match k["crv"].as_str().unwrap() {
                    "P-256" => &signature::ECDSA_P256_SHA256_FIXED,
                    _ => &signature::ECDSA_P384_SHA384_FIXED,
                };
                let mut point = vec![4u8];
                point.extend(d("x"));
                point.extend(d("y"));
                signature::UnparsedPublicKey::new(alg, point).verify(input.as_bytes(), &sig)
            }
            _ => signature::RsaPublicKeyComponents {
                n: d("n"),
                e: d("e"),
            }
            .verify(
                &signature::RSA_PKCS1_2048_8192_SHA256,
                input.as_bytes(),
                &sig,
            ),
        };
        ok.map_err(|_| "bad signature".to_string())
    }

    #[test]
    fn header_and_claims_are_exactly_the_profile_and_signatures_verify() {
        let now = time::macros::datetime!(2030-01-01 0:00 UTC);
        for (kt, alg) in [
            (KeyType::EcP256, "ES256"),
            (KeyType::EcP384, "ES384"),
            (KeyType::Rsa2048, "RS256"),
        ] {
            let (ca, j, id) = ca_with(kt, now);
            let aud = vec!["spiffe://cluster.local/ns/db/sa/pg".to_string()];
            let t = sign_jwt_svid(&ca, &id, &aud, now).unwrap();
            let kid = j.active_jwt_key().unwrap().kid.clone();
            assert_eq!(
                part(&t.token, 0),
                json!({"alg": alg, "kid": kid, "typ": "JWT"}),
                "{kt}"
            );
            let iat = now.unix_timestamp();
            assert_eq!(
                part(&t.token, 1),
                json!({"aud": aud, "exp": iat + 300, "iat": iat, "sub": id.to_string()})
            );
            assert_eq!(t.kid, kid);
            let jwks = render_jwks(&j, Duration::from_secs(300)).unwrap();
            verify_with_bundle(&t.token, &jwks).unwrap();
            // A flipped bit fails: the check can fail.
            let mut bad = t.token.clone().into_bytes();
            let i = bad.len() - 5;
            bad[i] = if bad[i] == b'A' { b'B' } else { b'A' };
            assert!(verify_with_bundle(std::str::from_utf8(&bad).unwrap(), &jwks).is_err());
        }
    }

    #[test]
    fn the_bundle_holds_only_jwt_svid_keys_not_retired() {
        let now = time::macros::datetime!(2030-01-01 0:00 UTC);
        let (_, mut j, _) = ca_with(KeyType::EcP256, now);
        let mut old = mint_jwt_key(
            KeyType::EcP256,
            now,
            Duration::from_secs(60),
            Status::Retired,
        )
        .unwrap();
        old.kid = "gone".into();
        j.jwt_keys.push(old);
        j.jwt_keys.push(
            mint_jwt_key(
                KeyType::EcP256,
                now,
                Duration::from_secs(60),
                Status::Prepared,
            )
            .unwrap(),
        );
        let set: serde_json::Value =
            serde_json::from_str(&render_jwks(&j, Duration::from_secs(42)).unwrap()).unwrap();
        let keys = set["keys"].as_array().unwrap();
        assert_eq!(keys.len(), 2, "active and prepared, not retired");
        assert!(keys
            .iter()
            .all(|k| k["use"] == "jwt-svid" && k["kid"].is_string()));
        assert!(keys.iter().all(|k| k["kid"] != "gone"));
        assert_eq!(set["spiffe_refresh_hint"], 42);
        assert_eq!(set["spiffe_sequence"], 1);
    }

    #[test]
    fn a_denied_identity_gets_no_jwt_svid() {
        let now = time::macros::datetime!(2030-01-01 0:00 UTC);
        let (ca, mut j, id) = ca_with(KeyType::EcP256, now);
        j.denied.push(DeniedIdentity {
            identity: id.to_string(),
            since: now.unix_timestamp(),
            reason: "key-compromise".into(),
            revocation: None,
        });
        ca.install(signer_from_journal(&j, &TrustDomain::new("cluster.local").unwrap()).unwrap());
        let e = sign_jwt_svid(&ca, &id, &["a".into()], now).unwrap_err();
        assert!(
            matches!(e, JwtFailure::Refused(IssueFailure::Denied { .. })),
            "{e:?}"
        );
    }

    #[test]
    fn no_active_key_is_no_key() {
        let now = time::macros::datetime!(2030-01-01 0:00 UTC);
        let (ca, mut j, id) = ca_with(KeyType::EcP256, now);
        j.jwt_keys[0].status = Status::Prepared;
        ca.install_jwt(JwtKeys::from_journal(&j, &Default::default()).unwrap());
        assert!(matches!(
            sign_jwt_svid(&ca, &id, &["a".into()], now),
            Err(JwtFailure::NoKey)
        ));
    }
}
