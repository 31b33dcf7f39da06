//! citadel as a signer for Kubernetes Pod Certificates (KEP-4317, `certificates.k8s.io/v1`
//! `PodCertificateRequest`): the kubelet asks for a certificate for one of its pods and mounts
//! it through a projected `podCertificate` volume; this controller issues the pod's SPIFFE
//! SVID `spiffe://<td>/ns/<ns>/sa/<sa>`, or denies the request with a reason.
//!
//! Only the leader signs: the controller runs under [`super::controller::while_leading`], so a
//! new leader lists every request again and picks up the undecided ones. Each request is
//! decided at most once: a decided request (an `Issued`, `Denied` or `Failed` condition) is
//! never touched, and the decision is written in ONE `/status` update carrying the
//! resourceVersion that was read. If that update conflicts, someone else wrote first; the
//! request is read again and left alone if it is decided. A crash between signing and that
//! write leaves a certificate nobody received (it is in the issuance index and the audit log,
//! so it stays revocable), never two certificates in a status. kube-runtime's `Controller`
//! is the bounded worker pool (`--pod-cert-workers` reconciles at once, one per request).
//!
//! What is checked, since the kubelet is trusted only for its own node (NodeRestriction
//! checks much of this at admission, but a request created by anyone else is not): the pod
//! exists with the request's UID, on the request's node, under the request's service
//! account, and mounts a projected `podCertificate` volume for our signer; the service
//! account and node exist with the request's UIDs; the key (from the stub PKCS#10 request,
//! whose signature the API server verified at admission and we verify again) is one we sign;
//! no `unverifiedUserAnnotations` (we recognise none); the identity is not denied
//! (`citadel revoke --identity`).
//!
//! What is NOT checked, because it cannot be: who created the request. Every fact above is
//! readable by whoever creates a request, and the object records no creator (its
//! managedFields name a field manager the client chooses, not the user). Only admission knows
//! the requester, so deploy/podcertificate-policy.yaml admits requests for our signer only
//! from `system:node:<spec.nodeName>` (group `system:nodes`); docs/kubernetes.md says what
//! each part (citadel, the policy, NodeRestriction) stops.
//!
//! Memory: the leader holds only *undecided* requests, slimmed to what deciding needs, and at
//! most `--pod-cert-max-pending` of them ([`Pending`]); a decided request leaves memory as
//! soon as its decision is seen, and requests that did not fit are listed again once half of
//! the room is free (`citadel_pod_cert_*` metrics, [`PendingStats`]).

use std::collections::HashSet;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{FutureExt, StreamExt, TryStreamExt};
use k8s_openapi::api::certificates::v1::{PodCertificateRequest, PodCertificateRequestStatus};
use k8s_openapi::api::core::v1::{Node, Pod, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, PostParams};
use kube::runtime::controller::{self, Action};
use kube::runtime::{reflector, watcher, Controller, WatchStreamExt};
use time::OffsetDateTime;

use crate::ca::issue::{audit_issued, sign_svid, AuditRecord, IssueFailure};
use crate::ca::revocation::SweepRequest;
use crate::ca::Ca;
use crate::clock::SharedClock;
use crate::identity::{self, TrustDomain};
use crate::pki::csr::{self, CsrError};
use crate::pki::{pem, profile};
use crate::shutdown::Shutdown;
use crate::store::index::IssuanceIndex;

/// The signer name citadel answers to by default. A signer name is `<domain>/<path>`;
/// operators who own another domain pick a name under it with `--pod-cert-signer-name`.
pub const DEFAULT_SIGNER_NAME: &str = "citadel.dev/spiffe";

/// The API's lower bound on a pod certificate's lifetime (`maxExpirationSeconds` minimum, and
/// the shortest leaf the API server accepts in status).
pub const MIN_LIFETIME_SECS: u64 = 3600;
/// `maxExpirationSeconds` when the request leaves it unset (the API's default).
pub const DEFAULT_MAX_EXPIRATION_SECS: u64 = 86_400;
/// beginRefreshAt must be at least this far from notBefore and from notAfter.
const REFRESH_MARGIN: time::Duration = time::Duration::minutes(10);

/// Condition types: exactly one of them, status True, ends a request.
const ISSUED: &str = "Issued";
const DENIED: &str = "Denied";
const FAILED: &str = "Failed";

/// Denial reasons, one per check (CamelCase, as conditions require).
pub mod reason {
    /// The key is of a type citadel does not certify (the API's well-known reason).
    pub const UNSUPPORTED_KEY_TYPE: &str = "UnsupportedKeyType";
    /// The stub PKCS#10 request is missing, malformed or badly signed.
    pub const INVALID_REQUEST: &str = "InvalidRequest";
    /// `unverifiedUserAnnotations` holds keys citadel does not recognise (it recognises none).
    pub const UNSUPPORTED_ANNOTATIONS: &str = "UnsupportedUserAnnotations";
    /// No pod of that name exists.
    pub const POD_NOT_FOUND: &str = "PodNotFound";
    /// The pod exists but with another UID (a different incarnation).
    pub const POD_UID_MISMATCH: &str = "PodUIDMismatch";
    /// The pod has finished (Succeeded or Failed) or is being deleted.
    pub const POD_TERMINATED: &str = "PodTerminated";
    /// The pod mounts no projected `podCertificate` volume for this signer, so its kubelet
    /// would never ask: the request comes from someone else.
    pub const NO_POD_CERTIFICATE_VOLUME: &str = "NoPodCertificateVolume";
    /// The pod is not bound to the request's node, or the node's UID differs.
    pub const NODE_MISMATCH: &str = "NodeMismatch";
    /// The pod runs under another service account, or the account's UID differs.
    pub const SERVICE_ACCOUNT_MISMATCH: &str = "ServiceAccountMismatch";
    /// The identity is on the deny list (`citadel revoke --identity`).
    pub const IDENTITY_DENIED: &str = "IdentityDenied";
    /// Issued reason.
    pub const ISSUED: &str = "Issued";
    /// The certificate could not be built, or the API server refused the issued status.
    pub const SIGNING_FAILED: &str = "SigningFailed";
}

