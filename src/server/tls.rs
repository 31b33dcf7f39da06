//! TLS for the CA port: a serving certificate issued by citadel's own CA and renewed before
//! expiry, and optional client certificates verified against the *current* trust bundle.
//! Both are swapped in place, so a CA rotation never needs a restart.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use time::OffsetDateTime;

use crate::ca::{Ca, Signer};
use crate::clock::SharedClock;
use crate::pki::KeyType;

/// The longest a serving certificate lives; it is renewed at half that.
pub const SERVING_TTL: Duration = Duration::from_secs(24 * 3600);

/// The ring crypto provider, for every rustls config citadel builds (aws-lc is never linked).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The TLS material the acceptor reads on every handshake.
#[derive(Debug)]
pub struct TlsState {
    serving: ArcSwapOption<CertifiedKey>,
    serving_window: ArcSwapOption<(OffsetDateTime, OffsetDateTime)>,
    verifier: ArcSwap<Arc<dyn ClientCertVerifier>>,
    names: Vec<String>,
}

impl TlsState {
    /// TLS state that serves the DNS/IP `names`; not ready until [`TlsState::refresh`] issues a
    /// certificate.
    pub fn new(names: Vec<String>) -> Result<Arc<Self>, rustls::Error> {
        let verifier = build_verifier(&[])?;
        Ok(Arc::new(Self {
            serving: ArcSwapOption::empty(),
            serving_window: ArcSwapOption::empty(),
            verifier: ArcSwap::from_pointee(verifier),
            names,
        }))
    }

    /// Whether a serving certificate is issued yet.
    pub fn ready(&self) -> bool {
        self.serving.load().is_some()
    }

    /// Issues a fresh serving certificate from `signer` and trusts its bundle for clients.
    pub fn refresh(&self, signer: &Signer, now: OffsetDateTime) -> Result<(), String> {
        let key = KeyType::EcP256.generate().map_err(|e| e.to_string())?;
        let issued = signer
            .issue_serving(&key, &self.names, now, SERVING_TTL)
            .map_err(|e| e.to_string())?;
        // During a root rotation the cross-signed intermediate goes along (first, as in
        // responses): an agent that has not yet renewed holds only the old root and must
        // still be able to reach the CA to get the new one.
        let mut chain = vec![issued.der.clone()];
        chain.extend(signer.alternates_der().iter().cloned());
        chain.extend(signer.intermediates_der().iter().cloned());
        let signing_key = provider()
            .key_provider
            .load_private_key(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
                key.serialize_der(),
            )))
            .map_err(|e| e.to_string())?;
        self.serving
            .store(Some(Arc::new(CertifiedKey::new(chain, signing_key))));
        self.serving_window
            .store(Some(Arc::new((issued.not_before, issued.not_after))));
        self.verifier.store(Arc::new(
            build_verifier(signer.roots_der()).map_err(|e| e.to_string())?,
        ));
        tracing::info!(serial = %issued.serial_hex, not_after = %issued.not_after, names = ?self.names, "serving certificate issued");
        Ok(())
    }

    /// When the serving certificate should be renewed: half-way through its life.
    fn renew_at(&self) -> Option<OffsetDateTime> {
        self.serving_window
            .load()
            .as_ref()
            .map(|w| w.0 + (w.1 - w.0) / 2)
    }

    /// A rustls server config (TLS 1.2 and 1.3, ALPN h2) that reads the current certificate and
    /// client verifier on every handshake.
    pub fn server_config(self: &Arc<Self>) -> Arc<rustls::ServerConfig> {
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .expect("ring supports TLS 1.2 and 1.3")
            .with_client_cert_verifier(Arc::new(DynamicVerifier(self.clone())))
            .with_cert_resolver(self.clone());
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        Arc::new(cfg)
    }

    /// Keeps the serving certificate fresh: renews at half-life, and at once when the CA
    /// changes (new intermediate or bundle). Runs until `shutdown` resolves.
    pub async fn maintain(
        self: Arc<Self>,
        ca: Arc<Ca>,
        clock: SharedClock,
        shutdown: crate::shutdown::Shutdown,
    ) {
        let mut changes = ca.subscribe();
        // The CA generation this certificate was issued under; `None` forces a first refresh.
        let mut issued_under = None;
        loop {
            let generation = *changes.borrow_and_update();
            let due = self.renew_at().is_none_or(|at| clock.now() >= at);
            if due || issued_under != Some(generation) {
                match ca.current() {
                    Some(signer) => match self.refresh(&signer, clock.now()) {
                        Ok(()) => issued_under = Some(generation),
                        Err(e) => {
                            tracing::error!(error = %e, "could not renew the serving certificate; retrying in 10s")
                        }
                    },
                    None => tracing::debug!("no signer yet; serving certificate waits"),
                }
            }
            tokio::select! {
                _ = changes.changed() => {}
                _ = tokio::time::sleep(Duration::from_secs(10)) => {}
                _ = shutdown.wait() => return,
            }
        }
    }
}

