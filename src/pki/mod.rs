//! Pure X.509: key types, CSR parsing and verification, certificate profiles, chain checks.
//!
//! Nothing here knows about gRPC, Kubernetes or files: functions take bytes and values and
//! return bytes and values, which keeps them easy to test and to fuzz.

pub mod chain;
pub mod csr;
pub mod keys;
pub mod pem;
pub mod profile;

pub use keys::{KeyType, PublicKeyKind};

/// Errors from the pure PKI layer. Messages name the problem and never include key material.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// A certificate, CSR or chain is malformed or breaks a rule; the text says which.
    #[error("{0}")]
    Invalid(String),
    /// A key of a type or size citadel does not accept.
    #[error("unsupported key: {0}")]
    UnsupportedKey(String),
    /// rcgen could not build or sign a certificate.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
}

impl PkiError {
    pub(crate) fn invalid(msg: impl Into<String>) -> Self {
        Self::Invalid(msg.into())
    }
}

/// A random, positive 128-bit certificate serial (RFC 5280 allows up to 20 octets).
///
/// rcgen's default serial is a hash of the public key, so a renewal with the same key would
/// reuse a serial; that breaks revocation, hence always random.
pub fn random_serial() -> [u8; 16] {
    use ring::rand::SecureRandom;
    let mut serial = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut serial)
        .expect("the OS random source failed");
    // A zero first octet would make the INTEGER shorter than 128 bits; force a set bit.
    serial[0] |= 0x01;
    serial
}
