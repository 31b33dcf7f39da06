//! `clusterid`: the cluster a caller says its token comes from (pilot-agent sends
//! `ISTIO_META_CLUSTER_ID`, `Kubernetes` by default). istiod's rule, for token
//! authentication only: an absent header or the local cluster's name (`--cluster-id`) means
//! the local cluster; any other name must be a known remote cluster (`--multicluster`: learnt
//! from Secrets labelled `istio/multiCluster: "true"`, see [`RemoteClusters`]), whose own
//! authenticator alone then checks the token; an unknown name is refused naming the cluster.
//! So a token from another cluster is never checked against this one's keys or TokenReview by
//! mistake, and a token of this cluster cannot pass for a remote one. Client certificates carry
//! no cluster and ignore the header, as in istiod.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;

use super::{AuthFailure, Authenticator, Caller, Credentials, Verified};
use crate::future::BoxFuture;

/// The cluster name istiod assumes when none is configured.
pub const DEFAULT_CLUSTER_ID: &str = "Kubernetes";

/// One remote cluster: the authenticator that checks its tokens (its own TokenReview client,
/// cache, single-flight and rate limit), and whether its API server answered.
pub struct RemoteCluster {
    /// Checks the tokens of this cluster only.
    pub authenticator: Arc<dyn Authenticator>,
    /// This cluster's pods, for node impersonation by its callers (`--trusted-node-accounts`);
    /// `None` when impersonation is off, and then its callers are refused it.
    pub pods: Option<Arc<super::pods::PodIndex>>,
    /// Set by the watcher once the cluster's API server answered a probe (and cleared when it
    /// did not), for `citadel_remote_clusters{state="reachable"}`.
    pub reachable: AtomicBool,
}

/// The remote clusters currently known, by cluster id. The request path reads it lock-free;
/// the Secret watcher (in `cluster::remote`, a layer above) swaps in a whole new map on every
/// change, so a cluster removed from its Secret is gone for the next request.
#[derive(Default)]
pub struct RemoteClusters {
    clusters: ArcSwap<HashMap<String, Arc<RemoteCluster>>>,
    /// Kubeconfigs (one per Secret key) that could not be turned into a client, counted once
    /// per content seen (`citadel_remote_cluster_kubeconfig_errors`).
    pub kubeconfig_errors: AtomicU64,
    /// Secret keys whose kubeconfig is currently unusable
    /// (`citadel_remote_cluster_kubeconfigs_invalid`): the counter above says it happened, this
    /// says whether it is still so.
    pub invalid: AtomicU64,
    /// Cluster ids claimed by more than one Secret right now
    /// (`citadel_remote_cluster_id_conflicts`): none of those Secrets is trusted for it.
    pub conflicts: AtomicU64,
    /// Set once the watcher has listed the Secrets: before that an unknown cluster may just
    /// not be loaded yet, so it is a retryable refusal rather than Unauthenticated.
    pub synced: AtomicBool,
}

impl RemoteClusters {
    /// The cluster named `id`, if known.
    pub fn get(&self, id: &str) -> Option<Arc<RemoteCluster>> {
        self.clusters.load().get(id).cloned()
    }

    /// Replaces every known cluster at once.
    pub fn replace(&self, clusters: HashMap<String, Arc<RemoteCluster>>) {
        self.clusters.store(Arc::new(clusters));
    }

    /// How many clusters are known, and how many of them answered their last probe.
    pub fn counts(&self) -> (usize, usize) {
        let m = self.clusters.load();
        let reachable = m
            .values()
            .filter(|c| c.reachable.load(Ordering::Relaxed))
            .count();
        (m.len(), reachable)
    }

    /// The known cluster ids, sorted (for logs).
    pub fn ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.clusters.load().keys().cloned().collect();
        ids.sort();
        ids
    }
}

/// A token authenticator that routes by `clusterid`: the local cluster's for an absent header
/// or the local name, a known remote cluster's for its name, and a refusal otherwise.
pub struct LocalCluster {
    local: String,
    inner: Arc<dyn Authenticator>,
    remotes: Option<Arc<RemoteClusters>>,
}

impl LocalCluster {
    /// `inner`, answering only for requests whose `clusterid` is absent or `local`.
    pub fn new(local: impl Into<String>, inner: Arc<dyn Authenticator>) -> Self {
        Self {
            local: local.into(),
            inner,
            remotes: None,
        }
    }

    /// Also routes requests naming one of `remotes` to that cluster's authenticator.
    pub fn with_remotes(mut self, remotes: Arc<RemoteClusters>) -> Self {
        self.remotes = Some(remotes);
        self
    }
}

