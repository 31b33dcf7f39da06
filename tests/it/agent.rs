//! The sidecar agent against a real CA (and, for malformed answers, a fake one): retries,
//! keeping the old certificate while the CA is down, token rotation, and the SDS protocol.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use citadel::agent::fetch::FetchConfig;
use citadel::agent::renew::{self, RenewPolicy};
use citadel::agent::{sds, AgentStats, Credentials, CredentialsRx};
use citadel::pki::KeyType;
use citadel::shutdown::{self, Trigger};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{secret, Secret};
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use crate::support::*;

struct Agent {
    rx: CredentialsRx,
    stats: Arc<AgentStats>,
    trigger: Trigger,
    task: tokio::task::JoinHandle<Result<(), String>>,
}

impl Agent {
    fn start(cfg: FetchConfig) -> Self {
        let policy = RenewPolicy {
            retry_initial: Duration::from_millis(100),
            retry_max: Duration::from_millis(800),
            ..Default::default()
        };
        let (tx, rx) = watch::channel(None);
        let stats = AgentStats::new();
        let (trigger, sd) = shutdown::channel();
        let task = tokio::spawn(renew::run(
            cfg,
            policy,
            citadel::clock::system(),
            tx,
            stats.clone(),
            false,
            sd,
        ));
        Agent {
            rx,
            stats,
            trigger,
            task,
        }
    }

    fn current(&self) -> Option<Arc<Credentials>> {
        self.rx.borrow().clone()
    }

    async fn stop(self) {
        self.trigger.trigger();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
    }
}

fn config(addr: &str, root: Vec<u8>, token_file: &Path, ttl: Duration) -> FetchConfig {
    FetchConfig {
        ca_addr: addr.to_string(),
        ca_root_pem: root,
        ca_root_file: None,
        tls_server_name: Some("localhost".into()),
        token_file: Some(token_file.to_path_buf()),
        trust_domain: td(),
        identity: None,
        key_type: KeyType::EcP256,
        cert_ttl: ttl,
        plaintext: false,
    }
}

fn write_token(path: &Path, ns: &str, sa: &str) {
    std::fs::write(path, token(ns, sa)).unwrap();
}

#[tokio::test]
async fn ca_down_at_start_then_up_and_down_again_before_renewal() {
    let tmp = tempfile::tempdir().unwrap();
    let addr: std::net::SocketAddr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let token_file = tmp.path().join("token");
    write_token(&token_file, "shop", "cart");
    // The CA's root must exist before the CA: create the CA once, stop it, keep its state.
    let ca = TestCa::start_in(tmp.path(), &[]).await;
    let root = ca.root_pem();
    ca.stop().await;

    let agent = Agent::start(config(
        &addr.to_string(),
        root,
        &token_file,
        Duration::from_secs(4),
    ));
    eventually(
        "a few failed attempts while the CA is down",
        10,
        async || agent.stats.renewals_failed.load(Ordering::Relaxed) >= 3,
    )
    .await;
    assert!(agent.current().is_none());
    assert!(
        agent.stats.retries.load(Ordering::Relaxed) >= 3,
        "consecutive retries are counted"
    );

    let ca = TestCa::try_start_on(tmp.path(), &[], addr).await.unwrap();
    eventually("the certificate once the CA is up", 10, async || {
        agent.current().is_some()
    })
    .await;
    let first = agent.current().unwrap();
    assert_eq!(first.identity, spiffe("shop", "cart"));
    assert_eq!(agent.stats.retries.load(Ordering::Relaxed), 0);

    // The CA goes away before renewal (at ~2s of a 4s certificate).
    ca.stop().await;
    let failures = agent.stats.renewals_failed.load(Ordering::Relaxed);
    eventually("failed renewals while the CA is down", 10, async || {
        agent.stats.renewals_failed.load(Ordering::Relaxed) > failures
    })
    .await;
    assert_eq!(
        agent.current().unwrap().serial_hex,
        first.serial_hex,
        "keeps serving the current certificate"
    );

    let ca = TestCa::try_start_on(tmp.path(), &[], addr).await.unwrap();
    eventually("renewal once the CA is back", 10, async || {
        agent.current().unwrap().serial_hex != first.serial_hex
    })
    .await;
    agent.stop().await;
    ca.stop().await;
}

