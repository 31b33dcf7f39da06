//! Linkerd's Certify (`io.linkerd.proxy.identity.Identity/Certify`) on the CA port, against a
//! REAL kube-apiserver: tokens from the TokenRequest API with Linkerd's audience, reviewed by
//! that server; Linkerd's own published bindings (`linkerd2-proxy-api`) as the client; the
//! certificate checked the way linkerd2-proxy checks its own (webpki: chain to the anchors,
//! the DNS identity as the name), and the CA port's serving name the one proxies expect.

use std::net::SocketAddr;

use citadel::pki::KeyType;
use linkerd2_proxy_api::identity::identity_client::IdentityClient;
use linkerd2_proxy_api::identity::{CertifyRequest, CertifyResponse};
use rustls_pki_types::{CertificateDer, ServerName};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::Code;

use crate::support::*;

/// What `--linkerd-identity-domain cluster.local` with the default control plane names.
const SERVING_NAME: &str = "linkerd-identity.linkerd.serviceaccount.identity.linkerd.cluster.local";
const AUDIENCE: &str = "identity.l5d.io";

fn l5d(ns: &str, sa: &str) -> String {
    format!("{sa}.{ns}.serviceaccount.identity.linkerd.cluster.local")
}

/// A Certify client over TLS that trusts `roots` and expects the identity service's name, as
/// a proxy's `LINKERD2_PROXY_IDENTITY_SVC_NAME` makes it.
async fn linkerd_client(
    addr: SocketAddr,
    roots: &[u8],
    name: &str,
) -> Result<IdentityClient<Channel>, tonic::transport::Error> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(roots))
        .domain_name(name);
    let ch = Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)?
        .connect()
        .await?;
    Ok(IdentityClient::new(ch))
}

/// A DER CSR as linkerd2-proxy makes one: a P-256 key, empty subject, one DNS SAN.
fn dns_csr(name: &str) -> (rcgen::KeyPair, Vec<u8>) {
    let key = KeyType::EcP256.generate().unwrap();
    let der = citadel::pki::csr::build_dns(&key, name).unwrap();
    (key, der)
}

/// A CSR with these SANs and key, for the refusals.
fn csr_with(kt: KeyType, sans: Vec<rcgen::SanType>) -> Vec<u8> {
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.subject_alt_names = sans;
    p.serialize_request(&kt.generate().unwrap())
        .unwrap()
        .der()
        .to_vec()
}

/// `citadel serve --dev` with Linkerd's Certify for `cluster.local` (tokens reviewed by
/// `kube`), plus `extra` flags.
async fn linkerd_ca(kube: &KubeEnv, extra: &[&str]) -> TestCa {
    let kubeconfig = kube.kubeconfig.to_str().unwrap().to_string();
    let mut args = vec![
        "--kubeconfig",
        &kubeconfig,
        "--linkerd-identity-domain",
        "cluster.local",
    ];
    args.extend_from_slice(extra);
    TestCa::start(&args).await
}

/// One refused Certify: what it is, the request's identity, token and CSR, the code and a
/// part of the message.
type Refusal<'a> = (&'a str, String, String, Vec<u8>, Code, &'a str);

async fn certify(
    c: &mut IdentityClient<Channel>,
    identity: &str,
    token: &str,
    csr: &[u8],
) -> Result<CertifyResponse, tonic::Status> {
    c.certify(CertifyRequest {
        identity: identity.into(),
        token: token.as_bytes().to_vec(),
        certificate_signing_request: csr.to_vec(),
    })
    .await
    .map(|r| r.into_inner())
}

