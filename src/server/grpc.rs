//! `istio.v1.auth.IstioCertificateService/CreateCertificate`, with istiod's behaviour.
//!
//! This is the only place errors become `tonic::Status`; see [`IssueError::status`].

use std::sync::Arc;
use std::time::Instant;

use tonic::{Code, Request, Response, Status};

use crate::auth::node::{Impersonation, NodeAuthError, NodeAuthorizer, Refusal};
use crate::auth::{AuthChain, AuthError, Caller, Credentials};
use crate::ca::issue::{audit_issued, AuditRecord, IssueFailure};
use crate::ca::policy::{TtlError, TtlPolicy};
use crate::ca::{Ca, SignError};
use crate::clock::SharedClock;
use crate::pki::csr::{self, CsrError, MAX_CSR_BYTES};
use crate::proto::istio_certificate_service_server::IstioCertificateService;
use crate::proto::{IstioCertificateRequest, IstioCertificateResponse};
use crate::store::index::IssuanceIndex;

use super::metrics::Metrics;

/// Metadata key ztunnel uses to ask for another workload's certificate.
const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";

/// The one answer to every refused impersonation, istiod's words: which check failed is for
/// the server log only, so a caller cannot probe which pods run where.
pub const IMPERSONATION_REFUSED: &str = "request impersonation authentication failure";

/// Why a CreateCertificate failed; [`IssueError::status`] maps each to istiod's gRPC code.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    /// The CSR field is over `MAX_CSR_BYTES`, refused before parsing (InvalidArgument).
    #[error("CSR is {0} bytes; the limit is {MAX_CSR_BYTES}")]
    CsrTooLarge(usize),
    /// No authenticator accepted the caller (Unauthenticated).
    #[error("{0}")]
    Unauthenticated(String),
    /// The requested TTL is above the maximum (InvalidArgument).
    #[error(transparent)]
    Ttl(#[from] TtlError),
    /// The CSR is malformed, badly signed or has a refused key (InvalidArgument).
    #[error("invalid CSR: {0}")]
    Csr(#[from] CsrError),
    /// The caller asked for another identity, or its identity is denied (PermissionDenied).
    #[error("{0}")]
    PermissionDenied(String),
    /// Cannot issue now: no signer, the signer expired, a credential could not be checked, or the
    /// issuance index failed (Unavailable).
    #[error("CA is not ready: {0}")]
    NotReady(String),
    /// Building the certificate failed (Internal); the cause is logged, not sent.
    #[error("signing failed")]
    Sign(#[source] SignError),
    /// `--max-inflight` requests are already in progress (ResourceExhausted).
    #[error("the CA is at its limit of requests in progress (--max-inflight); retry shortly")]
    Busy,
    /// This peer address failed authentication too often; the seconds until it may try again
    /// (ResourceExhausted: istio-agent backs off and retries).
    #[error("too many failed authentications from this address; retry in {0:.0}s (--auth-failure-burst)")]
    Throttled(f64),
}

impl IssueError {
    /// istiod's codes: Unauthenticated, InvalidArgument, PermissionDenied, Unavailable, Internal.
    pub fn status(&self) -> Status {
        let code = match self {
            IssueError::Unauthenticated(_) => Code::Unauthenticated,
            IssueError::CsrTooLarge(_) | IssueError::Ttl(_) | IssueError::Csr(_) => {
                Code::InvalidArgument
            }
            IssueError::PermissionDenied(_) => Code::PermissionDenied,
            IssueError::NotReady(_) => Code::Unavailable,
            IssueError::Busy | IssueError::Throttled(_) => Code::ResourceExhausted,
            IssueError::Sign(_) => Code::Internal,
        };
        Status::new(code, self.to_string())
    }
}

/// The CA gRPC service.
pub struct CaService {
    /// The CA whose current signer issues.
    pub ca: Arc<Ca>,
    /// The authenticators, tried in order.
    pub auth: AuthChain,
    /// How requested TTLs are resolved.
    pub ttl: TtlPolicy,
    /// The time certificates are issued at.
    pub clock: SharedClock,
    /// Counters on the `citadel_server_*` metrics.
    pub metrics: Arc<Metrics>,
    /// Where issued certificates are recorded for `revoke --identity`; `None` keeps no index.
    pub index: Option<Arc<dyn IssuanceIndex>>,
    /// Asks the scheduler to sweep the index again (a denial raced with a signature).
    pub sweep: Arc<crate::ca::revocation::SweepRequest>,
    /// One permit per call in progress (`Limits::max_inflight`).
    pub inflight: Arc<tokio::sync::Semaphore>,
    /// Failed authentications per peer address (`Limits::auth_throttle`).
    pub throttle: Arc<super::throttle::AuthThrottle>,
    /// Judges `ImpersonatedIdentity` requests (`--trusted-node-accounts`); `None` refuses
    /// them all.
    pub node_auth: Option<Arc<NodeAuthorizer>>,
}

fn bearer(req: &Request<IstioCertificateRequest>) -> Result<Option<&str>, IssueError> {
    let Some(v) = req.metadata().get("authorization") else {
        return Ok(None);
    };
    let v = v
        .to_str()
        .map_err(|_| IssueError::Unauthenticated("authorization header is not ASCII".into()))?;
    match v.split_once(' ') {
        Some((scheme, token))
            if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() =>
        {
            Ok(Some(token.trim()))
        }
        _ => Err(IssueError::Unauthenticated(
            "authorization header must be \"Bearer <token>\"".into(),
        )),
    }
}

fn metadata_string<'a>(req: &'a IstioCertificateRequest, key: &str) -> Option<&'a str> {
    use prost_types::value::Kind;
    match req.metadata.as_ref()?.fields.get(key)?.kind.as_ref()? {
        Kind::StringValue(s) if !s.is_empty() => Some(s),
        _ => None,
    }
}

