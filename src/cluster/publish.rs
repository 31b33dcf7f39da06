//! Publishes the trust bundle (`istio-ca-root-cert`, key `root-cert.pem`, label
//! `istio.io/config=true`) and the CRLs (`istio-ca-crl`, key `ca-crl.pem`) into every
//! namespace but kube-public and kube-node-lease; the JWT bundle (`citadel-jwt-bundle`, key
//! `jwks.json`) into the CA's own namespace only; with `--linkerd-identity-domain`, also the
//! same bundle as Linkerd's trust anchors (`linkerd-identity-trust-roots`, key
//! `ca-bundle.crt`) in Linkerd's control-plane namespace only.
//!
//! Two ways in, one reconcile: the scheduler's `publish` (new bundle or CRL) makes a full pass
//! over every namespace, and only returns Ok once every namespace holds it, because a new root
//! may only start signing after that; a kube-runtime `Controller` over namespaces, fed by the
//! same reflector caches (ONE list-watch each of namespaces and of the two ConfigMaps),
//! reconciles one namespace when it appears or when someone edits or deletes a ConfigMap
//! (drift is repaired, logged, and recorded as a Kubernetes Event on the ConfigMap). Both
//! write only what differs, so they are idempotent and quiet. Only the leader runs the
//! controller and writes ([`super::controller::while_leading`]).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{Api, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store as Cache};
use kube::runtime::{watcher, Controller, WatchStreamExt};
use kube::Resource;
use tokio::sync::{watch, Mutex};

use super::names::{
    CRL_CONFIGMAP, CRL_KEY, JWKS_CONFIGMAP, JWKS_KEY, LINKERD_ANCHORS_CONFIGMAP,
    LINKERD_ANCHORS_KEY, ROOT_CONFIGMAP, ROOT_KEY,
};
use crate::future::BoxFuture;
use crate::shutdown::Shutdown;
use crate::store::kube::Publisher;

const SKIPPED: [&str; 2] = ["kube-public", "kube-node-lease"];
/// Namespaces a full publishing pass writes at once.
const PASS_CONCURRENCY: usize = 16;

/// Namespaces, then the root-cert and CRL ConfigMaps, and Linkerd's anchors when published,
/// as the list-watches see them.
type Caches = (
    Cache<Namespace>,
    Cache<ConfigMap>,
    Cache<ConfigMap>,
    Option<Cache<ConfigMap>>,
);

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Desired {
    bundle: Option<String>,
    crl: Option<String>,
    /// The JWT bundle, for [`ConfigMapPublisher::jwks_namespace`] only.
    jwks: Option<String>,
}

/// Publishes the bundle and CRLs into every namespace's ConfigMaps, reconciling drift.
pub struct ConfigMapPublisher {
    client: kube::Client,
    desired: watch::Sender<Desired>,
    leader: Option<crate::leadership::Leadership>,
    /// Filled while the controller runs and its watches have listed once.
    caches: Mutex<Option<Caches>>,
    /// Kubernetes Events for repaired ConfigMaps.
    recorder: Recorder,
    /// Digests of the last bundles and CRLs we were asked to publish: a ConfigMap holding one
    /// of these is merely outdated, anything else was changed by someone.
    history: std::sync::Mutex<Vec<[u8; 32]>>,
    /// ConfigMaps created or replaced.
    pub writes: AtomicU64,
    /// The CertificateAuthority resource (namespace, name) that also gets each drift Event, so
    /// `kubectl describe ca` shows every repair in one place.
    certificate_authority: std::sync::OnceLock<(String, String)>,
    /// The namespace that gets the JWT bundle ConfigMap (the CA's); unset publishes none.
    jwks_namespace: std::sync::OnceLock<String>,
    /// Digest of the JWT bundle last confirmed in its ConfigMap: the scheduler publishes on
    /// every pass, and an unchanged bundle costs no API call (drift is repaired by the
    /// controller's pass over the CA namespace).
    jwks_confirmed: std::sync::Mutex<Option<[u8; 32]>>,
    /// Linkerd's control-plane namespace, where the bundle is also written as Linkerd's trust
    /// anchors ([`ConfigMapPublisher::publish_linkerd_anchors`]).
    linkerd_ns: std::sync::OnceLock<String>,
    /// The time Linkerd's anchors are stamped with when they change
    /// (`linkerd_drift::CHANGED_AT`).
    clock: std::sync::OnceLock<crate::clock::SharedClock>,
}

/// A reconcile that failed; the controller retries it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PublishError(String);

/// How many past bundles and CRLs count as "ours" when deciding whether a ConfigMap drifted.
const HISTORY: usize = 16;

