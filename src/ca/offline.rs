//! An offline root (issue 23, section 2): the CA runs with intermediates only, the root key
//! lives elsewhere (a file on an air-gapped machine, or a PKCS#11 token kept offline).
//!
//! The ceremony, in three journaled steps:
//! 1. [`request_intermediate`]: the next intermediate's key is made where this CA keeps its
//!    keys (software, or the configured token) and its CSR is recorded in the journal, at
//!    the active intermediate's prepare point (the planner's `RequestIntermediate`), or by
//!    `citadel ca init --offline-root` for the first one.
//! 2. [`sign_request`], on the machine with the root key and no cluster
//!    (`citadel ca sign-intermediate`): the CSR's self-signature and key type are checked and
//!    ONLY its public key is certified, with our intermediate profile (`mint::
//!    certify_intermediate`): nothing else the CSR says reaches the certificate.
//! 3. [`install`] (`citadel ca install-intermediate`): the certificate must chain to a root
//!    in the journal, certify exactly the requested key and be one of our intermediates; it
//!    becomes the prepared intermediate, and the planner activates it at 5/6 as usual (the
//!    first one is active at once). Without it nothing activates: the current intermediate
//!    keeps signing and [`signature_needed`] says by when one is needed.
//!
//! The roots' keys never enter this process, so no automatic root rotation and no root CRL
//! (see docs/operations.md, "Offline root"). A root rotation is the same ceremony with two
//! root keys: [`sign_root_rotation`] makes the new intermediate's certificate under the new
//! root and its cross-signed twin under the old one, and [`install_root_rotation`] starts the
//! usual staged rotation with them.

use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;

use super::{keysource, mint, CaError};
use crate::identity::TrustDomain;
use crate::journal::{
    AuthorityRecord, IntermediateRequest, Journal, Role, RootRotation, Secret, Status,
};
use crate::pki::{self, chain, csr, pem, CaKey, KeyType, PublicKeyKind, RcgenKey};

/// Why an offline-root step refused: a sentence an operator can act on.
fn refuse(msg: impl Into<String>) -> CaError {
    CaError::Config(msg.into())
}

/// Makes the next intermediate's key (in the installed token, if any) and records its CSR as
/// [`Journal::intermediate_request`]. The caller writes the journal before showing the CSR.
pub fn request_intermediate(
    j: &mut Journal,
    now: OffsetDateTime,
    kt: KeyType,
) -> Result<(), CaError> {
    if !j.offline_root {
        return Err(refuse(
            "this CA holds its root key: its intermediates are minted by the scheduler, not requested",
        ));
    }
    if let Some(r) = &j.intermediate_request {
        return Err(refuse(format!(
            "intermediate request {} is already waiting for the root's signature (`citadel ca intermediate-csr` prints it)",
            r.id
        )));
    }
    keysource::ensure_can_mint(j)?;
    let td = TrustDomain::new(&j.trust_domain).map_err(|e| refuse(e.to_string()))?;
    let id = hex::encode(pki::try_random_serial()?);
    let key = keysource::generate(Role::Intermediate, kt, &id)?;
    let csr_pem = build_csr(&td, &id, &key.key).map_err(|e| keysource::discard(&key, e))?;
    j.intermediate_request = Some(IntermediateRequest {
        id,
        key_pem: key.key_pem.clone(),
        key_ref: key.key_ref.clone(),
        csr_pem,
        created_at: now.unix_timestamp(),
    });
    Ok(())
}

/// The CSR for request `id`: subject O=<trust domain>, CN naming the request, no extensions
/// (the signer derives everything from its own profile anyway).
fn build_csr(td: &TrustDomain, id: &str, key: &Arc<dyn CaKey>) -> Result<String, CaError> {
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, td.as_str());
    params.distinguished_name.push(
        rcgen::DnType::CommonName,
        format!("citadel intermediate CA request {}", &id[..id.len().min(8)]),
    );
    let csr = params
        .serialize_request(&RcgenKey::new(key.clone()))
        .map_err(pki::PkiError::from)?;
    Ok(csr.pem().map_err(pki::PkiError::from)?)
}

/// The public key (DER SubjectPublicKeyInfo) of the pending request.
fn request_spki(r: &IntermediateRequest) -> Result<Vec<u8>, CaError> {
    let parsed = csr::parse_pem(r.csr_pem.as_bytes())
        .map_err(|e| refuse(format!("the recorded intermediate request {}: {e}", r.id)))?;
    Ok(parsed.key.spki_der().to_vec())
}

/// The trust domain a root certificate was made for: its subject's O (our root profile).
pub fn trust_domain_of_root(root_der: &[u8]) -> Result<TrustDomain, CaError> {
    let c = chain::parse(root_der)?;
    let o = c
        .subject()
        .iter_organization()
        .next()
        .and_then(|o| o.as_str().ok())
        .ok_or_else(|| {
            refuse("the root certificate's subject has no O naming the trust domain: pass --trust-domain")
        })?;
    TrustDomain::new(o).map_err(|e| refuse(format!("the root's O {o:?}: {e}; pass --trust-domain")))
}

