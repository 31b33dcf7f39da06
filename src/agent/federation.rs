//! The foreign trust domains' bundles, from the CA's `citadel.v1.FederationService` (which
//! follows their bundle endpoints, `citadel serve --federate-with`), folded into the
//! credentials like the CRL: the Workload API hands every one out as a federated bundle,
//! SDS `ROOTCA` adds the X.509 authorities of the trust domains the operator allows
//! (`--sds-federated-trust-domain`). Never merged with our own bundle: they are kept per
//! trust domain, and a bundle the CA sends for our own trust domain is ignored.
//!
//! Each bundle is parsed again here, strictly (`pki::spiffe_bundle::parse`); one the agent
//! refuses leaves the previous bundle of that trust domain in place.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use super::fetch::{ca_call, FetchConfig, FetchError};
use super::{Credentials, CredentialsTx};
use crate::client::ClientError;
use crate::clock::SharedClock;
use crate::federation_proto::{FederationServiceClient, FetchFederatedBundlesRequest};
use crate::identity::TrustDomain;
use crate::pki::spiffe_bundle::{self, SpiffeBundle};
use crate::shutdown::Shutdown;

/// The foreign bundles the agent holds, and what SDS may trust of them.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Federated {
    /// Every foreign bundle, by trust domain name.
    pub bundles: BTreeMap<String, Arc<SpiffeBundle>>,
    /// The X.509 authorities (PEM) of the allowed trust domains, for SDS `ROOTCA`.
    pub sds_roots_pem: String,
}

impl Federated {
    /// `bundles`, with the SDS roots of the trust domains in `sds_allowed`.
    pub fn new(bundles: BTreeMap<String, Arc<SpiffeBundle>>, sds_allowed: &[TrustDomain]) -> Self {
        let sds_roots_pem = sds_allowed
            .iter()
            .filter_map(|td| bundles.get(td.as_str()))
            .map(|b| b.x509_pem())
            .collect();
        Self {
            bundles,
            sds_roots_pem,
        }
    }
}

/// Takes the CA's answer: each entry parsed for its trust domain; entries for our own
/// trust domain, with an invalid name, or refused by the parser are logged and the previous
/// bundle of that trust domain (in `previous`) kept.
pub fn merge_answer(
    own: &TrustDomain,
    previous: &BTreeMap<String, Arc<SpiffeBundle>>,
    answer: Vec<(String, Vec<u8>)>,
) -> BTreeMap<String, Arc<SpiffeBundle>> {
    let mut next = BTreeMap::new();
    for (name, doc) in answer {
        let td = match TrustDomain::new(&name) {
            Ok(td) if &td == own => {
                tracing::warn!(trust_domain = %name, "the CA sent a federated bundle for our own trust domain; ignored (bundles are never merged)");
                continue;
            }
            Ok(td) => td,
            Err(e) => {
                tracing::warn!(error = %e, "the CA sent a federated bundle for an invalid trust domain; ignored");
                continue;
            }
        };
        match spiffe_bundle::parse(&td, &doc) {
            Ok(b) => {
                next.insert(name, Arc::new(b));
            }
            Err(e) => {
                tracing::warn!(trust_domain = %name, error = %e, "federated bundle refused; keeping the previous one");
                if let Some(old) = previous.get(&name) {
                    next.insert(name, old.clone());
                }
            }
        }
    }
    next
}

async fn fetch(
    cfg: &FetchConfig,
    current: &Credentials,
    clock: &SharedClock,
) -> Result<Vec<(String, Vec<u8>)>, FetchError> {
    let call = ca_call(cfg, Some(current), clock.now())?;
    let channel = crate::client::channel(&call.opts).await?;
    let mut req = tonic::Request::new(FetchFederatedBundlesRequest {});
    if let Some(t) = &call.bearer {
        let v = format!("Bearer {t}").parse().map_err(|_| {
            FetchError::NoCredential("the token holds characters not allowed in a header".into())
        })?;
        req.metadata_mut().insert("authorization", v);
    }
    let r = FederationServiceClient::new(channel)
        .fetch_federated_bundles(req)
        .await
        .map_err(|s| {
            FetchError::Client(ClientError::Rpc {
                code: s.code(),
                message: s.message().to_string(),
            })
        })?
        .into_inner();
    Ok(r.bundles
        .into_iter()
        .map(|b| (b.trust_domain, b.spiffe_bundle))
        .collect())
}

