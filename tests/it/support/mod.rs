//! The suite's test kit: a real `citadel serve` in-process on loopback (on the real clock or
//! a ManualClock), dev tokens, CSRs, third-party validators; polling (`poll`), waiting on
//! conditions and Events in the API server (`wait`), the binary as a process (`process`), and
//! the real API server harness (`apiserver`).

pub mod apiserver;
pub mod poll;
pub mod process;
pub mod wait;

pub use apiserver::KubeEnv;
pub use poll::{eventually, until};
pub use process::{backup_key_cmd, citadel_ok, cli, run, BIN};

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use citadel::client::{self, CaClient, ConnectOptions};
use citadel::cmd::serve;
use citadel::devkeys;
use citadel::identity::{ServiceAccount, SpiffeId, TrustDomain};
use citadel::pki::{csr, KeyType};
use citadel::proto::IstioCertificateRequest;
use citadel::shutdown::{self, Trigger};
use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

#[derive(Parser)]
struct ServeCli {
    #[command(flatten)]
    args: serve::Args,
}

pub struct TestCa {
    pub dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    pub addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    trigger: Trigger,
    task: tokio::task::JoinHandle<Result<(), String>>,
    plaintext: bool,
}

impl TestCa {
    /// `citadel serve --dev` with a fresh state directory, plus `extra` flags.
    pub async fn start(extra: &[&str]) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let mut ca = Self::start_in(&dir, extra).await;
        ca._tmp = Some(tmp);
        ca
    }

    /// Same, on an existing directory (state lives in `dir/state`).
    pub async fn start_in(dir: &Path, extra: &[&str]) -> Self {
        Self::try_start_in(dir, extra).await.expect("server starts")
    }

    pub async fn try_start_in(dir: &Path, extra: &[&str]) -> Result<Self, String> {
        Self::try_start_on(dir, extra, "127.0.0.1:0".parse().unwrap()).await
    }

    /// The whole server on `clock`: tests move it (days in milliseconds) instead of
    /// sleeping. Pass `--plaintext` unless the clock stays near real time: TLS clients check
    /// the serving certificate against the real clock.
    pub async fn start_on_clock(clock: citadel::clock::SharedClock, extra: &[&str]) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let mut ca = Self::try_start_with(tmp.path(), extra, "127.0.0.1:0".parse().unwrap(), clock)
            .await
            .expect("server starts");
        ca._tmp = Some(tmp);
        ca
    }

    /// On a chosen address, so a test can bring the "same" CA back after stopping it.
    pub async fn try_start_on(
        dir: &Path,
        extra: &[&str],
        listen: SocketAddr,
    ) -> Result<Self, String> {
        Self::try_start_with(dir, extra, listen, citadel::clock::system()).await
    }

    pub async fn try_start_with(
        dir: &Path,
        extra: &[&str],
        listen: SocketAddr,
        clock: citadel::clock::SharedClock,
    ) -> Result<Self, String> {
        citadel::install_crypto_provider();
        let state = dir.join("state");
        let mut argv: Vec<String> = vec![
            "serve".into(),
            "--dev".into(),
            "--state-dir".into(),
            state.display().to_string(),
        ];
        argv.extend(extra.iter().map(|s| s.to_string()));
        let cli = ServeCli::try_parse_from(&argv).map_err(|e| e.to_string())?;
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|e| format!("bind {listen}: {e}"))?;
        let metrics = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (addr, metrics_addr) = (
            listener.local_addr().unwrap(),
            metrics.local_addr().unwrap(),
        );
        let (trigger, sd) = shutdown::channel();
        let plaintext = cli.args.plaintext;
        let task = tokio::spawn(serve::serve_with_clock(
            cli.args, listener, metrics, clock, sd,
        ));
        let ca = Self {
            dir: dir.to_path_buf(),
            _tmp: None,
            addr,
            metrics_addr,
            trigger,
            task,
            plaintext,
        };
        for _ in 0..400 {
            if ca.task.is_finished() {
                let r = ca.task.await.map_err(|e| e.to_string())?;
                return Err(r.err().unwrap_or_else(|| "server exited".into()));
            }
            if let Ok((200, _)) = http_get(ca.metrics_addr, "/healthz/ready").await {
                return Ok(ca);
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        Err("server did not become ready".into())
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    pub fn root_pem(&self) -> Vec<u8> {
        std::fs::read(self.state_dir().join("root-cert.pem")).unwrap()
    }

    pub async fn client(&self) -> CaClient {
        self.client_with(None).await
    }

    pub async fn client_with(&self, identity: Option<(Vec<u8>, Vec<u8>)>) -> CaClient {
        self.client_opts(identity, None).await
    }

    /// A client speaking from `local` (another loopback address is another peer).
    pub async fn client_from(&self, local: std::net::IpAddr) -> CaClient {
        self.client_opts(None, Some(local)).await
    }

    async fn client_opts(
        &self,
        identity: Option<(Vec<u8>, Vec<u8>)>,
        local_address: Option<std::net::IpAddr>,
    ) -> CaClient {
        client::connect(&ConnectOptions {
            addr: self.addr.to_string(),
            root_pem: self.root_pem(),
            server_name: Some("localhost".into()),
            identity,
            plaintext: self.plaintext,
            local_address,
        })
        .await
        .unwrap()
    }

    pub async fn stop(self) -> Option<tempfile::TempDir> {
        self.trigger.trigger();
        let r = tokio::time::timeout(Duration::from_secs(10), self.task).await;
        assert!(
            matches!(r, Ok(Ok(Ok(())))),
            "server did not stop cleanly: {r:?}"
        );
        self._tmp
    }

    pub async fn metrics(&self) -> String {
        http_get(self.metrics_addr, "/metrics").await.unwrap().1
    }
}

/// A client for a server run without TLS (`--plaintext`, or `Server` with `tls: None`).
pub async fn plaintext_client(addr: SocketAddr) -> CaClient {
    client::connect(&ConnectOptions {
        addr: addr.to_string(),
        plaintext: true,
        ..Default::default()
    })
    .await
    .unwrap()
}

/// A minimal HTTP/1.1 GET, to avoid another client dependency.
pub async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).await?;
    let code = buf
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = buf
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_string())
        .unwrap_or_default();
    Ok((code, body))
}

