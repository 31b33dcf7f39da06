//! The CSR signer's controller: watches the CertificateSigningRequests of our signer names
//! (through the shared bounded cache, [`Pending`]), approves those of `--csr-auto-approve`
//! requesters, decides each Approved one through [`request::check`] and the shared issue path
//! of the CA its signer name maps to, and writes the answer in one `/status` update, with an
//! Event on the CSR.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use kube::api::{Api, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::watcher;
use kube::Resource;

use super::request::{self, CsrState, Rules};
use super::stats::CsrStats;
use super::status::{self, reason, Refusal, Retry, STATS_NAMES};
use super::{CsrSignerConfig, Route, MIN_EXPIRATION_SECS};
use crate::auth::issue_path::{
    CsrInput, IssueError, IssuePath, IssueRequest, Requester, Ttl, Vouched,
};
use crate::ca::issue::IssueFailure;
use crate::ca::policy::LivePolicy;
use crate::ca::revocation::SweepRequest;
use crate::ca::Ca;
use crate::clock::SharedClock;
use crate::cluster::pending::{Bounded, PendingStats};
use crate::identity::TrustDomain;
use crate::shutdown::Shutdown;
use crate::store::index::IssuanceIndex;

/// One signer name and the issue path of the CA mapped to it.
struct Served {
    name: String,
    path: IssuePath,
    /// A plugged-in CA mapped to this name: the deny list is citadel's own CA's, checked here.
    mapped: bool,
}

/// What one CSR gets.
enum Answer {
    Certificate {
        chain: String,
        serial: String,
        identity: String,
    },
    Failed(Refusal),
}

/// The Kubernetes CSR signer of one replica.
pub struct CsrSigner {
    client: kube::Client,
    leader: Option<crate::leadership::Leadership>,
    served: Vec<Served>,
    /// citadel's own CA: its deny list applies to every signer name.
    main: Arc<Ca>,
    trust_domain: TrustDomain,
    config: CsrSignerConfig,
    /// The running policy: its max TTL caps `expirationSeconds`, read per CSR.
    policy: LivePolicy,
    /// Where the roots Secret lives (`--namespace`).
    namespace: String,
    clock: SharedClock,
    pending: Arc<PendingStats>,
    stats: Arc<CsrStats>,
    recorder: Recorder,
}

