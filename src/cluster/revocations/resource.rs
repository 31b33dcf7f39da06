//! The `Revocation` custom resource (`citadel.dev/v1alpha1`): its types and CRD, and the
//! checks of a spec the controller repeats after the API server's (the identity rule, serial
//! normalization, the one [`Target`] a spec names).

use std::collections::BTreeMap;

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::identity::SpiffeId;

/// The shape the CRD (and [`target`]) accepts for `spec.identity`: the identity of a
/// Kubernetes service account, with Kubernetes' own name rules (a namespace is a DNS label of
/// at most 63 characters, a service-account name a DNS subdomain of at most 253, checked by a
/// second rule), so an identity is at most 588 characters (a 255-character trust domain) and
/// a denial at most ~700 bytes of the journal.
pub const IDENTITY_RULE: &str = "self.matches('^spiffe://[a-z0-9._-]{1,255}/ns/[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?/sa/[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?([.][a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)*$')";

/// RFC 5280 revocation reasons, as `spec.reason` spells them (the names of [`crate::ca::crl::REASONS`]).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum RevocationReason {
    /// No reason given.
    #[default]
    Unspecified,
    /// The private key leaked.
    KeyCompromise,
    /// The CA's key leaked.
    CaCompromise,
    /// The workload changed hands or purpose.
    AffiliationChanged,
    /// Replaced by another certificate.
    Superseded,
    /// The workload is gone.
    CessationOfOperation,
    /// Its rights were taken away.
    PrivilegeWithdrawn,
}

impl RevocationReason {
    /// The name `ca::crl` knows.
    pub fn as_str(self) -> &'static str {
        match self {
            RevocationReason::Unspecified => "unspecified",
            RevocationReason::KeyCompromise => "key-compromise",
            RevocationReason::CaCompromise => "ca-compromise",
            RevocationReason::AffiliationChanged => "affiliation-changed",
            RevocationReason::Superseded => "superseded",
            RevocationReason::CessationOfOperation => "cessation-of-operation",
            RevocationReason::PrivilegeWithdrawn => "privilege-withdrawn",
        }
    }

    /// The reason named `s` (one of [`crate::ca::crl::REASONS`]).
    pub fn parse(s: &str) -> Option<Self> {
        serde_json::from_value(serde_json::Value::String(s.to_string())).ok()
    }
}

/// What to revoke: exactly one of a serial or an identity, and why.
// Each printer column repeats `type_ = "string"`; clippy reads that as a duplicate.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "citadel.dev",
    version = "v1alpha1",
    kind = "Revocation",
    plural = "revocations",
    shortname = "rev",
    namespaced,
    status = "RevocationStatus",
    doc = "Revokes one certificate (spec.serial) or denies a SPIFFE identity and revokes every live certificate it holds (spec.identity). Reconciled by every citadel replica against its own issuance index.",
    printcolumn(name = "Identity", type_ = "string", json_path = ".spec.identity"),
    printcolumn(name = "Serial", type_ = "string", json_path = ".spec.serial"),
    printcolumn(name = "Reason", type_ = "string", json_path = ".spec.reason"),
    printcolumn(
        name = "Expires",
        type_ = "string",
        json_path = ".spec.expirationTimestamp"
    ),
    printcolumn(
        name = "Applied",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Applied\")].status"
    ),
    printcolumn(
        name = "Revoked",
        type_ = "integer",
        json_path = ".status.certificatesRevoked",
        description = "certificates on the CRL because of this revocation"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new("has(self.serial) != has(self.identity)").message("name exactly one of spec.serial or spec.identity"))]
