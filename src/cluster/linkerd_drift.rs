//! Linkerd anchor drift (`--linkerd-identity-domain` with `--store kube`): how many running
//! meshed pods hold an older trust-anchor set than the one published now.
//!
//! Linkerd's proxies read their anchors once, when the pod is created: the proxy injector
//! writes the content of `linkerd-identity-trust-roots` inline into each injected pod's
//! `LINKERD2_PROXY_IDENTITY_TRUST_ANCHORS`, and the control plane's own pods take it from the
//! ConfigMap through a `configMapKeyRef` at container start. So a root rotation reaches a
//! proxy only when its pod is recreated, and an operator must know how many have not been
//! before the new root signs or the old one leaves the bundle. A pod is behind when
//!
//! - its proxy's anchors are inline and are not exactly the published set, or
//! - it reads them from the ConfigMap (or we cannot tell) and it started before the set last
//!   changed (`citadel.dev/anchors-changed-at`, written by the publisher with the bundle).
//!
//! [`behind`] is the pure rule; [`DriftWatch::run`] lists the meshed pods (label
//! `linkerd.io/control-plane-ns=<ns>`, phase Running) every period while this replica leads
//! and keeps the gauges `citadel_linkerd_anchor_drift_pods` and `citadel_linkerd_meshed_pods`,
//! and records an `AnchorDrift` Warning Event on the ConfigMap when the count becomes
//! non-zero, an `AnchorsCurrent` Normal Event when it returns to zero.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{Api, ListParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::Resource;
use time::OffsetDateTime;

use super::names::{LINKERD_ANCHORS_CONFIGMAP, LINKERD_ANCHORS_KEY};
use crate::shutdown::Shutdown;

/// The annotation on `linkerd-identity-trust-roots` saying when its anchor set last changed
/// (RFC 3339), written by the publisher.
pub const CHANGED_AT: &str = "citadel.dev/anchors-changed-at";
/// The environment variable Linkerd's proxy reads its anchors from.
pub const ANCHORS_ENV: &str = "LINKERD2_PROXY_IDENTITY_TRUST_ANCHORS";
/// The label Linkerd's injector puts on every meshed pod.
pub const MESHED_LABEL: &str = "linkerd.io/control-plane-ns";
/// The proxy's container name.
const PROXY_CONTAINER: &str = "linkerd-proxy";

/// The published anchor set, as a drift check needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Anchors {
    /// Each anchor's DER: the set compared, so PEM formatting and order do not matter.
    pub certs: BTreeSet<Vec<u8>>,
    /// When the set last changed.
    pub changed_at: OffsetDateTime,
}

impl Anchors {
    /// From the ConfigMap: its PEM bundle and the time it last changed (the annotation, or
    /// the ConfigMap's creation when there is none). `None` without a bundle.
    pub fn of(cm: &ConfigMap) -> Option<Self> {
        let pem = cm.data.as_ref()?.get(LINKERD_ANCHORS_KEY)?;
        let changed_at = cm
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(CHANGED_AT))
            .and_then(|t| {
                OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok()
            })
            .or_else(|| {
                let c = cm.metadata.creation_timestamp.as_ref()?;
                OffsetDateTime::from_unix_timestamp(c.0.as_second()).ok()
            })?;
        Some(Self {
            certs: der_set(pem),
            changed_at,
        })
    }
}

fn der_set(pem: &str) -> BTreeSet<Vec<u8>> {
    crate::pki::pem::parse_certs(pem.as_bytes())
        .map(|v| v.into_iter().map(|c| c.to_vec()).collect())
        .unwrap_or_default()
}

/// Whether `pod` runs with another anchor set than `anchors` (see the module doc).
pub fn behind(pod: &Pod, anchors: &Anchors) -> bool {
    let inline = pod
        .spec
        .as_ref()
        .and_then(|s| s.containers.iter().find(|c| c.name == PROXY_CONTAINER))
        .and_then(|c| c.env.as_ref()?.iter().find(|e| e.name == ANCHORS_ENV))
        .and_then(|e| e.value.as_deref());
    if let Some(pem) = inline {
        return der_set(pem) != anchors.certs;
    }
    let started = pod
        .status
        .as_ref()
        .and_then(|s| s.start_time.as_ref())
        .and_then(|t| OffsetDateTime::from_unix_timestamp(t.0.as_second()).ok());
    // A pod with no start time yet has not read anything: it will read the current set.
    started.is_some_and(|t| t < anchors.changed_at)
}

