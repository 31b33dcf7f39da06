//! The reconciler. On every replica it follows the spec ([`Reconciler::follow_spec`]): on
//! each change of the resource (and every `--reconcile-interval`) it merges the spec over the
//! flags, swaps the result into the replica's [`LivePolicy`] (the issue path, the scheduler,
//! the CRL signers and the signing controllers read it there) and reports the generation it
//! runs in its own `status.replicas` entry. While this replica leads it also stores the
//! running policy with the CA state, acts on a rotation request, writes the status when it
//! changes, and records Events; that part runs on kube-runtime's `Controller` like every
//! other leader loop (`cluster::controller`): a pass on each change of the resource, and
//! `Action::requeue(--reconcile-interval)` after each pass because rotation stages fall due
//! with time.

use std::sync::Arc;
use std::time::Duration;

use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::Resource;

use super::policy::effective_policy;
use super::resource::CertificateAuthority;
use super::status::{merge_patch, signature_event, stage_event, status_for, Observed};
use super::validate::SpecCaps;
use crate::ca::policy::{CaPolicy, LivePolicy};
use crate::ca::Ca;
use crate::clock::SharedClock;
use crate::cluster::names::{ROOT_CONFIGMAP, ROOT_KEY};
use crate::shutdown::Shutdown;
use crate::store::Store;

/// Reads the resource, if the CRD is installed and the resource exists. A missing CRD is
/// `Ok(None)`: a cluster without it runs on flags alone.
pub async fn get(
    client: &kube::Client,
    namespace: &str,
    name: &str,
) -> Result<Option<CertificateAuthority>, String> {
    let api: Api<CertificateAuthority> = Api::namespaced(client.clone(), namespace);
    match api.get_opt(name).await {
        Ok(v) => Ok(v),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(None),
        Err(e) => Err(format!(
            "cannot read CertificateAuthority {namespace}/{name}: {e}"
        )),
    }
}

/// Reconciles one `CertificateAuthority` while this replica leads: stores the running
/// policy in the journal, acts on a rotation request, writes the status when it changes, and
/// records Events.
pub struct Reconciler {
    /// The API client.
    pub client: kube::Client,
    /// The CA namespace (the journal Secret's).
    pub namespace: String,
    /// The resource's name (`--ca-resource`).
    pub name: String,
    /// The journal.
    pub store: Arc<dyn Store>,
    /// The live CA, for `Ready`.
    pub ca: Arc<Ca>,
    /// Time.
    pub clock: SharedClock,
    /// The policy this server runs with: flags merged with the spec, swapped by
    /// [`Self::follow_spec`] whenever the spec changes.
    pub live: LivePolicy,
    /// Where it came from, stored with it (`flags` or `CertificateAuthority ns/name`).
    source: std::sync::Mutex<String>,
    /// This replica's name (`--pod-name`): its key in `status.replicas`.
    pub replica: String,
    /// The trust domain this replica signs for: a spec naming another is refused.
    pub trust_domain: String,
    /// `activate_after` came from an explicit flag (else it follows the max TTL).
    pub activate_after_from_flag: bool,
    /// The flags alone: what an unset spec field (or no resource) falls back to.
    pub flags: CaPolicy,
    /// What the spec may set at most.
    pub caps: SpecCaps,
    /// Wakes the scheduler after a rotation was prepared.
    pub wake: Arc<tokio::sync::Notify>,
    /// How often to reconcile without a watch event (stage deadlines are time-driven).
    pub interval: Duration,
    recorder: Recorder,
    /// Reasons of Warning events already recorded for the current problem (no repeats).
    last_warning: std::sync::Mutex<Option<String>>,
    /// Held while the policy is compared and stored.
    policy_lock: tokio::sync::Mutex<()>,
    /// Linkerd anchor drift, reported as `LinkerdAnchorsCurrent` when set
    /// ([`Reconciler::report_linkerd_drift`]).
    linkerd_drift: std::sync::OnceLock<Arc<crate::cluster::linkerd_drift::DriftStats>>,
}