impl CaService {
    /// Judges an `ImpersonatedIdentity` request. A refusal is counted and logged with its
    /// check, and answered with [`IMPERSONATION_REFUSED`] only.
    fn impersonate(&self, caller: &Caller, requested: &str) -> Result<Impersonation, IssueError> {
        let shown = crate::audit::shown(requested);
        let result = match &self.node_auth {
            Some(a) => a.authorize(caller, requested),
            None => Err(NodeAuthError::Denied(crate::auth::node::Denied {
                reason: Refusal::Disabled,
                detail: "no --trusted-node-accounts are configured".into(),
            })),
        };
        match result {
            Ok(granted) => Ok(granted),
            Err(NodeAuthError::Stale { broken_for, max }) => {
                self.metrics.impersonation.refused_stale();
                tracing::warn!(caller = %caller.identity, requested = %shown, broken_for_secs = broken_for.as_secs(), "impersonation refused: the pod watch has been broken for longer than --pod-index-max-staleness");
                Err(IssueError::NotReady(format!(
                    "the pod index may be out of date (its watch has been broken for {}s, more than \
                     --pod-index-max-staleness {}s); retry shortly",
                    broken_for.as_secs(),
                    max.as_secs()
                )))
            }
            Err(NodeAuthError::NotSynced) => {
                tracing::warn!(caller = %caller.identity, requested = %shown, "impersonation cannot be judged yet: the pod index has not synced");
                Err(IssueError::NotReady(
                    "the pod index is not synced yet; retry shortly".into(),
                ))
            }
            Err(NodeAuthError::Denied(d)) => {
                self.metrics.id_extraction_err_count.inc();
                self.metrics.impersonation.refused(d.reason);
                tracing::warn!(
                    caller = %caller.identity,
                    auth = %caller.method,
                    pod = %crate::audit::shown(caller.pod_name.as_deref().unwrap_or("")),
                    requested = %shown,
                    check = d.reason.label(),
                    detail = %d.detail,
                    "refused impersonation"
                );
                Err(IssueError::PermissionDenied(IMPERSONATION_REFUSED.into()))
            }
        }
    }

