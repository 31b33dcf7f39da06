//! The `Revocation` custom resource (`citadel.dev/v1alpha1`) and its controller: revocation
//! that works with `--store kube` across N replicas.
//!
//! Each replica keeps its own issuance index (`issued.log` in its state directory), so no
//! single process knows every certificate. The design: **every replica reconciles every
//! Revocation against its own index**, and the journal stays the record of truth.
//!
//! - **Identity:** any replica writes the denial to the journal (compare-and-swap; a second
//!   writer finds it there and changes nothing) together with the live certificates of that
//!   identity in its own index. Every other replica revokes its own when it reconciles the
//!   resource, and its scheduler sweeps its index when it installs a journal with a new
//!   denial ([`crate::ca::scheduler`]), so a replica that restarts later catches up at start.
//! - **Serial:** the replica whose index holds the serial revokes it precisely (its issuer's
//!   CRL). If no replica has revoked it [`FALLBACK_AFTER`] after the resource was created (a
//!   replica's disk was lost, or the serial was never ours), it is listed on the CRL of every
//!   unexpired intermediate: a serial revocation never silently does nothing, and listing a
//!   foreign 128-bit random serial on a CRL harms no one.
//! - **Status** is computed from the journal (how many certificates carry that identity or
//!   serial on a CRL, which CRL numbers list them) plus one report per replica in a map keyed
//!   by replica name, so two replicas' merge patches never clobber each other.
//!
//! The controller runs on every replica, leader or not (each owns an index). Reconciles are
//! idempotent: re-applying the same Revocation finds the journal already saying so and writes
//! nothing. A crash between the journal write and the status patch is finished by the next
//! reconcile (the watch's initial list at start), because status is derived from the journal.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::TryStreamExt;
use kube::api::{Api, Patch, PatchParams};
use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::controller::{self, Action};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::{reflector, watcher, Controller, WatchStreamExt};
use kube::{CustomResource, KubeSchema, Resource, ResourceExt};
use serde::{Deserialize, Serialize};

use crate::ca::{crl, revocation};
use crate::clock::SharedClock;
use crate::identity::SpiffeId;
use crate::journal::{Journal, Status, ANY_INTERMEDIATE};
use crate::shutdown::Shutdown;
use crate::store::index::{IssuanceIndex, IssuedEntry};
use crate::store::Store;

/// How long after a serial Revocation was created a replica whose index does not know the
/// serial waits for the one that does, before listing it on every unexpired intermediate's CRL.
pub const FALLBACK_AFTER: Duration = Duration::from_secs(10);

/// The condition type every Revocation carries.
pub const APPLIED: &str = "Applied";

/// The shape the CRD (and [`target`]) accepts for `spec.identity`: the identity of a
/// Kubernetes service account, with Kubernetes' own name rules (a namespace is a DNS label of
/// at most 63 characters, a service-account name a DNS subdomain of at most 253, checked by a
/// second rule), so an identity is at most 588 characters (a 255-character trust domain) and
/// a denial at most ~700 bytes of the journal.
pub const IDENTITY_RULE: &str = "self.matches('^spiffe://[a-z0-9._-]{1,255}/ns/[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?/sa/[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?([.][a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)*$')";

/// How often each replica looks for denials whose Revocation is gone (an in-memory check; the
/// API server is asked only when one is found).
pub const LIFT_EVERY: Duration = Duration::from_secs(5);

