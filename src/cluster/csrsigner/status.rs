//! The Kubernetes CSR signer's wire: a decision is ONE `/status` write, either
//! `status.certificate` or a `Failed` condition (status True) with a reason. [`refusal`] is
//! this surface's one mapping from the shared issue path's errors to `Failed` (or to a retry);
//! [`issued`] and [`failed`] render a decision as the object written.

use k8s_openapi::api::certificates::v1::{
    CertificateSigningRequest, CertificateSigningRequestCondition,
};
use k8s_openapi::ByteString;
use time::OffsetDateTime;

use crate::auth::issue_path::IssueError;
use crate::ca::issue::IssueFailure;
use crate::cluster::pending::{Pendable, StatsNames};
use crate::cluster::podcert::k8s_time;
use crate::pki::csr::CsrError;

/// Condition types the API defines; we write only `Failed`.
pub(super) const APPROVED: &str = "Approved";
pub(super) const DENIED: &str = "Denied";
pub(super) const FAILED: &str = "Failed";

/// `Failed` reasons, one per check (CamelCase, as conditions require), and the one Event
/// reason of an issued certificate.
pub mod reason {
    /// `spec.usages` asks for something our leaf profile does not carry.
    pub const UNSUPPORTED_USAGE: &str = "UnsupportedUsage";
    /// `spec.expirationSeconds` below the API's 600 s.
    pub const INVALID_EXPIRATION: &str = "InvalidExpiration";
    /// The PEM request is missing, malformed or badly signed, or its names are not one URI.
    pub const INVALID_REQUEST: &str = "InvalidRequest";
    /// The key is of a type citadel does not certify.
    pub const UNSUPPORTED_KEY_TYPE: &str = "UnsupportedKeyType";
    /// The URI SAN is no SPIFFE ID of our trust domain.
    pub const INVALID_IDENTITY: &str = "InvalidIdentity";
    /// The requester may not ask for that identity.
    pub const REQUESTER_NOT_ALLOWED: &str = "RequesterNotAllowed";
    /// The identity is on the deny list (`citadel revoke --identity`).
    pub const IDENTITY_DENIED: &str = "IdentityDenied";
    /// The certificate could not be built, or the API server refused it.
    pub const SIGNING_FAILED: &str = "SigningFailed";
    /// Event reason of an issued certificate.
    pub const ISSUED: &str = "Issued";
    /// Approval reason of `--csr-auto-approve`.
    pub const AUTO_APPROVED: &str = "AutoApproved";
}

/// Why a CSR gets a `Failed` condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// One of [`reason`].
    pub reason: &'static str,
    /// For the requester: what is wrong, never key material.
    pub message: String,
}

/// A refusal with `reason`.
pub fn refuse(reason: &'static str, message: impl Into<String>) -> Refusal {
    Refusal {
        reason,
        message: message.into(),
    }
}

/// A pass that could not decide now (API server unreachable, CA not ready, not leading); the
/// controller retries it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Retry(pub String);