fn digest(s: &str) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, s.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// How often every namespace is compared again even if no watch event said so.
const RESYNC: Duration = Duration::from_secs(300);

impl ConfigMapPublisher {
    /// A publisher that writes only while `leader` says true (`None`: always).
    pub fn new(client: kube::Client, leader: Option<crate::leadership::Leadership>) -> Arc<Self> {
        Arc::new(Self {
            client: client.clone(),
            desired: watch::channel(Desired::default()).0,
            leader,
            caches: Mutex::new(None),
            recorder: Recorder::new(
                client.clone(),
                Reporter {
                    controller: "citadel".into(),
                    instance: std::env::var("POD_NAME").ok(),
                },
            ),
            history: std::sync::Mutex::new(Vec::new()),
            writes: AtomicU64::new(0),
            certificate_authority: std::sync::OnceLock::new(),
            jwks_namespace: std::sync::OnceLock::new(),
            jwks_confirmed: std::sync::Mutex::new(None),
            linkerd_ns: std::sync::OnceLock::new(),
            clock: std::sync::OnceLock::new(),
        })
    }

    /// Also publishes the bundle as Linkerd's trust anchors in `namespace` (ConfigMap
    /// `linkerd-identity-trust-roots`, key `ca-bundle.crt`), watched and repaired like the
    /// others, and stamped with the time (on `clock`) its anchor set last changed, which the
    /// anchor drift count reads (`cluster::linkerd_drift`). Set once, before
    /// [`ConfigMapPublisher::run`].
    pub fn publish_linkerd_anchors(&self, namespace: &str, clock: crate::clock::SharedClock) {
        let _ = self.linkerd_ns.set(namespace.to_string());
        let _ = self.clock.set(clock);
    }

    /// Also records each drift Event on `CertificateAuthority/<name>` in `namespace` (when it
    /// exists). Set once, at start.
    pub fn report_to(&self, namespace: &str, name: &str) {
        let _ = self
            .certificate_authority
            .set((namespace.to_string(), name.to_string()));
    }

    /// Publishes the JWT bundle ConfigMap into `namespace` (the CA's). Set once, at start.
    pub fn jwks_namespace(&self, namespace: &str) {
        let _ = self.jwks_namespace.set(namespace.to_string());
    }

