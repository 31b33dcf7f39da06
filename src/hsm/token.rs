//! One PKCS#11 token: the loaded module, the login, a pool of sessions, and reconnection.
//!
//! Why a pool: a PKCS#11 session runs one operation at a time (cryptoki's `Session` is
//! `Send` but not `Sync`), while every tokio worker may be signing at once. The pool opens
//! sessions on demand up to a size set by the token's own limit (`ulMaxSessionCount`) and
//! `--pkcs11-max-sessions`; a signer that finds them all busy waits briefly, then reports the
//! key as unavailable rather than queueing without bound.
//!
//! Why reconnect: a network HSM restarts, a token is pulled and put back, a SoftHSM token
//! directory is restored. Its sessions, login and object handles are then gone. A call that
//! fails that way ([`HsmError::lost`]) drops the whole connection (finalising the module, so
//! the next `C_Initialize` sees the token afresh), connects again (load, find the token by
//! label, log in, look the key up by label) and retries once. Reconnects are rate-limited,
//! and a PIN the token refused is not offered again until the PIN source changes: real
//! tokens lock the user PIN after a few wrong tries.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::{Limit, Slot};

use super::{HsmError, Pkcs11Config, DEFAULT_MAX_SESSIONS};

/// How long a signer waits for a free session before the key counts as unavailable.
const BUSY_WAIT: Duration = Duration::from_secs(2);
/// The shortest gap between two reconnect attempts: a dead token is not hammered.
const RECONNECT_GAP: Duration = Duration::from_secs(1);

/// Counters and state of one token, for `/metrics`.
#[derive(Debug, Default)]
pub struct TokenStats {
    /// Signatures made.
    pub signatures: AtomicU64,
    /// Signatures refused because the token could not be reached (Unavailable).
    pub unavailable: AtomicU64,
    /// Signatures the token refused for good.
    pub failed: AtomicU64,
    /// Connections (re)built after the first.
    pub reconnects: AtomicU64,
    /// Whether the last operation reached the token.
    pub available: AtomicBool,
}

impl TokenStats {
    /// The Prometheus lines for these counters.
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write as _;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "# HELP citadel_ca_key_available 1 while the CA's PKCS#11 token answers (its last operation reached it), 0 while signatures are refused as unavailable.\n\
             # TYPE citadel_ca_key_available gauge\n\
             citadel_ca_key_available{{backend=\"pkcs11\"}} {}\n\
             # HELP citadel_ca_key_signatures_total Signatures asked of the CA's PKCS#11 token, by result: ok, unavailable (token unreachable, session lost, locked: retried by callers), failed (refused).\n\
             # TYPE citadel_ca_key_signatures_total counter\n\
             citadel_ca_key_signatures_total{{backend=\"pkcs11\",result=\"ok\"}} {}\n\
             citadel_ca_key_signatures_total{{backend=\"pkcs11\",result=\"unavailable\"}} {}\n\
             citadel_ca_key_signatures_total{{backend=\"pkcs11\",result=\"failed\"}} {}\n\
             # HELP citadel_ca_key_reconnects_total Connections to the PKCS#11 token rebuilt after a lost session, module restart or token removal.\n\
             # TYPE citadel_ca_key_reconnects_total counter\n\
             citadel_ca_key_reconnects_total{{backend=\"pkcs11\"}} {}",
            i32::from(self.available.load(Ordering::Relaxed)),
            l(&self.signatures),
            l(&self.unavailable),
            l(&self.failed),
            l(&self.reconnects),
        );
    }
}

/// The sessions of one connection not in use, and how many exist (in use or idle).
struct Pool {
    idle: Vec<Session>,
    open: usize,
}

/// One live connection: the module initialised, the token found, the user logged in.
struct Conn {
    ctx: Pkcs11,
    slot: Slot,
    generation: u64,
    max_sessions: usize,
    /// The session that logged in (the login lasts while any session is open) and that
    /// generates, finds and destroys objects.
    admin: Mutex<Session>,
    pool: Mutex<Pool>,
    freed: Condvar,
    /// Private-key handles by label; valid for this connection only.
    handles: Mutex<HashMap<String, ObjectHandle>>,
}

