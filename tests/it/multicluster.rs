//! The `clusterid` header (pilot-agent sends ISTIO_META_CLUSTER_ID): absent or this
//! cluster's `--cluster-id` means the local cluster; any other cluster is refused for token
//! authentication (no remote clusters are known yet), naming the cluster. Client
//! certificates ignore it, as in istiod.

use citadel::pki::KeyType;
use citadel::proto::IstioCertificateRequest;
use tonic::Code;

use crate::support::*;

async fn call_from(
    client: &mut citadel::client::CaClient,
    csr: &str,
    token: Option<&str>,
    cluster_ids: &[&str],
) -> Result<Vec<String>, tonic::Status> {
    let mut req = tonic::Request::new(IstioCertificateRequest {
        csr: csr.to_string(),
        validity_duration: 0,
        metadata: None,
    });
    if let Some(t) = token {
        req.metadata_mut()
            .insert("authorization", bearer(t).parse().unwrap());
    }
    for c in cluster_ids {
        req.metadata_mut().append("clusterid", c.parse().unwrap());
    }
    client
        .create_certificate(req)
        .await
        .map(|r| r.into_inner().cert_chain)
}

#[tokio::test]
async fn clusterid_selects_the_local_cluster_and_refuses_unknown_ones() {
    let ca = TestCa::start(&["--cluster-id", "cluster-a"]).await;
    let mut client = ca.client().await;
    let (key, csr) = csr_for(KeyType::EcP256, &spiffe("shop", "cart"));
    let t = token("shop", "cart");

    let chain = call_from(&mut client, &csr, Some(&t), &[]).await.unwrap();
    call_from(&mut client, &csr, Some(&t), &["cluster-a"])
        .await
        .unwrap();
    // Sent twice, the header is ignored (istiod reads it only when sent once).
    call_from(&mut client, &csr, Some(&t), &["cluster-b", "cluster-b"])
        .await
        .unwrap();

    for unknown in ["cluster-b", "Kubernetes"] {
        let err = call_from(&mut client, &csr, Some(&t), &[unknown])
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{unknown}: {err:?}");
        assert!(
            err.message().contains(&format!("{unknown:?}")),
            "{unknown}: {err:?}"
        );
        assert!(!err.message().contains(&t));
        // Still serving.
        call_from(&mut client, &csr, Some(&t), &[]).await.unwrap();
    }

    // A renewal by client certificate ignores the header.
    let mut mtls = ca
        .client_with(Some((
            chain[..2].concat().into_bytes(),
            key.serialize_pem().into_bytes(),
        )))
        .await;
    call_from(&mut mtls, &csr, None, &["cluster-b"])
        .await
        .unwrap();
    ca.stop().await;

    // The default is istiod's: `Kubernetes`.
    let ca = TestCa::start(&[]).await;
    let mut client = ca.client().await;
    call_from(&mut client, &csr, Some(&t), &["Kubernetes"])
        .await
        .unwrap();
    let err = call_from(&mut client, &csr, Some(&t), &["cluster-a"])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    ca.stop().await;
}
