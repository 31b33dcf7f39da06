//! Minting authorities: new roots, intermediates under a parent, and cross-signed
//! certificates, each returned as the journal record that must be written before it is used.
//! Shared by the first start (`bootstrap`) and rotations (`apply`).

use std::sync::Arc;
use std::time::Duration;

use rcgen::Issuer;
use time::OffsetDateTime;

use super::keysource::{self, NewKey};
use super::CaError;
use crate::identity::TrustDomain;
use crate::journal::{AuthorityRecord, Role, Status};
use crate::pki::{self, keys, profile, CaKey, KeyType, PkiError, PublicKeyKind, RcgenKey};

/// The signing key of a journal authority: the one place a record becomes a [`CaKey`]
/// (its PKCS#8 key, or the PKCS#11 key it names: [`keysource::open`]).
pub(crate) fn ca_key_of(a: &AuthorityRecord) -> Result<Arc<dyn CaKey>, CaError> {
    keysource::open(a)
}

/// The key type of authority `a`, read from its certificate (no key access: the key may be
/// in a token that is slow or away).
pub(crate) fn key_type_of(a: &AuthorityRecord) -> Result<KeyType, CaError> {
    let der = pki::pem::parse_certs(a.cert_pem.as_bytes())
        .map_err(|e| CaError::Config(format!("authority {}: {e}", a.id)))?
        .into_iter()
        .next()
        .ok_or_else(|| CaError::Config(format!("authority {}: no certificate", a.id)))?;
    let cert = pki::chain::parse(&der)?;
    Ok(match keys::spki_kind(cert.public_key().raw)? {
        PublicKeyKind::EcP256 => KeyType::EcP256,
        PublicKeyKind::EcP384 => KeyType::EcP384,
        PublicKeyKind::Rsa { bits: 3072 } => KeyType::Rsa3072,
        PublicKeyKind::Rsa { bits: 4096 } => KeyType::Rsa4096,
        PublicKeyKind::Rsa { .. } => KeyType::Rsa2048,
    })
}

/// rcgen's issuer for authority `a`, signing with `key` (its key, from [`ca_key_of`]).
fn issuer_of(
    a: &AuthorityRecord,
    key: Arc<dyn CaKey>,
) -> Result<Issuer<'static, RcgenKey>, CaError> {
    Ok(Issuer::from_ca_cert_pem(&a.cert_pem, RcgenKey::new(key)).map_err(PkiError::from)?)
}

/// The journal entry for a freshly minted authority; its id is the certificate serial.
fn record(
    role: Role,
    status: Status,
    cert: &rcgen::Certificate,
    key: &NewKey,
    issuer: Option<String>,
    params: &rcgen::CertificateParams,
    now: i64,
) -> AuthorityRecord {
    AuthorityRecord {
        id: params
            .serial_number
            .as_ref()
            .map(|s| hex::encode(s.to_bytes()))
            .unwrap_or_default(),
        role,
        status,
        cert_pem: cert.pem(),
        key_pem: key.key_pem.clone(),
        issuer,
        created_at: now,
        activated_at: (status == Status::Active).then_some(now),
        retired_at: None,
        deactivated_at: None,
        not_after: params.not_after.unix_timestamp(),
        not_before: params.not_before.unix_timestamp(),
        cross_cert_pem: None,
        key_ref: key.key_ref.clone(),
    }
}

/// A new self-signed root.
pub fn mint_root(
    td: &TrustDomain,
    kt: KeyType,
    now: OffsetDateTime,
    ttl: Duration,
    status: Status,
) -> Result<AuthorityRecord, CaError> {
    let serial = pki::try_random_serial()?;
    let not_after = crate::clock::checked_add(now, ttl)
        .ok_or_else(|| CaError::Config("the root lifetime is out of range".into()))?;
    let key = keysource::generate(Role::Root, kt, &hex::encode(serial))?;
    let params = profile::root(td, &serial, now - profile::BACKDATE, not_after);
    let cert = params
        .self_signed(&RcgenKey::new(key.key.clone()))
        .map_err(|e| keysource::discard(&key, PkiError::from(e).into()))?;
    Ok(record(
        Role::Root,
        status,
        &cert,
        &key,
        None,
        &params,
        now.unix_timestamp(),
    ))
}

/// A new intermediate under `parent`, living `ttl` but never past the parent. Returns its key
/// too (a root rotation cross-signs it).
pub fn mint_intermediate(
    td: &TrustDomain,
    kt: KeyType,
    parent: &AuthorityRecord,
    now: OffsetDateTime,
    ttl: Duration,
    status: Status,
    crl_url: Option<&str>,
) -> Result<(AuthorityRecord, Arc<dyn CaKey>), CaError> {
    mint_intermediate_under(
        td,
        kt,
        parent,
        ca_key_of(parent)?,
        now,
        ttl,
        status,
        crl_url,
    )
}

