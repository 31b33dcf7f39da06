//! Issuing one workload SVID: deny list, sign, record in the issuance index, deny re-check
//! after recording, and the audit line.
//!
//! Surfaces never call this directly: they call the shared issue path,
//! `auth::issue_path::IssuePath`, which authenticates and authorizes the identity first and
//! then calls [`sign_svid`] and [`audit_issued`]; each surface maps the path's error to its own
//! answer (a gRPC status, a PodCertificateRequest condition). What happens between "this
//! identity may have a certificate for this key" and "here it is" lives only here, so a rule
//! added to it (a new revocation check, say) cannot be forgotten on one path.

use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;

use super::revocation::SweepRequest;
use super::{Ca, Issued, SignError, Signer};
use crate::identity::SpiffeId;
use crate::pki::csr::SubjectKey;
use crate::pki::profile::LeafNames;
use crate::store::index::{IssuanceIndex, IssuedEntry};

/// Why no certificate was handed out.
#[derive(Debug, thiserror::Error)]
pub enum IssueFailure {
    /// No signer is installed yet.
    #[error("no signing CA is loaded yet")]
    NoSigner,
    /// The identity is on the deny list (`citadel revoke --identity`). `after_signing` is true
    /// when the denial arrived while this request signed: the certificate exists in the index
    /// (so the sweep revokes it) but is never handed out.
    #[error("{identity} has been revoked by an operator and may get no new certificate")]
    Denied {
        /// The SPIFFE ID refused.
        identity: String,
        /// Whether the denial was seen only after signing.
        after_signing: bool,
    },
    /// The signing CA's notAfter has passed.
    #[error("the signing CA expired at {0}")]
    Expired(OffsetDateTime),
    /// Building the certificate failed.
    #[error("signing failed: {0}")]
    Sign(#[source] SignError),
    /// The certificate could not be recorded in the issuance index, so it could not be revoked
    /// by identity: it is not handed out.
    #[error("the CA cannot record certificates right now")]
    Index,
}

/// The installed signer, if `identity` (a SPIFFE ID string) may have a new credential: the
/// deny check every credential passes, an X.509-SVID ([`sign_svid`]) or a JWT-SVID
/// (`ca::jwt::sign_jwt_svid`). Refuses with [`IssueFailure::NoSigner`] before the CA is
/// loaded and [`IssueFailure::Denied`] for a denied identity.
pub fn permitted(ca: &Ca, identity: &str) -> Result<Arc<Signer>, IssueFailure> {
    let signer = ca.current().ok_or(IssueFailure::NoSigner)?;
    if signer.is_denied(identity) {
        return Err(IssueFailure::Denied {
            identity: identity.to_string(),
            after_signing: false,
        });
    }
    Ok(signer)
}

/// Signs an SVID for `id` over `key`, valid from `now` (backdated) for `ttl` (capped at the
/// issuer), and records it in `index`. Returns the signer that signed (for the chain) and the
/// certificate. `for_node`: a node proxy asked on the workload's behalf (node
/// impersonation), and the certificate is marked so it is no renewal credential.
///
/// A denial written while this signs leaves no window: the scheduler installs a denial and
/// then sweeps the index, and this records the certificate and then re-reads the installed
/// signer, so either the sweep sees the certificate or this sees the denial.
// Eight plain inputs, each used once; a struct for them would only be unpacked again here.
#[allow(clippy::too_many_arguments)]
pub fn sign_svid(
    ca: &Ca,
    index: Option<&Arc<dyn IssuanceIndex>>,
    sweep: &SweepRequest,
    key: &SubjectKey,
    id: &SpiffeId,
    now: OffsetDateTime,
    ttl: Duration,
    for_node: bool,
) -> Result<(Arc<Signer>, Issued), IssueFailure> {
    let svid = Leaf {
        key,
        id,
        names: LeafNames::SPIFFE,
        for_node,
    };
    sign_leaf(ca, index, sweep, &svid, now, ttl)
}

/// What one workload leaf certifies: the key, the identity it is issued to (checked against
/// the deny list and recorded in the index), and the names it carries (derived from that
/// identity by the issue path).
#[derive(Debug, Clone, Copy)]
pub struct Leaf<'a> {
    /// The subject key, from the CSR.
    pub key: &'a SubjectKey,
    /// The authorized identity: deny list, index and audit go by it, whatever names it shows.
    pub id: &'a SpiffeId,
    /// The SANs: the SPIFFE ID, Linkerd's DNS-form name of the same identity, or both.
    pub names: LeafNames<'a>,
    /// Issued to a node proxy on the workload's behalf (`profile::NODE_ISSUED_OID`).
    pub for_node: bool,
}

