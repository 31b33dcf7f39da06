//! Who may act as a SPIFFE broker, and for which pod: the rules of the Broker API
//! (`server::broker`), next to node impersonation's (`auth::node`), whose checks of the
//! caller's own pod and node they reuse ([`NodeAuthorizer::authorize_broker`] lives there).
//!
//! A broker is a node-local component (a CSI driver, a node proxy) that fetches SVIDs on
//! behalf of the workloads on its node. It proves two things on every call:
//!
//! 1. **Who it is**: its X.509-SVID as the TLS client certificate (the Broker Endpoint
//!    specification requires mTLS with X509-SVIDs), verified like any client certificate of
//!    this CA, whose SPIFFE ID must be listed in `--broker-ids` (exact IDs, a static policy
//!    as the specification recommends).
//! 2. **Where it runs**: its pod-bound projected service-account token (`authorization:
//!    Bearer`), for the same SPIFFE ID. An X.509-SVID names an identity, not a node, and a
//!    DaemonSet's brokers on every node share that identity, so the certificate alone cannot
//!    say which node a call comes from; the kubelet-projected token is bound to the pod
//!    (name and UID, and the node since Kubernetes 1.32) and the pod index says which node
//!    that pod is on: exactly what node impersonation already checks for ztunnel.
//!
//! The referenced workload is a pod by namespace and name (optionally its UID), resolved
//! through the same pod index: it must exist, not be Failed or Succeeded (the index holds no
//! such pods), carry the UID if one was given, and be on the broker's node. The SVID is for
//! the pod's service account, `spiffe://<td>/ns/<ns>/sa/<sa>`, marked node-issued like an
//! impersonated certificate. Why a reference fails (absent, elsewhere, UID mismatch) is
//! logged; the broker gets one answer for all ([`WORKLOAD_NOT_FOUND`]), so it cannot probe
//! which pods run on other nodes.
//!
//! [`NodeAuthorizer::authorize_broker`]: super::node::NodeAuthorizer::authorize_broker

use std::collections::BTreeSet;

use super::pods::PodIndex;
use crate::audit::shown;
use crate::identity::{ServiceAccount, SpiffeId, TrustDomain};

/// The one answer to a reference that does not resolve to a pod on the broker's node.
pub const WORKLOAD_NOT_FOUND: &str =
    "the referenced workload could not be identified on this broker's node";

/// The one answer to a broker whose own credentials do not hold (not listed, token and
/// certificate disagree, its pod cannot be tied to a node).
pub const BROKER_REFUSED: &str = "the caller is not an authorized broker";

/// The SPIFFE IDs allowed to use the Broker API (`--broker-ids`), exact matches.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BrokerIds(BTreeSet<String>);

impl BrokerIds {
    /// The IDs `entries` name. Each must be a SPIFFE ID of `trust_domain` naming a service
    /// account (`spiffe://<td>/ns/<ns>/sa/<sa>`): the broker's token is checked against it,
    /// and only service accounts have tokens.
    pub fn parse<S: AsRef<str>>(entries: &[S], trust_domain: &TrustDomain) -> Result<Self, String> {
        let mut set = BTreeSet::new();
        for e in entries {
            let e = e.as_ref().trim();
            if e.is_empty() {
                continue;
            }
            let bad = |why: &str| {
                format!(
                    "--broker-ids entry {}: {why}; expected the broker's SPIFFE ID, e.g. \
                     spiffe://{}/ns/spire/sa/broker",
                    shown(e),
                    trust_domain
                )
            };
            let id = SpiffeId::parse(e).map_err(|err| bad(&err.to_string()))?;
            if id.trust_domain() != trust_domain {
                return Err(bad(&format!("not in trust domain {trust_domain}")));
            }
            if id.service_account().is_none() {
                return Err(bad("not of the form spiffe://<td>/ns/<ns>/sa/<sa>"));
            }
            set.insert(id.to_string());
        }
        Ok(Self(set))
    }

    /// Whether nobody may broker (the default: the Broker API is not served).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `id` is listed.
    pub fn contains(&self, id: &SpiffeId) -> bool {
        self.0.contains(&id.to_string())
    }

    /// The listed IDs, sorted (for the startup log).
    pub fn names(&self) -> Vec<String> {
        self.0.iter().cloned().collect()
    }
}

/// A pod, as a Broker API reference names it (already decoded by the surface).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRef {
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// `metadata.uid`, when the reference carried one: the pod found must have it.
    pub uid: Option<String>,
}

impl std::fmt::Display for PodRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", shown(&self.namespace), shown(&self.name))
    }
}