/// linkerd2-proxy's check of its new certificate: the chain (leaf + intermediates) verifies
/// to the trust anchors with webpki, for server and client auth, and the leaf is valid for the
/// proxy's own DNS identity. Also: `valid_until` is the leaf's notAfter, the leaf certifies the
/// CSR's key, and it names nothing but the identity (plus the SPIFFE ID when `spiffe`).
fn proxy_accepts(
    rsp: &CertifyResponse,
    anchors_pem: &[u8],
    name: &str,
    key: &rcgen::KeyPair,
    spiffe: Option<&str>,
) {
    let leaf = CertificateDer::from(rsp.leaf_certificate.clone());
    let inter: Vec<CertificateDer<'static>> = rsp
        .intermediate_certificates
        .iter()
        .map(|c| CertificateDer::from(c.clone()))
        .collect();
    let anchors = citadel::pki::pem::parse_certs(anchors_pem).unwrap();
    let now = time::OffsetDateTime::now_utc();
    for usage in [
        citadel::pki::chain::Usage::ServerAuth,
        citadel::pki::chain::Usage::ClientAuth,
    ] {
        citadel::pki::chain::verify_leaf(&leaf, &inter, &anchors, now, usage).unwrap();
    }
    let ee = webpki::EndEntityCert::try_from(&leaf).unwrap();
    ee.verify_is_valid_for_subject_name(&ServerName::try_from(name).unwrap())
        .unwrap_or_else(|e| panic!("the leaf is not valid for {name}: {e:?}"));
    // Not valid for another workload's name.
    let other = format!("other-{name}");
    assert!(ee
        .verify_is_valid_for_subject_name(&ServerName::try_from(other.as_str()).unwrap())
        .is_err());

    let info = citadel::pki::chain::describe(&leaf).unwrap();
    let until = rsp.valid_until.as_ref().expect("valid_until");
    assert_eq!(
        until.seconds,
        info.not_after.unix_timestamp(),
        "valid_until is notAfter"
    );
    assert_eq!(until.nanos, 0);
    assert!(citadel::pki::chain::key_matches_cert(key, &leaf).unwrap());
    assert_eq!(
        info.uri_sans,
        spiffe.map(str::to_string).into_iter().collect::<Vec<_>>()
    );
    let (_, cert) = x509_parser::parse_x509_certificate(&leaf).unwrap();
    let dns: Vec<String> = cert
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .filter_map(|g| match g {
            x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(dns, vec![name.to_string()], "exactly the one DNS identity");
    assert_eq!(cert.subject().iter().count(), 0, "an empty subject");
}

#[tokio::test]
async fn linkerd_certify_with_real_projected_tokens_and_linkerds_refusals() {
    let Some(kube) = KubeEnv::start().await else {
        return;
    };
    for sa in ["cart", "web", "gone"] {
        kube.service_account("shop", sa).await;
    }
    let ca = linkerd_ca(
        &kube,
        &[
            // The refusals below fail authentication on purpose; the throttle is tested
            // elsewhere (tests/it/limits.rs).
            "--auth-failure-burst",
            "1000",
            // Every call reviewed: a deleted account is refused as soon as the API server
            // says so (the cache is tests/it/kube.rs's subject).
            "--token-cache-ttl",
            "0s",
        ],
    )
    .await;
    let roots = ca.root_pem();

    // The CA port presents the identity service's own name, as proxies expect.
    let mut c = linkerd_client(ca.addr, &roots, SERVING_NAME).await.unwrap();
    // And not a name it does not hold (the client really checks it).
    assert!(
        linkerd_client(
            ca.addr,
            &roots,
            "linkerd-identity.other.serviceaccount.identity.other.cluster.local"
        )
        .await
        .is_err(),
        "a TLS client expecting another name must refuse the CA port"
    );

    let token = kube.token("shop", "cart", AUDIENCE).await;
    let name = l5d("shop", "cart");
    let (key, csr) = dns_csr(&name);
    let rsp = certify(&mut c, &name, &token, &csr).await.unwrap();
    proxy_accepts(&rsp, &roots, &name, &key, None);

    // A success after each refusal: the server keeps serving.
    let still_serving = async |c: &mut IdentityClient<Channel>| {
        let (key, csr) = dns_csr(&name);
        let rsp = certify(c, &name, &token, &csr)
            .await
            .expect("still serving");
        proxy_accepts(&rsp, &roots, &name, &key, None);
    };

    let other_token = kube.token("shop", "web", AUDIENCE).await;
    let istio_token = kube.token("shop", "cart", "istio-ca").await;
    let dns = |n: &str| rcgen::SanType::DnsName(n.try_into().unwrap());
    let cases: Vec<Refusal> = vec![
        ("no identity", String::new(), token.clone(), csr.clone(), Code::InvalidArgument, "missing identity"),
        ("no token", name.clone(), String::new(), csr.clone(), Code::InvalidArgument, "missing token"),
        ("no CSR", name.clone(), token.clone(), Vec::new(), Code::InvalidArgument, "missing certificate signing request"),
        ("garbage CSR", name.clone(), token.clone(), b"not a csr".to_vec(), Code::InvalidArgument, "invalid CSR: CSR is not valid DER"),
        ("RSA key", name.clone(), token.clone(), csr_with(KeyType::Rsa2048, vec![dns(&name)]), Code::InvalidArgument, "needs an ECDSA key"),
        ("two DNS names", name.clone(), token.clone(), csr_with(KeyType::EcP256, vec![dns(&name), dns("evil.example")]), Code::InvalidArgument, "it has 2 DNS names"),
        ("a URI SAN too", name.clone(), token.clone(),
         csr_with(KeyType::EcP256, vec![dns(&name), rcgen::SanType::URI("spiffe://cluster.local/ns/shop/sa/cart".try_into().unwrap())]),
         Code::InvalidArgument, "it has 1 URI"),
        ("an IP SAN too", name.clone(), token.clone(), csr_with(KeyType::EcP256, vec![dns(&name), rcgen::SanType::IpAddress([10, 0, 0, 1].into())]),
         Code::InvalidArgument, "it has an IP SAN"),
        ("CSR names another identity than the request", name.clone(), token.clone(), dns_csr(&l5d("shop", "web")).1,
         Code::FailedPrecondition, "CSR name does not match requested identity"),
        ("a token of another account", name.clone(), other_token.clone(), csr.clone(), Code::FailedPrecondition,
         "CSR asks for \"cart.shop.serviceaccount.identity.linkerd.cluster.local\", but the caller is web.shop.serviceaccount.identity.linkerd.cluster.local"),
        ("Istio's audience", name.clone(), istio_token.clone(), csr.clone(), Code::FailedPrecondition, "authentication failed"),
        ("not a token", name.clone(), "x".repeat(100), csr.clone(), Code::FailedPrecondition, "authentication failed"),
    ];
    for (what, identity, tok, csr, code, text) in cases {
        let err = certify(&mut c, &identity, &tok, &csr).await.unwrap_err();
        assert_eq!(err.code(), code, "{what}: {err:?}");
        assert!(
            err.message().contains(text),
            "{what}: {:?} should contain {text:?}",
            err.message()
        );
        if !tok.is_empty() {
            assert!(
                !err.message().contains(&tok),
                "{what}: the token is never echoed"
            );
        }
        still_serving(&mut c).await;
    }

    // A token projected for Linkerd gets no Istio certificate (audiences are not shared).
    let mut istio = ca.client().await;
    let (_, istio_csr) = csr_for(KeyType::EcP256, &spiffe("shop", "cart"));
    let err = call(&mut istio, &istio_csr, Some(&bearer(&token)), 0, None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");

    // A service account deleted since: the API server no longer authenticates its token.
    let gone = kube.token("shop", "gone", AUDIENCE).await;
    kube.delete_service_account("shop", "gone").await;
    let gone_name = l5d("shop", "gone");
    let err = until(
        "the deleted account's token refused",
        40,
        async || match certify(&mut c, &gone_name, &gone, &dns_csr(&gone_name).1).await {
            Err(e) => Ok(e),
            Ok(_) => Err("still accepted".to_string()),
        },
    )
    .await;
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    still_serving(&mut c).await;

    // A denied identity is refused here exactly as on CreateCertificate (the same issue path).
    citadel_ok(
        &[
            "revoke",
            "--identity",
            "spiffe://cluster.local/ns/shop/sa/web",
            "--reason",
            "key-compromise",
        ],
        &ca.state_dir(),
    );
    let web = l5d("shop", "web");
    let err = until("the denial is installed", 20, async || {
        match certify(&mut c, &web, &other_token, &dns_csr(&web).1).await {
            Err(e) if e.code() == Code::FailedPrecondition => Ok(e),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert!(
        err.message().contains("has been revoked by an operator"),
        "{err:?}"
    );
    still_serving(&mut c).await;

    // The API server down: the token cannot be reviewed now, Unavailable (the proxy retries);
    // back up, certificates again. A fresh token, so no cached review answers for it.
    let fresh = kube.token("shop", "cart", AUDIENCE).await;
    kube.stop_apiserver();
    let err = certify(&mut c, &name, &fresh, &csr).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    kube.start_apiserver();
    until("the API server is back", 30, async || {
        certify(&mut c, &name, &fresh, &csr)
            .await
            .map(|_| ())
            .map_err(|e| format!("{e:?}"))
    })
    .await;

    // Counted by code.
    let m = ca.metrics().await;
    assert!(
        m.contains("citadel_linkerd_certify_total{code=\"InvalidArgument\"} 8\n"),
        "{m}"
    );
    let unavailable: u64 = m
        .lines()
        .find_map(|l| l.strip_prefix("citadel_linkerd_certify_total{code=\"Unavailable\"} "))
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(unavailable >= 1, "{m}");
}

#[tokio::test]
async fn linkerd_leaves_can_carry_the_spiffe_id_for_both_meshes() {
    let Some(kube) = KubeEnv::start().await else {
        return;
    };
    kube.service_account("shop", "cart").await;
    let ca = linkerd_ca(&kube, &["--linkerd-spiffe-san"]).await;
    let roots = ca.root_pem();
    let mut c = linkerd_client(ca.addr, &roots, SERVING_NAME).await.unwrap();
    let name = l5d("shop", "cart");
    let (key, csr) = dns_csr(&name);
    let token = kube.token("shop", "cart", AUDIENCE).await;
    let rsp = certify(&mut c, &name, &token, &csr).await.unwrap();
    let id = "spiffe://cluster.local/ns/shop/sa/cart";
    proxy_accepts(&rsp, &roots, &name, &key, Some(id));
    // ...and a SPIFFE verifier accepts the same leaf for the SPIFFE ID.
    let mut chain = vec![citadel::pki::pem::cert_to_pem(&rsp.leaf_certificate)];
    chain.extend(
        rsp.intermediate_certificates
            .iter()
            .map(|c| citadel::pki::pem::cert_to_pem(c)),
    );
    chain.push(String::from_utf8(roots.clone()).unwrap());
    citadel::client::verify_response(
        &chain,
        Some(&spiffe("shop", "cart")),
        time::OffsetDateTime::now_utc(),
    )
    .unwrap();
    if let Some(gs) = crate::thirdparty::gospiffe() {
        crate::thirdparty::gospiffe_accepts(
            &gs,
            &chain[..chain.len() - 1].concat(),
            &chain[chain.len() - 1],
            id,
        );
    }
}

#[tokio::test]
async fn linkerd_is_off_by_default() {
    let ca = TestCa::start(&[]).await;
    let roots = ca.root_pem();
    // Nothing answers Certify, and the serving certificate has no Linkerd name.
    assert!(linkerd_client(ca.addr, &roots, SERVING_NAME).await.is_err());
    let mut c = linkerd_client(ca.addr, &roots, "localhost").await.unwrap();
    let err = certify(&mut c, "a", "b", b"c").await.unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented, "{err:?}");
    // A bad domain stops the start, naming the flag.
    let tmp = tempfile::tempdir().unwrap();
    let err = TestCa::try_start_in(tmp.path(), &["--linkerd-identity-domain", "Not A Domain"])
        .await
        .err()
        .unwrap();
    assert!(err.contains("--linkerd-identity-domain"), "{err}");
}

/// A meshed pod as Linkerd's injector leaves it: labelled with the control plane, a
/// `linkerd-proxy` container whose anchors are inline (`Some`) or from the ConfigMap (`None`),
/// Running since `started` (there is no kubelet: the status is written directly).
async fn meshed_pod(
    kube: &KubeEnv,
    name: &str,
    inline: Option<&str>,
    started: time::OffsetDateTime,
) {
    use k8s_openapi::api::core::v1::Pod;
    use kube::api::{Api, Patch, PatchParams, PostParams};
    let env = match inline {
        Some(pem) => {
            serde_json::json!([{"name": "LINKERD2_PROXY_IDENTITY_TRUST_ANCHORS", "value": pem}])
        }
        None => serde_json::json!([{"name": "LINKERD2_PROXY_IDENTITY_TRUST_ANCHORS",
            "valueFrom": {"configMapKeyRef": {"name": "linkerd-identity-trust-roots", "key": "ca-bundle.crt"}}}]),
    };
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {"linkerd.io/control-plane-ns": "linkerd"}},
        "spec": {"serviceAccountName": "cart", "automountServiceAccountToken": false, "containers": [
            {"name": "app", "image": "registry.invalid/app:1"},
            {"name": "linkerd-proxy", "image": "registry.invalid/proxy:1", "env": env}
        ]}
    }))
    .unwrap();
    let api = Api::<Pod>::namespaced(kube.client.clone(), "shop");
    api.create(&PostParams::default(), &pod).await.unwrap();
    let at = started
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let status = serde_json::json!({"status": {"phase": "Running", "startTime": at}});
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
}

/// shop/cart's proxy as linkerd2-proxy runs it: trusting exactly `anchors`, expecting the
/// identity service's name, asking for its identity with a real projected token; the
/// certificate passes the proxy's own checks against those anchors.
async fn cart_proxy_certifies(kube: &KubeEnv, addr: SocketAddr, anchors: &[u8]) {
    let mut c = linkerd_client(addr, anchors, SERVING_NAME).await.unwrap();
    let name = l5d("shop", "cart");
    let (key, csr) = dns_csr(&name);
    let token = kube.token("shop", "cart", AUDIENCE).await;
    // Like the proxy, retry Unavailable (an API server slow to review under the suite's load);
    // any other refusal fails.
    let rsp = until("a certificate", 30, async || {
        match certify(&mut c, &name, &token, &csr).await {
            Ok(r) => Ok(r),
            Err(e) if e.code() == Code::Unavailable => Err(format!("{e:?}")),
            Err(e) => panic!("refused: {e:?}"),
        }
    })
    .await;
    proxy_accepts(&rsp, anchors, &name, &key, None);
}

/// Linkerd's trust anchors ConfigMap, once citadel has published it.
async fn published_anchors(kube: &KubeEnv) -> k8s_openapi::api::core::v1::ConfigMap {
    until(
        "linkerd-identity-trust-roots is published",
        30,
        async || {
            kube.configmap("linkerd", "linkerd-identity-trust-roots")
                .await
                .ok_or_else(|| "not yet".to_string())
        },
    )
    .await
}

fn gauge(metrics: &str, name: &str) -> Option<i64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} "))?.parse().ok())
}