/// [`sign_svid`] for any [`Leaf`]: the same deny check, index record and deny re-check.
pub fn sign_leaf(
    ca: &Ca,
    index: Option<&Arc<dyn IssuanceIndex>>,
    sweep: &SweepRequest,
    leaf: &Leaf<'_>,
    now: OffsetDateTime,
    ttl: Duration,
) -> Result<(Arc<Signer>, Issued), IssueFailure> {
    let Leaf {
        key,
        id,
        names,
        for_node,
    } = *leaf;
    let want = id.to_string();
    let signer = permitted(ca, &want)?;
    let issued = signer
        .issue_workload_named(key, id, names, now, ttl, for_node)
        .map_err(|e| match e {
            SignError::Expired(at) => IssueFailure::Expired(at),
            other => IssueFailure::Sign(other),
        })?;
    if let Some(index) = index {
        let entry = IssuedEntry {
            serial: issued.serial_hex.clone(),
            identity: want.clone(),
            not_after: issued.not_after.unix_timestamp(),
            issuer: signer.id().to_string(),
        };
        if let Err(e) = index.record(&entry) {
            tracing::error!(error = %e, serial = %issued.serial_hex, identity = %want, "could not record the certificate in the issuance index; refusing it");
            return Err(IssueFailure::Index);
        }
        if ca.current().is_some_and(|s| s.is_denied(&want)) {
            sweep.request();
            return Err(IssueFailure::Denied {
                identity: want,
                after_signing: true,
            });
        }
    }
    Ok((signer, issued))
}

/// What the audit line of one issued certificate says.
#[derive(Debug, Clone, Copy)]
pub struct AuditRecord<'a> {
    /// The certificate's serial, hex.
    pub serial_hex: &'a str,
    /// The SPIFFE ID it certifies.
    pub identity: &'a str,
    /// Who asked: the same as `identity`, or a node proxy (ztunnel) asking on a workload's
    /// behalf, or empty when no workload asked (Pod Certificates: the kubelet).
    pub caller: &'a str,
    /// Its notAfter.
    pub not_after: OffsetDateTime,
    /// The subject key's type.
    pub key_type: &'a str,
    /// How the requester was authenticated (`jwt`, `tokenreview`, `pod-certificate`, ...).
    pub auth: &'a str,
    /// The pod it is for, when known.
    pub pod: &'a str,
    /// The node that asked, when known (Pod Certificates: the kubelet's node).
    pub node: &'a str,
    /// The request object, when there is one (Pod Certificates: `<ns>/<name>`).
    pub request: &'a str,
    /// The remote cluster that vouched for the caller's token (`clusterid`); empty for the
    /// local cluster, so the same identity from two clusters can be told apart afterwards.
    pub cluster: &'a str,
}

/// Writes the one `citadel::audit` line for an issued certificate; false when the line could
/// not be written, and then the certificate must not be handed out (see [`crate::audit`]).
pub fn audit_issued(r: &AuditRecord<'_>) -> bool {
    crate::audit::begin();
    tracing::info!(
        target: "citadel::audit",
        event = "certificate_issued",
        serial = %r.serial_hex,
        identity = %r.identity,
        caller = r.caller,
        not_after = %r.not_after.format(&time::format_description::well_known::Rfc3339).unwrap_or_default(),
        key_type = %r.key_type,
        auth = %r.auth,
        pod = r.pod,
        node = r.node,
        request = r.request,
        cluster = r.cluster,
        "issued workload certificate"
    );
    !crate::audit::failed()
}