    /// The JWT bundle ConfigMap, as desired now, read from the API server rather than a
    /// cache (one object): when the bundle changes, and at the controller's look at the CA
    /// namespace (which repairs an edit or a deletion).
    async fn reconcile_jwks(&self, ns: &str) -> Result<(), String> {
        if self.jwks_namespace.get().map(String::as_str) != Some(ns) {
            return Ok(());
        }
        let Some(content) = self.desired.borrow().jwks.clone() else {
            return Ok(());
        };
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), ns);
        let current = api
            .get_opt(JWKS_CONFIGMAP)
            .await
            .map_err(|e| format!("{ns}/{JWKS_CONFIGMAP}: {e}"))?;
        self.ensure(ns, JWKS_CONFIGMAP, JWKS_KEY, &content, current.as_ref())
            .await?;
        *self
            .jwks_confirmed
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(digest(&content));
        Ok(())
    }

    fn leading(&self) -> bool {
        self.leader.as_ref().is_none_or(|l| l.leading())
    }

    /// Runs the namespace controller while this replica leads, until shutdown.
    pub async fn run(self: Arc<Self>, shutdown: Shutdown) {
        let leader = self.leader.clone();
        super::controller::while_leading("configmap-publisher", leader, shutdown, |stop| {
            self.clone().controller(stop)
        })
        .await
    }

    /// One run of the controller, from fresh caches, until `stop`.
    async fn controller(self: Arc<Self>, stop: super::controller::Stop) {
        let (ns_cache, ns_writer) = reflector::store();
        let ns_stream = reflector::reflector(
            ns_writer,
            watcher(
                Api::<Namespace>::all(self.client.clone()),
                watcher::Config::default(),
            ),
        )
        .default_backoff()
        .touched_objects();
        // Only our two ConfigMaps, in every namespace: a label selector would miss one whose
        // label was removed, so select by name.
        let configmaps = |name: &str, api: Api<ConfigMap>| {
            let (cache, writer) = reflector::store::<ConfigMap>();
            let stream = reflector::reflector(
                writer,
                watcher(
                    api,
                    watcher::Config::default().fields(&format!("metadata.name={name}")),
                ),
            )
            .default_backoff()
            .touched_objects();
            (cache, stream)
        };
        let all = || Api::<ConfigMap>::all(self.client.clone());
        let (root_cache, root_stream) = configmaps(ROOT_CONFIGMAP, all());
        let (crl_cache, crl_stream) = configmaps(CRL_CONFIGMAP, all());
        // Linkerd's anchors live in one namespace: watched there only (a namespaced Role).
        let (linkerd_cache, linkerd_stream) = match self.linkerd_ns.get() {
            Some(ns) => {
                let api = Api::<ConfigMap>::namespaced(self.client.clone(), ns);
                let (cache, stream) = configmaps(LINKERD_ANCHORS_CONFIGMAP, api);
                (Some(cache), Some(stream))
            }
            None => (None, None),
        };
        let to_namespace = |cm: ConfigMap| {
            cm.metadata
                .namespace
                .map(|ns| ObjectRef::<Namespace>::new(&ns))
        };
        // `publish` can use the caches once each has listed once.
        let ready = {
            let (me, caches) = (
                self.clone(),
                (
                    ns_cache.clone(),
                    root_cache.clone(),
                    crl_cache.clone(),
                    linkerd_cache.clone(),
                ),
            );
            tokio::spawn(async move {
                // Re-polled on a short timer rather than awaited once: the controller waits
                // on the namespace store's readiness too, and kube-runtime's readiness signal
                // wakes only the last of several concurrent waiters.
                let ready = |c: &Cache<Namespace>| {
                    let c = c.clone();
                    async move {
                        while tokio::time::timeout(Duration::from_millis(100), c.wait_until_ready())
                            .await
                            .is_err()
                        {}
                    }
                };
                ready(&caches.0).await;
                let _ = caches.1.wait_until_ready().await;
                let _ = caches.2.wait_until_ready().await;
                if let Some(c) = &caches.3 {
                    let _ = c.wait_until_ready().await;
                }
                tracing::debug!("namespace and ConfigMap caches ready");
                *me.caches.lock().await = Some(caches);
            })
        };
        let controller = Controller::for_stream(ns_stream, ns_cache)
            .watches_stream(root_stream, to_namespace)
            .watches_stream(crl_stream, to_namespace);
        let controller = match linkerd_stream {
            Some(s) => controller.watches_stream(s, to_namespace),
            None => controller,
        };
        controller
            .graceful_shutdown_on(stop)
            .run(
                |ns, me: Arc<Self>| async move { me.reconcile_namespace(&ns).await },
                |ns, e, _| {
                    tracing::warn!(namespace = ns.metadata.name.as_deref().unwrap_or(""), error = %e, "ConfigMap reconcile failed; will retry");
                    Action::requeue(Duration::from_secs(5))
                },
                self.clone(),
            )
            .for_each(|_| std::future::ready(()))
            .await;
        ready.abort();
        // Lost the lease (or shutting down): nothing may act on these caches any more.
        *self.caches.lock().await = None;
        *self
            .jwks_confirmed
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// The controller's reconcile: one namespace, from the caches.
    async fn reconcile_namespace(&self, ns: &Namespace) -> Result<Action, PublishError> {
        let Some((_, root, crl, linkerd)) = self.caches.lock().await.clone() else {
            // The ConfigMap caches are still listing; come back shortly.
            return Ok(Action::requeue(Duration::from_secs(1)));
        };
        let mut caches = vec![&root, &crl];
        caches.extend(linkerd.as_ref());
        self.reconcile_one(ns, &caches)
            .await
            .map_err(PublishError)?;
        // The JWT bundle ConfigMap has no cache: it is read here, at the controller's look
        // at the CA namespace (its resync, or a namespace event), not at every full pass.
        if let Some(name) = ns.metadata.name.as_deref() {
            self.reconcile_jwks(name).await.map_err(PublishError)?;
        }
        Ok(Action::requeue(RESYNC))
    }

    /// A full pass: every namespace, [`PASS_CONCURRENCY`] at a time. One after another, a
    /// root rotation's bundle took one API round trip per namespace to reach the last of a
    /// thousand; a few writes in flight keep it to seconds without flooding the API server.
    async fn reconcile(
        &self,
        namespaces: &Cache<Namespace>,
        caches: &[&Cache<ConfigMap>],
    ) -> Result<(), String> {
        let results: Vec<Result<(), String>> = futures_util::stream::iter(namespaces.state())
            .map(|ns| async move { self.reconcile_one(&ns, caches).await })
            .buffer_unordered(PASS_CONCURRENCY)
            .collect()
            .await;
        // Every namespace was tried; the pass fails (and is retried) if any write failed.
        results.into_iter().collect()
    }

    /// Both ConfigMaps of one namespace (and Linkerd's anchors in its control-plane
    /// namespace), as desired now.
    async fn reconcile_one(
        &self,
        ns: &Namespace,
        caches: &[&Cache<ConfigMap>],
    ) -> Result<(), String> {
        let Some(name) = ns.metadata.name.as_deref() else {
            return Ok(());
        };
        if SKIPPED.contains(&name) || ns.metadata.deletion_timestamp.is_some() {
            return Ok(());
        }
        let want = self.desired.borrow().clone();
        let mut items: Vec<(&str, &str, Option<&String>)> = vec![
            (ROOT_CONFIGMAP, ROOT_KEY, want.bundle.as_ref()),
            (CRL_CONFIGMAP, CRL_KEY, want.crl.as_ref()),
        ];
        if self.linkerd_ns.get().map(String::as_str) == Some(name) {
            items.push((
                LINKERD_ANCHORS_CONFIGMAP,
                LINKERD_ANCHORS_KEY,
                want.bundle.as_ref(),
            ));
        }
        for (cm, key, content) in items {
            let Some(content) = content else { continue };
            let current = caches
                .iter()
                .find_map(|c| c.get(&ObjectRef::<ConfigMap>::new(cm).within(name)));
            self.ensure(name, cm, key, content, current.as_deref())
                .await?;
        }
        Ok(())
    }

    async fn ensure(
        &self,
        ns: &str,
        name: &str,
        key: &str,
        content: &str,
        current: Option<&ConfigMap>,
    ) -> Result<(), String> {
        let labelled = |c: &ConfigMap| {
            c.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("istio.io/config"))
                .map(String::as_str)
                == Some("true")
        };
        let held = current.and_then(|c| c.data.as_ref()?.get(key).map(String::as_str));
        if let Some(c) = current {
            if held == Some(content) && labelled(c) {
                return Ok(());
            }
        }
        // Someone else's change, not merely an older bundle or CRL of ours.
        let drifted =
            current.is_some_and(|c| !labelled(c) || held.is_none_or(|h| !self.published_before(h)));
        // Checked at each write, not only when the controller starts: a replica that was
        // paused past its lease must not write from what it saw before.
        if !self.leading() {
            return Err("this replica does not lead (any more); not writing".into());
        }
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), ns);
        let mut cm = ConfigMap {
            data: Some(BTreeMap::from([(key.to_string(), content.to_string())])),
            ..Default::default()
        };
        if name == LINKERD_ANCHORS_CONFIGMAP {
            cm.metadata.annotations = self.anchors_changed_at(current, held, content);
        }
        cm.metadata.name = Some(name.into());
        cm.metadata.labels = Some(BTreeMap::from([(
            "istio.io/config".to_string(),
            "true".to_string(),
        )]));
        let result = match current {
            None => api
                .create(&PostParams::default(), &cm)
                .await
                .map(|_| "created"),
            Some(c) => {
                cm.metadata.resource_version = c.metadata.resource_version.clone();
                api.replace(name, &PostParams::default(), &cm)
                    .await
                    .map(|_| "repaired")
            }
        };
        match result {
            Ok(what) => {
                self.writes.fetch_add(1, Ordering::Relaxed);
                tracing::info!(target: "citadel::audit", event = "configmap_published", namespace = ns, configmap = name, action = what, "published {name} in {ns}");
                if let Some(c) = current.filter(|_| drifted) {
                    self.record_repair(c, key).await;
                }
                Ok(())
            }
            // The namespace is going away: nothing to publish there.
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            // 409: someone wrote in between; 403: RBAC is missing a rule. Both are errors, so
            // the bundle is not counted as published; the next pass compares again.
            Err(e) => Err(format!("{ns}/{name}: {e}")),
        }
    }
}

