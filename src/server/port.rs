//! What every surface on the CA port shares: the issue path, the caller chain, the in-flight
//! limit, the failed-authentication throttle and the counters, and the one way a surface
//! learns who calls ([`CaPort::caller`]: the `authorization` and `clusterid` headers, the
//! client certificate, under the throttle). Below the surfaces and the router, so a surface
//! never imports the router that lists it.

use std::net::IpAddr;
use std::sync::Arc;

use tokio::sync::Semaphore;

use rustls_pki_types::CertificateDer;
use tonic::metadata::MetadataMap;
use tonic::Code;

use super::metrics::Metrics;
use super::throttle::AuthThrottle;
use crate::auth::issue_path::{IssueError, IssuePath};
use crate::auth::{AuthChain, Caller, Credentials};
use crate::ca::issue::IssueFailure;

/// The gRPC code and message of a refusal of the shared issue path: the same on every
/// CA-port surface (istiod's codes), so each surface's one mapping (`IstioError::status`,
/// `JwtSvidError::status`) hands these on rather than restating them.
pub fn issue_code(e: &IssueError) -> (Code, String) {
    let not_ready = |e: &dyn std::fmt::Display| format!("CA is not ready: {e}");
    match e {
        IssueError::Unauthenticated(_) => (Code::Unauthenticated, e.to_string()),
        IssueError::Ttl(_) | IssueError::Csr(_) => (Code::InvalidArgument, e.to_string()),
        IssueError::ImpersonationRefused(_)
        | IssueError::OtherIdentity { .. }
        | IssueError::Ca(IssueFailure::Denied { .. }) => (Code::PermissionDenied, e.to_string()),
        IssueError::AuthUnavailable(_)
        | IssueError::PodIndexStale { .. }
        | IssueError::PodIndexNotSynced
        | IssueError::Ca(IssueFailure::NoSigner | IssueFailure::Expired(_) | IssueFailure::Index)
        | IssueError::Unaudited => (Code::Unavailable, not_ready(e)),
        // An HSM that is away or busy: istio-agent retries Unavailable. The token's name and
        // error are logged, not sent.
        e if e.key_unavailable() => (
            Code::Unavailable,
            "CA is not ready: the CA signing key is unavailable; retry shortly".into(),
        ),
        // The cause is logged, not sent.
        IssueError::Ca(IssueFailure::Sign(_)) | IssueError::TooShort { .. } => {
            (Code::Internal, "signing failed".into())
        }
    }
}

/// Why a CA-port call has no caller.
#[derive(Debug)]
pub enum CallerError {
    /// Its peer address failed authentication too often: seconds until it may try again.
    Throttled(f64),
    /// Authentication failed (or could not be checked now).
    Issue(IssueError),
}

/// The bearer token of `authorization: Bearer <token>`; `None` without the header, an
/// Unauthenticated error for a malformed one.
pub fn bearer(metadata: &MetadataMap) -> Result<Option<&str>, IssueError> {
    let unauthenticated = |why: &str| IssueError::Unauthenticated(why.into());
    let Some(v) = metadata.get("authorization") else {
        return Ok(None);
    };
    let v = v
        .to_str()
        .map_err(|_| unauthenticated("authorization header is not ASCII"))?;
    match v.split_once(' ') {
        Some((scheme, token))
            if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() =>
        {
            Ok(Some(token.trim()))
        }
        _ => Err(unauthenticated(
            "authorization header must be \"Bearer <token>\"",
        )),
    }
}
use crate::identity::LinkerdNames;

/// What the surfaces of the CA port share.
pub struct CaPort {
    /// The one issue path (authorize, sign, record, audit).
    pub issue: Arc<IssuePath>,
    /// The authenticators of workload callers, tried in order.
    pub auth: AuthChain,
    /// The `citadel_server_*` counters.
    pub metrics: Arc<Metrics>,
    /// One permit per call in progress, over every surface (`Limits::max_inflight`).
    pub inflight: Arc<Semaphore>,
    /// Failed authentications per peer address (`Limits::auth_throttle`).
    pub throttle: Arc<AuthThrottle>,
    /// Linkerd's Certify, when `--linkerd-identity-domain` turns it on.
    pub linkerd: Option<LinkerdPort>,
    /// The foreign trust domains' bundles (`--federate-with`), for FetchFederatedBundles.
    pub federated: super::federation::FederatedBundles,
    /// The SPIFFE Broker API, when `--broker-ids` lists a broker.
    pub broker: Option<BrokerPort>,
}

/// The SPIFFE Broker API on the CA port (`server::broker`), what it has beyond what every
/// surface shares: the judge of brokers and their pods (the node authorizer, whose pod index
/// impersonation shares), the server's shutdown (its streams outlive a call and must end
/// when the server stops), and a bound on open streams.
pub struct BrokerPort {
    /// `--broker-ids` and the pod index.
    pub authz: Arc<crate::auth::node::NodeAuthorizer>,
    /// Ends every open stream.
    pub shutdown: crate::shutdown::Shutdown,
    /// One permit per open stream ([`BROKER_MAX_STREAMS`]).
    pub streams: Arc<Semaphore>,
}

