//! The network edge: the CA gRPC service over TLS, and the monitoring HTTP port.
//!
//! `run` takes already-bound listeners and a shutdown signal, so tests bind `127.0.0.1:0`
//! and the CLI binds the configured addresses.

pub mod grpc;
pub mod http;
pub mod metrics;
pub mod peer;
pub mod throttle;
pub mod tls;

use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::auth::AuthChain;
use crate::ca::policy::TtlPolicy;
use crate::ca::Ca;
use crate::clock::SharedClock;
use crate::proto::istio_certificate_service_server::IstioCertificateServiceServer;
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

/// A connection holding one of the `max_connections` slots until it is dropped.
struct Limited<S> {
    inner: S,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected for Limited<S> {
    type ConnectInfo = S::ConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Limited<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Limited<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Takes a connection slot, or refuses the connection (it is dropped, which closes it).
fn slot(
    slots: &Arc<tokio::sync::Semaphore>,
    peer: &std::net::SocketAddr,
) -> Option<tokio::sync::OwnedSemaphorePermit> {
    match slots.clone().try_acquire_owned() {
        Ok(p) => Some(p),
        Err(_) => {
            tracing::warn!(%peer, "connection refused: at the --max-connections limit");
            None
        }
    }
}

/// Everything the CA port needs.
pub struct Server {
    /// The CA whose current signer issues.
    pub ca: Arc<Ca>,
    /// The authenticators, tried in order.
    pub auth: AuthChain,
    /// How requested TTLs are resolved.
    pub ttl: TtlPolicy,
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
        let service = IstioCertificateServiceServer::new(grpc::CaService {
            ca: self.ca.clone(),
            auth: self.auth,
            ttl: self.ttl,
            clock: self.clock.clone(),
            metrics: self.metrics,
            index: self.index,
            sweep: self.sweep,
            inflight: Arc::new(tokio::sync::Semaphore::new(self.limits.max_inflight)),
            throttle: Arc::new(throttle::AuthThrottle::new(self.limits.auth_throttle)),
            node_auth: self.node_auth,
        })
        .max_decoding_message_size(MAX_MESSAGE_BYTES);
        let router = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
            .http2_max_header_list_size(Some(MAX_HEADER_LIST_BYTES))
            .timeout(REQUEST_TIMEOUT)
            .add_service(service);
        let stop = {
            let sd = shutdown.clone();
            async move { sd.wait().await }
        };
        let slots = Arc::new(tokio::sync::Semaphore::new(self.limits.max_connections));
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
                    slots,
                    shutdown,
                );
                router.serve_with_incoming_shutdown(incoming, stop).await
            }
            None => {
                let incoming = accept_plain(listener, slots, shutdown);
                router.serve_with_incoming_shutdown(incoming, stop).await
            }
        }
    }
}

/// Accepts TCP, sets TCP_NODELAY (tonic ignores it for custom incoming streams, and without
/// it each small RPC waits ~40 ms on Nagle), and runs each TLS handshake in its own task so
/// a slow client cannot stall the accept loop.
fn accept_tls(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    slots: Arc<tokio::sync::Semaphore>,
    shutdown: Shutdown,
) -> ReceiverStream<Result<Limited<tokio_rustls::server::TlsStream<TcpStream>>, std::io::Error>> {
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
            // The slot is taken before the handshake: half-open handshakes count too.
            let Some(slot) = slot(&slots, &peer) else {
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx
                            .send(Ok(Limited {
                                inner: tls,
                                _slot: slot,
                            }))
                            .await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

fn accept_plain(
    listener: TcpListener,
    slots: Arc<tokio::sync::Semaphore>,
    shutdown: Shutdown,
) -> ReceiverStream<Result<Limited<TcpStream>, std::io::Error>> {
    let (tx, rx) = mpsc::channel(128);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                r = listener.accept() => match r {
                    Ok((tcp, peer)) => {
                        let Some(slot) = slot(&slots, &peer) else { continue };
                        let _ = tcp.set_nodelay(true);
                        if tx.send(Ok(Limited { inner: tcp, _slot: slot })).await.is_err() { return; }
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