/// RFC 5280 revocation reasons, as `spec.reason` spells them (the names of [`crl::REASONS`]).
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

    /// The reason named `s` (one of [`crl::REASONS`]).
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
#[x_kube(validation = Rule::new("self == oldSelf").message("a Revocation cannot be changed once created (a revocation is final); create another one"))]
#[serde(rename_all = "camelCase")]
pub struct RevocationSpec {
    /// Serial number of one certificate, hex (colons, case and a 0x prefix are ignored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    #[x_kube(validation = Rule::new("self.matches('^(0[xX])?[0-9a-fA-F:]{1,59}$')").message("serial must be hex (colons allowed), at most 20 bytes, e.g. 3a:9f:0c or 3a9f0c"))]
    pub serial: Option<String>,
    /// SPIFFE ID of a Kubernetes service account, spiffe://<trust domain>/ns/<namespace>/sa/<name>, to deny while this Revocation exists; its live certificates are revoked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 588))]
    #[x_kube(validation = Rule::new(IDENTITY_RULE).message("identity must be a SPIFFE ID of a Kubernetes service account, spiffe://<trust domain>/ns/<namespace>/sa/<name> (namespace: a DNS label of at most 63 characters; name: a DNS subdomain), such as spiffe://cluster.local/ns/shop/sa/frontend"))]
    #[x_kube(validation = Rule::new("self.size() - self.indexOf('/sa/') - 4 <= 253").message("the service account name in identity is longer than the 253 characters Kubernetes allows"))]
    pub identity: Option<String>,
    /// RFC 5280 reason, as it appears on the CRL.
    #[serde(default)]
    pub reason: RevocationReason,
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
    match (&spec.serial, &spec.identity) {
        (Some(s), None) => normalize_serial(s).map(Target::Serial).ok_or_else(|| {
            format!("spec.serial {s:?} is not a certificate serial: expected up to 20 bytes of hex")
        }),
        (None, Some(i)) => identity_target(i, trust_domain).map(Target::Identity),
        _ => Err("name exactly one of spec.serial or spec.identity".into()),
    }
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

/// Whether `j` already does everything `target` asks that this replica can do with `mine`
/// (its live index entries for the target): then nothing is written. A denial must also name
/// a Revocation as its holder (one written before denials could be lifted is adopted).
pub fn satisfied(j: &Journal, target: &Target, mine: &[IssuedEntry]) -> bool {
    let all_mine_revoked = mine.iter().all(|e| j.is_revoked(&e.serial).is_some());
    match target {
        Target::Identity(id) => {
            j.is_denied(id).is_some_and(|d| d.revocation.is_some()) && all_mine_revoked
        }
        Target::Serial(s) => j.is_revoked(s).is_some(),
    }
}

/// Applies `target` to the journal: the denial (held by Revocation `holder`,
/// `<namespace>/<name>`) plus this replica's live certificates of the identity, or the serial
/// (precisely if `mine` has it; once, for every unexpired intermediate's CRL, if `fallback`).
/// Returns how many certificates it newly put on a CRL, or `None` when it changed nothing
/// (already applied, or a serial this replica cannot place yet).
#[allow(clippy::too_many_arguments)]
pub fn apply(
    j: &mut Journal,
    target: &Target,
    reason: RevocationReason,
    mine: &[IssuedEntry],
    fallback: bool,
    now: time::OffsetDateTime,
    crl_validity: Duration,
    holder: &str,
) -> Result<Option<usize>, String> {
    let ts = now.unix_timestamp();
    match target {
        Target::Identity(id) => {
            let mut changed = false;
            match j.denied.iter_mut().find(|d| &d.identity == id) {
                None => {
                    j.denied.push(crate::journal::DeniedIdentity {
                        identity: id.clone(),
                        since: ts,
                        reason: reason.as_str().to_string(),
                        revocation: Some(holder.to_string()),
                    });
                    changed = true;
                }
                // Written before denials could be lifted: from now on this Revocation holds it.
                Some(d) if d.revocation.is_none() => {
                    d.revocation = Some(holder.to_string());
                    changed = true;
                }
                Some(_) => {}
            }
            let n =
                revocation::revoke_denied(j, mine, now, crl_validity).map_err(|e| e.to_string())?;
            Ok((changed || n > 0).then_some(n))
        }
        Target::Serial(s) => {
            if j.is_revoked(s).is_some() {
                return Ok(None);
            }
            if let Some(e) = mine.iter().find(|e| &e.serial == s) {
                revocation::revoke_serial(j, e, reason.as_str(), now, crl_validity)
                    .map_err(|e| e.to_string())?;
                return Ok(Some(1));
            }
            if !fallback {
                return Ok(None);
            }
            // Nobody's index knows it: recorded ONCE, for every intermediate that may still
            // have issued it (`Revocation::listed_by`), and kept until the last of them expires.
            let record = crate::journal::Revocation {
                serial: s.clone(),
                issuer: ANY_INTERMEDIATE.to_string(),
                identity: None,
                not_after: 0,
                revoked_at: ts,
                reason: reason.as_str().to_string(),
            };
            let issuers: Vec<(String, i64)> = j
                .authorities
                .iter()
                .filter(|a| a.status != Status::Retired && record.listed_by(a))
                .map(|a| (a.id.clone(), a.not_after))
                .collect();
            let Some(last) = issuers.iter().map(|(_, n)| *n).max() else {
                return Err("no unexpired intermediate to list the serial on".into());
            };
            j.revocations.push(crate::journal::Revocation {
                not_after: last,
                ..record
            });
            for (issuer, _) in &issuers {
                crl::sign(j, issuer, now, crl_validity).map_err(|e| e.to_string())?;
            }
            Ok(Some(1))
        }
    }
}

/// The journal's side of the status: when it was applied, how many certificates are on a CRL
/// because of it, and which current CRLs list them. `None` if the journal does not carry it.
pub fn journal_view(j: &Journal, target: &Target) -> Option<(i64, u64, Vec<CrlVersion>)> {
    let (applied_at, revoked): (i64, Vec<&crate::journal::Revocation>) = match target {
        Target::Identity(id) => {
            let d = j.is_denied(id)?;
            let r: Vec<_> = j
                .revocations
                .iter()
                .filter(|r| r.identity.as_deref() == Some(id.as_str()))
                .collect();
            (d.since, r)
        }
        Target::Serial(s) => {
            let r: Vec<_> = j.revocations.iter().filter(|r| &r.serial == s).collect();
            (r.iter().map(|r| r.revoked_at).min()?, r)
        }
    };
    let mut serials: Vec<&str> = revoked.iter().map(|r| r.serial.as_str()).collect();
    serials.sort();
    serials.dedup();
    let mut crls: Vec<CrlVersion> = j
        .crls
        .iter()
        .filter(|c| {
            j.get(&c.issuer)
                .is_some_and(|a| revoked.iter().any(|r| r.listed_by(a)))
        })
        .map(|c| CrlVersion {
            issuer: c.issuer.clone(),
            number: c.number,
        })
        .collect();
    crls.sort_by(|a, b| a.issuer.cmp(&b.issuer));
    Some((applied_at, serials.len() as u64, crls))
}

/// Whether an identity Revocation applied at `applied_at` (its `status.appliedAt`) is over:
/// its denial is no longer `in_journal` and `now` is past the earliest time the scheduler
/// drops a denial (`max_leaf_ttl` after it was written; it waits the skew margin longer).
/// Before that, a denial missing from a cache that lags is applied again (a no-op write).
pub fn denial_over(
    applied_at: Option<&str>,
    in_journal: bool,
    now: i64,
    max_leaf_ttl: Duration,
) -> bool {
    !in_journal
        && applied_at
            .and_then(parse_rfc3339)
            .is_some_and(|at| now >= at.saturating_add(max_leaf_ttl.as_secs() as i64))
}

/// Unix seconds of an RFC 3339 time (`status.appliedAt`).
fn parse_rfc3339(s: &str) -> Option<i64> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .ok()
        .map(|t| t.unix_timestamp())
}

fn rfc3339(ts: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(ts)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// The `Applied` condition, keeping `lastTransitionTime` from `old` when the status did not
/// change (Kubernetes convention).
pub fn condition(
    old: Option<&Condition>,
    status: bool,
    reason: &str,
    message: String,
    generation: i64,
    now: time::OffsetDateTime,
) -> Condition {
    let status = if status { "True" } else { "False" }.to_string();
    let last_transition_time = match old {
        Some(o) if o.status == status => o.last_transition_time.clone(),
        _ => rfc3339(now.unix_timestamp()),
    };
    Condition {
        type_: APPLIED.into(),
        status,
        reason: reason.into(),
        message,
        last_transition_time,
        observed_generation: generation,
    }
}

/// The merge patch of `.status` this replica sends: the journal view, the condition and ONLY
/// its own entry of `replicas` (a merge patch merges maps key by key).
pub fn status_patch(
    view: Option<&(i64, u64, Vec<CrlVersion>)>,
    cond: &Condition,
    me: &str,
    report: &ReplicaReport,
) -> serde_json::Value {
    let mut status = serde_json::json!({
        "conditions": [cond],
        "replicas": { me: report },
    });
    if let Some((at, n, crls)) = view {
        status["appliedAt"] = serde_json::json!(rfc3339(*at));
        status["certificatesRevoked"] = serde_json::json!(n);
        status["crlVersions"] = serde_json::json!(crls);
    }
    serde_json::json!({ "status": status })
}

/// Whether `patch` would change `current` (so a re-reconcile of an applied Revocation sends
/// nothing).
fn changes(current: Option<&RevocationStatus>, patch: &serde_json::Value) -> bool {
    let Some(cur) = current else { return true };
    let Ok(mut cur_v) = serde_json::to_value(cur) else {
        return true;
    };
    json_patch_merge(&mut cur_v, &patch["status"]);
    serde_json::from_value::<RevocationStatus>(cur_v)
        .ok()
        .as_ref()
        != Some(cur)
}

/// RFC 7386 merge patch.
fn json_patch_merge(target: &mut serde_json::Value, patch: &serde_json::Value) {
    if let serde_json::Value::Object(p) = patch {
        if !target.is_object() {
            *target = serde_json::json!({});
        }
        if let serde_json::Value::Object(t) = target {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    json_patch_merge(t.entry(k.clone()).or_insert(serde_json::Value::Null), v);
                }
            }
        }
    } else {
        *target = patch.clone();
    }
}