/// The drift gauges, read by the monitoring port.
#[derive(Debug, Default)]
pub struct DriftStats {
    /// Running meshed pods behind the published anchors; -1 until the first count.
    pub behind: AtomicI64,
    /// Running meshed pods counted.
    pub meshed: AtomicI64,
}

impl DriftStats {
    /// Gauges that report nothing yet (`behind` is -1 until the first count).
    pub fn new() -> Arc<Self> {
        let stats = Self::default();
        stats.behind.store(-1, Ordering::Relaxed);
        Arc::new(stats)
    }

    /// (pods behind, meshed pods), once counted.
    pub fn counted(&self) -> Option<(i64, i64)> {
        let behind = self.behind.load(Ordering::Relaxed);
        (behind >= 0).then(|| (behind, self.meshed.load(Ordering::Relaxed)))
    }

    /// The exposition text (a `Metrics` source).
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write;
        let _ = writeln!(out, "# HELP citadel_linkerd_anchor_drift_pods Running Linkerd-meshed pods whose proxy holds another trust-anchor set than the one published (started before it changed); -1 until counted.\n# TYPE citadel_linkerd_anchor_drift_pods gauge\ncitadel_linkerd_anchor_drift_pods {}", self.behind.load(Ordering::Relaxed));
        let _ = writeln!(out, "# HELP citadel_linkerd_meshed_pods Running Linkerd-meshed pods of the control plane citadel serves.\n# TYPE citadel_linkerd_meshed_pods gauge\ncitadel_linkerd_meshed_pods {}", self.meshed.load(Ordering::Relaxed));
    }
}

/// Counts the pods behind the published anchors, while this replica leads.
pub struct DriftWatch {
    client: kube::Client,
    namespace: String,
    leader: Option<crate::leadership::Leadership>,
    recorder: Recorder,
    /// The gauges.
    pub stats: Arc<DriftStats>,
}

impl DriftWatch {
    /// A watch of the control plane in `namespace`, counting into `stats`
    /// ([`DriftStats::new`]; the CertificateAuthority's status reads the same gauges).
    pub fn new(
        client: kube::Client,
        namespace: &str,
        leader: Option<crate::leadership::Leadership>,
        stats: Arc<DriftStats>,
    ) -> Self {
        Self {
            recorder: super::controller::recorder(client.clone()),
            client,
            namespace: namespace.to_string(),
            leader,
            stats,
        }
    }

    /// Counts every `period` while leading, until shutdown.
    pub async fn run(self, period: Duration, shutdown: Shutdown) {
        let me = Arc::new(self);
        let leader = me.leader.clone();
        super::controller::while_leading("linkerd-anchor-drift", leader, shutdown, |stop| {
            let me = me.clone();
            async move {
                let mut stop = stop;
                let mut last: Option<i64> = None;
                loop {
                    match me.count().await {
                        Ok(Some((behind, meshed, cm))) => {
                            me.stats.behind.store(behind, Ordering::Relaxed);
                            me.stats.meshed.store(meshed, Ordering::Relaxed);
                            if last.is_some_and(|l| (l > 0) != (behind > 0)) || (last.is_none() && behind > 0) {
                                me.report(&cm, behind, meshed).await;
                            }
                            last = Some(behind);
                        }
                        Ok(None) => {}
                        Err(e) => tracing::warn!(error = %e, "cannot count Linkerd anchor drift; will retry"),
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(period) => {}
                        _ = &mut stop => return,
                    }
                }
            }
        })
        .await
    }

    /// (pods behind, meshed pods, the ConfigMap), or `None` before the anchors are published.
    async fn count(&self) -> Result<Option<(i64, i64, ConfigMap)>, kube::Error> {
        let cms: Api<ConfigMap> = Api::namespaced(self.client.clone(), &self.namespace);
        let Some(cm) = cms.get_opt(LINKERD_ANCHORS_CONFIGMAP).await? else {
            return Ok(None);
        };
        let Some(anchors) = Anchors::of(&cm) else {
            return Ok(None);
        };
        let pods: Api<Pod> = Api::all(self.client.clone());
        let lp = ListParams::default()
            .labels(&format!("{MESHED_LABEL}={}", self.namespace))
            .fields("status.phase=Running");
        let list = pods.list(&lp).await?;
        let behind = list.items.iter().filter(|p| behind(p, &anchors)).count();
        Ok(Some((behind as i64, list.items.len() as i64, cm)))
    }

