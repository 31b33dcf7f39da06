//! Istio's CA protocol, `istio.v1.auth.IstioCertificateService/CreateCertificate`, with
//! istiod's behaviour: the decode (the CSR size limit, the `authorization` header, a single
//! `clusterid`, the `ImpersonatedIdentity` metadata, `validity_duration`), the per-peer
//! throttle around authentication, and [`IstioError::status`], this surface's ONE mapping
//! from errors (its own and the shared [`IssueError`]) to gRPC codes, with
//! [`IstioError::count`] for the `citadel_server_*` counters. Everything between decode and
//! answer is the shared issue path ([`crate::auth::issue_path`]).

use std::sync::Arc;
use std::time::Instant;

use tonic::{Code, Request, Response, Status};

use crate::auth::issue_path::{CsrInput, IssueError, IssueRequest, Requester, Ttl};
use crate::ca::issue::IssueFailure;
use crate::pki::csr::MAX_CSR_BYTES;
use crate::proto::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use crate::proto::{IstioCertificateRequest, IstioCertificateResponse};

use super::metrics::Metrics;
use super::port::{issue_code, CaPort, CallerError};

pub use crate::auth::issue_path::IMPERSONATION_REFUSED;

/// Metadata key ztunnel uses to ask for another workload's certificate.
const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";

/// Why a CreateCertificate failed: this surface's own refusals, and the shared path's.
#[derive(Debug, thiserror::Error)]
pub enum IstioError {
    /// The CSR field is over `MAX_CSR_BYTES`, refused before parsing (InvalidArgument).
    #[error("CSR is {0} bytes; the limit is {MAX_CSR_BYTES}")]
    CsrTooLarge(usize),
    /// `--max-inflight` requests are already in progress (ResourceExhausted).
    #[error("the CA is at its limit of requests in progress (--max-inflight); retry shortly")]
    Busy,
    /// This peer address failed authentication too often; the seconds until it may try again
    /// (ResourceExhausted: istio-agent backs off and retries).
    #[error("too many failed authentications from this address; retry in {0:.0}s (--auth-failure-burst)")]
    Throttled(f64),
    /// The shared issue path refused.
    #[error(transparent)]
    Issue(#[from] IssueError),
}

impl IstioError {
    /// istiod's codes: Unauthenticated, InvalidArgument, PermissionDenied, Unavailable,
    /// ResourceExhausted, Internal. The only place this surface builds a `tonic::Status`.
    pub fn status(&self) -> Status {
        let (code, message) = match self {
            IstioError::CsrTooLarge(_) => (Code::InvalidArgument, self.to_string()),
            IstioError::Busy | IstioError::Throttled(_) => {
                (Code::ResourceExhausted, self.to_string())
            }
            IstioError::Issue(e) => issue_code(e),
        };
        Status::new(code, message)
    }