#[tokio::test]
async fn rotated_token_file_is_read_on_the_next_request() {
    let ca = TestCa::start(&[]).await;
    let token_file = ca.dir.join("token");
    write_token(&token_file, "shop", "cart");
    let agent = Agent::start(config(
        &ca.addr.to_string(),
        ca.root_pem(),
        &token_file,
        Duration::from_secs(3),
    ));
    eventually("first certificate", 10, async || agent.current().is_some()).await;
    assert_eq!(agent.current().unwrap().identity, spiffe("shop", "cart"));
    // kubelet rotates the file; here the new token also names another account, which makes
    // "the next request used the new token" visible in the next certificate.
    write_token(&token_file, "shop", "cart-v2");
    eventually("a certificate from the rotated token", 10, async || {
        agent.current().unwrap().identity == spiffe("shop", "cart-v2")
    })
    .await;

    // With the token gone, renewal falls back to the current certificate over mTLS.
    std::fs::remove_file(&token_file).unwrap();
    let before = agent.current().unwrap().serial_hex.clone();
    eventually("renewal by client certificate", 10, async || {
        agent.current().unwrap().serial_hex != before
    })
    .await;
    assert_eq!(agent.current().unwrap().identity, spiffe("shop", "cart-v2"));
    agent.stop().await;
    ca.stop().await;
}

/// A CA that answers with whatever the test wants: the malformed-response cases.
mod fake {
    use citadel::proto::istio_certificate_service_server::{
        IstioCertificateService, IstioCertificateServiceServer,
    };
    use citadel::proto::{IstioCertificateRequest, IstioCertificateResponse};
    use tonic::{Request, Response, Status};

    /// Answers every request with the same chain.
    pub struct FakeCa(pub Vec<String>);

    #[tonic::async_trait]
    impl IstioCertificateService for FakeCa {
        async fn create_certificate(
            &self,
            r: Request<IstioCertificateRequest>,
        ) -> Result<Response<IstioCertificateResponse>, Status> {
            let _: &IstioCertificateRequest = r.get_ref();
            Ok(Response::new(IstioCertificateResponse {
                cert_chain: self.0.clone(),
            }))
        }
    }

    pub async fn serve(ca: FakeCa) -> String {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(IstioCertificateServiceServer::new(ca))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l)),
        );
        addr
    }
}

#[tokio::test]
async fn malformed_answers_are_rejected_and_never_served() {
    // A real CA signs for the *wrong* identity; another chain is from a stranger; one answer
    // is too short; one is garbage.
    let real = TestCa::start(&[]).await;
    let stranger = TestCa::start(&[]).await;
    let (_, other_csr) = csr_for(KeyType::EcP256, &spiffe("kube-system", "admin"));
    let wrong_san = issue(&mut real.client().await, &other_csr, "kube-system", "admin").await;
    let (_, csr) = csr_for(KeyType::EcP256, &spiffe("shop", "cart"));
    let foreign = issue(&mut stranger.client().await, &csr, "shop", "cart").await;
    let mut broken = foreign.clone();
    *broken.last_mut().unwrap() = String::from_utf8(real.root_pem()).unwrap();
    let cases: Vec<(&str, Vec<String>)> = vec![
        ("wrong SAN", wrong_san),
        ("chain to another root", broken),
        ("one element", foreign[..1].to_vec()),
        ("garbage", vec!["nope".into(), "nope".into()]),
    ];
    let tmp = tempfile::tempdir().unwrap();
    let token_file = tmp.path().join("token");
    write_token(&token_file, "shop", "cart");
    for (name, answer) in cases {
        let addr = fake::serve(fake::FakeCa(answer)).await;
        let mut cfg = config(&addr, vec![], &token_file, Duration::from_secs(60));
        cfg.plaintext = true;
        let agent = Agent::start(cfg);
        eventually(name, 10, async || {
            agent.stats.renewals_failed.load(Ordering::Relaxed) >= 2
        })
        .await;
        assert!(
            agent.current().is_none(),
            "{name}: a refused answer was served"
        );
        agent.stop().await;
    }
    real.stop().await;
    stranger.stop().await;
}

fn creds(version: u64, crl: Option<&str>) -> Arc<Credentials> {
    Arc::new(Credentials {
        identity: spiffe("shop", "cart"),
        key_pem: "KEY".into(),
        chain_pem: format!("CHAIN-{version}"),
        roots_pem: "ROOTS".into(),
        crl_pem: crl.map(str::to_string),
        serial_hex: format!("{version:02x}"),
        not_before: time::OffsetDateTime::now_utc(),
        not_after: time::OffsetDateTime::now_utc() + time::Duration::hours(1),
        version,
        federated: Default::default(),
    })
}

async fn sds_client(path: PathBuf) -> SecretDiscoveryServiceClient<tonic::transport::Channel> {
    SecretDiscoveryServiceClient::new(uds_channel(path).await)
}

