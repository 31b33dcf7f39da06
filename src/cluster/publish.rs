//! Publishes the trust bundle (`istio-ca-root-cert`, key `root-cert.pem`, label
//! `istio.io/config=true`) and the CRLs (`istio-ca-crl`, key `ca-crl.pem`) into every
//! namespace but kube-public and kube-node-lease.
//!
//! A reconcile loop: observe (reflector caches fed by ONE list-watch each of namespaces and
//! of the two ConfigMaps), compare, act. It writes only what differs, so it is idempotent and
//! quiet; it runs when the desired content changes, a namespace appears, or someone edits or
//! deletes a ConfigMap (drift is repaired and logged). Only the leader writes.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{Api, PostParams};
use kube::runtime::reflector::{self, Store as Cache};
use kube::runtime::{watcher, WatchStreamExt};
use tokio::sync::{watch, Mutex, Notify};

use crate::future::BoxFuture;
use crate::shutdown::Shutdown;
use crate::store::kube::Publisher;

/// The trust bundle ConfigMap, the name istio-agent mounts.
pub const ROOT_CONFIGMAP: &str = "istio-ca-root-cert";
/// The key of the bundle in that ConfigMap.
pub const ROOT_KEY: &str = "root-cert.pem";
/// The CRL ConfigMap.
pub const CRL_CONFIGMAP: &str = "istio-ca-crl";
/// The key of the CRLs in that ConfigMap.
pub const CRL_KEY: &str = "ca-crl.pem";
const SKIPPED: [&str; 2] = ["kube-public", "kube-node-lease"];

/// Namespaces, then the root-cert and CRL ConfigMaps, as the list-watches see them.
type Caches = (Cache<Namespace>, Cache<ConfigMap>, Cache<ConfigMap>);

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Desired {
    bundle: Option<String>,
    crl: Option<String>,
}

/// Publishes the bundle and CRLs into every namespace's ConfigMaps, reconciling drift.
pub struct ConfigMapPublisher {
    client: kube::Client,
    desired: watch::Sender<Desired>,
    leader: Option<watch::Receiver<bool>>,
    /// Filled once the watches run.
    caches: Mutex<Option<Caches>>,
    wake: Notify,
    /// ConfigMaps created or replaced.
    pub writes: AtomicU64,
}

impl ConfigMapPublisher {
    /// A publisher that writes only while `leader` says true (`None`: always).
    pub fn new(client: kube::Client, leader: Option<watch::Receiver<bool>>) -> Arc<Self> {
        Arc::new(Self {
            client,
            desired: watch::channel(Desired::default()).0,
            leader,
            caches: Mutex::new(None),
            wake: Notify::new(),
            writes: AtomicU64::new(0),
        })
    }

    fn leading(&self) -> bool {
        self.leader.as_ref().is_none_or(|l| *l.borrow())
    }

    /// Starts the list-watches and reconciles on every change until shutdown.
    pub async fn run(self: Arc<Self>, shutdown: Shutdown) {
        let (ns_cache, ns_writer) = reflector::store();
        let (cm_cache, cm_writer) = reflector::store();

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
        let cm_stream = reflector::reflector(
            cm_writer,
            watcher(
                Api::<ConfigMap>::all(self.client.clone()),
                watcher::Config::default().fields(&format!("metadata.name={ROOT_CONFIGMAP}")),
            )
            .default_backoff(),
        )
        .touched_objects();
        let crl_cache_and_stream = {
            let (c, w) = reflector::store::<ConfigMap>();
            let s = reflector::reflector(
                w,
                watcher(
                    Api::<ConfigMap>::all(self.client.clone()),
                    watcher::Config::default().fields(&format!("metadata.name={CRL_CONFIGMAP}")),
                )
                .default_backoff(),
            )
            .touched_objects();
            (c, s)
        };
        let crl_cache = crl_cache_and_stream.0.clone();
        let mut events = futures_util::stream::select(
            futures_util::stream::select(ns_stream.map(|_| ()), cm_stream.map(|_| ())),
            crl_cache_and_stream.1.map(|_| ()),
        )
        .boxed();
        // The reflectors fill only while their streams are polled: drive them in their own
        // task, and turn every event into a wake-up.
        let observed = Arc::new(Notify::new());
        let driver = {
            let observed = observed.clone();
            tokio::spawn(async move {
                while events.next().await.is_some() {
                    observed.notify_one();
                }
            })
        };
        let mut desired = self.desired.subscribe();
        let mut leader = self.leader.clone();
        let _ = ns_cache.wait_until_ready().await;
        let _ = cm_cache.wait_until_ready().await;
        let _ = crl_cache.wait_until_ready().await;
        *self.caches.lock().await = Some((ns_cache.clone(), cm_cache.clone(), crl_cache.clone()));
        loop {
            if self.leading() {
                if let Err(e) = self.reconcile(&ns_cache, &[&cm_cache, &crl_cache]).await {
                    tracing::warn!(error = %e, "ConfigMap reconcile failed; will retry");
                }
            }
            tokio::select! {
                _ = observed.notified() => {
                    // Coalesce a burst of watch events into one pass.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                _ = desired.changed() => {}
                _ = async { match leader.as_mut() { Some(l) => { let _ = l.changed().await; } None => std::future::pending().await } } => {}
                _ = self.wake.notified() => {}
                                _ = tokio::time::sleep(Duration::from_secs(60)) => {}
                _ = shutdown.wait() => {
                    driver.abort();
                    return;
                }
            }
        }
    }

    async fn reconcile(
        &self,
        namespaces: &Cache<Namespace>,
        caches: &[&Cache<ConfigMap>],
    ) -> Result<(), String> {
        let want = self.desired.borrow().clone();
        let items: Vec<(&str, &str, Option<&String>)> = vec![
            (ROOT_CONFIGMAP, ROOT_KEY, want.bundle.as_ref()),
            (CRL_CONFIGMAP, CRL_KEY, want.crl.as_ref()),
        ];
        for ns in namespaces.state() {
            let Some(name) = ns.metadata.name.as_deref() else {
                continue;
            };
            if SKIPPED.contains(&name) || ns.metadata.deletion_timestamp.is_some() {
                continue;
            }
            for (cm, key, content) in &items {
                let Some(content) = content else { continue };
                let current = caches.iter().flat_map(|c| c.state()).find(|c| {
                    c.metadata.name.as_deref() == Some(cm)
                        && c.metadata.namespace.as_deref() == Some(name)
                });
                self.ensure(name, cm, key, content, current.as_deref())
                    .await?;
            }
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
        if let Some(c) = current {
            if c.data.as_ref().and_then(|d| d.get(key)).map(String::as_str) == Some(content)
                && labelled(c)
            {
                return Ok(());
            }
        }
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), ns);
        let mut cm = ConfigMap {
            data: Some(BTreeMap::from([(key.to_string(), content.to_string())])),
            ..Default::default()
        };
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
            }
            if !self.leading() {
                return Ok(());
            }
            // Reconcile now, every time: the caller counts the bundle as published only when
            // this succeeds, so a failed or not-yet-possible write must be an error (it is
            // retried on the next pass). Reconciling is idempotent and reads from the caches.
            let caches = self.caches.lock().await.clone();
            match caches {
                Some((ns, root, crl)) => self.reconcile(&ns, &[&root, &crl]).await,
                None => Err("the namespace and ConfigMap watches are not ready yet".into()),
            }
        })
    }
}
