//! The network edge: the CA port's gRPC surfaces over TLS, and the monitoring HTTP port.
//!
//! One module per wire surface on the CA port (`istio`: CreateCertificate; `linkerd`:
//! Linkerd's Certify, when enabled), each with its own decode and its one mapping to gRPC
//! codes, all assembled in `router`; they call the shared issue path (`auth::issue_path`).
//!
//! `run` takes already-bound listeners and a shutdown signal, so tests bind `127.0.0.1:0`
//! and the CLI binds the configured addresses.

pub mod broker;
pub mod conn;
pub mod crl_http;
pub mod federation;
pub mod http;
mod instrument;
pub mod istio;
pub mod jwtsvid;
pub mod linkerd;
pub mod metrics;
pub mod peer;
pub mod port;
pub mod router;
pub mod throttle;
pub mod tls;

use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::auth::issue_path::IssuePath;
use crate::auth::AuthChain;
use crate::ca::policy::LivePolicy;
use crate::ca::Ca;
use crate::clock::SharedClock;
use crate::shutdown::Shutdown;

pub use metrics::Metrics;

/// gRPC messages above this are refused by the transport (our CSR limit is 64 KiB).
const MAX_MESSAGE_BYTES: usize = 256 * 1024;
/// The default `--handshake-timeout`.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 streams one connection may have open at once. An agent needs one; a load
/// generator or a proxy multiplexing many agents needs more, and beyond this a client should
/// open another connection.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 256;
/// Request header bytes (HPACK-decoded). A service-account token is 1-2 KiB and we refuse
/// tokens over 16 KiB anyway; a 1 MiB header is refused by the transport before we see it.
pub const MAX_HEADER_LIST_BYTES: u32 = 32 * 1024;
/// No CreateCertificate takes longer; a request stuck past it (an API server that never
/// answers) is cancelled and its slot freed.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Limits on the CA port that operators may tune.
#[derive(Debug, Clone)]
pub struct Limits {
    /// CreateCertificate calls in progress at once, over all connections; beyond it a call
    /// is refused at once with ResourceExhausted (istio-agent retries it with backoff).
    pub max_inflight: usize,
    /// Open connections (including ones still in their TLS handshake); a connection beyond
    /// it is closed at once, so held-open sockets cannot exhaust file descriptors.
    pub max_connections: usize,
    /// Failed authentications per peer address (`--auth-failure-burst`/`-rate`).
    pub auth_throttle: throttle::ThrottlePolicy,
    /// Open connections one peer (an IPv4 address or IPv6 /64, see [`peer`]) may hold,
    /// handshakes included (`--max-connections-per-peer`), so one client cannot take every
    /// `max_connections` slot.
    pub max_connections_per_peer: usize,
    /// A connection with no call in progress for this long is closed
    /// (`--idle-timeout`); zero keeps idle connections open.
    pub idle_timeout: Duration,
    /// A connection whose TLS handshake is not done by then is closed
    /// (`--handshake-timeout`).
    pub handshake_timeout: Duration,
    /// Sources exempt from the per-peer limits: the auth-failure throttle and
    /// `max_connections_per_peer` (`--throttle-exempt-cidr`).
    pub exempt: peer::PeerSet,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_inflight: 1024,
            max_connections: 10_000,
            auth_throttle: throttle::ThrottlePolicy::default(),
            max_connections_per_peer: 128,
            idle_timeout: Duration::from_secs(300),
            handshake_timeout: HANDSHAKE_TIMEOUT,
            exempt: peer::PeerSet::default(),
        }
    }
}

/// Everything the CA port needs.
pub struct Server {
    /// The CA whose current signer issues.
    pub ca: Arc<Ca>,
    /// The authenticators, tried in order.
    pub auth: AuthChain,
    /// How requested TTLs are resolved: the running policy, read per request.
    pub ttl: LivePolicy,
    /// The time certificates are issued and checked at.
    pub clock: SharedClock,
    /// Shared with the monitoring port.
    pub metrics: Arc<Metrics>,
    /// `None` serves plaintext (`--plaintext`, local experiments only).
    pub tls: Option<Arc<tls::TlsState>>,
    /// Issuance index for `revoke --identity`.
    pub index: Option<Arc<dyn crate::store::index::IssuanceIndex>>,
    /// The scheduler's sweep trigger for that index.
    pub sweep: Arc<crate::ca::revocation::SweepRequest>,
    /// Operator-tunable limits.
    pub limits: Limits,
    /// Node impersonation (`--trusted-node-accounts`); `None` refuses it.
    pub node_auth: Option<Arc<crate::auth::node::NodeAuthorizer>>,
    /// Linkerd's Certify on this port (`--linkerd-identity-domain`); `None` does not serve it.
    pub linkerd: Option<port::LinkerdPort>,
    /// The foreign bundles FetchFederatedBundles hands out (empty without `--federate-with`).
    pub federated: federation::FederatedBundles,
}

/// What the readiness probe and metrics page look at.
pub struct Readiness {
    /// Ready only while it has an unexpired signer.
    pub ca: Arc<Ca>,
    /// Rendered on `/metrics`.
    pub metrics: Arc<Metrics>,
    /// With TLS, ready only once a serving certificate is issued.
    pub tls: Option<Arc<tls::TlsState>>,
    /// The time the signer's expiry is checked against.
    pub clock: SharedClock,
}