/// A PKCS#11 token holding CA keys. One per process and module: a reconnect finalises the
/// module for the whole process.
pub struct Token {
    config: Pkcs11Config,
    state: RwLock<Option<Conn>>,
    /// When the last reconnect was tried and how it failed, if it did.
    attempt: Mutex<Option<(Instant, Option<HsmError>)>>,
    /// A SHA-256 of the PIN the token refused: never offered again (see the module docs).
    refused_pin: Mutex<Option<Vec<u8>>>,
    generations: AtomicU64,
    stats: TokenStats,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("module", &self.config.module)
            .field("label", &self.config.token_label)
            .finish_non_exhaustive()
    }
}

fn guard<T>(r: std::sync::LockResult<T>) -> T {
    r.unwrap_or_else(|p| p.into_inner())
}

impl Token {
    /// Loads the module, finds the token by label and logs in. A missing module or token, or
    /// a refused PIN, is an error here, at start, rather than at the first signature.
    pub fn connect(config: Pkcs11Config) -> Result<Self, HsmError> {
        let token = Self {
            config,
            state: RwLock::new(None),
            attempt: Mutex::new(None),
            refused_pin: Mutex::new(None),
            generations: AtomicU64::new(0),
            stats: TokenStats::default(),
        };
        let conn = token.open_conn()?;
        *guard(token.state.write()) = Some(conn);
        token.stats.available.store(true, Ordering::Relaxed);
        Ok(token)
    }

    /// The token's label.
    pub fn label(&self) -> &str {
        &self.config.token_label
    }

    /// This token's counters.
    pub fn stats(&self) -> &TokenStats {
        &self.stats
    }

    /// The number of sessions the pool may open (after the first connection).
    pub fn max_sessions(&self) -> usize {
        guard(self.state.read())
            .as_ref()
            .map_or(0, |c| c.max_sessions)
    }

    /// Sessions open for signing right now (in use or idle).
    pub fn open_sessions(&self) -> usize {
        guard(self.state.read())
            .as_ref()
            .map_or(0, |c| guard(c.pool.lock()).open)
    }

