//! Unmodified istiod in RA mode with citadel as its Kubernetes CSR signer: `pilot-discovery`
//! and `pilot-agent` of the SAME Istio version (scripts/istio-agent.sh builds both), a REAL
//! kube-apiserver 1.37, and citadel (`serve --store kube --csr-signer ...`). istiod runs with
//! `EXTERNAL_CA=ISTIOD_RA_KUBERNETES_API`, `K8S_SIGNER=citadel.dev/spiffe` and
//! `CERT_SIGNER_DOMAIN=citadel.dev`, authenticates each pilot-agent with a TokenReview,
//! creates and approves a CSR, and waits for citadel's answer, which it verifies against the
//! roots citadel published (the `external-ca-cert` Secret, mounted where istiod reads it). What
//! istiod needs and why: docs/istio-ra.md.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::rbac::v1::ClusterRoleBinding;
use kube::api::{Api, PostParams};

use crate::csr_signer::{
    answered, certificate, client_as, create, csr_object, decide, ders, grant_csr_rights,
    legacy_ca, published_roots,
};
use crate::kube::{leads, ready, replica_with};
use crate::pilot_agent::{create_pod, istio_binary, Group};
use crate::podcert::pem_blocks;
use crate::support::wait::condition;
use crate::support::*;

const NS: &str = "shop";

fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// istiod's serving certificate (its `--tlsCertFile`): from a throwaway CA of the test, so
/// that nothing about it comes from citadel. Returns the CA's PEM.
fn serving_cert(dir: &Path) -> String {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "istiod test serving CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca, &ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(vec![
        "istiod.istio-system.svc".to_string(),
        "localhost".to_string(),
    ])
    .unwrap();
    p.subject_alt_names.push(rcgen::SanType::IpAddress(
        std::net::Ipv4Addr::LOCALHOST.into(),
    ));
    let cert = p.signed_by(&key, &issuer).unwrap();
    std::fs::write(dir.join("tls.crt"), cert.pem()).unwrap();
    std::fs::write(dir.join("tls.key"), key.serialize_pem()).unwrap();
    std::fs::write(dir.join("ca.crt"), ca_cert.pem()).unwrap();
    ca_cert.pem()
}

async fn accepts(addr: SocketAddr) -> bool {
    tokio::net::TcpStream::connect(addr).await.is_ok()
}

