//! The trust anchors as a `ClusterTrustBundle` (`certificates.k8s.io/v1`): one object for
//! citadel's Pod Certificates signer name, holding every root of the current bundle, which
//! pods mount with a projected `clusterTrustBundle` volume (by name, or by signer name).
//!
//! It is a second [`Publisher`] next to the ConfigMap one: the scheduler's `publish` of a new
//! bundle returns Ok only once the ClusterTrustBundle holds it too, so during a root rotation
//! the new root is in the bundle before anything is signed with it, and the old one leaves
//! only when the scheduler publishes the bundle without it. A watch on the object repairs
//! drift (an edit or a deletion) with a Kubernetes Event, like the ConfigMaps. Only the leader
//! writes ([`super::controller::while_leading`], and a leadership check at each write).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::certificates::v1::{ClusterTrustBundle, ClusterTrustBundleSpec};
use kube::api::{Api, PostParams};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::{watcher, WatchStreamExt};
use kube::Resource;
use tokio::sync::{watch, Mutex};

use crate::future::BoxFuture;
use crate::shutdown::Shutdown;
use crate::store::kube::Publisher;

/// The object's name for a signer: the API requires the signer name with `/` turned into `:`,
/// then `:`, then a DNS subdomain of our choosing.
pub fn bundle_name(signer_name: &str) -> String {
    format!("{}:roots", signer_name.replace('/', ":"))
}

/// How often the object is compared again even if no watch event said so.
const RESYNC: Duration = Duration::from_secs(300);
/// How many past bundles count as "ours" when deciding whether the object drifted.
const HISTORY: usize = 16;

/// Keeps the ClusterTrustBundle of one signer name equal to the published trust bundle.
pub struct TrustBundlePublisher {
    client: kube::Client,
    leader: Option<crate::leadership::Leadership>,
    signer_name: String,
    name: String,
    desired: watch::Sender<Option<String>>,
    recorder: Recorder,
    history: std::sync::Mutex<Vec<[u8; 32]>>,
    /// One write at a time: the scheduler's publish and the drift watch may both want to.
    writing: Mutex<()>,
    /// ClusterTrustBundles created or replaced.
    pub writes: AtomicU64,
}

fn digest(s: &str) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, s.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

impl TrustBundlePublisher {
    /// A publisher for `signer_name` that writes only while `leader` says true (`None`:
    /// always).
    pub fn new(
        client: kube::Client,
        signer_name: &str,
        leader: Option<crate::leadership::Leadership>,
    ) -> Arc<Self> {
        Arc::new(Self {
            recorder: Recorder::new(
                client.clone(),
                Reporter {
                    controller: "citadel".into(),
                    instance: std::env::var("POD_NAME").ok(),
                },
            ),
            client,
            leader,
            signer_name: signer_name.to_string(),
            name: bundle_name(signer_name),
            desired: watch::channel(None).0,
            history: std::sync::Mutex::new(Vec::new()),
            writing: Mutex::new(()),
            writes: AtomicU64::new(0),
        })
    }

