//! Connections on the CA port: who may open one, and when one is closed.
//!
//! A connection takes two slots when it is accepted, before its TLS handshake: one of the
//! `--max-connections` slots, and one of its peer's `--max-connections-per-peer` slots (a
//! peer is an IPv4 address or an IPv6 /64, see [`super::peer`]). Without the second, one
//! client that connects and waits would hold every slot and lock every agent out; with it,
//! a peer's extra connections are closed at once and everyone else still connects. Sources
//! in `--throttle-exempt-cidr` (an east-west gateway) take only the global slot.
//!
//! A connection is closed when its handshake is not done within `--handshake-timeout`, and
//! when it has carried no call for `--idle-timeout`. Idle means no HTTP/2 stream in
//! progress, not no bytes: HTTP/2 keepalive PINGs flow on an idle connection, and a call
//! that waits on a slow TokenReview sends nothing but is not idle. Streams are counted by
//! [`Tracked`], which wraps the gRPC service; the connection's reader ([`Limited`]) ends the
//! connection (as if the client had closed it) once the count has been zero long enough.
//! istio-agent dials again for its next renewal, so closing idle connections costs it a
//! handshake every 12 hours and frees the slot in between.
//!
//! Refused connections are counted per reason and logged at most once per
//! [`REFUSAL_LOG_INTERVAL`] per reason, with the number of refusals not logged: a client
//! reconnecting in a loop must not be able to fill the log.

use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt::Write;
use std::future::Future;
use std::marker::PhantomData;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tonic::server::NamedService;

use super::instrument::Counter;
use super::peer::{PeerKey, PeerSet};
use crate::future::BoxFuture;