/// SDS served at `path` from a credentials channel starting at `first`, until `Trigger`.
async fn sds_server(
    path: &Path,
    first: Option<Arc<Credentials>>,
) -> (
    watch::Sender<Option<Arc<Credentials>>>,
    Arc<AgentStats>,
    Trigger,
    tokio::task::JoinHandle<Result<(), String>>,
) {
    let (tx, rx) = watch::channel(first);
    let stats = AgentStats::new();
    let (trigger, sd) = shutdown::channel();
    let server = tokio::spawn({
        let (path, stats) = (path.to_path_buf(), stats.clone());
        async move { sds::serve(&path, rx, stats, sd).await }
    });
    eventually("socket", 5, async || path.exists()).await;
    (tx, stats, trigger, server)
}

/// An Envoy-like SDS stream: send requests, read responses.
struct Stream {
    tx: mpsc::Sender<DiscoveryRequest>,
    rx: tonic::Streaming<DiscoveryResponse>,
}

impl Stream {
    async fn open(path: &Path, names: &[&str]) -> Self {
        let (tx, req_rx) = mpsc::channel(8);
        let mut client = sds_client(path.to_path_buf()).await;
        tx.send(request(names, "", "", None)).await.unwrap();
        let rx = client
            .stream_secrets(ReceiverStream::new(req_rx))
            .await
            .unwrap()
            .into_inner();
        Stream { tx, rx }
    }
    async fn next(&mut self) -> DiscoveryResponse {
        tokio::time::timeout(Duration::from_secs(5), self.rx.message())
            .await
            .expect("a response within 5s")
            .unwrap()
            .unwrap()
    }
    async fn nothing_for(&mut self, ms: u64) {
        if let Ok(r) = tokio::time::timeout(Duration::from_millis(ms), self.rx.message()).await {
            panic!(
                "unexpected response: {:?}",
                r.map(|m| m.map(|m| m.version_info))
            );
        }
    }
}

fn request(names: &[&str], version: &str, nonce: &str, error: Option<&str>) -> DiscoveryRequest {
    DiscoveryRequest {
        version_info: version.into(),
        resource_names: names.iter().map(|s| s.to_string()).collect(),
        type_url: sds::SECRET_TYPE.into(),
        response_nonce: nonce.into(),
        error_detail: error.map(|m| envoy_types::pb::google::rpc::Status {
            code: 3,
            message: m.into(),
            details: vec![],
        }),
        ..Default::default()
    }
}

fn secrets(r: &DiscoveryResponse) -> Vec<Secret> {
    r.resources
        .iter()
        .map(|a| Secret::decode(a.value.as_slice()).unwrap())
        .collect()
}

#[tokio::test]
async fn sds_pushes_to_every_stream_handles_nack_without_looping_and_serves_reconnects() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("run/sds/sds.sock");
    let (tx, stats, trigger, server) = sds_server(&path, None).await;
    for d in ["run", "run/sds"] {
        assert_eq!(
            crate::support::file_mode(&tmp.path().join(d)),
            0o700,
            "{d}: the socket serves private keys; its directories are the agent's alone"
        );
    }

    // Streams opened before any certificate exists wait, then both get the first push.
    let mut a = Stream::open(&path, &["default"]).await;
    let mut b = Stream::open(&path, &["default", "ROOTCA"]).await;
    a.nothing_for(200).await;
    tx.send_replace(Some(creds(1, None)));
    let (ra, rb) = (a.next().await, b.next().await);
    assert_eq!(
        (ra.version_info.as_str(), rb.version_info.as_str()),
        ("1", "1")
    );
    assert_eq!(ra.type_url, sds::SECRET_TYPE);
    match &secrets(&ra)[0].r#type {
        Some(secret::Type::TlsCertificate(t)) => {
            assert!(t.certificate_chain.is_some() && t.private_key.is_some())
        }
        other => panic!("default should be a TlsCertificate: {other:?}"),
    }
    let names: Vec<String> = secrets(&rb).iter().map(|s| s.name.clone()).collect();
    assert_eq!(names, vec!["ROOTCA", "default"]);
    // ACKs change nothing.
    a.tx.send(request(&["default"], "1", &ra.nonce, None))
        .await
        .unwrap();
    b.tx.send(request(&["default", "ROOTCA"], "1", &rb.nonce, None))
        .await
        .unwrap();
    a.nothing_for(200).await;

    // A renewal is pushed to both.
    tx.send_replace(Some(creds(2, Some("CRL"))));
    let (ra, rb) = (a.next().await, b.next().await);
    assert_eq!(
        (ra.version_info.as_str(), rb.version_info.as_str()),
        ("2", "2")
    );
    let rootca = secrets(&rb)
        .into_iter()
        .find(|s| s.name == "ROOTCA")
        .unwrap();
    match rootca.r#type {
        Some(secret::Type::ValidationContext(v)) => {
            assert!(v.crl.is_some(), "the CRL travels in ROOTCA");
            assert!(v.only_verify_leaf_cert_crl);
        }
        other => panic!("ROOTCA should be a validation context: {other:?}"),
    }

    // A NACK is counted and not answered: no loop.
    a.tx.send(request(
        &["default"],
        "1",
        &ra.nonce,
        Some("bad certificate"),
    ))
    .await
    .unwrap();
    a.nothing_for(300).await;
    eventually("nack counted", 5, async || {
        stats.sds_nacks.load(Ordering::Relaxed) == 1
    })
    .await;
    // A stale nonce is ignored.
    b.tx.send(request(&["default"], "1", "stale-nonce", None))
        .await
        .unwrap();
    b.nothing_for(200).await;

    // A reconnecting Envoy gets the current state at once.
    drop(a);
    let mut c = Stream::open(&path, &["default"]).await;
    let rc = c.next().await;
    assert_eq!(rc.version_info, "2");
    // Unknown names get nothing.
    let mut d = Stream::open(&path, &["file-cert:/etc/x"]).await;
    d.nothing_for(200).await;
    assert!(stats.sds_pushes.load(Ordering::Relaxed) >= 5);
    trigger.trigger();
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
}

