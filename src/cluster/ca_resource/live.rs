//! The spec applied while serving, on every replica: what one replica makes of a generation
//! of the spec (the policy to run, or why it keeps the previous one), and the entry it
//! reports under `status.replicas.<name>` (`observedGeneration`, the `SpecApplied`
//! condition, `appliedAt`). Pure functions; the loop that calls them is
//! [`super::Reconciler::follow_spec`].
//!
//! Every field of the spec but `trustDomain` applies live: the policy is one
//! [`crate::ca::policy::LivePolicy`] that the issue path reads per request and the scheduler
//! per step. A trust domain other than the one the replica signs for is refused (the schema
//! makes it immutable once set; one set later than the CA was made is refused here), and
//! the replica keeps running its previous policy.

use super::policy::effective_policy;
use super::resource::{CertificateAuthoritySpec, Condition, ReplicaSpecStatus};
use super::validate::SpecCaps;
use crate::ca::policy::CaPolicy;

/// The condition type of each replica's entry.
pub const SPEC_APPLIED: &str = "SpecApplied";

/// Why a replica did not apply a spec: `(reason, message)`.
pub type Refusal = (String, String);

/// The policy one replica runs for `spec` (`None`: no resource, the flags alone), and a
/// one-line account of where each setting came from; or why it keeps the previous policy.
pub fn decide(
    spec: Option<&CertificateAuthoritySpec>,
    trust_domain: &str,
    flags: &CaPolicy,
    activate_after_from_flag: bool,
    caps: &SpecCaps,
) -> Result<(CaPolicy, String), Refusal> {
    let Some(spec) = spec else {
        return Ok((flags.clone(), "flags".into()));
    };
    if let Some(td) = spec
        .trust_domain
        .as_deref()
        .filter(|td| *td != trust_domain)
    {
        return Err((
            "TrustDomainMismatch".into(),
            format!("spec.trustDomain {td:?} is not the CA's trust domain {trust_domain:?}; a trust domain cannot change while serving (every certificate and identity depends on it): fix the spec; running with the previous policy"),
        ));
    }
    match effective_policy(spec, flags, activate_after_from_flag, caps) {
        Ok((p, sources)) => {
            let summary: Vec<String> = sources
                .iter()
                .map(|(field, value, source)| format!("{field}={value} ({source})"))
                .collect();
            Ok((p, summary.join(", ")))
        }
        Err(e) => Err((
            "InvalidSpec".into(),
            format!("the spec cannot be used: {e}; running with the previous policy"),
        )),
    }
}

