//! The `cacerts` Secret as a plugged-in CA that changes while serving (`--store kube`).
//!
//! Every replica watches the Secret and offers each new version to its own
//! [`ca::reload::Reloader`], so every replica signs with the new CA moments after
//! `kubectl apply`; publishing the bundle to namespaces stays with the leader (the ConfigMap
//! publisher acts only while leading). Each outcome is a Kubernetes Event on the Secret:
//! `Normal CACertsInstalled` or `Warning CACertsRefused` naming the file and the problem, so
//! `kubectl describe secret cacerts` says why a swap did not happen.
//!
//! The root overlap after a swap (see `ca::reload`) is kept in the Secret
//! `citadel-plugged-roots` (type Opaque, key `previous-roots.json`) beside `cacerts`. The
//! roots are public, but the record decides what citadel trusts: a ConfigMap there is
//! writable by far more people (namespace editors, config tooling) than the RBAC that pins
//! this Secret's name to citadel, and every entry is checked on load anyway (sealed under the
//! CA key, capped, CA-only; `ca::reload::Overlap::verified`). Replicas merge their records
//! with compare-and-swap on the resourceVersion. A ConfigMap of the same name, where older
//! releases kept the record, is never read for trust: its presence is logged once at start.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, ObjectReference, Secret};
use k8s_openapi::ByteString;
use kube::api::{Api, PostParams};
use kube::runtime::events::{self, EventType, Recorder, Reporter};
use kube::runtime::{watcher, WatchStreamExt};

use crate::ca::plugged::MapSource;
use crate::ca::reload::{Outcome, Overlap, OverlapStore, Reloader, UpdateFn};
use crate::future::BoxFuture;
use crate::shutdown::Shutdown;

/// The Secret Istio's plugged-in CA lives in.
pub const SECRET: &str = "cacerts";
/// The Secret holding the previous roots still in the bundle (type Opaque). The RBAC pins
/// `get` and `update` on it by name; `create` cannot be pinned (RBAC sees no name on create).
pub const OVERLAP_SECRET: &str = "citadel-plugged-roots";
/// Where releases before the Secret kept the record; ignored, its presence logged.
pub const LEGACY_OVERLAP_CONFIGMAP: &str = "citadel-plugged-roots";
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

/// The overlap record in the Secret `citadel-plugged-roots`.
pub struct KubeOverlap {
    api: Api<Secret>,
    configmaps: Api<ConfigMap>,
    namespace: String,
}

impl KubeOverlap {
    /// The record in `namespace` (the CA's namespace, beside the `cacerts` Secret).
    pub fn new(client: kube::Client, namespace: &str) -> Self {
        Self {
            api: Api::namespaced(client.clone(), namespace),
            configmaps: Api::namespaced(client, namespace),
            namespace: namespace.to_string(),
        }
    }

    async fn read(&self) -> Result<(Overlap, Option<Secret>), String> {
        let secret = self
            .api
            .get_opt(OVERLAP_SECRET)
            .await
            .map_err(|e| format!("cannot read Secret {OVERLAP_SECRET}: {e}"))?;
        let overlap = match secret
            .as_ref()
            .and_then(|c| c.data.as_ref())
            .and_then(|d| d.get(OVERLAP_KEY))
        {
            // Unreadable: replaced at the next write; it could add no trust anyway.
            Some(json) => serde_json::from_slice(&json.0).unwrap_or_else(|e| {
                tracing::warn!(secret = OVERLAP_SECRET, error = %e, "the previous-roots record is unreadable; ignoring it");
                Overlap::default()
            }),
            None => Overlap::default(),
        };
        Ok((overlap, secret))
    }

    /// Says once (this is called at start) that a record of an older release is there and
    /// ignored: it can add no trust, and its previous roots left the bundle at the upgrade.
    async fn note_legacy_configmap(&self) {
        if let Ok(Some(_)) = self.configmaps.get_opt(LEGACY_OVERLAP_CONFIGMAP).await {
            tracing::warn!(namespace = %self.namespace, configmap = LEGACY_OVERLAP_CONFIGMAP, "ignoring the ConfigMap an older citadel kept previous plugged-in roots in: the record now lives in the Secret of the same name, and roots in the ConfigMap are never trusted; delete it (docs/operations.md, \"Rotating a plugged-in CA\")");
        }
    }
}

impl OverlapStore for KubeOverlap {
    fn load(&self) -> BoxFuture<'_, Result<Overlap, String>> {
        Box::pin(async move {
            self.note_legacy_configmap().await;
            Ok(self.read().await?.0)
        })
    }

    fn update<'a>(&'a self, update: &'a UpdateFn<'a>) -> BoxFuture<'a, Result<Overlap, String>> {
        Box::pin(async move {
            for _ in 0..5 {
                let (stored, secret) = self.read().await?;
                let next = update(stored.clone());
                if secret.is_some() && next == stored {
                    return Ok(next);
                }
                let json = serde_json::to_vec_pretty(&next).map_err(|e| e.to_string())?;
                let mut obj = secret.unwrap_or_default();
                obj.metadata.name = Some(OVERLAP_SECRET.into());
                obj.type_ = Some("Opaque".into());
                obj.data = Some(BTreeMap::from([(
                    OVERLAP_KEY.to_string(),
                    ByteString(json),
                )]));
                let written = if obj.metadata.resource_version.is_some() {
                    self.api
                        .replace(OVERLAP_SECRET, &PostParams::default(), &obj)
                        .await
                } else {
                    self.api.create(&PostParams::default(), &obj).await
                };
                match written {
                    Ok(_) => return Ok(next),
                    Err(kube::Error::Api(s)) if s.code == 409 => continue,
                    Err(e) => return Err(format!("cannot write Secret {OVERLAP_SECRET}: {e}")),
                }
            }
            Err(format!(
                "Secret {OVERLAP_SECRET} kept changing under concurrent writers"
            ))
        })
    }
}

/// An Event's note is at most 1 kB (the API server refuses the Event otherwise, and the
/// defect it names would be lost): longer notes are cut at a character boundary.
fn fit_note(mut note: String) -> String {
    const MAX: usize = 1000;
    if note.len() > MAX {
        let mut cut = MAX - 3;
        while !note.is_char_boundary(cut) {
            cut -= 1;
        }
        note.truncate(cut);
        note.push_str("...");
    }
    note
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
                Outcome::Installed {
                    signer,
                    new_root,
                    warnings,
                } => {
                    let mut note = if new_root {
                        format!("now signing with {signer}; the previous root stays in the trust bundle until every certificate it signed has expired")
                    } else {
                        format!("now signing with {signer} (same root)")
                    };
                    for w in warnings {
                        note.push_str("; warning: ");
                        note.push_str(&w);
                    }
                    (EventType::Normal, "CACertsInstalled", note)
                }
                Outcome::Refused(why) => (
                    EventType::Warning,
                    "CACertsRefused",
                    format!("{why}; the previous CA keeps signing"),
                ),
            };
            let ev = events::Event {
                type_,
                reason: reason.into(),
                note: Some(fit_note(note)),
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