/// Abuse of the SDS socket by a local process: every dimension is bounded, each refusal has
/// its code, and a well-behaved Envoy stream keeps getting its secrets meanwhile.
#[tokio::test]
async fn sds_abuse_is_bounded_and_a_well_behaved_stream_keeps_its_secrets() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("sds.sock");
    let (tx, stats, trigger, server) = sds_server(&path, Some(creds(1, None))).await;
    let mut envoy = Stream::open(&path, &["default", "ROOTCA"]).await;
    assert_eq!(envoy.next().await.version_info, "1");

    // Garbage on the wire: the connection is closed, nothing else is.
    for junk in [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        [
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".as_slice(),
            &[0xff; 4096],
        ]
        .concat(),
        vec![0u8; 65536],
    ] {
        let mut raw = tokio::net::UnixStream::connect(&path).await.unwrap();
        let _ = raw.write_all(&junk).await;
        let mut buf = vec![0u8; 4096];
        let closed = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match raw.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => continue, // a GOAWAY or an HTTP/1 error, then the close
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "a connection sending garbage is closed");
    }

    // Too many resource names, a name too long, a message too large: refused on that stream.
    let many: Vec<String> = (0..=sds::MAX_RESOURCE_NAMES)
        .map(|i| format!("n{i}"))
        .collect();
    let long = "x".repeat(sds::MAX_NAME_BYTES + 1);
    let huge = "x".repeat(sds::MAX_MESSAGE_BYTES + 1);
    for (names, code) in [
        (many, tonic::Code::InvalidArgument),
        (vec![long], tonic::Code::InvalidArgument),
        (vec![huge], tonic::Code::OutOfRange),
    ] {
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let mut s = Stream::open(&path, &names).await;
        let got = tokio::time::timeout(Duration::from_secs(5), s.rx.message())
            .await
            .expect("an answer within 5s");
        assert_eq!(
            got.err().map(|e| e.code()),
            Some(code),
            "{} names",
            names.len()
        );
        let mut client = sds_client(path.clone()).await;
        let unary = client
            .fetch_secrets(request(&names, "", "", None))
            .await
            .unwrap_err();
        assert_eq!(
            unary.code(),
            code,
            "FetchSecrets with {} names",
            names.len()
        );
    }

    // Streams: MAX_STREAMS in all (Envoy's own counts), then ResourceExhausted until one closes.
    eventually("the refused streams to close", 5, async || {
        stats.sds_streams.load(Ordering::Relaxed) == 1
    })
    .await;
    let mut held = Vec::new();
    for _ in 1..sds::MAX_STREAMS {
        held.push(Stream::open(&path, &["default"]).await);
    }
    let (_keep, req_rx) = mpsc::channel::<DiscoveryRequest>(1);
    let refused = sds_client(path.clone())
        .await
        .stream_secrets(ReceiverStream::new(req_rx))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
    // Two refusals (stream and unary) for each of the two name cases, and this one; the
    // oversized message is refused by the transport before the handler sees it.
    assert_eq!(stats.sds_refused.load(Ordering::Relaxed), 5);

    // Meanwhile the well-behaved stream gets a renewal, and a freed slot is usable again.
    tx.send_replace(Some(creds(2, None)));
    assert_eq!(envoy.next().await.version_info, "2");
    drop(held.pop());
    eventually("a freed stream slot", 5, async || {
        stats.sds_streams.load(Ordering::Relaxed) < sds::MAX_STREAMS as i64
    })
    .await;
    let mut again = Stream::open(&path, &["default"]).await;
    assert_eq!(again.next().await.version_info, "2");
    trigger.trigger();
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
}
