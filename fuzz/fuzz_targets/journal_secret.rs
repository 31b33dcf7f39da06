//! The CA journal as the Kubernetes store keeps it: a Secret (JSON, as the API server returns
//! it) decoded by the real `KubeStore` decoding, then turned into a signer.
#![no_main]
use citadel::identity::TrustDomain;
use k8s_openapi::api::core::v1::Secret;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(secret) = serde_json::from_slice::<Secret>(data) else { return };
    let Ok(j) = citadel::store::kube::decode_journal_secret("istio-system", &secret) else {
        return;
    };
    let td = TrustDomain::new("cluster.local").unwrap();
    let _ = citadel::ca::bootstrap::signer_from_journal(&j.value, &td);
});
