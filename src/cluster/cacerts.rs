//! The `cacerts` Secret as a plugged-in CA that changes while serving (`--store kube`).
//!
//! Every replica watches the Secret and offers each new version to its own
//! [`ca::reload::Reloader`], so every replica signs with the new CA moments after
//! `kubectl apply`; publishing the bundle to namespaces stays with the leader (the ConfigMap
//! publisher acts only while leading). Each outcome is a Kubernetes Event on the Secret:
//! `Normal CACertsInstalled` or `Warning CACertsRefused` naming the file and the problem, so
//! `kubectl describe secret cacerts` says why a swap did not happen.
//!
//! The root overlap after a swap (see `ca::reload`) is kept in the ConfigMap
//! `citadel-plugged-roots` (key `previous-roots.json`) beside the Secret: roots are public,
//! and a ConfigMap survives every replica's restart. Replicas merge their records with
//! compare-and-swap on the resourceVersion.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, ObjectReference, Secret};
use kube::api::{Api, PostParams};
use kube::runtime::events::{self, EventType, Recorder, Reporter};
use kube::runtime::{watcher, WatchStreamExt};
use time::OffsetDateTime;

use crate::ca::plugged::MapSource;
use crate::ca::reload::{prune, Outcome, Overlap, OverlapStore, Reloader};
use crate::future::BoxFuture;
use crate::shutdown::Shutdown;

/// The Secret Istio's plugged-in CA lives in.
pub const SECRET: &str = "cacerts";
/// The ConfigMap holding the previous roots still in the bundle.
pub const OVERLAP_CONFIGMAP: &str = "citadel-plugged-roots";
const OVERLAP_KEY: &str = "previous-roots.json";

/// The Secret's files as a [`MapSource`] named `Secret <ns>/cacerts/<file>` in messages.
pub fn source(namespace: &str, secret: &Secret) -> MapSource {
    MapSource {
        label: format!("Secret {namespace}/{SECRET}"),
        files: secret
            .data
            .clone()
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.0))
            .collect(),
    }
}

/// The overlap record in the ConfigMap `citadel-plugged-roots`.
pub struct KubeOverlap {
    api: Api<ConfigMap>,
}

impl KubeOverlap {
    /// The record in `namespace` (the CA's namespace, beside the `cacerts` Secret).
    pub fn new(client: kube::Client, namespace: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
        }
    }

    async fn read(&self) -> Result<(Overlap, Option<ConfigMap>), String> {
        let cm = self
            .api
            .get_opt(OVERLAP_CONFIGMAP)
            .await
            .map_err(|e| format!("cannot read ConfigMap {OVERLAP_CONFIGMAP}: {e}"))?;
        let overlap = match cm
            .as_ref()
            .and_then(|c| c.data.as_ref())
            .and_then(|d| d.get(OVERLAP_KEY))
        {
            Some(json) => serde_json::from_str(json).map_err(|e| {
                format!("ConfigMap {OVERLAP_CONFIGMAP}/{OVERLAP_KEY}: unreadable: {e}")
            })?,
            None => Overlap::default(),
        };
        Ok((overlap, cm))
    }
}

impl OverlapStore for KubeOverlap {
    fn load(&self) -> BoxFuture<'_, Result<Overlap, String>> {
        Box::pin(async move { Ok(self.read().await?.0) })
    }

    fn save<'a>(
        &'a self,
        overlap: &'a Overlap,
        now: OffsetDateTime,
    ) -> BoxFuture<'a, Result<Overlap, String>> {
        Box::pin(async move {
            for _ in 0..5 {
                let (stored, cm) = self.read().await?;
                let merged = stored.merge(overlap);
                let merged = prune(&merged, now).unwrap_or(merged);
                if cm.is_some() && merged == stored {
                    return Ok(merged);
                }
                let json = serde_json::to_string_pretty(&merged).map_err(|e| e.to_string())?;
                let mut next = cm.unwrap_or_default();
                next.metadata.name = Some(OVERLAP_CONFIGMAP.into());
                next.data = Some(BTreeMap::from([(OVERLAP_KEY.to_string(), json)]));
                let written = if next.metadata.resource_version.is_some() {
                    self.api
                        .replace(OVERLAP_CONFIGMAP, &PostParams::default(), &next)
                        .await
                } else {
                    self.api.create(&PostParams::default(), &next).await
                };
                match written {
                    Ok(_) => return Ok(merged),
                    Err(kube::Error::Api(s)) if s.code == 409 => continue,
                    Err(e) => {
                        return Err(format!("cannot write ConfigMap {OVERLAP_CONFIGMAP}: {e}"))
                    }
                }
            }
            Err(format!(
                "ConfigMap {OVERLAP_CONFIGMAP} kept changing under concurrent writers"
            ))
        })
    }
}

/// Watches the `cacerts` Secret in `namespace` and offers each version to `reloader`,
/// recording the outcome as an Event on the Secret; also ends root overlaps every
/// `tick`. Runs until shutdown.
pub fn watch(
    client: kube::Client,
    namespace: String,
    reloader: Arc<Reloader>,
    tick: std::time::Duration,
    shutdown: Shutdown,
) {
    tokio::spawn(reloader.clone().tick_every(tick, shutdown.clone()));
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "citadel".into(),
            instance: std::env::var("POD_NAME").ok(),
        },
    );
    let api: Api<Secret> = Api::namespaced(client, &namespace);
    let cfg = watcher::Config::default().fields(&format!("metadata.name={SECRET}"));
    tokio::spawn(async move {
        let mut events = watcher(api, cfg)
            .default_backoff()
            .touched_objects()
            .boxed();
        let mut failing = false;
        loop {
            let secret = tokio::select! {
                e = events.next() => match e {
                    Some(Ok(s)) => s,
                    Some(Err(err)) => {
                        if !failing {
                            tracing::warn!(namespace = %namespace, error = %err, "the cacerts Secret watch failed (RBAC: secrets get/list/watch?); the current CA keeps signing until it recovers");
                            failing = true;
                        }
                        continue;
                    }
                    None => return,
                },
                _ = shutdown.wait() => return,
            };
            failing = false;
            let outcome = reloader.offer(source(&namespace, &secret)).await;
            let (type_, reason, note) = match outcome {
                Outcome::Unchanged => continue,
                Outcome::Installed { signer, new_root } => (
                    EventType::Normal,
                    "CACertsInstalled",
                    if new_root {
                        format!("now signing with {signer}; the previous root stays in the trust bundle until every certificate it signed has expired")
                    } else {
                        format!("now signing with {signer} (same root)")
                    },
                ),
                Outcome::Refused(why) => (
                    EventType::Warning,
                    "CACertsRefused",
                    format!("{why}; the previous CA keeps signing"),
                ),
            };
            let ev = events::Event {
                type_,
                reason: reason.into(),
                note: Some(note),
                action: "LoadPluggedCA".into(),
                secondary: None,
            };
            let reference = ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Secret".into()),
                name: Some(SECRET.into()),
                namespace: Some(namespace.clone()),
                uid: secret.metadata.uid.clone(),
                resource_version: secret.metadata.resource_version.clone(),
                ..Default::default()
            };
            let recorder = recorder.clone();
            tokio::spawn(async move {
                if let Err(e) = recorder.publish(&ev, &reference).await {
                    tracing::debug!(error = %e, "could not record a Kubernetes Event");
                }
            });
        }
    });
}
