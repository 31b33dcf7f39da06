//! The `CertificateAuthority` resource itself: its spec, status and CRD (`citadel.dev/v1alpha1`),
//! with the schema rules the API server checks field by field. What the spec may set beyond
//! that is [`super::validate`]'s; what it means for the running policy is [`super::policy`]'s.

use std::collections::BTreeMap;

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// The name of the resource a server looks for by default (`serve --ca-resource`).
pub const DEFAULT_NAME: &str = "citadel";

const DURATION_RULE: &str = "self.matches('^(0|([0-9]+(ms|s|m|h|d))+)$')";
const DURATION_MESSAGE: &str =
    "must be a duration such as 90s, 15m, 24h, 90d or 1h30m (no sign, no spaces)";
const FRACTION_RULE: &str = "self > 0.0 && self < 1.0";
const FRACTION_MESSAGE: &str = "must be a fraction of the lifetime, between 0 and 1 (exclusive)";

/// What the operator declares: every field is optional; an unset one falls back to the
/// server's flag (see docs/operations.md, "Which setting wins").
// Each printer column repeats `type_ = "string"`, which clippy takes for a duplicate.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "citadel.dev",
    version = "v1alpha1",
    kind = "CertificateAuthority",
    plural = "certificateauthorities",
    shortname = "ca",
    shortname = "cas",
    namespaced,
    status = "CertificateAuthorityStatus",
    printcolumn(
        name = "Trust Domain",
        type_ = "string",
        json_path = ".spec.trustDomain"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Rotation",
        type_ = "string",
        json_path = ".status.rootRotation.stage"
    ),
    printcolumn(
        name = "Bundle",
        type_ = "string",
        json_path = ".status.bundle.summary"
    ),
    printcolumn(
        name = "Degraded",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Degraded\")].reason"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new(
    "!has(oldSelf.trustDomain) || (has(self.trustDomain) && self.trustDomain == oldSelf.trustDomain)"
).message("trustDomain is immutable once set: every certificate and identity depends on it"))]
#[x_kube(validation = Rule::new(
    "!has(self.defaultWorkloadTtl) || !has(self.maxWorkloadTtl) || self.defaultWorkloadTtl == '0' || self.maxWorkloadTtl != '0'"
).message("maxWorkloadTtl must be positive"))]
#[serde(rename_all = "camelCase")]
pub struct CertificateAuthoritySpec {
    /// The SPIFFE trust domain (`--trust-domain`); immutable once set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9._-]+$')").message("must be a trust domain: lowercase letters, digits, '.', '_' and '-'"))]
    pub trust_domain: Option<String>,
    /// Key type of new roots and intermediates (`--ca-key-type`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_key_type: Option<CaKeyType>,
    /// Validity of each new root (`--root-ttl`), e.g. `3650d`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new(DURATION_RULE).message(DURATION_MESSAGE))]
    #[schemars(length(max = 32))]
    pub root_ttl: Option<String>,
    /// Validity of each new intermediate (`--intermediate-ttl`), e.g. `365d`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new(DURATION_RULE).message(DURATION_MESSAGE))]
    #[schemars(length(max = 32))]
    pub intermediate_ttl: Option<String>,
    /// Workload TTL when a request asks for none (`--default-ttl`), e.g. `24h`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new(DURATION_RULE).message(DURATION_MESSAGE))]
    #[schemars(length(max = 32))]
    pub default_workload_ttl: Option<String>,
    /// The longest workload TTL (`--max-ttl`), e.g. `90d`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new(DURATION_RULE).message(DURATION_MESSAGE))]
    #[schemars(length(max = 32))]
    pub max_workload_ttl: Option<String>,
    /// Fraction of an intermediate's life at which the next is prepared
    /// (`--intermediate-prepare-at`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new(FRACTION_RULE).message(FRACTION_MESSAGE))]
    pub intermediate_prepare_at: Option<f64>,
    /// ... and at which it takes over (`--intermediate-activate-at`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new(FRACTION_RULE).message(FRACTION_MESSAGE))]
    pub intermediate_activate_at: Option<f64>,
    /// Fraction of the root's life at which an automatic root rotation starts
    /// (`--root-rotate-at`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new(FRACTION_RULE).message(FRACTION_MESSAGE))]
    pub root_rotate_at: Option<f64>,
    /// Propagation period of a root rotation, between publishing the new root and signing
    /// with it (`--activate-after`; default the max workload TTL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new(DURATION_RULE).message(DURATION_MESSAGE))]
    #[schemars(length(max = 32))]
    pub activate_after: Option<String>,
    /// Validity of each CRL (`--crl-validity`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new(DURATION_RULE).message(DURATION_MESSAGE))]
    #[schemars(length(max = 32))]
    pub crl_validity: Option<String>,
    /// Clock skew tolerated by peers (`--clock-skew-margin`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new(DURATION_RULE).message(DURATION_MESSAGE))]
    #[schemars(length(max = 32))]
    pub clock_skew_margin: Option<String>,
    /// A staged root rotation, requested declaratively.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_rotation: Option<RootRotationRequest>,
}

