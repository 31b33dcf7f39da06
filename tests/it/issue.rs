//! Certificates that should be issued, and what they look like.

use citadel::client::verify_response;
use citadel::pki::chain::{self, Usage};
use citadel::pki::{pem, KeyType, PublicKeyKind};
use x509_parser::prelude::*;

use crate::support::*;

#[tokio::test]
async fn ec_and_rsa_csrs_get_istio_shaped_chains() {
    let ca = TestCa::start(&[]).await;
    let mut client = ca.client().await;
    let id = spiffe("shop", "cart");
    for (kt, kind) in [
        (KeyType::EcP256, PublicKeyKind::EcP256),
        (KeyType::EcP384, PublicKeyKind::EcP384),
        (KeyType::Rsa2048, PublicKeyKind::Rsa { bits: 2048 }),
    ] {
        let (key, csr) = csr_for(kt, &id);
        let chain = issue(&mut client, &csr, "shop", "cart").await;
        // leaf, intermediate, roots-as-one-element.
        assert_eq!(chain.len(), 3, "{kt}");
        assert_eq!(
            chain[2].as_bytes(),
            ca.root_pem().as_slice(),
            "last element is the trust bundle"
        );
        let v = verify_response(&chain, Some(&id), ::time::OffsetDateTime::now_utc()).unwrap();
        assert_eq!(v.leaf.uri_sans, vec![id.to_string()]);
        assert_eq!(v.leaf.key, Ok(kind));
        // The leaf certifies the CSR's key, not some other key.
        let leaf = pem::parse_certs(chain[0].as_bytes()).unwrap();
        assert!(chain::key_matches_cert(&key, &leaf[0]).unwrap());
    }
    ca.stop().await;
}

#[tokio::test]
async fn leaf_profile_matches_istiod() {
    let ca = TestCa::start(&[]).await;
    let mut client = ca.client().await;
    let id = spiffe("default", "httpbin");
    let (_, csr) = csr_for(KeyType::EcP256, &id);
    let before = now();
    let chain = issue(&mut client, &csr, "default", "httpbin").await;
    let der = pem::parse_certs(chain[0].as_bytes()).unwrap().remove(0);
    let (_, cert) = X509Certificate::from_der(&der).unwrap();

    assert!(cert.subject().as_raw().len() <= 2, "subject is empty");
    let san = cert.subject_alternative_name().unwrap().unwrap();
    assert!(san.critical, "SAN is critical when the subject is empty");
    assert_eq!(
        san.value.general_names,
        vec![GeneralName::URI(
            "spiffe://cluster.local/ns/default/sa/httpbin"
        )]
    );
    let ku = cert.key_usage().unwrap().unwrap().value;
    assert!(ku.digital_signature() && ku.key_encipherment() && !ku.key_cert_sign());
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);
    let bc = cert.basic_constraints().unwrap().unwrap().value;
    assert!(!bc.ca);
    assert_eq!(
        cert.signature_algorithm.algorithm,
        x509_parser::oid_registry::OID_SIG_ECDSA_WITH_SHA256
    );
    // Random 128-bit serial.
    assert!(
        cert.raw_serial().len() >= 16,
        "serial has {} bytes",
        cert.raw_serial().len()
    );
    // Default TTL 24h, notBefore backdated 2 minutes.
    let nb = cert.validity().not_before.timestamp();
    let na = cert.validity().not_after.timestamp();
    assert!(
        (before - 125..=before - 115).contains(&nb),
        "notBefore {nb} vs now {before}"
    );
    assert!(
        (before + 86_400 - 5..=before + 86_400 + 5).contains(&na),
        "notAfter {na}"
    );
    // The intermediate is a CA with pathLen 0 under a self-signed root.
    let int = chain::describe(&pem::parse_certs(chain[1].as_bytes()).unwrap()[0]).unwrap();
    assert!(int.is_ca);
    assert_eq!(int.path_len, Some(0));
    ca.stop().await;
}

#[tokio::test]
async fn requested_ttl_is_honoured_and_clamped_to_the_signer() {
    // An intermediate that lives 2h: a 24h request is capped at its notAfter.
    let ca = TestCa::start(&["--intermediate-ttl", "2h"]).await;
    let mut client = ca.client().await;
    let id = spiffe("shop", "cart");
    let (_, csr) = csr_for(KeyType::EcP256, &id);
    let t = bearer(&token("shop", "cart"));

    let chain = call(&mut client, &csr, Some(&t), 3600, None).await.unwrap();
    let leaf = chain::describe(&pem::parse_certs(chain[0].as_bytes()).unwrap()[0]).unwrap();
    let want = now() + 3600;
    assert!((leaf.not_after.unix_timestamp() - want).abs() <= 5);

    let chain = call(&mut client, &csr, Some(&t), 86_400, None)
        .await
        .unwrap();
    let leaf = chain::describe(&pem::parse_certs(chain[0].as_bytes()).unwrap()[0]).unwrap();
    let int = chain::describe(&pem::parse_certs(chain[1].as_bytes()).unwrap()[0]).unwrap();
    assert_eq!(
        leaf.not_after, int.not_after,
        "leaf notAfter is capped at the issuer's"
    );
    ca.stop().await;
}

