//! citadel's own JWT-SVID service on the CA port, `citadel.v1.JwtSvidService`
//! (proto/citadel/jwtsvid.proto): `FetchJwtSvid` signs a JWT-SVID for the caller's own
//! identity, `FetchJwtBundle` returns the JWT bundle (JWK Set). Callers authenticate exactly
//! as for CreateCertificate ([`CaPort::caller`]: a bearer token or a client certificate,
//! under the same throttle and in-flight limit); everything after that is the shared issue
//! path ([`IssuePath::issue_jwt`](crate::auth::issue_path::IssuePath::issue_jwt)).
//! [`JwtSvidError::status`] is this surface's ONE mapping to gRPC codes.

use std::sync::Arc;

use tonic::{Code, Request, Response, Status};

use crate::auth::issue_path::{IssueError, JwtIssueError, JwtRequest};
use crate::auth::Caller;
use crate::jwtsvid_proto::jwt_svid_service_server::{JwtSvidService, JwtSvidServiceServer};
use crate::jwtsvid_proto::{
    FetchJwtBundleRequest, FetchJwtBundleResponse, FetchJwtSvidRequest, FetchJwtSvidResponse,
};
use crate::pki::cakey::KeyError;

use super::port::{issue_code, CaPort, CallerError};

/// Why a JWT-SVID service call failed: this surface's own refusals and the shared path's.
#[derive(Debug, thiserror::Error)]
pub enum JwtSvidError {
    /// `--max-inflight` requests are already in progress.
    #[error("the CA is at its limit of requests in progress (--max-inflight); retry shortly")]
    Busy,
    /// This peer address failed authentication too often; seconds until it may try again.
    #[error("too many failed authentications from this address; retry in {0:.0}s (--auth-failure-burst)")]
    Throttled(f64),
    /// No JWT bundle is installed yet (or this CA keeps none: a plugged-in CA).
    #[error("the JWT bundle is not available yet")]
    NoBundle,
    /// The shared issue path refused.
    #[error(transparent)]
    Issue(#[from] JwtIssueError),
}

impl From<IssueError> for JwtSvidError {
    fn from(e: IssueError) -> Self {
        JwtSvidError::Issue(JwtIssueError::Issue(e))
    }
}

impl From<CallerError> for JwtSvidError {
    fn from(e: CallerError) -> Self {
        match e {
            CallerError::Throttled(t) => JwtSvidError::Throttled(t),
            CallerError::Issue(e) => e.into(),
        }
    }
}

impl JwtSvidError {
    /// The Workload API's codes for the same causes: Unauthenticated, InvalidArgument (no
    /// or bad audience), PermissionDenied (another identity, a denied identity),
    /// Unavailable (not ready: retry), ResourceExhausted, Internal. The only place this
    /// surface builds a `tonic::Status`.
    pub fn status(&self) -> Status {
        let not_ready = |e: &dyn std::fmt::Display| format!("CA is not ready: {e}");
        let (code, message) = match self {
            JwtSvidError::Busy | JwtSvidError::Throttled(_) => {
                (Code::ResourceExhausted, self.to_string())
            }
            JwtSvidError::NoBundle => (Code::Unavailable, not_ready(self)),
            JwtSvidError::Issue(e) => match e {
                JwtIssueError::Audience(_) => (Code::InvalidArgument, e.to_string()),
                JwtIssueError::NoKey | JwtIssueError::Sign(KeyError::Unavailable(_)) => {
                    (Code::Unavailable, not_ready(e))
                }
                // The cause is logged, not sent.
                JwtIssueError::Sign(KeyError::Failed(_)) => {
                    (Code::Internal, "signing failed".into())
                }
                JwtIssueError::Issue(i) => issue_code(i),
            },
        };
        Status::new(code, message)
    }
}

/// The JWT-SVID service, over the CA port's shared parts.
pub struct JwtSvidServer {
    /// The issue path, authenticators, limits and counters of the CA port.
    pub port: Arc<CaPort>,
}

/// The service as the router adds it (see [`super::router`]).
pub fn service(port: &Arc<CaPort>) -> JwtSvidServiceServer<JwtSvidServer> {
    JwtSvidServiceServer::new(JwtSvidServer { port: port.clone() })
        .max_decoding_message_size(super::MAX_MESSAGE_BYTES)
}

impl JwtSvidServer {
    async fn caller<T>(&self, req: &Request<T>) -> Result<Caller, JwtSvidError> {
        let peer_chain = req.peer_certs();
        Ok(self
            .port
            .caller(
                req.metadata(),
                req.remote_addr(),
                peer_chain.as_ref().map(|c| c.as_slice()),
            )
            .await?)
    }

    async fn fetch_svid(
        &self,
        req: &Request<FetchJwtSvidRequest>,
    ) -> Result<FetchJwtSvidResponse, JwtSvidError> {
        let caller = self.caller(req).await?;
        let msg = req.get_ref();
        let done = self.port.issue.issue_jwt(JwtRequest {
            caller: &caller,
            spiffe_id: Some(msg.spiffe_id.as_str()),
            audience: &msg.audience,
        })?;
        self.port.metrics.jwt_svid_issued.inc();
        Ok(FetchJwtSvidResponse {
            spiffe_id: done.identity.to_string(),
            token: done.svid.token,
            expires_at: done.svid.expires_at.unix_timestamp(),
        })
    }

