//! SPIFFE federation: our bundle endpoint read by go-spiffe's `federation` package (a
//! third-party client, both profiles), and our fetcher following another citadel's endpoint
//! and go-spiffe's own endpoint handler, through a root rotation, garbage and a wrong trust
//! domain.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use crate::support::poll::eventually;
use crate::support::process::citadel_ok;
use crate::support::*;

fn gofederation() -> Option<PathBuf> {
    crate::thirdparty::built_program(
        "CITADEL_GOFEDERATION",
        "the go-spiffe federation program (tests/gofederation)",
    )
}

/// `gofederation fetch ARGS`: Ok(its JSON) or Err(go-spiffe's reason).
async fn go_fetch(bin: &Path, args: &[&str]) -> Result<Value, String> {
    let out = tokio::process::Command::new(bin)
        .arg("fetch")
        .args(args)
        .output()
        .await
        .unwrap();
    if out.status.success() {
        Ok(serde_json::from_slice(&out.stdout).expect("gofederation prints JSON"))
    } else {
        assert_eq!(
            out.status.code(),
            Some(1),
            "usage error: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Err(String::from_utf8_lossy(&out.stderr).into())
    }
}

fn pem_certs(pem: &[u8]) -> Vec<Vec<u8>> {
    citadel::pki::pem::parse_certs(pem)
        .unwrap()
        .into_iter()
        .map(|c| c.as_ref().to_vec())
        .collect()
}

fn jwt_kids(state: &Path) -> Vec<String> {
    let jwks: Value =
        serde_json::from_slice(&std::fs::read(state.join("jwt-bundle.json")).unwrap()).unwrap();
    let mut kids: Vec<String> = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap().to_string())
        .collect();
    kids.sort();
    kids
}

/// A CA (for https_web) and a serving certificate for 127.0.0.1 under it, in `dir`.
fn web_pki(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
    let ca_key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "test web CA");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = p.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(p, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut sp = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    sp.subject_alt_names
        .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
    let cert = sp.signed_by(&key, &issuer).unwrap();
    let (roots, c, k) = (
        dir.join("web-roots.pem"),
        dir.join("web-cert.pem"),
        dir.join("web-key.pem"),
    );
    std::fs::write(&roots, ca.pem()).unwrap();
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    (roots, c, k)
}

/// go-spiffe's FetchBundle over https_spiffe gets exactly our trust bundle's roots (one
/// certificate each), our JWT keys, the sequence and the hint; an endpoint ID other than
/// the one the endpoint presents, or a bootstrap bundle of another domain, is refused; and
/// the endpoint keeps serving after those refusals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_spiffe_fetches_the_bundle_endpoint_over_https_spiffe() {
    let Some(bin) = gofederation() else { return };
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let ca = TestCa::start(&[
        "--trust-domain",
        "a.test",
        "--bundle-endpoint",
        &listen,
        "--jwt-bundle-refresh-hint",
        "30s",
    ])
    .await;
    let url = format!("https://127.0.0.1:{port}/");
    let boot = ca.state_dir().join("root-cert.pem");
    let id = "spiffe://a.test/citadel/bundle-endpoint";
    let got = go_fetch(
        &bin,
        &["a.test", &url, "spiffe", id, boot.to_str().unwrap()],
    )
    .await
    .expect("go-spiffe accepts the endpoint and the bundle");
    let roots: Vec<Vec<u8>> = got["x509_authorities"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| pem_certs(p.as_str().unwrap().as_bytes()))
        .collect();
    assert_eq!(roots, pem_certs(&ca.root_pem()), "{got}");
    let kids: Vec<String> = serde_json::from_value(got["jwt_key_ids"].clone()).unwrap();
    assert_eq!(kids, jwt_kids(&ca.state_dir()));
    assert!(!kids.is_empty());
    assert_eq!(got["spiffe_refresh_hint"], 30, "{got}");
    assert!(got["spiffe_sequence"].as_u64().unwrap() >= 1, "{got}");

    // The wrong endpoint ID: go-spiffe's TLS authorization refuses.
    let e = go_fetch(
        &bin,
        &[
            "a.test",
            &url,
            "spiffe",
            "spiffe://a.test/someone-else",
            boot.to_str().unwrap(),
        ],
    )
    .await
    .unwrap_err();
    assert!(e.contains("FETCH REFUSED"), "{e}");
    // A bootstrap bundle of another domain does not authenticate it either.
    let other = TestCa::start(&["--trust-domain", "b.test"]).await;
    let other_boot = other.state_dir().join("root-cert.pem");
    let e = go_fetch(
        &bin,
        &["a.test", &url, "spiffe", id, other_boot.to_str().unwrap()],
    )
    .await
    .unwrap_err();
    assert!(e.contains("FETCH REFUSED"), "{e}");
    // Still serving.
    go_fetch(
        &bin,
        &["a.test", &url, "spiffe", id, boot.to_str().unwrap()],
    )
    .await
    .expect("still serving after refusals");
    other.stop().await;
    ca.stop().await;
}

