//! Creating a self-signed CA on first start, and rebuilding the signer from the journal.

use std::time::Duration;

use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;

use super::signer::RevocationView;
use super::{crl, mint, CaError, Signer};
use crate::clock::Clock;
use crate::identity::TrustDomain;
use crate::journal::{AuthorityRecord, Journal, Status};
use crate::pki::{pem, KeyType};
use crate::store::{Store, StoreError};

/// How a self-signed CA is made.
#[derive(Debug, Clone)]
pub struct CaOptions {
    /// The trust domain written into the journal and the CA subjects (O=).
    pub trust_domain: TrustDomain,
    /// Key algorithm of the root and intermediate (default P-256).
    pub key_type: KeyType,
    /// Root validity (default 10 years).
    pub root_ttl: Duration,
    /// Intermediate validity (default 1 year, capped at the root).
    pub intermediate_ttl: Duration,
    /// `--crl-distribution-url`: the first intermediate's CRL Distribution Point base.
    pub crl_distribution_url: Option<String>,
}

impl CaOptions {
    /// Defaults: P-256 keys, a 10-year root and a 1-year intermediate.
    pub fn new(trust_domain: TrustDomain) -> Self {
        Self {
            trust_domain,
            key_type: KeyType::EcP256,
            root_ttl: Duration::from_secs(10 * 365 * 86_400),
            intermediate_ttl: Duration::from_secs(365 * 86_400),
            crl_distribution_url: None,
        }
    }
}

/// A fresh journal with one active root and one active intermediate under it.
pub fn new_journal(opts: &CaOptions, now: OffsetDateTime) -> Result<Journal, CaError> {
    let root = mint::mint_root(
        &opts.trust_domain,
        opts.key_type,
        now,
        opts.root_ttl,
        Status::Active,
    )?;
    let (int, _) = mint::mint_intermediate(
        &opts.trust_domain,
        opts.key_type,
        &root,
        now,
        opts.intermediate_ttl,
        Status::Active,
        opts.crl_distribution_url.as_deref(),
    )?;
    let mut journal = Journal::new(opts.trust_domain.as_str());
    journal.authorities.push(root);
    journal.authorities.push(int);
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
    let active = journal.active_signer().ok_or_else(|| {
        CaError::Config(if journal.offline_root {
            "the offline-root CA has no intermediate signed by its root yet: print its CSR with              `citadel ca intermediate-csr`, sign it where the root key is with `citadel ca              sign-intermediate`, and `citadel ca install-intermediate` it (docs/operations.md,              \"Offline root\")"
                .into()
        } else {
            "the CA journal has no active intermediate".into()
        })
    })?;
    let key = mint::ca_key_of(active)?;
    let roots = journal
        .trusted_roots()
        .map(cert_of)
        .collect::<Result<Vec<_>, _>>()?;
    let mut alternates = Vec::new();
    if let Some(pem) = &active.cross_cert_pem {
        let cross = pem::parse_certs(pem.as_bytes()).map_err(|e| {
            CaError::Config(format!("authority {} cross certificate: {e}", active.id))
        })?;
        alternates.extend(cross);
    }
    // One certificate parse per issuing authority, not per revocation: at 100,000 revocations
    // the per-entry parse made every signer rebuild (each journal change, on every replica)
    // take seconds.
    let mut names: std::collections::HashMap<&str, Vec<u8>> = std::collections::HashMap::new();
    let view = RevocationView {
        revoked: journal
            .revocations
            .iter()
            .map(|r| {
                let name = names
                    .entry(r.issuer.as_str())
                    .or_insert_with(|| issuer_name(journal, &r.issuer));
                (name.clone(), r.serial.clone())
            })
            .collect(),
        denied_identities: journal.denied.iter().map(|d| d.identity.clone()).collect(),
        crl_pem: crl::bundle(journal),
        crls: crl::by_issuer(journal),
        crl_entries: journal.revocations.len(),
        crl_next_update: journal.crls.iter().map(|c| c.next_update).min(),
    };
    let stage = match &journal.root_rotation {
        None => 0,
        Some(r) if r.activated_at.is_none() => 1,
        Some(_) => 2,
    };
    Ok(
        Signer::new(td.clone(), cert_of(active)?, key, Vec::new(), roots)?
            .with_alternates(alternates)?
            .with_rotation_stage(stage)
            .with_rotation_due(journal.root_rotation.as_ref().and_then(|r| r.next_due()))
            .with_revocations(view),
    )
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
            // Name where the bad journal lives: the operator has to find it to restore it.
            let signer = signer_from_journal(&current.value, &opts.trust_domain)
                .map_err(|e| CaError::Config(format!("{}: {e}", store.describe())))?;
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
            Err(StoreError::Conflict) => {
                // Another process created the CA first: a token key minted for ours is
                // destroyed rather than left behind.
                super::keysource::settle(&Journal::new(&journal.trust_domain), &journal, false);
                continue;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(CaError::Config(
        "could not load or create the CA: the store kept changing underneath".into(),
    ))
}

/// The subject name (DER) of the authority `id`, which is the issuer name of what it signed;
/// empty (matching any issuer) when the authority is gone from the journal.
fn issuer_name(journal: &Journal, id: &str) -> Vec<u8> {
    journal
        .get(id)
        .and_then(|a| crate::pki::pem::parse_certs(a.cert_pem.as_bytes()).ok())
        .and_then(|certs| certs.into_iter().next())
        .and_then(|der| {
            crate::pki::chain::parse(&der)
                .ok()
                .map(|c| c.subject().as_raw().to_vec())
        })
        .unwrap_or_default()
}
