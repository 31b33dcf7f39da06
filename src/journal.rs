//! The journal of authorities: every root and intermediate citadel has made or loaded, with
//! its status. It is the CA's single source of truth and is written to the store *before* an
//! authority is used, so a crash never leaves a certificate signed by an unrecorded key.
//!
//! Only the stored shape and its queries live here, below both `ca` (which decides what to
//! write) and `store` (which persists it), so neither has to import the other's layer.

use serde::{Deserialize, Serialize};

/// Bumped when the on-disk shape changes incompatibly.
pub const FORMAT: u32 = 1;

/// The whole CA state as stored: authorities, rotation, revocations, denials and CRLs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Journal {
    /// Shape version of this record; [`FORMAT`] when written by this build.
    pub format: u32,
    /// The trust domain every authority here was issued for.
    pub trust_domain: String,
    /// Every root and intermediate made or loaded, in creation order; retired ones stay.
    pub authorities: Vec<AuthorityRecord>,
    /// A root rotation in progress, if any.
    #[serde(default)]
    pub root_rotation: Option<RootRotation>,
    /// Revoked certificates not yet expired (pruned after their notAfter).
    #[serde(default)]
    pub revocations: Vec<Revocation>,
    /// Identities that may get no new certificate, by token or by renewal.
    #[serde(default)]
    pub denied: Vec<DeniedIdentity>,
    /// The latest CRL signed by each authority.
    #[serde(default)]
    pub crls: Vec<CrlRecord>,
    /// The policy the server runs with, written by it at start (and by the
    /// CertificateAuthority reconciler): CLI commands such as `citadel ca rotate-root` read it
    /// here instead of asking the operator to repeat the server's flags. `None` in journals
    /// written before it existed.
    #[serde(default)]
    pub policy: Option<StoredPolicy>,
    /// The last `spec.rootRotation.request` of the CertificateAuthority resource that was
    /// acted on, recorded in the same write that prepares the rotation: a re-apply, a
    /// restart or a new leader never starts a second rotation for one request.
    #[serde(default)]
    pub root_rotation_request: Option<String>,
    /// The JWT-SVID signing keys, in creation order; retired ones stay as history (pruned by
    /// age). Empty in journals written before JWT-SVIDs existed: the planner then prepares
    /// the first key.
    #[serde(default)]
    pub jwt_keys: Vec<JwtKeyRecord>,
    /// The JWT bundle's `spiffe_sequence`: bumped whenever the set of keys in the bundle
    /// changes (a key prepared or retired), so relying parties can tell a newer bundle.
    #[serde(default)]
    pub jwt_bundle_sequence: u64,
    /// The roots' private keys are held offline (`citadel ca init --offline-root`): the
    /// journal holds their certificates only. The planner then never mints with a root; the
    /// next intermediate is requested ([`Journal::intermediate_request`]) and signed in a
    /// ceremony (`citadel ca sign-intermediate`). Absent (false) in other journals.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub offline_root: bool,
    /// With an offline root: the next intermediate's key (made here, in the token when one is
    /// configured) and its CSR, waiting for the root's signature. Journaled before the CSR is
    /// shown to anyone, so the key the signed certificate names is the one recorded here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intermediate_request: Option<IntermediateRequest>,
}

/// The next intermediate of an offline-root CA, before the root signed it: its key and the
/// CSR that `citadel ca intermediate-csr` prints. `citadel ca install-intermediate` turns it
/// into a prepared (or, for the first, active) intermediate once the signed certificate
/// names this very key.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct IntermediateRequest {
    /// Random hex, unique within the journal; the token key's label ends in it.
    pub id: String,
    /// The private key, PKCS#8 PEM; empty when the key is in a token ([`Self::key_ref`]).
    pub key_pem: Secret,
    /// Where the key lives when it is in a PKCS#11 token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_ref: Option<KeyRef>,
    /// The PKCS#10 request, PEM, self-signed with the key.
    pub csr_pem: String,
    /// When it was made (unix seconds).
    pub created_at: i64,
}