/// The most Broker API streams open at once on one server (each holds a task and, for
/// SubscribeToX509SVID, a key): a broker serves one node, so this is far above need.
pub const BROKER_MAX_STREAMS: usize = 4096;

impl BrokerPort {
    /// The Broker API over `authz`, when it allows any broker; `None` otherwise.
    pub fn new(
        authz: Option<&Arc<crate::auth::node::NodeAuthorizer>>,
        shutdown: crate::shutdown::Shutdown,
    ) -> Option<Self> {
        let authz = authz.filter(|a| a.brokers_enabled())?.clone();
        Some(Self {
            authz,
            shutdown,
            streams: Arc::new(Semaphore::new(BROKER_MAX_STREAMS)),
        })
    }
}

impl CaPort {
    /// Authenticates `creds` with `chain` under the per-peer failed-authentication throttle:
    /// a peer that keeps failing is refused before its credentials cost a verification or a
    /// TokenReview, and every failed authentication (Unavailable included: forgeries filling
    /// the review queue are what the throttle is for) counts toward it. For surfaces whose
    /// credentials only `authenticate` can judge (Linkerd's token in the request body).
    pub async fn authenticate_throttled(
        &self,
        chain: &AuthChain,
        peer: Option<IpAddr>,
        creds: Credentials<'_>,
    ) -> Result<Caller, Gated> {
        let now = self.issue.clock.now().unix_timestamp_nanos() as f64 / 1e9;
        if let Some(ip) = peer {
            if let Err(t) = self.throttle.check(ip, now) {
                return Err(Gated::Throttled(t.retry_after_secs));
            }
        }
        IssuePath::authenticate(chain, creds).await.map_err(|e| {
            if let Some(ip) = peer {
                if self.throttle.failed(ip, now) {
                    tracing::warn!(peer = %super::peer::PeerKey::of(ip), "this address failed authentication too often; its calls with credentials not yet verified are refused unread until it earns failures back (--auth-failure-burst, citadel_auth_throttled_total)");
                }
            }
            Gated::Failed(e)
        })
    }
}

/// Why [`CaPort::authenticate_throttled`] established no caller.
#[derive(Debug)]
pub enum Gated {
    /// The peer failed too often; seconds until it may try again. Its credentials were not read.
    Throttled(f64),
    /// The chain refused (or could not check) the credentials.
    Failed(IssueError),
}

/// Linkerd's Certify on the CA port (`--linkerd-identity-domain`), what it has beyond what
/// every surface shares: its own authenticator chain (TokenReview with audience
/// `identity.l5d.io`: a token projected for Linkerd must not get an Istio certificate, nor
/// the reverse) and the names its identities take.
pub struct LinkerdPort {
    /// Authenticates the token in the request body.
    pub auth: AuthChain,
    /// The control plane and domain of the DNS-form identities.
    pub names: LinkerdNames,
    /// Also put the SPIFFE ID in Linkerd leaves (`--linkerd-spiffe-san`).
    pub spiffe_san: bool,
}

impl CaPort {
    /// Who calls, from a request's headers, peer address and client certificate chain.
    ///
    /// A malformed Authorization header does not stop a valid client certificate from
    /// authenticating (first success wins); it is reported only if nothing succeeds.
    /// `clusterid` is read only when sent exactly once (istiod's rule). A valid client
    /// certificate or an already-reviewed token costs nothing to check, so it is served even
    /// when its address is throttled: peers behind one SNAT address or gateway are not locked
    /// out by one of them failing. Everything else is authenticated under the per-peer
    /// throttle: a peer that keeps failing is refused before its credentials are read. Every
    /// failed authentication counts toward it, whatever its code: Unauthenticated, and
    /// Unavailable too (a TokenReview that could not be sent or had no turn in the queue),
    /// since plausible forgeries that fill the review queue are exactly what the throttle is
    /// for. Failures after authentication do not count: the caller has proven who it is.
    pub async fn caller(
        &self,
        metadata: &MetadataMap,
        remote: Option<std::net::SocketAddr>,
        peer_chain: Option<&[CertificateDer<'static>]>,
    ) -> Result<Caller, CallerError> {
        let (bearer, header_problem) = match bearer(metadata) {
            Ok(b) => (b, None),
            Err(e) => (None, Some(e)),
        };
        let mut cluster_ids = metadata.get_all("clusterid").iter();
        let cluster_id = match (cluster_ids.next(), cluster_ids.next()) {
            (Some(v), None) => v.to_str().ok().filter(|v| !v.is_empty()),
            _ => None,
        };
        let creds = Credentials {
            bearer,
            peer_chain,
            cluster_id,
        };
        if let Some(caller) = self.auth.verified(creds) {
            return Ok(caller);
        }
        let peer = remote.map(|a| a.ip());
        self.authenticate_throttled(&self.auth, peer, creds)
            .await
            .map_err(|g| match (g, header_problem) {
                (Gated::Throttled(secs), _) => CallerError::Throttled(secs),
                // The credential could not be checked (API server down): retryable.
                (Gated::Failed(e @ IssueError::AuthUnavailable(_)), _) => CallerError::Issue(e),
                (Gated::Failed(_), Some(problem)) => CallerError::Issue(problem),
                (Gated::Failed(e), None) => CallerError::Issue(e),
            })
    }
}