/// At most one log line per refusal reason in this long.
pub const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Why a connection was refused: its label in `citadel_connections_refused_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Every `--max-connections` slot is taken.
    MaxConnections,
    /// The peer holds `--max-connections-per-peer` connections already.
    PerPeer,
}

impl Refusal {
    const ALL: [Refusal; 2] = [Refusal::MaxConnections, Refusal::PerPeer];

    fn label(self) -> &'static str {
        match self {
            Refusal::MaxConnections => "max_connections",
            Refusal::PerPeer => "max_connections_per_peer",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The connection counters (`citadel_connections_*`).
#[derive(Default)]
pub struct ConnectionMetrics {
    refused: [Counter; 2],
    /// Closed for carrying no call for `--idle-timeout`.
    pub closed_idle: Counter,
    /// Closed for not finishing the TLS handshake within `--handshake-timeout`.
    pub handshake_timeout: Counter,
    /// TLS handshakes that failed (bad client certificate, not TLS, ...).
    pub handshake_failed: Counter,
    open: AtomicU64,
}

impl ConnectionMetrics {
    /// Connections refused for `reason`.
    pub fn refused(&self, reason: Refusal) -> u64 {
        self.refused[reason.index()].get()
    }

    /// Connections holding a slot now, handshakes included.
    pub fn open(&self) -> u64 {
        self.open.load(Ordering::Relaxed)
    }

    pub(super) fn render(&self, out: &mut String) {
        let name = "citadel_connections_refused_total";
        let _ = writeln!(out, "# HELP {name} Connections to the CA port closed at once on accept: every --max-connections slot taken, or the peer at --max-connections-per-peer.\n# TYPE {name} counter");
        for r in Refusal::ALL {
            let _ = writeln!(
                out,
                "{name}{{reason=\"{}\"}} {}",
                r.label(),
                self.refused(r)
            );
        }
        let name = "citadel_connections_closed_total";
        let _ = writeln!(out, "# HELP {name} Connections to the CA port closed by the server: idle past --idle-timeout, TLS handshake not done within --handshake-timeout, or failed.\n# TYPE {name} counter");
        for (label, c) in [
            ("idle", &self.closed_idle),
            ("handshake_timeout", &self.handshake_timeout),
            ("handshake_failed", &self.handshake_failed),
        ] {
            let _ = writeln!(out, "{name}{{reason=\"{label}\"}} {}", c.get());
        }
        let _ = writeln!(out, "# HELP citadel_connections_open Connections to the CA port holding a slot, TLS handshakes included.\n# TYPE citadel_connections_open gauge\ncitadel_connections_open {}", self.open());
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Window {
    last: Option<Instant>,
    suppressed: u64,
}

/// Decides which refusals get a log line: the first of each reason, then at most one per
/// interval, each saying how many went unlogged since the previous line.
#[derive(Debug)]
pub struct RefusalLog {
    interval: Duration,
    windows: Mutex<[Window; 2]>,
}

impl RefusalLog {
    /// At most one line per `interval` per reason.
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            windows: Mutex::new([Window::default(); 2]),
        }
    }

    /// `Some(refusals not logged since the last line)` when this one is to be logged.
    pub fn note(&self, reason: Refusal, now: Instant) -> Option<u64> {
        let mut w = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        let w = &mut w[reason.index()];
        match w.last {
            Some(at) if now.saturating_duration_since(at) < self.interval => {
                w.suppressed += 1;
                None
            }
            _ => {
                w.last = Some(now);
                Some(std::mem::take(&mut w.suppressed))
            }
        }
    }
}

/// Open connections per peer.
#[derive(Debug)]
pub struct PeerConnections {
    cap: usize,
    exempt: PeerSet,
    counts: Mutex<HashMap<PeerKey, usize>>,
}

/// One of a peer's connection slots, given back when dropped; `key` is `None` for an exempt
/// source, which holds no per-peer slot.
#[derive(Debug)]
pub struct PeerSlot {
    table: Arc<PeerConnections>,
    key: Option<PeerKey>,
}

impl PeerConnections {
    /// `cap` connections per peer, none for sources in `exempt`.
    pub fn new(cap: usize, exempt: PeerSet) -> Arc<Self> {
        Arc::new(Self {
            cap,
            exempt,
            counts: Mutex::new(HashMap::new()),
        })
    }

    /// A slot for a connection from `ip`, or `None` when its peer holds its cap already.
    /// The table holds only peers with a connection open, so it is bounded by
    /// `--max-connections`.
    pub fn take(self: &Arc<Self>, ip: IpAddr) -> Option<PeerSlot> {
        if self.exempt.contains(ip) {
            return Some(PeerSlot {
                table: self.clone(),
                key: None,
            });
        }
        let key = PeerKey::of(ip);
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let n = counts.entry(key).or_insert(0);
        if *n >= self.cap {
            return None;
        }
        *n += 1;
        Some(PeerSlot {
            table: self.clone(),
            key: Some(key),
        })
    }

    /// Connections `ip`'s peer holds now.
    pub fn held(&self, ip: IpAddr) -> usize {
        let counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        counts.get(&PeerKey::of(ip)).copied().unwrap_or(0)
    }

    /// Peers holding at least one connection.
    pub fn peers(&self) -> usize {
        self.counts.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let Some(key) = self.key else { return };
        let mut counts = self.table.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = counts.get_mut(&key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(&key);
            }
        }
    }
}

/// Decides, on accept, whether a connection may take its slots.
pub struct Admission {
    slots: Arc<Semaphore>,
    peers: Arc<PeerConnections>,
    log: RefusalLog,
    metrics: Arc<ConnectionMetrics>,
    /// `--idle-timeout`; zero never closes idle connections.
    pub idle_timeout: Duration,
    /// `--handshake-timeout`.
    pub handshake_timeout: Duration,
}

/// The slots an accepted connection holds until it is dropped.
pub struct Ticket {
    _slot: OwnedSemaphorePermit,
    _peer: PeerSlot,
    metrics: Arc<ConnectionMetrics>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.metrics.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Admission {
    /// Admission under `limits`, counting in `metrics`.
    pub fn new(limits: &super::Limits, metrics: Arc<ConnectionMetrics>) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(limits.max_connections)),
            peers: PeerConnections::new(limits.max_connections_per_peer, limits.exempt.clone()),
            log: RefusalLog::new(REFUSAL_LOG_INTERVAL),
            metrics,
            idle_timeout: limits.idle_timeout,
            handshake_timeout: limits.handshake_timeout,
        }
    }

    /// Takes the peer's slot, then a global one; `None` refuses the connection (the caller
    /// drops it, which closes it). The peer's cap is checked first, so a peer over it never
    /// holds a global slot even for a moment.
    pub fn admit(&self, peer: SocketAddr) -> Option<Ticket> {
        let Some(peer_slot) = self.peers.take(peer.ip()) else {
            self.refuse(Refusal::PerPeer, peer);
            return None;
        };
        let Ok(slot) = self.slots.clone().try_acquire_owned() else {
            self.refuse(Refusal::MaxConnections, peer);
            return None;
        };
        self.metrics.open.fetch_add(1, Ordering::Relaxed);
        Some(Ticket {
            _slot: slot,
            _peer: peer_slot,
            metrics: self.metrics.clone(),
        })
    }

    fn refuse(&self, reason: Refusal, peer: SocketAddr) {
        self.metrics.refused[reason.index()].inc();
        let Some(suppressed) = self.log.note(reason, Instant::now()) else {
            return;
        };
        let peer = PeerKey::of(peer.ip());
        match reason {
            Refusal::PerPeer => tracing::warn!(
                %peer,
                suppressed,
                "connection refused: this peer holds --max-connections-per-peer connections already (logged at most every 10s; `suppressed` refusals since the last line; citadel_connections_refused_total)"
            ),
            Refusal::MaxConnections => tracing::warn!(
                %peer,
                suppressed,
                "connection refused: every --max-connections slot is taken (logged at most every 10s; `suppressed` refusals since the last line; citadel_connections_refused_total)"
            ),
        }
    }

    /// Counts a TLS handshake that failed.
    pub fn handshake_failed(&self) {
        self.metrics.handshake_failed.inc();
    }

    /// Counts a TLS handshake cut off at `handshake_timeout`.
    pub fn handshake_timed_out(&self) {
        self.metrics.handshake_timeout.inc();
    }

    /// `io` holding `ticket`, closed once idle for `idle_timeout`.
    pub fn wrap<S>(&self, ticket: Ticket, io: S) -> Limited<S> {
        let state = Arc::new(ConnState {
            base: Instant::now(),
            streams: AtomicU32::new(0),
            last_ms: AtomicU64::new(0),
        });
        let idle = (!self.idle_timeout.is_zero()).then(|| Idle {
            timeout: self.idle_timeout,
            sleep: Box::pin(tokio::time::sleep(self.idle_timeout)),
        });
        Limited {
            inner: io,
            state,
            idle,
            closed: false,
            metrics: self.metrics.clone(),
            _ticket: ticket,
        }
    }
}

/// What a connection's reader and its streams share: streams in progress, and when the last
/// one ended.
#[derive(Debug)]
pub struct ConnState {
    base: Instant,
    streams: AtomicU32,
    /// Milliseconds after `base` that the last stream ended (0: none yet).
    last_ms: AtomicU64,
}

impl ConnState {
    fn last_active(&self) -> Instant {
        self.base + Duration::from_millis(self.last_ms.load(Ordering::Acquire))
    }

    fn stream(self: &Arc<Self>) -> StreamGuard {
        self.streams.fetch_add(1, Ordering::AcqRel);
        StreamGuard(self.clone())
    }
}

/// One stream in progress on a connection.
struct StreamGuard(Arc<ConnState>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let s = &self.0;
        // The time first, then the count: a reader that sees the count at zero also sees
        // when it got there.
        let ms = s.base.elapsed().as_millis().min(u128::from(u64::MAX)) as u64;
        s.last_ms.store(ms.max(1), Ordering::Release);
        s.streams.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A connection's info as tonic sees it: the transport's own (`TcpConnectInfo`, or with TLS
/// the peer certificates too), plus the stream count [`Tracked`] keeps.
#[derive(Debug, Clone)]
pub struct ConnInfo<I> {
    inner: I,
    state: Arc<ConnState>,
}

struct Idle {
    timeout: Duration,
    sleep: Pin<Box<Sleep>>,
}

/// An accepted connection: holds its slots until dropped, and reads as closed by the peer
/// once it has carried no stream for the idle timeout, which makes the HTTP/2 server drop it.
pub struct Limited<S> {
    inner: S,
    state: Arc<ConnState>,
    idle: Option<Idle>,
    closed: bool,
    metrics: Arc<ConnectionMetrics>,
    _ticket: Ticket,
}

impl<S> Limited<S> {
    /// Whether the idle timer says this connection is done; rearms it otherwise. Polling
    /// the timer registers the reader's waker, so the HTTP/2 connection is woken to read
    /// again (and see the end) when it fires.
    fn idle_expired(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(idle) = &mut self.idle else {
            return false;
        };
        while idle.sleep.as_mut().poll(cx).is_ready() {
            let now = Instant::now();
            if self.state.streams.load(Ordering::Acquire) > 0 {
                idle.sleep.as_mut().reset(now + idle.timeout);
                continue;
            }
            let deadline = self.state.last_active() + idle.timeout;
            if deadline <= now {
                return true;
            }
            idle.sleep.as_mut().reset(deadline);
        }
        false
    }
}

impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected for Limited<S> {
    type ConnectInfo = ConnInfo<S::ConnectInfo>;
    fn connect_info(&self) -> Self::ConnectInfo {
        ConnInfo {
            inner: self.inner.connect_info(),
            state: self.state.clone(),
        }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Limited<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if this.closed {
            return Poll::Ready(Ok(()));
        }
        if this.idle_expired(cx) {
            this.closed = true;
            this.metrics.closed_idle.inc();
            tracing::debug!("closing a connection idle for --idle-timeout");
            // End of stream: no call is in progress, so nothing is cut short.
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Limited<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Wraps a gRPC service: each call counts as a stream in progress on its connection until
/// it is answered, and the transport's own connect info is put back where tonic's
/// `remote_addr()` and `peer_certs()` look for it.
pub struct Tracked<S, I> {
    inner: S,
    _info: PhantomData<fn() -> I>,
}

impl<S, I> Tracked<S, I> {
    /// `inner`, on connections whose transport info is `I`.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            _info: PhantomData,
        }
    }
}

impl<S: Clone, I> Clone for Tracked<S, I> {
    fn clone(&self) -> Self {
        Self::new(self.inner.clone())
    }
}

impl<S: NamedService, I> NamedService for Tracked<S, I> {
    const NAME: &'static str = S::NAME;
}

impl<S, I, B> tonic::codegen::Service<http::Request<B>> for Tracked<S, I>
where
    S: tonic::codegen::Service<http::Request<B>, Error = Infallible>,
    S::Future: Send + 'static,
    I: Clone + Send + Sync + 'static,
{
    type Response = S::Response;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<S::Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let guard = req.extensions_mut().remove::<ConnInfo<I>>().map(|info| {
            let guard = info.state.stream();
            req.extensions_mut().insert(info.inner);
            guard
        });
        let fut = self.inner.call(req);
        Box::pin(async move {
            let r = fut.await;
            drop(guard);
            r
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::peer::Cidr;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn refusals_are_logged_at_most_once_per_interval_per_reason_with_a_count() {
        let log = RefusalLog::new(Duration::from_secs(10));
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert_eq!(log.note(Refusal::PerPeer, at(0)), Some(0));
        for s in 1..10 {
            assert_eq!(log.note(Refusal::PerPeer, at(s)), None);
        }
        // Another reason has its own window.
        assert_eq!(log.note(Refusal::MaxConnections, at(5)), Some(0));
        assert_eq!(log.note(Refusal::PerPeer, at(10)), Some(9));
        assert_eq!(log.note(Refusal::PerPeer, at(11)), None);
        assert_eq!(log.note(Refusal::PerPeer, at(100)), Some(1));
        assert_eq!(log.note(Refusal::MaxConnections, at(6)), None);
    }

    #[test]
    fn a_peer_gets_its_cap_and_exempt_sources_none() {
        let exempt = PeerSet::new(vec!["10.9.0.0/16".parse::<Cidr>().unwrap()]);
        let t = PeerConnections::new(2, exempt);
        let a = [t.take(ip("10.0.0.1")), t.take(ip("10.0.0.1"))];
        assert!(a.iter().all(Option::is_some));
        assert!(t.take(ip("10.0.0.1")).is_none(), "over the cap");
        assert!(
            t.take(ip("::ffff:10.0.0.1")).is_none(),
            "the same peer, mapped"
        );
        assert!(t.take(ip("10.0.0.2")).is_some(), "another peer");
        // An IPv6 /64 is one peer.
        let v6 = [t.take(ip("2001:db8::1")), t.take(ip("2001:db8::2"))];
        assert!(v6.iter().all(Option::is_some));
        assert!(t.take(ip("2001:db8::ffff")).is_none());
        assert!(t.take(ip("2001:db8:0:1::1")).is_some());
        // Exempt: no cap, and not tracked.
        let gw: Vec<_> = (0..10).map(|_| t.take(ip("10.9.1.1")).unwrap()).collect();
        assert_eq!(t.held(ip("10.9.1.1")), 0);
        drop(gw);
        assert_eq!(t.held(ip("10.0.0.1")), 2);
        drop(a);
        assert_eq!(t.held(ip("10.0.0.1")), 0);
        assert!(t.take(ip("10.0.0.1")).is_some(), "slots come back");
        drop(v6);
        assert_eq!(t.peers(), 0, "peers without connections are forgotten");
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_is_idle_only_with_no_stream_for_the_timeout() {
        use tokio::io::AsyncReadExt;
        let metrics = Arc::new(ConnectionMetrics::default());
        let limits = super::super::Limits {
            idle_timeout: Duration::from_secs(60),
            ..Default::default()
        };
        let adm = Admission::new(&limits, metrics.clone());
        let ticket = adm.admit("10.0.0.1:5000".parse().unwrap()).unwrap();
        assert_eq!(metrics.open(), 1);
        let (client, server) = tokio::io::duplex(64);
        let mut conn = adm.wrap(ticket, server);
        let state = conn.state.clone();
        let guard = state.stream();
        let mut buf = [0u8; 8];
        // A stream in progress for 5 minutes: not idle.
        let read = tokio::time::timeout(Duration::from_secs(300), conn.read(&mut buf)).await;
        assert!(read.is_err(), "closed with a stream in progress");
        drop(guard);
        let t0 = Instant::now();
        assert_eq!(conn.read(&mut buf).await.unwrap(), 0, "closed once idle");
        let waited = t0.elapsed();
        assert!(
            waited >= Duration::from_secs(59) && waited <= Duration::from_secs(61),
            "{waited:?}"
        );
        assert_eq!(metrics.closed_idle.get(), 1);
        assert_eq!(conn.read(&mut buf).await.unwrap(), 0, "stays closed");
        drop(client);
        drop(conn);
        assert_eq!(metrics.open(), 0);
    }
}