    /// The ClusterTrustBundle's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn leading(&self) -> bool {
        self.leader.as_ref().is_none_or(|l| l.leading())
    }

    /// Watches the object and repairs it while this replica leads, until shutdown.
    pub async fn run(self: Arc<Self>, shutdown: Shutdown) {
        let leader = self.leader.clone();
        super::controller::while_leading("clustertrustbundle-publisher", leader, shutdown, |stop| {
            self.clone().watch(stop)
        })
        .await
    }

    async fn watch(self: Arc<Self>, mut stop: super::controller::Stop) {
        let api: Api<ClusterTrustBundle> = Api::all(self.client.clone());
        let mut events = watcher(
            api,
            watcher::Config::default().fields(&format!("metadata.name={}", self.name)),
        )
        .default_backoff()
        .boxed();
        let mut desired = self.desired.subscribe();
        let mut retry: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
        loop {
            let wake = tokio::select! {
                e = events.next() => match e {
                    // Any event, including the initial list and a deletion: compare.
                    Some(Ok(_)) => true,
                    Some(Err(err)) => { tracing::debug!(error = %err, "ClusterTrustBundle watch error; it restarts"); false }
                    None => return,
                },
                r = desired.changed() => { if r.is_err() { return } true }
                _ = async { match retry.as_mut() { Some(s) => s.await, None => std::future::pending().await } } => { retry = None; true }
                _ = tokio::time::sleep(RESYNC) => true,
                _ = &mut stop => return,
            };
            if wake {
                if let Err(e) = self.reconcile().await {
                    tracing::warn!(clustertrustbundle = %self.name, error = %e, "ClusterTrustBundle reconcile failed; will retry");
                    retry = Some(Box::pin(tokio::time::sleep(Duration::from_secs(2))));
                }
            }
        }
    }

    /// Makes the object hold the desired bundle; writes only what differs.
    async fn reconcile(&self) -> Result<(), String> {
        let Some(want) = self.desired.borrow().clone() else {
            return Ok(());
        };
        let _one = self.writing.lock().await;
        let api: Api<ClusterTrustBundle> = Api::all(self.client.clone());
        let current = api
            .get_opt(&self.name)
            .await
            .map_err(|e| format!("reading ClusterTrustBundle {}: {e}", self.name))?;
        let ours =
            |c: &ClusterTrustBundle| c.spec.signer_name.as_deref() == Some(&self.signer_name);
        if let Some(c) = &current {
            if ours(c) && c.spec.trust_bundle == want {
                return Ok(());
            }
        }
        let drifted = current
            .as_ref()
            .is_some_and(|c| !ours(c) || !self.published_before(&c.spec.trust_bundle));
        if !self.leading() {
            return Err("this replica does not lead (any more); not writing".into());
        }
        let mut ctb = ClusterTrustBundle {
            spec: ClusterTrustBundleSpec {
                signer_name: Some(self.signer_name.clone()),
                trust_bundle: want,
            },
            ..Default::default()
        };
        ctb.metadata.name = Some(self.name.clone());
        ctb.metadata.labels = Some(
            [(
                "app.kubernetes.io/managed-by".to_string(),
                "citadel".to_string(),
            )]
            .into(),
        );
        let result = match &current {
            None => api
                .create(&PostParams::default(), &ctb)
                .await
                .map(|_| "created"),
            Some(c) => {
                ctb.metadata.resource_version = c.metadata.resource_version.clone();
                api.replace(&self.name, &PostParams::default(), &ctb)
                    .await
                    .map(|_| "updated")
            }
        };
        match result {
            Ok(what) => {
                self.writes.fetch_add(1, Ordering::Relaxed);
                tracing::info!(target: "citadel::audit", event = "clustertrustbundle_published", clustertrustbundle = %self.name, action = what, "published ClusterTrustBundle {}", self.name);
                if let Some(c) = current.as_ref().filter(|_| drifted) {
                    self.record_repair(c).await;
                }
                Ok(())
            }
            Err(e) => Err(format!("ClusterTrustBundle {}: {e}", self.name)),
        }
    }

    fn published_before(&self, content: &str) -> bool {
        let d = digest(content);
        self.history
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&d)
    }

    async fn record_repair(&self, ctb: &ClusterTrustBundle) {
        super::publish::record_drift(
            &self.recorder,
            &ctb.object_ref(&()),
            "the ClusterTrustBundle did not hold citadel's current roots (edited); citadel restored it"
                .into(),
        )
        .await;
    }
}

impl Publisher for TrustBundlePublisher {
    fn publish<'a>(
        &'a self,
        bundle: Option<&'a str>,
        _crl: Option<&'a str>,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let Some(bundle) = bundle else {
                // CRLs have no place in a ClusterTrustBundle.
                return Ok(());
            };
            let changed = self.desired.send_if_modified(|d| {
                let changed = d.as_deref() != Some(bundle);
                *d = Some(bundle.to_string());
                changed
            });
            if changed {
                let mut seen = self.history.lock().unwrap_or_else(|p| p.into_inner());
                seen.push(digest(bundle));
                let excess = seen.len().saturating_sub(HISTORY);
                seen.drain(..excess);
            }
            if !self.leading() {
                return Ok(());
            }
            self.reconcile().await
        })
    }
}

/// Publishes to each publisher in turn; Ok only when all of them succeeded, so the scheduler
/// counts a bundle as published only once every place holds it.
pub struct AllPublishers(pub Vec<Arc<dyn Publisher>>);

impl Publisher for AllPublishers {
    fn publish<'a>(
        &'a self,
        bundle: Option<&'a str>,
        crl: Option<&'a str>,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            // Every one is tried, so a failing one does not hold the others back.
            let mut errors = Vec::new();
            for p in &self.0 {
                if let Err(e) = p.publish(bundle, crl).await {
                    errors.push(e);
                }
            }
            if errors.is_empty() {
                Ok(())
            } else {
                Err(errors.join("; "))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_name_starts_with_the_signer_name() {
        assert_eq!(
            bundle_name("citadel.dev/spiffe"),
            "citadel.dev:spiffe:roots"
        );
    }
}