/// Checks a root certificate and the key offered for it: a CA that may sign certificates,
/// valid at `now`, and the key is the one it certifies.
fn check_root(root_der: &[u8], root_key: &dyn CaKey, now: OffsetDateTime) -> Result<(), CaError> {
    let info = chain::describe(root_der)?;
    if !chain::may_sign_certificates(root_der)? {
        return Err(refuse(format!(
            "{:?} may not sign certificates (its keyUsage lacks keyCertSign)",
            info.subject
        )));
    }
    let c = chain::parse(root_der)?;
    if !c
        .basic_constraints()
        .ok()
        .flatten()
        .is_some_and(|b| b.value.ca)
    {
        return Err(refuse(format!(
            "{:?} is not a CA certificate",
            info.subject
        )));
    }
    if info.not_after <= now || info.not_before > now + pki::profile::BACKDATE {
        return Err(refuse(format!(
            "root {:?} is not valid now (valid {} to {})",
            info.subject, info.not_before, info.not_after
        )));
    }
    if c.public_key().raw != pki::cakey::spki(root_key).as_slice() {
        return Err(refuse(
            "the root key is not the key of the root certificate (--root-cert): wrong key file or token label",
        ));
    }
    Ok(())
}

/// A parsed and checked CSR for a new intermediate: its self-signature verifies and its key
/// is one a CA may have (P-256, P-384, RSA 2048-4096).
fn checked_csr(csr_pem: &[u8]) -> Result<csr::VerifiedCsr, CaError> {
    let c = csr::parse_pem(csr_pem).map_err(|e| refuse(format!("the intermediate CSR: {e}")))?;
    match c.key.kind() {
        PublicKeyKind::EcP256 | PublicKeyKind::EcP384 => {}
        PublicKeyKind::Rsa { bits } if (2048..=4096).contains(&bits) => {}
        other => {
            return Err(refuse(format!(
                "the intermediate CSR's key is {other:?}; a CA key must be P-256, P-384 or RSA 2048-4096"
            )))
        }
    }
    Ok(c)
}

/// `citadel ca sign-intermediate`: certifies the CSR's public key as an intermediate of `td`
/// under the root (`root_cert_pem`, signing with `root_key`), living `ttl` but never past the
/// root. Returns the certificate, PEM.
pub fn sign_request(
    td: &TrustDomain,
    csr_pem: &[u8],
    root_cert_pem: &str,
    root_key: Arc<dyn CaKey>,
    now: OffsetDateTime,
    ttl: Duration,
) -> Result<String, CaError> {
    let root_der = first_cert(root_cert_pem, "--root-cert")?;
    check_root(&root_der, root_key.as_ref(), now)?;
    let c = checked_csr(csr_pem)?;
    let root_not_after = chain::describe(&root_der)?.not_after.unix_timestamp();
    let serial = pki::try_random_serial()?;
    let (_, cert) = mint::certify_intermediate(
        td,
        &c.key,
        &serial,
        root_cert_pem,
        root_not_after,
        root_key,
        now,
        ttl,
        // No CRL Distribution Point: an offline root publishes no CRL citadel serves.
        None,
    )?;
    Ok(cert.pem())
}

fn first_cert(pem_text: &str, what: &str) -> Result<Vec<u8>, CaError> {
    pem::parse_certs(pem_text.as_bytes())
        .map_err(|e| refuse(format!("{what}: {e}")))?
        .into_iter()
        .next()
        .map(|c| c.to_vec())
        .ok_or_else(|| refuse(format!("{what} holds no certificate")))
}

/// Checks that `der` is one of our intermediates for `td`: CA with pathLen 0, may sign
/// certificates, subject O is the trust domain, valid at `now`.
fn check_intermediate(der: &[u8], td: &TrustDomain, now: OffsetDateTime) -> Result<(), CaError> {
    let c = chain::parse(der)?;
    let bc = c
        .basic_constraints()
        .ok()
        .flatten()
        .map(|b| b.value.clone());
    match bc {
        Some(b) if b.ca && b.path_len_constraint == Some(0) => {}
        _ => {
            return Err(refuse(
                "the certificate is not an intermediate of our profile (basicConstraints CA:true, pathlen 0): sign the CSR with `citadel ca sign-intermediate`",
            ))
        }
    }
    if !chain::may_sign_certificates(der)? {
        return Err(refuse("the certificate's keyUsage lacks keyCertSign"));
    }
    let o = c
        .subject()
        .iter_organization()
        .next()
        .and_then(|o| o.as_str().ok());
    if o != Some(td.as_str()) {
        return Err(refuse(format!(
            "the certificate is for O={o:?}, not this CA's trust domain {td}"
        )));
    }
    let info = chain::describe(der)?;
    if info.not_after <= now {
        return Err(refuse(format!(
            "the certificate expired at {}",
            info.not_after
        )));
    }
    Ok(())
}