/// The one mapping from the shared issue path's errors to a decision: a refusal the CSR cannot
/// outgrow is `Failed` with a reason; what a later attempt can get past (no signer yet, an
/// expired one, the index or the audit log down) is a [`Retry`]. `request` names the CSR in
/// the log.
pub fn refusal(e: IssueError, request: &str) -> Result<Refusal, Retry> {
    match e {
        IssueError::Csr(CsrError::UnsupportedKey(why)) => Ok(refuse(
            reason::UNSUPPORTED_KEY_TYPE,
            format!("{why}; citadel certifies ECDSA P-256 or P-384 and RSA 2048-8192 keys"),
        )),
        IssueError::Csr(e) => Ok(refuse(
            reason::INVALID_REQUEST,
            format!("spec.request: {e}"),
        )),
        e @ IssueError::Ca(IssueFailure::Denied { .. }) => {
            Ok(refuse(reason::IDENTITY_DENIED, e.to_string()))
        }
        e @ IssueError::OtherIdentity { .. } => {
            Ok(refuse(reason::REQUESTER_NOT_ALLOWED, e.to_string()))
        }
        // An HSM that is away or busy: retried like a missing signer, never Failed.
        e if e.key_unavailable() => Err(Retry(e.to_string())),
        IssueError::Ca(IssueFailure::Sign(e)) => {
            tracing::error!(request = %request, error = %e, "CSR signing failed");
            Ok(refuse(
                reason::SIGNING_FAILED,
                "citadel could not build the certificate",
            ))
        }
        IssueError::TooShort { not_after, .. } => Ok(refuse(
            reason::SIGNING_FAILED,
            format!("the signing CA expires at {not_after}, too soon for a 10 minute certificate"),
        )),
        // The TTL was clamped to the maximum before; an error here is the policy refusing.
        e @ IssueError::Ttl(_) => Ok(refuse(reason::INVALID_EXPIRATION, e.to_string())),
        // Not ready, expired signer, index unavailable, audit log unwritable: a later attempt
        // can succeed.
        e @ (IssueError::Ca(_)
        | IssueError::Unaudited
        | IssueError::AuthUnavailable(_)
        | IssueError::PodIndexStale { .. }
        | IssueError::PodIndexNotSynced) => Err(Retry(e.to_string())),
        // Not reachable from a vouched request; refused rather than retried forever.
        e @ (IssueError::Unauthenticated(_) | IssueError::ImpersonationRefused(_)) => {
            Ok(refuse(reason::REQUESTER_NOT_ALLOWED, e.to_string()))
        }
    }
}

fn has_condition(csr: &CertificateSigningRequest, type_: &str) -> bool {
    csr.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == type_ && c.status == "True"))
}

pub(super) fn approved(csr: &CertificateSigningRequest) -> bool {
    has_condition(csr, APPROVED)
}

pub(super) fn denied(csr: &CertificateSigningRequest) -> bool {
    has_condition(csr, DENIED)
}

/// Whether the CSR needs nothing more from a signer: it has a certificate, or is Denied or
/// Failed.
pub fn is_decided(csr: &CertificateSigningRequest) -> bool {
    csr.status
        .as_ref()
        .and_then(|s| s.certificate.as_ref())
        .is_some_and(|c| !c.0.is_empty())
        || denied(csr)
        || has_condition(csr, FAILED)
}

/// `csr` with one more condition (status True) of `type_`.
fn with_condition(
    csr: &CertificateSigningRequest,
    type_: &str,
    reason: &str,
    message: String,
    now: OffsetDateTime,
) -> CertificateSigningRequest {
    let mut obj = csr.clone();
    obj.status
        .get_or_insert_default()
        .conditions
        .get_or_insert_default()
        .push(CertificateSigningRequestCondition {
            type_: type_.into(),
            status: "True".into(),
            reason: Some(reason.into()),
            message: Some(message),
            last_update_time: Some(k8s_time(now)),
            last_transition_time: Some(k8s_time(now)),
        });
    obj
}

/// `csr` with `chain` as its certificate: what the `/status` write sends.
pub fn issued(csr: &CertificateSigningRequest, chain: &str) -> CertificateSigningRequest {
    let mut obj = csr.clone();
    obj.status.get_or_insert_default().certificate = Some(ByteString(chain.as_bytes().to_vec()));
    obj
}

/// `csr` with a `Failed` condition added: what the `/status` write sends.
pub fn failed(
    csr: &CertificateSigningRequest,
    r: &Refusal,
    now: OffsetDateTime,
) -> CertificateSigningRequest {
    with_condition(csr, FAILED, r.reason, r.message.clone(), now)
}

/// `csr` with an `Approved` condition added: what the `/approval` write sends.
pub fn approval(
    csr: &CertificateSigningRequest,
    requester: &str,
    now: OffsetDateTime,
) -> CertificateSigningRequest {
    let why =
        format!("approved by citadel: the requester {requester:?} is listed in --csr-auto-approve");
    with_condition(csr, APPROVED, reason::AUTO_APPROVED, why, now)
}

/// The names of the CSR signer's cache metrics (`citadel_csr_*`) and its flag.
pub const STATS_NAMES: StatsNames = StatsNames {
    prefix: "citadel_csr",
    noun: "CertificateSigningRequests",
    flag: "--csr-max-pending",
};