    /// An Event on the anchors ConfigMap when the count crosses zero. Best effort.
    async fn report(&self, cm: &ConfigMap, behind: i64, meshed: i64) {
        let (type_, reason, note) = if behind > 0 {
            (
                EventType::Warning,
                "AnchorDrift",
                format!("{behind} of {meshed} running meshed pods started before the current trust anchors; Linkerd's proxies read anchors only at pod start: restart them before the new root signs or an old root leaves the bundle"),
            )
        } else {
            (
                EventType::Normal,
                "AnchorsCurrent",
                format!("all {meshed} running meshed pods hold the current trust anchors"),
            )
        };
        tracing::info!(behind, meshed, "Linkerd anchor drift: {note}");
        let ev = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: "Count".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, &cm.object_ref(&())).await {
            tracing::debug!(error = %e, "could not record a Kubernetes Event");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::KeyType;

    fn root_pem(cn: &str) -> String {
        let key = KeyType::EcP256.generate().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.self_signed(&key).unwrap().pem()
    }

    fn pod(inline: Option<&str>, started: Option<i64>) -> Pod {
        let mut env =
            vec![serde_json::json!({"name": "LINKERD2_PROXY_IDENTITY_DIR", "value": "/x"})];
        match inline {
            Some(v) => env.push(serde_json::json!({"name": ANCHORS_ENV, "value": v})),
            None => env.push(serde_json::json!({"name": ANCHORS_ENV, "valueFrom": {"configMapKeyRef": {"name": LINKERD_ANCHORS_CONFIGMAP, "key": LINKERD_ANCHORS_KEY}}})),
        }
        let mut v = serde_json::json!({
            "metadata": {"name": "p"},
            "spec": {"containers": [{"name": "app"}, {"name": PROXY_CONTAINER, "env": env}]},
            "status": {"phase": "Running"}
        });
        if let Some(t) = started {
            v["status"]["startTime"] = OffsetDateTime::from_unix_timestamp(t)
                .unwrap()
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap()
                .into();
        }
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn a_pod_is_behind_when_its_inline_anchors_differ_or_it_started_before_the_change() {
        let (old, new) = (root_pem("old"), root_pem("new"));
        let both = format!("{new}{old}");
        let t = 1_900_000_000;
        let anchors = Anchors {
            certs: der_set(&both),
            changed_at: OffsetDateTime::from_unix_timestamp(t).unwrap(),
        };
        // Inline anchors: the set decides, not the order or the start time.
        assert!(behind(&pod(Some(&old), Some(t + 100)), &anchors));
        assert!(!behind(
            &pod(Some(&format!("{old}\n{new}")), Some(t - 100)),
            &anchors
        ));
        // From the ConfigMap: the start time against the change.
        assert!(behind(&pod(None, Some(t - 1)), &anchors));
        assert!(!behind(&pod(None, Some(t)), &anchors));
        assert!(!behind(&pod(None, None), &anchors));
    }

    #[test]
    fn the_change_time_is_the_annotation_or_the_creation() {
        let pem = root_pem("r");
        let mut cm: ConfigMap = serde_json::from_value(serde_json::json!({
            "metadata": {"name": LINKERD_ANCHORS_CONFIGMAP, "creationTimestamp": "2030-01-01T00:00:00Z"},
            "data": {LINKERD_ANCHORS_KEY: pem}
        }))
        .unwrap();
        assert_eq!(
            Anchors::of(&cm).unwrap().changed_at,
            time::macros::datetime!(2030-01-01 00:00 UTC)
        );
        cm.metadata.annotations =
            Some([(CHANGED_AT.to_string(), "2031-02-03T04:05:06Z".to_string())].into());
        let a = Anchors::of(&cm).unwrap();
        assert_eq!(
            a.changed_at,
            time::macros::datetime!(2031-02-03 04:05:06 UTC)
        );
        assert_eq!(a.certs.len(), 1);
        cm.data = None;
        assert_eq!(Anchors::of(&cm), None);
    }
}
