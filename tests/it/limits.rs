//! Per-peer limits on the CA port, attacked from outside over real TLS: one client holding
//! connections, idle connections, and peers sharing one source address (an SNAT or an
//! east-west gateway) with a client that fails authentication. Another loopback address
//! (127.0.0.2, 127.0.0.3) is another peer.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use citadel::pki::KeyType;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tonic::Code;

use crate::support::*;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// The value of one exported series (`name{labels}` exactly as rendered), 0 when absent.
fn metric(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0, |v| v.trim().parse().unwrap())
}

/// A TCP connection from `local` to `to`.
async fn tcp_from(local: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let s = tokio::net::TcpSocket::new_v4()?;
    s.bind(SocketAddr::new(local, 0))?;
    s.connect(to).await
}

/// A completed TLS handshake from `local` that then says nothing (no HTTP/2 preface): what
/// a client holding connections open does. Err when the server refused or closed it.
async fn tls_from(
    ca: &TestCa,
    local: IpAddr,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    for c in citadel::pki::pem::parse_certs(&ca.root_pem()).unwrap() {
        roots.add(c).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(citadel::server::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tcp_from(local, ca.addr).await?;
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = tokio::time::timeout(
        Duration::from_secs(5),
        tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, tcp),
    )
    .await
    .map_err(|_| std::io::Error::other("handshake hung"))??;
    // TLS 1.3: the server may refuse only after the client's Finished; a short read shows
    // whether it still holds the connection.
    let mut buf = [0u8; 1];
    match tokio::time::timeout(Duration::from_millis(100), tls.read(&mut buf)).await {
        Err(_) => Ok(tls),
        Ok(Ok(0)) => Err(std::io::Error::other("closed by the server")),
        Ok(Ok(_)) => Ok(tls), // the server's HTTP/2 SETTINGS: it is serving us
        Ok(Err(e)) => Err(e),
    }
}

/// Waits for the server to close `s`; how long that took.
async fn closed_within<S: tokio::io::AsyncRead + Unpin>(s: &mut S, limit: Duration) -> Duration {
    let t0 = Instant::now();
    let mut buf = [0u8; 256];
    loop {
        match tokio::time::timeout(limit.saturating_sub(t0.elapsed()), s.read(&mut buf)).await {
            Err(_) => panic!("still open after {limit:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => return t0.elapsed(),
            Ok(Ok(_)) => {} // HTTP/2 SETTINGS or a PING
        }
    }
}

/// M4: a peer (127.0.0.2) that opens more TLS connections than --max-connections-per-peer
/// and holds them gets only its cap; the rest are closed at once and counted; another peer
/// (127.0.0.1) still connects and gets its certificate although the hog asked for every
/// --max-connections slot; and a slot the hog gives back can be taken again.
#[tokio::test]
async fn one_peer_holding_connections_cannot_keep_another_from_its_certificate() {
    let ca = TestCa::start(&["--max-connections", "6", "--max-connections-per-peer", "3"]).await;
    let hog = ip("127.0.0.2");
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..6 {
        match tls_from(&ca, hog).await {
            Ok(s) => held.push(s),
            Err(_) => refused += 1,
        }
    }
    assert_eq!(
        (held.len(), refused),
        (3, 3),
        "the hog holds exactly its cap of the 6 global slots"
    );
    // Raw TCP from the hog (no handshake at all) is over the cap too, and closed at once
    // rather than after the handshake timeout.
    let mut raw = tcp_from(hog, ca.addr).await.unwrap();
    assert!(closed_within(&mut raw, Duration::from_secs(2)).await < Duration::from_secs(2));

    let (_, csr) = csr_for(KeyType::EcP256, &spiffe("shop", "cart"));
    let mut other = ca.client_from(ip("127.0.0.1")).await;
    issue(&mut other, &csr, "shop", "cart").await;

    let m = ca.metrics().await;
    assert_eq!(
        metric(
            &m,
            "citadel_connections_refused_total{reason=\"max_connections_per_peer\"}"
        ),
        4,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "citadel_connections_refused_total{reason=\"max_connections\"}"
        ),
        0
    );

    // The hog's held connections are still open (the cap refuses, it does not evict).
    for s in &mut held {
        let mut buf = [0u8; 64];
        let r = tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf)).await;
        assert!(
            !matches!(r, Ok(Ok(0)) | Ok(Err(_))),
            "held connection closed: {r:?}"
        );
    }
    held.pop();
    eventually(
        "a freed slot to be taken again",
        5,
        async || match tls_from(&ca, hog).await {
            Ok(s) => {
                held.push(s);
                true
            }
            Err(_) => false,
        },
    )
    .await;
    assert_eq!(held.len(), 3);
    issue(&mut other, &csr, "shop", "cart").await;
    // A connection that never sent the HTTP/2 preface holds a graceful shutdown until
    // its idle timeout; the test's clients go first.
    drop(held);
    ca.stop().await;
}