impl ResolvesServerCert for TlsState {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.serving.load_full()
    }
}

fn build_verifier(
    roots: &[CertificateDer<'static>],
) -> Result<Arc<dyn ClientCertVerifier>, rustls::Error> {
    if roots.is_empty() {
        // No bundle yet: accept no client certificates, but still allow token callers.
        return Ok(Arc::new(NoClientAuth));
    }
    let mut store = RootCertStore::empty();
    for r in roots {
        store.add(r.clone())?;
    }
    WebPkiClientVerifier::builder_with_provider(Arc::new(store), provider())
        .allow_unauthenticated()
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))
}

/// Delegates to whatever verifier the current bundle produced.
#[derive(Debug)]
struct DynamicVerifier(Arc<TlsState>);

impl DynamicVerifier {
    fn inner(&self) -> Arc<Arc<dyn ClientCertVerifier>> {
        self.0.verifier.load_full()
    }
}

impl ClientCertVerifier for DynamicVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }
    fn client_auth_mandatory(&self) -> bool {
        false
    }
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Hints are optional; an empty list lets clients send any certificate they hold.
        &[]
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner()
            .verify_client_cert(end_entity, intermediates, now)
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner().verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner().verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Used before any bundle exists: every client certificate is refused.
#[derive(Debug)]
struct NoClientAuth;

impl ClientCertVerifier for NoClientAuth {
    fn offer_client_auth(&self) -> bool {
        false
    }
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }
    fn verify_client_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Err(rustls::Error::General(
            "the CA has no trust bundle yet".into(),
        ))
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General(
            "the CA has no trust bundle yet".into(),
        ))
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General(
            "the CA has no trust bundle yet".into(),
        ))
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::bootstrap::{self, CaOptions};
    use crate::identity::TrustDomain;

    #[test]
    fn serving_certificate_renews_at_half_life() {
        let td = TrustDomain::new("cluster.local").unwrap();
        let now = time::macros::datetime!(2030-01-01 0:00 UTC);
        let signer = bootstrap::signer_from_journal(
            &bootstrap::new_journal(&CaOptions::new(td.clone()), now).unwrap(),
            &td,
        )
        .unwrap();
        let state = TlsState::new(vec!["localhost".into()]).unwrap();
        assert!(state.renew_at().is_none() && !state.ready());
        state.refresh(&signer, now).unwrap();
        assert!(state.ready());
        // Backdated 2 minutes, 24h life: renewal at now + 12h - 1min.
        let at = state.renew_at().unwrap();
        assert_eq!(
            at,
            now - time::Duration::minutes(2)
                + (time::Duration::hours(24) + time::Duration::minutes(2)) / 2
        );
        assert!(at > now && at < now + time::Duration::hours(13));
    }
}
