//! The CA port's gRPC router: what every surface on the port shares ([`CaPort`]), and the one
//! list of services it serves ([`router`]). A new surface on the CA port is its own module
//! under `server/` with a `service(&Arc<CaPort>)` function, plus ONE `.add_service` line here.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;

use super::conn::Tracked;
use super::metrics::Metrics;
use super::throttle::AuthThrottle;
use super::{istio, MAX_HEADER_LIST_BYTES, MAX_STREAMS_PER_CONNECTION, REQUEST_TIMEOUT};
use crate::auth::issue_path::IssuePath;
use crate::auth::AuthChain;

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
}

/// The CA port's HTTP/2 settings around every surface, whose calls count as streams in
/// progress on connections whose transport info is `I` (see [`Tracked`]).
pub fn router<I>(port: &Arc<CaPort>) -> tonic::transport::server::Router
where
    I: Clone + Send + Sync + 'static,
{
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        .http2_max_header_list_size(Some(MAX_HEADER_LIST_BYTES))
        .timeout(REQUEST_TIMEOUT)
        // One line per surface.
        .add_service(Tracked::<_, I>::new(istio::service(port)))
}