    /// Authenticates credentials that cost a verification or a TokenReview, under the
    /// per-peer throttle: a peer that keeps failing is refused before they are read. Every
    /// failed authentication counts toward it, whatever its code: Unauthenticated, and
    /// Unavailable too (a TokenReview that could not be sent or had no turn in the queue),
    /// since plausible forgeries that fill the review queue are exactly what the throttle
    /// is for. Failures after authentication (a refused CSR, impersonation) do not count:
    /// the caller has proven who it is.
    async fn authenticate(
        &self,
        req: &Request<IstioCertificateRequest>,
        creds: Credentials<'_>,
        header_problem: Option<IssueError>,
    ) -> Result<Caller, IssueError> {
        let peer = req.remote_addr().map(|a| a.ip());
        let now = self.clock.now().unix_timestamp_nanos() as f64 / 1e9;
        if let Some(ip) = peer {
            if let Err(t) = self.throttle.check(ip, now) {
                self.metrics.auth_throttled_count.inc();
                return Err(IssueError::Throttled(t.retry_after_secs));
            }
        }
        self.auth.authenticate(creds).await.map_err(|e| {
            self.metrics.authentication_failure_count.inc();
            if let Some(ip) = peer {
                if self.throttle.failed(ip, now) {
                    tracing::warn!(peer = %super::peer::PeerKey::of(ip), "this address failed authentication too often; its calls with credentials not yet verified are refused unread until it earns failures back (--auth-failure-burst, citadel_auth_throttled_total)");
                }
            }
            match (e, header_problem) {
                // The credential could not be checked (API server down): retryable.
                (e @ AuthError::Unavailable(_), _) => IssueError::NotReady(e.to_string()),
                (_, Some(problem)) => problem,
                (e, None) => IssueError::Unauthenticated(e.to_string()),
            }
        })
    }

    async fn issue(
        &self,
        req: &Request<IstioCertificateRequest>,
    ) -> Result<(Caller, IssueOutcome), IssueError> {
        let msg = req.get_ref();
        if msg.csr.len() > MAX_CSR_BYTES {
            self.metrics.csr_parsing_err_count.inc();
            return Err(IssueError::CsrTooLarge(msg.csr.len()));
        }
        let peer_chain = req.peer_certs();
        // A malformed Authorization header does not stop a valid client certificate from
        // authenticating (first success wins); it is reported only if nothing succeeds.
        let (bearer, header_problem) = match bearer(req) {
            Ok(b) => (b, None),
            Err(e) => (None, Some(e)),
        };
        // istiod reads `clusterid` only when sent exactly once.
        let mut cluster_ids = req.metadata().get_all("clusterid").iter();
        let cluster_id = match (cluster_ids.next(), cluster_ids.next()) {
            (Some(v), None) => v.to_str().ok().filter(|v| !v.is_empty()),
            _ => None,
        };
        let creds = Credentials {
            bearer,
            peer_chain: peer_chain.as_ref().map(|c| c.as_slice()),
            cluster_id,
        };
        let caller = match self.auth.verified(creds) {
            // A valid client certificate or an already-reviewed token costs nothing to
            // check, so it is served even when its address is throttled: peers behind one
            // SNAT address or gateway are not locked out by one of them failing.
            Some(caller) => caller,
            None => self.authenticate(req, creds, header_problem).await?,
        };

        // Naming the caller's own identity is a no-op; naming another is node impersonation.
        let via_node = match metadata_string(msg, IMPERSONATED_IDENTITY) {
            Some(other) if other != caller.identity.to_string() => {
                Some(self.impersonate(&caller, other)?)
            }
            _ => None,
        };
        let identity = match &via_node {
            Some(i) => i.identity.clone(),
            None => caller.identity.clone(),
        };

        let ttl = self.ttl.resolve(msg.validity_duration)?;
        let csr = csr::parse_pem(msg.csr.as_bytes())
            .inspect_err(|_| self.metrics.csr_parsing_err_count.inc())?;
        let want = identity.to_string();
        if let Some(other) = csr.uri_sans.iter().find(|u| **u != want) {
            self.metrics.id_extraction_err_count.inc();
            return Err(IssueError::PermissionDenied(format!(
                "CSR asks for {}, but the caller is {want}",
                crate::audit::shown(other)
            )));
        }

        let (signer, issued) = crate::ca::issue::sign_svid(
            &self.ca,
            self.index.as_ref(),
            &self.sweep,
            &csr.key,
            &identity,
            self.clock.now(),
            ttl,
            via_node.is_some(),
        )
        .map_err(|e| match e {
            IssueFailure::NoSigner => {
                self.metrics.sign_error("not_ready");
                IssueError::NotReady(e.to_string())
            }
            IssueFailure::Denied { .. } => {
                self.metrics.id_extraction_err_count.inc();
                IssueError::PermissionDenied(e.to_string())
            }
            IssueFailure::Expired(_) => {
                self.metrics.sign_error("ca_expired");
                IssueError::NotReady(e.to_string())
            }
            IssueFailure::Index => {
                self.metrics.sign_error("index");
                IssueError::NotReady(e.to_string())
            }
            IssueFailure::Sign(inner) => {
                self.metrics.sign_error("sign_failed");
                IssueError::Sign(inner)
            }
        })?;
        let chain = signer.response_chain(issued.pem);
        Ok((
            caller,
            IssueOutcome {
                identity,
                via_node,
                serial_hex: issued.serial_hex,
                not_after: issued.not_after,
                key_kind: csr.key.kind().to_string(),
                chain,
            },
        ))
    }
}