/// M4: a connection that carries no call for --idle-timeout is closed, whether it never
/// sent a request or its last call finished; a gRPC client whose connection was closed
/// reconnects for its next call; and the closes are counted.
#[tokio::test]
async fn idle_connections_are_closed_and_clients_reconnect() {
    let ca = TestCa::start(&["--idle-timeout", "1s"]).await;
    let mut silent = tls_from(&ca, ip("127.0.0.2")).await.unwrap();
    let took = closed_within(&mut silent, Duration::from_secs(10)).await;
    assert!(
        took >= Duration::from_millis(700),
        "closed before it was idle for --idle-timeout: {took:?}"
    );

    let (_, csr) = csr_for(KeyType::EcP256, &spiffe("shop", "cart"));
    let mut client = ca.client().await;
    issue(&mut client, &csr, "shop", "cart").await;
    eventually("the idle gRPC connection to be closed", 10, async || {
        metric(
            &ca.metrics().await,
            "citadel_connections_closed_total{reason=\"idle\"}",
        ) >= 2
    })
    .await;
    // Same channel: it reconnects.
    issue(&mut client, &csr, "shop", "cart").await;
    ca.stop().await;
}

/// Holds every call at the authenticators until released.
struct Gate(Arc<tokio::sync::Semaphore>);

impl citadel::auth::Authenticator for Gate {
    fn name(&self) -> &'static str {
        "gate"
    }
    fn authenticate<'a>(
        &'a self,
        _: citadel::auth::Credentials<'a>,
    ) -> citadel::future::BoxFuture<
        'a,
        Result<Option<citadel::auth::Caller>, citadel::auth::AuthFailure>,
    > {
        Box::pin(async move {
            let _pass = self.0.acquire().await;
            Ok(None)
        })
    }
}

/// The dev server's own chain, as one member behind a stand-in.
struct Chain(citadel::auth::AuthChain);

impl citadel::auth::Authenticator for Chain {
    fn name(&self) -> &'static str {
        "jwt"
    }
    fn authenticate<'a>(
        &'a self,
        creds: citadel::auth::Credentials<'a>,
    ) -> citadel::future::BoxFuture<
        'a,
        Result<Option<citadel::auth::Caller>, citadel::auth::AuthFailure>,
    > {
        Box::pin(async move {
            self.0
                .authenticate(creds)
                .await
                .map(Some)
                .map_err(citadel::auth::AuthFailure::invalid)
        })
    }
}

fn own_ca() -> Arc<citadel::ca::Ca> {
    use citadel::ca::bootstrap::{self, CaOptions};
    citadel::install_crypto_provider();
    let ca = citadel::ca::Ca::new();
    let journal =
        bootstrap::new_journal(&CaOptions::new(td()), time::OffsetDateTime::now_utc()).unwrap();
    ca.install(bootstrap::signer_from_journal(&journal, &td()).unwrap());
    ca
}