/// https_web: the operator's certificate; go-spiffe with WithWebPKIRoots gets the bundle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_spiffe_fetches_the_bundle_endpoint_over_https_web() {
    let Some(bin) = gofederation() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let (roots, cert, key) = web_pki(tmp.path());
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let ca = TestCa::start(&[
        "--trust-domain",
        "a.test",
        "--bundle-endpoint",
        &listen,
        "--bundle-endpoint-cert",
        cert.to_str().unwrap(),
        "--bundle-endpoint-key",
        key.to_str().unwrap(),
    ])
    .await;
    let url = format!("https://127.0.0.1:{port}/bundle");
    let got = go_fetch(&bin, &["a.test", &url, "web", roots.to_str().unwrap()])
        .await
        .expect("go-spiffe accepts the https_web endpoint");
    let roots_got: Vec<Vec<u8>> = got["x509_authorities"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| pem_certs(p.as_str().unwrap().as_bytes()))
        .collect();
    assert_eq!(roots_got, pem_certs(&ca.root_pem()));
    // Bad requests: another method is 405 (curl, OpenSSL), plain HTTP on the TLS port gets
    // no document; the endpoint keeps serving (checked by the fetches below and after).
    if require_tool("curl") {
        let out = std::process::Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-X",
                "POST",
                "--cacert",
            ])
            .arg(&roots)
            .arg(&url)
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "405");
        let out = std::process::Command::new("curl")
            .args(["-s", "--cacert"])
            .arg(&roots)
            .arg(&url)
            .output()
            .unwrap();
        let doc: Value = serde_json::from_slice(&out.stdout).expect("curl GETs the bundle");
        assert!(doc["spiffe_sequence"].is_u64());
    }
    let plain = http_get(format!("127.0.0.1:{port}").parse().unwrap(), "/").await;
    assert!(!matches!(plain, Ok((200, _))), "{plain:?}");
    // With SPIFFE authentication instead, the web certificate is not an SVID: refused.
    let boot = ca.state_dir().join("root-cert.pem");
    let e = go_fetch(
        &bin,
        &[
            "a.test",
            &url,
            "spiffe",
            "spiffe://a.test/citadel/bundle-endpoint",
            boot.to_str().unwrap(),
        ],
    )
    .await
    .unwrap_err();
    assert!(e.contains("FETCH REFUSED"), "{e}");
    go_fetch(&bin, &["a.test", &url, "web", roots.to_str().unwrap()])
        .await
        .expect("still serving after the bad requests");
    ca.stop().await;
}

type FedClient = citadel::federation_proto::FederationServiceClient<tonic::transport::Channel>;