/// Why a reconcile failed (retried; a person sees it as a Warning Event).
#[derive(Debug, thiserror::Error)]
pub enum RevocationError {
    /// Reading the index, the journal, or the API failed.
    #[error("{0}")]
    Failed(String),
}

/// The Revocation controller of one replica.
pub struct RevocationController {
    client: kube::Client,
    namespace: String,
    /// This replica's name: its key in `status.replicas`.
    replica: String,
    store: Arc<dyn Store>,
    index: Arc<dyn IssuanceIndex>,
    clock: SharedClock,
    trust_domain: String,
    crl_validity: Duration,
    /// The rotation policy the scheduler runs with: how long a denial lasts by itself
    /// ([`revocation::denial_ends_at`]).
    policy: crate::ca::policy::RotationPolicy,
    recorder: Recorder,
    /// Wakes the scheduler after this controller wrote the journal (installs the denial now).
    wake: Arc<tokio::sync::Notify>,
    /// (uid, generation) -> index entries found, so a re-reconcile (every journal change)
    /// does not rescan the index.
    scanned: Mutex<BTreeMap<(String, i64), Vec<IssuedEntry>>>,
    /// The newest journal this replica has seen, with its resourceVersion: filled by the
    /// journal watch (which carries the whole Secret anyway) and by this controller's own
    /// writes. Every reconcile of a pass reads it here, so a journal change costs no GET per
    /// Revocation (issue 20, M3: it cost R GETs of a Secret up to 1 MiB, R^2 for R new ones).
    journal: Mutex<Option<(crate::store::Revision, Arc<Journal>)>>,
    /// One journal write at a time from this replica: reconciles run concurrently, and R of
    /// them racing one compare-and-swap cost O(R^2) API calls in conflicts.
    writer: tokio::sync::Mutex<()>,
    /// Changes waiting for [`RevocationController::write_batched`]'s next write.
    queue: Mutex<Vec<Pending>>,
    /// What that write did for each change (by holder) whose reconcile still waits.
    outcomes: Mutex<BTreeMap<String, Outcome>>,
    /// The CertificateAuthority resource (`serve --ca-resource`) that also gets the Events.
    ca_resource: String,
}

/// One Revocation's change, queued for a batched journal write.
struct Pending {
    target: Target,
    reason: RevocationReason,
    mine: Vec<IssuedEntry>,
    fallback: bool,
    holder: String,
    now: time::OffsetDateTime,
}

/// What a batched write did for one change.
enum Outcome {
    /// Applied (certificates newly on a CRL) in memory, or nothing to do (`None`).
    Done(Option<usize>),
    /// Written, with the journal committed.
    Written(usize, Arc<Journal>),
    /// Refused: it would pass the ceiling.
    Full {
        bytes: usize,
        ceiling: usize,
        revocations: usize,
        denied: usize,
    },
    /// Refused or failed otherwise.
    Failed(String),
}

/// The `CertificateAuthority` kind (another controller's), looked up only to put Events on it.
fn certificate_authority() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("citadel.dev", "v1alpha1", "CertificateAuthority"),
        "certificateauthorities",
    )
}

/// Whether resourceVersion `a` is newer than `b`. Kubernetes calls them opaque, but they are
/// etcd revisions and order as integers; anything else counts as newer (take what came last).
fn newer(a: &crate::store::Revision, b: &crate::store::Revision) -> bool {
    match (a.0.parse::<u64>(), b.0.parse::<u64>()) {
        (Ok(a), Ok(b)) => a > b,
        _ => a != b,
    }
}

