//! The resource's status, derived from the journal and what the reconciler observed: the
//! conditions (`Ready`, `RootRotationInProgress`, `BundlePublished`, `Degraded`, and
//! `LinkerdAnchorsCurrent` with `--linkerd-identity-domain`), the
//! authorities, the rotation stage, the merge patch that writes it, and the Event a stage
//! change calls for. Pure functions: no API calls.

use time::OffsetDateTime;

use super::resource::{
    AuthorityStatus, BundleStatus, CertificateAuthorityStatus, Condition, RootRotationStatus,
};
use crate::journal::{Journal, Role, Status};

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
    /// Linkerd anchor drift (`--linkerd-identity-domain`): running meshed pods behind the
    /// published anchors, and meshed pods (`cluster::linkerd_drift`); `None`: not counted
    /// (Linkerd off, or no count yet), and no `LinkerdAnchorsCurrent` condition.
    pub linkerd_drift: Option<(i64, i64)>,
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
    match o.linkerd_drift {
        Some((0, meshed)) => cond(
            "LinkerdAnchorsCurrent",
            Some(true),
            "AllPodsCurrent",
            format!("all {meshed} running Linkerd-meshed pods hold the published trust anchors"),
        ),
        Some((behind, meshed)) => cond(
            "LinkerdAnchorsCurrent",
            Some(false),
            "PodsBehind",
            format!("{behind} of {meshed} running Linkerd-meshed pods started before the current trust anchors (Linkerd reads them only at pod start): restart them before a new root signs or an old root leaves the bundle"),
        ),
        None => {}
    }
    if j.offline_root {
        let activate_at = j
            .policy
            .as_ref()
            .map(|p| p.activate_at)
            .unwrap_or(crate::ca::policy::RotationPolicy::default().activate_at);
        match crate::ca::offline::signature_needed(j, activate_at) {
            Some(n) if n.deadline >= o.now => cond(
                "IntermediateSignatureNeeded",
                Some(true),
                "AwaitingRootSignature",
                format!(
                    "offline root: intermediate request {} needs the root's signature by {} ({}s left); the current intermediate keeps signing. `citadel ca intermediate-csr --store kube` prints the CSR",
                    n.request,
                    rfc3339(n.deadline),
                    n.deadline - o.now
                ),
            ),
            Some(n) => cond(
                "IntermediateSignatureNeeded",
                Some(true),
                "Overdue",
                format!(
                    "offline root: intermediate request {} was due to be signed by {} ({}s overdue); the current intermediate keeps signing{}. `citadel ca intermediate-csr --store kube` prints the CSR",
                    n.request,
                    rfc3339(n.deadline),
                    o.now - n.deadline,
                    n.signer_expires
                        .map(|e| format!(" until it expires at {}", rfc3339(e)))
                        .unwrap_or_default()
                ),
            ),
            None => cond(
                "IntermediateSignatureNeeded",
                Some(false),
                "NoRequestWaiting",
                "offline root: no intermediate waits for the root's signature".into(),
            ),
        }
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
        // Each replica writes its own entry (`super::live`); the leader's status keeps them
        // as they are, so its merge patch never touches them.
        replicas: previous.map(|p| p.replicas.clone()).unwrap_or_default(),
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

/// The Event a change of the `IntermediateSignatureNeeded` condition's reason calls for:
/// `(type is warning, reason, note)`. `before`/`after` are the condition's reasons.
pub fn signature_event(
    before: Option<&str>,
    after: Option<&str>,
    message: &str,
) -> Option<(bool, String, String)> {
    match (before, after) {
        (b, a) if b == a => None,
        (_, Some("AwaitingRootSignature")) => Some((
            true,
            "IntermediateSignatureNeeded".into(),
            message.to_string(),
        )),
        (_, Some("Overdue")) => Some((
            true,
            "IntermediateSignatureOverdue".into(),
            message.to_string(),
        )),
        (Some("AwaitingRootSignature" | "Overdue"), Some(_)) => Some((
            false,
            "IntermediateInstalled".into(),
            "offline root: a root-signed intermediate was installed".into(),
        )),
        _ => None,
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

#[cfg(test)]
mod tests {
    use super::*;

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
                key_ref: None,
            });
        }
        j
    }

    /// Offline root: `IntermediateSignatureNeeded` is True while a request waits (reason
    /// `AwaitingRootSignature` before the active intermediate's activation point, `Overdue`
    /// after), False once none does; each change of reason is an Event. No such condition on
    /// a CA that holds its root key.
    #[test]
    fn an_offline_root_says_when_a_signature_is_needed() {
        let mut j = journal();
        let o = Observed {
            generation: Some(1),
            now: 100,
            signer_not_after: Some(1000),
            bundle: Some((1, 1)),
            degraded: None,
            linkerd_drift: None,
        };
        let find = |s: &CertificateAuthorityStatus| {
            s.conditions
                .iter()
                .find(|c| c.type_ == "IntermediateSignatureNeeded")
                .cloned()
        };
        assert_eq!(find(&status_for(&j, &o, None)), None, "online root: none");
        j.offline_root = true;
        let idle = find(&status_for(&j, &o, None)).unwrap();
        assert_eq!(
            (idle.status.as_str(), idle.reason.as_str()),
            ("False", "NoRequestWaiting")
        );
        j.intermediate_request = Some(crate::journal::IntermediateRequest {
            id: "abcd".into(),
            key_pem: crate::journal::Secret::new(String::new()),
            key_ref: None,
            csr_pem: String::new(),
            created_at: 500,
        });
        // The active intermediate lives 0..1000: its activation point is 833.
        let waiting = find(&status_for(
            &j,
            &Observed {
                now: 600,
                ..o.clone()
            },
            None,
        ))
        .unwrap();
        assert_eq!(
            (waiting.status.as_str(), waiting.reason.as_str()),
            ("True", "AwaitingRootSignature")
        );
        assert!(
            waiting.message.contains("233s left") && waiting.message.contains("abcd"),
            "{}",
            waiting.message
        );
        let late = find(&status_for(
            &j,
            &Observed {
                now: 900,
                ..o.clone()
            },
            None,
        ))
        .unwrap();
        assert_eq!(late.reason, "Overdue");
        assert!(late.message.contains("67s overdue"), "{}", late.message);
        let ev = |b: &str, a: &str| signature_event(Some(b), Some(a), "m");
        assert_eq!(
            ev("NoRequestWaiting", "AwaitingRootSignature").unwrap().1,
            "IntermediateSignatureNeeded"
        );
        assert_eq!(
            ev("AwaitingRootSignature", "Overdue").unwrap().1,
            "IntermediateSignatureOverdue"
        );
        let done = ev("Overdue", "NoRequestWaiting").unwrap();
        assert_eq!((done.0, done.1.as_str()), (false, "IntermediateInstalled"));
        assert_eq!(ev("Overdue", "Overdue"), None, "no repeat");
    }

    /// Linkerd anchor drift is a condition only when counted: True with no pod behind, False
    /// naming how many are, and its transition time moves only when that flips.
    #[test]
    fn linkerd_anchor_drift_is_a_condition_when_counted() {
        let j = journal();
        let o = Observed {
            generation: Some(1),
            now: 100,
            signer_not_after: Some(1000),
            bundle: Some((1, 1)),
            degraded: None,
            linkerd_drift: None,
        };
        let find = |s: &CertificateAuthorityStatus| {
            s.conditions
                .iter()
                .find(|c| c.type_ == "LinkerdAnchorsCurrent")
                .cloned()
        };
        assert_eq!(
            find(&status_for(&j, &o, None)),
            None,
            "Linkerd off: no condition"
        );
        let behind = Observed {
            linkerd_drift: Some((2, 5)),
            ..o.clone()
        };
        let s = status_for(&j, &behind, None);
        let c = find(&s).unwrap();
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "PodsBehind")
        );
        assert!(
            c.message.starts_with("2 of 5 running Linkerd-meshed pods"),
            "{}",
            c.message
        );
        let current = Observed {
            now: 200,
            linkerd_drift: Some((0, 5)),
            ..o.clone()
        };
        let s2 = status_for(&j, &current, Some(&s));
        let c2 = find(&s2).unwrap();
        assert_eq!(
            (c2.status.as_str(), c2.reason.as_str()),
            ("True", "AllPodsCurrent")
        );
        assert_ne!(c2.last_transition_time, c.last_transition_time);
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
            linkerd_drift: None,
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
