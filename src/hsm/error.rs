//! What can go wrong with a token, and which of it a retry (after a reconnect) may cure.

use cryptoki::error::{Error as CkError, RvError};

use crate::pki::KeyError;

/// A token problem. Messages name the module, token and key label, never the PIN or key
/// material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HsmError {
    /// A setting is missing or wrong (PIN source, key type, flags).
    #[error("{0}")]
    Config(String),
    /// The module could not be loaded or initialised.
    #[error("PKCS#11 module {module}: {reason}")]
    Module {
        /// The module's path.
        module: String,
        /// Why.
        reason: String,
    },
    /// No slot holds a token with the configured label (removed, not initialised, renamed).
    #[error("no PKCS#11 token labelled {label:?} in module {module} (tokens present: {present})")]
    TokenNotFound {
        /// The label looked for.
        label: String,
        /// The module's path.
        module: String,
        /// The labels that are there, comma-separated, or `none`.
        present: String,
    },
    /// The login was refused: wrong PIN, PIN locked.
    #[error("login to PKCS#11 token {token:?} refused: {reason}")]
    Login {
        /// The token's label.
        token: String,
        /// The module's reason (never the PIN).
        reason: String,
    },
    /// The token holds no private key with this label.
    #[error("PKCS#11 token {token:?} holds no private key labelled {label:?}")]
    KeyNotFound {
        /// The token's label.
        token: String,
        /// The key's label.
        label: String,
    },
    /// The key in the token is not the one the journal and certificate name.
    #[error("the PKCS#11 key {label:?} in token {token:?} does not match the public key the CA journal records for it")]
    KeyMismatch {
        /// The token's label.
        token: String,
        /// The key's label.
        label: String,
    },
    /// A PKCS#11 call failed. `lost`: the session, login or token went away, so the
    /// connection is rebuilt and the call may pass on a retry.
    #[error("PKCS#11 token {token:?}: {call} failed: {reason}")]
    Call {
        /// The token's label.
        token: String,
        /// What was being done (`sign`, `open session`, ...).
        call: &'static str,
        /// The module's error.
        reason: String,
        /// Whether the connection is gone (see [`lost`]).
        lost: bool,
    },
    /// Every session is busy and none freed up in time.
    #[error("PKCS#11 token {token:?}: all {sessions} sessions stayed busy for {waited_ms} ms")]
    Busy {
        /// The token's label.
        token: String,
        /// The pool's size.
        sessions: usize,
        /// How long the signer waited.
        waited_ms: u64,
    },
}

impl HsmError {
    /// A failed call on `token`, classified.
    pub(crate) fn call(token: &str, call: &'static str, e: CkError) -> Self {
        HsmError::Call {
            token: token.to_string(),
            call,
            lost: lost(&e),
            reason: describe(&e),
        }
    }

    /// Whether the connection must be rebuilt before another try.
    pub fn lost(&self) -> bool {
        match self {
            HsmError::Call { lost, .. } => *lost,
            // A key that vanished (token re-created or restored) is looked up again on a
            // fresh connection; a token that disappeared likewise.
            HsmError::KeyNotFound { .. } | HsmError::TokenNotFound { .. } => true,
            HsmError::Module { .. } | HsmError::Login { .. } => true,
            HsmError::Config(_) | HsmError::KeyMismatch { .. } | HsmError::Busy { .. } => false,
        }
    }
}

impl HsmError {
    /// Whether the token itself could not be reached (rather than a key missing in a token
    /// that answers): what `citadel_ca_key_available` reports.
    pub fn unreachable(&self) -> bool {
        match self {
            HsmError::Call { lost, .. } => *lost,
            HsmError::Module { .. } | HsmError::TokenNotFound { .. } | HsmError::Login { .. } => {
                true
            }
            HsmError::Config(_)
            | HsmError::KeyNotFound { .. }
            | HsmError::KeyMismatch { .. }
            | HsmError::Busy { .. } => false,
        }
    }
}

impl From<HsmError> for KeyError {
    /// Whatever a retry may cure (the token coming back, a session freeing up, the operator
    /// fixing the PIN) is `Unavailable`; a key that is not ours or a mechanism the token
    /// refuses is `Failed`.
    fn from(e: HsmError) -> Self {
        let unavailable = match &e {
            HsmError::Call { lost, .. } => *lost,
            HsmError::Busy { .. }
            | HsmError::Module { .. }
            | HsmError::TokenNotFound { .. }
            | HsmError::Login { .. }
            | HsmError::KeyNotFound { .. } => true,
            HsmError::Config(_) | HsmError::KeyMismatch { .. } => false,
        };
        if unavailable {
            KeyError::Unavailable(e.to_string())
        } else {
            KeyError::Failed(e.to_string())
        }
    }
}

/// Whether `e` means the session, the login or the token is gone (so a fresh connection may
/// succeed), rather than this one operation being refused.
pub(crate) fn lost(e: &CkError) -> bool {
    match e {
        CkError::Pkcs11(rv, _) => matches!(
            rv,
            RvError::SessionHandleInvalid
                | RvError::SessionClosed
                | RvError::SessionCount
                | RvError::DeviceRemoved
                | RvError::DeviceError
                | RvError::DeviceMemory
                | RvError::TokenNotPresent
                | RvError::TokenNotRecognized
                | RvError::SlotIdInvalid
                | RvError::CryptokiNotInitialized
                | RvError::UserNotLoggedIn
                | RvError::PinIncorrect
                | RvError::PinLocked
                | RvError::PinExpired
                | RvError::KeyHandleInvalid
                | RvError::ObjectHandleInvalid
                | RvError::GeneralError
                | RvError::FunctionFailed
        ),
        CkError::LibraryLoading(_) | CkError::NullFunctionPointer | CkError::MissingSymbol(_) => {
            true
        }
        _ => false,
    }
}

/// The module's error as a short phrase: the CKR_ name (cryptoki's long texts quote the
/// specification at length).
fn describe(e: &CkError) -> String {
    match e {
        CkError::Pkcs11(rv, f) => format!("{f}: CKR_{}", screaming(&format!("{rv:?}"))),
        other => other.to_string(),
    }
}

/// `SessionHandleInvalid` -> `SESSION_HANDLE_INVALID`.
fn screaming(camel: &str) -> String {
    let mut out = String::with_capacity(camel.len() + 8);
    for (i, c) in camel.chars().enumerate() {
        if c.is_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use cryptoki::context::Function;

    #[test]
    fn a_lost_session_or_token_is_unavailable_and_a_refusal_is_failed() {
        let gone = HsmError::call(
            "ca",
            "sign",
            CkError::Pkcs11(RvError::DeviceRemoved, Function::Sign),
        );
        assert!(gone.lost());
        assert!(gone.to_string().contains("CKR_DEVICE_REMOVED"), "{gone}");
        assert!(matches!(KeyError::from(gone), KeyError::Unavailable(_)));

        let refused = HsmError::call(
            "ca",
            "sign",
            CkError::Pkcs11(RvError::KeyFunctionNotPermitted, Function::SignInit),
        );
        assert!(!refused.lost());
        assert!(matches!(KeyError::from(refused), KeyError::Failed(_)));

        let mismatch = HsmError::KeyMismatch {
            token: "ca".into(),
            label: "k".into(),
        };
        assert!(matches!(KeyError::from(mismatch), KeyError::Failed(_)));
        let login = HsmError::Login {
            token: "ca".into(),
            reason: "CKR_PIN_INCORRECT".into(),
        };
        assert!(matches!(KeyError::from(login), KeyError::Unavailable(_)));
    }
}