/// A pass that failed; the controller retries it after `interval`.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ReconcileError(String);

/// A watch error that says the API server does not serve the kind (no CRD).
fn is_not_found(e: &kube::runtime::watcher::Error) -> bool {
    use kube::runtime::watcher::Error as W;
    match e {
        W::InitialListFailed(kube::Error::Api(s))
        | W::WatchStartFailed(kube::Error::Api(s))
        | W::WatchFailed(kube::Error::Api(s)) => s.code == 404,
        W::WatchError(s) => s.code == 404,
        _ => false,
    }
}

/// What one pass did, for tests and logs.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Pass {
    /// The resource exists.
    pub found: bool,
    /// A rotation was prepared for a new request.
    pub rotation_started: bool,
    /// The status was written.
    pub status_written: bool,
    /// The policy was written to the journal.
    pub policy_written: bool,
}

impl Reconciler {
    /// Also reports Linkerd anchor drift (`--linkerd-identity-domain`) as the condition
    /// `LinkerdAnchorsCurrent`, from the drift count's gauges. Set once, at start.
    pub fn report_linkerd_drift(&self, stats: Arc<crate::cluster::linkerd_drift::DriftStats>) {
        let _ = self.linkerd_drift.set(stats);
    }

    /// A reconciler for `namespace/name`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        client: kube::Client,
        namespace: &str,
        name: &str,
        store: Arc<dyn Store>,
        ca: Arc<Ca>,
        clock: SharedClock,
        live: LivePolicy,
        source: String,
        replica: &str,
        trust_domain: &str,
        flags: CaPolicy,
        activate_after_from_flag: bool,
        caps: SpecCaps,
        wake: Arc<tokio::sync::Notify>,
        interval: Duration,
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
            namespace: namespace.into(),
            name: name.into(),
            store,
            ca,
            clock,
            live,
            source: std::sync::Mutex::new(source),
            replica: replica.into(),
            trust_domain: trust_domain.into(),
            flags,
            activate_after_from_flag,
            caps,
            wake,
            interval,
            last_warning: std::sync::Mutex::new(None),
            policy_lock: tokio::sync::Mutex::new(()),
            linkerd_drift: std::sync::OnceLock::new(),
        })
    }

    /// Follows the spec on this replica, and reconciles while `leader` says this replica
    /// leads, until shutdown: on every change of the resource and `interval` after the last
    /// pass (stages fall due with time).
    pub async fn run(
        self: Arc<Self>,
        leader: Option<crate::leadership::Leadership>,
        shutdown: Shutdown,
    ) {
        tokio::join!(
            self.clone().follow_spec(shutdown.clone()),
            crate::cluster::controller::while_leading(
                "certificateauthority",
                leader,
                shutdown,
                |stop| self.clone().controller(stop),
            )
        );
    }

    /// Every replica, until shutdown: applies the spec on each change of the resource (a
    /// name-selected watch) and every `interval` (a missed event, a transient error).
    pub async fn follow_spec(self: Arc<Self>, shutdown: Shutdown) {
        use futures_util::StreamExt;
        use kube::runtime::{watcher, WatchStreamExt};
        let api: Api<CertificateAuthority> = Api::namespaced(self.client.clone(), &self.namespace);
        let cfg = watcher::Config::default().fields(&format!("metadata.name={}", self.name));
        // With backoff: without the CRD every LIST is refused (a cluster on flags alone).
        let mut changes = std::pin::pin!(watcher(api, cfg).default_backoff().touched_objects());
        loop {
            if let Err(e) = self.apply_spec().await {
                tracing::warn!(error = %e, "could not apply the CertificateAuthority spec; retrying");
            }
            tokio::select! {
                _ = shutdown.wait() => return,
                _ = tokio::time::sleep(self.interval) => {}
                change = changes.next() => match change {
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "CertificateAuthority watch (spec)");
                        tokio::time::sleep(self.interval).await;
                    }
                    None => tokio::time::sleep(self.interval).await,
                },
            }
        }
    }

    /// One reading of the spec on this replica: the policy it calls for is swapped in (or
    /// the previous one kept, with the reason), the scheduler is woken when it changed, and
    /// this replica's `status.replicas` entry is written when it differs. Whether the policy
    /// changed.
    pub async fn apply_spec(&self) -> Result<bool, String> {
        let cr = get(&self.client, &self.namespace, &self.name).await?;
        let label = format!("CertificateAuthority {}/{}", self.namespace, self.name);
        let outcome = super::live::decide(
            cr.as_ref().map(|c| &c.spec),
            &self.trust_domain,
            &self.flags,
            self.activate_after_from_flag,
            &self.caps,
        );
        let (changed, result) = match outcome {
            Ok((policy, summary)) => {
                let source = if cr.is_some() { label } else { "flags".into() };
                let changed = self.live.replace(policy);
                *self.source.lock().unwrap_or_else(|p| p.into_inner()) = source.clone();
                if changed {
                    tracing::info!(resource = %source, generation = ?cr.as_ref().and_then(|c| c.metadata.generation), "applied a new policy while serving: {summary}");
                    // Rotation timing and CRL validity: the scheduler replans now.
                    self.wake.notify_one();
                }
                (changed, Ok(()))
            }
            Err(refusal) => (false, Err(refusal)),
        };
        let Some(cr) = cr else { return Ok(changed) };
        let previous = cr
            .status
            .as_ref()
            .and_then(|s| s.replicas.get(&self.replica));
        let entry = super::live::entry(
            previous,
            cr.metadata.generation,
            &result,
            changed,
            self.clock.now().unix_timestamp(),
        );
        if previous != Some(&entry) {
            let api: Api<CertificateAuthority> =
                Api::namespaced(self.client.clone(), &self.namespace);
            api.patch_status(
                &self.name,
                &PatchParams::default(),
                &Patch::Merge(super::live::patch(&self.replica, &entry)),
            )
            .await
            .map_err(|e| format!("cannot write this replica's status entry: {e}"))?;
        }
        Ok(changed)
    }

    /// One kube-runtime `Controller` over the one resource (a field selector on its name),
    /// from a fresh cache, until `stop`. Each pass ends in `Action::requeue(interval)`, a
    /// failed one too, so the next pass comes on the next change of the resource or
    /// `interval` after this one, whichever is first: the timer is the requeue.
    ///
    /// The running policy is stored with the CA state whether the resource exists or not, so
    /// beside the controller [`Self::keep_policy`] stores it once per term of leadership.
    async fn controller(self: Arc<Self>, stop: crate::cluster::controller::Stop) {
        use futures_util::{FutureExt, StreamExt};
        use kube::runtime::controller::Action;
        use kube::runtime::{reflector, watcher, Controller, WatchStreamExt};
        let stop = stop.shared();
        let api: Api<CertificateAuthority> = Api::namespaced(self.client.clone(), &self.namespace);
        let cfg = watcher::Config::default().fields(&format!("metadata.name={}", self.name));
        let (cache, writer) = reflector::store();
        // With backoff: without the CRD every LIST is refused, and a cluster may run so for
        // good (on flags alone); retry calmly rather than in a tight loop.
        let trigger = watcher(api, cfg)
            .default_backoff()
            .reflect(writer)
            .applied_objects();
        let crd_missing_logged = std::sync::atomic::AtomicBool::new(false);
        let not_served = |e: &dyn std::fmt::Display| {
            if !crd_missing_logged.swap(true, std::sync::atomic::Ordering::Relaxed) {
                tracing::info!(error = %e, "CertificateAuthority resources are not served (CRD not installed?); running on flags");
            }
        };
        let controller = Controller::for_stream(trigger, cache)
            .graceful_shutdown_on(stop.clone())
            .run(
                // The object is only the trigger: the pass reads the resource afresh, so a
                // status it wrote a moment ago is never taken for the current one.
                |_cr, me: Arc<Self>| async move {
                    me.reconcile()
                        .await
                        .map(|_| Action::requeue(me.interval))
                        .map_err(ReconcileError)
                },
                |_cr, e, me: Arc<Self>| {
                    tracing::warn!(error = %e, resource = %format!("{}/{}", me.namespace, me.name), "CertificateAuthority reconcile failed; retrying");
                    Action::requeue(me.interval)
                },
                self.clone(),
            )
            .for_each(|r| {
                match r {
                    Err(kube::runtime::controller::Error::QueueError(e))
                        if is_not_found(&e) =>
                    {
                        not_served(&e)
                    }
                    Err(e) => tracing::debug!(error = %e, "CertificateAuthority controller"),
                    Ok(_) => {}
                }
                std::future::ready(())
            });
        tokio::join!(controller, self.clone().keep_policy(stop));
    }

    /// Stores the running policy with the CA state at the start of a term of leadership,
    /// retrying every `interval` until it is stored (or `stop`). Only the leader writes it, so
    /// within a term nothing else changes it; each pass of the controller checks it again.
    async fn keep_policy(
        self: Arc<Self>,
        stop: futures_util::future::Shared<crate::cluster::controller::Stop>,
    ) {
        loop {
            match self.store_policy().await {
                Ok(Some(_)) => return,
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "could not store the running policy with the CA state; retrying")
                }
            }
            tokio::select! {
                _ = stop.clone() => return,
                _ = tokio::time::sleep(self.interval) => {}
            }
        }
    }

    /// Writes the running policy into the journal if it holds another: `None` when there is
    /// no journal yet, else whether it wrote. One at a time (the controller's pass and
    /// [`Self::keep_policy`] may both try at the start of a term), so it is written once.
    async fn store_policy(&self) -> Result<Option<bool>, String> {
        let _one = self.policy_lock.lock().await;
        let Some(current) = self.store.load_journal().await.map_err(|e| e.to_string())? else {
            return Ok(None);
        };
        // The policy lives with the state, so CLI commands never need the server's flags.
        let source = self
            .source
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let stored = self.live.load().to_stored(&source);
        if current.value.policy.as_ref() == Some(&stored) {
            return Ok(Some(false));
        }
        crate::ca::update::update_journal(self.store.as_ref(), |j| {
            j.policy = Some(stored.clone());
            Ok(())
        })
        .await
        .map_err(|e| e.to_string())?;
        tracing::info!(source = %source, "stored the running policy with the CA state");
        Ok(Some(true))
    }

    async fn warn(&self, cr: &CertificateAuthority, reason: &str, note: String) {
        {
            let mut last = self.last_warning.lock().unwrap_or_else(|p| p.into_inner());
            let key = format!("{reason}:{note}");
            if last.as_deref() == Some(key.as_str()) {
                return;
            }
            *last = Some(key);
        }
        tracing::warn!(reason, note = %note, "CertificateAuthority needs attention");
        self.event(cr, EventType::Warning, reason, note).await;
    }

    async fn event(&self, cr: &CertificateAuthority, type_: EventType, reason: &str, note: String) {
        let ev = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, &cr.object_ref(&())).await {
            tracing::debug!(error = %e, "could not record a Kubernetes Event");
        }
    }

    /// Counts namespaces whose bundle ConfigMap holds `bundle`, out of those that should.
    async fn count_bundles(&self, bundle: &str) -> Result<(u32, u32), String> {
        use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
        let namespaces = Api::<Namespace>::all(self.client.clone())
            .list_metadata(&Default::default())
            .await
            .map_err(|e| format!("cannot list namespaces: {e}"))?;
        let wanted: Vec<String> = namespaces
            .items
            .into_iter()
            .filter(|n| n.metadata.deletion_timestamp.is_none())
            .filter_map(|n| n.metadata.name)
            .filter(|n| !["kube-public", "kube-node-lease"].contains(&n.as_str()))
            .collect();
        let lp =
            kube::api::ListParams::default().fields(&format!("metadata.name={}", ROOT_CONFIGMAP));
        let cms = Api::<ConfigMap>::all(self.client.clone())
            .list(&lp)
            .await
            .map_err(|e| format!("cannot list the bundle ConfigMaps: {e}"))?;
        let current = cms
            .items
            .iter()
            .filter(|c| {
                c.metadata
                    .namespace
                    .as_ref()
                    .is_some_and(|n| wanted.contains(n))
                    && c.data
                        .as_ref()
                        .and_then(|d| d.get(ROOT_KEY))
                        .is_some_and(|b| b.trim() == bundle.trim())
            })
            .count();
        Ok((current as u32, wanted.len() as u32))
    }

    /// One pass. Idempotent: with nothing new, it writes nothing.
    pub async fn reconcile(&self) -> Result<Pass, String> {
        let mut pass = Pass::default();
        match self.store_policy().await? {
            None => return Ok(pass),
            Some(written) => pass.policy_written = written,
        }
        let api: Api<CertificateAuthority> = Api::namespaced(self.client.clone(), &self.namespace);
        let cr = match api.get_opt(&self.name).await {
            Ok(Some(cr)) => cr,
            Ok(None) => return Ok(pass),
            Err(e) => return Err(e.to_string()),
        };
        pass.found = true;
        let now = self.clock.now();
        let mut degraded: Option<(String, String)> = None;
        let journal = self
            .store
            .load_journal()
            .await
            .map_err(|e| e.to_string())?
            .ok_or("the CA journal vanished")?
            .value;
        let td_mismatch = cr
            .spec
            .trust_domain
            .as_ref()
            .filter(|td| **td != journal.trust_domain);
        if let Some(td) = td_mismatch {
            let msg = format!(
                "spec.trustDomain {td:?} differs from the CA's trust domain {:?}; a CA cannot change trust domain: fix the spec",
                journal.trust_domain
            );
            self.warn(&cr, "TrustDomainMismatch", msg.clone()).await;
            degraded = Some(("TrustDomainMismatch".into(), msg));
        } else if let Err(e) = effective_policy(
            &cr.spec,
            &self.flags,
            self.activate_after_from_flag,
            &self.caps,
        ) {
            // A valid spec is applied live by every replica (`follow_spec`), each reporting it
            // in `status.replicas`; an invalid one is also the leader's `Degraded`.
            let msg = format!("the spec cannot be used: {e}; running with the previous policy");
            self.warn(&cr, "InvalidSpec", msg.clone()).await;
            degraded = Some(("InvalidSpec".into(), msg));
        }
        // A rotation request not handled yet: prepared and recorded in one journal write.
        if let (Some(req), None) = (&cr.spec.root_rotation, td_mismatch) {
            if journal.root_rotation_request.as_deref() != Some(req.request.as_str()) {
                let p = &self.live.rotation();
                let activate_after = if req.activate_immediately {
                    Duration::ZERO
                } else {
                    p.activate_after
                };
                let outcome = crate::ca::update::update_journal(self.store.as_ref(), |j| {
                    if j.root_rotation_request.as_deref() == Some(req.request.as_str()) {
                        return Ok(None);
                    }
                    j.root_rotation_request = Some(req.request.clone());
                    if let Some(r) = &j.root_rotation {
                        return Ok(Some(Err(r.stage())));
                    }
                    crate::ca::apply::prepare_root_rotation(
                        j,
                        now,
                        p,
                        "operator",
                        activate_after,
                        p.max_leaf_ttl,
                    )
                    .map_err(|e| e.to_string())?;
                    Ok(Some(Ok(())))
                })
                .await;
                match outcome {
                    Ok((Some(Ok(())), j, _)) => {
                        let new_root = j.root_rotation.as_ref().map(|r| r.new_root.clone());
                        tracing::info!(target: "citadel::audit", event = "root_rotation_prepared", request = %req.request, new_root = ?new_root, activate_after_secs = activate_after.as_secs(), "root rotation requested by CertificateAuthority {}/{}", self.namespace, self.name);
                        self.event(
                            &cr,
                            EventType::Normal,
                            "RootRotationRequested",
                            format!(
                                "request {:?}: new root {} prepared; it signs {} after the two-root bundle is published",
                                req.request,
                                new_root.unwrap_or_default(),
                                crate::duration::format(activate_after)
                            ),
                        )
                        .await;
                        self.wake.notify_one();
                        pass.rotation_started = true;
                    }
                    Ok((Some(Err(stage)), _, _)) => {
                        self.warn(
                            &cr,
                            "RootRotationRefused",
                            format!("request {:?} ignored: a root rotation is already in progress (stage {stage}); request another after it completes", req.request),
                        )
                        .await;
                    }
                    Ok((None, _, _)) => {}
                    Err(e) => {
                        let msg = format!("request {:?} failed: {e}", req.request);
                        self.warn(&cr, "RootRotationFailed", msg.clone()).await;
                        degraded = Some(("RootRotationFailed".into(), msg));
                    }
                }
            }
        }
        let journal = self
            .store
            .load_journal()
            .await
            .map_err(|e| e.to_string())?
            .ok_or("the CA journal vanished")?
            .value;
        let bundle: String = journal
            .trusted_roots()
            .map(|r| r.cert_pem.as_str())
            .collect();
        let counted = match self.count_bundles(&bundle).await {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::debug!(error = %e, "could not count the bundle ConfigMaps");
                None
            }
        };
        if degraded.is_none() {
            *self.last_warning.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
        // A PKCS#11 token that stopped answering: signatures are refused as unavailable
        // until it is back (never made with another key), which needs a person.
        if let (None, Some((false, msg))) = (&degraded, crate::ca::keysource::health()) {
            degraded = Some(("KeyUnavailable".into(), msg));
        }
        let observed = Observed {
            generation: cr.metadata.generation,
            now: now.unix_timestamp(),
            signer_not_after: self
                .ca
                .current()
                .map(|s| s.signing_cert().not_after.unix_timestamp()),
            bundle: counted,
            degraded,
            linkerd_drift: self.linkerd_drift.get().and_then(|d| d.counted()),
        };
        let status = status_for(&journal, &observed, cr.status.as_ref());
        let before = cr
            .status
            .as_ref()
            .and_then(|s| s.root_rotation.as_ref())
            .and_then(|r| r.stage.clone());
        let after = status.root_rotation.as_ref().and_then(|r| r.stage.clone());
        let reason_of = |s: Option<&crate::cluster::ca_resource::CertificateAuthorityStatus>| {
            s.and_then(|s| {
                s.conditions
                    .iter()
                    .find(|c| c.type_ == "IntermediateSignatureNeeded")
                    .map(|c| (c.reason.clone(), c.message.clone()))
            })
        };
        let sig_before = reason_of(cr.status.as_ref());
        let sig_after = reason_of(Some(&status));
        if cr.status.as_ref() != Some(&status) {
            api.patch_status(
                &self.name,
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({
                    "status": merge_patch(
                        &serde_json::to_value(cr.status.as_ref()).unwrap_or_default(),
                        serde_json::to_value(&status).unwrap_or_default(),
                    )
                })),
            )
            .await
            .map_err(|e| format!("cannot write the status: {e}"))?;
            pass.status_written = true;
            if let Some((reason, note)) = stage_event(before.as_deref(), after.as_deref()) {
                tracing::info!(reason = %reason, "{note}");
                self.event(&cr, EventType::Normal, &reason, note).await;
            }
            if let Some((warning, reason, note)) = signature_event(
                sig_before.as_ref().map(|(r, _)| r.as_str()),
                sig_after.as_ref().map(|(r, _)| r.as_str()),
                sig_after
                    .as_ref()
                    .map(|(_, m)| m.as_str())
                    .unwrap_or_default(),
            ) {
                tracing::info!(reason = %reason, "{note}");
                let kind = if warning {
                    EventType::Warning
                } else {
                    EventType::Normal
                };
                self.event(&cr, kind, &reason, note).await;
            }
        }
        Ok(pass)
    }
}
