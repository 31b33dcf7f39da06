//! Decoding a PodCertificateRequest and checking it against the live objects: what the
//! request may have, in the order the checks run (cheap ones first, no API call for a request
//! refused anyway), ending in what the shared issue path needs ([`Checked`]) or a denial.

use std::time::Duration;

use k8s_openapi::api::certificates::v1::PodCertificateRequest;
use k8s_openapi::api::core::v1::{Node, Pod, ServiceAccount};
use kube::api::Api;

use super::error::PodCertError;
use super::status::{self, deny, reason, Decision};
use super::{DEFAULT_MAX_EXPIRATION_SECS, MIN_LIFETIME_SECS};
use crate::auth::issue_path::IssueError;
use crate::identity::{self, SpiffeId, TrustDomain};
use crate::pki::csr::{self, SubjectKey};
use crate::pki::profile;

/// A request that passed every check: what the issue path signs.
#[derive(Debug)]
pub struct Checked {
    /// The key from the stub PKCS#10 request.
    pub key: SubjectKey,
    /// The pod's SVID: `spiffe://<td>/ns/<ns>/sa/<sa>`.
    pub identity: SpiffeId,
    /// The TTL to sign with (the lifetime less the backdate).
    pub ttl: Duration,
    /// `<ns>/<name>`, for the audit line.
    pub request: String,
}

/// What the signer needs to check a request.
#[derive(Clone, Copy)]
pub struct Checks<'a> {
    /// Reads the pod, service account and node.
    pub client: &'a kube::Client,
    /// The signer name a pod's `podCertificate` volume must name.
    pub signer_name: &'a str,
    /// The trust domain of the SVID.
    pub trust_domain: &'a TrustDomain,
    /// `--max-ttl`.
    pub max_ttl: Duration,
}

/// Checks `pcr` and the live objects it names: `Ok(Ok)` to sign, `Ok(Err)` a decision (a
/// denial), `Err` when the objects could not be read now (retried).
pub async fn check(
    c: Checks<'_>,
    pcr: &PodCertificateRequest,
) -> Result<Result<Checked, Decision>, PodCertError> {
    let spec = &pcr.spec;
    let Some(ns) = pcr.metadata.namespace.as_deref() else {
        return Ok(Err(deny(
            reason::INVALID_REQUEST,
            "the request has no namespace",
        )));
    };
    if let Some(a) = spec
        .unverified_user_annotations
        .as_ref()
        .filter(|a| !a.is_empty())
    {
        let keys: Vec<&str> = a.keys().take(5).map(String::as_str).collect();
        return Ok(Err(deny(
            reason::UNSUPPORTED_ANNOTATIONS,
            format!("citadel recognises no unverifiedUserAnnotations; got {keys:?}"),
        )));
    }
    // The key first: no API call for a request we would refuse anyway. Its refusal is worded
    // by the surface's one mapping, as the issue path's CSR errors are.
    let key = match csr::parse_der(&spec.stub_pkc_s10_request.0) {
        Ok(parsed) => parsed.key,
        Err(e) => return status::decision(IssueError::Csr(e), "").map(Err),
    };
    if let Some(d) = check_live_objects(c.client, c.signer_name, ns, pcr).await? {
        return Ok(Err(d));
    }
    let sa = match identity::ServiceAccount::new(ns, &spec.service_account_name) {
        Ok(sa) => sa,
        Err(e) => return Ok(Err(deny(reason::INVALID_REQUEST, e.to_string()))),
    };
    let identity = c.trust_domain.service_account_id(&sa);

    let max_exp = spec
        .max_expiration_seconds
        .map_or(DEFAULT_MAX_EXPIRATION_SECS, |s| s.max(0) as u64);
    if max_exp < MIN_LIFETIME_SECS {
        return Ok(Err(deny(
            reason::INVALID_REQUEST,
            format!(
                "maxExpirationSeconds {max_exp} is below the API minimum of {MIN_LIFETIME_SECS}"
            ),
        )));
    }
    let lifetime = lifetime_secs(max_exp, c.max_ttl);
    // notBefore is backdated; the leaf's whole span (notAfter - notBefore) is what the API
    // compares with maxExpirationSeconds, so the backdate comes out of the lifetime.
    let backdate = profile::BACKDATE.whole_seconds().unsigned_abs();
    Ok(Ok(Checked {
        key,
        identity,
        ttl: Duration::from_secs(lifetime.saturating_sub(backdate)),
        request: format!("{ns}/{}", pcr.metadata.name.as_deref().unwrap_or("")),
    }))
}

