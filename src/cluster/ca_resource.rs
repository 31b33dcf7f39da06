//! The `CertificateAuthority` custom resource (`citadel.dev/v1alpha1`): the operator's way to
//! declare the CA's policy and to request a root rotation, and the status that says where
//! the CA stands (conditions `Ready`, `RootRotationInProgress`, `BundlePublished`,
//! `Degraded`, and every root and intermediate with its expiry).
//!
//! The journal stays the record of truth: the resource's spec is read at start (settings it
//! sets win over flags), a rotation request is acted on in the same journal write that records
//! it as handled (so a re-apply, a crash or a new leader never starts a second rotation), and
//! the status is derived from the journal, written only when it changes. The pure parts
//! (spec -> policy, journal -> status) are plain functions; [`Reconciler`] runs them under
//! the Lease.

use std::sync::Arc;
use std::time::Duration;

use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{CustomResource, KubeSchema, Resource};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::ca::policy::CaPolicy;
use crate::ca::Ca;
use crate::clock::SharedClock;
use crate::journal::{Journal, Role, Status};
use crate::shutdown::Shutdown;
use crate::store::Store;

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
}

/// A Kubernetes-convention condition.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// `Ready`, `RootRotationInProgress`, `BundlePublished` or `Degraded`.
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
    super::crds::yaml(&CertificateAuthority::crd(), "src/cluster/ca_resource.rs")
}

fn dur(field: &str, v: &Option<String>) -> Result<Option<Duration>, String> {
    v.as_deref()
        .map(|s| crate::duration::parse(s).map_err(|e| format!("spec.{field}: {e}")))
        .transpose()
}

/// The longest workload TTL (`defaultWorkloadTtl`, `maxWorkloadTtl`) a spec may set unless
/// `serve --ca-resource-max-workload-ttl` raises it: istiod's maximum.
pub const MAX_SPEC_WORKLOAD_TTL: Duration = Duration::from_secs(90 * 86_400);
/// The longest `intermediateTtl` a spec may set (5 years).
pub const MAX_SPEC_INTERMEDIATE_TTL: Duration = Duration::from_secs(5 * 365 * 86_400);
/// The longest `rootTtl` a spec may set (20 years).
pub const MAX_SPEC_ROOT_TTL: Duration = Duration::from_secs(20 * 365 * 86_400);
/// The longest `crlValidity` a spec may set (7 days): a CRL stays acceptable that long, so a
/// longer one lets an old CRL that predates a revocation be replayed for longer.
pub const MAX_SPEC_CRL_VALIDITY: Duration = Duration::from_secs(7 * 86_400);

/// The most a CertificateAuthority spec may set. Whoever may edit the resource is often a
/// narrower grant than whoever deploys citadel with its flags, so the spec alone must not be
/// able to make citadel hand out year-long workload certificates or month-long CRLs; flags are
/// not capped (docs/operations.md, "Limits on the spec").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecCaps {
    /// `defaultWorkloadTtl` and `maxWorkloadTtl` (`--ca-resource-max-workload-ttl`).
    pub workload_ttl: Duration,
}

impl Default for SpecCaps {
    fn default() -> Self {
        Self {
            workload_ttl: MAX_SPEC_WORKLOAD_TTL,
        }
    }
}

/// `value` of `spec.<field>`, refused above `cap` with a message naming both (and the flag
/// that raises the cap, if one does).
fn capped(
    field: &str,
    value: Option<Duration>,
    cap: Duration,
    raise: Option<&str>,
) -> Result<Option<Duration>, String> {
    match value {
        Some(v) if v > cap => Err(format!(
            "spec.{field} {} is above the cap of {} for a CertificateAuthority spec{}",
            crate::duration::format(v),
            crate::duration::format(cap),
            raise
                .map(|f| format!(" (raise it with {f})"))
                .unwrap_or_default()
        )),
        v => Ok(v),
    }
}