/// Formats unix seconds as RFC 3339 (UTC).
fn rfc3339(t: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(t)
        .ok()
        .and_then(|d| {
            d.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// This replica's entry after reading `generation`: `SpecApplied` True when `outcome` is
/// `Ok` (it runs that generation's policy), else False with the refusal. `changed`: the
/// policy was swapped just now (so `appliedAt` is `now`). The condition keeps its
/// `lastTransitionTime` while its status holds, so re-reading the same generation writes
/// nothing.
pub fn entry(
    previous: Option<&ReplicaSpecStatus>,
    generation: Option<i64>,
    outcome: &Result<(), Refusal>,
    changed: bool,
    now: i64,
) -> ReplicaSpecStatus {
    let (status, reason, message) = match outcome {
        Ok(()) => (
            "True",
            "Applied".to_string(),
            format!(
                "this replica runs the policy of generation {}",
                generation.unwrap_or_default()
            ),
        ),
        Err((reason, message)) => ("False", reason.clone(), message.clone()),
    };
    let old = previous.and_then(|p| p.conditions.iter().find(|c| c.type_ == SPEC_APPLIED));
    let last_transition_time = match old {
        Some(o) if o.status == status => o.last_transition_time.clone(),
        _ => rfc3339(now),
    };
    let applied_at = match (changed, previous.and_then(|p| p.applied_at.clone())) {
        (false, Some(at)) => Some(at),
        _ if outcome.is_ok() => Some(rfc3339(now)),
        (_, at) => at,
    };
    ReplicaSpecStatus {
        observed_generation: generation,
        conditions: vec![Condition {
            type_: SPEC_APPLIED.into(),
            status: status.into(),
            reason,
            message,
            last_transition_time,
            observed_generation: generation,
        }],
        applied_at,
    }
}

/// The merge patch that writes `me`'s entry and nothing else: a merge patch merges maps key
/// by key, so replicas writing at once never erase each other's entries, and the leader's
/// own status writes leave the map alone.
pub fn patch(me: &str, entry: &ReplicaSpecStatus) -> serde_json::Value {
    serde_json::json!({ "status": { "replicas": { me: entry } } })
}

#[cfg(test)]
mod tests {
    use super::super::policy::tests::flags;
    use super::*;
    use std::time::Duration;

    fn spec(json: serde_json::Value) -> CertificateAuthoritySpec {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn a_valid_spec_is_run_and_no_resource_means_the_flags() {
        let (p, summary) = decide(
            Some(&spec(serde_json::json!({"defaultWorkloadTtl": "30m", "maxWorkloadTtl": "1h", "crlValidity": "2h"}))),
            "cluster.local",
            &flags(),
            false,
            &SpecCaps::default(),
        )
        .unwrap();
        assert_eq!(p.ttl.max, Duration::from_secs(3600));
        assert_eq!(p.rotation.crl_validity, Duration::from_secs(7200));
        assert!(summary.contains("maxWorkloadTtl=1h (spec)"), "{summary}");
        let (p, summary) =
            decide(None, "cluster.local", &flags(), false, &SpecCaps::default()).unwrap();
        assert_eq!((p, summary.as_str()), (flags(), "flags"));
    }

    #[test]
    fn another_trust_domain_and_a_bad_combination_are_refused_with_the_reason() {
        let (reason, message) = decide(
            Some(&spec(serde_json::json!({"trustDomain": "other.org"}))),
            "cluster.local",
            &flags(),
            false,
            &SpecCaps::default(),
        )
        .unwrap_err();
        assert_eq!(reason, "TrustDomainMismatch");
        assert!(message.contains("\"other.org\"") && message.contains("cannot change"));
        // The same trust domain is no change at all.
        assert!(decide(
            Some(&spec(serde_json::json!({"trustDomain": "cluster.local"}))),
            "cluster.local",
            &flags(),
            false,
            &SpecCaps::default(),
        )
        .is_ok());
        let (reason, message) = decide(
            Some(&spec(
                serde_json::json!({"defaultWorkloadTtl": "2h", "maxWorkloadTtl": "1h"}),
            )),
            "cluster.local",
            &flags(),
            false,
            &SpecCaps::default(),
        )
        .unwrap_err();
        assert_eq!(reason, "InvalidSpec");
        assert!(message.contains("previous policy"), "{message}");
    }

    #[test]
    fn the_entry_says_which_generation_runs_and_is_stable_on_a_reread() {
        let e1 = entry(None, Some(1), &Ok(()), true, 1000);
        let c = &e1.conditions[0];
        assert_eq!(
            (c.type_.as_str(), c.status.as_str()),
            (SPEC_APPLIED, "True")
        );
        assert_eq!(e1.observed_generation, Some(1));
        assert_eq!(e1.applied_at.as_deref(), Some("1970-01-01T00:16:40Z"));
        // Re-reading the same generation later: nothing changes.
        assert_eq!(entry(Some(&e1), Some(1), &Ok(()), false, 2000), e1);
        // A refused generation: observed, not applied; appliedAt still the last switch.
        let refused: Result<(), Refusal> = Err(("InvalidSpec".into(), "no".into()));
        let e2 = entry(Some(&e1), Some(2), &refused, false, 3000);
        assert_eq!(e2.observed_generation, Some(2));
        assert_eq!(e2.conditions[0].status, "False");
        assert_eq!(e2.conditions[0].reason, "InvalidSpec");
        assert_eq!(
            e2.conditions[0].last_transition_time,
            "1970-01-01T00:50:00Z"
        );
        assert_eq!(e2.applied_at, e1.applied_at);
        // The patch carries this replica's key only.
        let p = patch("replica-a", &e2);
        assert_eq!(p["status"]["replicas"].as_object().unwrap().len(), 1, "{p}");
        assert_eq!(
            p["status"]["replicas"]["replica-a"]["observedGeneration"],
            2
        );
    }
}
