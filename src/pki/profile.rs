//! Certificate profiles: what a root, an intermediate, a workload leaf and citadel's own
//! serving certificate look like. These mirror istiod's choices (see docs/architecture.md).

use std::net::IpAddr;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyUsagePurpose, SanType, SerialNumber,
};
use time::OffsetDateTime;

use crate::identity::{SpiffeId, TrustDomain};

use super::PkiError;

/// How far notBefore is backdated, to tolerate clock skew between CA and workloads.
pub const BACKDATE: time::Duration = time::Duration::minutes(2);

fn base(serial: &[u8], not_before: OffsetDateTime, not_after: OffsetDateTime) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.serial_number = Some(SerialNumber::from_slice(serial));
    p.not_before = not_before;
    p.not_after = not_after;
    p
}

/// A self-signed root. No name constraints: rustls-webpki fails closed on URI constraints.
pub fn root(
    td: &TrustDomain,
    serial: &[u8],
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> CertificateParams {
    let mut p = base(serial, not_before, not_after);
    p.distinguished_name
        .push(DnType::OrganizationName, td.as_str());
    p.distinguished_name.push(
        DnType::CommonName,
        format!("citadel root CA {}", short_id(serial)),
    );
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p
}

/// The signing CA under a root: pathLen 0, so it can issue leaves only.
pub fn intermediate(
    td: &TrustDomain,
    serial: &[u8],
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> CertificateParams {
    let mut p = base(serial, not_before, not_after);
    p.distinguished_name
        .push(DnType::OrganizationName, td.as_str());
    p.distinguished_name.push(
        DnType::CommonName,
        format!("citadel intermediate CA {}", short_id(serial)),
    );
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.use_authority_key_identifier_extension = true;
    p
}

/// A workload SVID, istiod's leaf profile: empty subject (so the URI SAN is critical),
/// KeyUsage digitalSignature + keyEncipherment, EKU server + client auth, CA:false.
///
/// There is deliberately no way to put a subject CN here: a CN the caller chose would be
/// signed unchecked, and OpenSSL-style clients fall back to the CN for hostname checks when a
/// certificate has no DNS SAN, so a workload could pose as any host or identity it named.
pub fn workload(
    id: &SpiffeId,
    serial: &[u8],
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<CertificateParams, PkiError> {
    workload_named(id, LeafNames::SPIFFE, serial, not_before, not_after)
}

/// The names a workload leaf carries. Both come from the identity the issue path authorized
/// (the DNS name is derived from its service account, `identity::LinkerdNames`), never from
/// the CSR, so nothing the caller chose is signed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeafNames<'a> {
    /// The SPIFFE ID as a URI SAN.
    pub spiffe: bool,
    /// A DNS SAN: Linkerd's DNS-form identity.
    pub dns: Option<&'a str>,
}

impl LeafNames<'static> {
    /// The SPIFFE ID alone: every surface but Linkerd's.
    pub const SPIFFE: Self = Self {
        spiffe: true,
        dns: None,
    };
}

/// [`workload`] with the names `names` says: the SPIFFE URI, a DNS name, or both (a leaf that
/// Linkerd's proxies and SPIFFE verifiers both accept). The subject stays empty, so the SAN
/// extension is critical whichever names it holds.
pub fn workload_named(
    id: &SpiffeId,
    names: LeafNames<'_>,
    serial: &[u8],
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<CertificateParams, PkiError> {
    let mut p = base(serial, not_before, not_after);
    if let Some(dns) = names.dns {
        p.subject_alt_names
            .push(SanType::DnsName(dns.try_into().map_err(|_| {
                PkiError::invalid(format!("{dns:?} is not a valid DNS name"))
            })?));
    }
    if names.spiffe {
        p.subject_alt_names
            .push(SanType::URI(id.to_string().try_into()?));
    }
    if p.subject_alt_names.is_empty() {
        return Err(PkiError::invalid("a workload leaf must name its identity"));
    }
    leaf_usages(&mut p);
    Ok(p)
}

/// The extension that marks a workload SVID issued to a node proxy on a workload's behalf
/// (`ImpersonatedIdentity`): non-critical, so every other verifier ignores it, and its value
/// is an empty DER NULL. citadel reads it only to refuse such a certificate as a renewal
/// credential (`auth::client_cert`): the workload's pod may since have left that node, and
/// only the node check proves it has not. The caller cannot put it there or leave it out:
/// leaves are built from scratch, nothing of the CSR but its key is signed.
///
/// A private OID, not registered (citadel has no IANA Private Enterprise Number yet);
/// changing it would let certificates marked with the old one renew once.
pub const NODE_ISSUED_OID: &[u64] = &[1, 3, 6, 1, 4, 1, 99999, 7411, 1];

/// [`workload`], marked as issued through node impersonation ([`NODE_ISSUED_OID`]).
pub fn workload_for_node(
    id: &SpiffeId,
    serial: &[u8],
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<CertificateParams, PkiError> {
    let mut p = workload(id, serial, not_before, not_after)?;
    mark_for_node(&mut p);
    Ok(p)
}

/// Adds [`NODE_ISSUED_OID`] to a workload leaf.
pub fn mark_for_node(p: &mut CertificateParams) {
    p.custom_extensions
        .push(rcgen::CustomExtension::from_oid_content(
            NODE_ISSUED_OID,
            vec![0x05, 0x00],
        ));
}

/// citadel's own TLS serving certificate, with DNS and IP SANs.
pub fn serving(
    names: &[String],
    serial: &[u8],
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<CertificateParams, PkiError> {
    let mut p = base(serial, not_before, not_after);
    p.distinguished_name.push(DnType::CommonName, "citadel");
    for n in names {
        p.subject_alt_names.push(match n.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(
                n.as_str()
                    .try_into()
                    .map_err(|_| PkiError::invalid(format!("{n:?} is not a valid DNS name")))?,
            ),
        });
    }
    leaf_usages(&mut p);
    Ok(p)
}

fn leaf_usages(p: &mut CertificateParams) {
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.use_authority_key_identifier_extension = true;
}

fn short_id(serial: &[u8]) -> String {
    hex::encode(&serial[..serial.len().min(4)])
}
