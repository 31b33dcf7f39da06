//! The SPIFFE bundle format (SPIFFE Trust Domain and Bundle, section 4): a JWK Set whose
//! `x509-svid` keys each carry one CA certificate in `x5c` and whose `jwt-svid` keys carry a
//! `kid`, plus `spiffe_sequence` and `spiffe_refresh_hint`.
//!
//! Two directions live here because they must agree: [`public_jwk`] writes a key's JWK
//! parameters from its SubjectPublicKeyInfo (what our bundle endpoint serves), and [`parse`]
//! reads a *foreign* trust domain's bundle strictly (what federation accepts). Parsing is the
//! trust decision for another domain, so it refuses anything it cannot fully check rather
//! than skipping it: a key of another use, an `x5c` of other than one certificate, a
//! certificate that is not a CA, a CA naming another trust domain, a JWT key without `kid`.
//! An empty `keys` is valid and means every SVID of that domain is invalid.

use std::time::Duration;

use base64::engine::general_purpose::{STANDARD as B64STD, URL_SAFE_NO_PAD as B64URL};
use base64::Engine;
use rustls_pki_types::CertificateDer;
use serde_json::{json, Value};
use x509_parser::prelude::{FromDer, GeneralName, ParsedExtension, X509Certificate};

use crate::identity::TrustDomain;

/// The largest bundle document accepted (a bundle of a few dozen keys is a few tens of KiB).
pub const MAX_BUNDLE_BYTES: usize = 1024 * 1024;

/// The refresh interval a client uses when a bundle carries no `spiffe_refresh_hint`
/// (SPIFFE Federation: 5 minutes).
pub const DEFAULT_REFRESH_HINT: Duration = Duration::from_secs(300);

/// Why a bundle document was refused. The text names the key and the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("SPIFFE bundle refused: {0}")]
pub struct BundleError(pub String);

fn err(msg: impl Into<String>) -> BundleError {
    BundleError(msg.into())
}

/// A foreign trust domain's bundle that passed [`parse`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpiffeBundle {
    /// The trust domain it was fetched for (the caller's configuration, never the document).
    pub trust_domain: TrustDomain,
    /// The `x509-svid` authorities, DER, in document order.
    pub x509_authorities: Vec<CertificateDer<'static>>,
    /// The `jwt-svid` keys, each a JWK object as received (with its `kid`).
    pub jwt_keys: Vec<Value>,
    /// `spiffe_sequence`, when present.
    pub sequence: Option<u64>,
    /// `spiffe_refresh_hint`, when present.
    pub refresh_hint: Option<Duration>,
}

impl SpiffeBundle {
    /// The X.509 authorities as one PEM document (what SDS `ROOTCA` and files want).
    pub fn x509_pem(&self) -> String {
        self.x509_authorities
            .iter()
            .map(|c| ::pem::encode(&::pem::Pem::new("CERTIFICATE", c.as_ref().to_vec())))
            .collect()
    }

    /// The JWT bundle alone: a JWK Set of the `jwt-svid` keys (the Workload API's
    /// FetchJWTBundles wants exactly this).
    pub fn jwt_jwks(&self) -> String {
        json!({ "keys": self.jwt_keys }).to_string()
    }

    /// The whole bundle re-rendered in the SPIFFE format (what is persisted and handed out).
    pub fn to_json(&self) -> String {
        let mut keys: Vec<Value> = self
            .x509_authorities
            .iter()
            .map(|c| {
                let mut k = public_jwk_of_cert(c.as_ref()).unwrap_or_else(|_| json!({}));
                k["use"] = json!("x509-svid");
                k["x5c"] = json!([B64STD.encode(c.as_ref())]);
                k
            })
            .collect();
        keys.extend(self.jwt_keys.iter().cloned());
        let mut doc = json!({ "keys": keys });
        if let Some(s) = self.sequence {
            doc["spiffe_sequence"] = json!(s);
        }
        if let Some(h) = self.refresh_hint {
            doc["spiffe_refresh_hint"] = json!(h.as_secs());
        }
        serde_json::to_string_pretty(&doc).unwrap_or_default()
    }

