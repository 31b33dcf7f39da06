//! Istio's plugged-in CA files (the `cacerts` Secret or /etc/cacerts), including the CRL we
//! read from it: the bytes of ca-cert.pem, ca-key.pem, root-cert.pem, cert-chain.pem and
//! ca-crl.pem, separated by a line `=====`. Loading goes through the real `plugged::load_from`.
#![no_main]
use std::collections::BTreeMap;

use citadel::ca::plugged::{load_from, MapSource};
use citadel::identity::TrustDomain;
use libfuzzer_sys::fuzz_target;

const FILES: [&str; 5] = [
    "ca-cert.pem",
    "ca-key.pem",
    "root-cert.pem",
    "cert-chain.pem",
    "ca-crl.pem",
];

fuzz_target!(|data: &[u8]| {
    let mut files = BTreeMap::new();
    let mut rest = data;
    for name in FILES {
        let (part, next) = match find(rest, b"\n=====\n") {
            Some(i) => (&rest[..i], &rest[i + 7..]),
            None => (rest, &[][..]),
        };
        if !part.is_empty() {
            files.insert(name.to_string(), part.to_vec());
        }
        rest = next;
    }
    let src = MapSource { label: "fuzz".into(), files };
    let td = TrustDomain::new("cluster.local").unwrap();
    let _ = load_from(&src, &td, citadel::clock::system().now());
});

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}
