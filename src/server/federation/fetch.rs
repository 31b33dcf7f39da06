//! Following foreign trust domains' bundle endpoints (`--federate-with`).
//!
//! One task per peer: fetch over HTTPS with the peer's profile, parse strictly
//! (`pki::spiffe_bundle::parse`), and only then replace the last good bundle; anything
//! refused (TLS failure, wrong endpoint identity, HTTP error, garbage, a key breaking the
//! format's rules) is logged and counted and the last good bundle kept. The last good bundle
//! of each peer is written to `<state-dir>/federation/<trust-domain>.json` before it is
//! handed out, so a restart starts from it (and, for `https_spiffe`, authenticates the
//! endpoint with it rather than with the bootstrap bundle).
//!
//! `https_spiffe`: the endpoint's certificate chain is verified against the X.509
//! authorities of the bundle we hold for the peer's trust domain (the bootstrap bundle until
//! a first fetch), with no host name check, and its URI SAN must be exactly the configured
//! endpoint SPIFFE ID. `https_web`: ordinary web PKI against the configured roots.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use x509_parser::prelude::{FromDer, GeneralName, ParsedExtension, X509Certificate};

use super::schedule::{self, PeerState};
use super::{FederatedBundles, Peer, PeerProfile};
use crate::clock::SharedClock;
use crate::identity::{SpiffeId, TrustDomain};
use crate::pki::spiffe_bundle::{self, SpiffeBundle, MAX_BUNDLE_BYTES};
use crate::server::tls::provider;
use crate::shutdown::Shutdown;

/// A fetch (connect, handshake, request, body) must finish within this.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(15);

/// Why a fetch was refused. Never holds key material.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// Connecting, TLS (including an endpoint that is not who it should be), HTTP.
    #[error("fetching {url}: {reason}")]
    Transport {
        /// The endpoint.
        url: String,
        /// What failed.
        reason: String,
    },
    /// The document was refused.
    #[error(transparent)]
    Bundle(#[from] spiffe_bundle::BundleError),
    /// No bundle to authenticate an `https_spiffe` endpoint with.
    #[error("no bundle of {0} to authenticate its endpoint: give --federation-bootstrap-bundle {0}=FILE")]
    NoBootstrap(String),
}

/// Per-peer counters for `/metrics`.
#[derive(Debug, Default)]
pub struct PeerStats {
    /// Fetches that replaced or confirmed the bundle.
    pub fetched: AtomicU64,
    /// Fetches refused (the last good bundle kept).
    pub refused: AtomicU64,
    /// `spiffe_sequence` of the bundle held (0 when none or absent).
    pub sequence: AtomicU64,
    /// Unix time of the last successful fetch.
    pub last_success: AtomicU64,
}

/// Every peer's counters, rendered with the CA's metrics.
#[derive(Debug, Default, Clone)]
pub struct FederationStats(Arc<Mutex<BTreeMap<String, Arc<PeerStats>>>>);

impl FederationStats {
    fn peer(&self, td: &str) -> Arc<PeerStats> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(td.to_string())
            .or_default()
            .clone()
    }

    /// Prometheus text: `citadel_federation_fetch_total{trust_domain,result}`,
    /// `citadel_federation_bundle_sequence{trust_domain}`,
    /// `citadel_federation_last_success_timestamp{trust_domain}`.
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write;
        let peers = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if peers.is_empty() {
            return;
        }
        let _ = writeln!(out, "# HELP citadel_federation_fetch_total Fetches of foreign trust domains' bundles, by result (refused: the last good bundle was kept).\n# TYPE citadel_federation_fetch_total counter");
        for (td, s) in peers.iter() {
            for (result, n) in [("ok", &s.fetched), ("refused", &s.refused)] {
                let _ = writeln!(
                    out,
                    "citadel_federation_fetch_total{{trust_domain=\"{td}\",result=\"{result}\"}} {}",
                    n.load(Ordering::Relaxed)
                );
            }
        }
        let _ = writeln!(out, "# HELP citadel_federation_bundle_sequence spiffe_sequence of the foreign bundle held.\n# TYPE citadel_federation_bundle_sequence gauge");
        for (td, s) in peers.iter() {
            let _ = writeln!(
                out,
                "citadel_federation_bundle_sequence{{trust_domain=\"{td}\"}} {}",
                s.sequence.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(out, "# HELP citadel_federation_last_success_timestamp_seconds When the foreign bundle was last fetched successfully.\n# TYPE citadel_federation_last_success_timestamp_seconds gauge");
        for (td, s) in peers.iter() {
            let _ = writeln!(
                out,
                "citadel_federation_last_success_timestamp_seconds{{trust_domain=\"{td}\"}} {}",
                s.last_success.load(Ordering::Relaxed)
            );
        }
    }
}

/// Where a peer's last good bundle is kept.
pub fn stored_path(state_dir: &Path, td: &TrustDomain) -> PathBuf {
    state_dir
        .join("federation")
        .join(format!("{}.json", td.as_str()))
}

