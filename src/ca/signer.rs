//! The active signer: one signing key and certificate, the chain up to the roots, and the
//! trust bundle. It is immutable; rotation builds a new one and swaps it in (see [`super::Ca`]).

use std::time::Duration;

use std::sync::Arc;

use rcgen::{Issuer, KeyPair};
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;

use crate::identity::{SpiffeId, TrustDomain};
use crate::pki::cakey::{self, CaKey, KeyError, RcgenKey};
use crate::pki::chain::{self, CertInfo};
use crate::pki::csr::SubjectKey;
use crate::pki::{pem, profile, try_random_serial, PkiError, PublicKeyKind};

/// A certificate just issued.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The serial, lowercase hex; the key of the issuance index and of revocations.
    pub serial_hex: String,
    /// The certificate, DER.
    pub der: CertificateDer<'static>,
    /// The certificate, PEM: what goes first in the response chain.
    pub pem: String,
    /// notBefore: backdated for clock skew.
    pub not_before: OffsetDateTime,
    /// notAfter: the requested TTL, capped at the issuer's notAfter.
    pub not_after: OffsetDateTime,
}

/// Why a certificate could not be signed.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    /// The signing CA's notAfter has passed (the time it expired); the server answers Unavailable.
    #[error("the signing CA expired at {0}")]
    Expired(OffsetDateTime),
    /// The CA key could not sign; [`KeyError::Unavailable`] may pass on a retry (an HSM
    /// that is briefly unreachable), so a surface may answer Unavailable for it.
    #[error(transparent)]
    Key(KeyError),
    /// Building or checking the certificate failed.
    #[error(transparent)]
    Pki(PkiError),
}

impl From<PkiError> for SignError {
    fn from(e: PkiError) -> Self {
        match e {
            PkiError::Key(k) => SignError::Key(k),
            other => SignError::Pki(other),
        }
    }
}

impl From<rcgen::Error> for SignError {
    fn from(e: rcgen::Error) -> Self {
        PkiError::from(e).into()
    }
}

/// The immutable signing state: key, signing certificate, chain to the roots, trust bundle and
/// revocations.
pub struct Signer {
    trust_domain: TrustDomain,
    /// The signing key behind rcgen's issuer: every leaf this signer issues is signed here.
    issuer: Issuer<'static, RcgenKey>,
    key_kind: PublicKeyKind,
    signing: CertInfo,
    signing_der: CertificateDer<'static>,
    /// CA certificates between a leaf and the roots, the signing certificate first.
    intermediates_der: Vec<CertificateDer<'static>>,
    intermediates_pem: Vec<String>,
    roots_der: Vec<CertificateDer<'static>>,
    roots_pem: String,
    roots_info: Vec<CertInfo>,
    /// The root that the signing chain leads to.
    anchor: CertInfo,
    /// The signing certificate cross-signed by the previous root during a root rotation.
    alternates_der: Vec<CertificateDer<'static>>,
    alternates_pem: Vec<String>,
    /// Revocation state this signer enforces and publishes.
    revocations: RevocationView,
    /// Root rotation stage: 0 none, 1 prepared, 2 activated.
    rotation_stage: u8,
    /// When the rotation's next stage is due (unix seconds), once it can be known.
    rotation_due: Option<i64>,
}

/// What a signer knows about revocation: revoked certificates, denied identities, CRL PEM.
#[derive(Debug, Clone, Default)]
pub struct RevocationView {
    /// Revoked certificates as (issuer name DER, serial hex): a serial is only unique per
    /// issuer, and one CRL file may carry the CRLs of several issuers (a plugged-in CA's root
    /// and intermediate). An empty issuer matches any issuer (a journal revocation whose
    /// issuing authority is no longer known).
    pub revoked: std::collections::HashSet<(Vec<u8>, String)>,
    /// SPIFFE IDs (URI strings) that may get no new certificate.
    pub denied_identities: std::collections::HashSet<String>,
    /// The CRLs of every authority, concatenated PEM, as published.
    pub crl_pem: String,
    /// The same CRLs one by one, DER, by the id of the authority that signed each (the CRL
    /// distribution point, `server::crl_http`); empty for a plugged-in CA.
    pub crls: Vec<(String, Vec<u8>)>,
    /// How many revocations the journal holds (the `citadel_ca_crl_entries` gauge).
    pub crl_entries: usize,
    /// The earliest nextUpdate among the CRLs (unix seconds); `None` when none is signed yet.
    pub crl_next_update: Option<i64>,
}