#[x_kube(validation = Rule::new("!has(self.expirationTimestamp) || has(self.identity)").message("expirationTimestamp applies to spec.identity only: a revoked serial stays revoked"))]
#[x_kube(validation = Rule::new("self == oldSelf").message("a Revocation cannot be changed once created (a revocation is final); create another one"))]
#[serde(rename_all = "camelCase")]
pub struct RevocationSpec {
    /// Serial number of one certificate, hex (colons, case and a 0x prefix are ignored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    #[x_kube(validation = Rule::new("self.matches('^(0[xX])?[0-9a-fA-F:]{1,59}$')").message("serial must be hex (colons allowed), at most 20 bytes, e.g. 3a:9f:0c or 3a9f0c"))]
    pub serial: Option<String>,
    /// SPIFFE ID of a Kubernetes service account, spiffe://<trust domain>/ns/<namespace>/sa/<name>, to deny while this Revocation exists (and at most until expirationTimestamp, or until every certificate it covers has expired); its live certificates are revoked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 588))]
    #[x_kube(validation = Rule::new(IDENTITY_RULE).message("identity must be a SPIFFE ID of a Kubernetes service account, spiffe://<trust domain>/ns/<namespace>/sa/<name> (namespace: a DNS label of at most 63 characters; name: a DNS subdomain), such as spiffe://cluster.local/ns/shop/sa/frontend"))]
    #[x_kube(validation = Rule::new("self.size() - self.indexOf('/sa/') - 4 <= 253").message("the service account name in identity is longer than the 253 characters Kubernetes allows"))]
    pub identity: Option<String>,
    /// RFC 5280 reason, as it appears on the CRL.
    #[serde(default)]
    pub reason: RevocationReason,
    /// With spec.identity only: when the denial ends by itself (RFC 3339, e.g. 2030-01-01T00:00:00Z), even while this Revocation exists. Without it the denial ends when the Revocation is deleted, or once every certificate it covers has expired (--max-ttl after it was applied, plus the clock-skew margin), whichever comes first. The certificates it revoked stay on the CRL until they expire either way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("format" = "date-time"))]
    pub expiration_timestamp: Option<String>,
}

/// A condition in the Kubernetes convention.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// `Applied`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// CamelCase reason for the last transition.
    pub reason: String,
    /// For people.
    pub message: String,
    /// When `status` last changed, RFC 3339.
    pub last_transition_time: String,
    /// The generation of the spec this condition was computed from.
    pub observed_generation: i64,
}

/// The CRL that lists a revocation: issuer authority and CRL number.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CrlVersion {
    /// Id (serial) of the authority that signed the CRL.
    pub issuer: String,
    /// The CRLNumber of the current CRL carrying the revocation.
    pub number: u64,
}

/// What one replica found in its own issuance index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaReport {
    /// Live certificates of the identity or serial in this replica's index.
    pub found_in_index: u64,
    /// The generation this replica reconciled.
    pub observed_generation: i64,
}

/// Computed from the journal (the record of truth) plus one report per replica.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RevocationStatus {
    /// `Applied`.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// When the journal first recorded it, RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_at: Option<String>,
    /// Certificates on the CRL because of it (for an identity: all of its revoked certificates).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificates_revoked: Option<u64>,
    /// The current CRLs that list them.
    #[serde(default)]
    pub crl_versions: Vec<CrlVersion>,
    /// Per replica (by name): what its own index held.
    #[serde(default)]
    pub replicas: BTreeMap<String, ReplicaReport>,
}

/// What a Revocation asks for, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// One certificate, serial in lowercase hex without leading zero octets.
    Serial(String),
    /// A SPIFFE ID.
    Identity(String),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Serial(s) => write!(f, "serial {s}"),
            Target::Identity(i) => write!(f, "identity {i}"),
        }
    }
}

/// Lowercase hex without separators or leading zero octets; `None` if not hex.
pub fn normalize_serial(s: &str) -> Option<String> {
    let hex: String = s
        .trim()
        .chars()
        .filter(|c| *c != ':')
        .collect::<String>()
        .to_ascii_lowercase();
    // Accept `openssl x509 -serial` output (`serial=3A9F...`) and 0x-prefixed forms.
    let hex = hex.strip_prefix("serial=").unwrap_or(&hex);
    let hex = hex.strip_prefix("0x").unwrap_or(hex).to_string();
    if hex.is_empty() || hex.len() > 40 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let padded = if hex.len() % 2 == 1 {
        format!("0{hex}")
    } else {
        hex
    };
    let bytes = hex::decode(padded).ok()?;
    Some(crate::pki::chain::serial_hex(&bytes))
}

/// Checks a spec the way the CRD schema does (an object stored before the CRD had its
/// rules, or written around them, must not be acted on wrongly) plus the trust domain.
pub fn target(spec: &RevocationSpec, trust_domain: &str) -> Result<Target, String> {
    expires_at(spec)?;
    if spec.expiration_timestamp.is_some() && spec.identity.is_none() {
        return Err(
            "spec.expirationTimestamp applies to spec.identity only: a revoked serial stays revoked"
                .into(),
        );
    }
    match (&spec.serial, &spec.identity) {
        (Some(s), None) => normalize_serial(s).map(Target::Serial).ok_or_else(|| {
            format!("spec.serial {s:?} is not a certificate serial: expected up to 20 bytes of hex")
        }),
        (None, Some(i)) => identity_target(i, trust_domain).map(Target::Identity),
        _ => Err("name exactly one of spec.serial or spec.identity".into()),
    }
}