/// One JWT-SVID signing key and its lifecycle, the same stages as an intermediate: prepared
/// (written here, and so in the JWT bundle from the next publication), published (the
/// bundle holding it was written where relying parties read it), active (signs JWT-SVIDs),
/// retiring (no longer signs; stays in the bundle until the last token it signed expired),
/// retired (out of the bundle). A key is never used before it is in this journal, and never
/// signs before the bundle holding it was published.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct JwtKeyRecord {
    /// The JWS `kid`: random, unique within the journal.
    pub kid: String,
    /// Where it is in its lifecycle (prepared, active, retiring, retired).
    pub status: Status,
    /// The private key, PKCS#8 PEM; redacted in `Debug`.
    pub key_pem: Secret,
    /// When it was made (unix seconds); its age counts from here.
    pub created_at: i64,
    /// When the JWT bundle holding it was first published (unix seconds); activation waits
    /// from here.
    #[serde(default)]
    pub published_at: Option<i64>,
    /// When it started signing.
    #[serde(default)]
    pub activated_at: Option<i64>,
    /// When it stopped signing (active -> retiring).
    #[serde(default)]
    pub deactivated_at: Option<i64>,
    /// When it left the bundle.
    #[serde(default)]
    pub retired_at: Option<i64>,
    /// The end of its planned life (`created_at + --jwt-key-ttl`): its successor is prepared
    /// and activated at fractions of it.
    pub not_after: i64,
    /// An operator asked for it (`citadel ca rotate-jwt-key`): it takes over once its bundle
    /// has been published for the lead, whatever the active key's age.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub requested: bool,
}

impl JwtKeyRecord {
    /// The stage name for status output and logs: `prepared`, `published`, `active`,
    /// `retiring` or `retired`.
    pub fn stage(&self) -> &'static str {
        match (self.status, self.published_at) {
            (Status::Prepared, None) => "prepared",
            (Status::Prepared, Some(_)) => "published",
            (Status::Active, _) => "active",
            (Status::Retiring, _) => "retiring",
            (Status::Retired, _) => "retired",
        }
    }

    /// The fraction of its planned life elapsed at `now`.
    pub fn age_fraction(&self, now: i64) -> f64 {
        let life = (self.not_after - self.created_at).max(1) as f64;
        (now - self.created_at) as f64 / life
    }

    /// Whether the JWT bundle holds it: every key not retired.
    pub fn in_bundle(&self) -> bool {
        self.status != Status::Retired
    }
}

/// The server's effective workload and rotation policy, as stored with the state.
/// Durations are whole seconds; fractions are of a lifetime, in (0, 1).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StoredPolicy {
    /// TTL of a workload certificate whose request asks for none.
    pub default_ttl_secs: u64,
    /// The longest workload TTL (`--max-ttl`): how long an old chain's leaves can live.
    pub max_ttl_secs: u64,
    /// Validity of each new root.
    pub root_ttl_secs: u64,
    /// Validity of each new intermediate.
    pub intermediate_ttl_secs: u64,
    /// Fraction of the intermediate's life at which the next one is prepared.
    pub prepare_at: f64,
    /// ... and at which it takes over.
    pub activate_at: f64,
    /// Fraction of the root's life at which an automatic root rotation starts.
    pub root_rotate_at: f64,
    /// Propagation period between publishing a new root and signing with it.
    pub activate_after_secs: u64,
    /// Validity of each CRL.
    pub crl_validity_secs: u64,
    /// Clock skew tolerated by peers; retirements wait this much longer.
    pub skew_margin_secs: u64,
    /// Key type of new authorities (`ec-p256`, ...), as `--ca-key-type` spells it.
    pub key_type: String,
    /// Where the settings came from: `flags`, or `CertificateAuthority <ns>/<name>`.
    #[serde(default)]
    pub source: String,
    /// `--jwt-key-ttl`; 0 in policies stored before JWT-SVIDs (the default applies).
    #[serde(default)]
    pub jwt_key_ttl_secs: u64,
    /// `--jwt-svid-ttl`; 0 likewise.
    #[serde(default)]
    pub jwt_svid_ttl_secs: u64,
    /// `--jwt-bundle-refresh-hint`; 0 likewise.
    #[serde(default)]
    pub jwt_refresh_hint_secs: u64,
    /// `--crl-distribution-url`: CLI commands that mint an intermediate put it in too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crl_distribution_url: Option<String>,
}

// The fractions are validated finite numbers in (0, 1), never NaN.
impl Eq for StoredPolicy {}

