//! The CA port's gRPC router: the one list of services it serves ([`router`]). A new surface
//! on the CA port is its own module under `server/` with a `service(&Arc<CaPort>)` function
//! (over what every surface shares, [`CaPort`]), plus ONE `.add_service` line here.

use std::sync::Arc;
use std::time::Duration;

use super::conn::Tracked;
use super::port::CaPort;
use super::{
    broker, federation, istio, jwtsvid, linkerd, MAX_HEADER_LIST_BYTES, MAX_STREAMS_PER_CONNECTION,
    REQUEST_TIMEOUT,
};

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
        .add_service(Tracked::<_, I>::new(jwtsvid::service(port)))
        .add_optional_service(linkerd::service(port).map(Tracked::<_, I>::new))
        .add_service(Tracked::<_, I>::new(federation::service::service(port)))
        .add_optional_service(broker::service(port).map(Tracked::<_, I>::new))
}
