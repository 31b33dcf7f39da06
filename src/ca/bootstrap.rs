//! Creating a self-signed CA on first start, and rebuilding the signer from the journal.

use std::time::Duration;

use rcgen::{Issuer, KeyPair};
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;

use super::journal::{AuthorityRecord, Journal, Role, Secret, Status};
use super::{CaError, Signer};
use crate::clock::Clock;
use crate::identity::TrustDomain;
use crate::pki::{self, keys, pem, profile, KeyType, PkiError};
use crate::store::{Store, StoreError};

/// How a self-signed CA is made.
#[derive(Debug, Clone)]
pub struct CaOptions {
    pub trust_domain: TrustDomain,
    pub key_type: KeyType,
    pub root_ttl: Duration,
    pub intermediate_ttl: Duration,
}

impl CaOptions {
    pub fn new(trust_domain: TrustDomain) -> Self {
        Self {
            trust_domain,
            key_type: KeyType::EcP256,
            root_ttl: Duration::from_secs(10 * 365 * 86_400),
            intermediate_ttl: Duration::from_secs(365 * 86_400),
        }
    }
}

/// A fresh journal with one active root and one active intermediate under it.
pub fn new_journal(opts: &CaOptions, now: OffsetDateTime) -> Result<Journal, CaError> {
    let td = &opts.trust_domain;
    let nb = now - profile::BACKDATE;

    let root_key = opts.key_type.generate()?;
    let root_serial = pki::random_serial();
    let root_params = profile::root(td, &root_serial, nb, now + opts.root_ttl);
    let root_cert = root_params.self_signed(&root_key).map_err(PkiError::from)?;

    let int_key = opts.key_type.generate()?;
    let int_serial = pki::random_serial();
    let int_not_after = (now + opts.intermediate_ttl).min(root_params.not_after);
    let int_params = profile::intermediate(td, &int_serial, nb, int_not_after);
    let root_issuer = Issuer::new(root_params, root_key);
    let int_cert = int_params
        .signed_by(&int_key, &root_issuer)
        .map_err(PkiError::from)?;

    let record =
        |serial: &[u8], role, cert: &rcgen::Certificate, key: &KeyPair, issuer| AuthorityRecord {
            id: hex::encode(serial),
            role,
            status: Status::Active,
            cert_pem: cert.pem(),
            key_pem: Secret::new(key.serialize_pem()),
            issuer,
            created_at: now.unix_timestamp(),
            activated_at: Some(now.unix_timestamp()),
            retired_at: None,
        };
    let root_id = hex::encode(root_serial);
    let mut journal = Journal::new(td.as_str());
    journal.authorities.push(record(
        &root_serial,
        Role::Root,
        &root_cert,
        root_issuer.key(),
        None,
    ));
    journal.authorities.push(record(
        &int_serial,
        Role::Intermediate,
        &int_cert,
        &int_key,
        Some(root_id),
    ));
    Ok(journal)
}

fn cert_of(rec: &AuthorityRecord) -> Result<CertificateDer<'static>, CaError> {
    let mut certs = pem::parse_certs(rec.cert_pem.as_bytes())
        .map_err(|e| CaError::Config(format!("authority {}: {e}", rec.id)))?;
    Ok(certs.remove(0))
}

/// Rebuilds the active signer from a journal.
pub fn signer_from_journal(journal: &Journal, td: &TrustDomain) -> Result<Signer, CaError> {
    if journal.trust_domain != td.as_str() {
        return Err(CaError::Config(format!(
            "the stored CA belongs to trust domain {:?}, but this server is configured for {:?}; \
             pass --trust-domain {} or use another state directory",
            journal.trust_domain, td, journal.trust_domain
        )));
    }
    let active = journal
        .active_signer()
        .ok_or_else(|| CaError::Config("the CA journal has no active intermediate".into()))?;
    let key = keys::load_private_key_pem(active.key_pem.expose().as_bytes())
        .map_err(|e| CaError::Config(format!("authority {}: {e}", active.id)))?;
    let roots = journal
        .trusted_roots()
        .map(cert_of)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Signer::new(
        td.clone(),
        cert_of(active)?,
        key,
        Vec::new(),
        roots,
    )?)
}

/// Loads the CA from the store, or creates it if the store is empty.
///
/// Creation is a compare-and-swap against "nothing there": if another process wins the race,
/// its CA is loaded and ours is discarded, so concurrent first starts end with ONE CA.
pub async fn load_or_create(
    store: &dyn Store,
    opts: &CaOptions,
    clock: &dyn Clock,
) -> Result<(Journal, Signer), CaError> {
    for _ in 0..5 {
        if let Some(current) = store.load_journal().await? {
            let signer = signer_from_journal(&current.value, &opts.trust_domain)?;
            return Ok((current.value, signer));
        }
        let journal = new_journal(opts, clock.now())?;
        match store.save_journal(&journal, None).await {
            Ok(_) => {
                tracing::info!(
                    target: "citadel::audit",
                    event = "ca_created",
                    trust_domain = %opts.trust_domain,
                    key_type = %opts.key_type,
                    store = %store.describe(),
                    "created a self-signed root and intermediate CA"
                );
                let signer = signer_from_journal(&journal, &opts.trust_domain)?;
                return Ok((journal, signer));
            }
            Err(StoreError::Conflict) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(CaError::Config(
        "could not load or create the CA: the store kept changing underneath".into(),
    ))
}