/// `citadel ca install-intermediate`: the signed certificate of the pending request becomes
/// an intermediate in the journal, prepared (the planner activates it at 5/6 of the active
/// one's life), or active when none is (the first after `ca init --offline-root`). Returns
/// its id and status.
pub fn install(
    j: &mut Journal,
    cert_pem: &str,
    now: OffsetDateTime,
) -> Result<(String, Status), CaError> {
    if !j.offline_root {
        return Err(refuse(
            "this CA holds its root key and mints its own intermediates: install-intermediate is for a CA made with `citadel ca init --offline-root`",
        ));
    }
    let req = j.intermediate_request.clone().ok_or_else(|| {
        refuse("no intermediate request is waiting: the CA prepares one at the active intermediate's prepare point (`citadel ca status` says when)")
    })?;
    if j.find(Role::Intermediate, Status::Prepared).is_some() {
        return Err(refuse(
            "an intermediate is already prepared and waits for its activation",
        ));
    }
    let td = TrustDomain::new(&j.trust_domain).map_err(|e| refuse(e.to_string()))?;
    let der = first_cert(cert_pem, "the intermediate certificate")?;
    if chain::parse(&der)?.public_key().raw != request_spki(&req)?.as_slice() {
        return Err(refuse(format!(
            "the certificate does not certify the key of request {} (a CSR of another request, or another CA's?): print the current CSR with `citadel ca intermediate-csr` and sign that",
            req.id
        )));
    }
    check_intermediate(&der, &td, now)?;
    let root = j
        .trusted_roots()
        .find(|r| {
            first_cert(&r.cert_pem, "root")
                .is_ok_and(|root| chain::check_issued_by(&der, &root).is_ok())
        })
        .map(|r| r.id.clone())
        .ok_or_else(|| {
            refuse("the certificate does not chain to a root in this CA's trust bundle (`citadel ca bundle`): signed with another root key?")
        })?;
    let info = chain::describe(&der)?;
    let status = if j.active_signer().is_none() {
        Status::Active
    } else {
        Status::Prepared
    };
    let ts = now.unix_timestamp();
    let rec = AuthorityRecord {
        id: info.serial_hex.clone(),
        role: Role::Intermediate,
        status,
        cert_pem: pem::cert_to_pem(&der),
        key_pem: req.key_pem.clone(),
        issuer: Some(root),
        // Its life started when it was signed (notBefore is backdated for skew).
        created_at: (info.not_before + pki::profile::BACKDATE)
            .unix_timestamp()
            .min(ts),
        activated_at: (status == Status::Active).then_some(ts),
        retired_at: None,
        deactivated_at: None,
        not_after: info.not_after.unix_timestamp(),
        not_before: info.not_before.unix_timestamp(),
        cross_cert_pem: None,
        key_ref: req.key_ref.clone(),
    };
    if j.get(&rec.id).is_some() {
        return Err(refuse(format!(
            "an authority with serial {} is already in the journal",
            rec.id
        )));
    }
    let out = (rec.id.clone(), status);
    j.authorities.push(rec);
    j.intermediate_request = None;
    Ok(out)
}

/// Why the CA needs a signed intermediate now, and by when (unix seconds): the active
/// intermediate's activation point (5/6 of its life), or now when none is active. `None`:
/// nothing is waiting for the root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignatureNeeded {
    /// The pending request's id.
    pub request: String,
    /// When a signed intermediate must be installed for rotation to stay on schedule.
    pub deadline: i64,
    /// When the current intermediate stops being able to sign at all (its notAfter); `None`
    /// before the first intermediate.
    pub signer_expires: Option<i64>,
}

/// What an operator must be told at `now` ([`SignatureNeeded`]).
pub fn signature_needed(j: &Journal, activate_at: f64) -> Option<SignatureNeeded> {
    let r = j.intermediate_request.as_ref()?;
    if !j.offline_root || j.find(Role::Intermediate, Status::Prepared).is_some() {
        return None;
    }
    let active = j.active_signer();
    let deadline = active.map_or(r.created_at, |a| {
        let start = a.created_at.max(a.not_before);
        start + ((a.not_after - start) as f64 * activate_at) as i64
    });
    Some(SignatureNeeded {
        request: r.id.clone(),
        deadline,
        signer_expires: active.map(|a| a.not_after),
    })
}

/// A fresh offline-root journal for `td`: the root certificate(s) from `roots_pem` (no key)
/// and the first intermediate's request. Nothing signs until `install` put a signed
/// intermediate in.
pub fn new_journal(
    td: &TrustDomain,
    roots_pem: &str,
    kt: KeyType,
    now: OffsetDateTime,
) -> Result<Journal, CaError> {
    let roots =
        pem::parse_certs(roots_pem.as_bytes()).map_err(|e| refuse(format!("--root-cert: {e}")))?;
    if roots.is_empty() {
        return Err(refuse("--root-cert holds no certificate"));
    }
    let mut j = Journal::new(td.as_str());
    j.offline_root = true;
    for der in roots {
        let c = chain::parse(&der)?;
        if c.subject().as_raw() != c.issuer().as_raw()
            || chain::check_issued_by(&der, &der).is_err()
        {
            return Err(refuse(
                "--root-cert must hold self-signed root CA certificates (an intermediate goes through install-intermediate)",
            ));
        }
        let info = chain::describe(&der)?;
        if info.not_after <= now {
            return Err(refuse(format!("root {:?} has expired", info.subject)));
        }
        j.authorities.push(AuthorityRecord {
            id: info.serial_hex.clone(),
            role: Role::Root,
            status: Status::Active,
            cert_pem: pem::cert_to_pem(&der),
            key_pem: Secret::new(String::new()),
            issuer: None,
            created_at: info.not_before.unix_timestamp().min(now.unix_timestamp()),
            activated_at: Some(now.unix_timestamp()),
            retired_at: None,
            deactivated_at: None,
            not_after: info.not_after.unix_timestamp(),
            not_before: info.not_before.unix_timestamp(),
            cross_cert_pem: None,
            key_ref: None,
        });
    }
    request_intermediate(&mut j, now, kt)?;
    Ok(j)
}