    /// The interval to poll at: the hint, or [`DEFAULT_REFRESH_HINT`] when absent.
    pub fn poll_interval(&self) -> Duration {
        self.refresh_hint.unwrap_or(DEFAULT_REFRESH_HINT)
    }
}

/// The JWK public parameters (`kty` and `crv`/`x`/`y` or `n`/`e`) of a DER
/// SubjectPublicKeyInfo: EC P-256/P-384 or RSA. The caller adds `use`, `kid`, `x5c`.
pub fn public_jwk(spki_der: &[u8]) -> Result<Value, BundleError> {
    use x509_parser::public_key::PublicKey;
    let (_, info) = x509_parser::x509::SubjectPublicKeyInfo::from_der(spki_der)
        .map_err(|e| err(format!("bad public key: {e}")))?;
    let b = |bytes: &[u8]| B64URL.encode(bytes);
    let unsigned = |bytes: &[u8]| {
        let start = bytes.iter().position(|&x| x != 0).unwrap_or(bytes.len());
        B64URL.encode(&bytes[start..])
    };
    match info.parsed() {
        Ok(PublicKey::EC(point)) => {
            let raw = point.data();
            let (crv, n) = match raw.len() {
                65 => ("P-256", 32),
                97 => ("P-384", 48),
                l => return Err(err(format!("unsupported EC point of {l} bytes"))),
            };
            if raw[0] != 4 {
                return Err(err("EC point not uncompressed"));
            }
            Ok(json!({"kty": "EC", "crv": crv, "x": b(&raw[1..1 + n]), "y": b(&raw[1 + n..])}))
        }
        Ok(PublicKey::RSA(rsa)) => {
            Ok(json!({"kty": "RSA", "n": unsigned(rsa.modulus), "e": unsigned(rsa.exponent)}))
        }
        _ => Err(err("public key neither EC P-256/P-384 nor RSA")),
    }
}

fn public_jwk_of_cert(der: &[u8]) -> Result<Value, BundleError> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| err(format!("bad certificate: {e}")))?;
    public_jwk(cert.public_key().raw)
}

/// Parses and checks a bundle document fetched for `td`. Every key must be usable: one
/// refused key refuses the whole document (a partial bundle would silently drop trust).
pub fn parse(td: &TrustDomain, doc: &[u8]) -> Result<SpiffeBundle, BundleError> {
    if doc.len() > MAX_BUNDLE_BYTES {
        return Err(err(format!(
            "{} bytes, over the {MAX_BUNDLE_BYTES}-byte limit",
            doc.len()
        )));
    }
    let v: Value =
        serde_json::from_slice(doc).map_err(|e| err(format!("not a JSON document: {e}")))?;
    let obj = v.as_object().ok_or_else(|| err("not a JSON object"))?;
    let keys = obj
        .get("keys")
        .ok_or_else(|| err("no \"keys\" member"))?
        .as_array()
        .ok_or_else(|| err("\"keys\" is not an array"))?;
    let sequence = match obj.get("spiffe_sequence") {
        None => None,
        Some(s) => Some(
            s.as_u64()
                .ok_or_else(|| err("spiffe_sequence is not a non-negative integer"))?,
        ),
    };
    let refresh_hint = match obj.get("spiffe_refresh_hint") {
        None => None,
        Some(h) => {
            let secs = h
                .as_u64()
                .ok_or_else(|| err("spiffe_refresh_hint is not a non-negative integer"))?;
            Some(Duration::from_secs(secs))
        }
    };
    let mut x509 = Vec::new();
    let mut jwt = Vec::new();
    for (i, key) in keys.iter().enumerate() {
        let k = key
            .as_object()
            .ok_or_else(|| err(format!("key {i} is not an object")))?;
        match k.get("use").and_then(Value::as_str) {
            Some("x509-svid") => x509.push(x509_key(td, i, k)?),
            Some("jwt-svid") => jwt.push(jwt_key(i, k, &jwt)?),
            Some(other) => {
                return Err(err(format!(
                    "key {i} has use {other:?}; only x509-svid and jwt-svid are accepted"
                )))
            }
            None => return Err(err(format!("key {i} has no \"use\""))),
        }
    }
    Ok(SpiffeBundle {
        trust_domain: td.clone(),
        x509_authorities: x509,
        jwt_keys: jwt,
        sequence,
        refresh_hint,
    })
}