/// Reads a bootstrap bundle: PEM certificates, or a SPIFFE bundle document.
pub fn read_bootstrap(td: &TrustDomain, path: &Path) -> Result<SpiffeBundle, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let trimmed = bytes.trim_ascii_start();
    if trimmed.starts_with(b"{") {
        return spiffe_bundle::parse(td, &bytes).map_err(|e| format!("{}: {e}", path.display()));
    }
    let certs =
        crate::pki::pem::parse_certs(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate", path.display()));
    }
    Ok(SpiffeBundle {
        trust_domain: td.clone(),
        x509_authorities: certs,
        jwt_keys: vec![],
        sequence: None,
        refresh_hint: None,
    })
}

/// The TLS client config for one fetch.
fn client_config(
    peer: &Peer,
    held: Option<&SpiffeBundle>,
) -> Result<rustls::ClientConfig, FetchError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| transport(peer, e))?;
    let mut cfg = match &peer.profile {
        PeerProfile::Spiffe { endpoint_id, .. } => {
            let held = held.ok_or_else(|| {
                FetchError::NoBootstrap(endpoint_id.trust_domain().as_str().to_string())
            })?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(SpiffeVerifier {
                    roots: held.x509_authorities.clone(),
                    id: endpoint_id.clone(),
                }))
                .with_no_client_auth()
        }
        PeerProfile::Web { roots } => {
            let pem = std::fs::read(roots).map_err(|e| FetchError::Transport {
                url: peer.url.clone(),
                reason: format!("cannot read {}: {e}", roots.display()),
            })?;
            let mut store = RootCertStore::empty();
            for c in crate::pki::pem::parse_certs(&pem).map_err(|e| transport(peer, e))? {
                store.add(c).map_err(|e| transport(peer, e))?;
            }
            builder.with_root_certificates(store).with_no_client_auth()
        }
    };
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

fn transport(peer: &Peer, e: impl std::fmt::Display) -> FetchError {
    FetchError::Transport {
        url: peer.url.clone(),
        reason: e.to_string(),
    }
}

/// One fetch of `peer`'s bundle, authenticated with `held` for `https_spiffe`.
pub async fn fetch_once(
    peer: &Peer,
    held: Option<&SpiffeBundle>,
) -> Result<SpiffeBundle, FetchError> {
    let cfg = client_config(peer, held)?;
    let work = async {
        let uri: http::Uri = peer.url.parse().map_err(|e| transport(peer, e))?;
        let host = uri.host().unwrap_or_default().to_string();
        let port = uri.port_u16().unwrap_or(443);
        let host_for_dns = host.trim_start_matches('[').trim_end_matches(']');
        let tcp = tokio::net::TcpStream::connect((host_for_dns, port))
            .await
            .map_err(|e| transport(peer, e))?;
        let _ = tcp.set_nodelay(true);
        let name =
            ServerName::try_from(host_for_dns.to_string()).map_err(|e| transport(peer, e))?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(name, tcp)
            .await
            .map_err(|e| transport(peer, format!("TLS: {e}")))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| transport(peer, e))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let authority = uri.authority().map(|a| a.as_str()).unwrap_or(&host);
        let req = http::Request::get(path)
            .header(http::header::HOST, authority)
            .header(http::header::ACCEPT, "application/json")
            .body(Empty::<Bytes>::new())
            .map_err(|e| transport(peer, e))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| transport(peer, e))?;
        if resp.status() != http::StatusCode::OK {
            return Err(transport(peer, format!("HTTP {}", resp.status())));
        }
        let body = Limited::new(resp.into_body(), MAX_BUNDLE_BYTES)
            .collect()
            .await
            .map_err(|e| transport(peer, format!("reading the body: {e}")))?
            .to_bytes();
        Ok::<_, FetchError>(spiffe_bundle::parse(&peer.trust_domain, &body)?)
    };
    tokio::time::timeout(FETCH_TIMEOUT, work)
        .await
        .map_err(|_| transport(peer, "timed out"))?
}

