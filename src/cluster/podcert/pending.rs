//! What the shared bounded cache ([`crate::cluster::pending`]) needs to know of a
//! PodCertificateRequest: when it is decided, and what of it the store keeps.

use k8s_openapi::api::certificates::v1::PodCertificateRequest;

use super::status::is_decided;
use crate::cluster::pending::{Pendable, StatsNames};

/// The names of the Pod Certificates cache's metrics (`citadel_pod_cert_*`) and its flag.
pub const STATS_NAMES: StatsNames = StatsNames {
    prefix: "citadel_pod_cert",
    noun: "PodCertificateRequests",
    flag: "--pod-cert-max-pending",
};

impl Pendable for PodCertificateRequest {
    fn is_decided(&self) -> bool {
        is_decided(self)
    }

    /// What deciding and the one `/status` write need. Labels, annotations, owner references
    /// and managedFields go (a status write cannot change them anyway: the API server keeps
    /// the stored metadata and spec), and of `unverifiedUserAnnotations` (up to 256 KiB) only
    /// the names the denial message shows.
    fn slim(mut self) -> Self {
        crate::cluster::pending::slim_meta(&mut self.metadata);
        if let Some(a) = self.spec.unverified_user_annotations.as_mut() {
            *a = a
                .keys()
                .take(5)
                .map(|k| (k.clone(), String::new()))
                .collect();
        }
        self
    }
}

/// An undecided (or, with `decided`, a denied) request carrying bulk the store drops; for the
/// cache's tests.
#[cfg(test)]
pub fn pending_test_request(name: &str, decided: bool) -> PodCertificateRequest {
    use super::status::{deny, reason, status};
    use super::DEFAULT_SIGNER_NAME;
    use time::macros::datetime;
    let mut p: PodCertificateRequest = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "namespace": "shop",
                     "annotations": {"big": "x".repeat(10_000)},
                     "managedFields": [{"manager": "kubelet", "operation": "Update"}]},
        "spec": {"signerName": DEFAULT_SIGNER_NAME, "podName": "web", "podUID": "u",
                 "serviceAccountName": "cart", "serviceAccountUID": "s",
                 "nodeName": "node-a", "nodeUID": "n", "stubPKCS10Request": ""},
    }))
    .unwrap();
    if decided {
        p.status = Some(status(
            deny(reason::POD_NOT_FOUND, "no"),
            datetime!(2030-01-01 00:00 UTC),
            None,
        ));
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_store_keeps_a_slim_request() {
        let mut p = pending_test_request("a", false);
        p.spec.unverified_user_annotations = Some(
            (0..7)
                .map(|i| (format!("example.com/k{i}"), "v".repeat(1000)))
                .collect(),
        );
        let s = p.slim();
        assert!(s.metadata.annotations.is_none() && s.metadata.managed_fields.is_none());
        let a = s.spec.unverified_user_annotations.unwrap();
        assert_eq!(a.len(), 5, "still non-empty: the request is still denied");
        assert!(a.values().all(String::is_empty));
        assert_eq!(s.spec.pod_name, "web");
    }
}