/// When the denial a spec asks for ends by itself (`spec.expirationTimestamp`, unix seconds).
pub fn expires_at(spec: &RevocationSpec) -> Result<Option<i64>, String> {
    let Some(raw) = &spec.expiration_timestamp else {
        return Ok(None);
    };
    time::OffsetDateTime::parse(raw, &time::format_description::well_known::Rfc3339)
        .map(|t| Some(t.unix_timestamp()))
        .map_err(|_| {
            let head: String = raw.chars().take(40).collect();
            format!("spec.expirationTimestamp {head:?} is not an RFC 3339 time such as 2030-01-01T00:00:00Z")
        })
}

/// The identities the Revocations in `revs` deny at `now`: those naming a valid identity
/// whose `expirationTimestamp` has not passed. A denial no Revocation holds is lifted.
pub fn held_at<'a>(
    revs: impl Iterator<Item = &'a Revocation>,
    trust_domain: &str,
    now: i64,
) -> std::collections::HashSet<String> {
    revs.filter(|r| !matches!(expires_at(&r.spec), Ok(Some(e)) if now >= e))
        .filter_map(|r| match target(&r.spec, trust_domain) {
            Ok(Target::Identity(id)) => Some(id),
            _ => None,
        })
        .collect()
}

/// Checks an identity to deny (a Revocation's `spec.identity`, `citadel revoke --identity`):
/// the SPIFFE ID of a Kubernetes service account in `trust_domain`, with Kubernetes' name
/// rules. Anything else could never have been issued by this CA's token and pod paths, and
/// an unbounded name would let denials fill the journal (issue 20, M2). Returns the ID in
/// its one spelling.
pub fn identity_target(raw: &str, trust_domain: &str) -> Result<String, String> {
    let shown = || {
        let head: String = raw.chars().take(80).collect();
        if head.len() < raw.len() {
            format!("{head:?}... ({} characters)", raw.chars().count())
        } else {
            format!("{head:?}")
        }
    };
    let id = SpiffeId::parse(raw).map_err(|_| {
        format!("spec.identity {} is not a SPIFFE ID such as spiffe://cluster.local/ns/shop/sa/frontend", shown())
    })?;
    if id.trust_domain().as_str() != trust_domain {
        return Err(format!(
            "spec.identity {} is outside this CA's trust domain {trust_domain:?}",
            shown()
        ));
    }
    if id.service_account().is_none() {
        return Err(format!(
            "spec.identity {} is not spiffe://{trust_domain}/ns/<namespace>/sa/<name> with \
             Kubernetes names (namespace: a DNS label of at most 63 characters; service \
             account: a DNS subdomain of at most 253): no certificate this CA issues carries it",
            shown()
        ));
    }
    Ok(id.to_string())
}