async fn federation_client(ca: &TestCa) -> FedClient {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
    let ep = Endpoint::from_shared(format!("https://{}", ca.addr))
        .unwrap()
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(ca.root_pem()))
                .domain_name("localhost"),
        )
        .unwrap();
    citadel::federation_proto::FederationServiceClient::new(ep.connect().await.unwrap())
}

async fn fetch_federated(
    c: &mut FedClient,
    token: Option<&str>,
) -> Result<citadel::federation_proto::FetchFederatedBundlesResponse, tonic::Status> {
    let mut req = tonic::Request::new(citadel::federation_proto::FetchFederatedBundlesRequest {});
    if let Some(t) = token {
        req.metadata_mut()
            .insert("authorization", bearer(t).parse().unwrap());
    }
    c.fetch_federated_bundles(req).await.map(|r| r.into_inner())
}

fn stored(state: &Path, td: &str) -> Option<Value> {
    let bytes = std::fs::read(state.join("federation").join(format!("{td}.json"))).ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn x509_of(doc: &Value) -> Vec<Vec<u8>> {
    use base64::Engine;
    doc["keys"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["use"] == "x509-svid")
        .map(|k| {
            base64::engine::general_purpose::STANDARD
                .decode(k["x5c"][0].as_str().unwrap())
                .unwrap()
        })
        .collect()
}

fn metric(text: &str, name_and_labels: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.trim().parse().ok())
        .unwrap_or(0)
}