/// `--pod-cert-max-pending` by default: undecided requests held in memory at most. A slimmed
/// request is about 1 KiB (at most ~12 KiB: the API caps the stub request at 10 KiB), so this
/// is a few MiB, while a healthy leader decides hundreds a second and rarely holds more than
/// a few dozen.
pub const DEFAULT_MAX_PENDING: usize = 4096;

/// How the signer is configured (`serve --pod-cert-signer-name`, `--pod-cert-workers`,
/// `--pod-cert-max-pending`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodCertConfig {
    /// The `signerName` this signer answers to.
    pub signer_name: String,
    /// Requests decided at once (kube-runtime controller concurrency).
    pub workers: u16,
    /// Undecided requests held in memory at most; the rest wait in the API server.
    pub max_pending: usize,
}

impl Default for PodCertConfig {
    fn default() -> Self {
        Self {
            signer_name: DEFAULT_SIGNER_NAME.into(),
            workers: 32,
            max_pending: DEFAULT_MAX_PENDING,
        }
    }
}

impl PodCertConfig {
    /// Refuses a signer name the API server would refuse, or one reserved for Kubernetes.
    pub fn validate(&self) -> Result<(), String> {
        validate_signer_name(&self.signer_name)?;
        if self.workers == 0 {
            return Err("--pod-cert-workers must be at least 1".into());
        }
        if self.max_pending == 0 {
            return Err("--pod-cert-max-pending must be at least 1".into());
        }
        Ok(())
    }
}

/// Whether the API server serves what the signer needs: `certificates.k8s.io/v1`
/// PodCertificateRequests (with their status) and ClusterTrustBundles (Kubernetes 1.37; the
/// v1beta1 forms of 1.34-1.36 are off by default there and not used). `Err` when discovery
/// itself failed.
pub async fn served(client: &kube::Client) -> Result<bool, String> {
    match client
        .list_api_group_resources("certificates.k8s.io/v1")
        .await
    {
        Ok(list) => {
            let has = |n: &str| list.resources.iter().any(|r| r.name == n);
            Ok(has("podcertificaterequests")
                && has("podcertificaterequests/status")
                && has("clustertrustbundles"))
        }
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(false),
        Err(e) => Err(format!("API discovery of certificates.k8s.io/v1: {e}")),
    }
}