/// The CRD as YAML, what `deploy/crds/revocation.yaml` holds.
pub fn crd_yaml() -> String {
    use kube::CustomResourceExt;
    crate::cluster::crds::yaml(&Revocation::crd(), "src/cluster/revocations/resource.rs")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// deploy/crds/revocation.yaml, and its copy inside deploy/citadel.yaml (one
    /// `kubectl apply -f deploy/citadel.yaml` installs everything), equal what the code
    /// generates.
    #[test]
    fn crds_in_deploy_match_the_revocation_type() {
        crate::cluster::crds::check_deployed("revocation.yaml", &crd_yaml());
    }

    #[test]
    fn the_schema_carries_the_rules() {
        let s = crd_yaml();
        for rule in [
            "has(self.serial) != has(self.identity)",
            "self == oldSelf",
            "x-kubernetes-validations",
            "key-compromise",
            "subresources:",
        ] {
            assert!(s.contains(rule), "{rule} missing");
        }
    }

    #[test]
    fn reasons_match_the_crl_names() {
        for r in crate::ca::crl::REASONS {
            assert_eq!(
                RevocationReason::parse(r).map(RevocationReason::as_str),
                Some(r)
            );
        }
        assert_eq!(RevocationReason::parse("bogus"), None);
    }

    fn spec(serial: Option<&str>, identity: Option<&str>) -> RevocationSpec {
        RevocationSpec {
            serial: serial.map(Into::into),
            identity: identity.map(Into::into),
            reason: RevocationReason::default(),
            expiration_timestamp: None,
        }
    }

    /// Issue 20, M2: a Revocation with an expirationTimestamp holds its denial until then, on
    /// the injected clock; a bad time or one on a serial is refused. Failed before: the field
    /// did not exist and a denial was held for as long as its Revocation existed.
    #[test]
    fn an_expiration_timestamp_ends_the_hold() {
        use crate::clock::{Clock, ManualClock};
        let td = "cluster.local";
        let id = "spiffe://cluster.local/ns/shop/sa/cart";
        let t0 = time::macros::datetime!(2030-01-01 0:00 UTC);
        let clock = ManualClock::new(t0);
        let mut s = spec(None, Some(id));
        s.expiration_timestamp = Some("2030-01-01T01:00:00Z".into());
        let with = Revocation::new("a", s.clone());
        let held =
            |revs: &[&Revocation]| held_at(revs.iter().copied(), td, clock.now().unix_timestamp());
        assert!(held(&[&with]).contains(id));
        clock.advance(time::Duration::minutes(59));
        assert!(held(&[&with]).contains(id));
        clock.advance(time::Duration::minutes(1));
        assert!(held(&[&with]).is_empty(), "expired at 01:00");
        let without = Revocation::new("b", spec(None, Some(id)));
        assert!(
            held(&[&with, &without]).contains(id),
            "another still holds it"
        );
        s.expiration_timestamp = Some("tomorrow".into());
        assert!(target(&s, td).unwrap_err().contains("RFC 3339"));
        let mut serial = spec(Some("0a"), None);
        serial.expiration_timestamp = Some("2030-01-01T01:00:00Z".into());
        assert!(target(&serial, td).unwrap_err().contains("identity only"));
    }

    #[test]
    fn targets() {
        let td = "cluster.local";
        assert_eq!(
            target(&spec(Some("3A:9F"), None), td),
            Ok(Target::Serial("3a9f".into()))
        );
        assert_eq!(
            target(&spec(None, Some("spiffe://cluster.local/ns/a/sa/b")), td),
            Ok(Target::Identity("spiffe://cluster.local/ns/a/sa/b".into()))
        );
        assert!(target(&spec(None, None), td)
            .unwrap_err()
            .contains("exactly one"));
        assert!(
            target(&spec(Some("01"), Some("spiffe://cluster.local/x")), td)
                .unwrap_err()
                .contains("exactly one")
        );
        assert!(target(&spec(Some("zz"), None), td)
            .unwrap_err()
            .contains("not a certificate serial"));
        assert!(
            target(&spec(None, Some("spiffe://other.org/ns/a/sa/b")), td)
                .unwrap_err()
                .contains("outside this CA's trust domain")
        );
        assert!(target(&spec(None, Some("spiffe://cluster.local/ns/../sa/b")), td).is_err());
    }

    /// Issue 20, M2: only a Kubernetes service account's identity, with Kubernetes' name
    /// lengths, can be denied; the refusal names the rule and never echoes 2,000 characters.
    #[test]
    fn identities_are_service_accounts_of_kubernetes_name_lengths() {
        let td = "cluster.local";
        let id = |ns: &str, sa: &str| format!("spiffe://cluster.local/ns/{ns}/sa/{sa}");
        let l63 = "a".repeat(63);
        let sa253 = format!("{l63}.{l63}.{l63}.{}", "b".repeat(61));
        assert_eq!(sa253.len(), 253);
        assert!(identity_target(&id(&l63, &sa253), td).is_ok());
        for (bad, why) in [
            (id(&"a".repeat(64), "x"), "DNS label of at most 63"),
            (id("shop", &format!("{sa253}b")), "at most 253"),
            (id("shop", &"x".repeat(1950)), "(1984 characters)"),
            (id("Shop", "x"), "Kubernetes names"),
            (
                "spiffe://cluster.local/workload/x".to_string(),
                "Kubernetes names",
            ),
            (id("shop", "x") + "/extra", "Kubernetes names"),
            (
                "spiffe://other.td/ns/a/sa/b".to_string(),
                "outside this CA's trust domain",
            ),
            (
                format!("spiffe://cluster.local/{}", "p".repeat(2100)),
                "not a SPIFFE ID",
            ),
        ] {
            let e = identity_target(&bad, td).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
            assert!(e.len() < 400, "the message echoes the input: {e}");
        }
    }

    /// The CRD's rules say the same as `identity_target` (checked against the API server by
    /// tests/it/revocation_kube.rs; here: the rule text is in the generated schema).
    #[test]
    fn the_schema_bounds_identities() {
        let s = crd_yaml();
        assert!(s.contains("maxLength: 588"), "{s}");
        assert!(
            s.contains("/ns/[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?/sa/"),
            "{s}"
        );
        assert!(s.contains("self.indexOf('/sa/')"), "{s}");
    }
}