    /// The bundle is public (a bundle endpoint serves it to anyone), but on the CA port it
    /// is for authenticated callers only, like everything else there; a denied identity may
    /// still read it (it verifies others' tokens, it gets none).
    async fn fetch_bundle(
        &self,
        req: &Request<FetchJwtBundleRequest>,
    ) -> Result<FetchJwtBundleResponse, JwtSvidError> {
        self.caller(req).await?;
        let keys = self
            .port
            .issue
            .ca
            .jwt_current()
            .ok_or(JwtSvidError::NoBundle)?;
        Ok(FetchJwtBundleResponse {
            trust_domain: keys.trust_domain.clone(),
            jwks: keys.jwks.clone().into_bytes(),
            sequence: keys.sequence,
        })
    }

    /// Runs `f` under the in-flight limit, and counts and logs a refusal.
    async fn limited<T>(
        &self,
        what: &str,
        f: impl std::future::Future<Output = Result<T, JwtSvidError>>,
    ) -> Result<Response<T>, Status> {
        let result = match self.port.inflight.clone().try_acquire_owned() {
            Ok(_permit) => f.await,
            Err(_) => Err(JwtSvidError::Busy),
        };
        result.map(Response::new).map_err(|e| {
            let status = e.status();
            self.port.metrics.jwt_svid_refused(code_name(status.code()));
            if let JwtSvidError::Issue(JwtIssueError::Issue(
                IssueError::Unauthenticated(_) | IssueError::AuthUnavailable(_),
            )) = &e
            {
                self.port.metrics.authentication_failure_count.inc();
            }
            match &e {
                JwtSvidError::Issue(JwtIssueError::Sign(k)) => {
                    tracing::error!(error = %k, "JWT-SVID signing failed")
                }
                JwtSvidError::Throttled(_) => tracing::debug!(error = %e, "refused {what} unread"),
                _ => tracing::info!(code = ?status.code(), error = %e, "refused {what}"),
            }
            status
        })
    }
}

/// The label of a gRPC code in `citadel_jwt_svid_refused_total{code}`.
fn code_name(code: Code) -> &'static str {
    match code {
        Code::InvalidArgument => "InvalidArgument",
        Code::Unauthenticated => "Unauthenticated",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::Unavailable => "Unavailable",
        Code::Internal => "Internal",
        _ => "Other",
    }
}

#[tonic::async_trait]
impl JwtSvidService for JwtSvidServer {
    async fn fetch_jwt_svid(
        &self,
        request: Request<FetchJwtSvidRequest>,
    ) -> Result<Response<FetchJwtSvidResponse>, Status> {
        self.limited("a JWT-SVID", self.fetch_svid(&request)).await
    }

    async fn fetch_jwt_bundle(
        &self,
        request: Request<FetchJwtBundleRequest>,
    ) -> Result<Response<FetchJwtBundleResponse>, Status> {
        self.limited("the JWT bundle", self.fetch_bundle(&request))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::issue::IssueFailure;

    /// Each refusal keeps its code (tests/it/jwt_svid.rs checks them end to end).
    #[test]
    fn each_refusal_has_its_code() {
        let cases: Vec<(JwtSvidError, Code)> = vec![
            (JwtSvidError::Busy, Code::ResourceExhausted),
            (JwtSvidError::Throttled(1.0), Code::ResourceExhausted),
            (JwtSvidError::NoBundle, Code::Unavailable),
            (
                JwtIssueError::Audience("none".into()).into(),
                Code::InvalidArgument,
            ),
            (JwtIssueError::NoKey.into(), Code::Unavailable),
            (
                JwtIssueError::Sign(KeyError::Unavailable("hsm".into())).into(),
                Code::Unavailable,
            ),
            (
                JwtIssueError::Sign(KeyError::Failed("x".into())).into(),
                Code::Internal,
            ),
            (
                IssueError::Unauthenticated("no".into()).into(),
                Code::Unauthenticated,
            ),
            (
                IssueError::OtherIdentity {
                    asked: "\"x\"".into(),
                    identity: "spiffe://td/ns/a/sa/b".into(),
                }
                .into(),
                Code::PermissionDenied,
            ),
            (
                IssueError::Ca(IssueFailure::Denied {
                    identity: "spiffe://td/x".into(),
                    after_signing: true,
                })
                .into(),
                Code::PermissionDenied,
            ),
            (
                IssueError::Ca(IssueFailure::NoSigner).into(),
                Code::Unavailable,
            ),
            (IssueError::Unaudited.into(), Code::Unavailable),
        ];
        for (e, code) in cases {
            assert_eq!(e.status().code(), code, "{e:?}");
        }
        // The signing failure's cause stays in the log.
        let s = JwtSvidError::from(JwtIssueError::Sign(KeyError::Failed(
            "secret detail".into(),
        )))
        .status();
        assert!(!s.message().contains("secret detail"));
    }
}
