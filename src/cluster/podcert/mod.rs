//! citadel as a signer for Kubernetes Pod Certificates (KEP-4317, `certificates.k8s.io/v1`
//! `PodCertificateRequest`): the kubelet asks for a certificate for one of its pods and mounts
//! it through a projected `podCertificate` volume; this controller issues the pod's SPIFFE
//! SVID `spiffe://<td>/ns/<ns>/sa/<sa>`, or denies the request with a reason.
//!
//! Only the leader signs: the controller runs under [`super::controller::while_leading`], so a
//! new leader lists every request again and picks up the undecided ones. Each request is
//! decided at most once: a decided request (an `Issued`, `Denied` or `Failed` condition) is
//! never touched, and the decision is written in ONE `/status` update carrying the
//! resourceVersion that was read. If that update conflicts, someone else wrote first; the
//! request is read again and left alone if it is decided. A crash between signing and that
//! write leaves a certificate nobody received (it is in the issuance index and the audit log,
//! so it stays revocable), never two certificates in a status. kube-runtime's `Controller`
//! is the bounded worker pool (`--pod-cert-workers` reconciles at once, one per request).
//!
//! What is checked, since the kubelet is trusted only for its own node (NodeRestriction
//! checks much of this at admission, but a request created by anyone else is not): the pod
//! exists with the request's UID, on the request's node, under the request's service
//! account, and mounts a projected `podCertificate` volume for our signer; the service
//! account and node exist with the request's UIDs; the key (from the stub PKCS#10 request,
//! whose signature the API server verified at admission and we verify again) is one we sign;
//! no `unverifiedUserAnnotations` (we recognise none); the identity is not denied
//! (`citadel revoke --identity`).
//!
//! What is NOT checked, because it cannot be: who created the request. Every fact above is
//! readable by whoever creates a request, and the object records no creator (its
//! managedFields name a field manager the client chooses, not the user). Only admission knows
//! the requester, so deploy/podcertificate-policy.yaml admits requests for our signer only
//! from `system:node:<spec.nodeName>` (group `system:nodes`); docs/kubernetes.md says what
//! each part (citadel, the policy, NodeRestriction) stops.
//!
//! Memory: the leader holds only *undecided* requests, slimmed to what deciding needs, and at
//! most `--pod-cert-max-pending` of them (the shared `cluster::pending::Pending`); a decided request leaves memory as
//! soon as its decision is seen, and requests that did not fit are listed again once half of
//! the room is free (`citadel_pod_cert_*` metrics, [`PendingStats`]).
//!
//! The parts, one concern each: `request` decodes a request and checks it against the live
//! objects; `status` is the ONE mapping from a decision (or the shared issue path's
//! [`IssueError`](crate::auth::issue_path::IssueError)) to the request's conditions
//! (`status::decision`); `pending` says what the shared bounded cache
//! (`cluster::pending`) keeps of a request; `controller` watches, decides through the shared issue path
//! (`auth::issue_path`) and writes `/status`.

mod controller;
mod error;
mod pending;
mod request;
mod status;

pub use crate::cluster::pending::PendingStats;
pub use controller::PodCertSigner;
pub use error::PodCertError;
#[cfg(test)]
pub use pending::pending_test_request;
pub use pending::STATS_NAMES;
pub use request::{lifetime_secs, mounts_pod_certificate};
pub use status::{is_decided, k8s_time, reason, refresh_at};

/// The signer name citadel answers to by default. A signer name is `<domain>/<path>`;
/// operators who own another domain pick a name under it with `--pod-cert-signer-name`.
pub const DEFAULT_SIGNER_NAME: &str = "citadel.dev/spiffe";

/// The API's lower bound on a pod certificate's lifetime (`maxExpirationSeconds` minimum, and
/// the shortest leaf the API server accepts in status).
pub const MIN_LIFETIME_SECS: u64 = 3600;
/// `maxExpirationSeconds` when the request leaves it unset (the API's default).
pub const DEFAULT_MAX_EXPIRATION_SECS: u64 = 86_400;

