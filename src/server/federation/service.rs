//! `citadel.v1.FederationService` on the CA port (proto/citadel/federation.proto): hands
//! the foreign bundles the fetcher keeps ([`super::FederatedBundles`]) to authenticated
//! callers (agents, which pass them to workloads). [`FederationError::status`] is this
//! surface's one mapping to gRPC codes.

use std::sync::Arc;

use tonic::{Code, Request, Response, Status};

use crate::federation_proto::{
    FederatedBundle, FederationService, FederationServiceServer, FetchFederatedBundlesRequest,
    FetchFederatedBundlesResponse,
};
use crate::server::port::{issue_code, CaPort, CallerError};

/// Why a FetchFederatedBundles call was refused.
#[derive(Debug, thiserror::Error)]
pub enum FederationError {
    /// `--max-inflight` requests are already in progress.
    #[error("the CA is at its limit of requests in progress (--max-inflight); retry shortly")]
    Busy,
    /// The caller could not be authenticated (or was throttled).
    #[error("{}", caller_text(.0))]
    Caller(CallerError),
}

impl From<CallerError> for FederationError {
    fn from(e: CallerError) -> Self {
        FederationError::Caller(e)
    }
}

fn caller_text(e: &CallerError) -> String {
    match e {
        CallerError::Throttled(t) => format!(
            "too many failed authentications from this address; retry in {t:.0}s (--auth-failure-burst)"
        ),
        CallerError::Issue(i) => i.to_string(),
    }
}

impl FederationError {
    /// Unauthenticated / Unavailable (credentials not checkable now) / ResourceExhausted.
    pub fn status(&self) -> Status {
        match self {
            FederationError::Busy | FederationError::Caller(CallerError::Throttled(_)) => {
                Status::new(Code::ResourceExhausted, self.to_string())
            }
            FederationError::Caller(CallerError::Issue(e)) => {
                let (code, msg) = issue_code(e);
                Status::new(code, msg)
            }
        }
    }
}

/// The service, over the CA port's shared parts.
pub struct FederationServer {
    port: Arc<CaPort>,
}

/// The service as the router adds it.
pub fn service(port: &Arc<CaPort>) -> FederationServiceServer<FederationServer> {
    FederationServiceServer::new(FederationServer { port: port.clone() })
        .max_decoding_message_size(64 * 1024)
}

impl FederationServer {
    async fn fetch(
        &self,
        req: &Request<FetchFederatedBundlesRequest>,
    ) -> Result<FetchFederatedBundlesResponse, FederationError> {
        let _permit = self
            .port
            .inflight
            .clone()
            .try_acquire_owned()
            .map_err(|_| FederationError::Busy)?;
        let chain = req.peer_certs();
        self.port
            .caller(
                req.metadata(),
                req.remote_addr(),
                chain.as_ref().map(|c| c.as_slice()),
            )
            .await?;
        Ok(FetchFederatedBundlesResponse {
            bundles: self
                .port
                .federated
                .current()
                .values()
                .map(|b| FederatedBundle {
                    trust_domain: b.trust_domain.as_str().to_string(),
                    spiffe_bundle: b.to_json().into_bytes(),
                    sequence: b.sequence.unwrap_or(0),
                })
                .collect(),
        })
    }
}

#[tonic::async_trait]
impl FederationService for FederationServer {
    async fn fetch_federated_bundles(
        &self,
        request: Request<FetchFederatedBundlesRequest>,
    ) -> Result<Response<FetchFederatedBundlesResponse>, Status> {
        self.fetch(&request).await.map(Response::new).map_err(|e| {
            let status = e.status();
            tracing::info!(code = ?status.code(), error = %e, "refused FetchFederatedBundles");
            status
        })
    }
}