pub fn td() -> TrustDomain {
    TrustDomain::new("cluster.local").unwrap()
}

pub fn spiffe(ns: &str, sa: &str) -> SpiffeId {
    td().service_account_id(&ServiceAccount::new(ns, sa).unwrap())
}

pub fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// Dev-key claims for ns/sa, valid for an hour.
pub fn claims(ns: &str, sa: &str) -> serde_json::Value {
    citadel::cmd::dev_token::claims(
        &ServiceAccount::new(ns, sa).unwrap(),
        &["istio-ca".into()],
        now(),
        Duration::from_secs(3600),
        Some("pod-1"),
    )
}

pub fn sign(claims: &serde_json::Value) -> String {
    devkeys::signing_key().sign(claims)
}

pub fn token(ns: &str, sa: &str) -> String {
    sign(&claims(ns, sa))
}

/// A dev token minted at `clock`'s time (the server checks exp against it).
pub fn token_at(clock: &dyn citadel::clock::Clock, ns: &str, sa: &str) -> String {
    sign(&citadel::cmd::dev_token::claims(
        &ServiceAccount::new(ns, sa).unwrap(),
        &["istio-ca".into()],
        clock.now().unix_timestamp(),
        Duration::from_secs(3600),
        Some("pod-1"),
    ))
}

/// shop/cart's certificate chain, with a token minted at `clock`'s time; the CA must sign.
pub async fn issue_at(
    client: &mut CaClient,
    csr: &str,
    clock: &dyn citadel::clock::Clock,
) -> Vec<String> {
    call(
        client,
        csr,
        Some(&bearer(&token_at(clock, "shop", "cart"))),
        0,
        None,
    )
    .await
    .expect("the CA keeps signing")
}