/// A staged root rotation: prepared (new root published in the bundle, not yet signing),
/// then activated (new chain signs), then complete (old root leaves the bundle).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RootRotation {
    /// Id (serial) of the root being replaced.
    pub old_root: String,
    /// Id of the intermediate that signs under the old root until activation.
    pub old_intermediate: String,
    /// Id of the root that replaces it.
    pub new_root: String,
    /// Id of the intermediate under the new root that signs after activation.
    pub new_intermediate: String,
    /// `automatic` (scheduler) or `operator` (`citadel ca rotate-root`).
    pub trigger: String,
    /// When the new root and intermediate were written to the journal (unix seconds).
    pub prepared_at: i64,
    /// When the two-root bundle was first published; activation waits from here.
    pub bundle_published_at: Option<i64>,
    /// How long after `bundle_published_at` the new chain starts signing.
    pub activate_after_secs: u64,
    /// When the new chain started signing (unix seconds); `None` until then.
    pub activated_at: Option<i64>,
    /// How long after activation the cross-signed certificate is served, so stragglers that
    /// hold only the old bundle keep verifying new leaves.
    pub retire_after_secs: u64,
    /// When responses stopped carrying the cross-signed certificate.
    #[serde(default)]
    pub cross_withdrawn_at: Option<i64>,
    /// How long the old root stays in the bundle after that: the longest leaf whose chain
    /// may still lead with the cross-signed certificate.
    #[serde(default)]
    pub old_root_grace_secs: u64,
}

impl RootRotation {
    /// The stage name for status output and logs: `preparing`, `prepared`, `activated` or
    /// `retiring`.
    pub fn stage(&self) -> &'static str {
        match (
            self.cross_withdrawn_at,
            self.activated_at,
            self.bundle_published_at,
        ) {
            (Some(_), _, _) => "retiring",
            (None, Some(_), _) => "activated",
            (None, None, Some(_)) => "prepared",
            (None, None, None) => "preparing",
        }
    }

    /// When the next stage is due (unix seconds), if it can be known yet.
    pub fn next_due(&self) -> Option<i64> {
        match (self.cross_withdrawn_at, self.activated_at) {
            (Some(w), _) => Some(w + self.old_root_grace_secs as i64),
            (None, Some(at)) => Some(at + self.retire_after_secs as i64),
            (None, None) => self
                .bundle_published_at
                .map(|p| p + self.activate_after_secs as i64),
        }
    }
}

/// The `issuer` of a revoked serial that no replica's issuance index knows (a lost disk, a
/// serial from before the index existed): the CRL of every intermediate that could have
/// issued it lists it, yet the journal holds it once, not once per intermediate (each copy
/// cost a record, a CRL-record entry and a CRL entry, times every unexpired intermediate).
pub const ANY_INTERMEDIATE: &str = "*";

/// A revoked certificate, kept in the journal so its issuer's CRL lists it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Revocation {
    /// Serial, lowercase hex without leading zero octets.
    pub serial: String,
    /// The authority that issued the certificate, or [`ANY_INTERMEDIATE`].
    pub issuer: String,
    /// The certificate's SPIFFE ID, from the issuance-index entry it was revoked by.
    pub identity: Option<String>,
    /// The certificate's notAfter (unix seconds); the entry is pruned after it.
    pub not_after: i64,
    /// When it was revoked (unix seconds).
    pub revoked_at: i64,
    /// The CRL reason name, one of `ca::crl::REASONS`.
    pub reason: String,
}

impl Revocation {
    /// Whether the CRL of authority `a` lists this revocation: its issuer's, or for an
    /// [`ANY_INTERMEDIATE`] serial, that of every intermediate that existed and had not
    /// expired when it was revoked (a later one cannot have issued it).
    pub fn listed_by(&self, a: &AuthorityRecord) -> bool {
        if self.issuer == ANY_INTERMEDIATE {
            a.role == Role::Intermediate
                && a.created_at <= self.revoked_at
                && a.not_after > self.revoked_at
        } else {
            self.issuer == a.id
        }
    }
}

/// An identity refused new certificates (`citadel revoke --identity`, or a `Revocation`
/// resource).
///
/// It refuses the identity every new certificate for as long as it is in the journal, and
/// each replica's sweep puts that identity's certificates on the CRL. A denial written by the
/// Revocation controller names its resource and is lifted (removed) once no Revocation names
/// the identity any more; one written by `citadel revoke` on a state directory stays until
/// `citadel revoke --lift`. Any denial ends by itself once no certificate it covers can still
/// be valid (`ca::revocation::denial_ends_at`, from `since`, the longest leaf lifetime and
/// the skew margin). The certificates it revoked stay on the CRL either way, until they
/// expire: lifting a denial never un-revokes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeniedIdentity {
    /// The SPIFFE ID, as a URI string.
    pub identity: String,
    /// When the denial was written (unix seconds).
    pub since: i64,
    /// The CRL reason name, one of `ca::crl::REASONS`; also used for its certificates revoked by
    /// the sweep.
    pub reason: String,
    /// The Revocation resource (`<namespace>/<name>`) that holds it; `None` for a denial made
    /// on a state directory or written before denials could be lifted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revocation: Option<String>,
}