/// M4: idle means no call in progress, not no bytes: a call that takes longer than
/// --idle-timeout (a slow TokenReview) keeps its connection and is answered.
#[tokio::test]
async fn a_call_in_progress_keeps_its_connection_past_the_idle_timeout() {
    let mut server = dev_server(own_ca(), None);
    server.limits.idle_timeout = Duration::from_millis(300);
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let jwt = server.auth.clone();
    server.auth =
        citadel::auth::AuthChain::new(vec![Arc::new(Gate(gate.clone())), Arc::new(Chain(jwt))]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (trigger, sd) = citadel::shutdown::channel();
    let task = tokio::spawn(server.run(listener, None, sd));
    let (_, csr) = csr_for(KeyType::EcP256, &spiffe("shop", "cart"));
    let t = bearer(&token("shop", "cart"));
    let mut c = plaintext_client(addr).await;
    let slow = {
        let (mut c, csr, t) = (c.clone(), csr.clone(), t.clone());
        tokio::spawn(async move { call(&mut c, &csr, Some(&t), 0, None).await })
    };
    tokio::time::sleep(Duration::from_millis(1200)).await;
    gate.add_permits(1000);
    slow.await
        .unwrap()
        .expect("a call in progress is not cut off as idle");
    call(&mut c, &csr, Some(&t), 0, None)
        .await
        .expect("the server keeps serving");
    trigger.trigger();
    task.await.unwrap().unwrap();
}

const GARBAGE: &str = "Bearer eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln";

/// `n` calls with a bad token: their codes.
async fn bad_calls(c: &mut citadel::client::CaClient, csr: &str, n: usize) -> Vec<Code> {
    let mut codes = Vec::new();
    for _ in 0..n {
        codes.push(
            call(c, csr, Some(GARBAGE), 0, None)
                .await
                .unwrap_err()
                .code(),
        );
    }
    codes
}

fn repeated(code: Code, n: usize) -> Vec<Code> {
    vec![code; n]
}

/// M5: behind one source address (an SNAT), one client sends bad tokens until the address
/// is throttled; a healthy client at the same address renewing with its client certificate
/// keeps getting certificates, since that credential is verified before the throttle
/// applies. A fresh token from the throttled address (which would cost a verification) is
/// still refused unread, and another address is not affected.
#[tokio::test]
async fn a_throttled_address_still_renews_by_client_certificate() {
    let ca = TestCa::start(&["--auth-failure-burst", "3", "--auth-failure-rate", "0.01"]).await;
    let shared = ip("127.0.0.2");
    let id = spiffe("shop", "cart");
    let (key, csr) = csr_for(KeyType::EcP256, &id);
    let chain = issue(&mut ca.client_from(shared).await, &csr, "shop", "cart").await;

    let mut bad = ca.client_from(shared).await;
    let mut want = repeated(Code::Unauthenticated, 3);
    want.extend(repeated(Code::ResourceExhausted, 3));
    assert_eq!(bad_calls(&mut bad, &csr, 6).await, want);

    let mut renewing = citadel::client::connect(&citadel::client::ConnectOptions {
        addr: ca.addr.to_string(),
        root_pem: ca.root_pem(),
        server_name: Some("localhost".into()),
        identity: Some((
            chain[..chain.len() - 1].concat().into_bytes(),
            key.serialize_pem().into_bytes(),
        )),
        local_address: Some(shared),
        ..Default::default()
    })
    .await
    .unwrap();
    for _ in 0..3 {
        let got = call(&mut renewing, &csr, None, 0, None)
            .await
            .expect("a renewal by client certificate is served while its address is throttled");
        assert!(got.len() >= 2);
    }
    // A malformed header next to a valid certificate: the certificate still wins.
    call(&mut renewing, &csr, Some("Basic x"), 0, None)
        .await
        .expect("the client certificate authenticates");

    assert_eq!(
        bad_calls(&mut bad, &csr, 2).await,
        repeated(Code::ResourceExhausted, 2)
    );
    let fresh = call(
        &mut bad,
        &csr,
        Some(&bearer(&token("shop", "cart"))),
        0,
        None,
    )
    .await
    .unwrap_err();
    assert_eq!(fresh.code(), Code::ResourceExhausted, "{fresh:?}");
    assert!(
        fresh.message().contains("--auth-failure-burst"),
        "{fresh:?}"
    );
    issue(
        &mut ca.client_from(ip("127.0.0.1")).await,
        &csr,
        "shop",
        "cart",
    )
    .await;
    ca.stop().await;
}

/// M5: a source in --throttle-exempt-cidr is never throttled (every bad token is heard and
/// answered Unauthenticated, and its valid token is served) nor held to
/// --max-connections-per-peer, while an address outside the range is both.
#[tokio::test]
async fn an_exempt_cidr_is_neither_throttled_nor_capped() {
    let ca = TestCa::start(&[
        "--auth-failure-burst",
        "3",
        "--auth-failure-rate",
        "0.01",
        "--max-connections-per-peer",
        "2",
        "--throttle-exempt-cidr",
        "127.0.0.2/32",
    ])
    .await;
    let (gateway, other) = (ip("127.0.0.2"), ip("127.0.0.3"));
    let (_, csr) = csr_for(KeyType::EcP256, &spiffe("shop", "cart"));

    let mut gw = ca.client_from(gateway).await;
    assert_eq!(
        bad_calls(&mut gw, &csr, 10).await,
        repeated(Code::Unauthenticated, 10)
    );
    issue(&mut gw, &csr, "shop", "cart").await;

    let mut o = ca.client_from(other).await;
    let mut want = repeated(Code::Unauthenticated, 3);
    want.push(Code::ResourceExhausted);
    assert_eq!(bad_calls(&mut o, &csr, 4).await, want);

    // Connections: the gateway holds more than the per-peer cap; the other address has one
    // (its gRPC channel) and gets one more.
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(
            tls_from(&ca, gateway)
                .await
                .expect("the exempt source is not capped"),
        );
    }
    held.push(tls_from(&ca, other).await.expect("within the cap"));
    assert!(tls_from(&ca, other).await.is_err(), "over the cap");
    issue(&mut gw, &csr, "shop", "cart").await;
    drop(held);
    ca.stop().await;
}

/// Answers every bearer token "flaky" with a transient failure (an API server that does
/// not answer), and leaves the rest to the next authenticator.
struct Flaky;