/// A signer name is `<DNS subdomain>/<path>`; names under kubernetes.io and k8s.io are
/// reserved for the Kubernetes project. The ClusterTrustBundle name derived from it must stay
/// a valid object name.
pub fn validate_signer_name(name: &str) -> Result<(), String> {
    let bad = |why: &str| Err(format!("--pod-cert-signer-name {name:?}: {why}"));
    let Some((domain, path)) = name.split_once('/') else {
        return bad("must be <domain>/<path>, e.g. example.com/spiffe");
    };
    if path.is_empty() || path.contains('/') {
        return bad("the path after the domain must be one non-empty segment");
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if !domain.contains('.') || !domain.split('.').all(label_ok) {
        return bad("the domain must be a lowercase DNS name with a dot");
    }
    if !path
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-.".contains(&b))
    {
        return bad("the path may hold lowercase letters, digits, '-' and '.'");
    }
    if domain == "kubernetes.io"
        || domain.ends_with(".kubernetes.io")
        || domain == "k8s.io"
        || domain.ends_with(".k8s.io")
    {
        return bad("kubernetes.io and k8s.io signer names are reserved for Kubernetes");
    }
    if super::trustbundle::bundle_name(name).len() > 253 {
        return bad("too long for a ClusterTrustBundle name");
    }
    Ok(())
}

/// What the signer decided for one request.
#[derive(Debug)]
enum Decision {
    Issue {
        chain: String,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
        begin_refresh_at: OffsetDateTime,
        serial: String,
    },
    Deny {
        reason: &'static str,
        message: String,
    },
    Fail {
        reason: &'static str,
        message: String,
    },
}

fn deny(reason: &'static str, message: impl Into<String>) -> Decision {
    Decision::Deny {
        reason,
        message: message.into(),
    }
}

/// A reconcile that could not decide now (API server unreachable, CA not ready, not
/// leading); the controller retries it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PodCertError(String);

/// The Pod Certificates signer of one replica.
pub struct PodCertSigner {
    client: kube::Client,
    leader: Option<crate::leadership::Leadership>,
    ca: Arc<Ca>,
    index: Option<Arc<dyn IssuanceIndex>>,
    sweep: Arc<SweepRequest>,
    clock: SharedClock,
    trust_domain: TrustDomain,
    config: PodCertConfig,
    max_ttl: Duration,
    stats: Arc<PendingStats>,
}

impl PodCertSigner {
    /// A signer that acts only while `leader` says so (`None`: always).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        client: kube::Client,
        leader: Option<crate::leadership::Leadership>,
        ca: Arc<Ca>,
        index: Option<Arc<dyn IssuanceIndex>>,
        sweep: Arc<SweepRequest>,
        clock: SharedClock,
        trust_domain: TrustDomain,
        config: PodCertConfig,
        max_ttl: Duration,
    ) -> Arc<Self> {
        Arc::new(Self {
            client,
            leader,
            ca,
            index,
            sweep,
            clock,
            trust_domain,
            stats: Arc::new(PendingStats::new(config.max_pending)),
            config,
            max_ttl,
        })
    }

    /// What the signer holds in memory, for `/metrics`.
    pub fn stats(&self) -> Arc<PendingStats> {
        self.stats.clone()
    }

    fn leading(&self) -> bool {
        self.leader.as_ref().is_none_or(|l| l.leading())
    }

    /// Runs the controller while this replica leads, until shutdown.
    pub async fn run(self: Arc<Self>, shutdown: Shutdown) {
        tracing::info!(signer = %self.config.signer_name, workers = self.config.workers, "Pod Certificates signer enabled");
        let leader = self.leader.clone();
        super::controller::while_leading("pod-certificate-signer", leader, shutdown, |stop| {
            self.clone().controller(stop)
        })
        .await
    }

    /// One kube-runtime `Controller` over our own bounded store ([`Pending`]) rather than
    /// its default reflector, which would keep every request of our signer, decided or not,
    /// for as long as it exists. When requests had to be left out and half of the room is
    /// free again, this controller stops (gracefully: in-flight decisions finish) and a fresh
    /// one lists the undecided requests again.
    async fn controller(self: Arc<Self>, stop: super::controller::Stop) {
        let stop = stop.shared();
        loop {
            let relist = Arc::new(tokio::sync::Notify::new());
            let (reader, mut writer) = reflector::store::<PodCertificateRequest>();
            let mut pending = Pending::new(self.config.max_pending, self.stats.clone());
            let api: Api<PodCertificateRequest> = Api::all(self.client.clone());
            // The API server filters by signer: other signers' requests never reach us.
            let wc = watcher::Config::default()
                .fields(&format!("spec.signerName={}", self.config.signer_name));
            let notify = relist.clone();
            let trigger = watcher(api, wc)
                .map_ok(move |event| {
                    let (event, room) = pending.admit(event);
                    if room {
                        notify.notify_one();
                    }
                    if let Some(e) = &event {
                        writer.apply_watcher_event(e);
                    }
                    event
                })
                .try_filter_map(|e| std::future::ready(Ok(e)))
                .applied_objects();
            let relisting = Box::pin(async move { relist.notified().await });
            let until = futures_util::future::select(stop.clone(), relisting).map(|_| ());
            Controller::for_stream(trigger, reader)
                .with_config(controller::Config::default().concurrency(self.config.workers))
                .graceful_shutdown_on(until)
                .run(
                    |pcr, me: Arc<Self>| async move { me.reconcile(&pcr).await },
                    |pcr, e, _| {
                        tracing::warn!(request = %describe(&pcr), error = %e, "could not decide a PodCertificateRequest yet; will retry");
                        Action::requeue(Duration::from_secs(2))
                    },
                    self.clone(),
                )
                .for_each(|_| std::future::ready(()))
                .await;
            if stop.peek().is_some() {
                return;
            }
            self.stats.relists.fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                max_pending = self.config.max_pending,
                "listing PodCertificateRequests again: some did not fit in memory and there is room now"
            );
        }
    }

    async fn reconcile(&self, pcr: &PodCertificateRequest) -> Result<Action, PodCertError> {
        if is_decided(pcr) || pcr.spec.signer_name != self.config.signer_name {
            return Ok(Action::await_change());
        }
        // Not leading any more: sign nothing the new leader will sign again.
        if !self.leading() {
            return Err(PodCertError("this replica does not lead (any more)".into()));
        }
        let decision = self.decide(pcr).await?;
        self.write(pcr, decision).await
    }

    /// Checks the request against the live objects and signs, or says why not.
    async fn decide(&self, pcr: &PodCertificateRequest) -> Result<Decision, PodCertError> {
        let spec = &pcr.spec;
        let Some(ns) = pcr.metadata.namespace.as_deref() else {
            return Ok(deny(
                reason::INVALID_REQUEST,
                "the request has no namespace",
            ));
        };
        if let Some(a) = spec
            .unverified_user_annotations
            .as_ref()
            .filter(|a| !a.is_empty())
        {
            let keys: Vec<&str> = a.keys().take(5).map(String::as_str).collect();
            return Ok(deny(
                reason::UNSUPPORTED_ANNOTATIONS,
                format!("citadel recognises no unverifiedUserAnnotations; got {keys:?}"),
            ));
        }
        // The key first: no API call for a request we would refuse anyway.
        let key = match csr::parse_der(&spec.stub_pkc_s10_request.0) {
            Ok(c) => c.key,
            Err(CsrError::UnsupportedKey(why)) => {
                return Ok(deny(
                    reason::UNSUPPORTED_KEY_TYPE,
                    format!("{why}; citadel certifies ECDSA P-256 (preferred) or P-384, and RSA 3072 or 4096 keys"),
                ))
            }
            Err(e) => {
                return Ok(deny(
                    reason::INVALID_REQUEST,
                    format!("stubPKCS10Request: {e}"),
                ))
            }
        };
        if let Some(d) = self.check_live_objects(ns, pcr).await? {
            return Ok(d);
        }
        let sa = match identity::ServiceAccount::new(ns, &spec.service_account_name) {
            Ok(sa) => sa,
            Err(e) => return Ok(deny(reason::INVALID_REQUEST, e.to_string())),
        };
        let id = self.trust_domain.service_account_id(&sa);

        let max_exp = spec
            .max_expiration_seconds
            .map_or(DEFAULT_MAX_EXPIRATION_SECS, |s| s.max(0) as u64);
        if max_exp < MIN_LIFETIME_SECS {
            return Ok(deny(
                reason::INVALID_REQUEST,
                format!("maxExpirationSeconds {max_exp} is below the API minimum of {MIN_LIFETIME_SECS}"),
            ));
        }
        let lifetime = lifetime_secs(max_exp, self.max_ttl);
        // notBefore is backdated; the leaf's whole span (notAfter - notBefore) is what the API
        // compares with maxExpirationSeconds, so the backdate comes out of the lifetime.
        let backdate = profile::BACKDATE.whole_seconds().unsigned_abs();
        let ttl = Duration::from_secs(lifetime.saturating_sub(backdate));
        let now = self.clock.now();
        let (signer, issued) = match sign_svid(
            &self.ca,
            self.index.as_ref(),
            &self.sweep,
            &key,
            &id,
            now,
            ttl,
            false,
        ) {
            Ok(x) => x,
            Err(e @ IssueFailure::Denied { .. }) => {
                return Ok(deny(reason::IDENTITY_DENIED, e.to_string()))
            }
            Err(IssueFailure::Sign(e)) => {
                tracing::error!(request = %describe(pcr), error = %e, "pod certificate signing failed");
                return Ok(Decision::Fail {
                    reason: reason::SIGNING_FAILED,
                    message: "citadel could not build the certificate".into(),
                });
            }
            // Not ready, expired signer, index unavailable: a later attempt can succeed.
            Err(e) => return Err(PodCertError(e.to_string())),
        };
        let span = issued.not_after - issued.not_before;
        if span < time::Duration::seconds(MIN_LIFETIME_SECS as i64) {
            return Ok(Decision::Fail {
                reason: reason::SIGNING_FAILED,
                message: format!(
                    "the signing CA expires at {}, too soon for the API's 1h minimum lifetime",
                    issued.not_after
                ),
            });
        }
        let begin_refresh_at = refresh_at(issued.not_before, issued.not_after, jitter());
        let request = format!("{ns}/{}", pcr.metadata.name.as_deref().unwrap_or(""));
        let written = audit_issued(&AuditRecord {
            serial_hex: &issued.serial_hex,
            identity: &id.to_string(),
            caller: "",
            not_after: issued.not_after,
            key_type: &key.kind().to_string(),
            auth: "pod-certificate",
            pod: &spec.pod_name,
            node: &spec.node_name,
            request: &request,
            cluster: "",
        });
        if !written {
            return Err(PodCertError(
                "the audit log cannot be written; no certificate is handed out unaudited".into(),
            ));
        }
        // Leaf first, then the CA certificates up to (not including) the roots, which pods
        // get from the ClusterTrustBundle.
        let mut chain = issued.pem.clone();
        for c in signer.intermediates_der() {
            if !chain.ends_with('\n') {
                chain.push('\n');
            }
            chain.push_str(&pem::cert_to_pem(c));
        }
        Ok(Decision::Issue {
            chain,
            not_before: issued.not_before,
            not_after: issued.not_after,
            begin_refresh_at,
            serial: issued.serial_hex,
        })
    }

    /// The pod, its service account and its node, as they are now; `Some` denies.
    async fn check_live_objects(
        &self,
        ns: &str,
        pcr: &PodCertificateRequest,
    ) -> Result<Option<Decision>, PodCertError> {
        let spec = &pcr.spec;
        let api_err = |what: &str, e: kube::Error| PodCertError(format!("reading {what}: {e}"));
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), ns);
        let sas: Api<ServiceAccount> = Api::namespaced(self.client.clone(), ns);
        let nodes: Api<Node> = Api::all(self.client.clone());
        // Three independent reads, at once: one round trip of latency instead of three.
        let (pod, sa, node) = tokio::join!(
            pods.get_opt(&spec.pod_name),
            sas.get_opt(&spec.service_account_name),
            nodes.get_opt(&spec.node_name),
        );
        let pod = pod.map_err(|e| api_err("the pod", e))?;
        let sa = sa.map_err(|e| api_err("the service account", e))?;
        let node = node.map_err(|e| api_err("the node", e))?;
        let Some(pod) = pod else {
            return Ok(Some(deny(
                reason::POD_NOT_FOUND,
                format!("pod {ns}/{} does not exist", spec.pod_name),
            )));
        };
        if pod.metadata.uid.as_deref() != Some(spec.pod_uid.as_str()) {
            return Ok(Some(deny(
                reason::POD_UID_MISMATCH,
                format!(
                    "pod {ns}/{} has another UID than the request's {:?}",
                    spec.pod_name, spec.pod_uid
                ),
            )));
        }
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        if pod.metadata.deletion_timestamp.is_some()
            || matches!(phase, Some("Succeeded" | "Failed"))
        {
            return Ok(Some(deny(
                reason::POD_TERMINATED,
                format!(
                    "pod {ns}/{} has terminated or is being deleted",
                    spec.pod_name
                ),
            )));
        }
        if !mounts_pod_certificate(&pod, &self.config.signer_name) {
            return Ok(Some(deny(
                reason::NO_POD_CERTIFICATE_VOLUME,
                format!(
                    "pod {ns}/{} mounts no projected podCertificate volume for signer {:?}, so its kubelet would not ask for one",
                    spec.pod_name, self.config.signer_name
                ),
            )));
        }
        let pod_spec = pod.spec.as_ref();
        let pod_node = pod_spec.and_then(|s| s.node_name.as_deref());
        if pod_node != Some(spec.node_name.as_str()) {
            return Ok(Some(deny(
                reason::NODE_MISMATCH,
                format!(
                    "pod {ns}/{} is not bound to node {:?}",
                    spec.pod_name, spec.node_name
                ),
            )));
        }
        let pod_sa = pod_spec
            .and_then(|s| s.service_account_name.as_deref())
            .unwrap_or("default");
        if pod_sa != spec.service_account_name {
            return Ok(Some(deny(
                reason::SERVICE_ACCOUNT_MISMATCH,
                format!(
                    "pod {ns}/{} runs as service account {pod_sa:?}, not {:?}",
                    spec.pod_name, spec.service_account_name
                ),
            )));
        }
        if sa.as_ref().and_then(|s| s.metadata.uid.as_deref())
            != Some(spec.service_account_uid.as_str())
        {
            return Ok(Some(deny(
                reason::SERVICE_ACCOUNT_MISMATCH,
                format!(
                    "service account {ns}/{} does not exist with UID {:?}",
                    spec.service_account_name, spec.service_account_uid
                ),
            )));
        }
        if node.as_ref().and_then(|n| n.metadata.uid.as_deref()) != Some(spec.node_uid.as_str()) {
            return Ok(Some(deny(
                reason::NODE_MISMATCH,
                format!(
                    "node {:?} does not exist with UID {:?}",
                    spec.node_name, spec.node_uid
                ),
            )));
        }
        Ok(None)
    }

    /// Writes the decision in one `/status` update, conditional on the resourceVersion read.
    async fn write(
        &self,
        pcr: &PodCertificateRequest,
        decision: Decision,
    ) -> Result<Action, PodCertError> {
        let (Some(ns), Some(name)) = (
            pcr.metadata.namespace.as_deref(),
            pcr.metadata.name.as_deref(),
        ) else {
            return Ok(Action::await_change());
        };
        let api: Api<PodCertificateRequest> = Api::namespaced(self.client.clone(), ns);
        let now = self.clock.now();
        let issued = matches!(decision, Decision::Issue { .. });
        let summary = match &decision {
            Decision::Issue { serial, .. } => format!("issued serial {serial}"),
            Decision::Deny { reason, .. } => format!("denied ({reason})"),
            Decision::Fail { reason, .. } => format!("failed ({reason})"),
        };
        let mut obj = pcr.clone();
        obj.status = Some(status(decision, now, pcr.metadata.generation));
        // Checked at the write, not only when the controller started: a replica paused past
        // its lease must not decide from what it saw before.
        if !self.leading() {
            return Err(PodCertError(
                "this replica does not lead (any more); not writing".into(),
            ));
        }
        match api.replace_status(name, &PostParams::default(), &obj).await {
            Ok(_) => {
                tracing::info!(request = %format!("{ns}/{name}"), pod = %pcr.spec.pod_name, node = %pcr.spec.node_name, "PodCertificateRequest {summary}");
                Ok(Action::await_change())
            }
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(Action::await_change()),
            Err(kube::Error::Api(s)) if s.code == 409 => {
                // Someone wrote the request since we read it. If it is decided now, that
                // decision stands; otherwise the watch brings the new version and we retry.
                match api.get_opt(name).await {
                    Ok(Some(now)) if is_decided(&now) => {
                        tracing::info!(request = %format!("{ns}/{name}"), "PodCertificateRequest was decided by someone else; leaving it");
                        Ok(Action::await_change())
                    }
                    _ => Ok(Action::requeue(Duration::from_millis(200))),
                }
            }
            Err(kube::Error::Api(s)) if s.code == 422 && issued => {
                // The API server refused our certificate (clock skew beyond its 5 minutes,
                // say): say so in the request rather than retrying forever.
                tracing::error!(request = %format!("{ns}/{name}"), error = %s.message, "the API server refused the issued status");
                let msg: String = s.message.chars().take(1024).collect();
                let fail = Decision::Fail {
                    reason: reason::SIGNING_FAILED,
                    message: format!("the API server refused the issued certificate: {msg}"),
                };
                obj.status = Some(status(fail, now, pcr.metadata.generation));
                api.replace_status(name, &PostParams::default(), &obj)
                    .await
                    .map_err(|e| PodCertError(format!("{ns}/{name}: {e}")))?;
                Ok(Action::await_change())
            }
            Err(e) => Err(PodCertError(format!("{ns}/{name}: {e}"))),
        }
    }
}