fn x509_key(
    td: &TrustDomain,
    i: usize,
    k: &serde_json::Map<String, Value>,
) -> Result<CertificateDer<'static>, BundleError> {
    let x5c = k
        .get("x5c")
        .and_then(Value::as_array)
        .ok_or_else(|| err(format!("x509-svid key {i} has no x5c array")))?;
    if x5c.len() != 1 {
        return Err(err(format!(
            "x509-svid key {i} has {} certificates in x5c; exactly one is required",
            x5c.len()
        )));
    }
    let der = x5c[0]
        .as_str()
        .and_then(|s| B64STD.decode(s).ok())
        .ok_or_else(|| err(format!("x509-svid key {i}: x5c[0] is not base64")))?;
    let (rest, cert) = X509Certificate::from_der(&der)
        .map_err(|e| err(format!("x509-svid key {i}: not a certificate: {e}")))?;
    if !rest.is_empty() {
        return Err(err(format!(
            "x509-svid key {i}: trailing bytes after the certificate"
        )));
    }
    if !cert.is_ca() {
        return Err(err(format!(
            "x509-svid key {i}: not a CA certificate (basicConstraints CA is not true)"
        )));
    }
    for ext in cert.extensions() {
        if let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() {
            for name in &san.general_names {
                if let GeneralName::URI(uri) = name {
                    if let Some(rest) = uri.strip_prefix("spiffe://") {
                        let named = rest.split('/').next().unwrap_or("");
                        if named != td.as_str() {
                            return Err(err(format!(
                                "x509-svid key {i}: the CA names trust domain {named:?}, not {:?}",
                                td.as_str()
                            )));
                        }
                    }
                }
            }
        }
    }
    // The JWK's own parameters, when given, must be the certificate's key.
    if k.contains_key("kty") {
        let want = public_jwk(cert.public_key().raw)?;
        for field in ["kty", "crv", "x", "y", "n", "e"] {
            if let Some(w) = want.get(field) {
                if k.get(field) != Some(w) {
                    return Err(err(format!(
                        "x509-svid key {i}: JWK {field} does not match the certificate's key"
                    )));
                }
            }
        }
    }
    Ok(CertificateDer::from(der))
}

fn jwt_key(
    i: usize,
    k: &serde_json::Map<String, Value>,
    seen: &[Value],
) -> Result<Value, BundleError> {
    let kid = k
        .get("kid")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| err(format!("jwt-svid key {i} has no kid")))?;
    if seen
        .iter()
        .any(|s| s.get("kid").and_then(Value::as_str) == Some(kid))
    {
        return Err(err(format!("jwt-svid key {i}: duplicate kid {kid:?}")));
    }
    let field = |f: &str| {
        k.get(f)
            .and_then(Value::as_str)
            .filter(|s| B64URL.decode(s).is_ok_and(|b| !b.is_empty()))
            .is_some()
    };
    let ok = match k.get("kty").and_then(Value::as_str) {
        Some("EC") => {
            matches!(
                k.get("crv").and_then(Value::as_str),
                Some("P-256" | "P-384" | "P-521")
            ) && field("x")
                && field("y")
        }
        Some("RSA") => field("n") && field("e"),
        Some(other) => {
            return Err(err(format!(
                "jwt-svid key {i}: kty {other:?} is not EC or RSA"
            )))
        }
        None => false,
    };
    if !ok {
        return Err(err(format!(
            "jwt-svid key {i} ({kid}): incomplete public key parameters"
        )));
    }
    // Only the public members a verifier needs go on: whatever else a foreign endpoint put in
    // the key (a private `d`, vendor members, numbers that do not survive a re-rendering) is
    // never stored or handed to agents.
    let kept = k
        .iter()
        .filter(|(name, v)| JWK_PUBLIC_MEMBERS.contains(&name.as_str()) && v.is_string())
        .map(|(name, v)| (name.clone(), v.clone()))
        .collect();
    Ok(Value::Object(kept))
}

