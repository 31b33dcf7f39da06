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
//!
//! Kubelet merges EVERY ClusterTrustBundle with a signer name into what a pod that mounts the
//! bundles by signer name trusts, so another object claiming citadel's signer name (written by
//! anyone the cluster granted `attest` on it) would add roots citadel never issued under. The
//! leader watches for them (field selector `spec.signerName`) and reports each: a warning log
//! naming it, `citadel_foreign_trust_bundles`, and a Warning Event (`ForeignTrustBundle`) on
//! it. citadel never reads their content into its own trust, and never deletes them (no
//! delete verb; the operator decides).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::certificates::v1::{ClusterTrustBundle, ClusterTrustBundleSpec};
use kube::api::{Api, PostParams};
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
    history: std::sync::Mutex<Vec<[u8; 32]>>,
    /// One write at a time: the scheduler's publish and the drift watch may both want to.
    writing: Mutex<()>,
    /// ClusterTrustBundles created or replaced.
    pub writes: AtomicU64,
    /// Other ClusterTrustBundles claiming this signer name, as last seen
    /// (`citadel_foreign_trust_bundles`).
    pub foreign: Arc<AtomicU64>,
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
            client,
            leader,
            signer_name: signer_name.to_string(),
            name: bundle_name(signer_name),
            desired: watch::channel(None).0,
            history: std::sync::Mutex::new(Vec::new()),
            writing: Mutex::new(()),
            writes: AtomicU64::new(0),
            foreign: Arc::new(AtomicU64::new(0)),
        })
    }

    /// The ClusterTrustBundle's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn leading(&self) -> bool {
        self.leader.as_ref().is_none_or(|l| l.leading())
    }

    /// Watches the object and repairs it while this replica leads, until shutdown; also
    /// reports other objects claiming the signer name.
    pub async fn run(self: Arc<Self>, shutdown: Shutdown) {
        let leader = self.leader.clone();
        super::controller::while_leading("clustertrustbundle-publisher", leader, shutdown, |stop| {
            let me = self.clone();
            async move {
                let (tx, rx) = tokio::sync::oneshot::channel::<()>();
                let foreign = tokio::spawn(me.clone().watch_foreign(rx));
                me.watch(stop).await;
                drop(tx);
                let _ = foreign.await;
            }
        })
        .await
    }

    /// Reports every ClusterTrustBundle that names this signer but is not citadel's object,
    /// until `stop` fires (or its sender is dropped). Reported once per object and content.
    async fn watch_foreign(self: Arc<Self>, mut stop: tokio::sync::oneshot::Receiver<()>) {
        use std::collections::BTreeMap;
        use watcher::Event;
        let api: Api<ClusterTrustBundle> = Api::all(self.client.clone());
        let mut events = watcher(
            api,
            watcher::Config::default().fields(&format!("spec.signerName={}", self.signer_name)),
        )
        .default_backoff()
        .boxed();
        // Foreign object name -> digest of its bundle (reported again only when it changes).
        let mut seen: BTreeMap<String, [u8; 32]> = BTreeMap::new();
        let mut relist: Option<BTreeMap<String, [u8; 32]>> = None;
        let mut failing = false;
        loop {
            let ev = tokio::select! {
                e = events.next() => e,
                _ = &mut stop => return,
            };
            let ev = match ev {
                None => return,
                Some(Err(e)) => {
                    if !failing {
                        tracing::warn!(signer = %self.signer_name, error = %e, "cannot watch ClusterTrustBundles of citadel's signer name (RBAC: clustertrustbundles list/watch?); foreign ones go unreported until it recovers");
                    }
                    failing = true;
                    continue;
                }
                Some(Ok(ev)) => ev,
            };
            failing = false;
            let mut fresh: Vec<ClusterTrustBundle> = Vec::new();
            match ev {
                Event::Init => relist = Some(BTreeMap::new()),
                Event::InitApply(c) => {
                    if let Some(name) = self.foreign_name(&c) {
                        let d = digest(&c.spec.trust_bundle);
                        if seen.get(&name) != Some(&d) {
                            fresh.push(c);
                        }
                        relist.get_or_insert_with(BTreeMap::new).insert(name, d);
                    }
                }
                Event::InitDone => seen = relist.take().unwrap_or_default(),
                Event::Apply(c) => {
                    if let Some(name) = self.foreign_name(&c) {
                        let d = digest(&c.spec.trust_bundle);
                        if seen.insert(name, d) != Some(d) {
                            fresh.push(c);
                        }
                    }
                }
                Event::Delete(c) => {
                    if let Some(name) = self.foreign_name(&c) {
                        seen.remove(&name);
                        tracing::info!(clustertrustbundle = %name, signer = %self.signer_name, "a foreign ClusterTrustBundle claiming citadel's signer name is gone");
                    }
                }
            }
            if relist.is_none() {
                self.foreign.store(seen.len() as u64, Ordering::Relaxed);
            }
            for c in fresh {
                self.report_foreign(&c).await;
            }
        }
    }

    /// The object's name if it claims this signer but is not citadel's own object.
    fn foreign_name(&self, c: &ClusterTrustBundle) -> Option<String> {
        let name = c.metadata.name.clone()?;
        (c.spec.signer_name.as_deref() == Some(self.signer_name.as_str()) && name != self.name)
            .then_some(name)
    }

    async fn report_foreign(&self, c: &ClusterTrustBundle) {
        let name = c.metadata.name.as_deref().unwrap_or_default();
        let roots = c.spec.trust_bundle.matches("BEGIN CERTIFICATE").count();
        let note = format!(
            "ClusterTrustBundle {name} claims citadel's signer name {} ({roots} certificate(s)) but is not citadel's ({}): kubelet adds its roots to what pods mounting bundles by signer name trust. citadel does not use it; delete it unless you put it there on purpose",
            self.signer_name, self.name
        );
        tracing::warn!(clustertrustbundle = %name, signer = %self.signer_name, roots, "{note}");
        self.cluster_event(&c.object_ref(&()), "ForeignTrustBundle", "Check", note)
            .await;
    }

    /// A Warning Event (`events.k8s.io/v1`, namespace `default`) on a ClusterTrustBundle.
    /// Not through kube's `Recorder`: it names an Event after its object, and a
    /// ClusterTrustBundle's name holds `:`, which an Event name may not, so the API server
    /// refused every one. This one takes a generated name. Best effort: a failure is logged at
    /// debug.
    async fn cluster_event(
        &self,
        object: &k8s_openapi::api::core::v1::ObjectReference,
        reason: &str,
        action: &str,
        note: String,
    ) {
        use k8s_openapi::api::events::v1::Event;
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
        let now = crate::clock::system().now();
        let micros = (now.unix_timestamp_nanos() / 1000) as i64;
        let instance = std::env::var("POD_NAME").unwrap_or_else(|_| "citadel".into());
        let mut ev = Event {
            action: Some(action.into()),
            reason: Some(reason.into()),
            note: Some(note),
            type_: Some("Warning".into()),
            event_time: Some(MicroTime(
                k8s_openapi::jiff::Timestamp::from_microsecond(micros).unwrap_or_default(),
            )),
            regarding: Some(object.clone()),
            reporting_controller: Some("citadel".into()),
            reporting_instance: Some(instance),
            ..Default::default()
        };
        ev.metadata.generate_name = Some("citadel-clustertrustbundle-".into());
        let api: Api<Event> = Api::namespaced(self.client.clone(), "default");
        if let Err(e) = api.create(&PostParams::default(), &ev).await {
            tracing::debug!(error = %e, "could not record a Kubernetes Event");
        }
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
        self.cluster_event(
            &ctb.object_ref(&()),
            "Drifted",
            "Repair",
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
            let mut results = Vec::new();
            for p in &self.0 {
                results.push(p.publish(bundle, crl).await);
            }
            joined(results)
        })
    }

    fn publish_jwks<'a>(&'a self, jwks: &'a str) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let mut results = Vec::new();
            for p in &self.0 {
                results.push(p.publish_jwks(jwks).await);
            }
            joined(results)
        })
    }
}

/// Ok when every publisher succeeded, else every error, joined.
fn joined(results: Vec<Result<(), String>>) -> Result<(), String> {
    let errors: Vec<String> = results.into_iter().filter_map(Result::err).collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
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
