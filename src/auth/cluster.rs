//! `clusterid`: the cluster a caller says its token comes from (pilot-agent sends
//! `ISTIO_META_CLUSTER_ID`, `Kubernetes` by default). istiod's rule, for token
//! authentication only: an absent header or the local cluster's name (`--cluster-id`) means
//! the local cluster; any other name must be a known remote cluster, else the token is
//! refused naming the cluster. citadel knows no remote clusters yet, so every other name is
//! refused: a token from another cluster can never be checked against this one's keys or
//! TokenReview by mistake. Client certificates carry no cluster and ignore the header, as in
//! istiod.

use std::sync::Arc;

use super::{AuthFailure, Authenticator, Caller, Credentials};
use crate::future::BoxFuture;

/// The cluster name istiod assumes when none is configured.
pub const DEFAULT_CLUSTER_ID: &str = "Kubernetes";

/// A token authenticator that only vouches for tokens of the local cluster.
pub struct LocalCluster {
    local: String,
    inner: Arc<dyn Authenticator>,
}

impl LocalCluster {
    /// `inner`, answering only for requests whose `clusterid` is absent or `local`.
    pub fn new(local: impl Into<String>, inner: Arc<dyn Authenticator>) -> Self {
        Self {
            local: local.into(),
            inner,
        }
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
                let shown: String = c.chars().take(64).collect();
                Box::pin(std::future::ready(Err(AuthFailure::invalid(format!(
                    "the client says its token is from cluster {shown:?}, but this CA knows only \
                     its local cluster {:?} (--cluster-id)",
                    self.local
                )))))
            }
            _ => self.inner.authenticate(creds),
        }
    }
}