impl ConfigMapPublisher {
    /// Records contents we were asked to publish: a ConfigMap holding one of the last
    /// [`HISTORY`] is merely outdated, not drifted.
    fn remember<'a>(&self, contents: impl IntoIterator<Item = &'a str>) {
        let mut seen = self.history.lock().unwrap_or_else(|p| p.into_inner());
        seen.extend(contents.into_iter().map(digest));
        let excess = seen.len().saturating_sub(HISTORY);
        seen.drain(..excess);
    }

    /// The `linkerd_drift::CHANGED_AT` annotation for Linkerd's anchors: kept while the set
    /// is the one held (a repaired label or annotation is no change of anchors), now when it
    /// changes. Compared as certificate sets, so a reformatted bundle is no change either.
    fn anchors_changed_at(
        &self,
        current: Option<&ConfigMap>,
        held: Option<&str>,
        content: &str,
    ) -> Option<BTreeMap<String, String>> {
        use super::linkerd_drift::CHANGED_AT;
        let set = |pem: &str| {
            crate::pki::pem::parse_certs(pem.as_bytes())
                .map(|v| {
                    v.into_iter()
                        .map(|c| c.to_vec())
                        .collect::<std::collections::BTreeSet<_>>()
                })
                .ok()
        };
        let kept = current
            .and_then(|c| c.metadata.annotations.as_ref()?.get(CHANGED_AT).cloned())
            .filter(|_| held.is_some_and(|h| set(h) == set(content)));
        let at = kept.or_else(|| {
            let now = self.clock.get()?.now();
            now.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })?;
        Some(BTreeMap::from([(CHANGED_AT.to_string(), at)]))
    }

    fn published_before(&self, content: &str) -> bool {
        let d = digest(content);
        self.history
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&d)
    }

    /// A Warning Event on a ConfigMap someone changed, so `kubectl describe` and event
    /// watchers see that citadel put it back. Best effort: a missing RBAC rule is logged.
    async fn record_repair(&self, cm: &ConfigMap, key: &str) {
        let note = format!(
            "{key} did not hold the current trust data (edited, or the istio.io/config label removed); citadel restored it"
        );
        record_drift(&self.recorder, &cm.object_ref(&()), note.clone()).await;
        let Some((ns, name)) = self.certificate_authority.get() else {
            return;
        };
        let ar = super::names::certificate_authority();
        let api: Api<kube::api::DynamicObject> = Api::namespaced_with(self.client.clone(), ns, &ar);
        if let Ok(Some(ca)) = api.get_opt(name).await {
            let where_ = format!(
                "{}/{}: ",
                cm.metadata.namespace.as_deref().unwrap_or_default(),
                cm.metadata.name.as_deref().unwrap_or_default()
            );
            record_drift(&self.recorder, &ca.object_ref(&ar), where_ + &note).await;
        }
    }
}