/// Two citadels, a.test following b.test's https_spiffe endpoint: a.test gets b.test's
/// bundle (stored, never in its own trust bundle), follows a root rotation in b.test at
/// the hint, and survives its own restart with the stored bundle (no bootstrap needed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_citadel_follows_another_trust_domain_through_a_root_rotation() {
    let port = free_port();
    let b_listen = format!("127.0.0.1:{port}");
    let b = TestCa::start(&[
        "--trust-domain",
        "b.test",
        "--bundle-endpoint",
        &b_listen,
        "--jwt-bundle-refresh-hint",
        "1s",
    ])
    .await;
    let boot = b.state_dir().join("root-cert.pem");
    let federate =
        format!("b.test=https://127.0.0.1:{port}/,spiffe://b.test/citadel/bundle-endpoint");
    let bootstrap = format!("b.test={}", boot.display());
    let a_dir = tempfile::tempdir().unwrap();
    // x.test "lives" at b.test's endpoint too: its SVID names b.test, so it is refused.
    let wrong = format!("x.test=https://127.0.0.1:{port}/,spiffe://x.test/citadel/bundle-endpoint");
    let wrong_boot = format!("x.test={}", boot.display());
    let a_flags = [
        "--trust-domain",
        "a.test",
        "--federate-with",
        &federate,
        "--federate-with",
        &wrong,
        "--federation-bootstrap-bundle",
        &bootstrap,
        "--federation-bootstrap-bundle",
        &wrong_boot,
    ];
    let a = TestCa::start_in(a_dir.path(), &a_flags).await;
    let a_state = a.state_dir();
    eventually("a.test stores b.test's bundle", 20, async || {
        stored(&a_state, "b.test").is_some_and(|d| x509_of(&d) == pem_certs(&b.root_pem()))
    })
    .await;
    let doc = stored(&a_state, "b.test").unwrap();
    assert_eq!(doc["spiffe_refresh_hint"], 1);
    // Never merged: a.test's own trust bundle is its own roots only.
    let own = pem_certs(&a.root_pem());
    assert!(x509_of(&doc).iter().all(|r| !own.contains(r)));
    assert_eq!(own.len(), 1);
    let m = a.metrics().await;
    assert!(
        metric(
            &m,
            "citadel_federation_fetch_total{trust_domain=\"b.test\",result=\"ok\"}"
        ) >= 1,
        "{m}"
    );
    // The endpoint of the wrong trust domain is refused and nothing is stored for x.test.
    eventually("x.test refused", 20, async || {
        metric(
            &a.metrics().await,
            "citadel_federation_fetch_total{trust_domain=\"x.test\",result=\"refused\"}",
        ) >= 1
    })
    .await;
    assert!(stored(&a_state, "x.test").is_none());
    assert_eq!(
        metric(
            &a.metrics().await,
            "citadel_federation_fetch_total{trust_domain=\"x.test\",result=\"ok\"}"
        ),
        0
    );

    // FetchFederatedBundles on a.test's CA port: no credentials is Unauthenticated, a bad
    // token too, and the port keeps serving; a workload gets b.test's bundle, alone.
    let mut fed = federation_client(&a).await;
    for token in [None, Some("not-a-token")] {
        let e = fetch_federated(&mut fed, token).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    }
    let got = fetch_federated(&mut fed, Some(&token("shop", "cart")))
        .await
        .expect("served after refusals");
    assert_eq!(got.bundles.len(), 1);
    assert_eq!(got.bundles[0].trust_domain, "b.test");
    let doc: Value = serde_json::from_slice(&got.bundles[0].spiffe_bundle).unwrap();
    assert_eq!(x509_of(&doc), pem_certs(&b.root_pem()));

    // A root rotation in b.test reaches a.test through the endpoint.
    let seq_before = doc["spiffe_sequence"].as_u64().unwrap();
    citadel_ok(
        &["ca", "rotate-root", "--activate-after", "1h"],
        &b.state_dir(),
    );
    eventually("a.test holds b.test's old and new roots", 30, async || {
        stored(&a_state, "b.test").is_some_and(|d| x509_of(&d).len() == 2)
    })
    .await;
    let doc = stored(&a_state, "b.test").unwrap();
    assert!(doc["spiffe_sequence"].as_u64().unwrap() > seq_before);
    assert_eq!(x509_of(&doc), pem_certs(&b.root_pem()));

    // A restart of a.test without the bootstrap bundle starts from the stored one and
    // authenticates b.test's endpoint with it.
    a.stop().await;
    let a = TestCa::start_in(a_dir.path(), &a_flags[..4]).await;
    let before = metric(
        &a.metrics().await,
        "citadel_federation_fetch_total{trust_domain=\"b.test\",result=\"ok\"}",
    );
    eventually("a.test fetches again after its restart", 20, async || {
        metric(
            &a.metrics().await,
            "citadel_federation_fetch_total{trust_domain=\"b.test\",result=\"ok\"}",
        ) > before
    })
    .await;
    a.stop().await;
    b.stop().await;
}

