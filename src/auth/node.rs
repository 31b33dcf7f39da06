//! Node impersonation (ambient mode): a node proxy such as ztunnel, authenticated with its
//! own service-account token, asks for the certificate of a workload on its node by naming it
//! in the `ImpersonatedIdentity` metadata. istiod's rules (`CA_TRUSTED_NODE_ACCOUNTS`,
//! security/pkg/server/ca/node_auth.go), plus a trust-domain check istiod leaves out:
//!
//! 1. the caller authenticated with a service-account token (a client certificate carries no
//!    pod, so nothing ties it to a node), and its service account is listed;
//! 2. the requested identity is `spiffe://<this trust domain>/ns/<ns>/sa/<sa>`;
//! 3. the caller's pod exists with the name and UID its token carries, runs under the
//!    caller's service account, and is scheduled on a node;
//! 4. a pod of the requested service account is on that node and is neither Failed nor
//!    Succeeded.
//!
//! Pods come from one watch kept in memory ([`PodIndex`] in `auth::pods`, filled by `cluster::pods`), never
//! from an API call per request, so a flood of impersonation requests costs the API server
//! nothing. The index keeps only name, UID, service account and node per pod.
//!
//! The index is trusted only while it is known to be current: when its watch breaks (the API
//! server is down or unreachable) the last known pods keep serving for at most
//! [`DEFAULT_MAX_STALENESS`] (`--pod-index-max-staleness`), so a short API server restart
//! costs ambient workloads nothing; past that, requests are refused with Unavailable
//! (retryable) until a complete relist has replaced the index. Otherwise a pod deleted or
//! moved during an outage would keep vouching for its node for as long as the outage lasts.
//!
//! Every refusal names its [`Refusal`] reason for the server log and the metrics; the caller
//! only ever gets one vague message (istiod's choice: an attacker learns nothing about which
//! check failed, e.g. whether a pod exists on some node).

use std::collections::HashSet;
use std::fmt;
use std::time::Duration;

use super::broker::{
    self, BrokerAuthError, BrokerDenied, BrokerGrant, BrokerIds, BrokerRefusal, PodRef,
};
use super::cluster::RemoteClusters;
use super::pods::PodIndex;
use super::{AuthMethod, Caller};
use crate::audit::shown;
use crate::identity::{ServiceAccount, SpiffeId, TrustDomain};

/// How long the last known pods are trusted after the pod watch broke
/// (`--pod-index-max-staleness`).
pub const DEFAULT_MAX_STALENESS: Duration = Duration::from_secs(60);

/// The service accounts allowed to impersonate (`--trusted-node-accounts`,
/// `CA_TRUSTED_NODE_ACCOUNTS`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedNodeAccounts(HashSet<ServiceAccount>);

impl TrustedNodeAccounts {
    /// The accounts `entries` name, each `<namespace>/<service account>`. Unlike istiod,
    /// which logs and skips a malformed entry, a malformed entry is an error: a typo would
    /// otherwise silently break every ambient workload's certificate.
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<Self, String> {
        let mut set = HashSet::new();
        for e in entries {
            let e = e.as_ref().trim();
            if e.is_empty() {
                continue;
            }
            set.insert(parse_account(e)?);
        }
        Ok(Self(set))
    }

    /// Whether no account may impersonate (the default: impersonation is refused).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `sa` is listed.
    pub fn contains(&self, sa: &ServiceAccount) -> bool {
        self.0.contains(sa)
    }

    /// The listed accounts as `ns/sa`, sorted (for the startup log).
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .0
            .iter()
            .map(|s| format!("{}/{}", s.namespace, s.name))
            .collect();
        v.sort();
        v
    }
}

/// One `--trusted-node-accounts` entry, `<namespace>/<service account>`.
pub fn parse_account(entry: &str) -> Result<ServiceAccount, String> {
    let bad = |why: &str| {
        format!(
            "--trusted-node-accounts / CA_TRUSTED_NODE_ACCOUNTS entry {:?}: {why}; expected \
             NAMESPACE/SERVICE_ACCOUNT, e.g. istio-system/ztunnel",
            entry.chars().take(200).collect::<String>()
        )
    };
    let (ns, sa) = entry
        .split_once('/')
        .ok_or_else(|| bad("no '/' between namespace and service account"))?;
    ServiceAccount::new(ns, sa).map_err(|e| bad(&e.to_string()))
}

