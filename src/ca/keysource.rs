//! Where CA keys live: generated for a new authority (in memory, or inside a PKCS#11 token),
//! found again for a journal record, and destroyed in the token once their authority retired.
//!
//! Why process-wide: the key source is configuration of the process, like rustls' default
//! crypto provider, and every path that mints or signs (the scheduler's apply, CRL signing
//! from the revocation controller and the CLI, the first start) reaches it through the one
//! function that already turned records into keys (`mint::ca_key_of`). Passing it through
//! each of those signatures would touch every caller for a value that never changes while
//! the process runs. `citadel serve` installs it once at start ([`install`]); without it
//! every key is a software key, as before, and a record whose key is in a token is refused
//! with a message naming the token rather than signed with anything else.

use std::sync::{Arc, RwLock};

use base64::Engine as _;

use super::CaError;
use crate::hsm::{Pkcs11Key, Token};
use crate::journal::{AuthorityRecord, Journal, KeyRef, Role, Secret, Status};
use crate::pki::{cakey, CaKey, KeyType, SoftwareKey};

/// Connects to the token (blocking: call from a blocking thread), checks it can generate and
/// sign with keys of type `kt`, and installs it as the key source. Every failure is a start
/// error that names the module, token or mechanism; the PIN never appears.
pub fn connect(
    config: crate::hsm::Pkcs11Config,
    label_prefix: String,
    roots_in_token: bool,
    kt: KeyType,
) -> Result<Arc<Token>, String> {
    let token =
        Arc::new(Token::connect(config).map_err(|e| format!("--ca-key-source pkcs11: {e}"))?);
    for (t, generate, sign) in crate::hsm::MECHANISMS {
        if t != kt {
            continue;
        }
        for m in [generate, sign] {
            if !token.supports(m).map_err(|e| e.to_string())? {
                return Err(format!(
                    "PKCS#11 token {:?} does not offer {m} (needed for --ca-key-type {kt})",
                    token.label()
                ));
            }
        }
    }
    install(Some(KeySource {
        token: token.clone(),
        label_prefix,
        roots_in_token,
    }));
    Ok(token)
}

/// The backend name a [`KeyRef`] carries for a PKCS#11 key.
pub const PKCS11: &str = "pkcs11";

/// A PKCS#11 token as the home of new CA keys.
#[derive(Debug)]
pub struct KeySource {
    /// The token, connected.
    pub token: Arc<Token>,
    /// Labels are `<prefix>-<role>-<authority id>` (`--pkcs11-key-label-prefix`).
    pub label_prefix: String,
    /// Whether new roots are generated in the token too (`--pkcs11-keys all`); otherwise
    /// only intermediates are, and roots stay software keys in the journal.
    pub roots_in_token: bool,
}

static SOURCE: RwLock<Option<Arc<KeySource>>> = RwLock::new(None);

/// Makes `source` where new keys are generated and token-held keys are found (`None`:
/// software keys only). Called once by `citadel serve` at start.
pub fn install(source: Option<KeySource>) {
    *SOURCE.write().unwrap_or_else(|p| p.into_inner()) = source.map(Arc::new);
}

/// The installed source, if any.
pub fn current() -> Option<Arc<KeySource>> {
    SOURCE.read().unwrap_or_else(|p| p.into_inner()).clone()
}

/// A fresh key for a new authority, and how its record stores it.
pub(crate) struct NewKey {
    /// The key, ready to sign.
    pub key: Arc<dyn CaKey>,
    /// The PKCS#8 PEM (software key) or empty, for the record's `key_pem`.
    pub key_pem: Secret,
    /// Where the key is held when not in `key_pem`.
    pub key_ref: Option<KeyRef>,
}

/// The label of the key of authority `id` with `role`.
pub fn label_for(prefix: &str, role: Role, id: &str) -> String {
    let role = match role {
        Role::Root => "root",
        Role::Intermediate => "intermediate",
    };
    format!("{prefix}-{role}-{id}")
}

/// Generates the key of a new authority `id` (hex serial) with `role`: inside the token when
/// one is installed (for roots only with `roots_in_token`), else in memory.
pub(crate) fn generate(role: Role, kt: KeyType, id: &str) -> Result<NewKey, CaError> {
    let source = current().filter(|s| role == Role::Intermediate || s.roots_in_token);
    let Some(source) = source else {
        let key = SoftwareKey::generate(kt)?;
        return Ok(NewKey {
            key_pem: Secret::new(key.pkcs8_pem()),
            key: key.shared(),
            key_ref: None,
        });
    };
    let label = label_for(&source.label_prefix, role, id);
    let serial = hex::decode(id).unwrap_or_default();
    let key = Pkcs11Key::generate(&source.token, kt, &label, &serial)
        .map_err(|e| CaError::Config(format!("new {role:?} key: {e}")))?;
    let key_ref = KeyRef {
        backend: PKCS11.into(),
        token: source.token.label().to_string(),
        label,
        public_key: base64::engine::general_purpose::STANDARD.encode(cakey::spki(&key)),
    };
    Ok(NewKey {
        key: key.shared(),
        key_pem: Secret::new(String::new()),
        key_ref: Some(key_ref),
    })
}

/// Destroys the token key of `key` (a new authority that will not be recorded: its
/// certificate could not be made) and hands `error` back.
pub(crate) fn discard(key: &NewKey, error: CaError) -> CaError {
    if let (Some(r), Some(source)) = (&key.key_ref, current()) {
        if let Err(e) = Pkcs11Key::destroy(&source.token, &r.label) {
            tracing::warn!(label = %r.label, error = %e, "could not destroy an unused CA key in the PKCS#11 token; delete it by hand (it signs nothing)");
        }
    }
    error
}