/// A key and an istio-agent-shaped CSR for `id`.
pub fn csr_for(kt: KeyType, id: &SpiffeId) -> (rcgen::KeyPair, String) {
    let key = kt.generate().unwrap();
    let pem = csr::build(&key, &id.to_string()).unwrap();
    (key, pem)
}

/// One raw CreateCertificate, returning the gRPC status on failure.
pub async fn call(
    client: &mut CaClient,
    csr: &str,
    auth_header: Option<&str>,
    ttl: i64,
    metadata: Option<prost_types::Struct>,
) -> Result<Vec<String>, tonic::Status> {
    let mut req = tonic::Request::new(IstioCertificateRequest {
        csr: csr.to_string(),
        validity_duration: ttl,
        metadata,
    });
    if let Some(h) = auth_header {
        req.metadata_mut()
            .insert("authorization", h.parse().unwrap());
    }
    client
        .create_certificate(req)
        .await
        .map(|r| r.into_inner().cert_chain)
}

pub fn bearer(t: &str) -> String {
    format!("Bearer {t}")
}

/// A validator binary, or skip the test (fail under CI=true, where a missing tool is a bug
/// in the set-up script).
pub fn require_tool(name: &str) -> bool {
    let ok = std::process::Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{name} is required under CI=true; run scripts/test.sh"
        );
        eprintln!("SKIPPED: {name} not installed");
    }
    ok
}

/// Python with the `cryptography` package, for a second third-party validator.
pub fn python() -> Option<String> {
    let candidates = [
        std::env::var("CITADEL_PYTHON").unwrap_or_default(),
        "python3".to_string(),
    ];
    for py in candidates.iter().filter(|p| !p.is_empty()) {
        let ok = std::process::Command::new(py)
            .args(["-c", "import cryptography.x509.verification"])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if ok {
            return Some(py.clone());
        }
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "python cryptography>=42 is required under CI=true; run scripts/test.sh"
    );
    eprintln!("SKIPPED: python cryptography not available");
    None
}

/// A CreateCertificate with a dev token for ns/sa that must succeed.
pub async fn issue(client: &mut CaClient, csr: &str, ns: &str, sa: &str) -> Vec<String> {
    call(client, csr, Some(&bearer(&token(ns, sa))), 0, None)
        .await
        .unwrap_or_else(|e| panic!("issuing for {ns}/{sa}: {e:?}"))
}

/// A library-level server trusting dev tokens (any issuer), over `ca` and optional TLS.
pub fn dev_server(
    ca: std::sync::Arc<citadel::ca::Ca>,
    tls: Option<std::sync::Arc<citadel::server::tls::TlsState>>,
) -> citadel::server::Server {
    use citadel::auth::jwt::{JwtAuthenticator, JwtPolicy, DEFAULT_LEEWAY};
    let jwt = JwtAuthenticator::new(
        citadel::auth::jwks::Jwks::from_json(devkeys::jwks_json().as_bytes()).unwrap(),
        JwtPolicy {
            issuer: None,
            audiences: vec!["istio-ca".into()],
            leeway: DEFAULT_LEEWAY,
        },
        td(),
        citadel::clock::system(),
    );
    citadel::server::Server {
        ca,
        auth: citadel::auth::AuthChain::new(vec![std::sync::Arc::new(jwt)]),
        ttl: citadel::ca::policy::TtlPolicy::default().into(),
        clock: citadel::clock::system(),
        metrics: std::sync::Arc::new(citadel::server::Metrics::default()),
        tls,
        index: None,
        sweep: Default::default(),
        limits: citadel::server::Limits::default(),
        node_auth: None,
        linkerd: None,
        federated: Default::default(),
    }
}

/// The permission bits of a file.
pub fn file_mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A gRPC channel over the Unix socket at `path` (the agent's SDS and Workload API sockets).
pub async fn uds_channel(path: PathBuf) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_static("http://uds")
        .connect_with_connector(tower::service_fn(move |_| {
            let p = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(p).await?,
                ))
            }
        }))
        .await
        .unwrap()
}