impl RevocationView {
    /// Whether the certificate with this issuer name (DER) and serial is revoked.
    pub fn revokes(&self, issuer_raw: &[u8], serial_hex: &str) -> bool {
        // Probe without allocating the key on the common path (nothing revoked).
        if self.revoked.is_empty() {
            return false;
        }
        let serial = serial_hex.to_string();
        self.revoked
            .contains(&(issuer_raw.to_vec(), serial.clone()))
            || self.revoked.contains(&(Vec::new(), serial))
    }
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("signing", &self.signing.subject)
            .field("serial", &self.signing.serial_hex)
            .field("roots", &self.roots_der.len())
            .finish_non_exhaustive()
    }
}

impl Signer {
    /// Builds a signer and checks it is coherent: the key matches the signing certificate,
    /// each certificate is signed by the next, and the last one by a root in `roots`.
    ///
    /// `chain` holds the CA certificates above the signing certificate and below the roots
    /// (empty for root -> intermediate). If the signing certificate is itself a root, pass it
    /// in `roots` as well.
    pub fn new(
        trust_domain: TrustDomain,
        signing_der: CertificateDer<'static>,
        key: Arc<dyn CaKey>,
        chain: Vec<CertificateDer<'static>>,
        roots: Vec<CertificateDer<'static>>,
    ) -> Result<Self, PkiError> {
        let spki = cakey::spki(key.as_ref());
        if !chain::spki_matches_cert(&spki, &signing_der)? {
            return Err(PkiError::invalid(
                "the private key does not match the signing certificate",
            ));
        }
        let signing = chain::describe(&signing_der)?;
        if !signing.is_ca {
            return Err(PkiError::invalid(format!(
                "the signing certificate {:?} is not a CA (basicConstraints CA:true missing)",
                signing.subject
            )));
        }
        if roots.is_empty() {
            return Err(PkiError::invalid("the trust bundle holds no root"));
        }
        let mut intermediates_der = vec![signing_der.clone()];
        intermediates_der.extend(chain);
        // Drop a trailing root if the caller's chain already included it.
        intermediates_der.retain(|c| !roots.iter().any(|r| r.as_ref() == c.as_ref()));
        for pair in intermediates_der.windows(2) {
            chain::check_issued_by(&pair[0], &pair[1])?;
        }
        let top = intermediates_der.last().unwrap_or(&signing_der);
        let anchor = roots
            .iter()
            .find(|r| r.as_ref() == top.as_ref() || chain::check_issued_by(top, r).is_ok())
            .ok_or_else(|| {
                PkiError::invalid(format!(
                    "{:?} does not chain to any root in the trust bundle",
                    chain::describe(top).map(|i| i.subject).unwrap_or_default()
                ))
            })?;
        let anchor = chain::describe(anchor)?;
        let roots_info = roots
            .iter()
            .map(|r| chain::describe(r))
            .collect::<Result<Vec<_>, _>>()?;
        let key_kind = crate::pki::keys::spki_kind(&spki)?;
        let issuer = Issuer::from_ca_cert_der(&signing_der, RcgenKey::new(key))?;
        Ok(Self {
            trust_domain,
            issuer,
            key_kind,
            signing,
            intermediates_pem: intermediates_der
                .iter()
                .map(|c| pem::cert_to_pem(c))
                .collect(),
            intermediates_der,
            roots_pem: pem::certs_to_pem(&roots),
            roots_der: roots,
            roots_info,
            anchor,
            signing_der,
            alternates_der: Vec::new(),
            alternates_pem: Vec::new(),
            revocations: RevocationView::default(),
            rotation_stage: 0,
            rotation_due: None,
        })
    }

    /// Adds certificates for the signing key issued by another root (cross-signed), sent
    /// after the regular chain so verifiers holding only that root can build a path.
    pub fn with_alternates(
        mut self,
        certs: Vec<CertificateDer<'static>>,
    ) -> Result<Self, PkiError> {
        for c in &certs {
            let ok = self
                .roots_der
                .iter()
                .any(|r| chain::check_issued_by(c, r).is_ok());
            if !ok {
                return Err(PkiError::invalid(
                    "a cross-signed certificate does not chain to a root in the bundle",
                ));
            }
        }
        self.alternates_pem = certs.iter().map(|c| pem::cert_to_pem(c)).collect();
        self.alternates_der = certs;
        Ok(self)
    }

