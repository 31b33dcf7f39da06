//! Kubernetes service-account JWTs verified locally against a JWKS: no API call per request.
//!
//! Checks, in order: shape and algorithm, signature (ring), issuer, audience, exp/nbf with a
//! small leeway, and a subject of the form `system:serviceaccount:<ns>:<sa>`.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use serde::Deserialize;

use super::jwks::Jwks;
use super::jws::{self, JwsError};
use super::{AuthFailure, AuthMethod, Authenticator, Caller, Credentials};
use crate::clock::SharedClock;
use crate::future::BoxFuture;
use crate::identity::{ServiceAccount, TrustDomain};

/// Clock skew tolerated on exp and nbf.
pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(30);

/// Why a bearer token was refused; the message ends up in the Unauthenticated status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    /// The compact JWS itself: shape, algorithm, key or signature.
    #[error(transparent)]
    Jws(#[from] JwsError),
    /// The claims did not decode.
    #[error("token claims are not a JSON object with the expected types")]
    Claims,
    /// A token without exp would never expire, so it is refused.
    #[error("token has no exp claim")]
    MissingExp,
    /// `exp` plus the leeway is before `now`.
    #[error("token expired at {exp} (now {now})")]
    Expired {
        /// The token's exp, unix seconds.
        exp: i64,
        /// The verifier's time, unix seconds.
        now: i64,
    },
    /// `nbf` minus the leeway is after `now`.
    #[error("token is not valid before {nbf} (now {now})")]
    NotYetValid {
        /// The token's nbf, unix seconds.
        nbf: i64,
        /// The verifier's time, unix seconds.
        now: i64,
    },
    /// `iss` differs from the configured issuer.
    #[error("token issuer {got:?} is not the trusted issuer {want:?}")]
    WrongIssuer {
        /// The token's iss (cut to 200 characters).
        got: String,
        /// The configured issuer.
        want: String,
    },
    /// No `aud` entry is one of the accepted audiences.
    #[error("token audience {got:?} does not include any of {want:?}")]
    WrongAudience {
        /// The token's aud (at most 8 entries).
        got: Vec<String>,
        /// The accepted audiences.
        want: Vec<String>,
    },
    /// `sub` is missing or not `system:serviceaccount:<ns>:<sa>`.
    #[error("token subject: {0}")]
    Subject(String),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct Claims {
    iss: Option<String>,
    sub: Option<String>,
    aud: Option<Audience>,
    exp: Option<f64>,
    nbf: Option<f64>,
    #[serde(rename = "kubernetes.io")]
    kubernetes: Option<KubeClaims>,
}

#[derive(Deserialize)]
struct KubeClaims {
    pod: Option<NameUid>,
    node: Option<NameUid>,
}

#[derive(Deserialize)]
struct NameUid {
    name: Option<String>,
    uid: Option<String>,
}

/// What a valid token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenIdentity {
    /// From `sub` (`system:serviceaccount:<ns>:<sa>`).
    pub service_account: ServiceAccount,
    /// From the `kubernetes.io.pod.name` claim, present in projected tokens.
    pub pod_name: Option<String>,
    /// From the `kubernetes.io.pod.uid` claim, present in projected tokens.
    pub pod_uid: Option<String>,
    /// From the `kubernetes.io.node.name` claim, present in tokens bound to a scheduled pod.
    pub node_name: Option<String>,
    /// The token's `exp`, unix seconds.
    pub expires_at: i64,
}

/// What a token must say besides its signature.
#[derive(Debug, Clone)]
pub struct JwtPolicy {
    /// `None` accepts any issuer (the JWKS already pins the signer).
    pub issuer: Option<String>,
    /// A token must name at least one of these in `aud` (istio-agent's tokens carry `istio-ca`).
    pub audiences: Vec<String>,
    /// Clock skew tolerated on exp and nbf; [`DEFAULT_LEEWAY`] in the server.
    pub leeway: Duration,
}