/// Which check refused an impersonation: logged, and the `reason` label of
/// `citadel_impersonation_refusals` (a fixed set, so the label's cardinality is bounded).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `--trusted-node-accounts` is empty: impersonation is off.
    Disabled,
    /// The caller authenticated with a client certificate, which names no pod.
    NotTokenAuthenticated,
    /// The caller's service account is not listed.
    UntrustedAccount,
    /// The requested identity is not a SPIFFE ID, or not of the form `ns/<ns>/sa/<sa>`.
    MalformedIdentity,
    /// The requested identity is in another trust domain.
    ForeignTrustDomain,
    /// The caller's token carries no pod name or UID (not a pod-bound token).
    NoPodInToken,
    /// No (running) pod has the name the caller's token carries.
    CallerPodNotFound,
    /// The pod of that name has another UID (deleted and re-created).
    CallerPodUidMismatch,
    /// The pod runs under another service account than the caller's.
    CallerPodAccountMismatch,
    /// The caller's pod is not scheduled, or its token names another node.
    CallerNodeUnknown,
    /// No pod of the requested service account (that is not Failed or Succeeded) is on the
    /// caller's node.
    NotOnNode,
    /// The caller's token came from a remote cluster (`clusterid`) that has no pod index
    /// here (removed meanwhile, or impersonation was not configured when it was loaded):
    /// this cluster's pods cannot vouch for a remote node.
    RemoteCluster,
}

impl Refusal {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Disabled => "disabled",
            Refusal::NotTokenAuthenticated => "not_token_authenticated",
            Refusal::UntrustedAccount => "untrusted_account",
            Refusal::MalformedIdentity => "malformed_identity",
            Refusal::ForeignTrustDomain => "foreign_trust_domain",
            Refusal::NoPodInToken => "no_pod_in_token",
            Refusal::CallerPodNotFound => "caller_pod_not_found",
            Refusal::CallerPodUidMismatch => "caller_pod_uid_mismatch",
            Refusal::CallerPodAccountMismatch => "caller_pod_account_mismatch",
            Refusal::CallerNodeUnknown => "caller_node_unknown",
            Refusal::NotOnNode => "not_on_node",
            Refusal::RemoteCluster => "remote_cluster",
        }
    }

    /// Every reason, for rendering all metric series from the start.
    pub const ALL: [Refusal; 12] = [
        Refusal::Disabled,
        Refusal::NotTokenAuthenticated,
        Refusal::UntrustedAccount,
        Refusal::MalformedIdentity,
        Refusal::ForeignTrustDomain,
        Refusal::NoPodInToken,
        Refusal::CallerPodNotFound,
        Refusal::CallerPodUidMismatch,
        Refusal::CallerPodAccountMismatch,
        Refusal::CallerNodeUnknown,
        Refusal::NotOnNode,
        Refusal::RemoteCluster,
    ];
}

/// A refused impersonation: the check, and details for the server log only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denied {
    /// The check that failed.
    pub reason: Refusal,
    /// What exactly did not hold (names pods and nodes: never sent to the caller).
    pub detail: String,
}

impl fmt::Display for Denied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.reason.label(), self.detail)
    }
}

/// Why an impersonation could not be judged or was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeAuthError {
    /// The pod watch has not delivered its first complete list: retry (Unavailable).
    NotSynced,
    /// The pod watch has been broken for longer than the authorizer trusts the last known
    /// pods: retry (Unavailable).
    Stale {
        /// How long the watch has been broken.
        broken_for: Duration,
        /// The bound (`--pod-index-max-staleness`).
        max: Duration,
    },
    /// A check failed (PermissionDenied, with one vague message).
    Denied(Denied),
}

/// A granted impersonation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Impersonation {
    /// The identity the certificate carries.
    pub identity: SpiffeId,
    /// The node both pods are on.
    pub node: String,
    /// The caller's service account, `ns/sa` (the label of the issuance metric).
    pub node_account: String,
}