    /// Signs `data` with the private key labelled `label`, on a pooled session; reconnects
    /// and retries once if the connection was lost.
    pub(crate) fn sign(
        &self,
        label: &str,
        mechanism: &Mechanism,
        data: &[u8],
    ) -> Result<Vec<u8>, HsmError> {
        let result =
            self.with_conn(|conn| conn.sign(&self.config.token_label, label, mechanism, data));
        let counter = match &result {
            Ok(_) => &self.stats.signatures,
            Err(e)
                if matches!(
                    crate::pki::KeyError::from(e.clone()),
                    crate::pki::KeyError::Unavailable(_)
                ) =>
            {
                &self.stats.unavailable
            }
            Err(_) => &self.stats.failed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        result
    }

    /// Runs `f` on the session that logged in (object management: generate, find, read,
    /// destroy), with the same reconnect-and-retry-once as [`Token::sign`].
    pub(crate) fn admin<T>(
        &self,
        f: impl Fn(&Session, &str) -> Result<T, HsmError>,
    ) -> Result<T, HsmError> {
        self.with_conn(|conn| {
            let session = guard(conn.admin.lock());
            f(&session, &self.config.token_label)
        })
    }

    /// Whether the token offers `mechanism` (checked at start for the key type in use).
    pub fn supports(
        &self,
        mechanism: cryptoki::mechanism::MechanismType,
    ) -> Result<bool, HsmError> {
        self.with_conn(|c| {
            c.ctx
                .get_mechanism_list(c.slot)
                .map(|l| l.contains(&mechanism))
                .map_err(|e| HsmError::call(&self.config.token_label, "list mechanisms", e))
        })
    }

    /// Forgets the cached handle of `label` (after destroying it).
    pub(crate) fn forget(&self, label: &str) {
        if let Some(c) = guard(self.state.read()).as_ref() {
            guard(c.handles.lock()).remove(label);
        }
    }

    fn with_conn<T>(&self, f: impl Fn(&Conn) -> Result<T, HsmError>) -> Result<T, HsmError> {
        let mut last = None;
        for _ in 0..2 {
            let seen = {
                let state = guard(self.state.read());
                match state.as_ref() {
                    Some(conn) => match f(conn) {
                        Ok(v) => {
                            self.stats.available.store(true, Ordering::Relaxed);
                            return Ok(v);
                        }
                        Err(e) if e.lost() => {
                            tracing::warn!(token = %self.config.token_label, error = %e, "lost the PKCS#11 token (or the key); reconnecting");
                            self.stats
                                .available
                                .store(!e.unreachable(), Ordering::Relaxed);
                            last = Some(e);
                            Some(conn.generation)
                        }
                        Err(e) => return Err(e),
                    },
                    None => None,
                }
            };
            if let Err(e) = self.reconnect(seen) {
                self.stats.available.store(false, Ordering::Relaxed);
                return Err(e);
            }
        }
        Err(last.unwrap_or_else(|| HsmError::Call {
            token: self.config.token_label.clone(),
            call: "reconnect",
            reason: "the connection was lost again at once".into(),
            lost: true,
        }))
    }

    /// Replaces the connection `seen` (or none) with a new one, unless another thread already
    /// did. At most one attempt per [`RECONNECT_GAP`]: within it, the last failure is
    /// answered again, and a connection made within it is kept (the error was not its fault).
    fn reconnect(&self, seen: Option<u64>) -> Result<(), HsmError> {
        let mut state = guard(self.state.write());
        match (state.as_ref(), seen) {
            (Some(c), Some(g)) if c.generation != g => return Ok(()),
            (Some(_), None) => return Ok(()),
            _ => {}
        }
        let mut attempt = guard(self.attempt.lock());
        if let Some((at, failed)) = attempt.as_ref() {
            if at.elapsed() < RECONNECT_GAP {
                match (failed, state.is_some()) {
                    (Some(e), _) => return Err(e.clone()),
                    (None, true) => return Ok(()),
                    (None, false) => {}
                }
            }
        }
        if let Some(old) = state.take() {
            let ctx = old.ctx.clone();
            drop(old);
            // The module forgets its sessions and token list; the next C_Initialize sees
            // the token as it is now (restored, re-inserted).
            let _ = ctx.finalize();
        }
        match self.open_conn() {
            Ok(conn) => {
                *attempt = Some((Instant::now(), None));
                *state = Some(conn);
                self.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                tracing::info!(token = %self.config.token_label, "reconnected to the PKCS#11 token");
                Ok(())
            }
            Err(e) => {
                *attempt = Some((Instant::now(), Some(e.clone())));
                Err(e)
            }
        }
    }

    fn open_conn(&self) -> Result<Conn, HsmError> {
        let module = self.config.module.display().to_string();
        let label = &self.config.token_label;
        let module_err = |reason: String| HsmError::Module {
            module: module.clone(),
            reason,
        };
        let pin = self.config.pin.read()?;
        let digest = ring::digest::digest(&ring::digest::SHA256, pin.expose().as_bytes())
            .as_ref()
            .to_vec();
        if guard(self.refused_pin.lock()).as_ref() == Some(&digest) {
            return Err(HsmError::Login {
                token: label.clone(),
                reason: "the token refused this PIN before; it is not offered again until the PIN source changes (tokens lock after repeated wrong PINs)".into(),
            });
        }
        let ctx = Pkcs11::new(&self.config.module).map_err(|e| module_err(e.to_string()))?;
        match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
            Err(e) => return Err(module_err(format!("C_Initialize: {e}"))),
        }
        let mut present = Vec::new();
        let mut found = None;
        for slot in ctx
            .get_slots_with_token()
            .map_err(|e| module_err(format!("C_GetSlotList: {e}")))?
        {
            let Ok(info) = ctx.get_token_info(slot) else {
                continue;
            };
            let l = info.label().trim().to_string();
            if &l == label {
                found = Some((slot, info));
                break;
            }
            if !l.is_empty() {
                present.push(l);
            }
        }
        let Some((slot, info)) = found else {
            let _ = ctx.finalize();
            return Err(HsmError::TokenNotFound {
                label: label.clone(),
                module,
                present: if present.is_empty() {
                    "none".into()
                } else {
                    present.join(", ")
                },
            });
        };
        let token_max = match info.max_session_count() {
            Limit::Max(n) => usize::try_from(n)
                .unwrap_or(usize::MAX)
                .saturating_sub(1)
                .max(1),
            Limit::Unavailable | Limit::Infinite => usize::MAX,
        };
        let max_sessions = self
            .config
            .max_sessions
            .unwrap_or(DEFAULT_MAX_SESSIONS)
            .min(token_max)
            .max(1);
        let admin = ctx
            .open_rw_session(slot)
            .map_err(|e| HsmError::call(label, "open session", e))?;
        match admin.login(UserType::User, Some(&pin.auth())) {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
            Err(CkError::Pkcs11(
                rv @ (RvError::PinIncorrect
                | RvError::PinLocked
                | RvError::PinExpired
                | RvError::PinInvalid
                | RvError::PinLenRange),
                _,
            )) => {
                *guard(self.refused_pin.lock()) = Some(digest);
                drop(admin);
                let _ = ctx.finalize();
                return Err(HsmError::Login {
                    token: label.clone(),
                    reason: format!("{rv:?}"),
                });
            }
            Err(e) => return Err(HsmError::call(label, "login", e)),
        }
        let generation = self.generations.fetch_add(1, Ordering::Relaxed);
        tracing::info!(token = %label, module = %module, max_sessions, "connected to the PKCS#11 token");
        Ok(Conn {
            ctx,
            slot,
            generation,
            max_sessions,
            admin: Mutex::new(admin),
            pool: Mutex::new(Pool {
                idle: Vec::new(),
                open: 0,
            }),
            freed: Condvar::new(),
            handles: Mutex::new(HashMap::new()),
        })
    }
}