/// Verifies a token completely at time `now` (unix seconds).
pub fn verify(
    token: &str,
    keys: &Jwks,
    policy: &JwtPolicy,
    now: i64,
) -> Result<TokenIdentity, JwtError> {
    let parsed = jws::parse(token)?;
    keys.verify(&parsed)?;
    check_claims(&parsed.payload, policy, now)
}

/// Checks a token's claims (issuer, audience, exp/nbf, subject) without its signature.
///
/// On its own this proves nothing about who sent the token; `verify` calls it after the
/// signature, and the TokenReview authenticator uses it to drop tokens that cannot be valid
/// before spending an API call on them.
pub fn check_claims(
    payload: &[u8],
    policy: &JwtPolicy,
    now: i64,
) -> Result<TokenIdentity, JwtError> {
    let claims: Claims = serde_json::from_slice(payload).map_err(|_| JwtError::Claims)?;

    if let Some(want) = &policy.issuer {
        let got = claims.iss.unwrap_or_default();
        if &got != want {
            return Err(JwtError::WrongIssuer {
                got: got.chars().take(200).collect(),
                want: want.clone(),
            });
        }
    }
    let aud = match claims.aud {
        Some(Audience::One(a)) => vec![a],
        Some(Audience::Many(a)) => a,
        None => vec![],
    };
    if !aud.iter().any(|a| policy.audiences.contains(a)) {
        return Err(JwtError::WrongAudience {
            got: aud.into_iter().take(8).collect(),
            want: policy.audiences.clone(),
        });
    }
    let leeway = policy.leeway.as_secs() as i64;
    let exp = claims.exp.ok_or(JwtError::MissingExp)? as i64;
    if now > exp.saturating_add(leeway) {
        return Err(JwtError::Expired { exp, now });
    }
    if let Some(nbf) = claims.nbf.map(|n| n as i64) {
        if now < nbf.saturating_sub(leeway) {
            return Err(JwtError::NotYetValid { nbf, now });
        }
    }
    let sub = claims
        .sub
        .ok_or_else(|| JwtError::Subject("missing".into()))?;
    let service_account =
        ServiceAccount::from_username(&sub).map_err(|e| JwtError::Subject(e.to_string()))?;
    let (pod, node) = match claims.kubernetes {
        Some(k) => (k.pod, k.node),
        None => (None, None),
    };
    Ok(TokenIdentity {
        service_account,
        pod_name: pod.as_ref().and_then(|p| p.name.clone()),
        pod_uid: pod.and_then(|p| p.uid),
        node_name: node.and_then(|n| n.name),
        expires_at: exp,
    })
}

/// The JWT authenticator. Its key set can be swapped at run time (JWKS refresh).
pub struct JwtAuthenticator {
    /// Told when a token names a kid we do not have (the JWKS may have rotated).
    unknown_kid: std::sync::OnceLock<Arc<tokio::sync::Notify>>,
    keys: ArcSwap<Jwks>,
    policy: JwtPolicy,
    trust_domain: TrustDomain,
    clock: SharedClock,
}

impl JwtAuthenticator {
    /// An authenticator for `trust_domain` that starts with `keys`.
    pub fn new(
        keys: Jwks,
        policy: JwtPolicy,
        trust_domain: TrustDomain,
        clock: SharedClock,
    ) -> Self {
        Self {
            unknown_kid: std::sync::OnceLock::new(),
            keys: ArcSwap::from_pointee(keys),
            policy,
            trust_domain,
            clock,
        }
    }

    /// Swaps the key set atomically; requests in flight keep the set they started with.
    pub fn replace_keys(&self, keys: Jwks) {
        self.keys.store(Arc::new(keys));
    }

    /// Notifies `hook` whenever a token names an unknown kid.
    pub fn on_unknown_kid(&self, hook: Arc<tokio::sync::Notify>) {
        let _ = self.unknown_kid.set(hook);
    }
}

