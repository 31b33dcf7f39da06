//! Renewal by client certificate: a workload holding a valid SVID of this trust domain gets a
//! new certificate for the same identity, without a token (istiod's first authenticator).
//!
//! The TLS layer already checked the chain against the trust bundle during the handshake;
//! this re-checks at the injected clock's time and extracts exactly one SPIFFE ID.

use std::sync::Arc;

use super::{AuthFailure, AuthMethod, Authenticator, Caller, Credentials, Verified};
use crate::ca::Ca;
use crate::clock::SharedClock;
use crate::future::BoxFuture;
use crate::identity::{SpiffeId, TrustDomain};
use crate::pki::chain::{self, Usage};

/// Authenticates a caller by the client certificate it presented during the TLS handshake.
pub struct ClientCertAuthenticator {
    ca: Arc<Ca>,
    trust_domain: TrustDomain,
    clock: SharedClock,
}

impl ClientCertAuthenticator {
    /// Checks chains against `ca`'s current bundle and revocations, at `clock`'s time.
    pub fn new(ca: Arc<Ca>, trust_domain: TrustDomain, clock: SharedClock) -> Self {
        Self {
            ca,
            trust_domain,
            clock,
        }
    }

    fn check(&self, peer: &[rustls_pki_types::CertificateDer<'static>]) -> Result<Caller, String> {
        let signer = self.ca.current().ok_or("the CA is not ready")?;
        let (leaf, intermediates) = peer.split_first().ok_or("empty certificate chain")?;
        chain::verify_leaf(
            leaf,
            intermediates,
            signer.roots_der(),
            self.clock.now(),
            Usage::ClientAuth,
        )
        .map_err(|e| e.to_string())?;
        let info = chain::describe(leaf).map_err(|e| e.to_string())?;
        // An X509-SVID carries exactly one URI SAN, its SPIFFE ID. A certificate with more
        // (even if one is a SPIFFE ID) is not an SVID, and whatever checks it elsewhere may
        // read the other name.
        let id = match info.uri_sans.as_slice() {
            [one] => SpiffeId::parse(one)
                .map_err(|e| format!("client certificate URI SAN is not a SPIFFE ID: {e}"))?,
            [] => return Err("client certificate has no SPIFFE ID".into()),
            many => {
                return Err(format!(
                    "client certificate has {} URI SANs; an X509-SVID has exactly one",
                    many.len()
                ))
            }
        };
        // Every certificate the client presented, not only the leaf: a CRL may revoke an
        // intermediate (a plugged-in CA's root signs one for its intermediates).
        for (i, der) in peer.iter().enumerate() {
            if signer.is_revoked(der) {
                let what = if i == 0 {
                    "client certificate"
                } else {
                    "a CA certificate in the client chain"
                };
                let serial = chain::describe(der)
                    .map(|c| c.serial_hex)
                    .unwrap_or_default();
                return Err(format!("{what} (serial {serial}) has been revoked"));
            }
        }
        // A certificate a node proxy got on a workload's behalf proves only that the
        // workload's pod was on that node when it was issued. Renewing it by itself would
        // outlive the pod's move or deletion forever; the node proxy renews it the way it got
        // it, with its own token and the node check.
        if info.node_issued {
            return Err(format!(
                "the client certificate for {id} was issued to a node proxy on the \
                 workload's behalf (ImpersonatedIdentity) and is no renewal credential; the \
                 node proxy renews it with its own token"
            ));
        }
        if signer.is_denied(&id.to_string()) {
            return Err(format!("{id} has been revoked by an operator"));
        }
        if id.trust_domain() != &self.trust_domain {
            return Err(format!(
                "client certificate identity {id} is outside trust domain {}",
                self.trust_domain
            ));
        }
        Ok(Caller {
            identity: id,
            method: AuthMethod::ClientCert,
            pod_name: None,
            pod_uid: None,
            node_name: None,
            cluster: None,
        })
    }
}

impl Authenticator for ClientCertAuthenticator {
    fn name(&self) -> &'static str {
        "client-cert"
    }