/// Whether `pod` mounts a projected `podCertificate` volume source for `signer`: what the
/// kubelet acts on (and what NodeRestriction requires of a node's request). A request for a
/// pod without one did not come from the pod's kubelet.
pub fn mounts_pod_certificate(pod: &Pod, signer: &str) -> bool {
    pod.spec
        .iter()
        .flat_map(|s| s.volumes.iter().flatten())
        .filter_map(|v| v.projected.as_ref())
        .flat_map(|p| p.sources.iter().flatten())
        .filter_map(|src| src.pod_certificate.as_ref())
        .any(|pc| pc.signer_name == signer)
}

/// What the signer holds in memory, as `/metrics` shows it.
#[derive(Debug, Default)]
pub struct PendingStats {
    limit: usize,
    pending: AtomicUsize,
    peak: AtomicUsize,
    deferred: AtomicU64,
    relists: AtomicU64,
}

impl PendingStats {
    /// Stats for a cache of at most `limit` requests.
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            ..Self::default()
        }
    }

    fn set_pending(&self, n: usize) {
        self.pending.store(n, Ordering::Relaxed);
        self.peak.fetch_max(n, Ordering::Relaxed);
    }

    /// Appends the `citadel_pod_cert_*` metrics to a Prometheus text exposition.
    pub fn render(&self, out: &mut String) {
        let g = |o: &mut String, name: &str, kind: &str, help: &str, v: u64| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
        };
        g(out, "citadel_pod_cert_pending_requests", "gauge", "Undecided PodCertificateRequests the leader holds in memory (decided ones are dropped).", self.pending.load(Ordering::Relaxed) as u64);
        g(
            out,
            "citadel_pod_cert_pending_requests_peak",
            "gauge",
            "The most undecided PodCertificateRequests held in memory at once since start.",
            self.peak.load(Ordering::Relaxed) as u64,
        );
        g(
            out,
            "citadel_pod_cert_pending_limit",
            "gauge",
            "Undecided PodCertificateRequests held in memory at most (--pod-cert-max-pending).",
            self.limit as u64,
        );
        g(out, "citadel_pod_cert_requests_deferred_total", "counter", "Times a PodCertificateRequest was left in the API server because the in-memory limit was reached; it is listed again when there is room.", self.deferred.load(Ordering::Relaxed));
        g(out, "citadel_pod_cert_relists_total", "counter", "Times the signer listed PodCertificateRequests again to pick up ones left out at the limit.", self.relists.load(Ordering::Relaxed));
    }
}

