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
//! Pods come from one watch kept in memory ([`PodIndex`], filled by `cluster::pods`), never
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

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::RwLock;
use std::time::Duration;

use super::{AuthMethod, Caller};
use crate::audit::shown;
use crate::clock::SharedClock;
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

/// What the index keeps of one pod: about 100 bytes of strings plus map overhead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRecord {
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// `metadata.uid`.
    pub uid: String,
    /// `spec.serviceAccountName`; empty when the pod names none. Such a pod runs as no
    /// account here (not as `default`): it vouches for nobody, and a caller pod without one
    /// matches no token.
    pub service_account: String,
    /// `spec.nodeName`; `None` until the pod is scheduled.
    pub node: Option<String>,
}

#[derive(Debug, Clone)]
struct PodEntry {
    uid: Box<str>,
    service_account: Box<str>,
    node: Option<Box<str>>,
}

/// namespace -> service account -> number of pods (on one node).
type AccountCounts = HashMap<Box<str>, HashMap<Box<str>, u32>>;

/// Pods by namespace and name, and how many pods of each service account each node runs.
#[derive(Default)]
struct Pods {
    /// namespace -> pod name -> entry.
    by_name: HashMap<Box<str>, HashMap<Box<str>, PodEntry>>,
    /// node -> namespace -> service account -> number of pods.
    on_node: HashMap<Box<str>, AccountCounts>,
    len: usize,
}

impl Pods {
    fn count(&mut self, node: &str, ns: &str, sa: &str, add: bool) {
        if add {
            *self
                .on_node
                .entry(node.into())
                .or_default()
                .entry(ns.into())
                .or_default()
                .entry(sa.into())
                .or_default() += 1;
            return;
        }
        let Some(by_ns) = self.on_node.get_mut(node) else {
            return;
        };
        if let Some(by_sa) = by_ns.get_mut(ns) {
            if let Some(n) = by_sa.get_mut(sa) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    by_sa.remove(sa);
                }
            }
            if by_sa.is_empty() {
                by_ns.remove(ns);
            }
        }
        if by_ns.is_empty() {
            self.on_node.remove(node);
        }
    }

    fn remove(&mut self, ns: &str, name: &str) {
        let Some(pods) = self.by_name.get_mut(ns) else {
            return;
        };
        let Some(old) = pods.remove(name) else {
            return;
        };
        if pods.is_empty() {
            self.by_name.remove(ns);
        }
        self.len -= 1;
        if let (Some(node), false) = (&old.node, old.service_account.is_empty()) {
            self.count(node, ns, &old.service_account, false);
        }
    }

    fn upsert(&mut self, p: PodRecord) {
        self.remove(&p.namespace, &p.name);
        if let (Some(node), false) = (&p.node, p.service_account.is_empty()) {
            self.count(node, &p.namespace, &p.service_account, true);
        }
        self.by_name
            .entry(p.namespace.into_boxed_str())
            .or_default()
            .insert(
                p.name.into_boxed_str(),
                PodEntry {
                    uid: p.uid.into_boxed_str(),
                    service_account: p.service_account.into_boxed_str(),
                    node: p.node.map(String::into_boxed_str),
                },
            );
        self.len += 1;
    }
}

/// The pods of the cluster that are not Failed or Succeeded, kept current by one watch.
///
/// Readers take a read lock for two hash lookups; the watch takes the write lock per event,
/// and once to swap in a complete relist.
///
/// It also knows whether it is current: the watch reports when it broke
/// ([`PodIndex::watch_failed`]), and only a complete relist ([`PodIndex::replace_all`]) makes
/// it current again; times come from its clock (the server's, injected).
pub struct PodIndex {
    pods: RwLock<Pods>,
    synced: AtomicBool,
    /// Unix milliseconds at which the watch broke and has not relisted since;
    /// [`HEALTHY`] while it is healthy.
    broken_since_ms: AtomicI64,
    clock: SharedClock,
}

const HEALTHY: i64 = i64::MIN;

impl Default for PodIndex {
    /// An index on the system clock.
    fn default() -> Self {
        Self::new(crate::clock::system())
    }
}

impl PodIndex {
    /// An empty index, not synced, reading time from `clock`.
    pub fn new(clock: SharedClock) -> Self {
        Self {
            pods: RwLock::default(),
            synced: AtomicBool::new(false),
            broken_since_ms: AtomicI64::new(HEALTHY),
            clock,
        }
    }

    fn now_ms(&self) -> i64 {
        (self.clock.now().unix_timestamp_nanos() / 1_000_000) as i64
    }

