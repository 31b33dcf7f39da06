//! A JWKS document as the API server's /openid/v1/jwks (or a file) serves it; then a valid
//! dev token checked against whatever keys it yielded.
#![no_main]
use std::sync::OnceLock;

use citadel::auth::jwks::Jwks;
use citadel::auth::jws;
use libfuzzer_sys::fuzz_target;

fn token() -> &'static String {
    static T: OnceLock<String> = OnceLock::new();
    T.get_or_init(|| {
        citadel::devkeys::signing_key().sign(&serde_json::json!({
            "iss": citadel::devkeys::DEV_ISSUER, "aud": ["istio-ca"],
            "sub": "system:serviceaccount:shop:cart", "exp": 4_000_000_000i64
        }))
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(keys) = Jwks::from_json(data) else { return };
    let _ = (keys.len(), keys.is_empty());
    let parsed = jws::parse(token()).unwrap();
    let _ = keys.verify(&parsed);
});