/// `citadel ca new-root`: a self-signed root of our profile, for the offline machine; its key
/// is made by the installed key source (a token with roots in it) or in memory. Returns the
/// certificate PEM and the key's PKCS#8 PEM (empty when in a token).
pub fn new_root(
    td: &TrustDomain,
    kt: KeyType,
    now: OffsetDateTime,
    ttl: Duration,
) -> Result<(String, Secret, Option<String>), CaError> {
    let rec = mint::mint_root(td, kt, now, ttl, Status::Active)?;
    Ok((rec.cert_pem, rec.key_pem, rec.key_ref.map(|r| r.label)))
}

/// The outputs of a root-rotation ceremony ([`sign_root_rotation`]).
#[derive(Debug, Clone)]
pub struct RotationCerts {
    /// The new intermediate under the new root, PEM.
    pub intermediate_pem: String,
    /// The same key and subject certified by the old root, PEM.
    pub cross_pem: String,
}

/// A root rotation's ceremony, with both root keys at hand: the pending request's key
/// certified under the new root, and the same key and subject cross-signed by the old root
/// (as `apply::prepare_root_rotation` does online), so workloads holding only the old bundle
/// verify leaves of the new chain.
// Seven plain inputs, each used once.
#[allow(clippy::too_many_arguments)]
pub fn sign_root_rotation(
    td: &TrustDomain,
    csr_pem: &[u8],
    new_root_pem: &str,
    new_root_key: Arc<dyn CaKey>,
    old_root_pem: &str,
    old_root_key: Arc<dyn CaKey>,
    now: OffsetDateTime,
    ttl: Duration,
) -> Result<RotationCerts, CaError> {
    let intermediate_pem = sign_request(td, csr_pem, new_root_pem, new_root_key, now, ttl)?;
    let old_der = first_cert(old_root_pem, "--old-root-cert")?;
    check_root(&old_der, old_root_key.as_ref(), now)?;
    let int_der = first_cert(&intermediate_pem, "intermediate")?;
    let info = chain::describe(&int_der)?;
    let c = checked_csr(csr_pem)?;
    let old_not_after = chain::describe(&old_der)?.not_after.unix_timestamp();
    let not_after = info.not_after.unix_timestamp().min(old_not_after);
    // The same subject (our profile names the intermediate by its serial) so leaves chain
    // through either certificate; a serial of its own.
    let int_serial = hex::decode(&info.serial_hex).unwrap_or_default();
    let mut params = pki::profile::intermediate(
        td,
        &int_serial,
        now - pki::profile::BACKDATE,
        OffsetDateTime::from_unix_timestamp(not_after).map_err(|e| refuse(e.to_string()))?,
    );
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&pki::try_random_serial()?));
    let issuer = rcgen::Issuer::from_ca_cert_pem(old_root_pem, RcgenKey::new(old_root_key))
        .map_err(pki::PkiError::from)?;
    let cross_pem = params
        .signed_by(&c.key, &issuer)
        .map_err(pki::PkiError::from)?
        .pem();
    Ok(RotationCerts {
        intermediate_pem,
        cross_pem,
    })
}

