//! SPIFFE IDs, trust domains and Kubernetes service-account usernames. What parses must print
//! back to exactly the input and parse again to the same value.
#![no_main]
use citadel::identity::{ServiceAccount, SpiffeId, TrustDomain};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Ok(id) = SpiffeId::parse(s) {
        assert_eq!(id.to_string(), s);
        assert_eq!(SpiffeId::parse(&id.to_string()).unwrap(), id);
        if let Some(sa) = id.service_account() {
            assert_eq!(id.trust_domain().service_account_id(&sa), id);
        }
    }
    if let Ok(td) = TrustDomain::new(s) {
        assert_eq!(TrustDomain::new(td.as_str()).unwrap(), td);
    }
    if let Ok(sa) = ServiceAccount::from_username(s) {
        let _ = format!("{sa:?}");
    }
    if let Some((ns, name)) = s.split_once('/') {
        let _ = ServiceAccount::new(ns, name);
    }
});