impl Authenticator for LocalCluster {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn authenticate<'a>(
        &'a self,
        creds: Credentials<'a>,
    ) -> BoxFuture<'a, Result<Option<Caller>, AuthFailure>> {
        match creds.cluster_id {
            Some(c) if c != self.local && creds.bearer.is_some() => {
                if let Some(remote) = self.remotes.as_ref().and_then(|r| r.get(c)) {
                    return Box::pin(async move {
                        let caller = remote.authenticator.authenticate(creds).await?;
                        // The caller is marked as remote: checks that need this cluster's
                        // own objects (node impersonation's pod index) must not apply.
                        Ok(caller.map(|c0| Caller {
                            cluster: Some(c.to_string()),
                            ..c0
                        }))
                    });
                }
                let shown: String = c.chars().take(64).collect();
                if self
                    .remotes
                    .as_ref()
                    .is_some_and(|r| !r.synced.load(Ordering::Acquire))
                {
                    return Box::pin(std::future::ready(Err(AuthFailure::transient(format!(
                        "the remote clusters' Secrets are not loaded yet, so cluster {shown:?} \
                         is not known yet; retry shortly"
                    )))));
                }
                let known = match &self.remotes {
                    None => "only its local cluster".to_string(),
                    Some(_) => "no remote cluster of that name, and its local cluster is".into(),
                };
                Box::pin(std::future::ready(Err(AuthFailure::invalid(format!(
                    "the client says its token is from cluster {shown:?}, but this CA knows \
                     {known} {:?} (--cluster-id)",
                    self.local
                )))))
            }
            _ => self.inner.authenticate(creds),
        }
    }

    /// Routed as `authenticate` routes: a known remote cluster's cache answers for its
    /// tokens; a cluster this CA does not know is refused, but only after the throttle.
    fn verified(&self, creds: Credentials<'_>) -> Verified {
        match creds.cluster_id {
            Some(c) if c != self.local && creds.bearer.is_some() => {
                match self.remotes.as_ref().and_then(|r| r.get(c)) {
                    Some(remote) => match remote.authenticator.verified(creds) {
                        Verified::Caller(c0) => Verified::Caller(Caller {
                            cluster: Some(c.to_string()),
                            ..c0
                        }),
                        other => other,
                    },
                    None => Verified::Unknown,
                }
            }
            _ => self.inner.verified(creds),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::AuthMethod;
    use crate::identity::{ServiceAccount, TrustDomain};

    /// Accepts every bearer token as `ns/<tag>/sa/x`, to see which authenticator answered.
    struct Tagged(&'static str);

    impl Authenticator for Tagged {
        fn name(&self) -> &'static str {
            "tagged"
        }
        fn authenticate<'a>(
            &'a self,
            creds: Credentials<'a>,
        ) -> BoxFuture<'a, Result<Option<Caller>, AuthFailure>> {
            let td = TrustDomain::new("cluster.local").unwrap();
            let sa = ServiceAccount::from_username(&format!("system:serviceaccount:{}:x", self.0))
                .unwrap();
            let caller = creds.bearer.map(|_| Caller {
                identity: td.service_account_id(&sa),
                method: AuthMethod::TokenReview,
                pod_name: None,
                pod_uid: None,
                node_name: None,
                cluster: None,
            });
            Box::pin(std::future::ready(Ok(caller)))
        }
    }

    fn remote(tag: &'static str) -> Arc<RemoteCluster> {
        Arc::new(RemoteCluster {
            authenticator: Arc::new(Tagged(tag)),
            pods: None,
            reachable: AtomicBool::new(false),
        })
    }

    async fn who(
        r: &LocalCluster,
        cluster_id: Option<&str>,
    ) -> Result<Option<Caller>, AuthFailure> {
        r.authenticate(Credentials {
            bearer: Some("t"),
            peer_chain: None,
            cluster_id,
        })
        .await
    }

    #[tokio::test]
    async fn routes_by_cluster_id_and_follows_replacements() {
        let remotes = Arc::new(RemoteClusters::default());
        let r = LocalCluster::new("a", Arc::new(Tagged("local"))).with_remotes(remotes.clone());
        let ns = |c: Option<Caller>| c.unwrap().identity.to_string();
        // Not listed yet: retry, rather than a final refusal.
        assert!(who(&r, Some("b")).await.unwrap_err().transient);
        remotes.synced.store(true, Ordering::Release);

        assert!(ns(who(&r, None).await.unwrap()).contains("/ns/local/"));
        assert!(ns(who(&r, Some("a")).await.unwrap()).contains("/ns/local/"));
        let err = who(&r, Some("b")).await.unwrap_err();
        assert!(err.reason.contains("\"b\""), "{err:?}");

        remotes.replace(HashMap::from([("b".to_string(), remote("remote-b"))]));
        let c = who(&r, Some("b")).await.unwrap().unwrap();
        assert!(c.identity.to_string().contains("/ns/remote-b/"));
        assert_eq!(c.cluster.as_deref(), Some("b"));
        assert_eq!(who(&r, None).await.unwrap().unwrap().cluster, None);
        assert_eq!(remotes.counts(), (1, 0));

        remotes.replace(HashMap::new());
        assert!(!who(&r, Some("b")).await.unwrap_err().transient);
    }
}
