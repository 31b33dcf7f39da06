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

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use kube::api::{Api, Patch, PatchParams};
use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::controller::{self, Action};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::{watcher, Controller, WatchStreamExt};
use kube::{CustomResource, KubeSchema, Resource, ResourceExt};
use serde::{Deserialize, Serialize};

use crate::ca::{crl, revocation};
use crate::clock::SharedClock;
use crate::identity::SpiffeId;
use crate::journal::{Journal, Role, Status};
use crate::shutdown::Shutdown;
use crate::store::index::{IssuanceIndex, IssuedEntry};
use crate::store::Store;

/// How long after a serial Revocation was created a replica whose index does not know the
/// serial waits for the one that does, before listing it on every unexpired intermediate's CRL.
pub const FALLBACK_AFTER: Duration = Duration::from_secs(10);

/// The condition type every Revocation carries.
pub const APPLIED: &str = "Applied";

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
    /// SPIFFE ID to deny from now on; its live certificates are revoked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048))]
    #[x_kube(validation = Rule::new("self.matches('^spiffe://[a-z0-9._-]+(/[A-Za-z0-9._-]+)+$')").message("identity must be a SPIFFE ID such as spiffe://cluster.local/ns/shop/sa/frontend"))]
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
        (None, Some(i)) => {
            let id = SpiffeId::parse(i).map_err(|e| format!("spec.identity: {e}"))?;
            if id.trust_domain().as_str() != trust_domain {
                return Err(format!(
                    "spec.identity {id} is outside this CA's trust domain {trust_domain:?}"
                ));
            }
            Ok(Target::Identity(id.to_string()))
        }
        _ => Err("name exactly one of spec.serial or spec.identity".into()),
    }
}

/// Whether `j` already does everything `target` asks that this replica can do with `mine`
/// (its live index entries for the target): then nothing is written.
pub fn satisfied(j: &Journal, target: &Target, mine: &[IssuedEntry]) -> bool {
    let all_mine_revoked = mine.iter().all(|e| j.is_revoked(&e.serial).is_some());
    match target {
        Target::Identity(id) => j.is_denied(id).is_some() && all_mine_revoked,
        Target::Serial(s) => j.is_revoked(s).is_some(),
    }
}

