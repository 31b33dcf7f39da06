//! Pure X.509: key types, the CA key seam ([`CaKey`]), CSR parsing and verification,
//! certificate profiles, chain checks.
//!
//! Nothing here knows about gRPC, Kubernetes or files: functions take bytes and values and
//! return bytes and values, which keeps them easy to test and to fuzz.

pub mod cakey;
pub mod chain;
pub mod csr;
pub mod keys;
pub mod pem;
pub mod profile;
pub mod spiffe_bundle;

pub use cakey::{CaKey, KeyError, RcgenKey, SignatureAlgorithm, SoftwareKey};
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
    Generate(rcgen::Error),
    /// The CA key could not sign (see [`CaKey::sign`]); `Unavailable` may pass.
    #[error(transparent)]
    Key(#[from] KeyError),
}

impl From<rcgen::Error> for PkiError {
    /// rcgen reports a failed [`CaKey`] only as `RemoteKeyError`; the cause the adapter left
    /// on this thread ([`RcgenKey`]) becomes [`PkiError::Key`].
    fn from(e: rcgen::Error) -> Self {
        match e {
            rcgen::Error::RemoteKeyError => {
                PkiError::Key(cakey::take_key_error().unwrap_or_else(|| {
                    KeyError::Failed("the signing key reported an error".into())
                }))
            }
            other => PkiError::Generate(other),
        }
    }
}

impl PkiError {
    pub(crate) fn invalid(msg: impl Into<String>) -> Self {
        Self::Invalid(msg.into())
    }
}

/// Random bytes drawn per getrandom(2) call for serials: 256 serials' worth.
pub const SERIAL_POOL: usize = 256 * 16;

thread_local! {
    /// Per-thread pool of OS randomness for [`random_serial`], and how much of it is used.
    static SERIALS: std::cell::RefCell<(Box<[u8]>, usize)> =
        std::cell::RefCell::new((vec![0u8; SERIAL_POOL].into_boxed_slice(), SERIAL_POOL));
}

/// A random, positive 128-bit certificate serial (RFC 5280 allows up to 20 octets).
///
/// rcgen's default serial is a hash of the public key, so a renewal with the same key would
/// reuse a serial; that breaks revocation, hence always random.
///
/// The bytes come from the OS CSPRNG, [`SERIAL_POOL`] at a time: an strace of the server under
/// load showed one getrandom(2) per certificate for the serial (the other is the signature's
/// nonce, inside ring). Each byte goes to exactly one serial and is wiped from the pool when
/// handed out.
pub fn random_serial() -> [u8; 16] {
    try_random_serial().expect("the OS random source failed")
}

/// [`random_serial`], reporting a failed OS random source instead of panicking: what the
/// signing paths use, so even that surfaces as an error rather than a crash.
pub fn try_random_serial() -> Result<[u8; 16], PkiError> {
    use ring::rand::SecureRandom;
    let mut serial = [0u8; 16];
    SERIALS.with(|pool| {
        let mut pool = pool.borrow_mut();
        let (bytes, used) = &mut *pool;
        if *used + serial.len() > bytes.len() {
            ring::rand::SystemRandom::new()
                .fill(&mut bytes[..])
                .map_err(|_| PkiError::invalid("the OS random source failed"))?;
            *used = 0;
        }
        let taken = &mut bytes[*used..*used + serial.len()];
        serial.copy_from_slice(taken);
        taken.fill(0);
        *used += serial.len();
        Ok::<_, PkiError>(())
    })?;
    // A zero first octet would make the INTEGER shorter than 128 bits; force a set bit.
    serial[0] |= 0x01;
    Ok(serial)
}