/// Which source each effective setting came from: `(spec field, value, source)`.
pub type Sources = Vec<(&'static str, String, String)>;

/// The effective policy: each field the spec sets wins over the flag; unset ones keep the
/// flag's value. Refuses a combination that cannot work (the API server's schema checks each
/// field alone), and a TTL or CRL validity above `caps` and the `MAX_SPEC_*` maxima.
pub fn effective_policy(
    spec: &CertificateAuthoritySpec,
    flags: &CaPolicy,
    activate_after_from_flag: bool,
    caps: &SpecCaps,
) -> Result<(CaPolicy, Sources), String> {
    const RAISE: Option<&str> = Some("--ca-resource-max-workload-ttl");
    let mut p = flags.clone();
    let mut sources: Sources = Vec::new();
    let fmt = crate::duration::format;
    macro_rules! take {
        ($field:literal, $flag:literal, $spec:expr, $target:expr, $show:expr) => {
            match $spec {
                Some(v) => {
                    $target = v;
                    sources.push(($field, $show(&$target), "spec".to_string()));
                }
                None => sources.push(($field, $show(&$target), format!("flag {}", $flag))),
            }
        };
    }
    take!(
        "caKeyType",
        "--ca-key-type",
        spec.ca_key_type.map(|k| k.as_str().to_string()),
        p.key_type,
        |v: &String| v.clone()
    );
    take!(
        "rootTtl",
        "--root-ttl",
        capped(
            "rootTtl",
            dur("rootTtl", &spec.root_ttl)?,
            MAX_SPEC_ROOT_TTL,
            None
        )?,
        p.rotation.root_ttl,
        |v: &Duration| fmt(*v)
    );
    take!(
        "intermediateTtl",
        "--intermediate-ttl",
        capped(
            "intermediateTtl",
            dur("intermediateTtl", &spec.intermediate_ttl)?,
            MAX_SPEC_INTERMEDIATE_TTL,
            None
        )?,
        p.rotation.intermediate_ttl,
        |v: &Duration| fmt(*v)
    );
    take!(
        "defaultWorkloadTtl",
        "--default-ttl",
        capped(
            "defaultWorkloadTtl",
            dur("defaultWorkloadTtl", &spec.default_workload_ttl)?,
            caps.workload_ttl,
            RAISE
        )?,
        p.ttl.default,
        |v: &Duration| fmt(*v)
    );
    take!(
        "maxWorkloadTtl",
        "--max-ttl",
        capped(
            "maxWorkloadTtl",
            dur("maxWorkloadTtl", &spec.max_workload_ttl)?,
            caps.workload_ttl,
            RAISE
        )?,
        p.ttl.max,
        |v: &Duration| fmt(*v)
    );
    p.rotation.max_leaf_ttl = p.ttl.max;
    take!(
        "intermediatePrepareAt",
        "--intermediate-prepare-at",
        spec.intermediate_prepare_at,
        p.rotation.prepare_at,
        |v: &f64| v.to_string()
    );
    take!(
        "intermediateActivateAt",
        "--intermediate-activate-at",
        spec.intermediate_activate_at,
        p.rotation.activate_at,
        |v: &f64| v.to_string()
    );
    take!(
        "rootRotateAt",
        "--root-rotate-at",
        spec.root_rotate_at,
        p.rotation.root_rotate_at,
        |v: &f64| v.to_string()
    );
    // --activate-after defaults to --max-ttl: without either flag, a spec that shortens the
    // max TTL shortens the propagation period too.
    let activate = dur("activateAfter", &spec.activate_after)?;
    if activate.is_none() && !activate_after_from_flag {
        p.rotation.activate_after = p.ttl.max;
        sources.push((
            "activateAfter",
            fmt(p.rotation.activate_after),
            "maxWorkloadTtl (the default)".into(),
        ));
    } else {
        take!(
            "activateAfter",
            "--activate-after",
            activate,
            p.rotation.activate_after,
            |v: &Duration| fmt(*v)
        );
    }
    take!(
        "crlValidity",
        "--crl-validity",
        capped(
            "crlValidity",
            dur("crlValidity", &spec.crl_validity)?,
            MAX_SPEC_CRL_VALIDITY,
            None
        )?,
        p.rotation.crl_validity,
        |v: &Duration| fmt(*v)
    );
    take!(
        "clockSkewMargin",
        "--clock-skew-margin",
        dur("clockSkewMargin", &spec.clock_skew_margin)?,
        p.rotation.skew_margin,
        |v: &Duration| fmt(*v)
    );
    if p.ttl.default > p.ttl.max {
        return Err(format!(
            "the default workload TTL {} exceeds the maximum {}",
            fmt(p.ttl.default),
            fmt(p.ttl.max)
        ));
    }
    if p.rotation.prepare_at > p.rotation.activate_at {
        return Err("intermediatePrepareAt must not be later than intermediateActivateAt".into());
    }
    Ok((p, sources))
}

/// Formats unix seconds as RFC 3339 (UTC).
fn rfc3339(t: i64) -> String {
    OffsetDateTime::from_unix_timestamp(t)
        .ok()
        .and_then(|d| {
            d.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// What the status is computed from besides the journal.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    /// `metadata.generation` of the resource.
    pub generation: Option<i64>,
    /// Now, unix seconds.
    pub now: i64,
    /// The installed signer: its id-less subject and notAfter (unix seconds); `None` when
    /// nothing is installed.
    pub signer_not_after: Option<i64>,
    /// Namespaces holding the current bundle, and namespaces that should; `None` when they
    /// could not be counted.
    pub bundle: Option<(u32, u32)>,
    /// Something that needs a person: `(reason, message)`.
    pub degraded: Option<(String, String)>,
}

fn stage_name(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_uppercase().chain(c).collect())
        .unwrap_or_default()
}

/// The status the journal and observations call for. Conditions whose status did not change
/// keep their `lastTransitionTime` from `previous`, so re-running this changes nothing.
pub fn status_for(
    j: &Journal,
    o: &Observed,
    previous: Option<&CertificateAuthorityStatus>,
) -> CertificateAuthorityStatus {
    let list = |role: Role| {
        j.authorities
            .iter()
            .filter(|a| a.role == role && a.status != Status::Retired)
            .map(|a| AuthorityStatus {
                id: a.id.clone(),
                state: format!("{:?}", a.status).to_lowercase(),
                not_after: rfc3339(a.not_after),
            })
            .collect::<Vec<_>>()
    };
    let mut conditions = Vec::new();
    let mut cond = |type_: &str, ok: Option<bool>, reason: &str, message: String| {
        let status = match ok {
            Some(true) => "True",
            Some(false) => "False",
            None => "Unknown",
        };
        let since = previous
            .and_then(|p| p.conditions.iter().find(|c| c.type_ == type_))
            .filter(|c| c.status == status)
            .map(|c| c.last_transition_time.clone())
            .unwrap_or_else(|| rfc3339(o.now));
        conditions.push(Condition {
            type_: type_.into(),
            status: status.into(),
            reason: reason.into(),
            message,
            last_transition_time: since,
            observed_generation: o.generation,
        });
    };
    match o.signer_not_after {
        Some(t) if t > o.now => cond(
            "Ready",
            Some(true),
            "Signing",
            format!(
                "signing with intermediate {} until {}",
                j.active_signer().map(|a| a.id.as_str()).unwrap_or("?"),
                rfc3339(t)
            ),
        ),
        Some(t) => cond(
            "Ready",
            Some(false),
            "SignerExpired",
            format!("the installed signer expired at {}: no certificate can be issued; see `citadel ca status`", rfc3339(t)),
        ),
        None => cond(
            "Ready",
            Some(false),
            "NoSigner",
            "no signer is installed yet".into(),
        ),
    }
    let rotation = j.root_rotation.as_ref();
    match rotation {
        Some(r) => {
            let due = r.next_due();
            let next = match r.stage() {
                "preparing" => "publishing the two-root bundle".to_string(),
                "prepared" => format!(
                    "the new chain signs at {}",
                    due.map(rfc3339).unwrap_or_default()
                ),
                "activated" => format!(
                    "the cross-signed certificate is withdrawn at {}",
                    due.map(rfc3339).unwrap_or_default()
                ),
                _ => format!(
                    "the old root leaves the bundle at {}",
                    due.map(rfc3339).unwrap_or_default()
                ),
            };
            cond(
                "RootRotationInProgress",
                Some(true),
                &stage_name(r.stage()),
                format!(
                    "stage {} ({}, new root {}): {next}",
                    r.stage(),
                    r.trigger,
                    r.new_root
                ),
            )
        }
        None => cond(
            "RootRotationInProgress",
            Some(false),
            "NoRotation",
            "no root rotation in progress".into(),
        ),
    }
    match o.bundle {
        Some((n, m)) if n >= m => cond(
            "BundlePublished",
            Some(true),
            "AllNamespaces",
            format!("{n} of {m} namespaces hold the current trust bundle"),
        ),
        Some((n, m)) => cond(
            "BundlePublished",
            Some(false),
            "Propagating",
            format!("{n} of {m} namespaces hold the current trust bundle"),
        ),
        None => cond(
            "BundlePublished",
            None,
            "Unknown",
            "the bundle ConfigMaps could not be counted".into(),
        ),
    }
    match &o.degraded {
        Some((reason, message)) => cond("Degraded", Some(true), reason, message.clone()),
        None => cond(
            "Degraded",
            Some(false),
            "AsExpected",
            "nothing needs a person".into(),
        ),
    }
    CertificateAuthorityStatus {
        observed_generation: o.generation,
        conditions,
        trust_domain: Some(j.trust_domain.clone()),
        roots: list(Role::Root),
        intermediates: list(Role::Intermediate),
        root_rotation: Some(RootRotationStatus {
            stage: rotation.map(|r| stage_name(r.stage())),
            next_stage_due: rotation.and_then(|r| r.next_due()).map(rfc3339),
            handled_request: j.root_rotation_request.clone(),
        }),
        bundle: o.bundle.map(|(n, m)| BundleStatus {
            current: n,
            namespaces: m,
            summary: format!("{n}/{m}"),
        }),
    }
}

/// A JSON merge patch from `old` to `new`: keys that `new` no longer has are set to null, so
/// the API server removes them (a plain merge patch would leave, say, a finished rotation's
/// stage in place).
pub fn merge_patch(old: &serde_json::Value, new: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match (old, new) {
        (Value::Object(o), Value::Object(mut n)) => {
            for (k, ov) in o {
                match n.remove(k) {
                    None => {
                        n.insert(k.clone(), Value::Null);
                    }
                    Some(nv) => {
                        n.insert(k.clone(), merge_patch(ov, nv));
                    }
                }
            }
            Value::Object(n)
        }
        (_, new) => new,
    }
}

/// The Event a change of rotation stage calls for: `(reason, note)`.
pub fn stage_event(before: Option<&str>, after: Option<&str>) -> Option<(String, String)> {
    match (before, after) {
        (b, a) if b == a => None,
        (_, Some(a)) => Some((
            format!("RootRotation{a}"),
            format!("root rotation reached stage {}", a.to_lowercase()),
        )),
        (Some(_), None) => Some((
            "RootRotationCompleted".into(),
            "root rotation complete: the old root left the trust bundle".into(),
        )),
        (None, None) => None,
    }
}

/// Reads the resource, if the CRD is installed and the resource exists. A missing CRD is
/// `Ok(None)`: a cluster without it runs on flags alone.
pub async fn get(
    client: &kube::Client,
    namespace: &str,
    name: &str,
) -> Result<Option<CertificateAuthority>, String> {
    let api: Api<CertificateAuthority> = Api::namespaced(client.clone(), namespace);
    match api.get_opt(name).await {
        Ok(v) => Ok(v),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(None),
        Err(e) => Err(format!(
            "cannot read CertificateAuthority {namespace}/{name}: {e}"
        )),
    }
}

/// Reconciles one `CertificateAuthority` while this replica leads: stores the running
/// policy in the journal, acts on a rotation request, writes the status when it changes, and
/// records Events.
pub struct Reconciler {
    /// The API client.
    pub client: kube::Client,
    /// The CA namespace (the journal Secret's).
    pub namespace: String,
    /// The resource's name (`--ca-resource`).
    pub name: String,
    /// The journal.
    pub store: Arc<dyn Store>,
    /// The live CA, for `Ready`.
    pub ca: Arc<Ca>,
    /// Time.
    pub clock: SharedClock,
    /// The policy this server runs with (flags merged with the spec at start).
    pub running: CaPolicy,
    /// Where it came from, stored with it.
    pub source: String,
    /// `activate_after` came from an explicit flag (else it follows the max TTL).
    pub activate_after_from_flag: bool,
    /// The flags alone, to tell a spec change that needs a restart.
    pub flags: CaPolicy,
    /// What the spec may set at most.
    pub caps: SpecCaps,
    /// Wakes the scheduler after a rotation was prepared.
    pub wake: Arc<tokio::sync::Notify>,
    /// How often to reconcile without a watch event (stage deadlines are time-driven).
    pub interval: Duration,
    recorder: Recorder,
    /// Reasons of Warning events already recorded for the current problem (no repeats).
    last_warning: std::sync::Mutex<Option<String>>,
}

/// What one pass did, for tests and logs.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Pass {
    /// The resource exists.
    pub found: bool,
    /// A rotation was prepared for a new request.
    pub rotation_started: bool,
    /// The status was written.
    pub status_written: bool,
    /// The policy was written to the journal.
    pub policy_written: bool,
}

impl Reconciler {
    /// A reconciler for `namespace/name`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        client: kube::Client,
        namespace: &str,
        name: &str,
        store: Arc<dyn Store>,
        ca: Arc<Ca>,
        clock: SharedClock,
        running: CaPolicy,
        source: String,
        flags: CaPolicy,
        activate_after_from_flag: bool,
        caps: SpecCaps,
        wake: Arc<tokio::sync::Notify>,
        interval: Duration,
    ) -> Arc<Self> {
        Arc::new(Self {
            recorder: Recorder::new(
                client.clone(),
                Reporter {
                    controller: "citadel".into(),
                    instance: std::env::var("POD_NAME").ok(),
                },
            ),
            client,
            namespace: namespace.into(),
            name: name.into(),
            store,
            ca,
            clock,
            running,
            source,
            flags,
            activate_after_from_flag,
            caps,
            wake,
            interval,
            last_warning: std::sync::Mutex::new(None),
        })
    }

    /// Reconciles while `leader` says this replica leads, until shutdown: on every change of
    /// the resource and every `interval` (stages fall due with time).
    pub async fn run(
        self: Arc<Self>,
        leader: Option<crate::leadership::Leadership>,
        shutdown: Shutdown,
    ) {
        super::controller::while_leading("certificateauthority", leader, shutdown, |stop| {
            self.clone().controller(stop)
        })
        .await
    }

    async fn controller(self: Arc<Self>, mut stop: super::controller::Stop) {
        use futures_util::StreamExt;
        use kube::runtime::{watcher, WatchStreamExt};
        let api: Api<CertificateAuthority> = Api::namespaced(self.client.clone(), &self.namespace);
        let cfg = watcher::Config::default().fields(&format!("metadata.name={}", self.name));
        let mut events = watcher(api, cfg)
            .default_backoff()
            .touched_objects()
            .boxed();
        let mut crd_missing_logged = false;
        loop {
            match self.reconcile().await {
                Ok(_) => {}
                Err(e) if e.contains("404") || e.contains("not found") => {
                    if !crd_missing_logged {
                        tracing::info!(error = %e, "CertificateAuthority resources are not served (CRD not installed?); running on flags");
                        crd_missing_logged = true;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, resource = %format!("{}/{}", self.namespace, self.name), "CertificateAuthority reconcile failed; retrying")
                }
            }
            tokio::select! {
                _ = &mut stop => return,
                _ = tokio::time::sleep(self.interval) => {}
                e = events.next() => match e {
                    Some(Ok(_)) | Some(Err(_)) => {}
                    None => return,
                },
            }
        }
    }

    async fn warn(&self, cr: &CertificateAuthority, reason: &str, note: String) {
        {
            let mut last = self.last_warning.lock().unwrap_or_else(|p| p.into_inner());
            let key = format!("{reason}:{note}");
            if last.as_deref() == Some(key.as_str()) {
                return;
            }
            *last = Some(key);
        }
        tracing::warn!(reason, note = %note, "CertificateAuthority needs attention");
        self.event(cr, EventType::Warning, reason, note).await;
    }

    async fn event(&self, cr: &CertificateAuthority, type_: EventType, reason: &str, note: String) {
        let ev = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, &cr.object_ref(&())).await {
            tracing::debug!(error = %e, "could not record a Kubernetes Event");
        }
    }

    /// Counts namespaces whose bundle ConfigMap holds `bundle`, out of those that should.
    async fn count_bundles(&self, bundle: &str) -> Result<(u32, u32), String> {
        use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
        let namespaces = Api::<Namespace>::all(self.client.clone())
            .list_metadata(&Default::default())
            .await
            .map_err(|e| format!("cannot list namespaces: {e}"))?;
        let wanted: Vec<String> = namespaces
            .items
            .into_iter()
            .filter(|n| n.metadata.deletion_timestamp.is_none())
            .filter_map(|n| n.metadata.name)
            .filter(|n| !["kube-public", "kube-node-lease"].contains(&n.as_str()))
            .collect();
        let lp = kube::api::ListParams::default()
            .fields(&format!("metadata.name={}", super::publish::ROOT_CONFIGMAP));
        let cms = Api::<ConfigMap>::all(self.client.clone())
            .list(&lp)
            .await
            .map_err(|e| format!("cannot list the bundle ConfigMaps: {e}"))?;
        let current = cms
            .items
            .iter()
            .filter(|c| {
                c.metadata
                    .namespace
                    .as_ref()
                    .is_some_and(|n| wanted.contains(n))
                    && c.data
                        .as_ref()
                        .and_then(|d| d.get(super::publish::ROOT_KEY))
                        .is_some_and(|b| b.trim() == bundle.trim())
            })
            .count();
        Ok((current as u32, wanted.len() as u32))
    }

    /// One pass. Idempotent: with nothing new, it writes nothing.
    pub async fn reconcile(&self) -> Result<Pass, String> {
        let mut pass = Pass::default();
        let Some(current) = self.store.load_journal().await.map_err(|e| e.to_string())? else {
            return Ok(pass);
        };
        // The policy lives with the state, so CLI commands never need the server's flags.
        let stored = self.running.to_stored(&self.source);
        if current.value.policy.as_ref() != Some(&stored) {
            crate::ca::update::update_journal(self.store.as_ref(), |j| {
                j.policy = Some(stored.clone());
                Ok(())
            })
            .await
            .map_err(|e| e.to_string())?;
            tracing::info!(source = %self.source, "stored the running policy with the CA state");
            pass.policy_written = true;
        }
        let api: Api<CertificateAuthority> = Api::namespaced(self.client.clone(), &self.namespace);
        let cr = match api.get_opt(&self.name).await {
            Ok(Some(cr)) => cr,
            Ok(None) => return Ok(pass),
            Err(e) => return Err(e.to_string()),
        };
        pass.found = true;
        let now = self.clock.now();
        let mut degraded: Option<(String, String)> = None;
        let journal = self
            .store
            .load_journal()
            .await
            .map_err(|e| e.to_string())?
            .ok_or("the CA journal vanished")?
            .value;
        let td_mismatch = cr
            .spec
            .trust_domain
            .as_ref()
            .filter(|td| **td != journal.trust_domain);
        if let Some(td) = td_mismatch {
            let msg = format!(
                "spec.trustDomain {td:?} differs from the CA's trust domain {:?}; a CA cannot change trust domain: fix the spec",
                journal.trust_domain
            );
            self.warn(&cr, "TrustDomainMismatch", msg.clone()).await;
            degraded = Some(("TrustDomainMismatch".into(), msg));
        } else {
            match effective_policy(
                &cr.spec,
                &self.flags,
                self.activate_after_from_flag,
                &self.caps,
            ) {
                Err(e) => {
                    let msg =
                        format!("the spec cannot be used: {e}; running with the previous policy");
                    self.warn(&cr, "InvalidSpec", msg.clone()).await;
                    degraded = Some(("InvalidSpec".into(), msg));
                }
                Ok((p, _)) if p != self.running => {
                    let msg = "the spec's policy differs from the one citadel started with; restart citadel (kubectl rollout restart) to apply it".to_string();
                    self.warn(&cr, "RestartRequired", msg.clone()).await;
                    degraded = Some(("RestartRequired".into(), msg));
                }
                Ok(_) => {}
            }
        }
        // A rotation request not handled yet: prepared and recorded in one journal write.
        if let (Some(req), None) = (&cr.spec.root_rotation, td_mismatch) {
            if journal.root_rotation_request.as_deref() != Some(req.request.as_str()) {
                let p = &self.running.rotation;
                let activate_after = if req.activate_immediately {
                    Duration::ZERO
                } else {
                    p.activate_after
                };
                let outcome = crate::ca::update::update_journal(self.store.as_ref(), |j| {
                    if j.root_rotation_request.as_deref() == Some(req.request.as_str()) {
                        return Ok(None);
                    }
                    j.root_rotation_request = Some(req.request.clone());
                    if let Some(r) = &j.root_rotation {
                        return Ok(Some(Err(r.stage())));
                    }
                    crate::ca::apply::prepare_root_rotation(
                        j,
                        now,
                        p,
                        "operator",
                        activate_after,
                        p.max_leaf_ttl,
                    )
                    .map_err(|e| e.to_string())?;
                    Ok(Some(Ok(())))
                })
                .await;
                match outcome {
                    Ok((Some(Ok(())), j, _)) => {
                        let new_root = j.root_rotation.as_ref().map(|r| r.new_root.clone());
                        tracing::info!(target: "citadel::audit", event = "root_rotation_prepared", request = %req.request, new_root = ?new_root, activate_after_secs = activate_after.as_secs(), "root rotation requested by CertificateAuthority {}/{}", self.namespace, self.name);
                        self.event(
                            &cr,
                            EventType::Normal,
                            "RootRotationRequested",
                            format!(
                                "request {:?}: new root {} prepared; it signs {} after the two-root bundle is published",
                                req.request,
                                new_root.unwrap_or_default(),
                                crate::duration::format(activate_after)
                            ),
                        )
                        .await;
                        self.wake.notify_one();
                        pass.rotation_started = true;
                    }
                    Ok((Some(Err(stage)), _, _)) => {
                        self.warn(
                            &cr,
                            "RootRotationRefused",
                            format!("request {:?} ignored: a root rotation is already in progress (stage {stage}); request another after it completes", req.request),
                        )
                        .await;
                    }
                    Ok((None, _, _)) => {}
                    Err(e) => {
                        let msg = format!("request {:?} failed: {e}", req.request);
                        self.warn(&cr, "RootRotationFailed", msg.clone()).await;
                        degraded = Some(("RootRotationFailed".into(), msg));
                    }
                }
            }
        }
        let journal = self
            .store
            .load_journal()
            .await
            .map_err(|e| e.to_string())?
            .ok_or("the CA journal vanished")?
            .value;
        let bundle: String = journal
            .trusted_roots()
            .map(|r| r.cert_pem.as_str())
            .collect();
        let counted = match self.count_bundles(&bundle).await {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::debug!(error = %e, "could not count the bundle ConfigMaps");
                None
            }
        };
        if degraded.is_none() {
            *self.last_warning.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
        let observed = Observed {
            generation: cr.metadata.generation,
            now: now.unix_timestamp(),
            signer_not_after: self
                .ca
                .current()
                .map(|s| s.signing_cert().not_after.unix_timestamp()),
            bundle: counted,
            degraded,
        };
        let status = status_for(&journal, &observed, cr.status.as_ref());
        let before = cr
            .status
            .as_ref()
            .and_then(|s| s.root_rotation.as_ref())
            .and_then(|r| r.stage.clone());
        let after = status.root_rotation.as_ref().and_then(|r| r.stage.clone());
        if cr.status.as_ref() != Some(&status) {
            api.patch_status(
                &self.name,
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({
                    "status": merge_patch(
                        &serde_json::to_value(cr.status.as_ref()).unwrap_or_default(),
                        serde_json::to_value(&status).unwrap_or_default(),
                    )
                })),
            )
            .await
            .map_err(|e| format!("cannot write the status: {e}"))?;
            pass.status_written = true;
            if let Some((reason, note)) = stage_event(before.as_deref(), after.as_deref()) {
                tracing::info!(reason = %reason, "{note}");
                self.event(&cr, EventType::Normal, &reason, note).await;
            }
        }
        Ok(pass)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `deploy/crds/certificateauthority.yaml`, and its copy inside `deploy/citadel.yaml`, are
    /// what the code generates.
    #[test]
    fn crds_in_deploy_match_the_certificate_authority_type() {
        super::super::crds::check_deployed("certificateauthority.yaml", &crd_yaml());
    }

    fn flags() -> CaPolicy {
        CaPolicy {
            ttl: Default::default(),
            rotation: Default::default(),
            key_type: "ec-p256".into(),
        }
    }

    #[test]
    fn spec_fields_win_and_unset_ones_keep_the_flags() {
        let spec = CertificateAuthoritySpec {
            max_workload_ttl: Some("1h".into()),
            default_workload_ttl: Some("10m".into()),
            ca_key_type: Some(CaKeyType::EcP384),
            ..Default::default()
        };
        let (p, sources) = effective_policy(&spec, &flags(), false, &SpecCaps::default()).unwrap();
        assert_eq!(p.ttl.max, Duration::from_secs(3600));
        assert_eq!(p.rotation.max_leaf_ttl, Duration::from_secs(3600));
        assert_eq!(p.ttl.default, Duration::from_secs(600));
        assert_eq!(p.key_type, "ec-p384");
        // --activate-after was not given: it follows the (spec's) max TTL.
        assert_eq!(p.rotation.activate_after, Duration::from_secs(3600));
        assert_eq!(p.rotation.crl_validity, flags().rotation.crl_validity);
        let src = |f: &str| sources.iter().find(|s| s.0 == f).unwrap().2.clone();
        assert_eq!(src("maxWorkloadTtl"), "spec");
        assert_eq!(src("crlValidity"), "flag --crl-validity");
        // An explicit --activate-after is kept.
        let mut f = flags();
        f.rotation.activate_after = Duration::from_secs(60);
        let (p, _) = effective_policy(&spec, &f, true, &SpecCaps::default()).unwrap();
        assert_eq!(p.rotation.activate_after, Duration::from_secs(60));
    }

    /// The documented maxima (docs/operations.md, "Limits on the spec"): a spec above one is
    /// refused with a message naming the field and the cap; at the cap it is taken; only the
    /// workload cap moves, and only with the flag.
    #[test]
    fn spec_ttls_and_crl_validity_above_their_caps_are_refused_naming_field_and_cap() {
        let refused = |spec: CertificateAuthoritySpec, caps: SpecCaps| {
            effective_policy(&spec, &flags(), false, &caps).unwrap_err()
        };
        let d = |s: &str| Some(s.to_string());
        let default = SpecCaps::default();
        let cases = [
            (
                CertificateAuthoritySpec {
                    max_workload_ttl: d("91d"),
                    ..Default::default()
                },
                "spec.maxWorkloadTtl 91d is above the cap of 90d",
            ),
            (
                CertificateAuthoritySpec {
                    max_workload_ttl: d("90d"),
                    default_workload_ttl: d("2160h1s"),
                    ..Default::default()
                },
                "spec.defaultWorkloadTtl",
            ),
            (
                CertificateAuthoritySpec {
                    intermediate_ttl: d("1826d"),
                    ..Default::default()
                },
                "spec.intermediateTtl 1826d is above the cap of 1825d",
            ),
            (
                CertificateAuthoritySpec {
                    root_ttl: d("7301d"),
                    ..Default::default()
                },
                "spec.rootTtl 7301d is above the cap of 7300d",
            ),
            (
                CertificateAuthoritySpec {
                    crl_validity: d("8d"),
                    ..Default::default()
                },
                "spec.crlValidity 8d is above the cap of 7d",
            ),
        ];
        for (spec, want) in cases {
            let e = refused(spec, default);
            assert!(e.contains(want), "{want}: {e}");
        }
        let e = refused(
            CertificateAuthoritySpec {
                max_workload_ttl: d("365d"),
                ..Default::default()
            },
            default,
        );
        assert!(e.contains("--ca-resource-max-workload-ttl"), "{e}");
        // Only the workload cap names a flag: the others are fixed.
        let e = refused(
            CertificateAuthoritySpec {
                crl_validity: d("30d"),
                ..Default::default()
            },
            default,
        );
        assert!(!e.contains("--"), "{e}");

        // At the caps, taken.
        let at = CertificateAuthoritySpec {
            max_workload_ttl: d("90d"),
            default_workload_ttl: d("90d"),
            intermediate_ttl: d("1825d"),
            root_ttl: d("7300d"),
            crl_validity: d("7d"),
            ..Default::default()
        };
        let (p, _) = effective_policy(&at, &flags(), false, &default).unwrap();
        assert_eq!(p.ttl.max, MAX_SPEC_WORKLOAD_TTL);
        assert_eq!(p.rotation.root_ttl, MAX_SPEC_ROOT_TTL);
        assert_eq!(p.rotation.intermediate_ttl, MAX_SPEC_INTERMEDIATE_TTL);
        assert_eq!(p.rotation.crl_validity, MAX_SPEC_CRL_VALIDITY);

        // The flag raises the workload cap, and nothing else.
        let raised = SpecCaps {
            workload_ttl: Duration::from_secs(365 * 86_400),
        };
        let long = CertificateAuthoritySpec {
            max_workload_ttl: d("365d"),
            ..Default::default()
        };
        let (p, _) = effective_policy(&long, &flags(), false, &raised).unwrap();
        assert_eq!(p.ttl.max, Duration::from_secs(365 * 86_400));
        let e = refused(
            CertificateAuthoritySpec {
                max_workload_ttl: d("366d"),
                ..Default::default()
            },
            raised,
        );
        assert!(e.contains("above the cap of 365d"), "{e}");
        let e = refused(
            CertificateAuthoritySpec {
                crl_validity: d("8d"),
                ..Default::default()
            },
            raised,
        );
        assert!(e.contains("spec.crlValidity"), "{e}");

        // Flags are the deployer's and not capped: a spec that leaves the field unset keeps
        // a flag above the cap.
        let mut f = flags();
        f.ttl.max = Duration::from_secs(365 * 86_400);
        let (p, _) =
            effective_policy(&CertificateAuthoritySpec::default(), &f, false, &default).unwrap();
        assert_eq!(p.ttl.max, Duration::from_secs(365 * 86_400));
    }

    #[test]
    fn combinations_the_schema_cannot_see_are_refused() {
        let spec = CertificateAuthoritySpec {
            max_workload_ttl: Some("1h".into()),
            default_workload_ttl: Some("2h".into()),
            ..Default::default()
        };
        let e = effective_policy(&spec, &flags(), false, &SpecCaps::default()).unwrap_err();
        assert!(e.contains("exceeds the maximum"), "{e}");
        let spec = CertificateAuthoritySpec {
            crl_validity: Some("-1h".into()),
            ..Default::default()
        };
        let e = effective_policy(&spec, &flags(), false, &SpecCaps::default()).unwrap_err();
        assert!(e.contains("spec.crlValidity"), "{e}");
    }

    fn journal() -> Journal {
        let mut j = Journal::new("cluster.local");
        for (id, role) in [("r1", Role::Root), ("i1", Role::Intermediate)] {
            j.authorities.push(crate::journal::AuthorityRecord {
                id: id.into(),
                role,
                status: Status::Active,
                cert_pem: String::new(),
                key_pem: crate::journal::Secret::new(String::new()),
                issuer: None,
                created_at: 0,
                activated_at: Some(0),
                retired_at: None,
                deactivated_at: None,
                not_after: 1000,
                not_before: 0,
                cross_cert_pem: None,
            });
        }
        j
    }

    #[test]
    fn status_follows_the_journal_and_keeps_transition_times() {
        let j = journal();
        let o = Observed {
            generation: Some(3),
            now: 100,
            signer_not_after: Some(1000),
            bundle: Some((2, 3)),
            degraded: None,
        };
        let s = status_for(&j, &o, None);
        let c = |s: &CertificateAuthorityStatus, t: &str| {
            s.conditions.iter().find(|c| c.type_ == t).unwrap().clone()
        };
        assert_eq!(c(&s, "Ready").status, "True");
        assert_eq!(c(&s, "BundlePublished").status, "False");
        assert_eq!(
            c(&s, "BundlePublished").message,
            "2 of 3 namespaces hold the current trust bundle"
        );
        assert_eq!(c(&s, "RootRotationInProgress").reason, "NoRotation");
        assert_eq!(c(&s, "Degraded").status, "False");
        assert_eq!(s.observed_generation, Some(3));
        assert_eq!(s.roots.len(), 1);
        assert_eq!(s.intermediates[0].not_after, "1970-01-01T00:16:40Z");
        // Later, same facts: identical status (no churn, same transition times).
        let later = Observed {
            now: 200,
            ..o.clone()
        };
        assert_eq!(status_for(&j, &later, Some(&s)), s);
        // The bundle arrives everywhere: only that condition moves.
        let done = Observed {
            now: 300,
            bundle: Some((3, 3)),
            ..o.clone()
        };
        let s2 = status_for(&j, &done, Some(&s));
        assert_eq!(c(&s2, "BundlePublished").status, "True");
        assert_eq!(
            c(&s2, "BundlePublished").last_transition_time,
            "1970-01-01T00:05:00Z"
        );
        assert_eq!(c(&s2, "Ready").last_transition_time, "1970-01-01T00:01:40Z");
        // A rotation in progress: stage, next due time.
        let mut j = j;
        j.root_rotation = Some(crate::journal::RootRotation {
            old_root: "r1".into(),
            old_intermediate: "i1".into(),
            new_root: "r2".into(),
            new_intermediate: "i2".into(),
            trigger: "operator".into(),
            prepared_at: 300,
            bundle_published_at: Some(310),
            activate_after_secs: 60,
            activated_at: None,
            retire_after_secs: 60,
            cross_withdrawn_at: None,
            old_root_grace_secs: 0,
        });
        let s3 = status_for(&j, &done, Some(&s2));
        assert_eq!(c(&s3, "RootRotationInProgress").reason, "Prepared");
        assert_eq!(c(&s3, "RootRotationInProgress").status, "True");
        let rr = s3.root_rotation.unwrap();
        assert_eq!(rr.stage.as_deref(), Some("Prepared"));
        assert_eq!(rr.next_stage_due.as_deref(), Some("1970-01-01T00:06:10Z"));
    }

    #[test]
    fn the_status_patch_removes_what_is_gone() {
        let old = serde_json::json!({"rootRotation": {"stage": "Retiring", "handledRequest": "a"}, "roots": [1, 2]});
        let new = serde_json::json!({"rootRotation": {"handledRequest": "a"}, "roots": [2]});
        assert_eq!(
            merge_patch(&old, new),
            serde_json::json!({"rootRotation": {"stage": null, "handledRequest": "a"}, "roots": [2]})
        );
        assert_eq!(
            merge_patch(&serde_json::Value::Null, serde_json::json!({"a": 1})),
            serde_json::json!({"a": 1})
        );
    }

    #[test]
    fn stage_changes_make_events() {
        assert_eq!(stage_event(None, None), None);
        assert_eq!(stage_event(Some("Prepared"), Some("Prepared")), None);
        assert_eq!(
            stage_event(Some("Prepared"), Some("Activated")).unwrap().0,
            "RootRotationActivated"
        );
        assert_eq!(
            stage_event(Some("Retiring"), None).unwrap().0,
            "RootRotationCompleted"
        );
    }
}