/// Records a `Drifted` Warning Event on `object`, which citadel just put back: what an
/// operator watching Events sees when someone edits what citadel owns. Best effort: a missing
/// RBAC rule is logged at debug, never fails the repair.
pub(crate) async fn record_drift(
    recorder: &Recorder,
    object: &k8s_openapi::api::core::v1::ObjectReference,
    note: String,
) {
    let ev = Event {
        type_: EventType::Warning,
        reason: "Drifted".into(),
        note: Some(note),
        action: "Repair".into(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&ev, object).await {
        tracing::debug!(error = %e, "could not record a Kubernetes Event");
    }
}

impl Publisher for ConfigMapPublisher {
    fn publish<'a>(
        &'a self,
        bundle: Option<&'a str>,
        crl: Option<&'a str>,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let changed = self.desired.send_if_modified(|d| {
                let mut next = d.clone();
                if let Some(b) = bundle {
                    next.bundle = Some(b.to_string());
                }
                if let Some(c) = crl {
                    next.crl = Some(c.to_string());
                }
                let changed = next != *d;
                *d = next;
                changed
            });
            if changed {
                tracing::debug!("desired bundle or CRL changed");
                self.remember(bundle.into_iter().chain(crl));
            }
            if !self.leading() {
                return Ok(());
            }
            // Reconcile now, every time: the caller counts the bundle as published only when
            // this succeeds, so a failed or not-yet-possible write must be an error (it is
            // retried on the next pass). Reconciling is idempotent and reads from the caches.
            let caches = self.caches.lock().await.clone();
            match caches {
                Some((ns, root, crl, linkerd)) => {
                    let mut caches = vec![&root, &crl];
                    caches.extend(linkerd.as_ref());
                    self.reconcile(&ns, &caches).await
                }
                None => Err("the namespace and ConfigMap watches are not ready yet".into()),
            }
        })
    }

    fn publish_jwks<'a>(&'a self, jwks: &'a str) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let changed = self.desired.send_if_modified(|d| {
                let changed = d.jwks.as_deref() != Some(jwks);
                d.jwks = Some(jwks.to_string());
                changed
            });
            if changed {
                self.remember([jwks]);
            }
            let Some(ns) = self.jwks_namespace.get().filter(|_| self.leading()) else {
                return Ok(());
            };
            let confirmed = *self
                .jwks_confirmed
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if confirmed == Some(digest(jwks)) {
                return Ok(());
            }
            // Like the bundle: Ok only once the ConfigMap holds it, since a new key's
            // activation waits from its publication.
            self.reconcile_jwks(ns).await
        })
    }
}