    /// Adds roots to the trust bundle that this signer does not chain to: a plugged-in CA's
    /// previous roots during the overlap after a swap (`ca::reload`), so leaves of the old
    /// chain keep verifying. Duplicates of roots already in the bundle are skipped.
    pub fn with_extra_roots(
        mut self,
        extra: Vec<CertificateDer<'static>>,
    ) -> Result<Self, PkiError> {
        for r in extra {
            if self
                .roots_der
                .iter()
                .any(|have| have.as_ref() == r.as_ref())
            {
                continue;
            }
            self.roots_info.push(chain::describe(&r)?);
            self.roots_der.push(r);
        }
        self.roots_pem = pem::certs_to_pem(&self.roots_der);
        Ok(self)
    }

    /// Sets the revocation state this signer enforces and publishes.
    pub fn with_revocations(mut self, view: RevocationView) -> Self {
        self.revocations = view;
        self
    }

    /// Sets the root rotation stage: 0 none, 1 prepared, 2 activated.
    pub fn with_rotation_stage(mut self, stage: u8) -> Self {
        self.rotation_stage = stage;
        self
    }

    /// The revocation state this signer enforces and publishes.
    pub fn revocations(&self) -> &RevocationView {
        &self.revocations
    }

    /// Sets when the root rotation's next stage is due (unix seconds).
    pub fn with_rotation_due(mut self, due: Option<i64>) -> Self {
        self.rotation_due = due;
        self
    }

    /// When the root rotation's next stage is due (unix seconds): an operator's deadline
    /// (`citadel_ca_root_rotation_next_stage_due_timestamp`); a stage still pending well past
    /// it means the rotation is stuck.
    pub fn rotation_due(&self) -> Option<i64> {
        self.rotation_due
    }

    /// Root rotation stage: 0 none, 1 prepared, 2 activated (the `citadel_ca_root_rotation_stage`
    /// gauge).
    pub fn rotation_stage(&self) -> u8 {
        self.rotation_stage
    }

    /// The id (serial hex) of the signing certificate: the issuer recorded for each leaf.
    pub fn id(&self) -> &str {
        &self.signing.serial_hex
    }

    /// Whether this SPIFFE ID (URI string) is denied new certificates.
    pub fn is_denied(&self, identity: &str) -> bool {
        self.revocations.denied_identities.contains(identity)
    }

    /// Whether the certificate `der` is on a CRL this signer enforces, matched by its issuer
    /// name and serial. An unreadable certificate counts as revoked (fail closed).
    pub fn is_revoked(&self, der: &[u8]) -> bool {
        let Ok(c) = chain::parse(der) else {
            return true;
        };
        self.revocations
            .revokes(c.issuer().as_raw(), &chain::serial_hex(c.raw_serial()))
    }

    /// Cross-signed certificates sent after the intermediates.
    pub fn alternates_der(&self) -> &[CertificateDer<'static>] {
        &self.alternates_der
    }

    /// The trust domain whose identities this signer certifies.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The signing certificate's details.
    pub fn signing_cert(&self) -> &CertInfo {
        &self.signing
    }