/// Applies `target` to the journal: the denial plus this replica's live certificates of the
/// identity, or the serial (precisely if `mine` has it; on every unexpired intermediate's CRL
/// if `fallback`). Returns how many certificates it newly put on a CRL; 0 means nothing changed
/// (already applied, or a serial this replica cannot place yet).
pub fn apply(
    j: &mut Journal,
    target: &Target,
    reason: RevocationReason,
    mine: &[IssuedEntry],
    fallback: bool,
    now: time::OffsetDateTime,
    crl_validity: Duration,
) -> Result<usize, String> {
    let ts = now.unix_timestamp();
    match target {
        Target::Identity(id) => {
            if j.is_denied(id).is_none() {
                j.denied.push(crate::journal::DeniedIdentity {
                    identity: id.clone(),
                    since: ts,
                    reason: reason.as_str().to_string(),
                });
            }
            revocation::revoke_denied(j, mine, now, crl_validity).map_err(|e| e.to_string())
        }
        Target::Serial(s) => {
            if j.is_revoked(s).is_some() {
                return Ok(0);
            }
            if let Some(e) = mine.iter().find(|e| &e.serial == s) {
                revocation::revoke_serial(j, e, reason.as_str(), now, crl_validity)
                    .map_err(|e| e.to_string())?;
                return Ok(1);
            }
            if !fallback {
                return Ok(0);
            }
            // Nobody's index knows it: every intermediate that may still have issued it.
            let issuers: Vec<(String, i64)> = j
                .authorities
                .iter()
                .filter(|a| {
                    a.role == Role::Intermediate && a.status != Status::Retired && a.not_after > ts
                })
                .map(|a| (a.id.clone(), a.not_after))
                .collect();
            if issuers.is_empty() {
                return Err("no unexpired intermediate to list the serial on".into());
            }
            for (issuer, not_after) in &issuers {
                j.revocations.push(crate::journal::Revocation {
                    serial: s.clone(),
                    issuer: issuer.clone(),
                    identity: None,
                    not_after: *not_after,
                    revoked_at: ts,
                    reason: reason.as_str().to_string(),
                });
                crl::sign(j, issuer, now, crl_validity).map_err(|e| e.to_string())?;
            }
            Ok(1)
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
        .filter(|c| revoked.iter().any(|r| r.issuer == c.issuer))
        .map(|c| CrlVersion {
            issuer: c.issuer.clone(),
            number: c.number,
        })
        .collect();
    crls.sort_by(|a, b| a.issuer.cmp(&b.issuer));
    Some((applied_at, serials.len() as u64, crls))
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
    recorder: Recorder,
    /// Wakes the scheduler after this controller wrote the journal (installs the denial now).
    wake: Arc<tokio::sync::Notify>,
    /// (uid, generation) -> index entries found, so a re-reconcile (every journal change)
    /// does not rescan the index.
    scanned: Mutex<BTreeMap<(String, i64), Vec<IssuedEntry>>>,
    /// The CertificateAuthority resource (`serve --ca-resource`) that also gets the Events.
    ca_resource: String,
}

/// The `CertificateAuthority` kind (another controller's), looked up only to put Events on it.
fn certificate_authority() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("citadel.dev", "v1alpha1", "CertificateAuthority"),
        "certificateauthorities",
    )
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
        crl_validity: Duration,
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
            crl_validity,
            wake,
            scanned: Mutex::new(BTreeMap::new()),
            ca_resource: ca_resource.to_string(),
        })
    }

    /// Runs until shutdown, on every replica. Every Revocation is reconciled when it changes,
    /// and all of them when the journal Secret changes (another replica applied one: the
    /// status counts move), debounced.
    pub async fn run(self: Arc<Self>, shutdown: Shutdown) {
        let api: Api<Revocation> = Api::namespaced(self.client.clone(), &self.namespace);
        // Without the CRD the watch just retries; say once why revocations are not applied.
        if let Err(kube::Error::Api(s)) = api.list(&kube::api::ListParams::default().limit(1)).await
        {
            tracing::warn!(namespace = %self.namespace, code = s.code, error = %s.message, "cannot list Revocations (citadel.dev/v1alpha1): install the CRD (kubectl apply -f deploy/crds/revocation.yaml) and grant citadel get/list/watch on revocations; until then Revocation resources are not applied");
        }
        let secrets: Api<k8s_openapi::api::core::v1::Secret> =
            Api::namespaced(self.client.clone(), &self.namespace);
        let journal_changes = watcher(
            secrets,
            watcher::Config::default().fields(&format!(
                "metadata.name={}",
                crate::store::kube::JOURNAL_SECRET
            )),
        )
        .default_backoff()
        .touched_objects()
        .filter_map(|r| std::future::ready(r.ok().map(|_| ())));
        let sd = shutdown.clone();
        Controller::new(api, watcher::Config::default())
            .with_config(controller::Config::default().debounce(Duration::from_millis(500)))
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
        let loaded = self
            .store
            .load_journal()
            .await
            .map_err(|e| RevocationError::Failed(format!("cannot read the CA journal: {e}")))?
            .ok_or_else(|| RevocationError::Failed("the store holds no CA journal".into()))?;
        let mut journal = loaded.value;
        let mut newly = 0;
        let placeable = matches!(target, Target::Identity(_)) || !mine.is_empty() || fallback;
        if !satisfied(&journal, &target, &mine) && placeable {
            let (validity, reason) = (self.crl_validity, rev.spec.reason);
            let (n, j, _) = crate::ca::update::update_journal(self.store.as_ref(), |j| {
                apply(j, &target, reason, &mine, fallback, now, validity)
            })
            .await
            .map_err(|e| RevocationError::Failed(format!("cannot write the CA journal: {e}")))?;
            journal = j;
            newly = n;
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
        let view = journal_view(&journal, &target);
        let report = ReplicaReport {
            found_in_index: mine.len() as u64,
            observed_generation: generation,
        };
        let cond = match (&view, &target) {
            (Some((_, n, crls)), Target::Identity(id)) => condition(
                old_cond,
                true,
                "Applied",
                format!("{id} is denied new certificates; {n} certificate(s) on {} CRL(s)", crls.len()),
                generation,
                now,
            ),
            (Some((_, _, crls)), Target::Serial(s)) => condition(
                old_cond,
                true,
                "Applied",
                format!("serial {s} is on {} CRL(s)", crls.len()),
                generation,
                now,
            ),
            (None, _) => condition(
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
            self.patch_status(&name, &patch).await?;
        }
        let _ = newly;
        if view.is_none() {
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