/// The members of a `jwt-svid` JWK kept from a foreign bundle (RFC 7517/7518 public
/// parameters of EC and RSA keys, plus `use`, `kid` and `alg`).
const JWK_PUBLIC_MEMBERS: &[&str] = &["kty", "kid", "use", "alg", "crv", "x", "y", "n", "e"];

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, PublicKeyData, SanType};

    fn td(s: &str) -> TrustDomain {
        TrustDomain::new(s).unwrap()
    }

    fn cert(ca: bool, uri: Option<&str>) -> (Vec<u8>, KeyPair) {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        if ca {
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        }
        if let Some(u) = uri {
            p.subject_alt_names = vec![SanType::URI(u.try_into().unwrap())];
        }
        let c = p.self_signed(&key).unwrap();
        (c.der().to_vec(), key)
    }

    fn x509_jwk(der: &[u8]) -> Value {
        let mut k = public_jwk_of_cert(der).unwrap();
        k["use"] = json!("x509-svid");
        k["x5c"] = json!([B64STD.encode(der)]);
        k
    }

    fn jwt_jwk(kid: &str) -> Value {
        let (der, _) = cert(false, None);
        let mut k = public_jwk_of_cert(&der).unwrap();
        k["use"] = json!("jwt-svid");
        k["kid"] = json!(kid);
        k
    }

    fn doc(keys: Vec<Value>) -> Vec<u8> {
        json!({"keys": keys, "spiffe_sequence": 7, "spiffe_refresh_hint": 60})
            .to_string()
            .into_bytes()
    }

    /// Found by the `spiffe_bundle` fuzz target: a jwt-svid key carrying extra members (here
    /// numbers that re-render differently) did not survive `to_json` -> `parse`. Only the
    /// public JWK members are kept now, so the stored bundle is what a verifier needs.
    #[test]
    fn a_jwt_key_keeps_only_its_public_members_and_round_trips() {
        let mut k = jwt_jwk("k1");
        k["d"] = json!("cHJpdmF0ZQ");
        k["x-vendor"] = json!([555555555555555555555555.5, 2e-22, -22]);
        k["use "] = json!("x509-svid");
        let b = parse(&td("b.test"), &doc(vec![k])).unwrap();
        let kept = b.jwt_keys[0].as_object().unwrap();
        assert!(kept
            .keys()
            .all(|m| JWK_PUBLIC_MEMBERS.contains(&m.as_str())));
        assert!(kept.get("d").is_none());
        assert_eq!(kept["kid"], "k1");
        assert_eq!(parse(&td("b.test"), b.to_json().as_bytes()).unwrap(), b);
        let found =
            include_bytes!("../../fuzz/corpus/spiffe_bundle/regression-jwt-extra-members.json");
        let b = parse(&TrustDomain::new("cluster.local").unwrap(), found).unwrap();
        assert_eq!(parse(&b.trust_domain, b.to_json().as_bytes()).unwrap(), b);
    }

    #[test]
    fn a_good_bundle_parses_and_round_trips() {
        let (root, _) = cert(true, Some("spiffe://b.test"));
        let b = parse(&td("b.test"), &doc(vec![x509_jwk(&root), jwt_jwk("k1")])).unwrap();
        assert_eq!(b.x509_authorities.len(), 1);
        assert_eq!(b.x509_authorities[0].as_ref(), &root[..]);
        assert_eq!(b.jwt_keys.len(), 1);
        assert_eq!(b.sequence, Some(7));
        assert_eq!(b.refresh_hint, Some(Duration::from_secs(60)));
        assert_eq!(b.poll_interval(), Duration::from_secs(60));
        let again = parse(&td("b.test"), b.to_json().as_bytes()).unwrap();
        assert_eq!(again, b);
        let jwt: Value = serde_json::from_str(&b.jwt_jwks()).unwrap();
        assert_eq!(jwt["keys"].as_array().unwrap().len(), 1);
        assert_eq!(jwt["keys"][0]["use"], "jwt-svid");
        assert!(b.x509_pem().starts_with("-----BEGIN CERTIFICATE-----"));
    }

    #[test]
    fn empty_keys_is_a_valid_bundle_that_trusts_nothing() {
        let b = parse(&td("b.test"), br#"{"keys": []}"#).unwrap();
        assert!(b.x509_authorities.is_empty() && b.jwt_keys.is_empty());
        assert_eq!(b.poll_interval(), DEFAULT_REFRESH_HINT);
    }

    #[test]
    fn every_bad_document_is_refused_with_its_reason() {
        let t = td("b.test");
        let (root, _) = cert(true, None);
        let (leaf, _) = cert(false, None);
        let (other_td, _) = cert(true, Some("spiffe://a.test"));
        let mut two = x509_jwk(&root);
        two["x5c"] = json!([B64STD.encode(&root), B64STD.encode(&root)]);
        let mut none = x509_jwk(&root);
        none["x5c"] = json!([]);
        let mut wit = jwt_jwk("w");
        wit["use"] = json!("wit-svid");
        let mut no_kid = jwt_jwk("x");
        no_kid.as_object_mut().unwrap().remove("kid");
        let mut mismatch = x509_jwk(&root);
        mismatch["x"] = jwt_jwk("z")["x"].clone();
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"garbage".to_vec(), "not a JSON document"),
            (b"[1,2]".to_vec(), "not a JSON object"),
            (b"{}".to_vec(), "no \"keys\""),
            (br#"{"keys": {}}"#.to_vec(), "not an array"),
            (
                br#"{"keys": [], "spiffe_sequence": -1}"#.to_vec(),
                "spiffe_sequence",
            ),
            (
                br#"{"keys": [], "spiffe_refresh_hint": "5m"}"#.to_vec(),
                "spiffe_refresh_hint",
            ),
            (doc(vec![two]), "exactly one is required"),
            (doc(vec![none]), "exactly one is required"),
            (doc(vec![x509_jwk(&leaf)]), "not a CA certificate"),
            (
                doc(vec![x509_jwk(&other_td)]),
                "names trust domain \"a.test\"",
            ),
            (doc(vec![wit]), "only x509-svid and jwt-svid"),
            (doc(vec![json!({"kty": "EC"})]), "no \"use\""),
            (doc(vec![no_kid]), "has no kid"),
            (doc(vec![jwt_jwk("d"), jwt_jwk("d")]), "duplicate kid"),
            (doc(vec![mismatch]), "does not match"),
            (
                doc(vec![
                    json!({"use": "jwt-svid", "kid": "o", "kty": "oct", "k": "AA"}),
                ]),
                "not EC or RSA",
            ),
            (
                doc(vec![
                    json!({"use": "jwt-svid", "kid": "e", "kty": "EC", "crv": "P-256"}),
                ]),
                "incomplete",
            ),
            (
                doc(vec![json!({"use": "x509-svid", "x5c": ["!!"]})]),
                "not base64",
            ),
            (vec![b' '; MAX_BUNDLE_BYTES + 1], "limit"),
        ];
        for (bytes, want) in cases {
            let e = parse(&t, &bytes).unwrap_err();
            assert!(e.0.contains(want), "{want:?} not in {e}");
        }
    }

    #[test]
    fn public_jwk_of_rsa_and_p384() {
        let rsa = crate::pki::KeyType::Rsa2048.generate().unwrap();
        let j = public_jwk(&rsa.subject_public_key_info()).unwrap();
        assert_eq!(j["kty"], "RSA");
        assert_eq!(j["e"], "AQAB");
        let ec = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let j = public_jwk(&ec.subject_public_key_info()).unwrap();
        assert_eq!(j["crv"], "P-384");
        assert!(public_jwk(b"junk").is_err());
    }
}