/// Our fetcher against a third-party endpoint (go-spiffe's federation.NewHandler over
/// https_web): it takes the bundle; when the endpoint then serves garbage, or a CA naming
/// another trust domain, or a key of another use, each is refused, counted, and the last
/// good bundle is kept (file and metrics); a good document is taken again afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fetcher_refuses_garbage_and_a_wrong_trust_domain_and_keeps_the_last_good() {
    let Some(bin) = gofederation() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let (roots, cert, key) = web_pki(tmp.path());
    // A good c.test bundle: one CA, with a hint of 1 s.
    let good = bundle_doc("spiffe://c.test", true, "x509-svid");
    let doc_path = tmp.path().join("bundle.json");
    std::fs::write(&doc_path, &good).unwrap();
    let port = free_port();
    let mut server = tokio::process::Command::new(&bin)
        .args([
            "serve",
            "c.test",
            &format!("127.0.0.1:{port}"),
            doc_path.to_str().unwrap(),
            cert.to_str().unwrap(),
            key.to_str().unwrap(),
        ])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    {
        use tokio::io::AsyncBufReadExt;
        let mut lines = tokio::io::BufReader::new(server.stdout.take().unwrap()).lines();
        let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(line.as_deref(), Some("serving"));
    }
    let federate = format!("c.test=https://127.0.0.1:{port}/");
    let a = TestCa::start(&[
        "--trust-domain",
        "a.test",
        "--federate-with",
        &federate,
        "--federation-web-roots",
        roots.to_str().unwrap(),
    ])
    .await;
    let state = a.state_dir();
    eventually("a.test stores c.test's bundle", 20, async || {
        stored(&state, "c.test").is_some()
    })
    .await;
    let kept = std::fs::read(state.join("federation/c.test.json")).unwrap();
    let refused = "citadel_federation_fetch_total{trust_domain=\"c.test\",result=\"refused\"}";
    let ok = "citadel_federation_fetch_total{trust_domain=\"c.test\",result=\"ok\"}";
    for (what, bad) in [
        (
            "garbage served with 200",
            b"RAW:this is not a bundle".to_vec(),
        ),
        (
            "an endpoint error (go-spiffe cannot parse its source: 500)",
            b"garbage".to_vec(),
        ),
        ("a key of another use", {
            let mut d = b"RAW:".to_vec();
            d.extend(bundle_doc("spiffe://c.test", true, "wit-svid"));
            d
        }),
        (
            "a CA of another trust domain",
            bundle_doc("spiffe://x.test", true, "x509-svid"),
        ),
        (
            "a non-CA certificate",
            bundle_doc("spiffe://c.test", false, "x509-svid"),
        ),
    ] {
        std::fs::write(&doc_path, &bad).unwrap();
        let before = metric(&a.metrics().await, refused);
        eventually(&format!("{what} refused"), 20, async || {
            metric(&a.metrics().await, refused) > before + 1
        })
        .await;
        assert_eq!(
            std::fs::read(state.join("federation/c.test.json")).unwrap(),
            kept,
            "{what}: the last good bundle is kept"
        );
    }
    // A good document again is taken.
    std::fs::write(&doc_path, bundle_doc("spiffe://c.test", true, "x509-svid")).unwrap();
    let before = metric(&a.metrics().await, ok);
    eventually("a good bundle taken again", 20, async || {
        metric(&a.metrics().await, ok) > before
            && std::fs::read(state.join("federation/c.test.json")).unwrap() != kept
    })
    .await;
    a.stop().await;
    let _ = server.kill().await;
}

/// A SPIFFE bundle document with one certificate (`ca` or not, URI SAN `uri`) as a key of
/// use `use_`, and a hint of 1 s.
fn bundle_doc(uri: &str, ca: bool, use_: &str) -> Vec<u8> {
    use base64::Engine;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, PublicKeyData, SanType};
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    if ca {
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    }
    p.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
    let c = p.self_signed(&key).unwrap();
    let mut k = citadel::pki::spiffe_bundle::public_jwk(&key.subject_public_key_info()).unwrap();
    k["use"] = use_.into();
    k["x5c"] = serde_json::json!([base64::engine::general_purpose::STANDARD.encode(c.der())]);
    serde_json::to_vec(
        &serde_json::json!({"keys": [k], "spiffe_refresh_hint": 1, "spiffe_sequence": 1}),
    )
    .unwrap()
}

