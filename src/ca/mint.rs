//! Minting authorities: new roots, intermediates under a parent, and cross-signed
//! certificates, each returned as the journal record that must be written before it is used.
//! Shared by the first start (`bootstrap`) and rotations (`apply`).

use std::time::Duration;

use rcgen::{Issuer, KeyPair};
use time::OffsetDateTime;

use super::CaError;
use crate::identity::TrustDomain;
use crate::journal::{AuthorityRecord, Role, Secret, Status};
use crate::pki::{self, keys, profile, KeyType, PkiError, PublicKeyKind};

fn key_of(a: &AuthorityRecord) -> Result<KeyPair, CaError> {
    keys::load_private_key_pem(a.key_pem.expose().as_bytes())
        .map_err(|e| CaError::Config(format!("authority {}: {e}", a.id)))
}

pub(crate) fn key_type_of(a: &AuthorityRecord) -> Result<KeyType, CaError> {
    Ok(match keys::key_pair_kind(&key_of(a)?)? {
        PublicKeyKind::EcP256 => KeyType::EcP256,
        PublicKeyKind::EcP384 => KeyType::EcP384,
        PublicKeyKind::Rsa { bits: 3072 } => KeyType::Rsa3072,
        PublicKeyKind::Rsa { bits: 4096 } => KeyType::Rsa4096,
        PublicKeyKind::Rsa { .. } => KeyType::Rsa2048,
    })
}

fn issuer_of(a: &AuthorityRecord) -> Result<Issuer<'static, KeyPair>, CaError> {
    Ok(Issuer::from_ca_cert_pem(&a.cert_pem, key_of(a)?).map_err(PkiError::from)?)
}

/// The journal entry for a freshly minted authority; its id is the certificate serial.
fn record(
    role: Role,
    status: Status,
    cert: &rcgen::Certificate,
    key: &KeyPair,
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
        key_pem: Secret::new(key.serialize_pem()),
        issuer,
        created_at: now,
        activated_at: (status == Status::Active).then_some(now),
        retired_at: None,
        deactivated_at: None,
        not_after: params.not_after.unix_timestamp(),
        not_before: params.not_before.unix_timestamp(),
        cross_cert_pem: None,
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
    let key = kt.generate()?;
    let serial = pki::random_serial();
    let not_after = crate::clock::checked_add(now, ttl)
        .ok_or_else(|| CaError::Config("the root lifetime is out of range".into()))?;
    let params = profile::root(td, &serial, now - profile::BACKDATE, not_after);
    let cert = params.self_signed(&key).map_err(PkiError::from)?;
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

/// A new intermediate under `parent`, living `ttl` but never past the parent.
pub fn mint_intermediate(
    td: &TrustDomain,
    kt: KeyType,
    parent: &AuthorityRecord,
    now: OffsetDateTime,
    ttl: Duration,
    status: Status,
) -> Result<(AuthorityRecord, KeyPair), CaError> {
    let key = kt.generate()?;
    let serial = pki::random_serial();
    let not_after = crate::clock::checked_add(now, ttl)
        .ok_or_else(|| CaError::Config("the intermediate lifetime is out of range".into()))?
        .min(
            OffsetDateTime::from_unix_timestamp(parent.not_after)
                .map_err(|e| CaError::Config(e.to_string()))?,
        );
    let params = profile::intermediate(td, &serial, now - profile::BACKDATE, not_after);
    let cert = params
        .signed_by(&key, &issuer_of(parent)?)
        .map_err(PkiError::from)?;
    let rec = record(
        Role::Intermediate,
        status,
        &cert,
        &key,
        Some(parent.id.clone()),
        &params,
        now.unix_timestamp(),
    );
    Ok((rec, key))
}

/// Certifies `int`'s key and subject under `old_root` too (same serial space, new serial).
pub(crate) fn cross_sign(
    td: &TrustDomain,
    int: &AuthorityRecord,
    int_key: &KeyPair,
    old_root: &AuthorityRecord,
    now: OffsetDateTime,
) -> Result<String, CaError> {
    let serial = pki::random_serial();
    let not_after = OffsetDateTime::from_unix_timestamp(int.not_after.min(old_root.not_after))
        .map_err(|e| CaError::Config(e.to_string()))?;
    // Same subject (CN carries the intermediate's own id) so leaves chain through either.
    let int_serial = hex::decode(&int.id).unwrap_or_default();
    let mut params = profile::intermediate(td, &int_serial, now - profile::BACKDATE, not_after);
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
    Ok(params
        .signed_by(int_key, &issuer_of(old_root)?)
        .map_err(PkiError::from)?
        .pem())
}