    /// The watch failed: from now on the index may miss changes, until the next complete
    /// relist. The first failure of an outage counts; repeated ones do not move the time.
    pub fn watch_failed(&self) {
        let now = self.now_ms();
        let _ = self.broken_since_ms.compare_exchange(
            HEALTHY,
            now,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }

    /// How long the index has been possibly out of date: `None` while its watch is healthy,
    /// else the time since the watch broke.
    pub fn stale_for(&self) -> Option<Duration> {
        match self.broken_since_ms.load(Ordering::Acquire) {
            HEALTHY => None,
            since => Some(Duration::from_millis(
                self.now_ms().saturating_sub(since).max(0) as u64,
            )),
        }
    }

    /// Adds or replaces a pod (the watch saw it created or changed).
    pub fn apply(&self, pod: PodRecord) {
        self.write().upsert(pod);
    }

    /// Forgets a pod (deleted, or no longer matching: it became Failed or Succeeded).
    pub fn delete(&self, namespace: &str, name: &str) {
        self.write().remove(namespace, name);
    }

    /// Replaces everything with a complete list (the watch's initial list or a relist), and
    /// marks the index synced and current: until the first list, requests cannot be judged,
    /// and after a watch failure only a complete list proves nothing was missed.
    pub fn replace_all(&self, pods: impl IntoIterator<Item = PodRecord>) {
        let mut fresh = Pods::default();
        for p in pods {
            fresh.upsert(p);
        }
        *self.write() = fresh;
        self.synced.store(true, Ordering::Release);
        self.broken_since_ms.store(HEALTHY, Ordering::Release);
    }

    /// Whether the first complete list has arrived.
    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    /// Pods indexed.
    pub fn len(&self) -> usize {
        self.read().len
    }

    /// Whether no pod is indexed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The heap the index holds, by accounting: every map's table (capacity times key,
    /// value and control byte) and every string's bytes. Allocator overhead per allocation
    /// (about 16 bytes for each of the ~4 strings per pod) is not included.
    pub fn heap_bytes(&self) -> usize {
        use std::mem::size_of;
        fn table<K, V>(m: &HashMap<K, V>) -> usize {
            m.capacity() * (size_of::<K>() + size_of::<V>() + 1)
        }
        let p = self.read();
        let mut n = table(&p.by_name) + table(&p.on_node);
        for (ns, pods) in &p.by_name {
            n += ns.len() + table(pods);
            for (name, e) in pods {
                n += name.len() + e.uid.len() + e.service_account.len();
                n += e.node.as_ref().map_or(0, |x| x.len());
            }
        }
        for (node, by_ns) in &p.on_node {
            n += node.len() + table(by_ns);
            for (ns, by_sa) in by_ns {
                n += ns.len() + table(by_sa) + by_sa.keys().map(|k| k.len()).sum::<usize>();
            }
        }
        n
    }

    /// The caller pod `namespace/name`: its UID, service account and node.
    fn pod(&self, namespace: &str, name: &str) -> Option<PodEntry> {
        self.read().by_name.get(namespace)?.get(name).cloned()
    }

    /// Whether `node` runs a pod of `sa`.
    pub fn runs_on(&self, node: &str, sa: &ServiceAccount) -> bool {
        self.read()
            .on_node
            .get(node)
            .and_then(|n| n.get(sa.namespace.as_str()))
            .and_then(|n| n.get(sa.name.as_str()))
            .is_some_and(|c| *c > 0)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Pods> {
        self.pods.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Pods> {
        self.pods.write().unwrap_or_else(|p| p.into_inner())
    }
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
    remotes: Option<std::sync::Arc<crate::auth::cluster::RemoteClusters>>,
    /// How long after its watch broke an index is still trusted.
    max_staleness: Duration,
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
        }
    }

    /// Trusts an index whose watch broke for `max` at most (`--pod-index-max-staleness`).
    pub fn with_max_staleness(mut self, max: Duration) -> Self {
        self.max_staleness = max;
        self
    }

    /// Also judges callers of these remote clusters, each against its own pod index.
    pub fn with_remotes(
        mut self,
        remotes: std::sync::Arc<crate::auth::cluster::RemoteClusters>,
    ) -> Self {
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
        if !pods.is_synced() {
            return Err(NodeAuthError::NotSynced);
        }
        if let Some(broken_for) = pods.stale_for().filter(|d| *d > self.max_staleness) {
            return Err(NodeAuthError::Stale {
                broken_for,
                max: self.max_staleness,
            });
        }
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
                    format!(
                        "caller pod {ns}/{pod_name} is on {node} but its token names {claimed}"
                    ),
                ));
            }
        }
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn rec(ns: &str, name: &str, uid: &str, sa: &str, node: Option<&str>) -> PodRecord {
        PodRecord {
            namespace: ns.into(),
            name: name.into(),
            uid: uid.into(),
            service_account: sa.into(),
            node: node.map(Into::into),
        }
    }

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
    fn the_index_follows_moves_updates_and_deletes() {
        let pods = PodIndex::default();
        pods.replace_all([]);
        let cart = ServiceAccount::new("shop", "cart").unwrap();
        pods.apply(rec("shop", "cart-1", "c1", "cart", None));
        assert!(!pods.runs_on("n1", &cart), "not scheduled yet");
        pods.apply(rec("shop", "cart-1", "c1", "cart", Some("n1")));
        pods.apply(rec("shop", "cart-2", "c2", "cart", Some("n1")));
        assert!(pods.runs_on("n1", &cart));
        assert_eq!(pods.len(), 2);
        pods.delete("shop", "cart-1");
        assert!(pods.runs_on("n1", &cart), "cart-2 is still there");
        pods.delete("shop", "cart-2");
        pods.delete("shop", "cart-2");
        assert!(!pods.runs_on("n1", &cart));
        assert!(pods.is_empty());
        let inner = pods.read();
        assert!(
            inner.on_node.is_empty() && inner.by_name.is_empty(),
            "no empty maps left behind"
        );
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
}
