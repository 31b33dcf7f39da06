//! Renewal by client certificate: a workload holding a valid SVID of this trust domain gets a
//! new certificate for the same identity, without a token (istiod's first authenticator).
//!
//! The TLS layer already checked the chain against the trust bundle during the handshake;
//! this re-checks at the injected clock's time and extracts exactly one SPIFFE ID.

use std::sync::Arc;

use super::{AuthFailure, AuthMethod, Authenticator, Caller, Credentials};
use crate::ca::Ca;
use crate::clock::SharedClock;
use crate::identity::{SpiffeId, TrustDomain};
use crate::pki::chain::{self, Usage};
use crate::store::BoxFuture;

pub struct ClientCertAuthenticator {
    ca: Arc<Ca>,
    trust_domain: TrustDomain,
    clock: SharedClock,
}

impl ClientCertAuthenticator {
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
        let ids: Vec<SpiffeId> = info
            .uri_sans
            .iter()
            .filter_map(|u| SpiffeId::parse(u).ok())
            .collect();
        let id = match ids.as_slice() {
            [one] => one.clone(),
            [] => return Err("client certificate has no SPIFFE ID".into()),
            _ => return Err("client certificate has more than one SPIFFE ID".into()),
        };
        if signer.is_revoked(&info.serial_hex) {
            return Err(format!(
                "client certificate serial {} has been revoked",
                info.serial_hex
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
}