/// `citadel ca install-intermediate --new-root --cross-cert`: starts the staged root rotation
/// with the ceremony's outputs: the new root joins the bundle (no key), the new intermediate
/// (the pending request's key) is prepared under it with its cross-signed certificate, and
/// the rotation proceeds as an online one does (publish, activate after the propagation
/// period, withdraw the cross-signed certificate, retire the old root).
// Seven plain inputs, each used once.
#[allow(clippy::too_many_arguments)]
pub fn install_root_rotation(
    j: &mut Journal,
    new_root_pem: &str,
    intermediate_pem: &str,
    cross_pem: &str,
    now: OffsetDateTime,
    activate_after: Duration,
    retire_after: Duration,
    leaf_grace: i64,
) -> Result<String, CaError> {
    if let Some(r) = &j.root_rotation {
        return Err(refuse(format!(
            "a root rotation is already in progress (stage {})",
            r.stage()
        )));
    }
    if !j.offline_root {
        return Err(refuse(
            "this CA holds its root key: rotate it with `citadel ca rotate-root`",
        ));
    }
    let td = TrustDomain::new(&j.trust_domain).map_err(|e| refuse(e.to_string()))?;
    let old_root = j
        .active_root()
        .cloned()
        .ok_or_else(|| refuse("no active root"))?;
    let old_int = j
        .active_signer()
        .cloned()
        .ok_or_else(|| refuse("no active intermediate"))?;
    let new_root_der = first_cert(new_root_pem, "--new-root")?;
    let nr = chain::parse(&new_root_der)?;
    if nr.subject().as_raw() != nr.issuer().as_raw()
        || chain::check_issued_by(&new_root_der, &new_root_der).is_err()
    {
        return Err(refuse(
            "--new-root must be a self-signed root CA certificate",
        ));
    }
    let nr_info = chain::describe(&new_root_der)?;
    if j.get(&nr_info.serial_hex).is_some() {
        return Err(refuse("--new-root is already in the journal"));
    }
    let cross_der = first_cert(cross_pem, "--cross-cert")?;
    let int_der = first_cert(intermediate_pem, "--cert")?;
    chain::check_issued_by(&int_der, &new_root_der)
        .map_err(|e| refuse(format!("--cert is not signed by --new-root: {e}")))?;
    let old_der = first_cert(&old_root.cert_pem, "old root")?;
    chain::check_issued_by(&cross_der, &old_der).map_err(|e| {
        refuse(format!(
            "--cross-cert is not signed by the active root: {e}"
        ))
    })?;
    let (ci, ii) = (chain::parse(&cross_der)?, chain::parse(&int_der)?);
    if ci.public_key().raw != ii.public_key().raw || ci.subject().as_raw() != ii.subject().as_raw()
    {
        return Err(refuse(
            "--cross-cert does not certify the same key and subject as --cert",
        ));
    }
    check_intermediate(&cross_der, &td, now)?;
    // Put the new root in, then install the intermediate as usual (key and profile checks)
    // and move it under the rotation.
    let ts = now.unix_timestamp();
    j.authorities.push(AuthorityRecord {
        id: nr_info.serial_hex.clone(),
        role: Role::Root,
        status: Status::Prepared,
        cert_pem: pem::cert_to_pem(&new_root_der),
        key_pem: Secret::new(String::new()),
        issuer: None,
        created_at: ts,
        activated_at: None,
        retired_at: None,
        deactivated_at: None,
        not_after: nr_info.not_after.unix_timestamp(),
        not_before: nr_info.not_before.unix_timestamp(),
        cross_cert_pem: None,
        key_ref: None,
    });
    let (id, _) = install(j, intermediate_pem, now)?;
    let rec = j
        .get_mut(&id)
        .ok_or_else(|| refuse("installed intermediate vanished"))?;
    if rec.issuer.as_deref() != Some(nr_info.serial_hex.as_str()) {
        return Err(refuse("--cert does not chain to --new-root"));
    }
    rec.cross_cert_pem = Some(pem::cert_to_pem(&cross_der));
    j.root_rotation = Some(RootRotation {
        old_root: old_root.id.clone(),
        old_intermediate: old_int.id.clone(),
        new_root: nr_info.serial_hex.clone(),
        new_intermediate: id.clone(),
        trigger: "ceremony".into(),
        prepared_at: ts,
        bundle_published_at: None,
        activate_after_secs: activate_after.as_secs(),
        activated_at: None,
        retire_after_secs: retire_after.as_secs(),
        cross_withdrawn_at: None,
        old_root_grace_secs: leaf_grace as u64,
    });
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::apply::apply;
    use crate::ca::plan::{plan, Action};
    use crate::ca::policy::RotationPolicy;
    use crate::pki::SoftwareKey;

    const DAY: i64 = 86_400;

    fn td() -> TrustDomain {
        TrustDomain::new("cluster.local").unwrap()
    }

    fn t0() -> OffsetDateTime {
        time::macros::datetime!(2030-01-01 0:00 UTC)
    }

    /// An offline root: its certificate and its key (held by the test, never the journal).
    fn root(now: OffsetDateTime) -> (String, Arc<dyn CaKey>) {
        let (cert, key, _) = new_root(
            &td(),
            KeyType::EcP256,
            now,
            Duration::from_secs(3650 * DAY as u64),
        )
        .unwrap();
        (
            cert,
            SoftwareKey::from_pem(key.expose().as_bytes())
                .unwrap()
                .shared(),
        )
    }

    fn der(pem_text: &str) -> Vec<u8> {
        first_cert(pem_text, "test").unwrap()
    }

    fn csr_of(j: &Journal) -> String {
        j.intermediate_request.as_ref().unwrap().csr_pem.clone()
    }

    /// init -> sign -> install: the first intermediate is active, the journal holds no root
    /// key, and a leaf issued by the signer verifies up to the offline root.
    fn ceremony(ttl: Duration) -> (Journal, String, Arc<dyn CaKey>) {
        let (root_pem, root_key) = root(t0());
        let mut j = new_journal(&td(), &root_pem, KeyType::EcP256, t0()).unwrap();
        assert!(j.offline_root);
        assert_eq!(j.active_root().unwrap().key_pem.expose(), "", "no root key");
        assert!(j.active_signer().is_none(), "nothing signs before install");
        let cert = sign_request(
            &td(),
            csr_of(&j).as_bytes(),
            &root_pem,
            root_key.clone(),
            t0(),
            ttl,
        )
        .unwrap();
        let (id, status) = install(&mut j, &cert, t0()).unwrap();
        assert_eq!(status, Status::Active);
        assert_eq!(j.active_signer().unwrap().id, id);
        assert!(j.intermediate_request.is_none());
        (j, root_pem, root_key)
    }

    #[test]
    fn the_first_intermediate_is_signed_offline_and_leaves_chain_to_the_root() {
        let (j, root_pem, _) = ceremony(Duration::from_secs(60 * DAY as u64));
        let signer = crate::ca::bootstrap::signer_from_journal(&j, &td()).unwrap();
        let kp = KeyType::EcP256.generate().unwrap();
        let id =
            crate::identity::SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/cart").unwrap();
        let csr = csr::parse_pem(csr::build(&kp, &id.to_string()).unwrap().as_bytes()).unwrap();
        let leaf = signer
            .issue_workload(&csr.key, &id, t0(), Duration::from_secs(3600))
            .unwrap();
        chain::verify_leaf(
            &leaf.der,
            signer.intermediates_der(),
            &[der(&root_pem).into()],
            t0(),
            chain::Usage::ClientAuth,
        )
        .unwrap();
    }

    /// Nothing the CSR asks for reaches the certificate: a CSR asking for an unconstrained CA,
    /// a SAN and its own CN gets our profile (pathlen 0, no SAN, our subject).
    #[test]
    fn the_intermediate_is_built_from_our_profile_not_the_csr() {
        let (root_pem, root_key) = root(t0());
        let kp = KeyType::EcP256.generate().unwrap();
        let mut p = rcgen::CertificateParams::default();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.subject_alt_names = vec![rcgen::SanType::DnsName("evil.example".try_into().unwrap())];
        p.distinguished_name.push(rcgen::DnType::CommonName, "evil");
        p.distinguished_name
            .push(rcgen::DnType::OrganizationName, "other.domain");
        let evil_csr = p.serialize_request(&kp).unwrap().pem().unwrap();
        let cert = sign_request(
            &td(),
            evil_csr.as_bytes(),
            &root_pem,
            root_key,
            t0(),
            Duration::from_secs(DAY as u64),
        )
        .unwrap();
        let d = der(&cert);
        let c = chain::parse(&d).unwrap();
        let bc = c.basic_constraints().unwrap().unwrap().value.clone();
        assert!(bc.ca);
        assert_eq!(bc.path_len_constraint, Some(0));
        assert!(
            c.subject_alternative_name().unwrap().is_none(),
            "no SAN copied"
        );
        let subject = c.subject().to_string();
        assert!(
            !subject.contains("evil") && !subject.contains("other.domain"),
            "{subject}"
        );
        assert!(subject.contains("O=cluster.local"), "{subject}");
        assert!(chain::may_sign_certificates(&d).unwrap());
        chain::check_issued_by(&d, &der(&root_pem)).unwrap();
    }

    #[test]
    fn sign_refuses_a_tampered_csr_a_wrong_root_key_and_caps_at_the_root() {
        let (root_pem, root_key) = root(t0());
        let mut j = new_journal(&td(), &root_pem, KeyType::EcP256, t0()).unwrap();
        let good = csr_of(&j);
        // A flipped bit in the signature: the self-signature no longer verifies.
        let mut der_csr = ::pem::parse(good.as_bytes()).unwrap().contents().to_vec();
        let n = der_csr.len();
        der_csr[n - 3] ^= 1;
        let bad = ::pem::encode(&::pem::Pem::new("CERTIFICATE REQUEST", der_csr));
        let e = sign_request(
            &td(),
            bad.as_bytes(),
            &root_pem,
            root_key.clone(),
            t0(),
            Duration::from_secs(DAY as u64),
        )
        .unwrap_err();
        assert!(e.to_string().contains("signature"), "{e}");
        // Another root's key for this root certificate.
        let (_, other_key) = root(t0());
        let e = sign_request(
            &td(),
            good.as_bytes(),
            &root_pem,
            other_key,
            t0(),
            Duration::from_secs(DAY as u64),
        )
        .unwrap_err();
        assert!(e.to_string().contains("not the key of the root"), "{e}");
        // A TTL past the root's end is capped at the root's notAfter.
        let cert = sign_request(
            &td(),
            good.as_bytes(),
            &root_pem,
            root_key,
            t0(),
            Duration::from_secs(20_000 * DAY as u64),
        )
        .unwrap();
        let root_end = chain::describe(&der(&root_pem)).unwrap().not_after;
        assert_eq!(chain::describe(&der(&cert)).unwrap().not_after, root_end);
        install(&mut j, &cert, t0()).unwrap();
    }

    #[test]
    fn install_refuses_what_is_not_the_requested_key_under_our_root_and_profile() {
        let (root_pem, root_key) = root(t0());
        let mut j = new_journal(&td(), &root_pem, KeyType::EcP256, t0()).unwrap();
        let day = Duration::from_secs(DAY as u64);
        // Another key's CSR, signed by the right root.
        let kp = KeyType::EcP256.generate().unwrap();
        let other_csr = rcgen::CertificateParams::default()
            .serialize_request(&kp)
            .unwrap()
            .pem()
            .unwrap();
        let other = sign_request(
            &td(),
            other_csr.as_bytes(),
            &root_pem,
            root_key.clone(),
            t0(),
            day,
        )
        .unwrap();
        let e = install(&mut j, &other, t0()).unwrap_err();
        assert!(e.to_string().contains("does not certify the key"), "{e}");
        // The right key, signed by another root.
        let (other_root, other_root_key) = root(t0());
        let foreign = sign_request(
            &td(),
            csr_of(&j).as_bytes(),
            &other_root,
            other_root_key,
            t0(),
            day,
        )
        .unwrap();
        let e = install(&mut j, &foreign, t0()).unwrap_err();
        assert!(e.to_string().contains("does not chain to a root"), "{e}");
        // The right key and root, but not our intermediate profile (an unconstrained CA).
        let key = csr::parse_pem(csr_of(&j).as_bytes()).unwrap().key;
        let mut p = pki::profile::root(&td(), &[7; 16], t0(), t0() + time::Duration::days(1));
        p.use_authority_key_identifier_extension = true;
        let issuer =
            rcgen::Issuer::from_ca_cert_pem(&root_pem, RcgenKey::new(root_key.clone())).unwrap();
        let wrong_profile = p.signed_by(&key, &issuer).unwrap().pem();
        let e = install(&mut j, &wrong_profile, t0()).unwrap_err();
        assert!(e.to_string().contains("pathlen 0"), "{e}");
        // Another trust domain.
        let td2 = TrustDomain::new("other.domain").unwrap();
        let other_td = sign_request(
            &td2,
            csr_of(&j).as_bytes(),
            &root_pem,
            root_key.clone(),
            t0(),
            day,
        )
        .unwrap();
        let e = install(&mut j, &other_td, t0()).unwrap_err();
        assert!(e.to_string().contains("trust domain"), "{e}");
        assert!(j.active_signer().is_none(), "nothing was installed");
        // Garbage.
        assert!(install(&mut j, "not a certificate", t0()).is_err());
        // And the right one still installs.
        let good =
            sign_request(&td(), csr_of(&j).as_bytes(), &root_pem, root_key, t0(), day).unwrap();
        install(&mut j, &good, t0()).unwrap();
        // A journal whose root key is held refuses the whole thing.
        let mut online =
            crate::ca::bootstrap::new_journal(&crate::ca::bootstrap::CaOptions::new(td()), t0())
                .unwrap();
        assert!(install(&mut online, &good, t0())
            .unwrap_err()
            .to_string()
            .contains("offline-root"));
        assert!(request_intermediate(&mut online, t0(), KeyType::EcP256).is_err());
    }

    fn policy() -> RotationPolicy {
        RotationPolicy {
            intermediate_ttl: Duration::from_secs(60 * DAY as u64),
            max_leaf_ttl: Duration::from_secs(DAY as u64),
            crl_validity: Duration::from_secs(30 * DAY as u64),
            ..RotationPolicy::default()
        }
    }

    fn rotation_actions(j: &Journal, p: &RotationPolicy, t: i64) -> Vec<Action> {
        plan(t, j, p)
            .into_iter()
            .filter(|a| {
                !matches!(
                    a,
                    Action::SignCrl { .. }
                        | Action::PrepareJwtKey
                        | Action::ActivateJwtKey
                        | Action::RetireJwtKey { .. }
                )
            })
            .collect()
    }

    /// The planner with an offline root: the next intermediate is REQUESTED (key and CSR) at
    /// the prepare point, once; nothing activates without the signed certificate, however
    /// late; once installed it activates at 5/6 as usual. No root rotation or root CRL is ever
    /// planned (the root key is not here).
    #[test]
    fn the_planner_requests_waits_for_the_signature_and_then_activates() {
        let p = policy();
        let (mut j, root_pem, root_key) = ceremony(p.intermediate_ttl);
        let int = j.active_signer().unwrap().clone();
        let start = int.created_at.max(int.not_before);
        let at = |f: f64| start + ((int.not_after - start) as f64 * f) as i64;
        let odt = |t: i64| OffsetDateTime::from_unix_timestamp(t).unwrap();
        assert!(rotation_actions(&j, &p, at(0.5) - 60).is_empty());
        assert_eq!(
            rotation_actions(&j, &p, at(0.5) + 60),
            vec![Action::RequestIntermediate]
        );
        apply(&mut j, &Action::RequestIntermediate, odt(at(0.5) + 60), &p).unwrap();
        assert!(j.intermediate_request.is_some());
        let needed = signature_needed(&j, p.activate_at).unwrap();
        assert_eq!(needed.deadline, at(p.activate_at));
        assert_eq!(needed.signer_expires, Some(int.not_after));
        // Requested once; past 5/6 and up to the end nothing activates or is requested again.
        for f in [0.6, 5.0 / 6.0 + 0.01, 0.99] {
            assert!(rotation_actions(&j, &p, at(f)).is_empty(), "at {f}");
        }
        assert_eq!(
            j.active_signer().unwrap().id,
            int.id,
            "still the current one"
        );
        // The root's age never starts an automatic rotation, and the root's CRL is never due.
        let late = j.active_root().unwrap().not_after - DAY;
        assert!(!plan(late, &j, &p).contains(&Action::PrepareRootRotation));
        let root_id = j.active_root().unwrap().id.clone();
        assert!(!plan(at(0.6), &j, &p).contains(&Action::SignCrl { issuer: root_id }));
        // Signed and installed at 0.7: prepared, activated at 5/6.
        let cert = sign_request(
            &td(),
            csr_of(&j).as_bytes(),
            &root_pem,
            root_key,
            odt(at(0.7)),
            p.intermediate_ttl,
        )
        .unwrap();
        let (next, status) = install(&mut j, &cert, odt(at(0.7))).unwrap();
        assert_eq!(status, Status::Prepared);
        assert_eq!(signature_needed(&j, p.activate_at), None);
        assert!(rotation_actions(&j, &p, at(0.8)).is_empty());
        assert_eq!(
            rotation_actions(&j, &p, at(5.0 / 6.0) + 1),
            vec![Action::ActivateIntermediate]
        );
        apply(
            &mut j,
            &Action::ActivateIntermediate,
            odt(at(5.0 / 6.0) + 1),
            &p,
        )
        .unwrap();
        assert_eq!(j.active_signer().unwrap().id, next);
        // Every CRL that is due can be signed (intermediates only).
        for a in plan(at(5.0 / 6.0) + 2, &j, &p) {
            apply(&mut j, &a, odt(at(5.0 / 6.0) + 2), &p).unwrap();
        }
    }

    /// Through the real scheduler on a ManualClock: the request appears at the prepare
    /// point, the CA reports seconds left (then overdue) and keeps signing with the current
    /// intermediate; after install, activation follows.
    #[tokio::test]
    async fn the_scheduler_raises_the_alarm_and_keeps_serving_until_the_signature() {
        use crate::ca::scheduler::Scheduler;
        use crate::clock::{Clock, ManualClock};
        use crate::store::mem::MemStore;
        let p = policy();
        let (j, root_pem, root_key) = ceremony(p.intermediate_ttl);
        let int = j.active_signer().unwrap().clone();
        let start = int.created_at.max(int.not_before);
        let at = |f: f64| {
            OffsetDateTime::from_unix_timestamp(start + ((int.not_after - start) as f64 * f) as i64)
                .unwrap()
        };
        let store = Arc::new(MemStore::with_journal(j));
        let clock = ManualClock::new(t0());
        let ca = crate::ca::Ca::new();
        let s = Scheduler::new(
            store.clone(),
            ca.clone(),
            p.clone(),
            Arc::new(clock.clone()),
            td(),
        );
        s.step().await.unwrap();
        assert_eq!(ca.current().unwrap().id(), int.id);
        assert!(ca.intermediate_needed().is_none());
        clock.set(at(0.5) + time::Duration::minutes(1));
        s.step().await.unwrap();
        let j = store.journal().unwrap();
        let req = j
            .intermediate_request
            .clone()
            .expect("requested at the prepare point");
        let (needed, left) = ca.intermediate_needed().expect("the alarm is up");
        assert_eq!(needed.request, req.id);
        assert_eq!(left, (at(p.activate_at) - clock.now()).whole_seconds());
        // Past the activation point: overdue (negative), still the current intermediate.
        clock.set(at(0.9));
        s.step().await.unwrap();
        let (_, left) = ca.intermediate_needed().unwrap();
        assert!(left < 0, "{left}");
        assert_eq!(ca.current().unwrap().id(), int.id);
        assert_eq!(
            store.journal().unwrap().intermediate_request.unwrap().id,
            req.id,
            "one request"
        );
        // Signed and installed (as the CLI does, through the store): activated at once, since
        // the activation point has passed; the alarm is down.
        let cert = sign_request(
            &td(),
            req.csr_pem.as_bytes(),
            &root_pem,
            root_key,
            clock.now(),
            p.intermediate_ttl,
        )
        .unwrap();
        let now = clock.now();
        let ((id, _), _, _) = crate::ca::update::update_journal(store.as_ref(), |j| {
            install(j, &cert, now).map_err(|e| e.to_string())
        })
        .await
        .unwrap();
        s.step().await.unwrap();
        assert_eq!(ca.current().unwrap().id(), id);
        assert!(ca.intermediate_needed().is_none());
    }

    /// A root rotation as a ceremony: the new intermediate under the new root and its
    /// cross-signed twin under the old one, installed as a staged rotation that then moves
    /// through the usual stages.
    #[test]
    fn an_offline_root_rotation_goes_through_the_staged_steps() {
        let p = policy();
        let (mut j, old_pem, old_key) = ceremony(p.intermediate_ttl);
        let old_root = j.active_root().unwrap().id.clone();
        assert!(crate::ca::apply::prepare_root_rotation(
            &mut j,
            t0(),
            &p,
            "operator",
            p.activate_after,
            p.max_leaf_ttl
        )
        .unwrap_err()
        .to_string()
        .contains("offline"));
        request_intermediate(&mut j, t0(), KeyType::EcP256).unwrap();
        let (new_pem, new_key) = root(t0());
        let out = sign_root_rotation(
            &td(),
            csr_of(&j).as_bytes(),
            &new_pem,
            new_key,
            &old_pem,
            old_key.clone(),
            t0(),
            p.intermediate_ttl,
        )
        .unwrap();
        chain::check_issued_by(&der(&out.intermediate_pem), &der(&new_pem)).unwrap();
        chain::check_issued_by(&der(&out.cross_pem), &der(&old_pem)).unwrap();
        // The cross-signed one must come from the CURRENT root: swapped, it is refused.
        let mut k = j.clone();
        assert!(install_root_rotation(
            &mut k,
            &new_pem,
            &out.intermediate_pem,
            &out.intermediate_pem,
            t0(),
            Duration::ZERO,
            p.max_leaf_ttl,
            p.leaf_grace()
        )
        .is_err());
        let id = install_root_rotation(
            &mut j,
            &new_pem,
            &out.intermediate_pem,
            &out.cross_pem,
            t0(),
            Duration::from_secs(DAY as u64),
            p.max_leaf_ttl,
            p.leaf_grace(),
        )
        .unwrap();
        assert_eq!(
            j.trusted_roots().count(),
            2,
            "the new root joins the bundle"
        );
        let r = j.root_rotation.clone().unwrap();
        assert_eq!(
            (r.old_root.as_str(), r.new_intermediate.as_str()),
            (old_root.as_str(), id.as_str())
        );
        let t = t0().unix_timestamp();
        let odt = |t: i64| OffsetDateTime::from_unix_timestamp(t).unwrap();
        j.root_rotation.as_mut().unwrap().bundle_published_at = Some(t);
        assert_eq!(
            rotation_actions(&j, &p, t + DAY),
            vec![Action::ActivateRootRotation]
        );
        apply(&mut j, &Action::ActivateRootRotation, odt(t + DAY), &p).unwrap();
        assert_eq!(j.active_signer().unwrap().id, id);
        assert!(j.active_signer().unwrap().cross_cert_pem.is_some());
        // The signer serves the cross-signed certificate next to the chain.
        let signer = crate::ca::bootstrap::signer_from_journal(&j, &td()).unwrap();
        assert_eq!(signer.alternates_der().len(), 1);
        let mut now = t + DAY;
        for _ in 0..10 {
            now += DAY;
            for a in rotation_actions(&j, &p, now) {
                apply(&mut j, &a, odt(now), &p).unwrap();
            }
        }
        assert!(j.root_rotation.is_none(), "completed");
        assert_eq!(j.trusted_roots().count(), 1);
        assert_ne!(j.active_root().unwrap().id, old_root);
        assert!(j.offline_root);
    }
}