    fn authenticate<'a>(
        &'a self,
        creds: Credentials<'a>,
    ) -> BoxFuture<'a, Result<Option<Caller>, AuthFailure>> {
        let result = creds
            .peer_chain
            .filter(|c| !c.is_empty())
            .map(|c| self.check(c).map_err(AuthFailure::invalid));
        Box::pin(std::future::ready(result.transpose()))
    }

    /// The same check as `authenticate`: it is local and synchronous (the TLS handshake
    /// already verified the chain; this repeats it at the injected clock's time), so it
    /// costs about what refusing the call would.
    fn verified(&self, creds: Credentials<'_>) -> Verified {
        match creds
            .peer_chain
            .filter(|c| !c.is_empty())
            .map(|c| self.check(c))
        {
            Some(Ok(caller)) => Verified::Caller(caller),
            _ => Verified::No,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::bootstrap::{self, CaOptions};
    use crate::ca::signer::RevocationView;
    use crate::clock::ManualClock;
    use crate::journal::Journal;
    use crate::pki::{keys, pem, KeyType};
    use rcgen::{CertificateParams, Issuer, SanType};
    use rustls_pki_types::CertificateDer;
    use time::OffsetDateTime;

    struct Fixture {
        journal: Journal,
        td: TrustDomain,
        now: OffsetDateTime,
    }

    impl Fixture {
        fn new() -> Self {
            let td = TrustDomain::new("cluster.local").unwrap();
            let now = crate::clock::system().now();
            let journal = bootstrap::new_journal(&CaOptions::new(td.clone()), now).unwrap();
            Self { journal, td, now }
        }

        fn authenticator(&self, view: Option<RevocationView>) -> ClientCertAuthenticator {
            let mut signer = bootstrap::signer_from_journal(&self.journal, &self.td).unwrap();
            if let Some(v) = view {
                signer = signer.with_revocations(v);
            }
            let ca = Ca::new();
            ca.install(signer);
            ClientCertAuthenticator::new(
                ca,
                self.td.clone(),
                std::sync::Arc::new(ManualClock::new(self.now)),
            )
        }

        /// A leaf signed by the active intermediate, with these URI SANs; leaf first, then
        /// the intermediate, as a client presents it.
        fn chain(&self, uris: &[&str]) -> Vec<CertificateDer<'static>> {
            self.chain_with(uris, vec![])
        }

        fn chain_with(
            &self,
            uris: &[&str],
            extensions: Vec<rcgen::CustomExtension>,
        ) -> Vec<CertificateDer<'static>> {
            let active = self.journal.active_signer().unwrap();
            let key = keys::load_private_key_pem(active.key_pem.expose().as_bytes()).unwrap();
            let issuer = Issuer::from_ca_cert_pem(&active.cert_pem, key).unwrap();
            let mut p = CertificateParams::default();
            p.subject_alt_names = uris
                .iter()
                .map(|u| SanType::URI((*u).try_into().unwrap()))
                .collect();
            p.not_before = self.now - time::Duration::minutes(1);
            p.not_after = self.now + time::Duration::hours(1);
            p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
            p.custom_extensions = extensions;
            let leaf = p
                .signed_by(&KeyType::EcP256.generate().unwrap(), &issuer)
                .unwrap();
            let inter = pem::parse_certs(active.cert_pem.as_bytes())
                .unwrap()
                .remove(0);
            vec![leaf.der().clone(), inter]
        }
    }

    const ID: &str = "spiffe://cluster.local/ns/shop/sa/cart";

    #[test]
    fn exactly_one_uri_san() {
        let f = Fixture::new();
        let auth = f.authenticator(None);
        assert_eq!(
            auth.check(&f.chain(&[ID])).unwrap().identity.to_string(),
            ID
        );
        let err = auth
            .check(&f.chain(&[ID, "https://payments.example/"]))
            .unwrap_err();
        assert!(err.contains("2 URI SANs"), "{err}");
        let err = auth
            .check(&f.chain(&["https://payments.example/", ID]))
            .unwrap_err();
        assert!(err.contains("exactly one"), "{err}");
    }

    /// The marker of node impersonation refuses the chain; another private extension does not.
    #[test]
    fn a_certificate_issued_through_node_impersonation_does_not_renew_itself() {
        let f = Fixture::new();
        let auth = f.authenticator(None);
        let marked = f.chain_with(
            &[ID],
            vec![rcgen::CustomExtension::from_oid_content(
                crate::pki::profile::NODE_ISSUED_OID,
                vec![0x05, 0x00],
            )],
        );
        let err = auth.check(&marked).unwrap_err();
        assert!(err.contains("no renewal credential"), "{err}");
        let other = f.chain_with(
            &[ID],
            vec![rcgen::CustomExtension::from_oid_content(
                &[1, 3, 6, 1, 4, 1, 99999, 1],
                vec![0x05, 0x00],
            )],
        );
        assert!(auth.check(&other).is_ok());
    }

    #[test]
    fn a_revoked_ca_certificate_in_the_presented_chain_is_refused() {
        let f = Fixture::new();
        let chain = f.chain(&[ID]);
        let inter = crate::pki::chain::parse(&chain[1]).unwrap();
        let root_name = inter.issuer().as_raw().to_vec();
        let inter_serial = crate::pki::chain::serial_hex(inter.raw_serial());

        // The root's CRL lists the intermediate: the leaf's own serial is fine, the chain is not.
        let mut view = RevocationView::default();
        view.revoked
            .insert((root_name.clone(), inter_serial.clone()));
        let err = f.authenticator(Some(view)).check(&chain).unwrap_err();
        assert!(err.contains("CA certificate in the client chain"), "{err}");

        // The same serial under another issuer is a different certificate.
        let mut view = RevocationView::default();
        view.revoked
            .insert((b"other issuer".to_vec(), inter_serial));
        assert!(f.authenticator(Some(view)).check(&chain).is_ok());

        // The leaf itself, by its issuer (the intermediate) and serial.
        let leaf = crate::pki::chain::parse(&chain[0]).unwrap();
        let mut view = RevocationView::default();
        view.revoked.insert((
            leaf.issuer().as_raw().to_vec(),
            crate::pki::chain::serial_hex(leaf.raw_serial()),
        ));
        let err = f.authenticator(Some(view)).check(&chain).unwrap_err();
        assert!(err.starts_with("client certificate (serial"), "{err}");
    }
}
