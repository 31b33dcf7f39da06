//! CRLs: each authority signs one listing the certificates it issued that were revoked.

use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    CertificateRevocationListParams, Issuer, KeyIdMethod, RevocationReason, RevokedCertParams,
    SerialNumber,
};
use time::OffsetDateTime;

use super::CaError;
use crate::journal::{CrlRecord, Journal};
use crate::pki::{CaKey, PkiError, RcgenKey};

/// Revocation reasons operators may give (`citadel revoke --reason`), RFC 5280 names.
pub const REASONS: [&str; 7] = [
    "unspecified",
    "key-compromise",
    "ca-compromise",
    "affiliation-changed",
    "superseded",
    "cessation-of-operation",
    "privilege-withdrawn",
];

/// The RFC 5280 reason for a name in [`REASONS`]; `None` for an unknown name.
pub fn reason_code(reason: &str) -> Option<RevocationReason> {
    Some(match reason {
        "unspecified" => RevocationReason::Unspecified,
        "key-compromise" => RevocationReason::KeyCompromise,
        "ca-compromise" => RevocationReason::CaCompromise,
        "affiliation-changed" => RevocationReason::AffiliationChanged,
        "superseded" => RevocationReason::Superseded,
        "cessation-of-operation" => RevocationReason::CessationOfOperation,
        "privilege-withdrawn" => RevocationReason::PrivilegeWithdrawn,
        _ => return None,
    })
}

/// The serials `issuer` must list, sorted.
pub fn serials_for(j: &Journal, issuer: &str) -> Vec<String> {
    let mut s: Vec<String> = j.listed_by(issuer).map(|r| r.serial.clone()).collect();
    s.sort();
    s
}

/// Signs a fresh CRL for `issuer` (next number, thisUpdate backdated a minute) into the journal.
pub fn sign(
    j: &mut Journal,
    issuer: &str,
    now: OffsetDateTime,
    validity: Duration,
) -> Result<(), CaError> {
    let auth = j
        .get(issuer)
        .ok_or_else(|| CaError::Config(format!("no authority {issuer}")))?;
    let key = super::mint::ca_key_of(auth)?;
    sign_with(j, issuer, key, now, validity)
}

/// [`sign`], with `key` (the authority `issuer`'s key).
pub(crate) fn sign_with(
    j: &mut Journal,
    issuer: &str,
    key: Arc<dyn CaKey>,
    now: OffsetDateTime,
    validity: Duration,
) -> Result<(), CaError> {
    let auth = j
        .get(issuer)
        .ok_or_else(|| CaError::Config(format!("no authority {issuer}")))?;
    let signer =
        Issuer::from_ca_cert_pem(&auth.cert_pem, RcgenKey::new(key)).map_err(PkiError::from)?;
    let number = j
        .crls
        .iter()
        .find(|c| c.issuer == issuer)
        .map_or(1, |c| c.number + 1);
    let this_update = now - time::Duration::minutes(1);
    let next_update = crate::clock::checked_add(now, validity)
        .ok_or_else(|| CaError::Config("--crl-validity is out of range".into()))?;
    let revoked_certs = j
        .listed_by(issuer)
        .map(|r| {
            Ok(RevokedCertParams {
                serial_number: SerialNumber::from_slice(
                    &hex::decode(&r.serial)
                        .map_err(|_| CaError::Config(format!("bad serial {}", r.serial)))?,
                ),
                revocation_time: OffsetDateTime::from_unix_timestamp(r.revoked_at)
                    .map_err(|e| CaError::Config(e.to_string()))?,
                reason_code: reason_code(&r.reason),
                invalidity_date: None,
            })
        })
        .collect::<Result<Vec<_>, CaError>>()?;
    let params = CertificateRevocationListParams {
        this_update,
        next_update,
        crl_number: SerialNumber::from(number),
        issuing_distribution_point: None,
        revoked_certs,
        key_identifier_method: KeyIdMethod::Sha256,
    };
    let crl = params.signed_by(&signer).map_err(PkiError::from)?;
    let record = CrlRecord {
        issuer: issuer.to_string(),
        number,
        this_update: this_update.unix_timestamp(),
        next_update: next_update.unix_timestamp(),
        signed_at: now.unix_timestamp(),
        serials: serials_for(j, issuer),
        pem: crl.pem().map_err(PkiError::from)?,
    };
    j.crls.retain(|c| c.issuer != issuer);
    j.crls.push(record);
    Ok(())
}

/// The current CRL of every authority not retired, DER, by the authority's id: what the CRL
/// distribution point serves at `/crl/<id>.crl`.
pub fn by_issuer(j: &Journal) -> Vec<(String, Vec<u8>)> {
    let live = |id: &str| {
        j.get(id)
            .is_some_and(|a| a.status != crate::journal::Status::Retired)
    };
    j.crls
        .iter()
        .filter(|c| live(&c.issuer))
        .filter_map(|c| Some((c.issuer.clone(), ::pem::parse(&c.pem).ok()?.into_contents())))
        .collect()
}

/// All current CRLs as one PEM file (what `ca-crl.pem` holds).
pub fn bundle(j: &Journal) -> String {
    let live = |id: &str| {
        j.get(id)
            .is_some_and(|a| a.status != crate::journal::Status::Retired)
    };
    j.crls
        .iter()
        .filter(|c| live(&c.issuer))
        .map(|c| c.pem.as_str())
        .collect()
}