impl Readiness {
    /// `None` when this replica can sign; otherwise why not.
    pub fn not_ready_reason(&self) -> Option<String> {
        let Some(signer) = self.ca.current() else {
            return Some("no signing CA loaded".into());
        };
        if signer.signing_cert().not_after <= self.clock.now() {
            return Some(format!(
                "signing CA expired at {}",
                signer.signing_cert().not_after
            ));
        }
        if self.tls.as_ref().is_some_and(|t| !t.ready()) {
            return Some("no serving certificate yet".into());
        }
        None
    }
}

impl Server {
    /// The readiness view of this server, for the monitoring port.
    pub fn readiness(&self) -> Arc<Readiness> {
        Arc::new(Readiness {
            ca: self.ca.clone(),
            metrics: self.metrics.clone(),
            tls: self.tls.clone(),
            clock: self.clock.clone(),
        })
    }

    /// Serves the CA on `listener` and monitoring on `metrics` until `shutdown`.
    pub async fn run(
        self,
        listener: TcpListener,
        metrics: Option<TcpListener>,
        shutdown: Shutdown,
    ) -> Result<(), tonic::transport::Error> {
        if let Some(ml) = metrics {
            let (state, sd) = (self.readiness(), shutdown.clone());
            tokio::spawn(async move {
                if let Err(e) = http::serve(ml, state, sd).await {
                    tracing::error!(error = %e, "monitoring server failed");
                }
            });
        }
        let admission = Arc::new(conn::Admission::new(
            &self.limits,
            self.metrics.connections.clone(),
        ));
        let port = Arc::new(port::CaPort {
            issue: Arc::new(IssuePath {
                ca: self.ca.clone(),
                index: self.index,
                sweep: self.sweep,
                clock: self.clock.clone(),
                ttl: self.ttl,
                node_auth: self.node_auth.clone(),
            }),
            auth: self.auth,
            metrics: self.metrics,
            inflight: Arc::new(tokio::sync::Semaphore::new(self.limits.max_inflight)),
            throttle: Arc::new(throttle::AuthThrottle::new(
                self.limits.auth_throttle,
                self.limits.exempt.clone(),
            )),
            linkerd: self.linkerd,
            federated: self.federated,
            broker: port::BrokerPort::new(self.node_auth.as_ref(), shutdown.clone()),
        });
        if !self.limits.exempt.nets().is_empty() {
            tracing::info!(exempt = ?self.limits.exempt.nets().iter().map(ToString::to_string).collect::<Vec<_>>(), "sources exempt from the per-peer limits (--throttle-exempt-cidr)");
        }
        let stop = {
            let sd = shutdown.clone();
            async move { sd.wait().await }
        };
        match self.tls {
            Some(tls) => {
                tokio::spawn(tls.clone().maintain(
                    self.ca.clone(),
                    self.clock.clone(),
                    shutdown.clone(),
                ));
                let config = tls.server_config();
                let incoming = accept_tls(
                    listener,
                    tokio_rustls::TlsAcceptor::from(config),
                    admission,
                    shutdown,
                );
                router::router::<TlsInfo>(&port)
                    .serve_with_incoming_shutdown(incoming, stop)
                    .await
            }
            None => {
                let incoming = accept_plain(listener, admission, shutdown);
                router::router::<tonic::transport::server::TcpConnectInfo>(&port)
                    .serve_with_incoming_shutdown(incoming, stop)
                    .await
            }
        }
    }
}

type TlsInfo = tonic::transport::server::TlsConnectInfo<tonic::transport::server::TcpConnectInfo>;

/// Accepts TCP, sets TCP_NODELAY (tonic ignores it for custom incoming streams, and without
/// it each small RPC waits ~40 ms on Nagle), and runs each TLS handshake in its own task so
/// a slow client cannot stall the accept loop.
fn accept_tls(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    admission: Arc<conn::Admission>,
    shutdown: Shutdown,
) -> ReceiverStream<Result<conn::Limited<tokio_rustls::server::TlsStream<TcpStream>>, std::io::Error>>
{
    let (tx, rx) = mpsc::channel(128);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = shutdown.wait() => return,
            };
            // The slots are taken before the handshake: half-open handshakes count too.
            let Some(ticket) = admission.admit(peer) else {
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let (acceptor, tx, admission) = (acceptor.clone(), tx.clone(), admission.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(admission.handshake_timeout, acceptor.accept(tcp)).await
                {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(admission.wrap(ticket, tls))).await;
                    }
                    Ok(Err(e)) => {
                        admission.handshake_failed();
                        tracing::debug!(%peer, error = %e, "TLS handshake failed")
                    }
                    Err(_) => {
                        admission.handshake_timed_out();
                        tracing::debug!(%peer, "TLS handshake timed out")
                    }
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

fn accept_plain(
    listener: TcpListener,
    admission: Arc<conn::Admission>,
    shutdown: Shutdown,
) -> ReceiverStream<Result<conn::Limited<TcpStream>, std::io::Error>> {
    let (tx, rx) = mpsc::channel(128);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                r = listener.accept() => match r {
                    Ok((tcp, peer)) => {
                        let Some(ticket) = admission.admit(peer) else { continue };
                        let _ = tcp.set_nodelay(true);
                        if tx.send(Ok(admission.wrap(ticket, tcp))).await.is_err() { return; }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                _ = shutdown.wait() => return,
            }
        }
    });
    ReceiverStream::new(rx)
}
