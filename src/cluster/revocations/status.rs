//! A Revocation's status: the `Applied` condition, the merge patch one replica sends (only
//! its own entry of `status.replicas`), whether it would change anything, and when an identity
//! Revocation is over because the scheduler dropped its denial.

use std::time::Duration;

use super::{Condition, CrlVersion, ReplicaReport, RevocationStatus};

/// The condition type every Revocation carries.
pub const APPLIED: &str = "Applied";

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
pub(super) fn parse_rfc3339(s: &str) -> Option<i64> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .ok()
        .map(|t| t.unix_timestamp())
}

pub(super) fn rfc3339(ts: i64) -> String {
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
pub(super) fn changes(current: Option<&RevocationStatus>, patch: &serde_json::Value) -> bool {
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
pub(super) fn json_patch_merge(target: &mut serde_json::Value, patch: &serde_json::Value) {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
