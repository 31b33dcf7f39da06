//! What every surface on the CA port shares: the issue path, the caller chain, the in-flight
//! limit, the failed-authentication throttle and the counters. Below the surfaces and the
//! router, so a surface never imports the router that lists it.

use std::net::IpAddr;
use std::sync::Arc;

use tokio::sync::Semaphore;

use super::metrics::Metrics;
use super::throttle::AuthThrottle;
use crate::auth::issue_path::{IssueError, IssuePath};
use crate::auth::{AuthChain, Caller, Credentials};
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