struct IssueOutcome {
    /// The identity the certificate carries: the caller's, or the one a node impersonated.
    identity: crate::identity::SpiffeId,
    /// Set when a node proxy asked on a workload's behalf.
    via_node: Option<Impersonation>,
    serial_hex: String,
    not_after: time::OffsetDateTime,
    key_kind: String,
    chain: Vec<String>,
}

#[tonic::async_trait]
impl IstioCertificateService for CaService {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let start = Instant::now();
        self.metrics.csr_count.inc();
        let result = match self.inflight.clone().try_acquire_owned() {
            Ok(_permit) => self.issue(&request).await,
            Err(_) => {
                self.metrics.sign_error("busy");
                Err(IssueError::Busy)
            }
        };
        self.metrics.latency.observe(start.elapsed());
        match result {
            Ok((caller, out)) => {
                let written = audit_issued(&AuditRecord {
                    serial_hex: &out.serial_hex,
                    identity: &out.identity.to_string(),
                    caller: &caller.identity.to_string(),
                    not_after: out.not_after,
                    key_type: &out.key_kind,
                    auth: &caller.method.to_string(),
                    pod: caller.pod_name.as_deref().unwrap_or(""),
                    node: out.via_node.as_ref().map(|i| i.node.as_str()).unwrap_or(""),
                    request: "",
                    cluster: caller.cluster.as_deref().unwrap_or(""),
                });
                if !written {
                    // Vault's rule: no audit, no certificate. It is in the issuance index (so
                    // revocable by identity) but never handed out; the caller retries.
                    self.metrics.sign_error("audit");
                    return Err(IssueError::NotReady(
                        "the audit log cannot be written; no certificate is handed out unaudited"
                            .into(),
                    )
                    .status());
                }
                self.metrics.success_cert_issuance_count.inc();
                if let Some(i) = &out.via_node {
                    self.metrics.impersonation.issued(&i.node_account);
                }
                Ok(Response::new(IstioCertificateResponse {
                    cert_chain: out.chain,
                }))
            }
            Err(e) => {
                let status = e.status();
                match &e {
                    IssueError::Sign(inner) => {
                        tracing::error!(error = %inner, "certificate signing failed")
                    }
                    IssueError::NotReady(_) => {
                        tracing::warn!(error = %e, "refused a CSR: CA not ready")
                    }
                    // Logged once per peer when it is cut off; one line per refused call
                    // would let a flood fill the log.
                    IssueError::Throttled(_) => {
                        tracing::debug!(error = %e, "refused a CSR unread")
                    }
                    _ => tracing::info!(code = ?status.code(), error = %e, "refused a CSR"),
                }
                Err(status)
            }
        }
    }
}
