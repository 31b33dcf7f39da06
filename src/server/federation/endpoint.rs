//! The SPIFFE bundle endpoint (`--bundle-endpoint`): HTTPS GET, no client authentication,
//! answers with this trust domain's bundle (`ca::spiffe_bundle::render`) on any path.
//!
//! The document is rendered from the stored journal whenever the CA installs a new signer
//! and every few seconds (JWT key changes do not install a signer), and served from memory,
//! so a request never touches the store. Profile `https_spiffe` presents an X.509-SVID for
//! the endpoint's SPIFFE ID issued by our own CA (renewed at half-life and on every CA
//! change, chain with the intermediates); `https_web` presents the operator's certificate.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use http::{Method, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;
use tokio::net::TcpListener;

use super::{EndpointConfig, EndpointProfile};
use crate::ca::policy::RotationPolicy;
use crate::ca::{spiffe_bundle, Ca};
use crate::clock::SharedClock;
use crate::identity::SpiffeId;
use crate::pki::KeyType;
use crate::server::tls::provider;
use crate::shutdown::Shutdown;
use crate::store::Store;

/// The endpoint's SVID lives this long; it is renewed at half of it.
pub const SVID_TTL: Duration = Duration::from_secs(24 * 3600);
/// How often the document is re-rendered from the store without a CA change.
const RENDER_EVERY: Duration = Duration::from_secs(5);
/// A TLS handshake plus one request must finish within this.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);

/// The SPIFFE ID the endpoint presents unless `--bundle-endpoint-spiffe-id` says otherwise.
pub fn default_id(td: &crate::identity::TrustDomain) -> String {
    format!("spiffe://{}/citadel/bundle-endpoint", td.as_str())
}

/// The served document, and the certificate the handshake presents.
#[derive(Debug)]
pub struct Endpoint {
    document: ArcSwap<String>,
    serving: ArcSwapOption<CertifiedKey>,
    window: ArcSwapOption<(OffsetDateTime, OffsetDateTime)>,
}

impl ResolvesServerCert for Endpoint {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.serving.load_full()
    }
}

impl Endpoint {
    /// The document served now.
    pub fn document(&self) -> Arc<String> {
        self.document.load_full()
    }

    fn issue_svid(&self, ca: &Ca, id: &SpiffeId, now: OffsetDateTime) -> Result<(), String> {
        let signer = ca.current().ok_or("the CA is not ready")?;
        let key = KeyType::EcP256.generate().map_err(|e| e.to_string())?;
        let csr = crate::pki::csr::build(&key, &id.to_string()).map_err(|e| e.to_string())?;
        let subject = crate::pki::csr::parse_pem(csr.as_bytes())
            .map_err(|e| e.to_string())?
            .key;
        let issued = signer
            .issue_workload(&subject, id, now, SVID_TTL)
            .map_err(|e| e.to_string())?;
        let mut chain = vec![issued.der.clone()];
        chain.extend(signer.intermediates_der().iter().cloned());
        let signing_key = provider()
            .key_provider
            .load_private_key(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
                key.serialize_der(),
            )))
            .map_err(|e| e.to_string())?;
        self.serving
            .store(Some(Arc::new(CertifiedKey::new(chain, signing_key))));
        self.window
            .store(Some(Arc::new((issued.not_before, issued.not_after))));
        tracing::info!(id = %id, serial = %issued.serial_hex, not_after = %issued.not_after, "bundle endpoint SVID issued");
        Ok(())
    }
}

fn load_web(cert: &std::path::Path, key: &std::path::Path) -> Result<Arc<CertifiedKey>, String> {
    let read = |p: &std::path::Path| {
        std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()))
    };
    let chain: Vec<CertificateDer<'static>> = crate::pki::pem::parse_certs(&read(cert)?)
        .map_err(|e| format!("--bundle-endpoint-cert {}: {e}", cert.display()))?;
    let key_pem = read(key)?;
    let key_der = {
        use rustls_pki_types::pem::PemObject;
        PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| {
            format!(
                "--bundle-endpoint-key {}: no PEM private key",
                key.display()
            )
        })?
    };
    let signing_key = provider()
        .key_provider
        .load_private_key(key_der)
        .map_err(|e| format!("--bundle-endpoint-key {}: {e}", key.display()))?;
    Ok(Arc::new(CertifiedKey::new(chain, signing_key)))
}

/// Renders the document of the stored journal.
async fn render(store: &dyn Store, hint: Duration) -> Result<String, String> {
    let journal = store
        .load_journal()
        .await
        .map_err(|e| e.to_string())?
        .ok_or("no CA journal stored yet")?;
    spiffe_bundle::render(&journal.value, hint).map_err(|e| e.to_string())
}