async fn check_live_objects(
    client: &kube::Client,
    signer_name: &str,
    ns: &str,
    pcr: &PodCertificateRequest,
) -> Result<Option<Decision>, PodCertError> {
    let spec = &pcr.spec;
    let api_err = |what: &str, e: kube::Error| PodCertError(format!("reading {what}: {e}"));
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
    let nodes: Api<Node> = Api::all(client.clone());
    // Three independent reads, at once: one round trip of latency instead of three.
    let (pod, sa, node) = tokio::join!(
        pods.get_opt(&spec.pod_name),
        sas.get_opt(&spec.service_account_name),
        nodes.get_opt(&spec.node_name),
    );
    let pod = pod.map_err(|e| api_err("the pod", e))?;
    let sa = sa.map_err(|e| api_err("the service account", e))?;
    let node = node.map_err(|e| api_err("the node", e))?;
    let Some(pod) = pod else {
        return Ok(Some(deny(
            reason::POD_NOT_FOUND,
            format!("pod {ns}/{} does not exist", spec.pod_name),
        )));
    };
    if pod.metadata.uid.as_deref() != Some(spec.pod_uid.as_str()) {
        return Ok(Some(deny(
            reason::POD_UID_MISMATCH,
            format!(
                "pod {ns}/{} has another UID than the request's {:?}",
                spec.pod_name, spec.pod_uid
            ),
        )));
    }
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if pod.metadata.deletion_timestamp.is_some() || matches!(phase, Some("Succeeded" | "Failed")) {
        return Ok(Some(deny(
            reason::POD_TERMINATED,
            format!(
                "pod {ns}/{} has terminated or is being deleted",
                spec.pod_name
            ),
        )));
    }
    if !mounts_pod_certificate(&pod, signer_name) {
        return Ok(Some(deny(
            reason::NO_POD_CERTIFICATE_VOLUME,
            format!(
                "pod {ns}/{} mounts no projected podCertificate volume for signer {:?}, so its kubelet would not ask for one",
                spec.pod_name, signer_name
            ),
        )));
    }
    let pod_spec = pod.spec.as_ref();
    let pod_node = pod_spec.and_then(|s| s.node_name.as_deref());
    if pod_node != Some(spec.node_name.as_str()) {
        return Ok(Some(deny(
            reason::NODE_MISMATCH,
            format!(
                "pod {ns}/{} is not bound to node {:?}",
                spec.pod_name, spec.node_name
            ),
        )));
    }
    let pod_sa = pod_spec
        .and_then(|s| s.service_account_name.as_deref())
        .unwrap_or("default");
    if pod_sa != spec.service_account_name {
        return Ok(Some(deny(
            reason::SERVICE_ACCOUNT_MISMATCH,
            format!(
                "pod {ns}/{} runs as service account {pod_sa:?}, not {:?}",
                spec.pod_name, spec.service_account_name
            ),
        )));
    }
    if sa.as_ref().and_then(|s| s.metadata.uid.as_deref())
        != Some(spec.service_account_uid.as_str())
    {
        return Ok(Some(deny(
            reason::SERVICE_ACCOUNT_MISMATCH,
            format!(
                "service account {ns}/{} does not exist with UID {:?}",
                spec.service_account_name, spec.service_account_uid
            ),
        )));
    }
    if node.as_ref().and_then(|n| n.metadata.uid.as_deref()) != Some(spec.node_uid.as_str()) {
        return Ok(Some(deny(
            reason::NODE_MISMATCH,
            format!(
                "node {:?} does not exist with UID {:?}",
                spec.node_name, spec.node_uid
            ),
        )));
    }
    Ok(None)
}

/// Whether `pod` mounts a projected `podCertificate` volume source for `signer`: what the
/// kubelet acts on (and what NodeRestriction requires of a node's request). A request for a
/// pod without one did not come from the pod's kubelet.
pub fn mounts_pod_certificate(pod: &Pod, signer: &str) -> bool {
    pod.spec
        .iter()
        .flat_map(|s| s.volumes.iter().flatten())
        .filter_map(|v| v.projected.as_ref())
        .flat_map(|p| p.sources.iter().flatten())
        .filter_map(|src| src.pod_certificate.as_ref())
        .any(|pc| pc.signer_name == signer)
}

/// The leaf's whole lifetime in seconds: what the request allows, capped by `--max-ttl`, but
/// never under the API's one hour (the request's own maximum is at least that).
pub fn lifetime_secs(max_expiration_secs: u64, max_ttl: Duration) -> u64 {
    max_expiration_secs
        .min(max_ttl.as_secs())
        .max(MIN_LIFETIME_SECS)
        .min(max_expiration_secs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::podcert::DEFAULT_SIGNER_NAME;

    #[test]
    fn lifetime_is_the_request_capped_by_max_ttl_but_never_under_an_hour() {
        let h = |n: u64| Duration::from_secs(n * 3600);
        assert_eq!(lifetime_secs(86_400, h(90 * 24)), 86_400);
        assert_eq!(lifetime_secs(3600, h(90 * 24)), 3600);
        assert_eq!(lifetime_secs(7_200, h(1)), 3600);
        assert_eq!(lifetime_secs(86_400, Duration::from_secs(60)), 3600);
        assert_eq!(lifetime_secs(7_862_400, h(24)), 86_400);
    }

    #[test]
    fn only_a_pod_certificate_volume_for_our_signer_counts() {
        let pod = |sources: serde_json::Value| -> Pod {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "web"},
                "spec": {"containers": [], "volumes": [
                    {"name": "empty", "emptyDir": {}},
                    {"name": "v", "projected": {"sources": sources}}]}
            }))
            .unwrap()
        };
        let pc = |signer: &str| serde_json::json!({"podCertificate": {"signerName": signer, "keyType": "ECDSAP256", "credentialBundlePath": "c.pem"}});
        let ctb = serde_json::json!({"clusterTrustBundle": {"signerName": DEFAULT_SIGNER_NAME, "path": "roots.pem"}});
        assert!(mounts_pod_certificate(
            &pod(serde_json::json!([ctb.clone(), pc(DEFAULT_SIGNER_NAME)])),
            DEFAULT_SIGNER_NAME
        ));
        assert!(!mounts_pod_certificate(
            &pod(serde_json::json!([ctb, pc("example.com/other")])),
            DEFAULT_SIGNER_NAME
        ));
        assert!(!mounts_pod_certificate(
            &pod(serde_json::json!([])),
            DEFAULT_SIGNER_NAME
        ));
        assert!(!mounts_pod_certificate(
            &Pod::default(),
            DEFAULT_SIGNER_NAME
        ));
    }
}
