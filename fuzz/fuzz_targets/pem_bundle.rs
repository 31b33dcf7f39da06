//! A PEM bundle (root-cert.pem, a trust bundle ConfigMap, a cert chain): every certificate
//! it yields is described without panicking, and chain checks between neighbours run.
#![no_main]
use citadel::pki::{chain, pem};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(certs) = pem::parse_certs(data) else { return };
    for c in &certs {
        let _ = chain::describe(c);
    }
    for w in certs.windows(2) {
        let _ = chain::check_issued_by(&w[0], &w[1]);
    }
});