    /// The `citadel_server_*` (and impersonation) counters this refusal bumps.
    pub fn count(&self, m: &Metrics) {
        match self {
            IstioError::CsrTooLarge(_) => m.csr_parsing_err_count.inc(),
            IstioError::Busy => m.sign_error("busy"),
            IstioError::Throttled(_) => m.auth_throttled_count.inc(),
            IstioError::Issue(e) => match e {
                IssueError::Unauthenticated(_) | IssueError::AuthUnavailable(_) => {
                    m.authentication_failure_count.inc()
                }
                IssueError::ImpersonationRefused(reason) => {
                    m.id_extraction_err_count.inc();
                    m.impersonation.refused(*reason);
                }
                IssueError::PodIndexStale { .. } => m.impersonation.refused_stale(),
                IssueError::PodIndexNotSynced | IssueError::Ttl(_) => {}
                IssueError::Csr(_) => m.csr_parsing_err_count.inc(),
                IssueError::OtherIdentity { .. } | IssueError::Ca(IssueFailure::Denied { .. }) => {
                    m.id_extraction_err_count.inc()
                }
                IssueError::Ca(IssueFailure::NoSigner) => m.sign_error("not_ready"),
                IssueError::Ca(IssueFailure::Expired(_)) => m.sign_error("ca_expired"),
                IssueError::Ca(IssueFailure::Index) => m.sign_error("index"),
                e if e.key_unavailable() => m.sign_error("key_unavailable"),
                IssueError::Ca(IssueFailure::Sign(_)) | IssueError::TooShort { .. } => {
                    m.sign_error("sign_failed")
                }
                IssueError::Unaudited => m.sign_error("audit"),
            },
        }
    }
}

/// The CreateCertificate service, over the CA port's shared parts.
pub struct IstioService {
    /// The issue path, authenticators, limits and counters of the CA port.
    pub port: Arc<CaPort>,
}

/// The service as the router adds it (see [`super::router`]).
pub fn service(port: &Arc<CaPort>) -> IstioCertificateServiceServer<IstioService> {
    IstioCertificateServiceServer::new(IstioService { port: port.clone() })
        .max_decoding_message_size(super::MAX_MESSAGE_BYTES)
}

fn metadata_string<'a>(req: &'a IstioCertificateRequest, key: &str) -> Option<&'a str> {
    use prost_types::value::Kind;
    match req.metadata.as_ref()?.fields.get(key)?.kind.as_ref()? {
        Kind::StringValue(s) if !s.is_empty() => Some(s),
        _ => None,
    }
}

impl IstioService {
    /// Decodes the request, authenticates its caller, and hands the rest to the issue path.
    async fn issue(
        &self,
        req: &Request<IstioCertificateRequest>,
    ) -> Result<IstioCertificateResponse, IstioError> {
        let msg = req.get_ref();
        if msg.csr.len() > MAX_CSR_BYTES {
            return Err(IstioError::CsrTooLarge(msg.csr.len()));
        }
        let peer_chain = req.peer_certs();
        let caller = self
            .port
            .caller(
                req.metadata(),
                req.remote_addr(),
                peer_chain.as_ref().map(|c| c.as_slice()),
            )
            .await
            .map_err(|e| match e {
                CallerError::Throttled(t) => IstioError::Throttled(t),
                CallerError::Issue(e) => IstioError::Issue(e),
            })?;
        let done = self.port.issue.issue(IssueRequest {
            requester: Requester::Workload {
                caller: &caller,
                asks_for: metadata_string(msg, IMPERSONATED_IDENTITY),
            },
            csr: CsrInput::Pem(msg.csr.as_bytes()),
            ttl: Ttl::Requested(msg.validity_duration),
            min_lifetime: None,
        })?;
        self.port.metrics.success_cert_issuance_count.inc();
        if let Some(i) = &done.via_node {
            self.port.metrics.impersonation.issued(&i.node_account);
        }
        Ok(IstioCertificateResponse {
            cert_chain: done.signer.response_chain(done.issued.pem),
        })
    }
}

