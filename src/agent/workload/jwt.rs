//! The JWT half of the Workload API: ValidateJWTSVID's rules and the JSON -> protobuf
//! `Struct` conversion of the claims it returns. Fetching JWT-SVIDs and the bundle is
//! `agent::jwt`'s (the CA calls).
//!
//! The rules, from the JWT-SVID specification: `alg` one of RS/ES/PS 256/384/512 (ring, via
//! `auth::jws`, verifies RS256/384/512 and ES256/384, the ones citadel signs with; the rest
//! are refused), `typ` absent or `JWT`/`JOSE`, `sub` a SPIFFE ID whose trust domain picks the
//! bundle, `aud` containing the audience asked about, `exp` in the future by the injected
//! clock (and `nbf`, when present, not after it).

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use serde_json::Value;
use time::OffsetDateTime;

use crate::agent::jwt::JwtBundle;
use crate::auth::jws::{self, JwsError};
use crate::identity::SpiffeId;

/// Why a JWT-SVID did not validate (all InvalidArgument on the wire, as SPIRE answers).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    /// The JWS layer: shape, algorithm, key, signature.
    #[error(transparent)]
    Jws(#[from] JwsError),
    /// A `typ` other than `JWT` or `JOSE`.
    #[error("the token's typ header must be JWT or JOSE")]
    BadType,
    /// No `sub`, or one that is not a SPIFFE ID.
    #[error("the token's sub is not a SPIFFE ID")]
    BadSubject,
    /// The subject's trust domain is not one we hold a JWT bundle for.
    #[error("no JWT bundle for the trust domain {0:?}")]
    UnknownTrustDomain(String),
    /// The trust domain's JWT bundle has no key: every token of it is invalid.
    #[error("the JWT bundle of {0:?} holds no key; every token of it is invalid")]
    EmptyBundle(String),
    /// `aud` missing, or not naming the audience asked about.
    #[error("the token's aud does not contain the audience")]
    WrongAudience,
    /// No numeric `exp`.
    #[error("the token has no exp")]
    NoExpiry,
    /// `exp` is not in the future.
    #[error("the token expired at {0}")]
    Expired(i64),
    /// `nbf` is in the future.
    #[error("the token is not valid before {0}")]
    NotYetValid(i64),
}

/// A token that validated: its subject and every claim.
#[derive(Debug)]
pub struct Validated {
    /// `sub`.
    pub spiffe_id: SpiffeId,
    /// The claims object.
    pub claims: serde_json::Map<String, Value>,
}

/// Validates `token` for `audience` against `bundle` (the trust domain's JWT bundle) at `now`.
pub fn validate(
    token: &str,
    audience: &str,
    bundle: Option<&JwtBundle>,
    now: OffsetDateTime,
) -> Result<Validated, ValidationError> {
    let parsed = jws::parse(token)?;
    let header: Value = token
        .split('.')
        .next()
        .and_then(|h| B64.decode(h).ok())
        .and_then(|h| serde_json::from_slice(&h).ok())
        .ok_or(JwsError::Malformed("header is not a JSON object"))?;
    match header.get("typ") {
        None => {}
        Some(Value::String(t)) if t == "JWT" || t == "JOSE" => {}
        Some(_) => return Err(ValidationError::BadType),
    }
    let claims = match serde_json::from_slice::<Value>(&parsed.payload) {
        Ok(Value::Object(m)) => m,
        _ => return Err(JwsError::Malformed("payload is not a JSON object").into()),
    };
    let spiffe_id = claims
        .get("sub")
        .and_then(Value::as_str)
        .and_then(|s| SpiffeId::parse(s).ok())
        .ok_or(ValidationError::BadSubject)?;
    let td = spiffe_id.trust_domain();
    let bundle = bundle
        .filter(|b| &b.trust_domain == td)
        .ok_or_else(|| ValidationError::UnknownTrustDomain(td.as_str().to_string()))?;
    let keys = bundle
        .keys
        .as_ref()
        .ok_or_else(|| ValidationError::EmptyBundle(td.as_str().to_string()))?;
    keys.verify(&parsed)?;
    let audience_ok = match claims.get("aud") {
        Some(Value::String(a)) => a == audience,
        Some(Value::Array(all)) => all.iter().any(|a| a.as_str() == Some(audience)),
        _ => false,
    };
    if !audience_ok {
        return Err(ValidationError::WrongAudience);
    }
    let now = now.unix_timestamp();
    let exp = claims
        .get("exp")
        .and_then(Value::as_i64)
        .ok_or(ValidationError::NoExpiry)?;
    if exp <= now {
        return Err(ValidationError::Expired(exp));
    }
    if let Some(nbf) = claims.get("nbf").and_then(Value::as_i64) {
        if nbf > now {
            return Err(ValidationError::NotYetValid(nbf));
        }
    }
    Ok(Validated { spiffe_id, claims })
}