/// The bounded in-memory set of requests the controller works from, as a filter in front of
/// its store: each watch event goes through [`Pending::admit`], which passes on what the
/// store should hold. It keeps only undecided requests, slimmed ([`slim`]); a request seen
/// decided is removed; a new one that would take the store (plus, during a listing, the
/// listing's buffer) past `limit` is left out and counted. After that, once the store has
/// emptied to half the limit, `admit` says so, and the caller lists again from scratch.
struct Pending {
    limit: usize,
    /// The (namespace, name) of every request in the store.
    keys: HashSet<(String, String)>,
    /// During a listing: the requests of the listing's buffer, which replaces the store at
    /// its end.
    listing: Option<HashSet<(String, String)>>,
    /// Some request was left out since the last listing began.
    left_out: bool,
    stats: Arc<PendingStats>,
}

type Event = watcher::Event<PodCertificateRequest>;

fn key(p: &PodCertificateRequest) -> (String, String) {
    (
        p.metadata.namespace.clone().unwrap_or_default(),
        p.metadata.name.clone().unwrap_or_default(),
    )
}

impl Pending {
    fn new(limit: usize, stats: Arc<PendingStats>) -> Self {
        stats.set_pending(0);
        Self {
            limit,
            keys: HashSet::new(),
            listing: None,
            left_out: false,
            stats,
        }
    }