/// Asks the CA every `interval` (and when the first credentials arrive) and publishes
/// credentials carrying the foreign bundles whenever they change. A CA without the service
/// answers Unimplemented: logged once, retried on the timer.
pub async fn follow(
    cfg: FetchConfig,
    clock: SharedClock,
    tx: CredentialsTx,
    sds_allowed: Vec<TrustDomain>,
    interval: Duration,
    shutdown: Shutdown,
) {
    let mut changes = tx.subscribe();
    let mut warned = false;
    loop {
        let current = changes.borrow_and_update().clone();
        if let Some(c) = current {
            match fetch(&cfg, &c, &clock).await {
                Ok(answer) => {
                    warned = false;
                    let own = c.identity.trust_domain().clone();
                    let bundles = merge_answer(&own, &c.federated.bundles, answer);
                    let next = Arc::new(Federated::new(bundles, &sds_allowed));
                    let updated = tx.send_if_modified(|cur| match cur {
                        Some(c) if *c.federated != *next => {
                            let mut n = (**c).clone();
                            n.federated = next.clone();
                            n.version += 1;
                            *cur = Some(Arc::new(n));
                            true
                        }
                        _ => false,
                    });
                    if updated {
                        let summary: Vec<String> = next
                            .bundles
                            .iter()
                            .map(|(td, b)| {
                                format!(
                                    "{td}(seq {:?}, {} roots)",
                                    b.sequence,
                                    b.x509_authorities.len()
                                )
                            })
                            .collect();
                        tracing::info!(bundles = ?summary, "federated bundles updated");
                    }
                }
                Err(e) if !warned => {
                    warned = true;
                    tracing::warn!(error = %e, "cannot fetch the federated bundles from the CA; retrying");
                }
                Err(e) => tracing::debug!(error = %e, "cannot fetch the federated bundles"),
            }
        }
        changes.mark_unchanged();
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            r = changes.changed() => if r.is_err() { return },
            _ = shutdown.wait() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(seq: u64) -> Vec<u8> {
        format!(r#"{{"keys": [], "spiffe_sequence": {seq}}}"#).into_bytes()
    }

    #[test]
    fn own_domain_invalid_names_and_refused_bundles_never_enter() {
        let own = TrustDomain::new("a.test").unwrap();
        let mut previous = BTreeMap::new();
        let b_old = spiffe_bundle::parse(&TrustDomain::new("b.test").unwrap(), &doc(1)).unwrap();
        previous.insert("b.test".to_string(), Arc::new(b_old.clone()));
        let got = merge_answer(
            &own,
            &previous,
            vec![
                ("a.test".into(), doc(9)),
                ("B.TEST".into(), doc(9)),
                ("b.test".into(), b"garbage".to_vec()),
                ("c.test".into(), doc(3)),
                ("d.test".into(), b"{}".to_vec()),
            ],
        );
        assert_eq!(got.keys().collect::<Vec<_>>(), ["b.test", "c.test"]);
        assert_eq!(
            *got["b.test"], b_old,
            "the refused update keeps the previous bundle"
        );
        assert_eq!(got["c.test"].sequence, Some(3));
    }

    #[test]
    fn sds_roots_only_of_allowed_domains() {
        let td = TrustDomain::new("b.test").unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::default();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let c = p.self_signed(&key).unwrap();
        let b = SpiffeBundle {
            trust_domain: td.clone(),
            x509_authorities: vec![c.der().clone()],
            jwt_keys: vec![],
            sequence: None,
            refresh_hint: None,
        };
        let mut m = BTreeMap::new();
        m.insert("b.test".to_string(), Arc::new(b));
        assert_eq!(Federated::new(m.clone(), &[]).sds_roots_pem, "");
        let f = Federated::new(m, &[td]);
        assert_eq!(
            crate::pki::pem::parse_certs(f.sds_roots_pem.as_bytes()).unwrap(),
            vec![c.der().clone()]
        );
    }
}