/// Judges impersonation requests against the trusted accounts and the pod index.
pub struct NodeAuthorizer {
    trusted: TrustedNodeAccounts,
    trust_domain: TrustDomain,
    pods: std::sync::Arc<PodIndex>,
    /// Remote clusters (`--multicluster`), each with its own pod index: a caller vouched for
    /// by a remote cluster is checked against that cluster's pods only.
    remotes: Option<std::sync::Arc<RemoteClusters>>,
    /// How long after its watch broke an index is still trusted.
    max_staleness: Duration,
    /// Who may use the Broker API (`--broker-ids`); empty: nobody.
    brokers: BrokerIds,
}

impl NodeAuthorizer {
    /// An authorizer for `trusted` accounts over `pods`, issuing in `trust_domain`.
    pub fn new(
        trusted: TrustedNodeAccounts,
        trust_domain: TrustDomain,
        pods: std::sync::Arc<PodIndex>,
    ) -> Self {
        Self {
            trusted,
            trust_domain,
            pods,
            remotes: None,
            max_staleness: DEFAULT_MAX_STALENESS,
            brokers: BrokerIds::default(),
        }
    }

    /// Also judges Broker API calls of these brokers (`--broker-ids`), against the same pods.
    pub fn with_brokers(mut self, brokers: BrokerIds) -> Self {
        self.brokers = brokers;
        self
    }

    /// Whether `id` is in `--broker-ids` (checked again by [`NodeAuthorizer::authorize_broker`];
    /// a surface asks first to refuse an unlisted broker before reading anything else).
    pub fn is_broker(&self, id: &SpiffeId) -> bool {
        self.brokers.contains(id)
    }

    /// Whether any broker is allowed (the CA port serves the Broker API only then).
    pub fn brokers_enabled(&self) -> bool {
        !self.brokers.is_empty()
    }

    /// Trusts an index whose watch broke for `max` at most (`--pod-index-max-staleness`).
    pub fn with_max_staleness(mut self, max: Duration) -> Self {
        self.max_staleness = max;
        self
    }

    /// Also judges callers of these remote clusters, each against its own pod index.
    pub fn with_remotes(mut self, remotes: std::sync::Arc<RemoteClusters>) -> Self {
        self.remotes = Some(remotes);
        self
    }

    /// The index this authorizer reads (for metrics).
    pub fn pods(&self) -> &std::sync::Arc<PodIndex> {
        &self.pods
    }

    /// Whether `caller` may get a certificate for `requested`; istiod's checks in its order
    /// (account, identity, caller pod, node), the cheap ones first.
    pub fn authorize(
        &self,
        caller: &Caller,
        requested: &str,
    ) -> Result<Impersonation, NodeAuthError> {
        let deny = |reason, detail: String| NodeAuthError::Denied(Denied { reason, detail });
        if self.trusted.is_empty() {
            return Err(deny(
                Refusal::Disabled,
                "no --trusted-node-accounts are configured".into(),
            ));
        }
        if caller.method == AuthMethod::ClientCert {
            return Err(deny(
                Refusal::NotTokenAuthenticated,
                format!(
                    "{} authenticated with a client certificate, which names no pod",
                    caller.identity
                ),
            ));
        }
        // The pods of the cluster that vouched for the token: a remote caller's pod and node
        // are checked in its own cluster, never in this one.
        let remote_pods;
        let pods: &PodIndex = match &caller.cluster {
            None => &self.pods,
            Some(cluster) => match self
                .remotes
                .as_ref()
                .and_then(|r| r.get(cluster))
                .and_then(|c| c.pods.clone())
            {
                Some(p) => {
                    remote_pods = p;
                    &remote_pods
                }
                None => {
                    return Err(deny(
                        Refusal::RemoteCluster,
                        format!(
                            "{} authenticated through remote cluster {}, which has no pod \
                             index here",
                            caller.identity,
                            shown(cluster)
                        ),
                    ));
                }
            },
        };
        let caller_sa = caller
            .identity
            .service_account()
            .filter(|sa| self.trusted.contains(sa))
            .ok_or_else(|| {
                deny(
                    Refusal::UntrustedAccount,
                    format!("{} is not a trusted node account", caller.identity),
                )
            })?;
        let shown = shown(requested);
        let identity = SpiffeId::parse(requested).map_err(|_| {
            deny(
                Refusal::MalformedIdentity,
                format!("requested identity {shown} is not a SPIFFE ID"),
            )
        })?;
        if identity.trust_domain() != &self.trust_domain {
            return Err(deny(
                Refusal::ForeignTrustDomain,
                format!(
                    "requested {shown} is not in trust domain {}",
                    self.trust_domain
                ),
            ));
        }
        let target = identity.service_account().ok_or_else(|| {
            deny(
                Refusal::MalformedIdentity,
                format!("requested {shown} is not of the form ns/<ns>/sa/<sa>"),
            )
        })?;
        self.current(pods)?;
        let node = caller_node(pods, caller, &caller_sa).map_err(NodeAuthError::Denied)?;
        let node = node.as_str();
        if !pods.runs_on(node, &target) {
            return Err(deny(
                Refusal::NotOnNode,
                format!(
                    "no pod of {}/{} is on node {node}",
                    target.namespace, target.name
                ),
            ));
        }
        Ok(Impersonation {
            identity,
            node: node.to_string(),
            node_account: format!("{}/{}", caller_sa.namespace, caller_sa.name),
        })
    }