impl RevocationController {
    /// A controller for the Revocations in `namespace`, reporting as `replica`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        client: kube::Client,
        namespace: &str,
        replica: &str,
        store: Arc<dyn Store>,
        index: Arc<dyn IssuanceIndex>,
        clock: SharedClock,
        trust_domain: &str,
        policy: crate::ca::policy::RotationPolicy,
        wake: Arc<tokio::sync::Notify>,
        ca_resource: &str,
    ) -> Arc<Self> {
        Arc::new(Self {
            recorder: Recorder::new(
                client.clone(),
                Reporter {
                    controller: "citadel".into(),
                    instance: Some(replica.to_string()),
                },
            ),
            client,
            namespace: namespace.to_string(),
            replica: replica.to_string(),
            store,
            index,
            clock,
            trust_domain: trust_domain.to_string(),
            crl_validity: policy.crl_validity,
            policy,
            wake,
            scanned: Mutex::new(BTreeMap::new()),
            journal: Mutex::new(None),
            writer: tokio::sync::Mutex::new(()),
            queue: Mutex::new(Vec::new()),
            outcomes: Mutex::new(BTreeMap::new()),
            ca_resource: ca_resource.to_string(),
        })
    }

    /// Applies `p` to the journal together with every other change queued meanwhile: one
    /// compare-and-swap write for a burst of Revocations (600 created at once were 600
    /// writes of a journal of up to 768 KiB, one after the other). Each change gets its own
    /// answer: how many certificates it put on a CRL (`None`: nothing to do any more), or
    /// `JournalFull` for a change that would pass the ceiling (the others are still written).
    async fn write_batched(
        &self,
        p: Pending,
    ) -> Result<Option<(usize, Arc<Journal>)>, crate::ca::update::UpdateError> {
        use crate::ca::update::{check_ceiling, UpdateError};
        let key = p.holder.clone();
        self.queue.lock().unwrap_or_else(|e| e.into_inner()).push(p);
        let _one_writer = self.writer.lock().await;
        let outcome = self
            .outcomes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&key);
        let outcome = match outcome {
            Some(o) => o,
            None => {
                let items =
                    std::mem::take(&mut *self.queue.lock().unwrap_or_else(|e| e.into_inner()));
                let ceiling = self.store.revocation_ceiling();
                let validity = self.crl_validity;
                let mut results: Vec<Outcome> = Vec::new();
                let written = crate::ca::update::update(self.store.as_ref(), None, |j| {
                    let apply_one = |j: &mut Journal, it: &Pending| {
                        apply(
                            j,
                            &it.target,
                            it.reason,
                            &it.mine,
                            it.fallback,
                            it.now,
                            validity,
                            &it.holder,
                        )
                    };
                    // Fast path: all of them, then one size check.
                    let orig = j.clone();
                    results = items
                        .iter()
                        .map(|it| match apply_one(j, it) {
                            Ok(n) => Outcome::Done(n),
                            Err(e) => Outcome::Failed(e),
                        })
                        .collect();
                    if check_ceiling(j, ceiling).is_err() {
                        // Near the ceiling: one at a time, each checked.
                        *j = orig;
                        for (it, r) in items.iter().zip(results.iter_mut()) {
                            if !matches!(r, Outcome::Done(Some(_))) {
                                continue;
                            }
                            let mut t = j.clone();
                            *r = match apply_one(&mut t, it) {
                                Ok(n) => match check_ceiling(&t, ceiling) {
                                    Ok(()) => {
                                        *j = t;
                                        Outcome::Done(n)
                                    }
                                    Err(UpdateError::JournalFull {
                                        bytes,
                                        ceiling,
                                        revocations,
                                        denied,
                                    }) => Outcome::Full {
                                        bytes,
                                        ceiling,
                                        revocations,
                                        denied,
                                    },
                                    Err(e) => Outcome::Failed(e.to_string()),
                                },
                                Err(e) => Outcome::Failed(e),
                            };
                        }
                    }
                    let any = results.iter().any(|r| matches!(r, Outcome::Done(Some(_))));
                    Ok(any.then_some(()))
                })
                .await;
                let mut journal = None;
                match written {
                    Ok(Some(((), j, revision))) => {
                        journal =
                            Some(self.remember(crate::store::Versioned { value: j, revision }));
                        self.wake.notify_one();
                    }
                    Ok(None) => {}
                    Err(e) => {
                        let msg = e.to_string();
                        results = items.iter().map(|_| Outcome::Failed(msg.clone())).collect();
                    }
                }
                let mut mine = None;
                let mut outcomes = self.outcomes.lock().unwrap_or_else(|e| e.into_inner());
                for (it, r) in items.into_iter().zip(results) {
                    let r = match (r, &journal) {
                        (Outcome::Done(Some(n)), Some(j)) => Outcome::Written(n, j.clone()),
                        (Outcome::Done(Some(_)), None) => Outcome::Done(None),
                        (r, _) => r,
                    };
                    if it.holder == key {
                        mine = Some(r);
                    } else {
                        outcomes.insert(it.holder, r);
                    }
                }
                mine.unwrap_or(Outcome::Done(None))
            }
        };
        match outcome {
            Outcome::Written(n, j) => Ok(Some((n, j))),
            Outcome::Done(_) => Ok(None),
            Outcome::Full {
                bytes,
                ceiling,
                revocations,
                denied,
            } => Err(UpdateError::JournalFull {
                bytes,
                ceiling,
                revocations,
                denied,
            }),
            Outcome::Failed(e) => Err(UpdateError::Refused(e)),
        }
    }

    /// Keeps `v` as the newest journal seen unless a newer one is already kept; returns the
    /// newest.
    fn remember(&self, v: crate::store::Versioned<Journal>) -> Arc<Journal> {
        let mut cache = self.journal.lock().unwrap_or_else(|p| p.into_inner());
        match cache.as_ref() {
            Some((rev, j)) if !newer(&v.revision, rev) => j.clone(),
            _ => {
                let j = Arc::new(v.value);
                *cache = Some((v.revision, j.clone()));
                j
            }
        }
    }

    /// The newest journal seen; read from the store only before the watch delivered one.
    async fn current_journal(&self) -> Result<Arc<Journal>, RevocationError> {
        if let Some((_, j)) = self
            .journal
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            return Ok(j.clone());
        }
        let loaded = self
            .store
            .load_journal()
            .await
            .map_err(|e| RevocationError::Failed(format!("cannot read the CA journal: {e}")))?
            .ok_or_else(|| RevocationError::Failed("the store holds no CA journal".into()))?;
        Ok(self.remember(loaded))
    }

    /// Runs until shutdown, on every replica. Every Revocation is reconciled when it changes,
    /// and all of them when the journal Secret changes (another replica applied one: the
    /// status counts move), debounced; denials whose Revocation is gone are lifted.
    pub async fn run(self: Arc<Self>, shutdown: Shutdown) {
        let api: Api<Revocation> = Api::namespaced(self.client.clone(), &self.namespace);
        // Without the CRD the watch just retries; say once why revocations are not applied.
        if let Err(kube::Error::Api(s)) = api.list(&kube::api::ListParams::default().limit(1)).await
        {
            tracing::warn!(namespace = %self.namespace, code = s.code, error = %s.message, "cannot list Revocations (citadel.dev/v1alpha1): install the CRD (kubectl apply -f deploy/crds/revocation.yaml) and grant citadel get/list/watch on revocations; until then Revocation resources are not applied");
        }
        let secrets: Api<k8s_openapi::api::core::v1::Secret> =
            Api::namespaced(self.client.clone(), &self.namespace);
        let me = self.clone();
        let journal_changes = watcher(
            secrets,
            watcher::Config::default().fields(&format!(
                "metadata.name={}",
                crate::store::kube::JOURNAL_SECRET
            )),
        )
        .default_backoff()
        .touched_objects()
        .filter_map(move |r| {
            // The watch event carries the Secret: decode it once here for every reconcile of
            // the pass it triggers.
            if let Ok(secret) = r.as_ref() {
                match crate::store::kube::decode_journal_secret(&me.namespace, secret) {
                    Ok(v) => {
                        me.remember(v);
                    }
                    Err(e) => tracing::warn!(error = %e, "the journal Secret does not decode"),
                }
            }
            std::future::ready(r.ok().map(|_| ()))
        });
        let sd = shutdown.clone();
        // The Revocation cache, built here rather than by `Controller::new` so the lift loop
        // learns that it holds the API server's list from the stream itself. It must not wait
        // on the cache's own readiness: the controller waits on it too, and kube-runtime's
        // `Store::wait_until_ready` wakes only the last of several concurrent waiters (its
        // one-shot keeps one waker), so the lift loop, which waited first, never woke and no
        // denial was ever lifted (the KNOWN FAILING `deleting_a_revocation_lifts_its_denial`).
        let (cache, writer) = reflector::store::<Revocation>();
        let (listed_tx, listed) = tokio::sync::watch::channel(false);
        let revocations = watcher(api, watcher::Config::default())
            .reflect(writer)
            .inspect_ok(move |e| {
                // After `reflector` applied it: the cache now holds the whole list.
                if matches!(e, watcher::Event::InitDone) {
                    listed_tx.send_replace(true);
                }
            })
            .applied_objects();
        let controller = Controller::for_stream(revocations, cache.clone())
            .with_config(controller::Config::default().debounce(Duration::from_millis(500)));
        tokio::spawn(self.clone().lift_loop(cache, listed, shutdown.clone()));
        controller
            .reconcile_all_on(journal_changes)
            .graceful_shutdown_on(async move { sd.wait().await })
            .run(
                |rev, me: Arc<Self>| async move { me.reconcile(&rev).await },
                |rev, e, me: Arc<Self>| {
                    tracing::warn!(revocation = %rev.name_any(), error = %e, "could not apply a Revocation yet; will retry");
                    let (rev, me, note) = (rev.clone(), me.clone(), e.to_string());
                    tokio::spawn(async move { me.event(&rev, EventType::Warning, "Failed", note).await });
                    Action::requeue(Duration::from_secs(5))
                },
                self.clone(),
            )
            .for_each(|_| std::future::ready(()))
            .await;
    }

    /// Every [`LIFT_EVERY`], lifts the denials whose Revocation is gone, once `listed` says the
    /// cache of Revocations holds the API server's initial list (an empty cache would lift
    /// them all).
    async fn lift_loop(
        self: Arc<Self>,
        revocations: reflector::Store<Revocation>,
        mut listed: tokio::sync::watch::Receiver<bool>,
        shutdown: Shutdown,
    ) {
        tokio::select! {
            r = listed.wait_for(|l| *l) => if r.is_err() { return },
            _ = shutdown.wait() => return,
        }
        tracing::debug!(
            revocations = revocations.state().len(),
            "Revocations listed: denials whose Revocation is deleted are lifted from now on"
        );
        loop {
            if let Err(e) = self.lift_unheld(&revocations).await {
                tracing::warn!(error = %e, "could not lift denials whose Revocation was deleted; will retry");
            }
            tokio::select! {
                _ = tokio::time::sleep(LIFT_EVERY) => {}
                _ = shutdown.wait() => return,
            }
        }
    }

    /// The identities the Revocations in `revs` deny.
    fn held<'a>(&self, revs: impl Iterator<Item = &'a Revocation>) -> HashSet<String> {
        revs.filter_map(|r| match target(&r.spec, &self.trust_domain) {
            Ok(Target::Identity(id)) => Some(id),
            _ => None,
        })
        .collect()
    }

    /// Removes from the journal every denial held by a Revocation (see
    /// [`crate::journal::DeniedIdentity`]) when no Revocation names its identity any more:
    /// deleting the Revocation lifts the denial. Returns how many were lifted.
    ///
    /// Found in the in-memory cache first (no API call when nothing is to lift), then
    /// confirmed with a list from the API server: the cache may not have seen a Revocation
    /// created a moment ago whose denial another replica already wrote.
    pub async fn lift_unheld(
        &self,
        revocations: &reflector::Store<Revocation>,
    ) -> Result<usize, RevocationError> {
        let journal = self.current_journal().await?;
        let cached = self.held(revocations.state().iter().map(|r| r.as_ref()));
        let candidates: Vec<&str> = journal
            .denied
            .iter()
            .filter(|d| d.revocation.is_some() && !cached.contains(&d.identity))
            .map(|d| d.identity.as_str())
            .collect();
        if candidates.is_empty() {
            return Ok(0);
        }
        let api: Api<Revocation> = Api::namespaced(self.client.clone(), &self.namespace);
        let listed = api
            .list(&kube::api::ListParams::default())
            .await
            .map_err(|e| RevocationError::Failed(format!("cannot list Revocations: {e}")))?;
        let held = self.held(listed.items.iter());
        let lift: HashSet<String> = candidates
            .into_iter()
            .filter(|c| !held.contains(*c))
            .map(str::to_string)
            .collect();
        if lift.is_empty() {
            return Ok(0);
        }
        let _one_writer = self.writer.lock().await;
        let written = crate::ca::update::update(self.store.as_ref(), None, |j| {
            let before = j.denied.len();
            j.denied
                .retain(|d| !(d.revocation.is_some() && lift.contains(&d.identity)));
            let n = before - j.denied.len();
            Ok((n > 0).then_some(n))
        })
        .await
        .map_err(|e| RevocationError::Failed(format!("cannot write the CA journal: {e}")))?;
        let Some((n, j, rev)) = written else {
            return Ok(0);
        };
        self.remember(crate::store::Versioned {
            value: j,
            revision: rev,
        });
        self.wake.notify_one();
        let names: Vec<&String> = lift.iter().collect();
        tracing::info!(target: "citadel::audit", event = "denial_lifted", identities = ?names, "lifted the denial of identities no Revocation names any more (their Revocations were deleted); the certificates they revoked stay on the CRL until they expire");
        Ok(n)
    }

    /// Records an Event on the Revocation, and on the CertificateAuthority resource if it exists.
    async fn event(&self, rev: &Revocation, type_: EventType, reason: &str, note: String) {
        let ev = Event {
            type_,
            reason: reason.into(),
            note: Some(note.chars().take(1000).collect()),
            action: "Revoke".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, &rev.object_ref(&())).await {
            tracing::debug!(error = %e, "could not record an Event on the Revocation");
        }
        let ar = certificate_authority();
        let cas: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), &self.namespace, &ar);
        if let Ok(Some(ca)) = cas.get_opt(&self.ca_resource).await {
            if let Err(e) = self.recorder.publish(&ev, &ca.object_ref(&ar)).await {
                tracing::debug!(error = %e, "could not record an Event on the CertificateAuthority");
            }
        }
    }

    async fn reconcile(&self, rev: &Revocation) -> Result<Action, RevocationError> {
        let name = rev.name_any();
        let generation = rev.metadata.generation.unwrap_or(0);
        let uid = rev.metadata.uid.clone().unwrap_or_default();
        let now = self.clock.now();
        let old_cond = rev
            .status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == APPLIED));
        let target = match target(&rev.spec, &self.trust_domain) {
            Ok(t) => t,
            Err(msg) => {
                let cond = condition(old_cond, false, "Invalid", msg.clone(), generation, now);
                let report = ReplicaReport {
                    found_in_index: 0,
                    observed_generation: generation,
                };
                let patch = status_patch(None, &cond, &self.replica, &report);
                if changes(rev.status.as_ref(), &patch) {
                    tracing::warn!(revocation = %name, error = %msg, "refused a Revocation");
                    self.event(rev, EventType::Warning, "Invalid", msg).await;
                    self.patch_status(&name, &patch).await?;
                }
                return Ok(Action::await_change());
            }
        };
        // This replica's live certificates of the target, read from the index once per
        // generation (a reconcile on every journal change must not rescan it).
        let key = (uid, generation);
        let cached = self
            .scanned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .cloned();
        let mine = match cached {
            Some(m) => m,
            None => {
                let t = target.clone();
                let m = self
                    .index
                    .live(now.unix_timestamp(), &|e| match &t {
                        Target::Identity(id) => &e.identity == id,
                        Target::Serial(s) => &e.serial == s,
                    })
                    .map_err(|e| {
                        RevocationError::Failed(format!("cannot read the issuance index: {e}"))
                    })?;
                self.scanned
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(key, m.clone());
                m
            }
        };
        let age = rev
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| now.unix_timestamp() - t.0.as_second())
            .unwrap_or(i64::MAX);
        let fallback = age >= FALLBACK_AFTER.as_secs() as i64;
        let holder = format!("{}/{name}", self.namespace);
        let mut journal = self.current_journal().await?;
        // A serial the journal carried once and has pruned (its certificate expired) is done:
        // adding it again would keep an expired serial on every CRL for another year.
        let applied_at = rev.status.as_ref().and_then(|s| s.applied_at.as_deref());
        let expired = match &target {
            Target::Serial(_) => applied_at.is_some() && journal_view(&journal, &target).is_none(),
            // Its denial was dropped by the scheduler once nothing it covered could be valid
            // (at the earliest `--max-ttl` after it was applied): applying it again would deny
            // the identity for another `--max-ttl`, on every journal change.
            Target::Identity(_) => denial_over(
                applied_at,
                journal_view(&journal, &target).is_some(),
                now.unix_timestamp(),
                self.policy.max_leaf_ttl,
            ),
        };
        let placeable = matches!(target, Target::Identity(_)) || !mine.is_empty() || fallback;
        let (validity, reason) = (self.crl_validity, rev.spec.reason);
        let ceiling = self.store.revocation_ceiling();
        let mut full = None;
        if !expired && placeable && !satisfied(&journal, &target, &mine) {
            // Tried on the journal in memory first: a Revocation that would pass the ceiling
            // is refused without an API call on every journal change.
            let mut trial = (*journal).clone();
            let changed = apply(
                &mut trial, &target, reason, &mine, fallback, now, validity, &holder,
            )
            .map_err(RevocationError::Failed)?;
            let checked = match changed {
                None => Ok(()),
                Some(_) => crate::ca::update::check_ceiling(&trial, ceiling),
            };
            let written = match checked {
                Ok(()) if changed.is_some() => {
                    self.write_batched(Pending {
                        target: target.clone(),
                        reason,
                        mine: mine.clone(),
                        fallback,
                        holder: holder.clone(),
                        now,
                    })
                    .await
                }
                Ok(()) => Ok(None),
                Err(e) => Err(e),
            };
            match written {
                Ok(Some((n, j))) => {
                    journal = j;
                    self.wake.notify_one();
                    let how = match &target {
                        Target::Serial(_) if mine.is_empty() => {
                            " (no replica's index knew it: listed on every unexpired intermediate's CRL)"
                        }
                        _ => "",
                    };
                    tracing::info!(target: "citadel::audit", event = "revocation_applied", revocation = %name, what = %target, reason = reason.as_str(), revoked_certificates = n, "applied a Revocation{how}");
                    self.event(
                        rev,
                        EventType::Normal,
                        "Applied",
                        format!(
                            "{} applied {target} ({}): {n} certificate(s) newly on the CRL{how}",
                            self.replica,
                            reason.as_str()
                        ),
                    )
                    .await;
                }
                Ok(None) => {}
                Err(e @ crate::ca::update::UpdateError::JournalFull { .. }) => {
                    full = Some(e.to_string());
                }
                Err(e) => {
                    return Err(RevocationError::Failed(format!(
                        "cannot write the CA journal: {e}"
                    )))
                }
            }
        }
        let view = journal_view(&journal, &target);
        let report = ReplicaReport {
            found_in_index: mine.len() as u64,
            observed_generation: generation,
        };
        let cond = match (&view, &target, &full) {
            (Some((_, n, crls)), Target::Identity(id), _) => {
                let ends = journal
                    .is_denied(id)
                    .map(|d| rfc3339(revocation::denial_ends_at(&journal, d, &self.policy)))
                    .unwrap_or_default();
                condition(
                    old_cond,
                    true,
                    "Applied",
                    format!("{id} is denied new certificates while a Revocation names it (deleting this one lifts the denial unless another names it too), until {ends} at the latest, when every certificate it covers has expired; {n} certificate(s) on {} CRL(s)", crls.len()),
                    generation,
                    now,
                )
            }
            (Some((_, _, crls)), Target::Serial(s), _) => condition(
                old_cond,
                true,
                "Applied",
                format!("serial {s} is on {} CRL(s)", crls.len()),
                generation,
                now,
            ),
            (None, _, Some(msg)) => condition(
                old_cond,
                false,
                "JournalFull",
                format!("refused: {msg}"),
                generation,
                now,
            ),
            (None, Target::Serial(s), None) if expired => condition(
                old_cond,
                true,
                "Expired",
                format!("serial {s} was on the CRL until its certificate expired; nothing is left to revoke"),
                generation,
                now,
            ),
            (None, Target::Identity(id), None) if expired => condition(
                old_cond,
                false,
                "DenialExpired",
                format!("the denial of {id} ended by itself once every certificate it covered had expired (--max-ttl after it was applied, plus the clock-skew margin): {id} may get certificates again; delete this Revocation, or create a new one to deny it again"),
                generation,
                now,
            ),
            (None, _, None) => condition(
                old_cond,
                false,
                "Pending",
                format!("no replica's index holds serial yet; it goes on every unexpired intermediate's CRL {}s after creation", FALLBACK_AFTER.as_secs()),
                generation,
                now,
            ),
        };
        let patch = status_patch(view.as_ref(), &cond, &self.replica, &report);
        if changes(rev.status.as_ref(), &patch) {
            if let Some(msg) = &full {
                tracing::warn!(revocation = %name, error = %msg, "refused a Revocation: the CA journal is full");
                self.event(rev, EventType::Warning, "JournalFull", msg.clone())
                    .await;
            }
            self.patch_status(&name, &patch).await?;
        }
        if full.is_some() {
            // Retried on every journal change (room may have been freed) and now and then.
            return Ok(Action::requeue(Duration::from_secs(60)));
        }
        if view.is_none() && !expired {
            let wait = (FALLBACK_AFTER.as_secs() as i64 - age).clamp(1, 10) as u64;
            return Ok(Action::requeue(Duration::from_secs(wait)));
        }
        Ok(Action::requeue(Duration::from_secs(300)))
    }

    async fn patch_status(
        &self,
        name: &str,
        patch: &serde_json::Value,
    ) -> Result<(), RevocationError> {
        let api: Api<Revocation> = Api::namespaced(self.client.clone(), &self.namespace);
        api.patch_status(name, &PatchParams::default(), &Patch::Merge(patch))
            .await
            .map(|_| ())
            .map_err(|e| {
                RevocationError::Failed(format!(
                    "cannot update the status of Revocation {name}: {e}"
                ))
            })
    }
}

