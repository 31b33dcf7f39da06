//! A CSR as a workload sends it (PEM in IstioCertificateRequest.csr, DER from the Linkerd and
//! Pod Certificate paths). Whatever parses must verify, and the certificate the CA then signs
//! names exactly the caller's identity: never a SAN or CN the CSR chose.
#![no_main]
use std::sync::OnceLock;

use citadel::ca::signer::Signer;
use citadel::identity::{SpiffeId, TrustDomain};
use citadel::pki::csr;
use libfuzzer_sys::fuzz_target;

fn signer() -> &'static (Signer, SpiffeId) {
    static S: OnceLock<(Signer, SpiffeId)> = OnceLock::new();
    S.get_or_init(|| {
        let td = TrustDomain::new("cluster.local").unwrap();
        let opts = citadel::ca::bootstrap::CaOptions::new(td.clone());
        let j = citadel::ca::bootstrap::new_journal(&opts, citadel::clock::system().now()).unwrap();
        let s = citadel::ca::bootstrap::signer_from_journal(&j, &td).unwrap();
        (s, SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/cart").unwrap())
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, body)) = data.split_first() else { return };
    let parsed = if mode & 1 == 0 { csr::parse_pem(body) } else { csr::parse_der(body) };
    let Ok(csr) = parsed else { return };
    let _ = (csr.key.kind(), csr.key.spki_der().len());
    let (signer, me) = signer();
    let now = citadel::clock::system().now();
    let Ok(issued) = signer.issue_workload(&csr.key, me, now, std::time::Duration::from_secs(3600))
    else {
        return;
    };
    let info = citadel::pki::chain::describe(&issued.der).expect("we parse what we sign");
    assert_eq!(info.uri_sans, vec![me.to_string()], "the leaf names only the caller");
    assert!(info.subject.is_empty(), "no subject (so no CN) from a CSR: {}", info.subject);
});