    /// Refuses to judge on an index that never listed, or whose watch has been broken
    /// longer than `--pod-index-max-staleness`.
    fn current(&self, pods: &PodIndex) -> Result<(), NodeAuthError> {
        if !pods.is_synced() {
            return Err(NodeAuthError::NotSynced);
        }
        if let Some(broken_for) = pods.stale_for().filter(|d| *d > self.max_staleness) {
            return Err(NodeAuthError::Stale {
                broken_for,
                max: self.max_staleness,
            });
        }
        Ok(())
    }

    /// Whether the broker `cert` (its X.509-SVID) with `token` (its pod-bound token) may get
    /// `target`'s SVID: `cert` is listed in `--broker-ids`, `token` names the same identity,
    /// the token's pod is tied to a node exactly as an impersonating caller's is (the same
    /// checks, [`caller_node`]), and `target` is an identified pod on that node
    /// (`auth::broker`). Only this cluster's pods: a token vouched for by a remote cluster
    /// is refused.
    pub fn authorize_broker(
        &self,
        cert: &Caller,
        token: &Caller,
        target: &PodRef,
    ) -> Result<BrokerGrant, BrokerAuthError> {
        let deny =
            |reason, detail: String| BrokerAuthError::Denied(BrokerDenied { reason, detail });
        if !self.brokers.contains(&cert.identity) {
            return Err(deny(
                BrokerRefusal::NotListed,
                format!("{} is not in --broker-ids", cert.identity),
            ));
        }
        if token.identity != cert.identity {
            return Err(deny(
                BrokerRefusal::TokenMismatch,
                format!(
                    "the certificate is {} but the token is {}",
                    cert.identity, token.identity
                ),
            ));
        }
        if token.method == AuthMethod::ClientCert || token.cluster.is_some() {
            return Err(deny(
                BrokerRefusal::NoNode,
                format!(
                    "{} sent no token of this cluster's (a pod-bound token is needed to tie it \
                     to its node)",
                    cert.identity
                ),
            ));
        }
        let sa = cert.identity.service_account().ok_or_else(|| {
            deny(
                BrokerRefusal::NotListed,
                format!("{} names no service account", cert.identity),
            )
        })?;
        self.current(&self.pods).map_err(|e| match e {
            NodeAuthError::NotSynced => BrokerAuthError::NotSynced,
            NodeAuthError::Stale { broken_for, max } => BrokerAuthError::Stale { broken_for, max },
            NodeAuthError::Denied(d) => deny(BrokerRefusal::NoNode, d.detail),
        })?;
        let node = caller_node(&self.pods, token, &sa).map_err(|d| {
            deny(
                BrokerRefusal::NoNode,
                format!("{}: {}", d.reason.label(), d.detail),
            )
        })?;
        let identity = broker::resolve_pod(&self.pods, &node, target, &self.trust_domain)
            .map_err(BrokerAuthError::Denied)?;
        Ok(BrokerGrant {
            broker: cert.identity.clone(),
            node,
            pod: format!("{}/{}", target.namespace, target.name),
            identity,
        })
    }
}