#[tokio::test]
async fn csr_without_san_or_with_cn_gets_the_callers_identity() {
    let ca = TestCa::start(&[]).await;
    let mut client = ca.client().await;
    // A caller-chosen CN is never signed: OpenSSL-style clients fall back to the CN for
    // hostname checks when there is no DNS SAN, so each of these would let `cart` pose as
    // someone else.
    for cn in [
        "payments.prod.svc.cluster.local",
        "*.svc.cluster.local",
        "spiffe://cluster.local/ns/prod/sa/payments",
    ] {
        let key = KeyType::EcP256.generate().unwrap();
        let mut p = rcgen::CertificateParams::default();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        // A DNS SAN is overwritten, as istiod does.
        p.subject_alt_names = vec![rcgen::SanType::DnsName("evil.example".try_into().unwrap())];
        let csr = p.serialize_request(&key).unwrap().pem().unwrap();
        let chain = issue(&mut client, &csr, "shop", "cart").await;
        let der = pem::parse_certs(chain[0].as_bytes()).unwrap().remove(0);
        let (_, cert) = X509Certificate::from_der(&der).unwrap();
        let san = cert.subject_alternative_name().unwrap().unwrap();
        assert_eq!(
            san.value.general_names,
            vec![GeneralName::URI("spiffe://cluster.local/ns/shop/sa/cart")]
        );
        assert!(san.critical, "empty subject, so the SAN is critical");
        assert_eq!(
            cert.subject().iter().count(),
            0,
            "CN {cn:?} was copied into the leaf: {}",
            cert.subject()
        );
    }
    ca.stop().await;
}

#[tokio::test]
async fn renewal_by_client_certificate_keeps_the_identity() {
    let ca = TestCa::start(&[]).await;
    let id = spiffe("shop", "frontend");
    let (key, csr) = csr_for(KeyType::EcP256, &id);
    let chain = issue(&mut ca.client().await, &csr, "shop", "frontend").await;

    // Reconnect presenting that SVID, with no token at all.
    let identity = (
        chain[..2].concat().into_bytes(),
        key.serialize_pem().into_bytes(),
    );
    let mut mtls = ca.client_with(Some(identity)).await;
    let (_, csr2) = csr_for(KeyType::EcP256, &id);
    let renewed = call(&mut mtls, &csr2, None, 0, None).await.unwrap();
    let v = verify_response(&renewed, Some(&id), ::time::OffsetDateTime::now_utc()).unwrap();
    assert_ne!(
        v.leaf.serial_hex,
        chain::describe(&pem::parse_certs(chain[0].as_bytes()).unwrap()[0])
            .unwrap()
            .serial_hex
    );

    // Asking for someone else's identity over that connection is refused.
    let (_, other) = csr_for(KeyType::EcP256, &spiffe("shop", "cart"));
    let err = call(&mut mtls, &other, None, 0, None).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    ca.stop().await;
}

#[tokio::test]
async fn chain_verifies_with_webpki_for_client_and_server_use() {
    let ca = TestCa::start(&["--ca-key-type", "ec-p384"]).await;
    let mut client = ca.client().await;
    let id = spiffe("shop", "cart");
    let (_, csr) = csr_for(KeyType::EcP256, &id);
    let chain = issue(&mut client, &csr, "shop", "cart").await;
    let leaf = pem::parse_certs(chain[0].as_bytes()).unwrap();
    let ints = pem::parse_certs(chain[1].as_bytes()).unwrap();
    let roots = pem::parse_certs(chain[2].as_bytes()).unwrap();
    let now = ::time::OffsetDateTime::now_utc();
    for usage in [Usage::ClientAuth, Usage::ServerAuth] {
        chain::verify_leaf(&leaf[0], &ints, &roots, now, usage).unwrap();
    }
    // P-384 issuer signs with ECDSA-SHA384.
    let (_, cert) = X509Certificate::from_der(&leaf[0]).unwrap();
    assert_eq!(
        cert.signature_algorithm.algorithm,
        x509_parser::oid_registry::OID_SIG_ECDSA_WITH_SHA384
    );
    // And not against a stranger's root.
    let other = TestCa::start(&[]).await;
    let strangers = pem::parse_certs(&other.root_pem()).unwrap();
    assert!(chain::verify_leaf(&leaf[0], &ints, &strangers, now, Usage::ClientAuth).is_err());
    other.stop().await;
    ca.stop().await;
}

#[tokio::test]
async fn metrics_and_health_report_what_happened() {
    let ca = TestCa::start(&[]).await;
    let mut client = ca.client().await;
    let (_, csr) = csr_for(KeyType::EcP256, &spiffe("shop", "cart"));
    issue(&mut client, &csr, "shop", "cart").await;
    call(&mut client, &csr, None, 0, None).await.unwrap_err();
    call(
        &mut client,
        "garbage",
        Some(&bearer(&token("shop", "cart"))),
        0,
        None,
    )
    .await
    .unwrap_err();
    let m = ca.metrics().await;
    for line in [
        "citadel_server_csr_count 3\n",
        "citadel_server_success_cert_issuance_count 1\n",
        "citadel_server_authentication_failure_count 1\n",
        "citadel_server_csr_parsing_err_count 1\n",
        "citadel_server_csr_latency_seconds_count 3\n",
    ] {
        assert!(m.contains(line), "missing {line:?} in\n{m}");
    }
    assert!(m.contains("citadel_server_root_cert_expiry_timestamp "));
    assert!(m.contains("citadel_server_cert_chain_expiry_timestamp "));
    assert_eq!(
        http_get(ca.metrics_addr, "/healthz/live").await.unwrap().0,
        200
    );
    assert_eq!(
        http_get(ca.metrics_addr, "/healthz/ready").await.unwrap().0,
        200
    );
    ca.stop().await;
}