/// The CRL Distribution Points extension of a certificate `parent` signs, under the base
/// URL `crl_url` (`--crl-distribution-url`): where `parent`'s CRL is served
/// (`server::crl_http`).
pub fn distribution_point(crl_url: &str, parent: &AuthorityRecord) -> rcgen::CrlDistributionPoint {
    rcgen::CrlDistributionPoint {
        uris: vec![format!("{crl_url}{}.crl", parent.id)],
    }
}

/// [`mint_intermediate`], signed by `parent_key` (the parent's key).
// Seven plain inputs, each used once.
#[allow(clippy::too_many_arguments)]
pub(crate) fn mint_intermediate_under(
    td: &TrustDomain,
    kt: KeyType,
    parent: &AuthorityRecord,
    parent_key: Arc<dyn CaKey>,
    now: OffsetDateTime,
    ttl: Duration,
    status: Status,
    crl_url: Option<&str>,
) -> Result<(AuthorityRecord, Arc<dyn CaKey>), CaError> {
    let serial = pki::try_random_serial()?;
    let key = keysource::generate(Role::Intermediate, kt, &hex::encode(serial))?;
    let (params, cert) = certify_intermediate(
        td,
        &RcgenKey::new(key.key.clone()),
        &serial,
        &parent.cert_pem,
        parent.not_after,
        parent_key,
        now,
        ttl,
        crl_url.map(|url| distribution_point(url, parent)),
    )
    .map_err(|e| keysource::discard(&key, e))?;
    let rec = record(
        Role::Intermediate,
        status,
        &cert,
        &key,
        Some(parent.id.clone()),
        &params,
        now.unix_timestamp(),
    );
    Ok((rec, key.key))
}

/// Our intermediate profile (`profile::intermediate`: CA:true, pathLen 0, keyCertSign and
/// cRLSign, subject from the trust domain and serial) for `subject_key`, signed by the parent
/// whose certificate is `parent_cert_pem`, living `ttl` but never past the parent's notAfter.
/// The one place an intermediate certificate is made, whether the key was minted here or
/// arrives in an offline-root ceremony's CSR (`ca::offline`): nothing of a CSR but its public
/// key reaches the certificate. `crl_dp`: the CRL Distribution Point (`--crl-distribution-url`),
/// where the parent's CRL is served.
// Nine plain inputs, each used once.
#[allow(clippy::too_many_arguments)]
pub(crate) fn certify_intermediate(
    td: &TrustDomain,
    subject_key: &impl rcgen::PublicKeyData,
    serial: &[u8],
    parent_cert_pem: &str,
    parent_not_after: i64,
    parent_key: Arc<dyn CaKey>,
    now: OffsetDateTime,
    ttl: Duration,
    crl_dp: Option<rcgen::CrlDistributionPoint>,
) -> Result<(rcgen::CertificateParams, rcgen::Certificate), CaError> {
    let not_after = crate::clock::checked_add(now, ttl)
        .ok_or_else(|| CaError::Config("the intermediate lifetime is out of range".into()))?
        .min(
            OffsetDateTime::from_unix_timestamp(parent_not_after)
                .map_err(|e| CaError::Config(e.to_string()))?,
        );
    if not_after <= now {
        return Err(CaError::Config(
            "the parent certificate has expired: it cannot sign an intermediate".into(),
        ));
    }
    let mut params = profile::intermediate(td, serial, now - profile::BACKDATE, not_after);
    params.crl_distribution_points = crl_dp.into_iter().collect();
    let issuer = Issuer::from_ca_cert_pem(parent_cert_pem, RcgenKey::new(parent_key))
        .map_err(PkiError::from)?;
    let cert = params
        .signed_by(subject_key, &issuer)
        .map_err(PkiError::from)?;
    Ok((params, cert))
}

/// Certifies `int`'s key and subject under `old_root` too (same serial space, new serial).
pub(crate) fn cross_sign(
    td: &TrustDomain,
    int: &AuthorityRecord,
    int_key: &Arc<dyn CaKey>,
    old_root: &AuthorityRecord,
    now: OffsetDateTime,
) -> Result<String, CaError> {
    cross_sign_with(td, int, int_key, old_root, ca_key_of(old_root)?, now)
}

/// [`cross_sign`], signed by `old_root_key` (the old root's key).
pub(crate) fn cross_sign_with(
    td: &TrustDomain,
    int: &AuthorityRecord,
    int_key: &Arc<dyn CaKey>,
    old_root: &AuthorityRecord,
    old_root_key: Arc<dyn CaKey>,
    now: OffsetDateTime,
) -> Result<String, CaError> {
    let serial = pki::try_random_serial()?;
    let not_after = OffsetDateTime::from_unix_timestamp(int.not_after.min(old_root.not_after))
        .map_err(|e| CaError::Config(e.to_string()))?;
    // Same subject (CN carries the intermediate's own id) so leaves chain through either.
    let int_serial = hex::decode(&int.id).unwrap_or_default();
    let mut params = profile::intermediate(td, &int_serial, now - profile::BACKDATE, not_after);
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
    Ok(params
        .signed_by(
            &RcgenKey::new(int_key.clone()),
            &issuer_of(old_root, old_root_key)?,
        )
        .map_err(PkiError::from)?
        .pem())
}