/// Key types citadel can make authorities with.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub enum CaKeyType {
    /// ECDSA P-256 (the default).
    #[serde(rename = "ec-p256")]
    EcP256,
    /// ECDSA P-384.
    #[serde(rename = "ec-p384")]
    EcP384,
    /// RSA 2048.
    #[serde(rename = "rsa-2048")]
    Rsa2048,
    /// RSA 3072.
    #[serde(rename = "rsa-3072")]
    Rsa3072,
    /// RSA 4096.
    #[serde(rename = "rsa-4096")]
    Rsa4096,
}

impl CaKeyType {
    /// The `--ca-key-type` spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::EcP256 => "ec-p256",
            Self::EcP384 => "ec-p384",
            Self::Rsa2048 => "rsa-2048",
            Self::Rsa3072 => "rsa-3072",
            Self::Rsa4096 => "rsa-4096",
        }
    }
}

/// `spec.rootRotation`: change `request` to any new value to start one staged root rotation.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct RootRotationRequest {
    /// Any string; a value the CA has not handled yet starts a rotation (`citadel ca
    /// rotate-root --store kube` writes the current time). The last handled value is
    /// `status.rootRotation.handledRequest`.
    #[schemars(length(max = 253))]
    #[x_kube(validation = Rule::new("size(self) > 0").message("request must not be empty"))]
    pub request: String,
    /// Emergency: the new chain signs at once instead of after the propagation period
    /// (cross-signing keeps workloads holding only the old bundle working).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub activate_immediately: bool,
}

/// Where the CA stands, derived from the journal by the leader.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CertificateAuthorityStatus {
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `RootRotationInProgress`, `BundlePublished`, `Degraded`.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// The trust domain of the CA's journal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust_domain: Option<String>,
    /// Roots not yet retired, oldest first.
    #[serde(default)]
    pub roots: Vec<AuthorityStatus>,
    /// Intermediates not yet retired, oldest first.
    #[serde(default)]
    pub intermediates: Vec<AuthorityStatus>,
    /// The root rotation in progress (stage and when the next is due) and the last handled
    /// request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_rotation: Option<RootRotationStatus>,
    /// How many namespaces hold the current trust bundle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bundle: Option<BundleStatus>,
    /// Per replica (by its `--pod-name`): which generation of the spec it runs, written by
    /// that replica alone (a merge patch of its own key), so `kubectl get ca -o yaml` shows
    /// when every replica runs a change.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub replicas: BTreeMap<String, ReplicaSpecStatus>,
}

/// `status.replicas.<name>`: one replica's view of the spec.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaSpecStatus {
    /// The spec generation this replica last read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `SpecApplied`: `True` when the replica runs that generation's policy; `False` with the
    /// reason (`InvalidSpec`, `TrustDomainMismatch`) when it refused it and kept the previous.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// When this replica last switched to a new policy (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_at: Option<String>,
}

/// A Kubernetes-convention condition.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// `Ready`, `RootRotationInProgress`, `BundlePublished` or `Degraded` (and, per replica,
    /// `SpecApplied`).
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// One CamelCase word for machines.
    pub reason: String,
    /// What a person needs to know.
    pub message: String,
    /// When `status` last changed (RFC 3339).
    pub last_transition_time: String,
    /// The spec generation the condition was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// One root or intermediate.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuthorityStatus {
    /// Its serial (hex), as `citadel ca status` shows it.
    pub id: String,
    /// `prepared`, `active` or `retiring`.
    pub state: String,
    /// notAfter (RFC 3339).
    pub not_after: String,
}

/// `status.rootRotation`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RootRotationStatus {
    /// `Preparing`, `Prepared`, `Activated`, `Retiring`; absent when none is in progress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,
    /// When the next stage is due (RFC 3339), once it can be known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_stage_due: Option<String>,
    /// The last `spec.rootRotation.request` acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handled_request: Option<String>,
}

/// `status.bundle`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BundleStatus {
    /// Namespaces whose `istio-ca-root-cert` holds the current bundle.
    pub current: u32,
    /// Namespaces that should hold it.
    pub namespaces: u32,
    /// `current/namespaces`, for `kubectl get`.
    pub summary: String,
}

/// The CRD as YAML, as `deploy/crds/certificateauthority.yaml` holds it.
pub fn crd_yaml() -> String {
    use kube::CustomResourceExt;
    crate::cluster::crds::yaml(
        &CertificateAuthority::crd(),
        "src/cluster/ca_resource/resource.rs",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `deploy/crds/certificateauthority.yaml`, and its copy inside `deploy/citadel.yaml`, are
    /// what the code generates.
    #[test]
    fn crds_in_deploy_match_the_certificate_authority_type() {
        crate::cluster::crds::check_deployed("certificateauthority.yaml", &crd_yaml());
    }

    /// Controllers that only put Events on the resource name its kind through
    /// `cluster::names`, untyped: it must be this type's.
    #[test]
    fn the_shared_kind_name_is_this_types() {
        let shared = crate::cluster::names::certificate_authority();
        let typed = kube::core::ApiResource::erase::<CertificateAuthority>(&());
        assert_eq!(
            (shared.group, shared.version, shared.kind, shared.plural),
            (typed.group, typed.version, typed.kind, typed.plural)
        );
    }
}