    /// The signing certificate, DER.
    pub fn signing_der(&self) -> &CertificateDer<'static> {
        &self.signing_der
    }

    /// The signing key, for signatures rcgen does not make (JWT-SVIDs: [`CaKey::sign_jws`]).
    pub fn key(&self) -> &Arc<dyn CaKey> {
        self.issuer.key().key()
    }

    /// The signing key's type; it decides the signature algorithm of what it issues.
    pub fn key_kind(&self) -> PublicKeyKind {
        self.key_kind
    }

    /// The roots as one PEM string: the last element of every CreateCertificate response.
    pub fn roots_pem(&self) -> &str {
        &self.roots_pem
    }

    /// Every root in the trust bundle, DER.
    pub fn roots_der(&self) -> &[CertificateDer<'static>] {
        &self.roots_der
    }

    /// The root the signing chain leads to.
    pub fn anchor_root(&self) -> &CertInfo {
        &self.anchor
    }

    /// Every root in the trust bundle, described; same order as [`Signer::roots_der`].
    pub fn roots_info(&self) -> &[CertInfo] {
        &self.roots_info
    }

    /// CA certificates between a leaf and the roots.
    pub fn intermediates_der(&self) -> &[CertificateDer<'static>] {
        &self.intermediates_der
    }

    /// The earliest notAfter among the signing chain (not the roots): leaves cannot outlive it.
    pub fn chain_not_after(&self) -> OffsetDateTime {
        self.intermediates_der
            .iter()
            .filter_map(|c| chain::describe(c).ok())
            .map(|i| i.not_after)
            .min()
            .unwrap_or(self.signing.not_after)
    }

    /// Istio's response layout: leaf, each CA between leaf and root, then all roots as ONE
    /// element (several PEM blocks during a root rotation).
    pub fn response_chain(&self, leaf_pem: String) -> Vec<String> {
        let mut out =
            Vec::with_capacity(self.intermediates_pem.len() + self.alternates_pem.len() + 2);
        out.push(leaf_pem);
        // Cross-signed first: OpenSSL and BoringSSL take the first matching issuer and do not
        // backtrack, and while it is served every current bundle holds the old root.
        out.extend(self.alternates_pem.iter().cloned());
        out.extend(self.intermediates_pem.iter().cloned());
        out.push(self.roots_pem.clone());
        out
    }

    /// notBefore/notAfter for a leaf: backdated a little, capped at the issuer's notAfter.
    fn validity(
        &self,
        now: OffsetDateTime,
        ttl: Duration,
    ) -> Result<(OffsetDateTime, OffsetDateTime), SignError> {
        let cap = self.signing.not_after;
        if cap <= now {
            return Err(SignError::Expired(cap));
        }
        let wanted = crate::clock::checked_add(now, ttl)
            .ok_or_else(|| PkiError::invalid("the requested TTL is out of range"))?;
        Ok((now - profile::BACKDATE, wanted.min(cap)))
    }

    /// Issues a workload SVID for `id` over the CSR's public key.
    pub fn issue_workload(
        &self,
        key: &SubjectKey,
        id: &SpiffeId,
        now: OffsetDateTime,
        ttl: Duration,
    ) -> Result<Issued, SignError> {
        self.issue_workload_as(key, id, now, ttl, false)
    }

    /// [`Signer::issue_workload`]; with `for_node`, marked as issued to a node proxy on the
    /// workload's behalf (`profile::workload_for_node`), so it cannot renew itself.
    pub fn issue_workload_as(
        &self,
        key: &SubjectKey,
        id: &SpiffeId,
        now: OffsetDateTime,
        ttl: Duration,
        for_node: bool,
    ) -> Result<Issued, SignError> {
        self.issue_workload_named(key, id, profile::LeafNames::SPIFFE, now, ttl, for_node)
    }

    /// [`Signer::issue_workload_as`] with the leaf's names chosen by the issue path
    /// ([`profile::LeafNames`]: Linkerd's DNS-form identity, with or without the SPIFFE ID).
    pub fn issue_workload_named(
        &self,
        key: &SubjectKey,
        id: &SpiffeId,
        names: profile::LeafNames<'_>,
        now: OffsetDateTime,
        ttl: Duration,
        for_node: bool,
    ) -> Result<Issued, SignError> {
        let (nb, na) = self.validity(now, ttl)?;
        let serial = try_random_serial()?;
        let mut params = profile::workload_named(id, names, &serial, nb, na)?;
        if for_node {
            profile::mark_for_node(&mut params);
        }
        let cert = params.signed_by(key, &self.issuer)?;
        Ok(issued(&serial, cert, nb, na))
    }

    /// Issues citadel's own TLS serving certificate.
    pub fn issue_serving(
        &self,
        key: &KeyPair,
        names: &[String],
        now: OffsetDateTime,
        ttl: Duration,
    ) -> Result<Issued, SignError> {
        let (nb, na) = self.validity(now, ttl)?;
        let serial = try_random_serial()?;
        let params = profile::serving(names, &serial, nb, na)?;
        let cert = params.signed_by(key, &self.issuer)?;
        Ok(issued(&serial, cert, nb, na))
    }
}

