//! The installed JWT-SVID state ([`JwtKeys`]): what the live CA holds beside its X.509
//! signer, swapped whole. Built from the journal by `ca::jwt` (`JwtKeys::from_journal`); kept
//! in its own file below both `ca::jwt` and the `Ca` that holds it.

use std::sync::Arc;
use std::time::Duration;

use crate::pki::cakey::CaKey;

/// The key that signs JWT-SVIDs now.
#[derive(Debug, Clone)]
pub struct JwtSigningKey {
    /// Its `kid`.
    pub kid: String,
    /// The key.
    pub key: Arc<dyn CaKey>,
}

/// The installed JWT state, swapped whole like the X.509 signer (`Ca::install_jwt`): the
/// active key (if any), the bundle as published, and the token lifetime.
#[derive(Debug, Clone)]
pub struct JwtKeys {
    /// The trust domain of the bundle.
    pub trust_domain: String,
    /// The signing key; `None` until the first key has been published (JWT-SVIDs are then
    /// Unavailable).
    pub active: Option<JwtSigningKey>,
    /// The JWK Set (`ca::jwt::render_jwks`).
    pub jwks: String,
    /// Its `spiffe_sequence`.
    pub sequence: u64,
    /// `exp - iat` of each JWT-SVID.
    pub svid_ttl: Duration,
}
