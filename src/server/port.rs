//! What every surface on the CA port shares: the issue path, the caller chain, the in-flight
//! limit, the failed-authentication throttle and the counters. Below the surfaces and the
//! router, so a surface never imports the router that lists it.

use std::sync::Arc;

use tokio::sync::Semaphore;

use super::metrics::Metrics;
use super::throttle::AuthThrottle;
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