impl Authenticator for JwtAuthenticator {
    fn name(&self) -> &'static str {
        "jwt"
    }

    fn authenticate<'a>(
        &'a self,
        creds: Credentials<'a>,
    ) -> BoxFuture<'a, Result<Option<Caller>, AuthFailure>> {
        let result = creds.bearer.map(|token| {
            let now = self.clock.now().unix_timestamp();
            verify(token, &self.keys.load(), &self.policy, now)
                .map(|t| Caller {
                    identity: self.trust_domain.service_account_id(&t.service_account),
                    method: AuthMethod::Jwt,
                    pod_name: t.pod_name,
                    pod_uid: t.pod_uid,
                    node_name: t.node_name,
                    cluster: None,
                })
                .map_err(|e| {
                    if matches!(e, JwtError::Jws(JwsError::UnknownKid(_))) {
                        if let Some(n) = self.unknown_kid.get() {
                            n.notify_one();
                        }
                    }
                    AuthFailure::invalid(e)
                })
        });
        Box::pin(std::future::ready(result.transpose()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::jws::SigningKey;
    use serde_json::json;

    const NOW: i64 = 1_900_000_000;

    fn ec_key() -> SigningKey {
        SigningKey::generate_p256()
    }

    fn rsa_key() -> SigningKey {
        SigningKey::from_pkcs8_pem(crate::devkeys::DEV_JWT_KEY_PEM).unwrap()
    }

    fn jwks_of(keys: &[&SigningKey]) -> Jwks {
        let set = json!({"keys": keys.iter().map(|k| k.public_jwk()).collect::<Vec<_>>()});
        Jwks::from_json(set.to_string().as_bytes()).unwrap()
    }

    fn policy() -> JwtPolicy {
        JwtPolicy {
            issuer: Some("https://kubernetes.default.svc".into()),
            audiences: vec!["istio-ca".into()],
            leeway: DEFAULT_LEEWAY,
        }
    }

    fn claims() -> serde_json::Value {
        json!({
            "iss": "https://kubernetes.default.svc",
            "aud": ["istio-ca"],
            "sub": "system:serviceaccount:shop:cart",
            "exp": NOW + 3600, "nbf": NOW - 10, "iat": NOW - 10,
            "kubernetes.io": {"namespace": "shop", "pod": {"name": "cart-7d9", "uid": "u-1"},
                              "serviceaccount": {"name": "cart", "uid": "u-2"}}
        })
    }

    fn with(mut c: serde_json::Value, k: &str, v: serde_json::Value) -> serde_json::Value {
        c[k] = v;
        c
    }

    #[test]
    fn valid_rs256_and_es256_tokens() {
        let (rsa, ec) = (rsa_key(), ec_key());
        let keys = jwks_of(&[&rsa, &ec]);
        for k in [&rsa, &ec] {
            let id = verify(&k.sign(&claims()), &keys, &policy(), NOW).unwrap();
            assert_eq!(
                id.service_account,
                ServiceAccount::new("shop", "cart").unwrap()
            );
            assert_eq!(id.pod_name.as_deref(), Some("cart-7d9"));
            assert_eq!(id.pod_uid.as_deref(), Some("u-1"));
        }
        // A single-string audience is fine too.
        let t = rsa.sign(&with(claims(), "aud", json!("istio-ca")));
        assert!(verify(&t, &keys, &policy(), NOW).is_ok());
    }

    #[test]
    fn time_checks_with_leeway() {
        let k = ec_key();
        let keys = jwks_of(&[&k]);
        let expired = k.sign(&with(claims(), "exp", json!(NOW - 31)));
        assert!(matches!(
            verify(&expired, &keys, &policy(), NOW),
            Err(JwtError::Expired { .. })
        ));
        let just = k.sign(&with(claims(), "exp", json!(NOW - 29)));
        assert!(
            verify(&just, &keys, &policy(), NOW).is_ok(),
            "within leeway"
        );
        let future = k.sign(&with(claims(), "nbf", json!(NOW + 120)));
        assert!(matches!(
            verify(&future, &keys, &policy(), NOW),
            Err(JwtError::NotYetValid { .. })
        ));
        let mut no_exp = claims();
        no_exp.as_object_mut().unwrap().remove("exp");
        assert_eq!(
            verify(&k.sign(&no_exp), &keys, &policy(), NOW),
            Err(JwtError::MissingExp)
        );
    }

    #[test]
    fn issuer_audience_subject() {
        let k = ec_key();
        let keys = jwks_of(&[&k]);
        let t = k.sign(&with(claims(), "iss", json!("https://evil")));
        assert!(matches!(
            verify(&t, &keys, &policy(), NOW),
            Err(JwtError::WrongIssuer { .. })
        ));
        let t = k.sign(&with(claims(), "aud", json!(["kubernetes"])));
        assert!(matches!(
            verify(&t, &keys, &policy(), NOW),
            Err(JwtError::WrongAudience { .. })
        ));
        for sub in ["admin", "system:serviceaccount:shop", "system:node:n1"] {
            let t = k.sign(&with(claims(), "sub", json!(sub)));
            assert!(
                matches!(verify(&t, &keys, &policy(), NOW), Err(JwtError::Subject(_))),
                "{sub}"
            );
        }
        let mut any_iss = policy();
        any_iss.issuer = None;
        let t = k.sign(&with(claims(), "iss", json!("https://elsewhere")));
        assert!(verify(&t, &keys, &any_iss, NOW).is_ok());
    }

    #[test]
    fn signature_kid_and_alg_none() {
        let (good, other) = (ec_key(), ec_key());
        let keys = jwks_of(&[&good]);
        // Signed by a key that is not trusted, under its own kid: unknown kid.
        let t = other.sign(&claims());
        assert!(matches!(
            verify(&t, &keys, &policy(), NOW),
            Err(JwtError::Jws(JwsError::UnknownKid(_)))
        ));
        // Same kid as the trusted key, wrong signature: bad signature.
        let t = good.sign(&claims());
        let mut parts: Vec<&str> = t.split('.').collect();
        let forged = other.sign(&claims());
        parts[2] = forged.rsplit('.').next().unwrap();
        let t = parts.join(".");
        assert_eq!(
            verify(&t, &keys, &policy(), NOW),
            Err(JwtError::Jws(JwsError::BadSignature))
        );
        // Tampered payload.
        let t = good.sign(&claims());
        let mut parts: Vec<String> = t.split('.').map(String::from).collect();
        use base64::Engine;
        parts[1] = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(
            with(
                claims(),
                "sub",
                json!("system:serviceaccount:kube-system:admin"),
            )
            .to_string(),
        );
        assert_eq!(
            verify(&parts.join("."), &keys, &policy(), NOW),
            Err(JwtError::Jws(JwsError::BadSignature))
        );
        // alg none with the signature stripped.
        let none = format!(
            "{}.{}.",
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(r#"{"alg":"none","typ":"JWT"}"#),
            parts[1]
        );
        assert_eq!(
            verify(&none, &keys, &policy(), NOW),
            Err(JwtError::Jws(JwsError::AlgNone))
        );
        // Malformed.
        for bad in ["", "abc", "a.b.c", "..."] {
            assert!(
                matches!(
                    verify(bad, &keys, &policy(), NOW),
                    Err(JwtError::Jws(JwsError::Malformed(_)))
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn algorithm_must_fit_key_type() {
        // An ES256 token whose kid names an RSA key must not verify.
        let (rsa, ec) = (rsa_key(), ec_key());
        let set = json!({"keys": [with(rsa.public_jwk(), "kid", json!(ec.kid()))]});
        let keys = Jwks::from_json(set.to_string().as_bytes()).unwrap();
        let t = ec.sign(&claims());
        assert_eq!(
            verify(&t, &keys, &policy(), NOW),
            Err(JwtError::Jws(JwsError::BadSignature))
        );
    }

    #[test]
    fn errors_never_echo_the_token() {
        let k = ec_key();
        let keys = jwks_of(&[&ec_key()]);
        let t = k.sign(&claims());
        let msg = verify(&t, &keys, &policy(), NOW).unwrap_err().to_string();
        let sig = t.rsplit('.').next().unwrap();
        assert!(!msg.contains(sig), "{msg}");
    }
}