impl Conn {
    fn sign(
        &self,
        token: &str,
        label: &str,
        mechanism: &Mechanism,
        data: &[u8],
    ) -> Result<Vec<u8>, HsmError> {
        let handle = self.private_key(token, label)?;
        let session = self.checkout(token)?;
        match session.sign(mechanism, handle, data) {
            Ok(sig) => {
                self.checkin(session);
                Ok(sig)
            }
            Err(e) => {
                let e = HsmError::call(token, "sign", e);
                if e.lost() {
                    self.discard(session);
                    guard(self.handles.lock()).remove(label);
                } else {
                    self.checkin(session);
                }
                Err(e)
            }
        }
    }

    /// The handle of the private key labelled `label`, found once per connection.
    fn private_key(&self, token: &str, label: &str) -> Result<ObjectHandle, HsmError> {
        if let Some(h) = guard(self.handles.lock()).get(label) {
            return Ok(*h);
        }
        let session = guard(self.admin.lock());
        let h = find_private_key(&session, token, label)?;
        guard(self.handles.lock()).insert(label.to_string(), h);
        Ok(h)
    }

    fn checkout(&self, token: &str) -> Result<Session, HsmError> {
        let start = Instant::now();
        let mut pool = guard(self.pool.lock());
        loop {
            if let Some(s) = pool.idle.pop() {
                return Ok(s);
            }
            if pool.open < self.max_sessions {
                pool.open += 1;
                drop(pool);
                return self.ctx.open_ro_session(self.slot).map_err(|e| {
                    guard(self.pool.lock()).open -= 1;
                    HsmError::call(token, "open session", e)
                });
            }
            let left = BUSY_WAIT.saturating_sub(start.elapsed());
            if left.is_zero() {
                return Err(HsmError::Busy {
                    token: token.to_string(),
                    sessions: self.max_sessions,
                    waited_ms: BUSY_WAIT.as_millis() as u64,
                });
            }
            pool = guard(self.freed.wait_timeout(pool, left)).0;
        }
    }

    fn checkin(&self, session: Session) {
        guard(self.pool.lock()).idle.push(session);
        self.freed.notify_one();
    }

    fn discard(&self, session: Session) {
        drop(session);
        guard(self.pool.lock()).open -= 1;
        self.freed.notify_one();
    }
}

/// The private key labelled `label`: exactly one, or an error naming it.
pub(crate) fn find_private_key(
    session: &Session,
    token: &str,
    label: &str,
) -> Result<ObjectHandle, HsmError> {
    find(session, token, label, ObjectClass::PRIVATE_KEY)?.ok_or_else(|| HsmError::KeyNotFound {
        token: token.to_string(),
        label: label.to_string(),
    })
}

/// The object of `class` labelled `label`, if there is one; two is an error (a label names one
/// key, or the journal could point at the wrong one).
pub(crate) fn find(
    session: &Session,
    token: &str,
    label: &str,
    class: ObjectClass,
) -> Result<Option<ObjectHandle>, HsmError> {
    let found = session
        .find_objects(&[
            Attribute::Class(class),
            Attribute::Label(label.as_bytes().to_vec()),
        ])
        .map_err(|e| HsmError::call(token, "find objects", e))?;
    match found.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(*one)),
        _ => Err(HsmError::Config(format!(
            "PKCS#11 token {token:?} holds {} objects of one class labelled {label:?}; a CA key label must be unique",
            found.len()
        ))),
    }
}
