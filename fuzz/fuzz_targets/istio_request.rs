//! An IstioCertificateRequest (protobuf: CSR, validity, the metadata Struct with
//! `ImpersonatedIdentity`, `CertSigner` and anything else) through the real CreateCertificate
//! handler, with a valid dev token or none (first byte) and the `clusterid` header or not.
//! Whatever is issued names exactly the caller: nothing the request chose reaches the leaf.
#![no_main]
use std::sync::{Arc, OnceLock};

use citadel::auth::jwks::Jwks;
use citadel::auth::jwt::{JwtAuthenticator, JwtPolicy, DEFAULT_LEEWAY};
use citadel::identity::TrustDomain;
use citadel::proto::istio_certificate_service_server::IstioCertificateService;
use citadel::proto::IstioCertificateRequest;
use citadel::server::istio::IstioService;
use libfuzzer_sys::fuzz_target;
use prost::Message;

struct Fixture {
    rt: tokio::runtime::Runtime,
    service: IstioService,
    bearer: String,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        citadel::install_crypto_provider();
        let td = TrustDomain::new("cluster.local").unwrap();
        let clock = citadel::clock::system();
        let ca = citadel::ca::Ca::new();
        let opts = citadel::ca::bootstrap::CaOptions::new(td.clone());
        let j = citadel::ca::bootstrap::new_journal(&opts, clock.now()).unwrap();
        ca.install(citadel::ca::bootstrap::signer_from_journal(&j, &td).unwrap());
        let jwt = JwtAuthenticator::new(
            Jwks::from_json(citadel::devkeys::jwks_json().as_bytes()).unwrap(),
            JwtPolicy {
                issuer: None,
                audiences: vec!["istio-ca".into()],
                leeway: DEFAULT_LEEWAY,
            },
            td,
            clock.clone(),
        );
        let token = citadel::devkeys::signing_key().sign(&serde_json::json!({
            "iss": citadel::devkeys::DEV_ISSUER, "aud": ["istio-ca"],
            "sub": "system:serviceaccount:shop:cart", "exp": 4_000_000_000i64,
        }));
        let service = IstioService {
            port: Arc::new(citadel::server::port::CaPort {
                issue: Arc::new(citadel::auth::issue_path::IssuePath {
                    ca,
                    index: None,
                    sweep: Default::default(),
                    clock,
                    ttl: citadel::ca::policy::TtlPolicy::default().into(),
                    node_auth: None,
                }),
                auth: citadel::auth::AuthChain::new(vec![Arc::new(jwt)]),
                metrics: Arc::new(citadel::server::Metrics::default()),
                inflight: Arc::new(tokio::sync::Semaphore::new(8)),
                throttle: Arc::new(citadel::server::throttle::AuthThrottle::new(Default::default(), Default::default())),
                linkerd: None,
                federated: Default::default(),
                broker: None,
            }),
        };
        Fixture {
            rt: tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap(),
            service,
            bearer: format!("Bearer {token}"),
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, body)) = data.split_first() else { return };
    let Ok(msg) = IstioCertificateRequest::decode(body) else { return };
    let f = fixture();
    let mut req = tonic::Request::new(msg);
    if flags & 1 == 1 {
        req.metadata_mut().insert("authorization", f.bearer.parse().unwrap());
    }
    if flags & 2 == 2 {
        req.metadata_mut().insert("clusterid", "Kubernetes".parse().unwrap());
    }
    if let Ok(resp) = f.rt.block_on(f.service.create_certificate(req)) {
        let chain = resp.into_inner().cert_chain;
        let leaf = citadel::pki::pem::parse_certs(chain[0].as_bytes()).unwrap();
        let info = citadel::pki::chain::describe(&leaf[0]).unwrap();
        assert_eq!(info.uri_sans, vec!["spiffe://cluster.local/ns/shop/sa/cart".to_string()]);
        assert!(info.subject.is_empty(), "{}", info.subject);
    }
});
