//! A SPIFFE bundle document as another trust domain's bundle endpoint serves it (remote,
//! untrusted bytes: `--federate-with`). A document that parses must render and parse back to
//! the same bundle, because the rendering is what is persisted and handed to agents: a
//! bundle that did not survive the round trip would be lost at the next restart.
#![no_main]
use std::sync::OnceLock;

use citadel::identity::TrustDomain;
use citadel::pki::spiffe_bundle;
use libfuzzer_sys::fuzz_target;

fn td() -> &'static TrustDomain {
    static TD: OnceLock<TrustDomain> = OnceLock::new();
    TD.get_or_init(|| TrustDomain::new("cluster.local").unwrap())
}

fuzz_target!(|data: &[u8]| {
    let Ok(bundle) = spiffe_bundle::parse(td(), data) else { return };
    let _ = (bundle.x509_pem(), bundle.jwt_jwks(), bundle.poll_interval());
    let again = spiffe_bundle::parse(td(), bundle.to_json().as_bytes())
        .expect("a parsed bundle's rendering parses");
    assert_eq!(again, bundle, "a parsed bundle survives the round trip");
});