/// The signing key of a journal record: its PKCS#8 PEM, or the token key it names (checked
/// against the public key the record holds).
pub(crate) fn open(a: &AuthorityRecord) -> Result<Arc<dyn CaKey>, CaError> {
    let Some(r) = &a.key_ref else {
        return SoftwareKey::from_pem(a.key_pem.expose().as_bytes())
            .map(SoftwareKey::shared)
            .map_err(|e| CaError::Config(format!("authority {}: {e}", a.id)));
    };
    let token = token_for(a, r)?;
    let spki = base64::engine::general_purpose::STANDARD
        .decode(&r.public_key)
        .map_err(|_| {
            CaError::Config(format!(
                "authority {}: the recorded public key is not base64",
                a.id
            ))
        })?;
    Pkcs11Key::open(&token, &r.label, &spki)
        .map(Pkcs11Key::shared)
        .map_err(|e| CaError::Config(format!("authority {}: {e}", a.id)))
}

/// Refuses to mint for `j` in a process without the token its signing key lives in: a new
/// intermediate would silently be a software key (no fallback, ever). Run the change where
/// the token is configured (the server; with `--store kube`, the CertificateAuthority's
/// `spec.rootRotation.request`).
pub(crate) fn ensure_can_mint(j: &Journal) -> Result<(), CaError> {
    match j.active_signer() {
        Some(a) if !reachable(a) => Err(CaError::Config(format!(
            "the CA's signing key is held in PKCS#11 token {:?}; new keys must be made there: \
             run this in a process configured with --ca-key-source pkcs11 (the server: with \
             --store kube, set the CertificateAuthority's spec.rootRotation.request)",
            a.key_ref
                .as_ref()
                .map(|r| r.token.as_str())
                .unwrap_or_default()
        ))),
        _ => Ok(()),
    }
}

/// Whether this process can sign with `a`'s key: a software key, or one in the installed
/// token.
pub(crate) fn reachable(a: &AuthorityRecord) -> bool {
    match &a.key_ref {
        None => true,
        Some(r) => current().is_some_and(|s| r.backend == PKCS11 && s.token.label() == r.token),
    }
}

/// The installed token holding `r`, or an error that says what to configure.
fn token_for(a: &AuthorityRecord, r: &KeyRef) -> Result<Arc<Token>, CaError> {
    if r.backend != PKCS11 {
        return Err(CaError::Config(format!(
            "authority {}: its key is held by an unknown backend {:?}",
            a.id, r.backend
        )));
    }
    match current() {
        Some(s) if s.token.label() == r.token => Ok(s.token.clone()),
        Some(s) => Err(CaError::Config(format!(
            "authority {}: its key {:?} is in PKCS#11 token {:?}, but this process uses token {:?} (--pkcs11-token-label)",
            a.id, r.label, r.token, s.token.label()
        ))),
        None => Err(CaError::Config(format!(
            "authority {}: its key {:?} is held in PKCS#11 token {:?}; run with --ca-key-source pkcs11 --pkcs11-token-label {} (and the module and PIN flags)",
            a.id, r.label, r.token, r.token
        ))),
    }
}

/// After a journal write: `committed`, the token keys of authorities that retired in it are
/// destroyed (nothing signs with them any more); not committed (a lost compare-and-swap,
/// certain not to be stored), the token keys generated for it are destroyed, or each lost
/// race would leave a key behind. Failures are logged: a key left in the token is harmless,
/// and the next retirement of the same record is not retried, so it says which label.
pub fn settle(before: &Journal, after: &Journal, committed: bool) {
    let Some(source) = current() else {
        return;
    };
    let was = |id: &str| before.get(id);
    // An intermediate request (offline root) whose write was lost: its token key is an orphan.
    if let (false, Some(req)) = (committed, &after.intermediate_request) {
        let new = before
            .intermediate_request
            .as_ref()
            .is_none_or(|b| b.id != req.id);
        if let (true, Some(r)) = (new, &req.key_ref) {
            if r.token == source.token.label() {
                if let Err(e) = Pkcs11Key::destroy(&source.token, &r.label) {
                    tracing::warn!(label = %r.label, error = %e, "could not destroy an unused CA key in the PKCS#11 token; delete it by hand (it signs nothing)");
                }
            }
        }
    }
    for a in &after.authorities {
        let Some(r) = &a.key_ref else { continue };
        if r.token != source.token.label() {
            continue;
        }
        let drop_it = if committed {
            a.status == Status::Retired && was(&a.id).is_some_and(|b| b.status != Status::Retired)
        } else {
            // A new authority, unless it is the installed intermediate request (offline
            // root): that key is still the stored request's.
            let requested = before
                .intermediate_request
                .as_ref()
                .and_then(|q| q.key_ref.as_ref())
                .is_some_and(|q| q.label == r.label);
            was(&a.id).is_none() && !requested
        };
        if !drop_it {
            continue;
        }
        if let Err(e) = Pkcs11Key::destroy(&source.token, &r.label) {
            tracing::warn!(authority = %a.id, label = %r.label, error = %e, "could not destroy a CA key in the PKCS#11 token; delete it by hand (it signs nothing)");
        }
    }
}

/// Whether the token holding the active keys answers: `None` without a token; else
/// `(available, message)` for the CertificateAuthority's `KeyAvailable` condition.
pub fn health() -> Option<(bool, String)> {
    let s = current()?;
    let stats = s.token.stats();
    let up = stats.available.load(std::sync::atomic::Ordering::Relaxed);
    let msg = if up {
        format!("PKCS#11 token {:?} answers", s.token.label())
    } else {
        format!(
            "PKCS#11 token {:?} cannot be reached: signatures are refused as unavailable (citadel_ca_key_available, the log says why)",
            s.token.label()
        )
    };
    Some((up, msg))
}