    fn held(&self) -> usize {
        self.keys.len() + self.listing.as_ref().map_or(0, HashSet::len)
    }

    fn leave_out(&mut self) {
        self.left_out = true;
        self.stats.deferred.fetch_add(1, Ordering::Relaxed);
    }

    /// The event for the store (`None`: nothing to store), and whether it is time to list
    /// again (requests were left out and half the room is free).
    fn admit(&mut self, event: Event) -> (Option<Event>, bool) {
        let out = match event {
            Event::Apply(p) | Event::Delete(p) if is_decided(&p) => {
                self.keys.remove(&key(&p)).then_some(Event::Delete(p))
            }
            Event::Delete(p) => self.keys.remove(&key(&p)).then_some(Event::Delete(p)),
            Event::Apply(p) => {
                let k = key(&p);
                if self.keys.contains(&k) || self.held() < self.limit {
                    self.keys.insert(k);
                    Some(Event::Apply(slim(p)))
                } else {
                    self.leave_out();
                    None
                }
            }
            Event::Init => {
                self.listing = Some(HashSet::new());
                self.left_out = false;
                Some(Event::Init)
            }
            Event::InitApply(p) if is_decided(&p) => None,
            Event::InitApply(p) => {
                let k = key(&p);
                let known = self.listing.as_ref().is_some_and(|l| l.contains(&k));
                if known || self.held() < self.limit {
                    self.listing.get_or_insert_default().insert(k);
                    Some(Event::InitApply(slim(p)))
                } else {
                    self.leave_out();
                    None
                }
            }
            Event::InitDone => {
                self.keys = self.listing.take().unwrap_or_default();
                Some(Event::InitDone)
            }
        };
        self.stats.set_pending(self.held());
        let room = self.left_out && self.listing.is_none() && self.keys.len() <= self.limit / 2;
        if room {
            // Said once; the caller starts a fresh listing.
            self.left_out = false;
        }
        (out, room)
    }
}

/// A request as the store keeps it: what deciding and the one `/status` write need. Labels,
/// annotations, owner references and managedFields go (a status write cannot change them
/// anyway: the API server keeps the stored metadata and spec), and of
/// `unverifiedUserAnnotations` (up to 256 KiB) only the names the denial message shows.
fn slim(mut p: PodCertificateRequest) -> PodCertificateRequest {
    let m = &mut p.metadata;
    m.managed_fields = None;
    m.annotations = None;
    m.labels = None;
    m.owner_references = None;
    m.finalizers = None;
    if let Some(a) = p.spec.unverified_user_annotations.as_mut() {
        *a = a
            .keys()
            .take(5)
            .map(|k| (k.clone(), String::new()))
            .collect();
    }
    p
}

fn describe(pcr: &PodCertificateRequest) -> String {
    format!(
        "{}/{}",
        pcr.metadata.namespace.as_deref().unwrap_or(""),
        pcr.metadata.name.as_deref().unwrap_or("")
    )
}

/// Whether the request carries a terminal condition (Issued, Denied or Failed, status True).
pub fn is_decided(pcr: &PodCertificateRequest) -> bool {
    pcr.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| {
            cs.iter()
                .any(|c| [ISSUED, DENIED, FAILED].contains(&c.type_.as_str()) && c.status == "True")
        })
}

/// The leaf's whole lifetime in seconds: what the request allows, capped by `--max-ttl`, but
/// never under the API's one hour (the request's own maximum is at least that).
pub fn lifetime_secs(max_expiration_secs: u64, max_ttl: Duration) -> u64 {
    max_expiration_secs
        .min(max_ttl.as_secs())
        .max(MIN_LIFETIME_SECS)
        .min(max_expiration_secs)
}

/// A random fraction in [-1, 1): spreads refreshes so pods started together do not renew
/// together.
fn jitter() -> f64 {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 4];
    if ring::rand::SystemRandom::new().fill(&mut b).is_err() {
        return 0.0;
    }
    (u32::from_be_bytes(b) as f64 / u32::MAX as f64) * 2.0 - 1.0
}

