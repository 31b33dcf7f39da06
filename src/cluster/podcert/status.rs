//! The Pod Certificates signer's wire: a decision is ONE `/status` write with exactly one
//! condition (`Issued`, `Denied` or `Failed`, status True). [`decision`] is this surface's
//! one mapping from the shared issue path's errors to those conditions (or to a retry);
//! [`status`] renders a decision as the request's status.

use k8s_openapi::api::certificates::v1::{PodCertificateRequest, PodCertificateRequestStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use time::OffsetDateTime;

use super::error::PodCertError;
use crate::auth::issue_path::IssueError;
use crate::ca::issue::IssueFailure;
use crate::pki::csr::CsrError;

/// beginRefreshAt must be at least this far from notBefore and from notAfter.
const REFRESH_MARGIN: time::Duration = time::Duration::minutes(10);

/// Condition types: exactly one of them, status True, ends a request.
const ISSUED: &str = "Issued";
const DENIED: &str = "Denied";
const FAILED: &str = "Failed";

/// Denial reasons, one per check (CamelCase, as conditions require).
pub mod reason {
    /// The key is of a type citadel does not certify (the API's well-known reason).
    pub const UNSUPPORTED_KEY_TYPE: &str = "UnsupportedKeyType";
    /// The stub PKCS#10 request is missing, malformed or badly signed.
    pub const INVALID_REQUEST: &str = "InvalidRequest";
    /// `unverifiedUserAnnotations` holds keys citadel does not recognise (it recognises none).
    pub const UNSUPPORTED_ANNOTATIONS: &str = "UnsupportedUserAnnotations";
    /// No pod of that name exists.
    pub const POD_NOT_FOUND: &str = "PodNotFound";
    /// The pod exists but with another UID (a different incarnation).
    pub const POD_UID_MISMATCH: &str = "PodUIDMismatch";
    /// The pod has finished (Succeeded or Failed) or is being deleted.
    pub const POD_TERMINATED: &str = "PodTerminated";
    /// The pod mounts no projected `podCertificate` volume for this signer, so its kubelet
    /// would never ask: the request comes from someone else.
    pub const NO_POD_CERTIFICATE_VOLUME: &str = "NoPodCertificateVolume";
    /// The pod is not bound to the request's node, or the node's UID differs.
    pub const NODE_MISMATCH: &str = "NodeMismatch";
    /// The pod runs under another service account, or the account's UID differs.
    pub const SERVICE_ACCOUNT_MISMATCH: &str = "ServiceAccountMismatch";
    /// The identity is on the deny list (`citadel revoke --identity`).
    pub const IDENTITY_DENIED: &str = "IdentityDenied";
    /// Issued reason.
    pub const ISSUED: &str = "Issued";
    /// The certificate could not be built, or the API server refused the issued status.
    pub const SIGNING_FAILED: &str = "SigningFailed";
}

/// What the signer decided for one request.
#[derive(Debug)]
pub enum Decision {
    Issue {
        chain: String,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
        begin_refresh_at: OffsetDateTime,
        serial: String,
    },
    Deny {
        reason: &'static str,
        message: String,
    },
    Fail {
        reason: &'static str,
        message: String,
    },
}

pub fn deny(reason: &'static str, message: impl Into<String>) -> Decision {
    Decision::Deny {
        reason,
        message: message.into(),
    }
}

/// The one mapping from the shared issue path's errors to a decision: a refusal the request
/// cannot outgrow is `Denied`, a certificate that could not be made is `Failed`, and what a
/// later attempt can get past (no signer, an expired one, the index or the audit log down) is
/// an `Err` the controller retries. `request` names the request in the log.
pub fn decision(e: IssueError, request: &str) -> Result<Decision, PodCertError> {
    match e {
        IssueError::Csr(CsrError::UnsupportedKey(why)) => Ok(deny(
            reason::UNSUPPORTED_KEY_TYPE,
            format!("{why}; citadel certifies ECDSA P-256 (preferred) or P-384, and RSA 3072 or 4096 keys"),
        )),
        IssueError::Csr(e) => Ok(deny(
            reason::INVALID_REQUEST,
            format!("stubPKCS10Request: {e}"),
        )),
        e @ IssueError::Ca(IssueFailure::Denied { .. }) => {
            Ok(deny(reason::IDENTITY_DENIED, e.to_string()))
        }
        // An HSM that is away or busy: retried like a missing signer, never Failed.
        e if e.key_unavailable() => Err(PodCertError(e.to_string())),
        IssueError::Ca(IssueFailure::Sign(e)) => {
            tracing::error!(request = %request, error = %e, "pod certificate signing failed");
            Ok(Decision::Fail {
                reason: reason::SIGNING_FAILED,
                message: "citadel could not build the certificate".into(),
            })
        }
        IssueError::TooShort { not_after, .. } => Ok(Decision::Fail {
            reason: reason::SIGNING_FAILED,
            message: format!(
                "the signing CA expires at {not_after}, too soon for the API's 1h minimum lifetime"
            ),
        }),
        // Not ready, expired signer, index unavailable, audit log unwritable: a later
        // attempt can succeed.
        e @ (IssueError::Ca(_)
        | IssueError::Unaudited
        | IssueError::AuthUnavailable(_)
        | IssueError::PodIndexStale { .. }
        | IssueError::PodIndexNotSynced) => Err(PodCertError(e.to_string())),
        // Not reachable from a vouched request with an exact lifetime and a parsed key;
        // refused rather than retried forever if it ever is.
        e @ (IssueError::Unauthenticated(_)
        | IssueError::ImpersonationRefused(_)
        | IssueError::Ttl(_)
        | IssueError::OtherIdentity { .. }) => Ok(deny(reason::INVALID_REQUEST, e.to_string())),
    }
}

/// Whether the request carries a terminal condition (Issued, Denied or Failed, status True).
pub fn is_decided(pcr: &PodCertificateRequest) -> bool {
    pcr.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| {
            cs.iter()
                .any(|c| [ISSUED, DENIED, FAILED].contains(&c.type_.as_str()) && c.status == "True")
        })
}