/// `citadel agent` in trust domain `td` for shop/`sa`, SDS on a socket in `dir`, 10 s
/// leaves, the foreign trust domain `foreign` allowed into SDS ROOTCA, federated bundles
/// re-read every second.
fn spawn_federated_agent(
    dir: &Path,
    ca: &TestCa,
    td: &str,
    sa: &str,
    foreign: &str,
) -> (std::process::Child, PathBuf) {
    let token = dir.join(format!("{sa}.jwt"));
    std::fs::write(&token, self::token("shop", sa)).unwrap();
    let sock = dir.join(format!("{sa}.sock"));
    let log = std::fs::File::create(dir.join(format!("agent-{sa}.log"))).unwrap();
    let child = std::process::Command::new(crate::support::process::BIN)
        .args(["agent", "--ca-addr", &ca.addr.to_string()])
        .args(["--tls-server-name", "localhost", "--trust-domain", td])
        .arg("--ca-root-cert")
        .arg(ca.state_dir().join("root-cert.pem"))
        .arg("--token-file")
        .arg(&token)
        .arg("--sds-socket")
        .arg(&sock)
        .arg("--workload-api-socket")
        .arg(dir.join(format!("{sa}-spiffe.sock")))
        .args(["--sds-federated-trust-domain", foreign])
        .args(["--federated-bundles-refresh", "1s", "--cert-ttl", "10s"])
        .args([
            "--retry-initial",
            "200ms",
            "--retry-max",
            "2s",
            "--metrics-listen",
            "",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    (child, sock)
}

/// The federated pair with real Envoys: a.test's frontend calls b.test's cart with mTLS,
/// each Envoy fed by its own domain's agent over SDS, each requiring the other domain's
/// SPIFFE ID (SAN match). The trust comes only from federation: each citadel follows the
/// other's https_spiffe bundle endpoint, each agent puts the other domain's roots in SDS
/// ROOTCA. Then b.test's root rotates through all its stages while requests flow: zero may
/// fail, and a.test ends up holding b.test's new root (and only it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoys_in_two_trust_domains_talk_mtls_through_federation_and_a_root_rotation() {
    let Some(envoy) = crate::envoy::envoy_binary() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let (a_dir, b_dir) = (dir.join("a"), dir.join("b"));
    std::fs::create_dir_all(&a_dir).unwrap();
    std::fs::create_dir_all(&b_dir).unwrap();
    let (a_port, b_port) = (free_port(), free_port());
    let short = [
        "--default-ttl",
        "10s",
        "--max-ttl",
        "12s",
        "--reconcile-interval",
        "200ms",
        "--clock-skew-margin",
        "1s",
        "--jwt-bundle-refresh-hint",
        "1s",
    ];
    let endpoint = |td: &str, port: u16| {
        format!("{td}=https://127.0.0.1:{port}/,spiffe://{td}/citadel/bundle-endpoint")
    };
    let a_endpoint = format!("127.0.0.1:{a_port}");
    let b_endpoint = format!("127.0.0.1:{b_port}");
    // From nothing: a.test's CA first (no federation yet), so b.test can bootstrap from its
    // bundle; then b.test federating with a.test; then a.test again, federating with b.test.
    let mut flags_a: Vec<String> = ["--trust-domain", "a.test", "--bundle-endpoint", &a_endpoint]
        .iter()
        .chain(short.iter())
        .map(|s| s.to_string())
        .collect();
    let a = TestCa::start_in(
        &a_dir,
        &flags_a.iter().map(String::as_str).collect::<Vec<_>>(),
    )
    .await;
    let a_boot = format!("a.test={}", a.state_dir().join("root-cert.pem").display());
    let fed_a = endpoint("a.test", a_port);
    let mut flags_b: Vec<&str> = vec!["--trust-domain", "b.test", "--bundle-endpoint", &b_endpoint];
    flags_b.extend(short);
    flags_b.extend([
        "--federate-with",
        &fed_a,
        "--federation-bootstrap-bundle",
        &a_boot,
    ]);
    let b = TestCa::start_in(&b_dir, &flags_b).await;
    a.stop().await;
    let b_boot = format!("b.test={}", b.state_dir().join("root-cert.pem").display());
    flags_a.extend([
        "--federate-with".into(),
        endpoint("b.test", b_port),
        "--federation-bootstrap-bundle".into(),
        b_boot,
    ]);
    let a = TestCa::start_in(
        &a_dir,
        &flags_a.iter().map(String::as_str).collect::<Vec<_>>(),
    )
    .await;
    let (a_state, b_state) = (a.state_dir(), b.state_dir());
    eventually("each citadel holds the other's bundle", 30, async || {
        stored(&a_state, "b.test").is_some() && stored(&b_state, "a.test").is_some()
    })
    .await;

    let backend = crate::envoy::backend().await;
    let (cart_agent, cart_sock) = spawn_federated_agent(&dir, &b, "b.test", "cart", "a.test");
    let (front_agent, front_sock) = spawn_federated_agent(&dir, &a, "a.test", "frontend", "b.test");
    let mut procs = crate::envoy::Procs(vec![cart_agent, front_agent]);
    let base = std::process::id() % 1000 * 10 + 5;
    let (cart_admin, cart_port, front_admin, front_port) =
        (free_port(), free_port(), free_port(), free_port());
    procs.0.push(crate::envoy::spawn_envoy(
        &envoy,
        &dir,
        "cart-envoy",
        &crate::envoy::server_envoy(
            cart_admin,
            cart_port,
            backend,
            &cart_sock,
            "spiffe://a.test/ns/shop/sa/frontend",
        ),
        base + 1,
    ));
    procs.0.push(crate::envoy::spawn_envoy(
        &envoy,
        &dir,
        "frontend-envoy",
        &crate::envoy::client_envoy(
            "frontend",
            front_admin,
            front_port,
            cart_port,
            &front_sock,
            "spiffe://b.test/ns/shop/sa/cart",
        ),
        base + 2,
    ));
    crate::envoy::wait_ready(cart_admin, "cart envoy", &dir).await;
    crate::envoy::wait_ready(front_admin, "frontend envoy", &dir).await;
    let front: std::net::SocketAddr = format!("127.0.0.1:{front_port}").parse().unwrap();
    eventually("a first request across the trust domains", 30, async || {
        matches!(http_get(front, "/").await, Ok((200, _)))
    })
    .await;

    // go-spiffe's Workload API client beside the frontend sees both trust domains' bundles,
    // each under its own key.
    let mut go_watch = crate::thirdparty::built_program(
        "CITADEL_GOWORKLOAD",
        "the go-spiffe Workload API client (tests/goworkload)",
    )
    .map(|bin| {
        let endpoint = format!("unix://{}", dir.join("frontend-spiffe.sock").display());
        GoLines::spawn(&bin, &["x509", "-timeout", "300s", "-socket", &endpoint])
    });
    if let Some(w) = go_watch.as_mut() {
        let b_fps = fingerprints(&pem_certs(&b.root_pem()));
        let v = w
            .until("a bundles update with a.test and b.test", 30, |v| {
                v["kind"] == "bundles" && v["bundles"]["spiffe://b.test"].is_array()
            })
            .await;
        assert_eq!(
            serde_json::from_value::<Vec<String>>(v["bundles"]["spiffe://b.test"].clone()).unwrap(),
            b_fps,
            "{v}"
        );
        assert_eq!(
            serde_json::from_value::<Vec<String>>(v["bundles"]["spiffe://a.test"].clone()).unwrap(),
            fingerprints(&pem_certs(&a.root_pem())),
            "{v}"
        );
    }

    let traffic = crate::envoy::Traffic::start(front);
    // b.test's root rotates through all its stages; each stage waits 15 s, which the
    // federation path (b's endpoint, a's fetch at the 1 s hint, a's agent every second,
    // SDS) must beat.
    let old_root = pem_certs(&b.root_pem());
    crate::envoy::rotate_root_to_completion(&b_state, "15s", 120).await;
    let new_root = pem_certs(&b.root_pem());
    assert_ne!(old_root, new_root);
    eventually("a.test holds only b.test's new root", 30, async || {
        stored(&a_state, "b.test").is_some_and(|d| x509_of(&d) == new_root)
    })
    .await;
    if let Some(w) = go_watch.as_mut() {
        let want = fingerprints(&new_root);
        w.until("go-spiffe receives b.test's new bundle", 30, |v| {
            v["kind"] == "bundles"
                && serde_json::from_value::<Vec<String>>(v["bundles"]["spiffe://b.test"].clone())
                    .is_ok_and(|f| f == want)
        })
        .await;
    }
    // Leaves renewed under the new root only.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let (ok, failed) = traffic.finish().await;
    eprintln!(
        "across trust domains through b.test's root rotation: {ok} requests ok, {failed} failed"
    );
    if failed > 0 {
        std::mem::forget(tmp);
    }
    assert_eq!(failed, 0, "requests failed; logs in {}", dir.display());
    assert!(ok > 300, "only {ok} requests were sent");
    // SAN matching is real: the cart's Envoy refuses a.test's identity other than frontend.
    assert_eq!(crate::envoy::stat(cart_admin, "fail_verify_san").await, 0);
    drop(procs);
    a.stop().await;
    b.stop().await;
}

fn fingerprints(ders: &[Vec<u8>]) -> Vec<String> {
    ders.iter()
        .map(|d| hex::encode(ring::digest::digest(&ring::digest::SHA256, d)))
        .collect()
}

/// JSON lines from a go-spiffe client's stdout.
struct GoLines {
    _child: tokio::process::Child,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
    seen: Vec<Value>,
}

impl GoLines {
    fn spawn(bin: &Path, args: &[&str]) -> Self {
        let mut child = tokio::process::Command::new(bin)
            .args(args)
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        use tokio::io::AsyncBufReadExt;
        GoLines {
            _child: child,
            lines: tokio::io::BufReader::new(out).lines(),
            seen: vec![],
        }
    }

    async fn until(&mut self, what: &str, secs: u64, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let line = tokio::time::timeout_at(deadline, self.lines.next_line())
                .await
                .unwrap_or_else(|_| panic!("{what}: not within {secs}s; lines: {:#?}", self.seen))
                .unwrap()
                .unwrap_or_else(|| panic!("{what}: the client exited; lines: {:#?}", self.seen));
            let v: Value = serde_json::from_str(&line).unwrap();
            self.seen.push(v.clone());
            if pred(&v) {
                return v;
            }
        }
    }
}