impl Pendable for CertificateSigningRequest {
    fn is_decided(&self) -> bool {
        is_decided(self)
    }

    /// What deciding and the one `/status` write need: the spec (the PEM request is at most
    /// what the API server accepts) and the status. Labels, annotations, owner references and
    /// managedFields go; a status write cannot change them anyway.
    fn slim(mut self) -> Self {
        crate::cluster::pending::slim_meta(&mut self.metadata);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn csr(conditions: &[(&str, &str)], cert: Option<&str>) -> CertificateSigningRequest {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "csr-workload-x", "annotations": {"a": "b"}},
            "spec": {"signerName": "citadel.dev/spiffe", "request": "", "usages": ["client auth"]},
            "status": {
                "conditions": conditions.iter().map(|(t, s)| serde_json::json!({"type": t, "status": s})).collect::<Vec<_>>(),
                "certificate": cert.map(|c| { use base64::Engine; base64::engine::general_purpose::STANDARD.encode(c.as_bytes()) }),
            }
        }))
        .unwrap()
    }

    #[test]
    fn decided_means_a_certificate_a_denial_or_a_failure() {
        assert!(!is_decided(&csr(&[], None)));
        assert!(!is_decided(&csr(&[("Approved", "True")], None)));
        assert!(is_decided(&csr(&[("Approved", "True")], Some("x"))));
        assert!(is_decided(&csr(&[("Denied", "True")], None)));
        assert!(is_decided(&csr(
            &[("Approved", "True"), ("Failed", "True")],
            None
        )));
        assert!(!is_decided(&csr(&[("Failed", "False")], None)));
        assert!(approved(&csr(&[("Approved", "True")], None)));
        assert!(!approved(&csr(&[("Approved", "False")], None)));
    }

    #[test]
    fn a_failure_adds_one_failed_condition_and_keeps_the_approval() {
        let now = datetime!(2030-01-01 00:00 UTC);
        let c = csr(&[("Approved", "True")], None);
        let f = failed(&c, &refuse(reason::REQUESTER_NOT_ALLOWED, "no"), now);
        let cs = f.status.as_ref().unwrap().conditions.as_ref().unwrap();
        assert_eq!(cs.len(), 2);
        assert_eq!(
            (
                cs[1].type_.as_str(),
                cs[1].status.as_str(),
                cs[1].reason.as_deref()
            ),
            ("Failed", "True", Some("RequesterNotAllowed"))
        );
        assert!(is_decided(&f));
        let i = issued(&c, "PEM");
        assert_eq!(i.status.unwrap().certificate.unwrap().0, b"PEM");
        let a = approval(&csr(&[], None), "system:serviceaccount:ns:sa", now);
        assert!(approved(&a) && !is_decided(&a));
        assert!(c.slim().metadata.annotations.is_none());
    }

    /// The shared path's refusals land on the reasons (and retries) this wire gives them.
    #[test]
    fn issue_errors_map_to_failed_reasons_or_retries() {
        let kind = |e: IssueError| match refusal(e, "csr-x") {
            Ok(r) => format!("Failed/{}", r.reason),
            Err(_) => "retry".into(),
        };
        let t = datetime!(2030-01-01 00:00 UTC);
        assert_eq!(
            kind(IssueError::Csr(CsrError::UnsupportedKey("Ed448".into()))),
            "Failed/UnsupportedKeyType"
        );
        assert_eq!(
            kind(IssueError::Csr(CsrError::BadSignature)),
            "Failed/InvalidRequest"
        );
        assert_eq!(
            kind(IssueError::Ca(IssueFailure::Denied {
                identity: "spiffe://td/x".into(),
                after_signing: true
            })),
            "Failed/IdentityDenied"
        );
        assert_eq!(
            kind(IssueError::OtherIdentity {
                asked: "\"spiffe://td/a\"".into(),
                identity: "spiffe://td/b".into()
            }),
            "Failed/RequesterNotAllowed"
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
                min: std::time::Duration::from_secs(600)
            }),
            "Failed/SigningFailed"
        );
        for e in [
            // An HSM that is away: retried, never a permanent Failed.
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