impl CsrSigner {
    /// A signer for `routes` that acts only while `leader` says so (`None`: always).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        client: kube::Client,
        leader: Option<crate::leadership::Leadership>,
        routes: Vec<Route>,
        main: Arc<Ca>,
        index: Option<Arc<dyn IssuanceIndex>>,
        sweep: Arc<SweepRequest>,
        clock: SharedClock,
        trust_domain: TrustDomain,
        config: CsrSignerConfig,
        ttl: LivePolicy,
        namespace: &str,
    ) -> Arc<Self> {
        let served = routes
            .into_iter()
            .map(|r| Served {
                name: r.name,
                path: IssuePath {
                    ca: r.ca,
                    // A mapped CA is revoked upstream, as any plugged-in CA; its serials do
                    // not belong in citadel's own index and CRLs.
                    index: if r.mapped { None } else { index.clone() },
                    sweep: sweep.clone(),
                    clock: clock.clone(),
                    ttl: ttl.clone(),
                    // The requester named the identity; nobody impersonates here.
                    node_auth: None,
                },
                mapped: r.mapped,
            })
            .collect();
        Arc::new(Self {
            recorder: Recorder::new(
                client.clone(),
                Reporter {
                    controller: "citadel".into(),
                    instance: std::env::var("POD_NAME").ok(),
                },
            ),
            client,
            leader,
            served,
            main,
            trust_domain,
            pending: Arc::new(PendingStats::new(STATS_NAMES, config.max_pending)),
            stats: Arc::new(CsrStats::default()),
            config,
            policy: ttl,
            namespace: namespace.to_string(),
            clock,
        })
    }

    /// What the signer did and holds, for `/metrics`.
    pub fn render_metrics(&self, out: &mut String) {
        self.stats.render(out);
        self.pending.render(out);
    }

    fn leading(&self) -> bool {
        self.leader.as_ref().is_none_or(|l| l.leading())
    }

    fn served(&self, signer: &str) -> Option<&Served> {
        self.served.iter().find(|s| s.name == signer)
    }

    /// Runs the controller (and the roots Secret, when configured) while this replica leads,
    /// until shutdown.
    pub async fn run(self: Arc<Self>, shutdown: Shutdown) {
        let names: Vec<&str> = self.served.iter().map(|s| s.name.as_str()).collect();
        tracing::info!(signers = ?names, istiod = ?self.config.istiod_requesters, auto_approve = ?self.config.auto_approve, "Kubernetes CSR signer enabled");
        if let Some(secret) = self.config.root_secret.clone() {
            let mut cas: Vec<Arc<Ca>> = vec![];
            for s in &self.served {
                if !cas.iter().any(|c| Arc::ptr_eq(c, &s.path.ca)) {
                    cas.push(s.path.ca.clone());
                }
            }
            let (client, ns) = (self.client.clone(), self.namespace.clone());
            tokio::spawn(crate::cluster::controller::while_leading(
                "csr-signer-roots",
                self.leader.clone(),
                shutdown.clone(),
                move |stop| {
                    super::roots::keep(
                        client.clone(),
                        ns.clone(),
                        secret.clone(),
                        cas.clone(),
                        stop,
                    )
                },
            ));
        }
        let leader = self.leader.clone();
        crate::cluster::controller::while_leading("csr-signer", leader, shutdown, |stop| {
            self.clone().controller(stop)
        })
        .await
    }

    /// The shared bounded-cache controller ([`crate::cluster::pending::run`]) over the CSRs
    /// of our signer names. One name: the API server filters (other signers' CSRs never reach
    /// us). Several: one watch of all CSRs, others dropped before the cache.
    async fn controller(self: Arc<Self>, stop: crate::cluster::controller::Stop) {
        let config = match self.served.as_slice() {
            [one] => watcher::Config::default().fields(&format!("spec.signerName={}", one.name)),
            _ => watcher::Config::default(),
        };
        let b = Bounded {
            api: Api::all(self.client.clone()),
            config,
            ours: |me: &Self, c: &CertificateSigningRequest| {
                me.served(&c.spec.signer_name).is_some()
            },
            limit: self.config.max_pending,
            stats: self.pending.clone(),
            workers: self.config.workers,
            retry: Duration::from_secs(1),
        };
        crate::cluster::pending::run(b, self.clone(), stop, |csr, me: Arc<Self>| async move {
            me.reconcile(&csr).await
        })
        .await
    }

    async fn reconcile(&self, csr: &CertificateSigningRequest) -> Result<Action, Retry> {
        let Some(served) = self.served(&csr.spec.signer_name) else {
            return Ok(Action::await_change());
        };
        match request::state(csr) {
            CsrState::Decided => Ok(Action::await_change()),
            CsrState::AwaitingApproval => self.maybe_approve(csr).await,
            CsrState::Approved => {
                // Not leading any more: sign nothing the new leader will sign again.
                if !self.leading() {
                    return Err(Retry("this replica does not lead (any more)".into()));
                }
                let answer = self.decide(served, csr)?;
                self.write(csr, answer).await
            }
        }
    }

    /// Approves a CSR of a `--csr-auto-approve` requester (through `/approval`, conditional
    /// on the version read); leaves everyone else's to their approver.
    async fn maybe_approve(&self, csr: &CertificateSigningRequest) -> Result<Action, Retry> {
        let requester = csr.spec.username.as_deref().unwrap_or("");
        if !self.config.auto_approve.iter().any(|r| r == requester) {
            return Ok(Action::await_change());
        }
        if !self.leading() {
            return Err(Retry("this replica does not lead (any more)".into()));
        }
        let name = csr.metadata.name.as_deref().unwrap_or("");
        let api: Api<CertificateSigningRequest> = Api::all(self.client.clone());
        let obj = status::approval(csr, requester, self.clock.now());
        match api
            .replace_subresource("approval", name, &PostParams::default(), &obj)
            .await
        {
            Ok(_) => {
                self.stats.approved();
                tracing::info!(csr = %name, requester = %crate::audit::shown(requester), "approved a CertificateSigningRequest (--csr-auto-approve)");
                Ok(Action::await_change())
            }
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {
                Ok(Action::await_change())
            }
            Err(e) => Err(Retry(format!("approving {name}: {e}"))),
        }
    }

    /// Checks the CSR and signs it with the CA its signer name maps to, or says why not.
    fn decide(&self, served: &Served, csr: &CertificateSigningRequest) -> Result<Answer, Retry> {
        let name = csr.metadata.name.as_deref().unwrap_or("");
        let rules = Rules {
            trust_domain: &self.trust_domain,
            istiod_requesters: &self.config.istiod_requesters,
            max_ttl: self.policy.ttl().max,
        };
        let c = match request::check(rules, csr) {
            Ok(c) => c,
            Err(r) => return Ok(Answer::Failed(r)),
        };
        // A mapped CA has no deny list of its own: citadel's applies, before and after signing.
        let denied = || {
            served.mapped
                && self
                    .main
                    .current()
                    .is_some_and(|s| s.is_denied(&c.identity.to_string()))
        };
        let deny = |after_signing| {
            status::refusal(
                IssueError::Ca(IssueFailure::Denied {
                    identity: c.identity.to_string(),
                    after_signing,
                }),
                name,
            )
            .map(Answer::Failed)
        };
        if denied() {
            return deny(false);
        }
        let request = format!("csr/{name}");
        let done = match served.path.issue(IssueRequest {
            requester: Requester::Vouched(Vouched {
                identity: &c.identity,
                auth: "kubernetes-csr",
                caller: &c.requester,
                pod: "",
                node: "",
                request: &request,
            }),
            csr: CsrInput::Pem(&csr.spec.request.0),
            ttl: Ttl::Requested(c.ttl_secs),
            min_lifetime: Some(Duration::from_secs(MIN_EXPIRATION_SECS)),
        }) {
            Ok(done) => done,
            Err(e) => return status::refusal(e, name).map(Answer::Failed),
        };
        if denied() {
            return deny(true);
        }
        Ok(Answer::Certificate {
            chain: done.chain_without_roots(),
            serial: done.issued.serial_hex.clone(),
            identity: done.identity.to_string(),
        })
    }

    /// Writes the answer in one `/status` update, conditional on the resourceVersion read,
    /// then counts it and records an Event on the CSR.
    async fn write(
        &self,
        csr: &CertificateSigningRequest,
        answer: Answer,
    ) -> Result<Action, Retry> {
        let name = csr.metadata.name.as_deref().unwrap_or("");
        let api: Api<CertificateSigningRequest> = Api::all(self.client.clone());
        let now = self.clock.now();
        let obj = match &answer {
            Answer::Certificate { chain, .. } => status::issued(csr, chain),
            Answer::Failed(r) => status::failed(csr, r, now),
        };
        // Checked at the write too: a replica paused past its lease must not answer from
        // what it saw before.
        if !self.leading() {
            return Err(Retry(
                "this replica does not lead (any more); not writing".into(),
            ));
        }
        let answer = match api.replace_status(name, &PostParams::default(), &obj).await {
            Ok(_) => answer,
            Err(kube::Error::Api(s)) if s.code == 404 => return Ok(Action::await_change()),
            Err(kube::Error::Api(s)) if s.code == 409 => {
                // Someone wrote the CSR since we read it; if it is decided now, that stands,
                // otherwise the watch brings the new version and we try again.
                return match api.get_opt(name).await {
                    Ok(Some(now)) if status::is_decided(&now) => Ok(Action::await_change()),
                    _ => Ok(Action::requeue(Duration::from_millis(200))),
                };
            }
            Err(kube::Error::Api(s))
                if s.code == 422 && matches!(answer, Answer::Certificate { .. }) =>
            {
                tracing::error!(csr = %name, error = %s.message, "the API server refused the issued certificate");
                let msg: String = s.message.chars().take(1024).collect();
                let r = status::refuse(
                    reason::SIGNING_FAILED,
                    format!("the API server refused the issued certificate: {msg}"),
                );
                api.replace_status(name, &PostParams::default(), &status::failed(csr, &r, now))
                    .await
                    .map_err(|e| Retry(format!("{name}: {e}")))?;
                Answer::Failed(r)
            }
            Err(e) => return Err(Retry(format!("{name}: {e}"))),
        };
        let created = csr
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0.as_second())
            .unwrap_or(now.unix_timestamp());
        let latency = Duration::from_secs((now.unix_timestamp() - created).max(0) as u64);
        let requester = crate::audit::shown(csr.spec.username.as_deref().unwrap_or("")).to_string();
        let event = match answer {
            Answer::Certificate {
                serial, identity, ..
            } => {
                self.stats.signed(latency);
                tracing::info!(csr = %name, signer = %csr.spec.signer_name, requester = %requester, identity = %identity, serial = %serial, "CertificateSigningRequest signed");
                Event {
                    type_: EventType::Normal,
                    reason: reason::ISSUED.into(),
                    note: Some(format!(
                        "citadel issued {identity} (serial {serial}) to {requester}"
                    )),
                    action: "Sign".into(),
                    secondary: None,
                }
            }
            Answer::Failed(r) => {
                self.stats.failed(r.reason, latency);
                tracing::warn!(csr = %name, signer = %csr.spec.signer_name, requester = %requester, reason = r.reason, message = %r.message, "CertificateSigningRequest failed");
                Event {
                    type_: EventType::Warning,
                    reason: r.reason.into(),
                    note: Some(r.message.chars().take(1000).collect()),
                    action: "Sign".into(),
                    secondary: None,
                }
            }
        };
        // Off the answer's path: istiod is waiting for the certificate, not for the Event.
        let (recorder, reference) = (self.recorder.clone(), csr.object_ref(&()));
        tokio::spawn(async move {
            if let Err(e) = recorder.publish(&event, &reference).await {
                tracing::debug!(error = %e, "could not record a Kubernetes Event");
            }
        });
        Ok(Action::await_change())
    }
}
