//! The Pod Certificates controller: watches the requests of our signer (through the bounded
//! [`Pending`] cache), decides each through [`request::check`](super::request::check) and the
//! shared issue path, and writes the decision in one `/status` update.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::certificates::v1::PodCertificateRequest;
use kube::api::{Api, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::watcher;

use super::error::PodCertError;
use super::pending::STATS_NAMES;
use super::request::{self, Checks};
use super::status::{self, is_decided, jitter, reason, refresh_at, Decision};
use super::{PodCertConfig, MIN_LIFETIME_SECS};
use crate::auth::issue_path::{CsrInput, IssuePath, IssueRequest, Requester, Ttl, Vouched};
use crate::ca::policy::{LivePolicy, TtlPolicy};
use crate::ca::revocation::SweepRequest;
use crate::ca::Ca;
use crate::clock::SharedClock;
use crate::cluster::pending::{Bounded, PendingStats};
use crate::identity::TrustDomain;
use crate::shutdown::Shutdown;
use crate::store::index::IssuanceIndex;

/// The Pod Certificates signer of one replica.
pub struct PodCertSigner {
    client: kube::Client,
    leader: Option<crate::leadership::Leadership>,
    /// The shared issue path (sign, record, audit); requests are vouched for by [`request::check`].
    issue: IssuePath,
    trust_domain: TrustDomain,
    config: PodCertConfig,
    /// The running policy: its max TTL caps a request's lifetime, read per request.
    policy: LivePolicy,
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
        policy: LivePolicy,
    ) -> Arc<Self> {
        Arc::new(Self {
            client,
            leader,
            issue: IssuePath {
                ca,
                index,
                sweep,
                clock,
                // Unused: a request's lifetime follows its maxExpirationSeconds (Ttl::Exact).
                ttl: TtlPolicy::default().into(),
                // A vouched request names its identity; nobody impersonates here.
                node_auth: None,
            },
            trust_domain,
            stats: Arc::new(PendingStats::new(STATS_NAMES, config.max_pending)),
            config,
            policy,
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
        crate::cluster::controller::while_leading(
            "pod-certificate-signer",
            leader,
            shutdown,
            |stop| self.clone().controller(stop),
        )
        .await
    }

    /// The shared bounded-cache controller ([`crate::cluster::pending::run`]) over the
    /// requests of our signer: the API server filters by signer name.
    async fn controller(self: Arc<Self>, stop: crate::cluster::controller::Stop) {
        let b = Bounded {
            api: Api::all(self.client.clone()),
            config: watcher::Config::default()
                .fields(&format!("spec.signerName={}", self.config.signer_name)),
            ours: |_, _| true,
            limit: self.config.max_pending,
            stats: self.stats.clone(),
            workers: self.config.workers,
            retry: Duration::from_secs(2),
        };
        crate::cluster::pending::run(b, self.clone(), stop, |pcr, me: Arc<Self>| async move {
            me.reconcile(&pcr).await
        })
        .await
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

    /// Checks the request against the live objects and signs through the shared issue path,
    /// or says why not.
    async fn decide(&self, pcr: &PodCertificateRequest) -> Result<Decision, PodCertError> {
        let checks = Checks {
            client: &self.client,
            signer_name: &self.config.signer_name,
            trust_domain: &self.trust_domain,
            max_ttl: self.policy.ttl().max,
        };
        let c = match request::check(checks, pcr).await? {
            Ok(c) => c,
            Err(d) => return Ok(d),
        };
        let done = match self.issue.issue(IssueRequest {
            requester: Requester::Vouched(Vouched {
                identity: &c.identity,
                auth: "pod-certificate",
                caller: "",
                pod: &pcr.spec.pod_name,
                node: &pcr.spec.node_name,
                request: &c.request,
            }),
            csr: CsrInput::Key(&c.key),
            ttl: Ttl::Exact(c.ttl),
            min_lifetime: Some(Duration::from_secs(MIN_LIFETIME_SECS)),
        }) {
            Ok(done) => done,
            Err(e) => return status::decision(e, &describe(pcr)),
        };
        // Leaf first, then the CA certificates up to (not including) the roots, which pods
        // get from the ClusterTrustBundle.
        let chain = done.chain_without_roots();
        let issued = done.issued;
        let begin_refresh_at = refresh_at(issued.not_before, issued.not_after, jitter());
        Ok(Decision::Issue {
            chain,
            not_before: issued.not_before,
            not_after: issued.not_after,
            begin_refresh_at,
            serial: issued.serial_hex,
        })
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
        let now = self.issue.clock.now();
        let issued = matches!(decision, Decision::Issue { .. });
        let summary = match &decision {
            Decision::Issue { serial, .. } => format!("issued serial {serial}"),
            Decision::Deny { reason, .. } => format!("denied ({reason})"),
            Decision::Fail { reason, .. } => format!("failed ({reason})"),
        };
        let mut obj = pcr.clone();
        obj.status = Some(status::status(decision, now, pcr.metadata.generation));
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
                obj.status = Some(status::status(fail, now, pcr.metadata.generation));
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