/// Starts one follower task per peer. Each first loads the persisted last good bundle (or,
/// for `https_spiffe`, only uses the bootstrap bundle to authenticate).
pub fn start(
    peers: &[Peer],
    state_dir: &Path,
    bundles: FederatedBundles,
    stats: FederationStats,
    clock: SharedClock,
    shutdown: Shutdown,
) -> Result<(), String> {
    for peer in peers {
        let path = stored_path(state_dir, &peer.trust_domain);
        let stored = match std::fs::read(&path) {
            Ok(bytes) => Some(
                spiffe_bundle::parse(&peer.trust_domain, &bytes)
                    .map_err(|e| format!("{}: {e}", path.display()))?,
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        };
        // What authenticates an https_spiffe endpoint before anything is fetched.
        let bootstrap = match (&peer.profile, &stored) {
            (PeerProfile::Spiffe { bootstrap: Some(b), .. }, None) => {
                Some(read_bootstrap(&peer.trust_domain, b)?)
            }
            (PeerProfile::Spiffe { bootstrap: None, .. }, None) => {
                return Err(format!(
                    "--federate-with {}: https_spiffe needs --federation-bootstrap-bundle {}=FILE (nothing fetched yet in {})",
                    peer.trust_domain.as_str(),
                    peer.trust_domain.as_str(),
                    path.display()
                ))
            }
            _ => None,
        };
        if let Some(b) = &stored {
            tracing::info!(trust_domain = %peer.trust_domain.as_str(), sequence = ?b.sequence, "federation: starting from the stored bundle");
            bundles.set(b.clone());
        }
        let follower = Follower {
            peer: peer.clone(),
            path,
            held: stored,
            bootstrap,
            bundles: bundles.clone(),
            stats: stats.peer(peer.trust_domain.as_str()),
            clock: clock.clone(),
        };
        tokio::spawn(follower.run(shutdown.clone()));
    }
    Ok(())
}

struct Follower {
    peer: Peer,
    path: PathBuf,
    held: Option<SpiffeBundle>,
    bootstrap: Option<SpiffeBundle>,
    bundles: FederatedBundles,
    stats: Arc<PeerStats>,
    clock: SharedClock,
}

impl Follower {
    async fn run(mut self, shutdown: Shutdown) {
        let td = self.peer.trust_domain.as_str().to_string();
        let mut state = PeerState {
            hint: self.held.as_ref().and_then(|b| b.refresh_hint),
            ..PeerState::default()
        };
        loop {
            let wait = schedule::wait(&state, self.clock.now());
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.wait() => return,
            }
            let auth = self.held.as_ref().or(self.bootstrap.as_ref());
            match fetch_once(&self.peer, auth).await {
                Ok(b) => {
                    if let Err(e) = self.keep(&b) {
                        tracing::error!(trust_domain = %td, error = %e, "federation: cannot store the fetched bundle; keeping the last good one");
                        self.stats.refused.fetch_add(1, Ordering::Relaxed);
                        state.failed(self.clock.now());
                        continue;
                    }
                    if self.held.as_ref() != Some(&b) {
                        tracing::info!(trust_domain = %td, sequence = ?b.sequence, x509_authorities = b.x509_authorities.len(), jwt_keys = b.jwt_keys.len(), refresh_hint = ?b.refresh_hint, "federation: bundle updated");
                        if b.x509_authorities.is_empty() && b.jwt_keys.is_empty() {
                            tracing::warn!(trust_domain = %td, "federation: the bundle has no keys: every SVID of this trust domain is now invalid");
                        }
                    }
                    self.stats.fetched.fetch_add(1, Ordering::Relaxed);
                    self.stats
                        .sequence
                        .store(b.sequence.unwrap_or(0), Ordering::Relaxed);
                    self.stats.last_success.store(
                        self.clock.now().unix_timestamp().max(0) as u64,
                        Ordering::Relaxed,
                    );
                    state.succeeded(self.clock.now(), b.refresh_hint);
                    self.bundles.set(b.clone());
                    self.held = Some(b);
                }
                Err(e) => {
                    self.stats.refused.fetch_add(1, Ordering::Relaxed);
                    state.failed(self.clock.now());
                    tracing::warn!(trust_domain = %td, error = %e, failures = state.failures, "federation: bundle refused; keeping the last good one");
                }
            }
        }
    }

    /// Persists `b` (atomically) before it is handed out.
    fn keep(&self, b: &SpiffeBundle) -> std::io::Result<()> {
        if self.held.as_ref() == Some(b) {
            return Ok(());
        }
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        crate::fsutil::write_atomic(&self.path, b.to_json().as_bytes(), 0o644)
    }
}

/// `https_spiffe` server authentication: chain to the held bundle, URI SAN = endpoint ID.
#[derive(Debug)]
struct SpiffeVerifier {
    roots: Vec<CertificateDer<'static>>,
    id: SpiffeId,
}

impl ServerCertVerifier for SpiffeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let anchors: Vec<_> = self
            .roots
            .iter()
            .filter_map(|r| webpki::anchor_from_trusted_cert(r).ok())
            .collect();
        let cert = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|e| rustls::Error::General(format!("endpoint certificate: {e}")))?;
        cert.verify_for_usage(
            provider().signature_verification_algorithms.all,
            &anchors,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(|e| {
            rustls::Error::General(format!(
                "endpoint certificate does not chain to the bundle of {}: {e}",
                self.id.trust_domain().as_str()
            ))
        })?;
        let (_, parsed) = X509Certificate::from_der(end_entity)
            .map_err(|e| rustls::Error::General(format!("endpoint certificate: {e}")))?;
        let want = self.id.to_string();
        let mut uris = vec![];
        for ext in parsed.extensions() {
            if let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() {
                for n in &san.general_names {
                    if let GeneralName::URI(u) = n {
                        uris.push(u.to_string());
                    }
                }
            }
        }
        if uris.len() == 1 && uris[0] == want {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "endpoint presents {uris:?}, expected {want}"
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}
