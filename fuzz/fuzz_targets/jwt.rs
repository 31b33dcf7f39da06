//! A bearer token (JWS compact form) as any caller sends it: parsed, its signature checked
//! against the dev JWKS, its claims checked, and the TokenReview pre-filter's view of it.
#![no_main]
use std::sync::OnceLock;

use citadel::auth::jwks::Jwks;
use citadel::auth::jwt::{self, JwtPolicy, DEFAULT_LEEWAY};
use citadel::auth::jws;
use libfuzzer_sys::fuzz_target;

fn keys() -> &'static Jwks {
    static K: OnceLock<Jwks> = OnceLock::new();
    K.get_or_init(|| Jwks::from_json(citadel::devkeys::jwks_json().as_bytes()).unwrap())
}

fuzz_target!(|data: &[u8]| {
    let Ok(token) = std::str::from_utf8(data) else { return };
    let policy = JwtPolicy {
        issuer: Some(citadel::devkeys::DEV_ISSUER.into()),
        audiences: vec!["istio-ca".into()],
        leeway: DEFAULT_LEEWAY,
    };
    let now = citadel::clock::system().now().unix_timestamp();
    let _ = jws::unverified_claims(token);
    if let Ok(parsed) = jws::parse(token) {
        let _ = jwt::check_claims(&parsed.payload, &policy, now);
    }
    if let Ok(id) = jwt::verify(token, keys(), &policy, now) {
        // Only the dev key signs; a token it verifies names a service account.
        let _ = format!("{id:?}");
    }
});