/// The CRD as YAML, what `deploy/crds/revocation.yaml` holds.
pub fn crd_yaml() -> String {
    use kube::CustomResourceExt;
    super::crds::yaml(&Revocation::crd(), "src/cluster/revocations.rs")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// deploy/crds/revocation.yaml, and its copy inside deploy/citadel.yaml (one
    /// `kubectl apply -f deploy/citadel.yaml` installs everything), equal what the code
    /// generates.
    #[test]
    fn crds_in_deploy_match_the_revocation_type() {
        super::super::crds::check_deployed("revocation.yaml", &crd_yaml());
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
        for r in crl::REASONS {
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
        }
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

    fn ca() -> (Journal, time::OffsetDateTime) {
        let now = time::OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        let opts = crate::ca::bootstrap::CaOptions::new(
            crate::identity::TrustDomain::new("cluster.local").unwrap(),
        );
        (crate::ca::bootstrap::new_journal(&opts, now).unwrap(), now)
    }

    /// Issue 20, M2: a serial nobody's index knows is one journal record, listed on the CRL
    /// of every intermediate that could have issued it (not one record per intermediate),
    /// and not on the CRL of an intermediate made after it was revoked.
    #[test]
    fn an_unknown_serial_is_recorded_once_for_every_intermediate() {
        let (mut j, now) = ca();
        let p = crate::ca::policy::RotationPolicy::default();
        crate::ca::apply::apply(
            &mut j,
            &crate::ca::plan::Action::PrepareIntermediate,
            now,
            &p,
        )
        .unwrap();
        let ints: Vec<String> = j
            .authorities
            .iter()
            .filter(|a| a.role == crate::journal::Role::Intermediate)
            .map(|a| a.id.clone())
            .collect();
        assert_eq!(ints.len(), 2);
        let t = Target::Serial("0a0b0c".into());
        let v = Duration::from_secs(3600);
        let n = apply(
            &mut j,
            &t,
            RevocationReason::KeyCompromise,
            &[],
            true,
            now,
            v,
            "ns/r",
        );
        assert_eq!(n, Ok(Some(1)));
        assert_eq!(j.revocations.len(), 1, "one record");
        assert_eq!(j.revocations[0].issuer, ANY_INTERMEDIATE);
        for i in &ints {
            assert_eq!(crl::serials_for(&j, i), vec!["0a0b0c".to_string()], "{i}");
            let c = j.crls.iter().find(|c| &c.issuer == i).unwrap();
            assert_eq!(c.serials, vec!["0a0b0c".to_string()]);
        }
        let (_, _, crls) = journal_view(&j, &t).unwrap();
        assert_eq!(crls.len(), 2);
        // Applying again changes nothing.
        let n = apply(
            &mut j,
            &t,
            RevocationReason::KeyCompromise,
            &[],
            true,
            now,
            v,
            "ns/r",
        );
        assert_eq!(n, Ok(None));
        // An intermediate made later cannot have issued it: its CRL does not list it.
        let later = now + time::Duration::hours(1);
        j.get_mut(&ints[1]).unwrap().status = crate::journal::Status::Active;
        j.get_mut(&ints[0]).unwrap().status = crate::journal::Status::Retiring;
        crate::ca::apply::apply(
            &mut j,
            &crate::ca::plan::Action::PrepareIntermediate,
            later,
            &p,
        )
        .unwrap();
        let newest = j.authorities.last().unwrap().id.clone();
        assert!(crl::serials_for(&j, &newest).is_empty());
        // The signer refuses it under any issuer (the revocation view's "any issuer").
        let signer = crate::ca::bootstrap::signer_from_journal(
            &j,
            &crate::identity::TrustDomain::new("cluster.local").unwrap(),
        )
        .unwrap();
        assert!(signer.revocations().revokes(b"whatever issuer", "0a0b0c"));
    }

    /// A denial names the Revocation that holds it; one from before (no holder) is adopted.
    #[test]
    fn a_denial_is_held_by_its_revocation() {
        let (mut j, now) = ca();
        let t = Target::Identity("spiffe://cluster.local/ns/shop/sa/cart".into());
        let v = Duration::from_secs(3600);
        let r = RevocationReason::Unspecified;
        assert_eq!(
            apply(&mut j, &t, r, &[], false, now, v, "citadel/a"),
            Ok(Some(0))
        );
        assert_eq!(j.denied[0].revocation.as_deref(), Some("citadel/a"));
        assert!(satisfied(&j, &t, &[]));
        assert_eq!(
            apply(&mut j, &t, r, &[], false, now, v, "citadel/b"),
            Ok(None)
        );
        j.denied[0].revocation = None;
        assert!(!satisfied(&j, &t, &[]));
        assert_eq!(
            apply(&mut j, &t, r, &[], false, now, v, "citadel/b"),
            Ok(Some(0))
        );
        assert_eq!(j.denied[0].revocation.as_deref(), Some("citadel/b"));
        assert_eq!(j.denied.len(), 1);
    }

    /// Issue 20, M2: a revocation write that would pass the store's ceiling is refused before
    /// anything is written, with the numbers; the CA's own writes are not bounded by it.
    #[tokio::test]
    async fn revocation_writes_stop_at_the_ceiling_and_rotation_does_not() {
        let (j, now) = ca();
        let size = serde_json::to_vec(&j).unwrap().len();
        let store =
            crate::store::mem::MemStore::with_journal(j).with_revocation_ceiling(size + 1000);
        let v = Duration::from_secs(3600);
        let mut i = 0;
        let err = loop {
            let t = Target::Identity(format!("spiffe://cluster.local/ns/shop/sa/w{i}"));
            i += 1;
            match crate::ca::update::update_revocations(&store, |j| {
                apply(
                    j,
                    &t,
                    RevocationReason::Unspecified,
                    &[],
                    false,
                    now,
                    v,
                    "c/x",
                )
            })
            .await
            {
                Ok(_) => continue,
                Err(e) => break e,
            }
        };
        assert!(
            matches!(err, crate::ca::update::UpdateError::JournalFull { ceiling, .. } if ceiling == size + 1000),
            "{err}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains("nothing was written") && msg.contains(&format!("{}", size + 1000)),
            "{msg}"
        );
        let stored = store.journal().unwrap();
        assert!(serde_json::to_vec(&stored).unwrap().len() <= size + 1000);
        assert_eq!(stored.denied.len(), i - 1);
        // Rotation still writes past it.
        let p = crate::ca::policy::RotationPolicy::default();
        crate::ca::update::update_journal(&store, |j| {
            crate::ca::apply::apply(j, &crate::ca::plan::Action::PrepareIntermediate, now, &p)
                .map_err(|e| e.to_string())
        })
        .await
        .unwrap();
        assert!(serde_json::to_vec(&store.journal().unwrap()).unwrap().len() > size + 1000);
    }

    /// Issue 20, M2: once the scheduler dropped a denial that had nothing left to cover, its
    /// Revocation is over (condition `DenialExpired`) and is not applied again; a denial
    /// missing from a lagging cache right after it was applied is not "over".
    #[test]
    fn an_expired_denial_is_not_applied_again() {
        let ttl = Duration::from_secs(3600);
        let at = "2030-01-01T00:00:00Z";
        let t = parse_rfc3339(at).unwrap();
        assert!(denial_over(Some(at), false, t + 3600, ttl));
        assert!(
            !denial_over(Some(at), true, t + 3600, ttl),
            "still in the journal"
        );
        assert!(
            !denial_over(Some(at), false, t + 5, ttl),
            "a cache that lags"
        );
        assert!(!denial_over(None, false, t + 7200, ttl), "never applied");
        assert!(!denial_over(Some("garbage"), false, t + 7200, ttl));
    }

    #[test]
    fn merge_patch_and_change_detection() {
        let now = time::OffsetDateTime::from_unix_timestamp(1_000_000).unwrap();
        let cond = condition(None, true, "Applied", "m".into(), 1, now);
        let report = ReplicaReport {
            found_in_index: 2,
            observed_generation: 1,
        };
        let view = (
            5,
            3,
            vec![CrlVersion {
                issuer: "i".into(),
                number: 4,
            }],
        );
        let patch = status_patch(Some(&view), &cond, "a", &report);
        assert!(changes(None, &patch));
        let mut cur = serde_json::json!({});
        json_patch_merge(&mut cur, &patch["status"]);
        let st: RevocationStatus = serde_json::from_value(cur).unwrap();
        assert_eq!(st.certificates_revoked, Some(3));
        assert!(
            !changes(Some(&st), &patch),
            "the same patch again changes nothing"
        );
        // Another replica's report is kept next to ours.
        let other = status_patch(Some(&view), &cond, "b", &report);
        assert!(changes(Some(&st), &other));
        let mut v = serde_json::to_value(&st).unwrap();
        json_patch_merge(&mut v, &other["status"]);
        let st2: RevocationStatus = serde_json::from_value(v).unwrap();
        assert_eq!(st2.replicas.len(), 2);
        // The transition time stays while the status does not change.
        let later = condition(
            Some(&cond),
            true,
            "Applied",
            "m2".into(),
            1,
            now + time::Duration::hours(1),
        );
        assert_eq!(later.last_transition_time, cond.last_transition_time);
        let flipped = condition(
            Some(&cond),
            false,
            "Invalid",
            "m".into(),
            1,
            now + time::Duration::hours(1),
        );
        assert_ne!(flipped.last_transition_time, cond.last_transition_time);
    }

    /// The numbers in docs/operations.md: the real index format, 100,000 certificates with
    /// mesh-like identities, its bytes and one scan for an identity. Run with
    /// `cargo test --lib index_bytes_per_100k -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn index_bytes_per_100k() {
        use crate::store::index::{FileIndex, INDEX_FILE};
        let dir = tempfile::tempdir().unwrap();
        let index = FileIndex::new(dir.path());
        let issuer = hex::encode(crate::pki::random_serial());
        for i in 0..100_000u32 {
            index
                .record(&IssuedEntry {
                    serial: crate::pki::chain::serial_hex(&crate::pki::random_serial()),
                    identity: format!(
                        "spiffe://cluster.local/ns/team-{}/sa/service-{}",
                        i % 300,
                        i % 5000
                    ),
                    not_after: 2_000_000_000,
                    issuer: issuer.clone(),
                })
                .unwrap();
        }
        let bytes = std::fs::metadata(dir.path().join(INDEX_FILE))
            .unwrap()
            .len();
        let started = std::time::Instant::now();
        let found = index
            .live(0, &|e| {
                e.identity == "spiffe://cluster.local/ns/team-7/sa/service-7"
            })
            .unwrap();
        println!(
            "100000 entries: {bytes} bytes ({:.1} MiB, {:.0} B/entry); one identity scan: {} found in {:?}",
            bytes as f64 / 1048576.0,
            bytes as f64 / 100_000.0,
            found.len(),
            started.elapsed()
        );
    }
}
