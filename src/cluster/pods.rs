//! The one watch on Pods (all namespaces) behind node impersonation: it keeps
//! [`PodIndex`] current, so no request ever costs an API call.
//!
//! Only pods that are neither Failed nor Succeeded are listed and watched (a field selector,
//! as istiod's `status.phase!=Failed`): a pod that finishes leaves the watch as a deletion,
//! so the index never holds finished pods. Pods are decoded into [`PodLite`], which reads
//! only the fields the index keeps, instead of the full Pod with its containers and status.

use std::sync::Arc;

use futures_util::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::runtime::watcher::{self, watcher, Event};
use kube::runtime::WatchStreamExt;
use serde::Deserialize;

use crate::auth::node::{PodIndex, PodRecord};
use crate::shutdown::Shutdown;

/// Only running or pending pods: Failed and Succeeded ones may not vouch for a node.
pub const FIELD_SELECTOR: &str = "status.phase!=Failed,status.phase!=Succeeded";

/// A Pod as the watch decodes it: metadata, and of the spec and status only what the index
/// needs. Everything else in the JSON is skipped while parsing.
#[derive(Debug, Clone, Deserialize)]
pub struct PodLite {
    /// Name, namespace and UID.
    pub metadata: ObjectMeta,
    /// `spec.serviceAccountName` and `spec.nodeName`.
    #[serde(default)]
    pub spec: PodSpecLite,
    /// `status.phase`.
    #[serde(default)]
    pub status: PodStatusLite,
}

/// The two spec fields the index keeps.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpecLite {
    /// The pod's service account (`default` when unset, as the API server fills in).
    pub service_account_name: Option<String>,
    /// The node it is bound to; unset until scheduled.
    pub node_name: Option<String>,
}

/// The status field the index checks.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct PodStatusLite {
    /// Pending, Running, Succeeded, Failed or Unknown.
    pub phase: Option<String>,
}

impl kube::Resource for PodLite {
    type DynamicType = ();
    type Scope = kube::core::NamespaceResourceScope;

    fn kind(_: &()) -> std::borrow::Cow<'_, str> {
        "Pod".into()
    }
    fn group(_: &()) -> std::borrow::Cow<'_, str> {
        "".into()
    }
    fn version(_: &()) -> std::borrow::Cow<'_, str> {
        "v1".into()
    }
    fn plural(_: &()) -> std::borrow::Cow<'_, str> {
        "pods".into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

impl PodLite {
    /// What the index keeps, or `None` for a pod it must not hold: finished (Failed or
    /// Succeeded, should the API server ever send one), or without name, namespace or UID.
    pub fn record(self) -> Option<PodRecord> {
        if matches!(
            self.status.phase.as_deref(),
            Some("Failed") | Some("Succeeded")
        ) {
            return None;
        }
        Some(PodRecord {
            namespace: self.metadata.namespace?,
            name: self.metadata.name?,
            uid: self.metadata.uid?,
            service_account: self
                .spec
                .service_account_name
                .unwrap_or_else(|| "default".into()),
            node: self.spec.node_name.filter(|n| !n.is_empty()),
        })
    }

    fn key(&self) -> Option<(&str, &str)> {
        Some((
            self.metadata.namespace.as_deref()?,
            self.metadata.name.as_deref()?,
        ))
    }
}

/// Starts the watch: it fills `index` (marking it synced after the first complete list) and
/// keeps it current until shutdown, restarting with backoff after errors.
pub fn watch(client: kube::Client, index: Arc<PodIndex>, shutdown: Shutdown) {
    let api: kube::Api<PodLite> = kube::Api::all(client);
    // `any_semantic`: lists come from the API server's watch cache rather than etcd, as
    // informers' do; the watch then continues from that list's resourceVersion.
    let cfg = watcher::Config::default()
        .fields(FIELD_SELECTOR)
        .any_semantic();
    tokio::spawn(async move {
        let mut events = watcher(api, cfg).default_backoff().boxed();
        // A relist is buffered (records only) and swapped in whole at InitDone, so requests
        // never see a half-listed index.
        let mut relist: Option<Vec<PodRecord>> = None;
        let mut failing = false;
        loop {
            let event = tokio::select! {
                e = events.next() => e,
                _ = shutdown.wait() => return,
            };
            match event {
                None => return,
                Some(Err(e)) => {
                    // Backoff restarts the watch; say so once per outage, not per retry.
                    if !failing {
                        tracing::warn!(error = %e, "the pod watch failed; node impersonation uses the last known pods until it recovers");
                    }
                    failing = true;
                }
                Some(Ok(ev)) => {
                    if failing {
                        tracing::info!("the pod watch recovered");
                        failing = false;
                    }
                    match ev {
                        Event::Init => relist = Some(Vec::new()),
                        Event::InitApply(p) => {
                            if let (Some(buf), Some(r)) = (relist.as_mut(), p.record()) {
                                buf.push(r);
                            }
                        }
                        Event::InitDone => {
                            let pods = relist.take().unwrap_or_default();
                            tracing::info!(pods = pods.len(), "pod index synced");
                            index.replace_all(pods);
                        }
                        Event::Apply(p) => {
                            let key = p.key().map(|(n, m)| (n.to_string(), m.to_string()));
                            match (p.record(), key) {
                                (Some(r), _) => index.apply(r),
                                // It finished: it may vouch for its node no longer.
                                (None, Some((ns, name))) => index.delete(&ns, &name),
                                (None, None) => {}
                            }
                        }
                        Event::Delete(p) => {
                            if let Some((ns, name)) = p.key() {
                                index.delete(ns, name);
                            }
                        }
                    }
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_only_what_it_needs_and_drops_finished_pods() {
        let pod = |phase: &str| -> PodLite {
            serde_json::from_value(serde_json::json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "cart-1", "namespace": "shop", "uid": "u1", "labels": {"a": "b"}},
                "spec": {"serviceAccountName": "cart", "nodeName": "n1",
                         "containers": [{"name": "c", "image": "i"}]},
                "status": {"phase": phase, "conditions": []}
            }))
            .unwrap()
        };
        let r = pod("Running").record().unwrap();
        assert_eq!(
            r,
            PodRecord {
                namespace: "shop".into(),
                name: "cart-1".into(),
                uid: "u1".into(),
                service_account: "cart".into(),
                node: Some("n1".into()),
            }
        );
        assert!(pod("Failed").record().is_none());
        assert!(pod("Succeeded").record().is_none());
        let bare: PodLite =
            serde_json::from_value(serde_json::json!({"metadata": {"name": "x"}})).unwrap();
        assert!(bare.record().is_none(), "no namespace or UID");
    }
}
