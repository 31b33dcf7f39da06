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
use serde::Deserialize;

use crate::auth::pods::{PodIndex, PodRecord};
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
    /// The pod's service account. The API server's ServiceAccount admission fills in
    /// `default` when a pod names none; a pod that still has none (admission disabled) runs
    /// as no account here and vouches for nobody.
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
            service_account: self.spec.service_account_name.unwrap_or_default(),
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

/// The longest pause between two attempts to restart a broken watch.
const MAX_BACKOFF: std::time::Duration = std::time::Duration::from_secs(30);

/// Starts the watch: it fills `index` (marking it synced after the first complete list) and
/// keeps it current until shutdown.
///
/// After any error the watch is started afresh, with a complete list, after a backoff
/// (0.5 s doubling to 30 s): a watch resumed from its last resourceVersion delivers nothing
/// when nothing changed, so only a relist proves the index current again. The index is told
/// when the watch broke ([`PodIndex::watch_failed`]) and the relist clears it, so the
/// authorizer can bound how long it judges on pods it may no longer see change. A connection
/// that hangs without an error is given up about 55 s after its last event (see `timeout`
/// below), and counts as broken from when the reconnect then fails.
pub fn watch(client: kube::Client, index: Arc<PodIndex>, shutdown: Shutdown) {
    let api: kube::Api<PodLite> = kube::Api::all(client);
    // `any_semantic`: lists come from the API server's watch cache rather than etcd, as
    // informers' do; the watch then continues from that list's resourceVersion.
    // `timeout`: the API server ends each watch after 50 s and it resumes from its
    // resourceVersion (no list). The watcher treats 5 s past that without any item as a dead
    // connection, so a connection that hangs without an error is noticed within ~55 s
    // instead of the default ~295 s, which would outlast --pod-index-max-staleness.
    let cfg = watcher::Config::default()
        .fields(FIELD_SELECTOR)
        .any_semantic()
        .timeout(50);
    tokio::spawn(async move {
        let mut backoff = std::time::Duration::from_millis(500);
        loop {
            let mut events = watcher(api.clone(), cfg.clone()).boxed();
            // A relist is buffered (records only) and swapped in whole at InitDone, so
            // requests never see a half-listed index.
            let mut relist: Option<Vec<PodRecord>> = None;
            let error = loop {
                let event = tokio::select! {
                    e = events.next() => e,
                    _ = shutdown.wait() => return,
                };
                match event {
                    None => return,
                    Some(Err(e)) => break e,
                    Some(Ok(ev)) => match ev {
                        Event::Init => relist = Some(Vec::new()),
                        Event::InitApply(p) => {
                            if let (Some(buf), Some(r)) = (relist.as_mut(), p.record()) {
                                buf.push(r);
                            }
                        }
                        Event::InitDone => {
                            let pods = relist.take().unwrap_or_default();
                            if index.stale_for().is_some() {
                                tracing::info!(
                                    pods = pods.len(),
                                    "the pod watch recovered: pod index relisted"
                                );
                            } else {
                                tracing::info!(pods = pods.len(), "pod index synced");
                            }
                            index.replace_all(pods);
                            backoff = std::time::Duration::from_millis(500);
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
                    },
                }
            };
            // Say so once per outage, not per retry.
            if index.stale_for().is_none() {
                tracing::warn!(error = %error, "the pod watch failed; node impersonation uses the last known pods for at most --pod-index-max-staleness, then refuses (Unavailable) until a relist succeeds");
            }
            index.watch_failed();
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = shutdown.wait() => return,
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without ServiceAccount admission a pod may name no account: it must not count as
    /// `default`, or any trusted node proxy could impersonate `<ns>/default` on its node.
    #[test]
    fn a_pod_without_service_account_name_is_not_default() {
        let pod: PodLite = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "anon", "namespace": "shop", "uid": "u1"},
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "i"}]},
            "status": {"phase": "Running"}
        }))
        .unwrap();
        let r = pod.record().unwrap();
        assert_eq!(r.service_account, "");
        let index = PodIndex::default();
        index.replace_all([r]);
        assert!(!index.runs_on(
            "n1",
            &crate::identity::ServiceAccount::new("shop", "default").unwrap()
        ));
    }

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