/// When the kubelet should start refreshing: half the lifetime, moved by up to 5% of it
/// (`jitter` in [-1, 1]), and within the API's bounds (10 minutes after notBefore, 10 minutes
/// before notAfter).
pub fn refresh_at(nb: OffsetDateTime, na: OffsetDateTime, jitter: f64) -> OffsetDateTime {
    let life = na - nb;
    let j = jitter.clamp(-1.0, 1.0) * 0.05;
    let at = nb + life * (0.5 + j);
    let (lo, hi) = (nb + REFRESH_MARGIN, na - REFRESH_MARGIN);
    // Whole seconds: the API serialises times to the second, and truncating could otherwise
    // move a time at a bound past it.
    let at = at.max(lo).min(hi);
    let secs = at.unix_timestamp();
    let t = OffsetDateTime::from_unix_timestamp(secs).unwrap_or(at);
    if t < lo {
        OffsetDateTime::from_unix_timestamp(secs + 1).unwrap_or(at)
    } else {
        t
    }
}

fn k8s_time(t: OffsetDateTime) -> Time {
    // Certificate times are whole seconds; nothing is lost.
    Time(k8s_openapi::jiff::Timestamp::from_second(t.unix_timestamp()).unwrap_or_default())
}

fn status(
    d: Decision,
    now: OffsetDateTime,
    generation: Option<i64>,
) -> PodCertificateRequestStatus {
    let cond = |type_: &str, reason: &str, message: String| Condition {
        type_: type_.into(),
        status: "True".into(),
        reason: reason.into(),
        message,
        last_transition_time: k8s_time(now),
        observed_generation: generation,
    };
    match d {
        Decision::Issue {
            chain,
            not_before,
            not_after,
            begin_refresh_at,
            ..
        } => PodCertificateRequestStatus {
            certificate_chain: Some(chain),
            not_before: Some(k8s_time(not_before)),
            not_after: Some(k8s_time(not_after)),
            begin_refresh_at: Some(k8s_time(begin_refresh_at)),
            conditions: Some(vec![cond(
                ISSUED,
                reason::ISSUED,
                "citadel issued a SPIFFE SVID".into(),
            )]),
        },
        Decision::Deny { reason, message } => PodCertificateRequestStatus {
            conditions: Some(vec![cond(DENIED, reason, message)]),
            ..Default::default()
        },
        Decision::Fail { reason, message } => PodCertificateRequestStatus {
            conditions: Some(vec![cond(FAILED, reason, message)]),
            ..Default::default()
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn lifetime_is_the_request_capped_by_max_ttl_but_never_under_an_hour() {
        let h = |n: u64| Duration::from_secs(n * 3600);
        assert_eq!(lifetime_secs(86_400, h(90 * 24)), 86_400);
        assert_eq!(lifetime_secs(3600, h(90 * 24)), 3600);
        assert_eq!(lifetime_secs(7_200, h(1)), 3600);
        assert_eq!(lifetime_secs(86_400, Duration::from_secs(60)), 3600);
        assert_eq!(lifetime_secs(7_862_400, h(24)), 86_400);
    }

    #[test]
    fn refresh_is_near_half_life_and_within_the_api_bounds() {
        let nb = datetime!(2030-01-01 00:00 UTC);
        let na = nb + time::Duration::hours(24);
        assert_eq!(refresh_at(nb, na, 0.0), nb + time::Duration::hours(12));
        for j in [-1.0, -0.3, 0.7, 1.0, 5.0, f64::NAN] {
            let at = refresh_at(nb, na, if j.is_nan() { 0.0 } else { j });
            assert!(
                at >= nb + time::Duration::minutes(648) && at <= nb + time::Duration::minutes(792),
                "{at}"
            );
        }
        // The API's minimum lifetime: 1h, refresh in [10min, 50min].
        let na = nb + time::Duration::hours(1);
        for j in [-1.0, 0.0, 1.0] {
            let at = refresh_at(nb, na, j);
            assert!(
                at >= nb + REFRESH_MARGIN && at <= na - REFRESH_MARGIN,
                "{at}"
            );
        }
    }

    #[test]
    fn signer_names() {
        for ok in [
            DEFAULT_SIGNER_NAME,
            "example.com/spiffe",
            "mesh.corp.example/pod-svid.v1",
        ] {
            validate_signer_name(ok).unwrap();
        }
        for bad in [
            "spiffe",
            "example.com/",
            "example.com/a/b",
            "Example.com/x",
            "localhost/x",
            "kubernetes.io/x",
            "foo.k8s.io/x",
            "example.com/UPPER",
        ] {
            assert!(validate_signer_name(bad).is_err(), "{bad}");
        }
    }

    fn pcr(name: &str, decided: bool) -> PodCertificateRequest {
        let mut p: PodCertificateRequest = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "shop",
                         "annotations": {"big": "x".repeat(10_000)},
                         "managedFields": [{"manager": "kubelet", "operation": "Update"}]},
            "spec": {"signerName": DEFAULT_SIGNER_NAME, "podName": "web", "podUID": "u",
                     "serviceAccountName": "cart", "serviceAccountUID": "s",
                     "nodeName": "node-a", "nodeUID": "n", "stubPKCS10Request": ""},
        }))
        .unwrap();
        if decided {
            p.status = Some(status(
                deny(reason::POD_NOT_FOUND, "no"),
                datetime!(2030-01-01 00:00 UTC),
                None,
            ));
        }
        p
    }

    fn names(e: &Option<Event>) -> String {
        match e {
            Some(Event::Apply(p)) => format!("apply {}", p.metadata.name.as_deref().unwrap()),
            Some(Event::Delete(p)) => format!("delete {}", p.metadata.name.as_deref().unwrap()),
            Some(Event::InitApply(p)) => format!("list {}", p.metadata.name.as_deref().unwrap()),
            Some(Event::Init) => "init".into(),
            Some(Event::InitDone) => "done".into(),
            None => "-".into(),
        }
    }

    /// The store never holds more than the limit, decided requests leave it, and once requests
    /// were left out, half the room free asks for a new listing (once).
    #[test]
    fn pending_requests_are_bounded_and_decided_ones_leave() {
        let stats = Arc::new(PendingStats::new(3));
        let mut p = Pending::new(3, stats.clone());
        let mut admit = |e: Event| {
            let (out, room) = p.admit(e);
            (names(&out), room)
        };
        assert_eq!(admit(Event::Init), ("init".into(), false));
        for n in ["a", "b", "c"] {
            assert_eq!(
                admit(Event::InitApply(pcr(n, false))),
                (format!("list {n}"), false)
            );
        }
        // Decided ones are never stored; beyond the limit, left out.
        assert_eq!(
            admit(Event::InitApply(pcr("old", true))),
            ("-".into(), false)
        );
        assert_eq!(
            admit(Event::InitApply(pcr("d", false))),
            ("-".into(), false)
        );
        assert_eq!(admit(Event::InitDone), ("done".into(), false));
        assert_eq!(admit(Event::Apply(pcr("e", false))), ("-".into(), false));
        // An update of one it holds still passes when full.
        assert_eq!(
            admit(Event::Apply(pcr("a", false))),
            ("apply a".into(), false)
        );
        assert_eq!(stats.pending.load(Ordering::Relaxed), 3);
        assert_eq!(stats.deferred.load(Ordering::Relaxed), 2);
        // Decisions empty it; at half the limit (1), it is time to list again, said once.
        assert_eq!(
            admit(Event::Apply(pcr("a", true))),
            ("delete a".into(), false)
        );
        assert_eq!(
            admit(Event::Apply(pcr("b", true))),
            ("delete b".into(), true)
        );
        assert_eq!(
            admit(Event::Delete(pcr("c", false))),
            ("delete c".into(), false)
        );
        assert_eq!(
            admit(Event::Apply(pcr("b", true))),
            ("-".into(), false),
            "gone already"
        );
        assert_eq!(stats.pending.load(Ordering::Relaxed), 0);
        assert_eq!(stats.peak.load(Ordering::Relaxed), 3);
    }

    /// A new listing while the store is full counts against the same limit (the old store
    /// lives until the listing ends), and asks for a fresh one when it ends short.
    #[test]
    fn a_listing_and_the_store_together_stay_under_the_limit() {
        let stats = Arc::new(PendingStats::new(2));
        let mut p = Pending::new(2, stats.clone());
        for e in [
            Event::Init,
            Event::InitApply(pcr("a", false)),
            Event::InitApply(pcr("b", false)),
            Event::InitDone,
        ] {
            p.admit(e);
        }
        assert!(!p.admit(Event::Init).1);
        assert!(
            p.admit(Event::InitApply(pcr("a", false))).0.is_none(),
            "no room: a is in the old store"
        );
        assert_eq!(stats.peak.load(Ordering::Relaxed), 2);
        let (out, room) = p.admit(Event::InitDone);
        assert!(matches!(out, Some(Event::InitDone)));
        assert!(
            room,
            "the listing came up short: list again with an empty store"
        );
        assert_eq!(stats.pending.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn the_store_keeps_a_slim_request() {
        let mut p = pcr("a", false);
        p.spec.unverified_user_annotations = Some(
            (0..7)
                .map(|i| (format!("example.com/k{i}"), "v".repeat(1000)))
                .collect(),
        );
        let s = slim(p);
        assert!(s.metadata.annotations.is_none() && s.metadata.managed_fields.is_none());
        let a = s.spec.unverified_user_annotations.unwrap();
        assert_eq!(a.len(), 5, "still non-empty: the request is still denied");
        assert!(a.values().all(String::is_empty));
        assert_eq!(s.spec.pod_name, "web");
    }

    #[test]
    fn only_a_pod_certificate_volume_for_our_signer_counts() {
        let pod = |sources: serde_json::Value| -> Pod {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "web"},
                "spec": {"containers": [], "volumes": [
                    {"name": "empty", "emptyDir": {}},
                    {"name": "v", "projected": {"sources": sources}}]}
            }))
            .unwrap()
        };
        let pc = |signer: &str| serde_json::json!({"podCertificate": {"signerName": signer, "keyType": "ECDSAP256", "credentialBundlePath": "c.pem"}});
        let ctb = serde_json::json!({"clusterTrustBundle": {"signerName": DEFAULT_SIGNER_NAME, "path": "roots.pem"}});
        assert!(mounts_pod_certificate(
            &pod(serde_json::json!([ctb.clone(), pc(DEFAULT_SIGNER_NAME)])),
            DEFAULT_SIGNER_NAME
        ));
        assert!(!mounts_pod_certificate(
            &pod(serde_json::json!([ctb, pc("example.com/other")])),
            DEFAULT_SIGNER_NAME
        ));
        assert!(!mounts_pod_certificate(
            &pod(serde_json::json!([])),
            DEFAULT_SIGNER_NAME
        ));
        assert!(!mounts_pod_certificate(
            &Pod::default(),
            DEFAULT_SIGNER_NAME
        ));
    }

    #[test]
    fn a_decision_is_one_true_condition() {
        let now = datetime!(2030-01-01 00:00 UTC);
        let s = status(deny(reason::UNSUPPORTED_KEY_TYPE, "no"), now, Some(1));
        let c = s.conditions.unwrap();
        assert_eq!(c.len(), 1);
        assert_eq!(
            (c[0].type_.as_str(), c[0].status.as_str()),
            (DENIED, "True")
        );
        assert!(s.certificate_chain.is_none() && s.not_before.is_none());
    }
}