/// Each flag mistake stops the start with a reason that names the flag.
#[tokio::test]
async fn federation_flag_mistakes_are_refused_with_a_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "--bundle-endpoint-spiffe-id".into(),
                "spiffe://cluster.local/x".into(),
            ],
            "need --bundle-endpoint",
        ),
        (
            vec![
                "--bundle-endpoint".into(),
                "127.0.0.1:0".into(),
                "--bundle-endpoint-spiffe-id".into(),
                "spiffe://other.test/x".into(),
            ],
            "must be in this trust domain",
        ),
        (
            vec![
                "--federate-with".into(),
                "cluster.local=https://127.0.0.1:1/".into(),
                "--federation-web-roots".into(),
                "/dev/null".into(),
            ],
            "our own trust domain",
        ),
        (
            vec![
                "--federate-with".into(),
                "b.test=https://127.0.0.1:1/".into(),
            ],
            "--federation-web-roots",
        ),
        (
            vec![
                "--federate-with".into(),
                "b.test=https://127.0.0.1:1/,spiffe://b.test/e".into(),
            ],
            "needs --federation-bootstrap-bundle b.test=FILE",
        ),
        (
            vec![
                "--federation-bootstrap-bundle".into(),
                "b.test=/nowhere".into(),
            ],
            "no --federate-with for b.test",
        ),
        (
            vec!["--federate-with".into(), "b.test=ftp://x/".into()],
            "https://host",
        ),
    ];
    for (i, (flags, want)) in cases.iter().enumerate() {
        let dir = tmp.path().join(i.to_string());
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let e = TestCa::try_start_in(&dir, &flags)
            .await
            .err()
            .unwrap_or_else(|| panic!("{flags:?} started"));
        assert!(e.contains(want), "{flags:?}: {e}");
    }
}