#[tokio::test]
async fn linkerd_anchors_are_published_where_linkerd_reads_them_and_drift_is_counted() {
    use citadel::cluster::ca_resource::CertificateAuthority;
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::api::{Api, PostParams};
    let Some(kube) = KubeEnv::start().await else {
        return;
    };
    kube.namespace("citadel").await;
    kube.namespace("linkerd").await;
    kube.service_account("shop", "cart").await;
    // The CertificateAuthority resource, whose status carries LinkerdAnchorsCurrent.
    crate::ca_resource::install_crd(&kube).await;
    let cas: Api<CertificateAuthority> = Api::namespaced(kube.client.clone(), "citadel");
    let ca_obj: CertificateAuthority = serde_json::from_value(serde_json::json!({
        "apiVersion": "citadel.dev/v1alpha1", "kind": "CertificateAuthority",
        "metadata": {"name": "citadel", "namespace": "citadel"},
        "spec": {"trustDomain": "cluster.local"}
    }))
    .unwrap();
    cas.create(&PostParams::default(), &ca_obj).await.unwrap();
    let r = crate::kube::replica_with(
        &kube,
        "l5d-a",
        "citadel",
        &["--linkerd-identity-domain", "cluster.local"],
    );
    eventually("the replica is ready", 60, async || {
        crate::kube::ready(&r).await
    })
    .await;

    // The bundle, as Linkerd reads it: in the control-plane namespace only.
    let cm = published_anchors(&kube).await;
    let anchors = cm.data.as_ref().unwrap()["ca-bundle.crt"].clone();
    let istio_bundle = until("istio-ca-root-cert in shop", 30, async || {
        kube.bundle("shop")
            .await
            .ok_or_else(|| "not yet".to_string())
    })
    .await;
    assert_eq!(anchors, istio_bundle, "the same roots for both meshes");
    assert!(kube
        .configmap("shop", "linkerd-identity-trust-roots")
        .await
        .is_none());
    let changed_at =
        cm.metadata.annotations.as_ref().unwrap()["citadel.dev/anchors-changed-at"].clone();
    let changed =
        time::OffsetDateTime::parse(&changed_at, &time::format_description::well_known::Rfc3339)
            .unwrap();

    // A proxy that trusts exactly the published anchors and expects the identity service's
    // name gets a certificate that chains to them.
    cart_proxy_certifies(&kube, r.addr, anchors.as_bytes()).await;

    // Drift: pods with other inline anchors, or that read the ConfigMap before it changed,
    // are behind; the others are current.
    let other_root = {
        let k = KeyType::EcP256.generate().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.self_signed(&k).unwrap().pem()
    };
    let hour = time::Duration::hours(1);
    meshed_pod(&kube, "current-inline", Some(&anchors), changed - hour).await;
    meshed_pod(&kube, "old-inline", Some(&other_root), changed + hour).await;
    meshed_pod(&kube, "current-ref", None, changed + hour).await;
    meshed_pod(&kube, "old-ref", None, changed - hour).await;
    let m = until("the drift is counted", 30, async || {
        let (_, m) = http_get(r.metrics, "/metrics")
            .await
            .map_err(|e| e.to_string())?;
        match (
            gauge(&m, "citadel_linkerd_anchor_drift_pods"),
            gauge(&m, "citadel_linkerd_meshed_pods"),
        ) {
            (Some(2), Some(4)) => Ok(m),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert!(
        m.contains("citadel_linkerd_certify_total{code=\"Ok\"} 1\n"),
        "{m}"
    );
    crate::support::wait::wait_event(
        &kube.client,
        "linkerd",
        "linkerd-identity-trust-roots",
        "AnchorDrift",
        30,
    )
    .await;
    // ...and a condition on the CertificateAuthority, for `kubectl get ca` and alerting.
    let ca =
        crate::support::wait::wait_condition(&cas, "citadel", "LinkerdAnchorsCurrent", "False", 30)
            .await;
    let cond = crate::support::wait::condition(&ca, "LinkerdAnchorsCurrent").unwrap();
    assert_eq!(cond.reason, "PodsBehind");
    assert!(
        cond.message
            .starts_with("2 of 4 running Linkerd-meshed pods"),
        "{}",
        cond.message
    );
    // Restarted with the current anchors (recreated: a new pod), they are current again.
    for old in ["old-inline", "old-ref"] {
        kube.delete_pod("shop", old).await;
    }
    meshed_pod(
        &kube,
        "new-inline",
        Some(&anchors),
        time::OffsetDateTime::now_utc(),
    )
    .await;
    let ca =
        crate::support::wait::wait_condition(&cas, "citadel", "LinkerdAnchorsCurrent", "True", 30)
            .await;
    let cond = crate::support::wait::condition(&ca, "LinkerdAnchorsCurrent").unwrap();
    assert_eq!(cond.reason, "AllPodsCurrent");
    assert_eq!(
        cond.message,
        "all 3 running Linkerd-meshed pods hold the published trust anchors"
    );
    crate::support::wait::wait_event(
        &kube.client,
        "linkerd",
        "linkerd-identity-trust-roots",
        "AnchorsCurrent",
        30,
    )
    .await;

    // Someone edits the anchors: citadel puts them back, and since proxies started meanwhile
    // may have read the edit, the anchors count as changed from then on.
    let api: Api<ConfigMap> = Api::namespaced(kube.client.clone(), "linkerd");
    let mut edited = api.get("linkerd-identity-trust-roots").await.unwrap();
    edited.data = Some([("ca-bundle.crt".to_string(), other_root.clone())].into());
    api.replace(
        "linkerd-identity-trust-roots",
        &PostParams::default(),
        &edited,
    )
    .await
    .unwrap();
    let repaired = until("the anchors are repaired", 30, async || {
        let cm = api
            .get("linkerd-identity-trust-roots")
            .await
            .map_err(|e| e.to_string())?;
        match cm.data.as_ref().map(|d| d["ca-bundle.crt"].clone()) {
            Some(b) if b == anchors => Ok(cm),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let again = &repaired.metadata.annotations.as_ref().unwrap()["citadel.dev/anchors-changed-at"];
    assert!(
        time::OffsetDateTime::parse(again, &time::format_description::well_known::Rfc3339).unwrap()
            >= changed,
        "{again} vs {changed_at}"
    );
}

/// deploy/citadel.yaml plus deploy/linkerd.yaml are enough, applied for real: citadel as the
/// `citadel` service account and nothing else publishes Linkerd's anchors, reviews Linkerd's
/// tokens and counts the drift (the pod list), with the Kubernetes store.
#[tokio::test]
async fn linkerd_runs_with_exactly_the_rbac_in_deploy() {
    let Some(kube) = KubeEnv::start().await else {
        return;
    };
    if !require_tool("kubectl") {
        return;
    }
    kube.namespace("istio-system").await;
    kube.namespace("linkerd").await;
    let text = crate::rbac::apply(&kube, &["deploy/citadel.yaml", "deploy/linkerd.yaml"]);
    assert!(
        text.contains("role.rbac.authorization.k8s.io/citadel-linkerd-anchors")
            && text.contains("clusterrole.rbac.authorization.k8s.io/citadel-linkerd-drift"),
        "{text}"
    );
    crate::rbac::rbac_in_effect(&kube).await;
    kube.service_account("shop", "cart").await;
    let tmp = tempfile::tempdir().unwrap();
    let kubeconfig = crate::rbac::sa_kubeconfig(&kube, tmp.path()).await;
    let ca = TestCa::start(&[
        "--kubeconfig",
        kubeconfig.to_str().unwrap(),
        "--store",
        "kube",
        "--namespace",
        "istio-system",
        "--lease-duration",
        "3s",
        "--reconcile-interval",
        "500ms",
        "--linkerd-identity-domain",
        "cluster.local",
    ])
    .await;
    let cm = published_anchors(&kube).await;
    let anchors = cm.data.as_ref().unwrap()["ca-bundle.crt"].clone();
    cart_proxy_certifies(&kube, ca.addr, anchors.as_bytes()).await;
    meshed_pod(
        &kube,
        "behind",
        None,
        time::OffsetDateTime::now_utc() - time::Duration::days(1),
    )
    .await;
    until(
        "the drift is counted under deploy/'s RBAC",
        30,
        async || {
            let m = ca.metrics().await;
            match (
                gauge(&m, "citadel_linkerd_anchor_drift_pods"),
                gauge(&m, "citadel_linkerd_meshed_pods"),
            ) {
                (Some(1), Some(1)) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
}