/// Starts the endpoint on `listener`: renders the first document (an error if there is no
/// journal: the endpoint needs citadel's own CA), gets its certificate, then serves until
/// `shutdown` in a background task.
#[allow(clippy::too_many_arguments)]
pub async fn start(
    config: &EndpointConfig,
    listener: TcpListener,
    ca: Arc<Ca>,
    store: Arc<dyn Store>,
    policy: &RotationPolicy,
    clock: SharedClock,
    shutdown: Shutdown,
) -> Result<Arc<Endpoint>, String> {
    let hint = spiffe_bundle::refresh_hint(policy);
    let first = render(store.as_ref(), hint)
        .await
        .map_err(|e| format!("--bundle-endpoint: {e}"))?;
    let endpoint = Arc::new(Endpoint {
        document: ArcSwap::from_pointee(first),
        serving: ArcSwapOption::empty(),
        window: ArcSwapOption::empty(),
    });
    match &config.profile {
        EndpointProfile::Web { cert, key } => {
            endpoint.serving.store(Some(load_web(cert, key)?));
        }
        EndpointProfile::Spiffe { id } => {
            endpoint
                .issue_svid(&ca, id, clock.now())
                .map_err(|e| format!("--bundle-endpoint: cannot issue its SVID: {e}"))?;
        }
    }
    let svid_id = match &config.profile {
        EndpointProfile::Spiffe { id } => Some(id.clone()),
        EndpointProfile::Web { .. } => None,
    };
    tokio::spawn(maintain(
        endpoint.clone(),
        ca,
        store,
        hint,
        svid_id,
        clock,
        shutdown.clone(),
    ));
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_cert_resolver(endpoint.clone());
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    tracing::info!(
        addr = %listener.local_addr().map_err(|e| e.to_string())?,
        profile = match config.profile { EndpointProfile::Spiffe { .. } => "https_spiffe", EndpointProfile::Web { .. } => "https_web" },
        refresh_hint = %crate::duration::format(hint),
        "SPIFFE bundle endpoint serving"
    );
    tokio::spawn(serve(listener, acceptor, endpoint.clone(), shutdown));
    Ok(endpoint)
}

/// Keeps the document and the SVID current.
async fn maintain(
    endpoint: Arc<Endpoint>,
    ca: Arc<Ca>,
    store: Arc<dyn Store>,
    hint: Duration,
    svid_id: Option<SpiffeId>,
    clock: SharedClock,
    shutdown: Shutdown,
) {
    let mut changes = ca.subscribe();
    let mut issued_under = Some(*changes.borrow_and_update());
    loop {
        tokio::select! {
            _ = changes.changed() => {}
            _ = tokio::time::sleep(RENDER_EVERY) => {}
            _ = shutdown.wait() => return,
        }
        match render(store.as_ref(), hint).await {
            Ok(doc) => {
                if *endpoint.document.load_full() != doc {
                    tracing::info!("bundle endpoint document changed");
                    endpoint.document.store(Arc::new(doc));
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "bundle endpoint: cannot re-render; serving the last document")
            }
        }
        if let Some(id) = &svid_id {
            let generation = *changes.borrow_and_update();
            let half = endpoint
                .window
                .load()
                .as_ref()
                .map(|w| w.0 + (w.1 - w.0) / 2);
            if issued_under != Some(generation) || half.is_none_or(|h| clock.now() >= h) {
                match endpoint.issue_svid(&ca, id, clock.now()) {
                    Ok(()) => issued_under = Some(generation),
                    Err(e) => {
                        tracing::error!(error = %e, "bundle endpoint: cannot renew its SVID; retrying")
                    }
                }
            }
        }
    }
}

async fn serve(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    endpoint: Arc<Endpoint>,
    shutdown: Shutdown,
) {
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "bundle endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.wait() => return,
        };
        let (acceptor, endpoint) = (acceptor.clone(), endpoint.clone());
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            let work = async {
                let tls = acceptor.accept(tcp).await.map_err(|e| e.to_string())?;
                let service = hyper::service::service_fn(move |req| {
                    let endpoint = endpoint.clone();
                    async move { Ok::<_, std::convert::Infallible>(answer(&endpoint, req)) }
                });
                hyper::server::conn::http1::Builder::new()
                    .keep_alive(false)
                    .serve_connection(TokioIo::new(tls), service)
                    .await
                    .map_err(|e| e.to_string())
            };
            match tokio::time::timeout(CONNECTION_TIMEOUT, work).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "bundle endpoint connection failed")
                }
                Err(_) => tracing::debug!(%peer, "bundle endpoint connection timed out"),
            }
        });
    }
}

fn answer(endpoint: &Endpoint, req: http::Request<Incoming>) -> Response<String> {
    let mut resp = Response::new(String::new());
    if req.method() != Method::GET && req.method() != Method::HEAD {
        *resp.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
        resp.headers_mut()
            .insert(http::header::ALLOW, http::HeaderValue::from_static("GET"));
        return resp;
    }
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    if req.method() == Method::GET {
        *resp.body_mut() = endpoint.document().as_str().to_owned();
    }
    resp
}