/// A random fraction in [-1, 1): spreads refreshes so pods started together do not renew
/// together.
pub fn jitter() -> f64 {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 4];
    if ring::rand::SystemRandom::new().fill(&mut b).is_err() {
        return 0.0;
    }
    (u32::from_be_bytes(b) as f64 / u32::MAX as f64) * 2.0 - 1.0
}

/// When the kubelet should start refreshing: half the lifetime, moved by up to 5% of it
/// (`jitter` in [-1, 1]), and within the API's bounds (10 minutes after notBefore, 10 minutes
/// before notAfter).
pub fn refresh_at(nb: OffsetDateTime, na: OffsetDateTime, jitter: f64) -> OffsetDateTime {
    let life = na - nb;
    let j = jitter.clamp(-1.0, 1.0) * 0.05;
    let at = nb + life * (0.5 + j);
    let (lo, hi) = (nb + REFRESH_MARGIN, na - REFRESH_MARGIN);
    // Whole seconds: the API serialises times to the second, and truncating could otherwise
    // move a time at a bound past it.
    let at = at.max(lo).min(hi);
    let secs = at.unix_timestamp();
    let t = OffsetDateTime::from_unix_timestamp(secs).unwrap_or(at);
    if t < lo {
        OffsetDateTime::from_unix_timestamp(secs + 1).unwrap_or(at)
    } else {
        t
    }
}

/// A certificate time as the API's `Time` (whole seconds, as certificate times are).
pub fn k8s_time(t: OffsetDateTime) -> Time {
    // Certificate times are whole seconds; nothing is lost.
    Time(k8s_openapi::jiff::Timestamp::from_second(t.unix_timestamp()).unwrap_or_default())
}