/// One pilot-agent as the sidecar injector runs it, without Envoy: it fetches its
/// certificate from istiod and writes it to `<pod>/out` (OUTPUT_CERTS).
#[allow(clippy::too_many_arguments)]
fn pilot_agent(
    bin: &Path,
    pod_dir: &Path,
    pod: &str,
    sa: &str,
    token: &str,
    serving_ca: &str,
    istiod: SocketAddr,
    cert_signer: Option<&str>,
) -> Group {
    let token_file = pod_dir.join("var/run/secrets/tokens/istio-token");
    let root_file = pod_dir.join("var/run/secrets/istio/root-cert.pem");
    for d in [
        token_file.parent().unwrap(),
        root_file.parent().unwrap(),
        &pod_dir.join("etc/istio/proxy"),
        &pod_dir.join("out"),
    ] {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::write(&token_file, token).unwrap();
    std::fs::write(&root_file, serving_ca).unwrap();
    let proxy_config = format!(
        "{{discoveryAddress: '127.0.0.1:{}', statusPort: {}, proxyAdminPort: {}}}",
        free_port(),
        free_port(),
        free_port()
    );
    let mut cmd = Command::new(bin);
    cmd.args(["proxy", "sidecar"])
        .current_dir(pod_dir)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("CA_ADDR", istiod.to_string())
        .env("PILOT_CERT_PROVIDER", "istiod")
        .env("JWT_POLICY", "third-party-jwt")
        .env("ISTIO_META_CLUSTER_ID", "Kubernetes")
        .env("POD_NAME", pod)
        .env("POD_NAMESPACE", NS)
        .env("SERVICE_ACCOUNT", sa)
        .env("INSTANCE_IP", "127.0.0.1")
        .env("PROXY_CONFIG", proxy_config)
        .env("DISABLE_ENVOY", "true")
        .env("OUTPUT_CERTS", pod_dir.join("out"))
        .stdout(std::fs::File::create(pod_dir.join("pilot-agent.log")).unwrap())
        .stderr(Stdio::inherit());
    if let Some(s) = cert_signer {
        cmd.env("ISTIO_META_CERT_SIGNER", s);
    }
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    Group(cmd.spawn().expect("start pilot-agent"))
}

/// Waits for the certificate pilot-agent wrote, and returns (chain, roots) as it holds them.
async fn agent_certificate(pod_dir: &Path, istiod_log: &Path) -> (String, String) {
    let out = pod_dir.join("out");
    let t0 = Instant::now();
    loop {
        if let (Ok(chain), Ok(roots)) = (
            std::fs::read_to_string(out.join("cert-chain.pem")),
            std::fs::read_to_string(out.join("root-cert.pem")),
        ) {
            if !chain.is_empty() && !roots.is_empty() {
                return (chain, roots);
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(90),
            "pilot-agent got no certificate.\npilot-agent:\n{}\nistiod (tail):\n{}",
            std::fs::read_to_string(pod_dir.join("pilot-agent.log")).unwrap_or_default(),
            tail(istiod_log)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(60)..].join("\n")
}

/// Whether `chain` (leaf first; the roots pilot-agent appends are ignored) verifies for `id`
/// to `roots` alone, by webpki.
fn verifies(chain: &str, roots: &str, id: &citadel::identity::SpiffeId) -> bool {
    let root_set = ders(roots);
    let mut elems: Vec<String> = pem_blocks(chain)
        .into_iter()
        .filter(|c| !root_set.contains(&ders(c)[0]))
        .collect();
    elems.push(roots.to_string());
    citadel::client::verify_response(&elems, Some(id), time::OffsetDateTime::now_utc()).is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmodified_istiod_in_ra_mode_gets_workload_certificates_from_citadel() {
    let Some(discovery) = istio_binary("pilot-discovery", "CITADEL_PILOT_DISCOVERY", "discovery")
    else {
        return;
    };
    let Some(agent) = istio_binary("pilot-agent", "CITADEL_PILOT_AGENT", "ensure") else {
        return;
    };
    let Some(kube) = KubeEnv::start().await else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();

    // The cluster: istiod's service account (cluster-admin here: this test is about its
    // CSRs, not the rest of its RBAC), two workloads, citadel in its own namespace.
    kube.namespace("citadel").await;
    kube.service_account("istio-system", "istiod").await;
    kube.service_account(NS, "cart").await;
    kube.service_account(NS, "ledger").await;
    grant_csr_rights(&kube).await;
    let admin: ClusterRoleBinding = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "test-istiod-admin"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
        "subjects": [{"kind": "ServiceAccount", "name": "istiod", "namespace": "istio-system"}]
    }))
    .unwrap();
    Api::<ClusterRoleBinding>::all(kube.client.clone())
        .create(&PostParams::default(), &admin)
        .await
        .unwrap();
    let cart_uid = create_pod(&kube, NS, "cart-0", "cart").await;
    let ledger_uid = create_pod(&kube, NS, "ledger-0", "ledger").await;

    // citadel: its own CA for citadel.dev/spiffe, a plugged-in CA for citadel.dev/legacy.
    let (legacy, legacy_root) = legacy_ca(dir);
    let legacy_flag = format!("citadel.dev/legacy={}", legacy.display());
    let citadel = replica_with(
        &kube,
        "ra",
        "citadel",
        &[
            "--csr-signer",
            "citadel.dev/spiffe",
            "--csr-signer",
            &legacy_flag,
        ],
    );
    eventually("citadel ready and leading", 30, async || {
        ready(&citadel).await && leads(&citadel).await
    })
    .await;

    // What istiod reads at /etc/external-ca-cert: the Secret citadel keeps, as a volume would mount it.
    let ra_roots = published_roots(&kube, "citadel").await;
    let legacy_der = ders(&legacy_root);
    let citadel_root: String = pem_blocks(&ra_roots)
        .into_iter()
        .filter(|b| !legacy_der.contains(&ders(b)[0]))
        .collect();
    assert_eq!(
        pem_blocks(&citadel_root).len(),
        1,
        "citadel's own root, and the legacy one"
    );

    // istiod, unmodified, in RA mode, from its own working directory.
    let istiod_dir = dir.join("istiod");
    std::fs::create_dir_all(istiod_dir.join("etc/external-ca-cert")).unwrap();
    std::fs::write(
        istiod_dir.join("etc/external-ca-cert/root-cert.pem"),
        &ra_roots,
    )
    .unwrap();
    let serving_ca = serving_cert(&istiod_dir);
    let kubeconfig = istiod_dir.join("kubeconfig");
    kube.kubeconfig_as("istio-system", "istiod", &kubeconfig)
        .await;
    let (http, https, grpc, secure, monitoring) = (
        free_addr(),
        free_addr(),
        free_addr(),
        free_addr(),
        free_addr(),
    );
    let istiod_log = dir.join("istiod.log");
    let mut cmd = Command::new(&discovery);
    cmd.arg("discovery")
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .args([
            "--httpAddr",
            &http.to_string(),
            "--httpsAddr",
            &https.to_string(),
            "--grpcAddr",
            &grpc.to_string(),
            "--secureGRPCAddr",
            &secure.to_string(),
            "--monitoringAddr",
            &monitoring.to_string(),
            "--tlsCertFile",
            "tls.crt",
            "--tlsKeyFile",
            "tls.key",
            "--caCertFile",
            "ca.crt",
            "--log_output_level",
            "default:info,pkira:debug,ca:debug",
        ])
        .current_dir(&istiod_dir)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("POD_NAMESPACE", "istio-system")
        .env("POD_NAME", "istiod-test")
        .env("REVISION", "default")
        .env("JWT_POLICY", "third-party-jwt")
        .env("CLUSTER_ID", "Kubernetes")
        .env("EXTERNAL_CA", "ISTIOD_RA_KUBERNETES_API")
        .env("K8S_SIGNER", "citadel.dev/spiffe")
        .env("CERT_SIGNER_DOMAIN", "citadel.dev")
        // No webhooks to patch here, and istiod's own CA (built beside the RA when istiod
        // signs its own serving certificate) must not take istio-ca-secret from citadel.
        .env("INJECTION_WEBHOOK_CONFIG_NAME", "")
        .env("VALIDATION_WEBHOOK_CONFIG_NAME", "")
        .stdout(std::fs::File::create(&istiod_log).unwrap())
        .stderr(std::fs::File::create(dir.join("istiod.stderr")).unwrap());
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let _istiod = Group(cmd.spawn().expect("start pilot-discovery"));
    let version = Command::new(&discovery)
        .args(["version", "-s"])
        .output()
        .unwrap();
    eprintln!(
        "pilot-discovery {}",
        String::from_utf8_lossy(&version.stdout).trim()
    );
    let t0 = Instant::now();
    while !accepts(secure).await {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "istiod did not open its CA port:\n{}\n{}",
            tail(&istiod_log),
            std::fs::read_to_string(dir.join("istiod.stderr")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!("istiod serving after {:?}", t0.elapsed());

    // Workload 1: the default signer, citadel's own CA.
    let cart_token = kube.pod_token(NS, "cart", "cart-0", &cart_uid).await;
    let cart_dir = dir.join("cart-pod");
    let t1 = Instant::now();
    let _cart = pilot_agent(
        &agent,
        &cart_dir,
        "cart-0",
        "cart",
        &cart_token,
        &serving_ca,
        secure,
        None,
    );
    let (chain, roots) = agent_certificate(&cart_dir, &istiod_log).await;
    eprintln!(
        "pilot-agent -> istiod -> CSR -> citadel -> certificate in {:?}",
        t1.elapsed()
    );
    let cart_id = spiffe(NS, "cart");
    assert!(
        verifies(&chain, &citadel_root, &cart_id),
        "cart's chain verifies to citadel's root:\n{chain}"
    );
    assert!(
        !verifies(&chain, &legacy_root, &cart_id),
        "not to the legacy root"
    );
    assert_eq!(
        ders(&roots),
        ders(&ra_roots),
        "the roots istiod hands out are citadel's"
    );

    // Workload 2: ISTIO_META_CERT_SIGNER=legacy selects citadel.dev/legacy, the mapped CA.
    let ledger_token = kube.pod_token(NS, "ledger", "ledger-0", &ledger_uid).await;
    let ledger_dir = dir.join("ledger-pod");
    let _ledger = pilot_agent(
        &agent,
        &ledger_dir,
        "ledger-0",
        "ledger",
        &ledger_token,
        &serving_ca,
        secure,
        Some("legacy"),
    );
    let (chain, _) = agent_certificate(&ledger_dir, &istiod_log).await;
    let ledger_id = spiffe(NS, "ledger");
    assert!(
        verifies(&chain, &legacy_root, &ledger_id),
        "ledger's chain verifies to the legacy root:\n{chain}"
    );
    assert!(
        !verifies(&chain, &citadel_root, &ledger_id),
        "not to citadel's own"
    );
    let legacy_int = std::fs::read_to_string(legacy.join("ca-cert.pem")).unwrap();
    assert!(
        ders(&chain).contains(&ders(&legacy_int)[0]),
        "signed by the legacy intermediate"
    );

    // Both went through citadel as CSRs, which istiod deleted after reading them.
    let m = http_get(citadel.metrics, "/metrics").await.unwrap().1;
    assert!(
        m.lines().any(|l| l
            .strip_prefix("citadel_csr_signed_total ")
            .and_then(|n| n.parse::<u64>().ok())
            .is_some_and(|n| n >= 2)),
        "{m}"
    );

    // A CSR from a requester not allowed the identity: Failed at once (istiod would give up
    // after 60 s; the Failed condition tells an operator why).
    let cart = client_as(&kube, dir, NS, "cart").await;
    create(
        &cart,
        &csr_object(
            "cart-wants-ledger",
            "citadel.dev/spiffe",
            &ledger_id.to_string(),
            &["client auth"],
            None,
        ),
    )
    .await;
    decide(&kube.client, "cart-wants-ledger", "Approved").await;
    let c = answered(&kube, "cart-wants-ledger").await;
    assert!(certificate(&c).is_none());
    assert_eq!(
        condition(&c, "Failed").map(|f| f.reason).as_deref(),
        Some("RequesterNotAllowed")
    );
}