/// Which check refused a broker call: logged as `check=<label>` (a fixed set, ready to be a
/// metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerRefusal {
    /// The certificate's SPIFFE ID is not in `--broker-ids`.
    NotListed,
    /// The token names another identity than the certificate.
    TokenMismatch,
    /// The broker's own pod could not be tied to a node (the token has no pod, the pod is
    /// gone or re-created, another account, not scheduled, another node, a remote cluster).
    NoNode,
    /// No pod of that namespace and name (or it is Failed or Succeeded).
    PodNotFound,
    /// The pod of that name has another UID than the reference.
    PodUidMismatch,
    /// The pod is on another node than the broker's (or not scheduled).
    PodNotOnNode,
    /// The pod runs as no service account, so it has no SPIFFE ID.
    PodNoIdentity,
}

impl BrokerRefusal {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            BrokerRefusal::NotListed => "not_listed",
            BrokerRefusal::TokenMismatch => "token_mismatch",
            BrokerRefusal::NoNode => "no_node",
            BrokerRefusal::PodNotFound => "pod_not_found",
            BrokerRefusal::PodUidMismatch => "pod_uid_mismatch",
            BrokerRefusal::PodNotOnNode => "pod_not_on_node",
            BrokerRefusal::PodNoIdentity => "pod_no_identity",
        }
    }

    /// Every reason, for rendering all metric series from the start.
    pub const ALL: [BrokerRefusal; 7] = [
        BrokerRefusal::NotListed,
        BrokerRefusal::TokenMismatch,
        BrokerRefusal::NoNode,
        BrokerRefusal::PodNotFound,
        BrokerRefusal::PodUidMismatch,
        BrokerRefusal::PodNotOnNode,
        BrokerRefusal::PodNoIdentity,
    ];

    /// Whether the reference (not the broker) is at fault: the workload could not be
    /// identified on the broker's node (the specification's NOT_FOUND).
    pub fn workload_not_found(self) -> bool {
        matches!(
            self,
            BrokerRefusal::PodNotFound
                | BrokerRefusal::PodUidMismatch
                | BrokerRefusal::PodNotOnNode
        )
    }
}

/// A refused broker call: the check, and details for the server log only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerDenied {
    /// The check that failed.
    pub reason: BrokerRefusal,
    /// What exactly did not hold (names pods and nodes: never sent to the caller).
    pub detail: String,
}

/// Why a broker call could not be judged or was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BrokerAuthError {
    /// The pod watch has not delivered its first complete list: retry.
    #[error("the pod index is not synced yet; retry shortly")]
    NotSynced,
    /// The pod watch has been broken for longer than the last known pods are trusted.
    #[error(
        "the pod index may be out of date (its watch has been broken for {}s, more than \
         --pod-index-max-staleness {}s); retry shortly",
        .broken_for.as_secs(),
        .max.as_secs()
    )]
    Stale {
        /// How long the watch has been broken.
        broken_for: std::time::Duration,
        /// `--pod-index-max-staleness`.
        max: std::time::Duration,
    },
    /// A check failed.
    #[error("{}", if .0.reason.workload_not_found() { WORKLOAD_NOT_FOUND } else if .0.reason == BrokerRefusal::PodNoIdentity { "the referenced workload has no identity (its pod runs as no service account)" } else { BROKER_REFUSED })]
    Denied(BrokerDenied),
}

/// A granted broker call: whose SVID, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerGrant {
    /// The broker (its certificate's SPIFFE ID, which its token matched).
    pub broker: SpiffeId,
    /// The node the broker and the pod are on.
    pub node: String,
    /// The pod, `<ns>/<name>`.
    pub pod: String,
    /// The identity the SVID carries: the pod's service account's SPIFFE ID.
    pub identity: SpiffeId,
}