/// A JSON object as a protobuf `Struct` (ValidateJWTSVIDResponse's `claims`).
pub fn to_struct(m: serde_json::Map<String, Value>) -> prost_types::Struct {
    prost_types::Struct {
        fields: m.into_iter().map(|(k, v)| (k, to_value(v))).collect(),
    }
}

fn to_value(v: Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match v {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        Value::String(s) => Kind::StringValue(s),
        Value::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.into_iter().map(to_value).collect(),
        }),
        Value::Object(o) => Kind::StructValue(to_struct(o)),
    };
    prost_types::Value { kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::jws::SigningKey;
    use crate::identity::TrustDomain;
    use serde_json::json;

    const NOW: i64 = 1_900_000_000;

    fn now() -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(NOW).unwrap()
    }

    fn key() -> SigningKey {
        SigningKey::generate_p256()
    }

    fn bundle_of(k: &SigningKey, td: &str) -> JwtBundle {
        let mut jwk = k.public_jwk();
        jwk["use"] = json!("jwt-svid");
        let doc = json!({"keys": [jwk], "spiffe_sequence": 1});
        JwtBundle::parse(
            TrustDomain::new(td).unwrap(),
            doc.to_string().into_bytes(),
            1,
        )
        .unwrap()
    }

    fn claims() -> Value {
        json!({"sub": "spiffe://cluster.local/ns/shop/sa/cart", "aud": ["db"], "exp": NOW + 300, "iat": NOW})
    }

    /// Signs `claims` with `k` under a header of our choosing.
    fn sign_with_header(k: &SigningKey, header: Value, claims: &Value) -> String {
        let input = format!(
            "{}.{}",
            B64.encode(header.to_string()),
            B64.encode(claims.to_string())
        );
        // Re-sign through SigningKey: take its signature over our input by signing a token
        // and splicing is not possible, so sign the bytes directly with ring.
        let SigningKey::EcP256(pair) = k else {
            unreachable!()
        };
        let sig = pair
            .sign(&ring::rand::SystemRandom::new(), input.as_bytes())
            .unwrap();
        format!("{input}.{}", B64.encode(sig.as_ref()))
    }

    #[test]
    fn a_good_token_validates_and_returns_its_claims() {
        let k = key();
        let b = bundle_of(&k, "cluster.local");
        let v = validate(&k.sign(&claims()), "db", Some(&b), now()).unwrap();
        assert_eq!(
            v.spiffe_id.to_string(),
            "spiffe://cluster.local/ns/shop/sa/cart"
        );
        assert_eq!(v.claims["exp"], json!(NOW + 300));
        let s = to_struct(v.claims);
        assert!(matches!(
            s.fields["aud"].kind,
            Some(prost_types::value::Kind::ListValue(_))
        ));
        // aud as a single string is accepted too.
        let mut c = claims();
        c["aud"] = json!("db");
        assert!(validate(&k.sign(&c), "db", Some(&b), now()).is_ok());
    }

    #[test]
    fn each_rule_refuses_its_token() {
        let k = key();
        let b = bundle_of(&k, "cluster.local");
        let check = |token: &str, want: ValidationError| {
            assert_eq!(validate(token, "db", Some(&b), now()).unwrap_err(), want);
        };
        let with = |f: &dyn Fn(&mut Value)| {
            let mut c = claims();
            f(&mut c);
            k.sign(&c)
        };
        check(
            &with(&|c| c["aud"] = json!(["other"])),
            ValidationError::WrongAudience,
        );
        check(
            &with(&|c| {
                c.as_object_mut()
                    .unwrap()
                    .remove("aud")
                    .map(|_| ())
                    .unwrap()
            }),
            ValidationError::WrongAudience,
        );
        check(
            &with(&|c| c["exp"] = json!(NOW)),
            ValidationError::Expired(NOW),
        );
        check(
            &with(&|c| {
                c.as_object_mut().unwrap().remove("exp");
            }),
            ValidationError::NoExpiry,
        );
        check(
            &with(&|c| c["nbf"] = json!(NOW + 10)),
            ValidationError::NotYetValid(NOW + 10),
        );
        check(
            &with(&|c| c["sub"] = json!("system:serviceaccount:shop:cart")),
            ValidationError::BadSubject,
        );
        check(
            &with(&|c| c["sub"] = json!("spiffe://other.org/ns/shop/sa/cart")),
            ValidationError::UnknownTrustDomain("other.org".into()),
        );
        // Another key, same kid-less shape: the signature does not verify.
        let stranger = key();
        assert!(matches!(
            validate(&stranger.sign(&claims()), "db", Some(&b), now()),
            Err(ValidationError::Jws(JwsError::UnknownKid(_)))
        ));
        let kid = k.kid();
        check(
            &sign_with_header(
                &k,
                json!({"alg": "ES256", "kid": kid, "typ": "JWS"}),
                &claims(),
            ),
            ValidationError::BadType,
        );
        assert!(validate(
            &sign_with_header(
                &k,
                json!({"alg": "ES256", "kid": kid, "typ": "JOSE"}),
                &claims()
            ),
            "db",
            Some(&b),
            now()
        )
        .is_ok());
        // alg none and HMAC never validate, whatever the claims.
        let unsigned = format!(
            "{}.{}.{}",
            B64.encode(json!({"alg": "none"}).to_string()),
            B64.encode(claims().to_string()),
            B64.encode("x")
        );
        check(&unsigned, ValidationError::Jws(JwsError::AlgNone));
        let hmac = sign_with_header(&k, json!({"alg": "HS256", "kid": kid}), &claims());
        check(
            &hmac,
            ValidationError::Jws(JwsError::UnsupportedAlg("HS256".into())),
        );
        // A tampered payload fails the signature.
        let good = k.sign(&claims());
        let mut parts: Vec<&str> = good.split('.').collect();
        let mut forged = claims();
        forged["sub"] = json!("spiffe://cluster.local/ns/shop/sa/admin");
        let body = B64.encode(forged.to_string());
        parts[1] = &body;
        check(
            &parts.join("."),
            ValidationError::Jws(JwsError::BadSignature),
        );
    }

    #[test]
    fn the_clock_decides_expiry() {
        let k = key();
        let b = bundle_of(&k, "cluster.local");
        let t = k.sign(&claims());
        assert!(validate(&t, "db", Some(&b), now() + time::Duration::seconds(299)).is_ok());
        assert_eq!(
            validate(&t, "db", Some(&b), now() + time::Duration::seconds(300)).unwrap_err(),
            ValidationError::Expired(NOW + 300)
        );
    }

    #[test]
    fn no_bundle_or_an_empty_one_validates_nothing() {
        let k = key();
        let t = k.sign(&claims());
        assert_eq!(
            validate(&t, "db", None, now()).unwrap_err(),
            ValidationError::UnknownTrustDomain("cluster.local".into())
        );
        let empty = JwtBundle::parse(
            TrustDomain::new("cluster.local").unwrap(),
            br#"{"keys":[]}"#.to_vec(),
            2,
        )
        .unwrap();
        assert_eq!(
            validate(&t, "db", Some(&empty), now()).unwrap_err(),
            ValidationError::EmptyBundle("cluster.local".into())
        );
        // An X.509 authority in the set never verifies a token.
        let mut jwk = k.public_jwk();
        jwk["use"] = json!("x509-svid");
        let x509_only = JwtBundle::parse(
            TrustDomain::new("cluster.local").unwrap(),
            json!({"keys": [jwk]}).to_string().into_bytes(),
            3,
        )
        .unwrap();
        assert!(x509_only.keys.is_none());
    }
}