/// The latest CRL one authority signed, as published.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CrlRecord {
    /// Id of the authority that signed it.
    pub issuer: String,
    /// The CRL number extension: increases with every CRL of this issuer.
    pub number: u64,
    /// thisUpdate, unix seconds (backdated a minute for clock skew).
    pub this_update: i64,
    /// nextUpdate, unix seconds.
    pub next_update: i64,
    /// When it was signed (thisUpdate is backdated a minute for clock skew).
    #[serde(default)]
    pub signed_at: i64,
    /// Serials it lists, sorted: tells whether it is out of date.
    pub serials: Vec<String>,
    /// The CRL, PEM-encoded.
    pub pem: String,
}

/// Whether an authority is a root or an intermediate.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Self-signed root: in the trust bundle, signs intermediates.
    Root,
    /// Intermediate: signed by a root, signs workload certificates.
    Intermediate,
}

/// Lifecycle of an authority: prepared -> active -> retiring -> retired.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Written to the journal, but not signing yet.
    Prepared,
    /// Signing: the current intermediate, or the root that issues intermediates.
    Active,
    /// No longer signs, but still trusted while certificates it issued may be live.
    Retiring,
    /// Out of the trust bundle and no longer planned for; kept as history.
    Retired,
}

/// One root or intermediate: its certificate, key and lifecycle timestamps.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AuthorityRecord {
    /// The certificate serial, hex. Unique within the journal.
    pub id: String,
    /// Root or intermediate.
    pub role: Role,
    /// Where it is in its lifecycle.
    pub status: Status,
    /// The certificate, PEM-encoded.
    pub cert_pem: String,
    /// The private key, PEM-encoded; redacted in `Debug`.
    pub key_pem: Secret,
    /// The id of the authority that signed this one; `None` for a self-signed root.
    pub issuer: Option<String>,
    /// Unix seconds.
    pub created_at: i64,
    /// When it became active (unix seconds).
    pub activated_at: Option<i64>,
    /// When it became retired (unix seconds).
    pub retired_at: Option<i64>,
    /// When it stopped signing (active -> retiring).
    #[serde(default)]
    pub deactivated_at: Option<i64>,
    /// notAfter, unix seconds (also in the certificate; kept here for the planner).
    #[serde(default)]
    pub not_after: i64,
    /// notBefore, unix seconds (backdated for clock skew, so see `created_at` for ageing).
    #[serde(default)]
    pub not_before: i64,
    /// The same key and subject certified by the previous root, so workloads that still hold
    /// only the old bundle can verify leaves of the new chain during a root rotation.
    #[serde(default)]
    pub cross_cert_pem: Option<String>,
    /// Where the private key lives when it is not in `key_pem` (which is then empty): a key
    /// generated inside a PKCS#11 token, named by label. Absent for software keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_ref: Option<KeyRef>,
}

/// A CA private key held outside the journal: the journal records which key it is and its
/// public half, never the key (it cannot leave the token).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct KeyRef {
    /// The backend holding it: `pkcs11`.
    pub backend: String,
    /// The token's label (`CKA_LABEL` of the token, `--pkcs11-token-label` when generated).
    pub token: String,
    /// The key's `CKA_LABEL` (the private key and its public twin share it).
    pub label: String,
    /// The key's DER SubjectPublicKeyInfo, base64: checked against the token's public key
    /// and the certificate whenever the key is opened.
    pub public_key: String,
}

impl AuthorityRecord {
    /// The fraction of its lifetime elapsed at `now`, counted from when it was created:
    /// notBefore is backdated for clock skew, which would age short-lived CAs prematurely.
    pub fn age_fraction(&self, now: i64) -> f64 {
        let start = self.created_at.max(self.not_before);
        let life = (self.not_after - start).max(1) as f64;
        (now - start) as f64 / life
    }
}