/// The pod `target` names, if it is on `node` and has an identity in `trust_domain`.
/// The broker's own checks (listed, token, node) come first, in `auth::node`.
pub(super) fn resolve_pod(
    pods: &PodIndex,
    node: &str,
    target: &PodRef,
    trust_domain: &TrustDomain,
) -> Result<SpiffeId, BrokerDenied> {
    let deny = |reason, detail: String| BrokerDenied { reason, detail };
    let pod = pods.pod(&target.namespace, &target.name).ok_or_else(|| {
        deny(
            BrokerRefusal::PodNotFound,
            format!("pod {target} not found (or Failed/Succeeded)"),
        )
    })?;
    if let Some(uid) = &target.uid {
        if *pod.uid != **uid {
            return Err(deny(
                BrokerRefusal::PodUidMismatch,
                format!(
                    "pod {target} has UID {} but the reference names {}",
                    pod.uid,
                    shown(uid)
                ),
            ));
        }
    }
    if pod.node.as_deref() != Some(node) {
        return Err(deny(
            BrokerRefusal::PodNotOnNode,
            format!(
                "pod {target} is on {} but the broker is on {node}",
                pod.node.as_deref().unwrap_or("no node")
            ),
        ));
    }
    let sa = ServiceAccount::new(&target.namespace, &pod.service_account).map_err(|_| {
        deny(
            BrokerRefusal::PodNoIdentity,
            format!("pod {target} runs as no service account"),
        )
    })?;
    Ok(trust_domain.service_account_id(&sa))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn td() -> TrustDomain {
        TrustDomain::new("cluster.local").unwrap()
    }

    #[test]
    fn broker_ids_are_exact_service_account_ids_of_this_trust_domain() {
        let ids = BrokerIds::parse(
            &["spiffe://cluster.local/ns/spire/sa/broker", " ", ""],
            &td(),
        )
        .unwrap();
        assert_eq!(
            ids.names(),
            vec!["spiffe://cluster.local/ns/spire/sa/broker"]
        );
        assert!(
            ids.contains(&SpiffeId::parse("spiffe://cluster.local/ns/spire/sa/broker").unwrap())
        );
        assert!(
            !ids.contains(&SpiffeId::parse("spiffe://cluster.local/ns/spire/sa/other").unwrap())
        );
        for bad in [
            "spiffe://evil.example/ns/spire/sa/broker",
            "spiffe://cluster.local/broker",
            "spire/broker",
        ] {
            let e = BrokerIds::parse(&[bad], &td()).unwrap_err();
            assert!(e.contains("--broker-ids"), "{e}");
        }
        assert!(BrokerIds::parse::<&str>(&[], &td()).unwrap().is_empty());
    }

    #[test]
    fn a_reference_resolves_only_to_an_identified_pod_on_the_brokers_node() {
        use crate::auth::pods::tests::rec;
        let pods = PodIndex::default();
        pods.replace_all([
            rec("shop", "cart-1", "c1", "cart", Some("n1")),
            rec("shop", "pay-1", "p1", "pay", Some("n2")),
            rec("shop", "pending", "q1", "cart", None),
            rec("shop", "anon", "a1", "", Some("n1")),
        ]);
        let r = |ns: &str, name: &str, uid: Option<&str>| PodRef {
            namespace: ns.into(),
            name: name.into(),
            uid: uid.map(Into::into),
        };
        assert_eq!(
            resolve_pod(&pods, "n1", &r("shop", "cart-1", None), &td())
                .unwrap()
                .to_string(),
            "spiffe://cluster.local/ns/shop/sa/cart"
        );
        assert!(resolve_pod(&pods, "n1", &r("shop", "cart-1", Some("c1")), &td()).is_ok());
        let cases = [
            (
                r("shop", "cart-1", Some("other")),
                BrokerRefusal::PodUidMismatch,
            ),
            (r("shop", "pay-1", None), BrokerRefusal::PodNotOnNode),
            (r("shop", "pending", None), BrokerRefusal::PodNotOnNode),
            (r("shop", "ghost", None), BrokerRefusal::PodNotFound),
            (r("other", "cart-1", None), BrokerRefusal::PodNotFound),
            (r("shop", "anon", None), BrokerRefusal::PodNoIdentity),
        ];
        for (target, want) in cases {
            let got = resolve_pod(&pods, "n1", &target, &td()).unwrap_err();
            assert_eq!(got.reason, want, "{target}: {}", got.detail);
        }
    }

    #[test]
    fn refusals_about_the_reference_all_read_the_same() {
        let msg = |reason| {
            BrokerAuthError::Denied(BrokerDenied {
                reason,
                detail: "pod shop/pay-1 is on n2".into(),
            })
            .to_string()
        };
        for r in [
            BrokerRefusal::PodNotFound,
            BrokerRefusal::PodUidMismatch,
            BrokerRefusal::PodNotOnNode,
        ] {
            assert_eq!(msg(r), WORKLOAD_NOT_FOUND);
        }
        for r in [
            BrokerRefusal::NotListed,
            BrokerRefusal::TokenMismatch,
            BrokerRefusal::NoNode,
        ] {
            assert_eq!(msg(r), BROKER_REFUSED);
        }
        assert!(!msg(BrokerRefusal::PodNoIdentity).contains("n2"));
    }
}
