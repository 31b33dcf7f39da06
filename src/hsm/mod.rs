//! CA keys held in a PKCS#11 token (`--ca-key-source pkcs11`): the second implementation of
//! the key seam [`crate::pki::CaKey`].
//!
//! The private key is generated inside the token (`CKA_TOKEN`, `CKA_SENSITIVE`, not
//! `CKA_EXTRACTABLE`) and every signature is made there; citadel holds only the key's label
//! and its public half. [`Token`] owns the module (loaded with the `cryptoki` crate), the
//! login and a pool of sessions, and reconnects after the module or token went away;
//! [`Pkcs11Key`] is one key in it, signing for rcgen through the seam.
//!
//! Failures never panic and never fall back to a software key: a token that cannot be
//! reached at start is a start error ([`Token::connect`]); at run time a signature that
//! cannot be made is [`crate::pki::KeyError::Unavailable`] (the surfaces answer
//! "unavailable", a retry may pass once the token is back) and counted in [`TokenStats`].

mod error;
mod key;
pub mod softhsm;
#[cfg(test)]
mod softhsm_tests;
mod token;

pub use error::HsmError;
pub use key::{Pkcs11Key, MECHANISMS};
pub use token::{Token, TokenStats};

use std::fmt;
use std::path::PathBuf;

/// How to reach the token: what `--pkcs11-*` configure.
#[derive(Clone)]
pub struct Pkcs11Config {
    /// The PKCS#11 module (shared library), e.g. `/usr/lib/softhsm/libsofthsm2.so`.
    pub module: PathBuf,
    /// The token's label (`CKA_LABEL` of the token, as `softhsm2-util --init-token --label`).
    pub token_label: String,
    /// Where the user PIN is read from.
    pub pin: PinSource,
    /// The most sessions to keep open; `None`: as many as the token allows, at most
    /// [`DEFAULT_MAX_SESSIONS`].
    pub max_sessions: Option<usize>,
}

/// Sessions opened when neither the operator nor the token sets a lower bound: signing is one
/// call per session at a time, and a tokio runtime on a small machine has few workers.
pub const DEFAULT_MAX_SESSIONS: usize = 16;

impl fmt::Debug for Pkcs11Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkcs11Config")
            .field("module", &self.module)
            .field("token_label", &self.token_label)
            .field("pin", &self.pin)
            .field("max_sessions", &self.max_sessions)
            .finish()
    }
}

/// The token's user PIN: read from a file or an environment variable (never a flag value, which
/// `ps` would show), never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Pin(String);

impl Pin {
    /// A PIN from its text; surrounding whitespace (a file's trailing newline) is dropped.
    pub fn new(text: &str) -> Result<Self, HsmError> {
        let t = text.trim();
        if t.is_empty() {
            return Err(HsmError::Config("the PKCS#11 PIN is empty".into()));
        }
        Ok(Self(t.to_string()))
    }

    /// Reads the PIN from `path` (a mounted Secret, a 0600 file).
    pub fn from_file(path: &std::path::Path) -> Result<Self, HsmError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            HsmError::Config(format!(
                "cannot read the PKCS#11 PIN file {}: {e}",
                path.display()
            ))
        })?;
        Self::new(&text)
            .map_err(|e| HsmError::Config(format!("PKCS#11 PIN file {}: {e}", path.display())))
    }

    /// Reads the PIN from the environment variable `name`.
    pub fn from_env(name: &str) -> Result<Self, HsmError> {
        let text = std::env::var(name).map_err(|_| {
            HsmError::Config(format!(
                "the environment variable {name} (the PKCS#11 PIN) is not set"
            ))
        })?;
        Self::new(&text).map_err(|e| HsmError::Config(format!("PKCS#11 PIN from ${name}: {e}")))
    }

    /// The PIN's text; only for the login call and its refusal memory.
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }

    pub(crate) fn auth(&self) -> cryptoki::types::AuthPin {
        cryptoki::types::AuthPin::from(self.0.clone())
    }
}

impl fmt::Debug for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Pin(<redacted>)")
    }
}

/// Where the PIN comes from: read at every (re)connect, so a changed PIN file is picked up
/// without a restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PinSource {
    /// A file holding the PIN (`--pkcs11-pin-file`).
    File(std::path::PathBuf),
    /// An environment variable holding it (`--pkcs11-pin-env`).
    Env(String),
}

impl PinSource {
    /// The PIN as it is now.
    pub fn read(&self) -> Result<Pin, HsmError> {
        match self {
            PinSource::File(p) => Pin::from_file(p),
            PinSource::Env(v) => Pin::from_env(v),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pin_is_trimmed_refused_when_empty_and_never_printed() {
        let p = Pin::new("  1234\n").unwrap();
        assert_eq!(p, Pin::new("1234").unwrap());
        assert!(matches!(Pin::new(" \n"), Err(HsmError::Config(_))));
        let cfg = Pkcs11Config {
            module: "/m.so".into(),
            token_label: "t".into(),
            pin: PinSource::Env("CITADEL_PIN".into()),
            max_sessions: None,
        };
        let shown = format!("{cfg:?} {p:?}");
        assert!(!shown.contains("1234"), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
    }

    #[test]
    fn a_pin_comes_from_a_file_or_the_environment_and_errors_do_not_echo_it() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pin");
        std::fs::write(&f, "987654\n").unwrap();
        assert_eq!(Pin::from_file(&f).unwrap(), Pin::new("987654").unwrap());
        let missing = Pin::from_file(&dir.path().join("nope")).unwrap_err();
        assert!(missing.to_string().contains("nope"), "{missing}");
        let unset = Pin::from_env("CITADEL_TEST_PIN_THAT_IS_NOT_SET").unwrap_err();
        assert!(
            unset
                .to_string()
                .contains("CITADEL_TEST_PIN_THAT_IS_NOT_SET"),
            "{unset}"
        );
    }
}