fn issued(
    serial: &[u8],
    cert: rcgen::Certificate,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Issued {
    Issued {
        serial_hex: hex::encode(serial),
        pem: cert.pem(),
        der: cert.der().clone(),
        not_before,
        not_after,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::bootstrap::{self, CaOptions};
    use crate::identity::ServiceAccount;
    use crate::pki::{csr, KeyType};
    use x509_parser::prelude::{FromDer, X509Certificate};

    fn setup(intermediate_ttl: Duration, now: OffsetDateTime) -> (Signer, SpiffeId) {
        let td = TrustDomain::new("cluster.local").unwrap();
        let mut opts = CaOptions::new(td.clone());
        opts.intermediate_ttl = intermediate_ttl;
        let signer =
            bootstrap::signer_from_journal(&bootstrap::new_journal(&opts, now).unwrap(), &td)
                .unwrap();
        let id = td.service_account_id(&ServiceAccount::new("shop", "cart").unwrap());
        (signer, id)
    }

    fn subject_key(id: &SpiffeId) -> SubjectKey {
        let key = KeyType::EcP256.generate().unwrap();
        csr::parse_pem(csr::build(&key, &id.to_string()).unwrap().as_bytes())
            .unwrap()
            .key
    }

    #[test]
    fn validity_is_backdated_and_capped_at_the_issuer() {
        let now = time::macros::datetime!(2030-06-01 12:00 UTC);
        let (signer, id) = setup(Duration::from_secs(48 * 3600), now);
        let key = subject_key(&id);

        let leaf = signer
            .issue_workload(&key, &id, now, Duration::from_secs(3600))
            .unwrap();
        assert_eq!(leaf.not_before, now - time::Duration::minutes(2));
        assert_eq!(leaf.not_after, now + time::Duration::hours(1));

        // 40h later the issuer has 8h left: a 24h request is capped there.
        let later = now + time::Duration::hours(40);
        let leaf = signer
            .issue_workload(&key, &id, later, Duration::from_secs(86_400))
            .unwrap();
        assert_eq!(leaf.not_after, signer.signing_cert().not_after);

        // After the issuer expires nothing is signed.
        let dead = now + time::Duration::hours(49);
        assert!(matches!(
            signer.issue_workload(&key, &id, dead, Duration::from_secs(60)),
            Err(SignError::Expired(_))
        ));
    }

    #[test]
    fn leaf_profile() {
        let now = crate::clock::system().now();
        let (signer, id) = setup(Duration::from_secs(86_400), now);
        let leaf = signer
            .issue_workload(&subject_key(&id), &id, now, Duration::from_secs(3600))
            .unwrap();
        let (_, c) = X509Certificate::from_der(&leaf.der).unwrap();
        assert_eq!(c.subject().iter().count(), 0);
        let san = c.subject_alternative_name().unwrap().unwrap();
        assert!(san.critical);
        assert_eq!(
            format!("{:?}", san.value.general_names),
            format!("[URI({:?})]", id.to_string())
        );
        assert!(!c.basic_constraints().unwrap().unwrap().value.ca);
        let ku = c.key_usage().unwrap().unwrap().value;
        assert!(ku.digital_signature() && ku.key_encipherment() && !ku.key_cert_sign());
        let eku = c.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        assert_eq!(chain::serial_hex(c.raw_serial()), leaf.serial_hex);
        assert_eq!(leaf.serial_hex.len(), 32, "128-bit serial");
        // The response layout: leaf, intermediate, roots.
        let resp = signer.response_chain(leaf.pem.clone());
        assert_eq!(resp.len(), 3);
        assert_eq!(resp[2], signer.roots_pem());
        // Only a certificate issued on a node's request carries the node marker, non-critical.
        assert!(!chain::describe(&leaf.der).unwrap().node_issued);
        let for_node = signer
            .issue_workload_as(&subject_key(&id), &id, now, Duration::from_secs(3600), true)
            .unwrap();
        assert!(chain::describe(&for_node.der).unwrap().node_issued);
        let (_, c) = X509Certificate::from_der(&for_node.der).unwrap();
        let marker = c
            .extensions()
            .iter()
            .find(|e| e.oid.to_id_string() == "1.3.6.1.4.1.99999.7411.1")
            .expect("the marker");
        assert!(!marker.critical, "other verifiers ignore it");
        assert_eq!(c.extensions().len(), leaf_exts(&leaf.der) + 1);
    }

    fn leaf_exts(der: &[u8]) -> usize {
        X509Certificate::from_der(der).unwrap().1.extensions().len()
    }

    #[test]
    fn serials_are_unique() {
        let now = crate::clock::system().now();
        let (signer, id) = setup(Duration::from_secs(86_400), now);
        let key = subject_key(&id);
        let serials: std::collections::HashSet<_> = (0..500)
            .map(|_| {
                signer
                    .issue_workload(&key, &id, now, Duration::from_secs(60))
                    .unwrap()
                    .serial_hex
            })
            .collect();
        assert_eq!(serials.len(), 500, "same key, fresh serial every time");
    }
}
