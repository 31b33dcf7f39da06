//! An SDS DiscoveryRequest as a local client sends it on the agent's socket (protobuf bytes),
//! through the real SDS handler.
#![no_main]
use std::sync::OnceLock;

use citadel::agent::{sds::Sds, AgentStats, Credentials};
use citadel::identity::SpiffeId;
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_server::SecretDiscoveryService;
use libfuzzer_sys::fuzz_target;
use prost::Message;

struct Fixture {
    rt: tokio::runtime::Runtime,
    sds: Sds,
    _tx: citadel::agent::CredentialsTx,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let now = citadel::clock::system().now();
        let creds = Credentials {
            identity: SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/cart").unwrap(),
            key_pem: "-----BEGIN PRIVATE KEY-----\n-----END PRIVATE KEY-----\n".into(),
            chain_pem: "chain".into(),
            roots_pem: "roots".into(),
            crl_pem: Some("crl".into()),
            serial_hex: "01".into(),
            not_before: now,
            not_after: now,
            version: 1,
            federated: Default::default(),
        };
        let (tx, rx) = tokio::sync::watch::channel(Some(std::sync::Arc::new(creds)));
        Fixture {
            rt: tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap(),
            sds: Sds::new(rx, AgentStats::new()),
            _tx: tx,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(req) = DiscoveryRequest::decode(data) else { return };
    let f = fixture();
    let _ = f.rt.block_on(f.sds.fetch_secrets(tonic::Request::new(req)));
});