pub fn status(
    d: Decision,
    now: OffsetDateTime,
    generation: Option<i64>,
) -> PodCertificateRequestStatus {
    let cond = |type_: &str, reason: &str, message: String| Condition {
        type_: type_.into(),
        status: "True".into(),
        reason: reason.into(),
        message,
        last_transition_time: k8s_time(now),
        observed_generation: generation,
    };
    match d {
        Decision::Issue {
            chain,
            not_before,
            not_after,
            begin_refresh_at,
            ..
        } => PodCertificateRequestStatus {
            certificate_chain: Some(chain),
            not_before: Some(k8s_time(not_before)),
            not_after: Some(k8s_time(not_after)),
            begin_refresh_at: Some(k8s_time(begin_refresh_at)),
            conditions: Some(vec![cond(
                ISSUED,
                reason::ISSUED,
                "citadel issued a SPIFFE SVID".into(),
            )]),
        },
        Decision::Deny { reason, message } => PodCertificateRequestStatus {
            conditions: Some(vec![cond(DENIED, reason, message)]),
            ..Default::default()
        },
        Decision::Fail { reason, message } => PodCertificateRequestStatus {
            conditions: Some(vec![cond(FAILED, reason, message)]),
            ..Default::default()
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn refresh_is_near_half_life_and_within_the_api_bounds() {
        let nb = datetime!(2030-01-01 00:00 UTC);
        let na = nb + time::Duration::hours(24);
        assert_eq!(refresh_at(nb, na, 0.0), nb + time::Duration::hours(12));
        for j in [-1.0, -0.3, 0.7, 1.0, 5.0, f64::NAN] {
            let at = refresh_at(nb, na, if j.is_nan() { 0.0 } else { j });
            assert!(
                at >= nb + time::Duration::minutes(648) && at <= nb + time::Duration::minutes(792),
                "{at}"
            );
        }
        // The API's minimum lifetime: 1h, refresh in [10min, 50min].
        let na = nb + time::Duration::hours(1);
        for j in [-1.0, 0.0, 1.0] {
            let at = refresh_at(nb, na, j);
            assert!(
                at >= nb + REFRESH_MARGIN && at <= na - REFRESH_MARGIN,
                "{at}"
            );
        }
    }

    #[test]
    fn a_decision_is_one_true_condition() {
        let now = datetime!(2030-01-01 00:00 UTC);
        let s = status(deny(reason::UNSUPPORTED_KEY_TYPE, "no"), now, Some(1));
        let c = s.conditions.unwrap();
        assert_eq!(c.len(), 1);
        assert_eq!(
            (c[0].type_.as_str(), c[0].status.as_str()),
            (DENIED, "True")
        );
        assert!(s.certificate_chain.is_none() && s.not_before.is_none());
    }

    /// The shared path's refusals land on the conditions (and retries) they always had.
    #[test]
    fn issue_errors_map_to_conditions_or_retries() {
        let kind = |e: IssueError| match decision(e, "shop/x") {
            Ok(Decision::Deny { reason, .. }) => format!("Denied/{reason}"),
            Ok(Decision::Fail { reason, .. }) => format!("Failed/{reason}"),
            Ok(Decision::Issue { .. }) => "Issued".into(),
            Err(_) => "retry".into(),
        };
        let t = datetime!(2030-01-01 00:00 UTC);
        assert_eq!(
            kind(IssueError::Csr(CsrError::UnsupportedKey(
                "key is Ed448".into()
            ))),
            "Denied/UnsupportedKeyType"
        );
        assert_eq!(
            kind(IssueError::Csr(CsrError::Empty)),
            "Denied/InvalidRequest"
        );
        assert_eq!(
            kind(IssueError::Ca(IssueFailure::Denied {
                identity: "spiffe://td/x".into(),
                after_signing: false
            })),
            "Denied/IdentityDenied"
        );
        assert_eq!(
            kind(IssueError::Ca(IssueFailure::Sign(
                crate::ca::SignError::Expired(t)
            ))),
            "Failed/SigningFailed"
        );
        assert_eq!(
            kind(IssueError::TooShort {
                not_after: t,
                min: std::time::Duration::from_secs(3600)
            }),
            "Failed/SigningFailed"
        );
        assert_eq!(
            kind(IssueError::Ca(IssueFailure::Sign(
                crate::ca::SignError::Key(crate::pki::KeyError::Failed("refused".into()))
            ))),
            "Failed/SigningFailed"
        );
        for e in [
            IssueError::Ca(IssueFailure::Sign(crate::ca::SignError::Key(
                crate::pki::KeyError::Unavailable("token removed".into()),
            ))),
            IssueError::Ca(IssueFailure::NoSigner),
            IssueError::Ca(IssueFailure::Expired(t)),
            IssueError::Ca(IssueFailure::Index),
            IssueError::Unaudited,
        ] {
            assert_eq!(kind(e), "retry");
        }
    }
}