#[tonic::async_trait]
impl IstioCertificateService for IstioService {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let start = Instant::now();
        let metrics = &self.port.metrics;
        metrics.csr_count.inc();
        let result = match self.port.inflight.clone().try_acquire_owned() {
            Ok(_permit) => self.issue(&request).await,
            Err(_) => Err(IstioError::Busy),
        };
        metrics.latency.observe(start.elapsed());
        result.map(Response::new).map_err(|e| {
            e.count(metrics);
            let status = e.status();
            match &e {
                IstioError::Issue(IssueError::Ca(IssueFailure::Sign(inner))) => {
                    tracing::error!(error = %inner, "certificate signing failed")
                }
                // Logged once per peer when it is cut off; one line per refused call
                // would let a flood fill the log.
                IstioError::Throttled(_) => tracing::debug!(error = %e, "refused a CSR unread"),
                _ if status.code() == Code::Unavailable => {
                    tracing::warn!(error = %e, "refused a CSR: CA not ready")
                }
                _ => tracing::info!(code = ?status.code(), error = %e, "refused a CSR"),
            }
            status
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::node::Refusal;
    use crate::ca::policy::TtlError;
    use crate::ca::SignError;
    use crate::pki::csr::CsrError;
    use crate::pki::KeyError;

    /// Every refusal keeps istiod's code and its exact text on the wire (tests/it/errors.rs
    /// checks them end to end; this pins the one mapping itself, variant by variant).
    #[test]
    fn each_refusal_has_istiods_code_and_text() {
        let t = time::macros::datetime!(2030-01-01 00:00 UTC);
        let cases: Vec<(IstioError, Code, &str)> = vec![
            (IstioError::CsrTooLarge(70_000), Code::InvalidArgument, "CSR is 70000 bytes; the limit is 65536"),
            (IstioError::Busy, Code::ResourceExhausted, "the CA is at its limit of requests in progress (--max-inflight); retry shortly"),
            (IstioError::Throttled(3.2), Code::ResourceExhausted, "too many failed authentications from this address; retry in 3s (--auth-failure-burst)"),
            (IssueError::Unauthenticated("nope".into()).into(), Code::Unauthenticated, "nope"),
            (IssueError::AuthUnavailable("later".into()).into(), Code::Unavailable, "CA is not ready: later"),
            (IssueError::ImpersonationRefused(Refusal::Disabled).into(), Code::PermissionDenied, IMPERSONATION_REFUSED),
            (IssueError::PodIndexNotSynced.into(), Code::Unavailable, "CA is not ready: the pod index is not synced yet; retry shortly"),
            (IssueError::PodIndexStale { broken_for: std::time::Duration::from_secs(90), max: std::time::Duration::from_secs(60) }.into(), Code::Unavailable,
             "CA is not ready: the pod index may be out of date (its watch has been broken for 90s, more than --pod-index-max-staleness 60s); retry shortly"),
            (IssueError::Ttl(TtlError { requested_secs: 9, max_secs: 8 }).into(), Code::InvalidArgument, "requested TTL 9s exceeds the maximum of 8s"),
            (IssueError::Csr(CsrError::Empty).into(), Code::InvalidArgument, "invalid CSR: "),
            (IssueError::OtherIdentity { asked: "\"x\"".into(), identity: "spiffe://td/ns/a/sa/b".into() }.into(), Code::PermissionDenied,
             "CSR asks for \"x\", but the caller is spiffe://td/ns/a/sa/b"),
            (IssueError::Ca(IssueFailure::NoSigner).into(), Code::Unavailable, "CA is not ready: no signing CA is loaded yet"),
            (IssueError::Ca(IssueFailure::Denied { identity: "spiffe://td/x".into(), after_signing: true }).into(), Code::PermissionDenied,
             "spiffe://td/x has been revoked by an operator and may get no new certificate"),
            (IssueError::Ca(IssueFailure::Expired(t)).into(), Code::Unavailable, "CA is not ready: the signing CA expired at "),
            (IssueError::Ca(IssueFailure::Index).into(), Code::Unavailable, "CA is not ready: the CA cannot record certificates right now"),
            (IssueError::Ca(IssueFailure::Sign(crate::ca::SignError::Expired(t))).into(), Code::Internal, "signing failed"),
            (IssueError::Unaudited.into(), Code::Unavailable, "CA is not ready: the audit log cannot be written; no certificate is handed out unaudited"),
            // Issue 23: an HSM that is away is a retry, not an internal error, and its
            // details stay in the log.
            (IssueError::Ca(IssueFailure::Sign(SignError::Key(KeyError::Unavailable("token \"ca\" removed".into())))).into(), Code::Unavailable,
             "CA is not ready: the CA signing key is unavailable; retry shortly"),
            (IssueError::Ca(IssueFailure::Sign(SignError::Key(KeyError::Failed("CKR_KEY_FUNCTION_NOT_PERMITTED".into())))).into(), Code::Internal, "signing failed"),
        ];
        for (e, code, text) in cases {
            let s = e.status();
            assert!(!s.message().contains("token"), "{:?}", s.message());
            assert_eq!(s.code(), code, "{e:?}");
            assert!(
                s.message().starts_with(text),
                "{e:?}: {:?} does not start with {text:?}",
                s.message()
            );
        }
    }
}
