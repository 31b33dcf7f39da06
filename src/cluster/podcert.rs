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
//! account; the service account and node exist with the request's UIDs; the key (from the
//! stub PKCS#10 request, whose signature the API server verified at admission and we verify
//! again) is one we sign; no `unverifiedUserAnnotations` (we recognise none); the identity is
//! not denied (`citadel revoke --identity`).

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::certificates::v1::{PodCertificateRequest, PodCertificateRequestStatus};
use k8s_openapi::api::core::v1::{Node, Pod, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, PostParams};
use kube::runtime::controller::{self, Action};
use kube::runtime::{watcher, Controller};
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

/// How the signer is configured (`serve --pod-cert-signer-name`, `--pod-cert-workers`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodCertConfig {
    /// The `signerName` this signer answers to.
    pub signer_name: String,
    /// Requests decided at once (kube-runtime controller concurrency).
    pub workers: u16,
}

impl PodCertConfig {
    /// Refuses a signer name the API server would refuse, or one reserved for Kubernetes.
    pub fn validate(&self) -> Result<(), String> {
        validate_signer_name(&self.signer_name)?;
        if self.workers == 0 {
            return Err("--pod-cert-workers must be at least 1".into());
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
            config,
            max_ttl,
        })
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

    async fn controller(self: Arc<Self>, stop: super::controller::Stop) {
        let api: Api<PodCertificateRequest> = Api::all(self.client.clone());
        // The API server filters by signer: other signers' requests never reach us.
        let wc = watcher::Config::default()
            .fields(&format!("spec.signerName={}", self.config.signer_name));
        Controller::new(api, wc)
            .with_config(controller::Config::default().concurrency(self.config.workers))
            .graceful_shutdown_on(stop)
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
