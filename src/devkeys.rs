//! The development JWT key in `certs-dev/`. DEV ONLY: the private key is public.
//!
//! Compiled in, so `citadel serve --dev` and `citadel dev-token` work from any directory.
//! `certs-dev/README.md` says how the key was made; the JWKS is derived from it.

use crate::auth::jws::SigningKey;

/// The dev RSA private key, PKCS#8 PEM, compiled in from `certs-dev/jwt-signing-key.pem`.
pub const DEV_JWT_KEY_PEM: &str = include_str!("../certs-dev/jwt-signing-key.pem");

/// The issuer dev tokens carry and `serve --dev` requires.
pub const DEV_ISSUER: &str = "https://citadel.dev.invalid";

/// The dev key, ready to sign dev tokens.
pub fn signing_key() -> SigningKey {
    SigningKey::from_pkcs8_pem(DEV_JWT_KEY_PEM)
        .expect("certs-dev/jwt-signing-key.pem is a valid RSA PKCS#8 key")
}

/// The JWKS that verifies dev tokens, as `certs-dev/jwks.json` holds it.
pub fn jwks_json() -> String {
    let set = serde_json::json!({ "keys": [signing_key().public_jwk()] });
    serde_json::to_string_pretty(&set).expect("JSON") + "\n"
}

#[cfg(test)]
mod tests {
    #[test]
    fn checked_in_jwks_matches_the_key() {
        let file = include_str!("../certs-dev/jwks.json");
        assert_eq!(
            file,
            super::jwks_json(),
            "regenerate with: citadel dev-token --print-jwks > certs-dev/jwks.json"
        );
    }
}