/// The node `caller`'s pod runs on, checked as istiod checks a node proxy: the token carries
/// a pod name and UID, that pod exists in `pods` with that UID, runs as `caller_sa`, is
/// scheduled, and is on the node the token names (when it names one). Shared by node
/// impersonation and the Broker API.
fn caller_node(
    pods: &PodIndex,
    caller: &Caller,
    caller_sa: &ServiceAccount,
) -> Result<String, Denied> {
    let deny = |reason, detail: String| Denied { reason, detail };
    let (Some(pod_name), Some(pod_uid)) = (&caller.pod_name, &caller.pod_uid) else {
        return Err(deny(
            Refusal::NoPodInToken,
            format!(
                "the token of {} is not bound to a pod (no pod name and UID)",
                caller.identity
            ),
        ));
    };
    let ns = &caller_sa.namespace;
    let pod = pods.pod(ns, pod_name).ok_or_else(|| {
        deny(
            Refusal::CallerPodNotFound,
            format!("caller pod {ns}/{pod_name} not found (or Failed/Succeeded)"),
        )
    })?;
    if *pod.uid != **pod_uid {
        // A pod re-created under the same name while the caller still holds the old
        // pod's token; istiod notes this is eventually consistent, the client retries.
        return Err(deny(
            Refusal::CallerPodUidMismatch,
            format!(
                "caller pod {ns}/{pod_name} has UID {} but the token names {pod_uid}",
                pod.uid
            ),
        ));
    }
    if *pod.service_account != *caller_sa.name {
        return Err(deny(
            Refusal::CallerPodAccountMismatch,
            format!(
                "caller pod {ns}/{pod_name} runs as {} but the token is {}",
                pod.service_account, caller_sa.name
            ),
        ));
    }
    let Some(node) = pod.node.as_deref() else {
        return Err(deny(
            Refusal::CallerNodeUnknown,
            format!("caller pod {ns}/{pod_name} is not scheduled on a node"),
        ));
    };
    if let Some(claimed) = caller.node_name.as_deref() {
        if claimed != node {
            return Err(deny(
                Refusal::CallerNodeUnknown,
                format!("caller pod {ns}/{pod_name} is on {node} but its token names {claimed}"),
            ));
        }
    }
    Ok(node.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::pods::tests::rec;
    use std::sync::Arc;

    fn td() -> TrustDomain {
        TrustDomain::new("cluster.local").unwrap()
    }

    fn ztunnel(method: AuthMethod, pod: Option<(&str, &str)>) -> Caller {
        Caller {
            identity: td()
                .service_account_id(&ServiceAccount::new("istio-system", "ztunnel").unwrap()),
            method,
            pod_name: pod.map(|p| p.0.to_string()),
            pod_uid: pod.map(|p| p.1.to_string()),
            node_name: None,
            cluster: None,
        }
    }

    fn setup() -> NodeAuthorizer {
        let pods = Arc::new(PodIndex::default());
        pods.replace_all([
            rec("istio-system", "zt-1", "u1", "ztunnel", Some("n1")),
            rec("istio-system", "zt-2", "u2", "ztunnel", Some("n2")),
            rec("istio-system", "zt-pending", "u3", "ztunnel", None),
            rec("istio-system", "other", "u4", "other", Some("n1")),
            rec("shop", "cart-1", "c1", "cart", Some("n1")),
            rec("shop", "pay-1", "p1", "pay", Some("n2")),
        ]);
        NodeAuthorizer::new(
            TrustedNodeAccounts::parse(&["istio-system/ztunnel"]).unwrap(),
            td(),
            pods,
        )
    }

    fn refusal(r: Result<Impersonation, NodeAuthError>) -> Refusal {
        match r {
            Err(NodeAuthError::Denied(d)) => d.reason,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn grants_only_what_runs_on_the_callers_node() {
        let a = setup();
        let c = ztunnel(AuthMethod::TokenReview, Some(("zt-1", "u1")));
        let ok = a
            .authorize(&c, "spiffe://cluster.local/ns/shop/sa/cart")
            .unwrap();
        assert_eq!(
            ok.identity.to_string(),
            "spiffe://cluster.local/ns/shop/sa/cart"
        );
        assert_eq!(ok.node, "n1");
        assert_eq!(ok.node_account, "istio-system/ztunnel");
        let cases: Vec<(Caller, &str, Refusal)> = vec![
            (
                c.clone(),
                "spiffe://cluster.local/ns/shop/sa/pay",
                Refusal::NotOnNode,
            ),
            (
                c.clone(),
                "spiffe://evil.example/ns/shop/sa/cart",
                Refusal::ForeignTrustDomain,
            ),
            (
                c.clone(),
                "spiffe://cluster.local/ns/shop",
                Refusal::MalformedIdentity,
            ),
            (c.clone(), "not a spiffe id", Refusal::MalformedIdentity),
            (
                c.clone(),
                "spiffe://cluster.local/ns/shop/sa/cart/x",
                Refusal::MalformedIdentity,
            ),
            (
                ztunnel(AuthMethod::ClientCert, Some(("zt-1", "u1"))),
                "spiffe://cluster.local/ns/shop/sa/cart",
                Refusal::NotTokenAuthenticated,
            ),
            // The same pod name and UID, vouched for by a remote cluster: its pods are not
            // in this index, so nothing here may grant it.
            (
                Caller {
                    cluster: Some("cluster-b".into()),
                    ..c.clone()
                },
                "spiffe://cluster.local/ns/shop/sa/cart",
                Refusal::RemoteCluster,
            ),
            (
                ztunnel(AuthMethod::Jwt, None),
                "spiffe://cluster.local/ns/shop/sa/cart",
                Refusal::NoPodInToken,
            ),
            (
                ztunnel(AuthMethod::Jwt, Some(("zt-9", "u9"))),
                "spiffe://cluster.local/ns/shop/sa/cart",
                Refusal::CallerPodNotFound,
            ),
            (
                ztunnel(AuthMethod::Jwt, Some(("zt-1", "u2"))),
                "spiffe://cluster.local/ns/shop/sa/cart",
                Refusal::CallerPodUidMismatch,
            ),
            (
                ztunnel(AuthMethod::Jwt, Some(("other", "u4"))),
                "spiffe://cluster.local/ns/shop/sa/cart",
                Refusal::CallerPodAccountMismatch,
            ),
            (
                ztunnel(AuthMethod::Jwt, Some(("zt-pending", "u3"))),
                "spiffe://cluster.local/ns/shop/sa/cart",
                Refusal::CallerNodeUnknown,
            ),
            (
                Caller {
                    node_name: Some("n2".into()),
                    ..c.clone()
                },
                "spiffe://cluster.local/ns/shop/sa/cart",
                Refusal::CallerNodeUnknown,
            ),
            (
                Caller {
                    identity: td()
                        .service_account_id(&ServiceAccount::new("shop", "cart").unwrap()),
                    ..c.clone()
                },
                "spiffe://cluster.local/ns/shop/sa/cart",
                Refusal::UntrustedAccount,
            ),
        ];
        for (caller, req, want) in cases {
            assert_eq!(
                refusal(a.authorize(&caller, req)),
                want,
                "{req} by {caller:?}"
            );
        }
        // The details never leave the server, but they name the check.
        let Err(NodeAuthError::Denied(d)) =
            a.authorize(&c, "spiffe://cluster.local/ns/shop/sa/pay")
        else {
            panic!()
        };
        assert!(d.to_string().contains("n1"), "{d}");
    }

    #[test]
    fn disabled_and_unsynced() {
        let a = NodeAuthorizer::new(TrustedNodeAccounts::default(), td(), Arc::default());
        let c = ztunnel(AuthMethod::TokenReview, Some(("zt-1", "u1")));
        assert_eq!(
            refusal(a.authorize(&c, "spiffe://cluster.local/ns/shop/sa/cart")),
            Refusal::Disabled
        );
        let a = NodeAuthorizer::new(
            TrustedNodeAccounts::parse(&["istio-system/ztunnel"]).unwrap(),
            td(),
            Arc::default(),
        );
        assert_eq!(
            a.authorize(&c, "spiffe://cluster.local/ns/shop/sa/cart"),
            Err(NodeAuthError::NotSynced)
        );
    }

    /// The watch breaks: the last known pods serve for the bound, then every impersonation
    /// is Unavailable (not judged on pods that may be gone) until a complete relist.
    #[test]
    fn a_stale_index_is_trusted_only_for_a_bounded_time() {
        let clock = Arc::new(crate::clock::ManualClock::new(crate::clock::system().now()));
        let pods = Arc::new(PodIndex::new(clock.clone()));
        pods.replace_all([
            rec("istio-system", "zt-1", "u1", "ztunnel", Some("n1")),
            rec("shop", "cart-1", "c1", "cart", Some("n1")),
        ]);
        let a = NodeAuthorizer::new(
            TrustedNodeAccounts::parse(&["istio-system/ztunnel"]).unwrap(),
            td(),
            pods.clone(),
        )
        .with_max_staleness(Duration::from_secs(60));
        let c = ztunnel(AuthMethod::TokenReview, Some(("zt-1", "u1")));
        let cart = "spiffe://cluster.local/ns/shop/sa/cart";
        assert!(a.authorize(&c, cart).is_ok());
        assert_eq!(pods.stale_for(), None);

        pods.watch_failed();
        clock.advance(time::Duration::seconds(30));
        pods.watch_failed(); // a retry failing again does not restart the count
        assert_eq!(pods.stale_for(), Some(Duration::from_secs(30)));
        assert!(a.authorize(&c, cart).is_ok(), "within the bound");
        clock.advance(time::Duration::seconds(31));
        assert_eq!(
            a.authorize(&c, cart),
            Err(NodeAuthError::Stale {
                broken_for: Duration::from_secs(61),
                max: Duration::from_secs(60)
            })
        );
        // Refusals that need no pods still come first (and stay PermissionDenied).
        assert_eq!(
            refusal(a.authorize(&c, "spiffe://evil.example/ns/shop/sa/cart")),
            Refusal::ForeignTrustDomain
        );
        // A complete relist makes it current again, with what it found.
        pods.replace_all([rec("istio-system", "zt-1", "u1", "ztunnel", Some("n1"))]);
        assert_eq!(pods.stale_for(), None);
        assert_eq!(refusal(a.authorize(&c, cart)), Refusal::NotOnNode);
    }

    /// A pod that names no service account is nobody's: not `default`'s, and a caller pod
    /// without one matches no token.
    #[test]
    fn a_pod_without_a_service_account_vouches_for_nobody() {
        let pods = Arc::new(PodIndex::default());
        pods.replace_all([
            rec("istio-system", "zt-1", "u1", "ztunnel", Some("n1")),
            rec("shop", "anon-1", "a1", "", Some("n1")),
            rec("istio-system", "zt-anon", "u2", "", Some("n1")),
        ]);
        assert!(!pods.runs_on("n1", &ServiceAccount::new("shop", "default").unwrap()));
        let a = NodeAuthorizer::new(
            TrustedNodeAccounts::parse(&["istio-system/ztunnel", "istio-system/default"]).unwrap(),
            td(),
            pods.clone(),
        );
        let c = ztunnel(AuthMethod::TokenReview, Some(("zt-1", "u1")));
        assert_eq!(
            refusal(a.authorize(&c, "spiffe://cluster.local/ns/shop/sa/default")),
            Refusal::NotOnNode
        );
        let anon = Caller {
            identity: td()
                .service_account_id(&ServiceAccount::new("istio-system", "default").unwrap()),
            pod_name: Some("zt-anon".into()),
            pod_uid: Some("u2".into()),
            ..c
        };
        assert_eq!(
            refusal(a.authorize(&anon, "spiffe://cluster.local/ns/istio-system/sa/ztunnel")),
            Refusal::CallerPodAccountMismatch
        );
        pods.delete("shop", "anon-1");
        pods.delete("istio-system", "zt-anon");
        assert_eq!(pods.len(), 1);
    }

    #[test]
    fn trusted_accounts_parse_strictly() {
        let t =
            TrustedNodeAccounts::parse(&["istio-system/ztunnel", " kube-system/node-proxy ", ""])
                .unwrap();
        assert_eq!(
            t.names(),
            vec!["istio-system/ztunnel", "kube-system/node-proxy"]
        );
        for bad in [
            "ztunnel",
            "istio-system/",
            "/ztunnel",
            "Istio/ztunnel",
            "a/b/c",
        ] {
            let e = TrustedNodeAccounts::parse(&[bad]).unwrap_err();
            assert!(e.contains("NAMESPACE/SERVICE_ACCOUNT"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_broker_gets_only_pods_on_the_node_its_token_ties_it_to() {
        let pods = Arc::new(PodIndex::default());
        let a = NodeAuthorizer::new(TrustedNodeAccounts::default(), td(), pods.clone())
            .with_brokers(
                BrokerIds::parse(&["spiffe://cluster.local/ns/spire/sa/broker"], &td()).unwrap(),
            );
        let broker_id = SpiffeId::parse("spiffe://cluster.local/ns/spire/sa/broker").unwrap();
        let cert = Caller {
            identity: broker_id.clone(),
            method: AuthMethod::ClientCert,
            pod_name: None,
            pod_uid: None,
            node_name: None,
            cluster: None,
        };
        let token = Caller {
            method: AuthMethod::TokenReview,
            pod_name: Some("broker-1".into()),
            pod_uid: Some("b1".into()),
            ..cert.clone()
        };
        let cart = PodRef {
            namespace: "shop".into(),
            name: "cart-1".into(),
            uid: None,
        };
        assert_eq!(
            a.authorize_broker(&cert, &token, &cart),
            Err(BrokerAuthError::NotSynced)
        );
        pods.replace_all([
            rec("spire", "broker-1", "b1", "broker", Some("n1")),
            rec("shop", "cart-1", "c1", "cart", Some("n1")),
            rec("shop", "pay-1", "p1", "pay", Some("n2")),
        ]);
        let g = a.authorize_broker(&cert, &token, &cart).unwrap();
        assert_eq!(
            g.identity.to_string(),
            "spiffe://cluster.local/ns/shop/sa/cart"
        );
        assert_eq!((g.node.as_str(), g.pod.as_str()), ("n1", "shop/cart-1"));
        assert_eq!(g.broker, broker_id);
        // Brokers do not make impersonation possible: --trusted-node-accounts is empty.
        assert!(matches!(
            a.authorize(&token, "spiffe://cluster.local/ns/shop/sa/cart"),
            Err(NodeAuthError::Denied(Denied {
                reason: Refusal::Disabled,
                ..
            }))
        ));
        let other = Caller {
            identity: SpiffeId::parse("spiffe://cluster.local/ns/spire/sa/other").unwrap(),
            ..cert.clone()
        };
        let pay = PodRef {
            name: "pay-1".into(),
            ..cart.clone()
        };
        let cases: Vec<(&str, Caller, Caller, PodRef, BrokerRefusal)> = vec![
            (
                "unlisted",
                other.clone(),
                Caller {
                    identity: other.identity.clone(),
                    ..token.clone()
                },
                cart.clone(),
                BrokerRefusal::NotListed,
            ),
            (
                "another's token",
                cert.clone(),
                Caller {
                    identity: other.identity.clone(),
                    ..token.clone()
                },
                cart.clone(),
                BrokerRefusal::TokenMismatch,
            ),
            (
                "no token",
                cert.clone(),
                cert.clone(),
                cart.clone(),
                BrokerRefusal::NoNode,
            ),
            (
                "re-created pod",
                cert.clone(),
                Caller {
                    pod_uid: Some("old".into()),
                    ..token.clone()
                },
                cart.clone(),
                BrokerRefusal::NoNode,
            ),
            (
                "token names another node",
                cert.clone(),
                Caller {
                    node_name: Some("n2".into()),
                    ..token.clone()
                },
                cart.clone(),
                BrokerRefusal::NoNode,
            ),
            (
                "remote cluster",
                cert.clone(),
                Caller {
                    cluster: Some("b".into()),
                    ..token.clone()
                },
                cart.clone(),
                BrokerRefusal::NoNode,
            ),
            (
                "pod elsewhere",
                cert.clone(),
                token.clone(),
                pay,
                BrokerRefusal::PodNotOnNode,
            ),
        ];
        for (name, c, t, target, want) in cases {
            match a.authorize_broker(&c, &t, &target) {
                Err(BrokerAuthError::Denied(d)) => {
                    assert_eq!(d.reason, want, "{name}: {}", d.detail)
                }
                other => panic!("{name}: {other:?}"),
            }
        }
    }
}