impl citadel::auth::Authenticator for Flaky {
    fn name(&self) -> &'static str {
        "flaky"
    }
    fn authenticate<'a>(
        &'a self,
        creds: citadel::auth::Credentials<'a>,
    ) -> citadel::future::BoxFuture<
        'a,
        Result<Option<citadel::auth::Caller>, citadel::auth::AuthFailure>,
    > {
        let r = match creds.bearer {
            Some("flaky") => Err(citadel::auth::AuthFailure::transient(
                "TokenReview could not be sent to the API server",
            )),
            _ => Ok(None),
        };
        Box::pin(std::future::ready(r))
    }
}

/// M5: failures answered Unavailable (a credential that could not be checked: a TokenReview
/// queue that is full, an API server that does not answer) count toward the throttle too,
/// so a flood of plausible forgeries cannot keep the review queue full unthrottled.
#[tokio::test]
async fn unavailable_authentication_failures_count_toward_the_throttle() {
    let mut server = dev_server(own_ca(), None);
    server.limits.auth_throttle = citadel::server::throttle::ThrottlePolicy {
        burst: 3,
        per_second: 0.01,
    };
    let jwt = server.auth.clone();
    server.auth = citadel::auth::AuthChain::new(vec![Arc::new(Flaky), Arc::new(Chain(jwt))]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (trigger, sd) = citadel::shutdown::channel();
    let task = tokio::spawn(server.run(listener, None, sd));
    let (_, csr) = csr_for(KeyType::EcP256, &spiffe("shop", "cart"));
    let mut c = plaintext_client(addr).await;
    let mut codes = Vec::new();
    for _ in 0..5 {
        codes.push(
            call(&mut c, &csr, Some("Bearer flaky"), 0, None)
                .await
                .unwrap_err()
                .code(),
        );
    }
    let mut want = repeated(Code::Unavailable, 3);
    want.extend(repeated(Code::ResourceExhausted, 2));
    assert_eq!(codes, want);
    trigger.trigger();
    task.await.unwrap().unwrap();
}

/// M5 against a REAL kube-apiserver: with --auth tokenreview, a healthy pod behind the same
/// address as a client sending bad tokens keeps getting certificates with its token once
/// it has been reviewed (the validated-token cache answers before the throttle, and no
/// TokenReview is spent), while a token not yet reviewed from that address is refused
/// unread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttled_address_is_still_served_with_a_token_already_reviewed() {
    let Some(kube) = KubeEnv::start().await else {
        return;
    };
    kube.service_account("shop", "cart").await;
    let tmp = tempfile::tempdir().unwrap();
    let kubeconfig = kube.kubeconfig.to_str().unwrap().to_string();
    let ca = TestCa::start_in(
        tmp.path(),
        &[
            "--kubeconfig",
            &kubeconfig,
            "--auth",
            "tokenreview",
            "--token-cache-ttl",
            "10m",
            "--auth-failure-burst",
            "3",
            "--auth-failure-rate",
            "0.01",
        ],
    )
    .await;
    let shared = ip("127.0.0.2");
    let (_, csr) = csr_for(KeyType::EcP256, &spiffe("shop", "cart"));
    let honest = bearer(&kube.token("shop", "cart", "istio-ca").await);
    let mut pod = ca.client_from(shared).await;
    call(&mut pod, &csr, Some(&honest), 0, None)
        .await
        .expect("the honest pod's first certificate");
    let reviews = kube.token_reviews().await;

    let mut bad = ca.client_from(shared).await;
    let mut want = repeated(Code::Unauthenticated, 3);
    want.extend(repeated(Code::ResourceExhausted, 2));
    assert_eq!(bad_calls(&mut bad, &csr, 5).await, want);

    for _ in 0..3 {
        call(&mut pod, &csr, Some(&honest), 0, None)
            .await
            .expect("a token already reviewed is served while its address is throttled");
    }
    assert_eq!(
        kube.token_reviews().await,
        reviews,
        "served from the cache: no TokenReview spent"
    );
    let unreviewed = bearer(&kube.token("shop", "cart", "istio-ca").await);
    let err = call(&mut pod, &csr, Some(&unreviewed), 0, None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert_eq!(kube.token_reviews().await, reviews);
    issue_with_kube(&ca, &kube, &csr).await;
    ca.stop().await;
}

/// Another address is not throttled: its fresh token is reviewed and served.
async fn issue_with_kube(ca: &TestCa, kube: &KubeEnv, csr: &str) {
    let t = bearer(&kube.token("shop", "cart", "istio-ca").await);
    call(
        &mut ca.client_from(ip("127.0.0.1")).await,
        csr,
        Some(&t),
        0,
        None,
    )
    .await
    .expect("another address is served");
}