/// A string that never prints: keys live in the journal but must not reach logs.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a key's PEM text.
    pub fn new(s: String) -> Self {
        Self(s)
    }
    /// The secret text; call only where the key is used or stored, never to log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl Journal {
    /// Refuses a journal whose layout this build does not know. A newer or foreign format is
    /// never guessed at: reading it wrong could sign with the wrong key or drop revocations,
    /// and writing it back would destroy what the newer citadel stored.
    pub fn check_format(&self) -> Result<(), String> {
        if self.format == FORMAT {
            Ok(())
        } else {
            Err(format!(
                "journal format {} is not one this citadel understands (it reads and writes \
                 format {FORMAT}); it was written by another version. Refusing to use or \
                 overwrite it: run the citadel that wrote it, or restore a backup",
                self.format
            ))
        }
    }

    /// An empty journal for `trust_domain`, in the current [`FORMAT`].
    pub fn new(trust_domain: &str) -> Self {
        Self {
            format: FORMAT,
            trust_domain: trust_domain.to_string(),
            authorities: Vec::new(),
            root_rotation: None,
            revocations: Vec::new(),
            denied: Vec::new(),
            crls: Vec::new(),
            policy: None,
            root_rotation_request: None,
            jwt_keys: Vec::new(),
            jwt_bundle_sequence: 0,
            offline_root: false,
            intermediate_request: None,
        }
    }

    /// The authority with this id, for changing it in place.
    pub fn get_mut(&mut self, id: &str) -> Option<&mut AuthorityRecord> {
        self.authorities.iter_mut().find(|a| a.id == id)
    }

    /// The first authority with this role and status.
    pub fn find(&self, role: Role, status: Status) -> Option<&AuthorityRecord> {
        self.authorities
            .iter()
            .find(|a| a.role == role && a.status == status)
    }

    /// The root that issues new intermediates.
    pub fn active_root(&self) -> Option<&AuthorityRecord> {
        self.find(Role::Root, Status::Active)
    }

    /// The JWT key that signs JWT-SVIDs now.
    pub fn active_jwt_key(&self) -> Option<&JwtKeyRecord> {
        self.jwt_keys.iter().find(|k| k.status == Status::Active)
    }

    /// The JWT key waiting to take over (prepared, published or not).
    pub fn next_jwt_key(&self) -> Option<&JwtKeyRecord> {
        self.jwt_keys.iter().find(|k| k.status == Status::Prepared)
    }

    /// The denial of this identity (a SPIFFE ID string), if any.
    pub fn is_denied(&self, identity: &str) -> Option<&DeniedIdentity> {
        self.denied.iter().find(|d| d.identity == identity)
    }

    /// The revocation of this serial (lowercase hex), if any.
    pub fn is_revoked(&self, serial: &str) -> Option<&Revocation> {
        self.revocations.iter().find(|r| r.serial == serial)
    }

    /// The revocations the CRL of authority `issuer` lists (see [`Revocation::listed_by`]).
    pub fn listed_by<'a>(&'a self, issuer: &str) -> impl Iterator<Item = &'a Revocation> + 'a {
        let authority = self.get(issuer);
        self.revocations
            .iter()
            .filter(move |r| authority.is_some_and(|a| r.listed_by(a)))
    }

    /// The authority with this id.
    pub fn get(&self, id: &str) -> Option<&AuthorityRecord> {
        self.authorities.iter().find(|a| a.id == id)
    }

    /// The active intermediate: the one that signs workloads.
    pub fn active_signer(&self) -> Option<&AuthorityRecord> {
        self.authorities
            .iter()
            .find(|a| a.role == Role::Intermediate && a.status == Status::Active)
    }

    /// Roots in the trust bundle: every root not yet retired, oldest first.
    pub fn trusted_roots(&self) -> impl Iterator<Item = &AuthorityRecord> {
        self.authorities
            .iter()
            .filter(|a| a.role == Role::Root && a.status != Status::Retired)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_do_not_print() {
        let s = Secret::new("-----BEGIN PRIVATE KEY-----abc".into());
        assert_eq!(format!("{s:?}"), "Secret(<redacted>)");
        let json = serde_json::to_string(&s).unwrap();
        assert!(
            json.contains("abc"),
            "serialized form keeps the key for the store"
        );
    }

    /// A journal written before the policy was stored still reads, with no policy.
    #[test]
    fn old_journals_read_without_a_policy() {
        let j: Journal =
            serde_json::from_str(r#"{"format":1,"trust_domain":"cluster.local","authorities":[]}"#)
                .unwrap();
        assert_eq!(j.policy, None);
        assert_eq!(j.root_rotation_request, None);
        assert!(j.jwt_keys.is_empty(), "journals from before JWT-SVIDs load");
        assert_eq!(j.jwt_bundle_sequence, 0);
    }

    #[test]
    fn jwt_keys_do_not_print() {
        let k = JwtKeyRecord {
            kid: "k1".into(),
            status: Status::Prepared,
            key_pem: Secret::new("-----BEGIN PRIVATE KEY-----xyz".into()),
            created_at: 0,
            published_at: None,
            activated_at: None,
            deactivated_at: None,
            retired_at: None,
            not_after: 10,
            requested: false,
        };
        assert!(!format!("{k:?}").contains("xyz"));
        assert_eq!(k.stage(), "prepared");
    }
}