/// `--pod-cert-max-pending` by default: undecided requests held in memory at most. A slimmed
/// request is about 1 KiB (at most ~12 KiB: the API caps the stub request at 10 KiB), so this
/// is a few MiB, while a healthy leader decides hundreds a second and rarely holds more than
/// a few dozen.
pub const DEFAULT_MAX_PENDING: usize = 4096;

/// How the signer is configured (`serve --pod-cert-signer-name`, `--pod-cert-workers`,
/// `--pod-cert-max-pending`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodCertConfig {
    /// The `signerName` this signer answers to.
    pub signer_name: String,
    /// Requests decided at once (kube-runtime controller concurrency).
    pub workers: u16,
    /// Undecided requests held in memory at most; the rest wait in the API server.
    pub max_pending: usize,
}

impl Default for PodCertConfig {
    fn default() -> Self {
        Self {
            signer_name: DEFAULT_SIGNER_NAME.into(),
            workers: 32,
            max_pending: DEFAULT_MAX_PENDING,
        }
    }
}

impl PodCertConfig {
    /// Refuses a signer name the API server would refuse, or one reserved for Kubernetes.
    pub fn validate(&self) -> Result<(), String> {
        validate_signer_name(&self.signer_name)?;
        if self.workers == 0 {
            return Err("--pod-cert-workers must be at least 1".into());
        }
        if self.max_pending == 0 {
            return Err("--pod-cert-max-pending must be at least 1".into());
        }
        Ok(())
    }
}

/// Whether the API server serves what the signer needs: `certificates.k8s.io/v1`
/// PodCertificateRequests (with their status) and ClusterTrustBundles (Kubernetes 1.37; the
/// v1beta1 forms of 1.34-1.36 are off by default there and not used). `Err` when discovery
/// itself failed.
pub async fn served(client: &kube::Client) -> Result<bool, String> {
    match client
        .list_api_group_resources("certificates.k8s.io/v1")
        .await
    {
        Ok(list) => {
            let has = |n: &str| list.resources.iter().any(|r| r.name == n);
            Ok(has("podcertificaterequests")
                && has("podcertificaterequests/status")
                && has("clustertrustbundles"))
        }
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(false),
        Err(e) => Err(format!("API discovery of certificates.k8s.io/v1: {e}")),
    }
}

/// A signer name is `<DNS subdomain>/<path>`; names under kubernetes.io and k8s.io are
/// reserved for the Kubernetes project. The ClusterTrustBundle name derived from it must stay
/// a valid object name.
pub fn validate_signer_name(name: &str) -> Result<(), String> {
    check_signer_name("--pod-cert-signer-name", name)
}

/// The same rules for any flag that takes a signer name (`--csr-signer` too), naming `flag`
/// in the refusal.
pub fn check_signer_name(flag: &str, name: &str) -> Result<(), String> {
    let bad = |why: &str| Err(format!("{flag} {name:?}: {why}"));
    let Some((domain, path)) = name.split_once('/') else {
        return bad("must be <domain>/<path>, e.g. example.com/spiffe");
    };
    if path.is_empty() || path.contains('/') {
        return bad("the path after the domain must be one non-empty segment");
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if !domain.contains('.') || !domain.split('.').all(label_ok) {
        return bad("the domain must be a lowercase DNS name with a dot");
    }
    if !path
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-.".contains(&b))
    {
        return bad("the path may hold lowercase letters, digits, '-' and '.'");
    }
    if domain == "kubernetes.io"
        || domain.ends_with(".kubernetes.io")
        || domain == "k8s.io"
        || domain.ends_with(".k8s.io")
    {
        return bad("kubernetes.io and k8s.io signer names are reserved for Kubernetes");
    }
    if super::trustbundle::bundle_name(name).len() > 253 {
        return bad("too long for a ClusterTrustBundle name");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signer_names() {
        for ok in [
            DEFAULT_SIGNER_NAME,
            "example.com/spiffe",
            "mesh.corp.example/pod-svid.v1",
        ] {
            validate_signer_name(ok).unwrap();
        }
        for bad in [
            "spiffe",
            "example.com/",
            "example.com/a/b",
            "Example.com/x",
            "localhost/x",
            "kubernetes.io/x",
            "foo.k8s.io/x",
            "example.com/UPPER",
        ] {
            assert!(validate_signer_name(bad).is_err(), "{bad}");
        }
    }
}
