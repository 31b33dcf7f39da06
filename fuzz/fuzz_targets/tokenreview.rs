//! A TokenReview response as the API server returns it (JSON), decoded as kube does and
//! interpreted by the real `tokenreview::caller_from_review`: only an authenticated service
//! account confirmed for one of our audiences becomes a caller.
#![no_main]
use citadel::auth::tokenreview::caller_from_review;
use citadel::identity::TrustDomain;
use k8s_openapi::api::authentication::v1::TokenReview;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(review) = serde_json::from_slice::<TokenReview>(data) else { return };
    let status = review.status.unwrap_or_default();
    let authenticated = status.authenticated == Some(true);
    let td = TrustDomain::new("cluster.local").unwrap();
    if let Ok(caller) = caller_from_review(status, &["istio-ca".to_string()], &td) {
        assert!(authenticated, "only an authenticated review yields a caller");
        let id = caller.identity.to_string();
        assert!(id.starts_with("spiffe://cluster.local/ns/"), "{id}");
    }
});
