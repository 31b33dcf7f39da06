//! Properties over generated input (proptest, stable Rust): what a fuzzer does not check.
//! - Durations and SPIFFE IDs print back to what was parsed, and parsing never panics.
//! - No CSR the CA accepts ever yields a certificate naming anyone but the caller, whatever
//!   SANs and subject the CSR asks for: through the real CreateCertificate handler.

use citadel::identity::SpiffeId;
use citadel::pki::KeyType;
use proptest::prelude::*;

use crate::support::*;

fn segment() -> impl Strategy<Value = String> {
    "[A-Za-z0-9._-]{1,12}".prop_filter("not . or ..", |s| s != "." && s != "..")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn durations_round_trip(ms in 0u64..(100 * 365 * 86_400_000)) {
        let d = std::time::Duration::from_millis(ms);
        let text = citadel::duration::format(d);
        prop_assert_eq!(citadel::duration::parse(&text).unwrap(), d, "{}", text);
    }

    #[test]
    fn duration_parsing_never_panics_and_what_parses_round_trips(s in "\\PC{0,24}") {
        if let Ok(d) = citadel::duration::parse(&s) {
            let text = citadel::duration::format(d);
            prop_assert_eq!(citadel::duration::parse(&text).unwrap(), d);
        }
    }

    #[test]
    fn spiffe_ids_round_trip(td in "[a-z0-9._-]{1,30}", segs in prop::collection::vec(segment(), 0..5)) {
        let text = format!("spiffe://{td}{}", segs.iter().map(|s| format!("/{s}")).collect::<String>());
        let id = SpiffeId::parse(&text).unwrap();
        prop_assert_eq!(id.to_string(), text.clone());
        prop_assert_eq!(SpiffeId::parse(&id.to_string()).unwrap(), id);
    }

    #[test]
    fn spiffe_parsing_never_panics_and_what_parses_prints_back(s in "(spiffe://)?\\PC{0,40}") {
        if let Ok(id) = SpiffeId::parse(&s) {
            prop_assert_eq!(id.to_string(), s);
        }
    }
}

/// What a CSR may ask for: URI SANs (the caller's own ID, someone else's, junk), DNS SANs,
/// and a subject CN.
#[derive(Debug, Clone)]
struct Ask {
    uris: Vec<String>,
    dns: Vec<String>,
    cn: Option<String>,
}

fn ask() -> impl Strategy<Value = Ask> {
    let uri = prop_oneof![
        Just("spiffe://cluster.local/ns/shop/sa/cart".to_string()),
        Just("spiffe://cluster.local/ns/prod/sa/payments".to_string()),
        Just("spiffe://other.domain/ns/shop/sa/cart".to_string()),
        Just("spiffe://CLUSTER.local/ns/shop/sa/cart".to_string()),
        Just("spiffe://cluster.local/ns/shop/sa/cart/".to_string()),
        "[a-z]{1,8}://[a-z.]{1,12}/[a-z/]{0,12}",
    ];
    let dns = "[a-z*]{1,6}(\\.[a-z]{1,6}){0,3}";
    (
        prop::collection::vec(uri, 0..3),
        prop::collection::vec(dns, 0..2),
        prop::option::of("[ -~]{1,40}"),
    )
        .prop_map(|(uris, dns, cn)| Ask { uris, dns, cn })
}

#[test]
fn no_accepted_csr_names_anyone_but_the_caller() {
    use citadel::proto::istio_certificate_service_server::IstioCertificateService;
    use x509_parser::extensions::GeneralName;
    use x509_parser::prelude::*;
    citadel::install_crypto_provider();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ca = citadel::ca::Ca::new();
    let journal = citadel::ca::bootstrap::new_journal(
        &citadel::ca::bootstrap::CaOptions::new(td()),
        ::time::OffsetDateTime::now_utc(),
    )
    .unwrap();
    ca.install(citadel::ca::bootstrap::signer_from_journal(&journal, &td()).unwrap());
    let server = dev_server(ca.clone(), None);
    let service = citadel::server::istio::IstioService {
        port: std::sync::Arc::new(citadel::server::port::CaPort {
            issue: std::sync::Arc::new(citadel::auth::issue_path::IssuePath {
                ca,
                index: None,
                sweep: Default::default(),
                clock: server.clock,
                ttl: server.ttl,
                node_auth: None,
            }),
            auth: server.auth,
            metrics: server.metrics,
            inflight: std::sync::Arc::new(tokio::sync::Semaphore::new(8)),
            throttle: std::sync::Arc::new(citadel::server::throttle::AuthThrottle::new(
                Default::default(),
                Default::default(),
            )),
            linkerd: None,
            federated: Default::default(),
            broker: None,
        }),
    };
    let token = bearer(&token("shop", "cart"));
    let me = "spiffe://cluster.local/ns/shop/sa/cart";
    let key = KeyType::EcP256.generate().unwrap();
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 128,
        ..ProptestConfig::default()
    });
    let (accepted, refused) = (std::cell::Cell::new(0), std::cell::Cell::new(0));
    runner
        .run(&ask(), |a| {
            let mut p = rcgen::CertificateParams::default();
            p.distinguished_name = rcgen::DistinguishedName::new();
            if let Some(cn) = &a.cn {
                p.distinguished_name
                    .push(rcgen::DnType::CommonName, cn.as_str());
            }
            for u in &a.uris {
                if let Ok(u) = u.as_str().try_into() {
                    p.subject_alt_names.push(rcgen::SanType::URI(u));
                }
            }
            for d in &a.dns {
                if let Ok(d) = d.as_str().try_into() {
                    p.subject_alt_names.push(rcgen::SanType::DnsName(d));
                }
            }
            let Ok(csr) = p.serialize_request(&key).and_then(|r| r.pem()) else {
                return Ok(());
            };
            let mut req = tonic::Request::new(citadel::proto::IstioCertificateRequest {
                csr,
                validity_duration: 0,
                metadata: None,
            });
            req.metadata_mut()
                .insert("authorization", token.parse().unwrap());
            match rt.block_on(service.create_certificate(req)) {
                Err(s) => {
                    refused.set(refused.get() + 1);
                    prop_assert!(
                        matches!(
                            s.code(),
                            tonic::Code::PermissionDenied | tonic::Code::InvalidArgument
                        ),
                        "{:?}: {:?}",
                        a,
                        s
                    );
                }
                Ok(r) => {
                    accepted.set(accepted.get() + 1);
                    let chain = r.into_inner().cert_chain;
                    let der = citadel::pki::pem::parse_certs(chain[0].as_bytes())
                        .unwrap()
                        .remove(0);
                    let (_, cert) = X509Certificate::from_der(&der).unwrap();
                    let san = cert.subject_alternative_name().unwrap().unwrap();
                    prop_assert_eq!(
                        &san.value.general_names,
                        &vec![GeneralName::URI(me)],
                        "{:?}",
                        a
                    );
                    prop_assert_eq!(cert.subject().iter().count(), 0, "{:?}", a);
                }
            }
            Ok(())
        })
        .unwrap();
    // Both outcomes were exercised: the property is not vacuous.
    let (accepted, refused) = (accepted.get(), refused.get());
    assert!(
        accepted > 10 && refused > 10,
        "accepted {accepted}, refused {refused}"
    );
}
