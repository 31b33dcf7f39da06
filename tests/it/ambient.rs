//! Ambient mode against a REAL kube-apiserver: ztunnel, authenticated with its own pod-bound
//! token, asks for the certificates of workloads on its node (`ImpersonatedIdentity`), with
//! istiod's checks (`--trusted-node-accounts`). Nodes and pods are API objects only (no
//! kubelet): a pod is on a node because its spec.nodeName says so.

use citadel::pki::KeyType;
use tonic::Code;

use crate::support::*;

const REFUSED: &str = citadel::server::istio::IMPERSONATION_REFUSED;

fn impersonate(id: &str) -> prost_types::Struct {
    let mut s = prost_types::Struct::default();
    s.fields.insert(
        "ImpersonatedIdentity".into(),
        prost_types::Value {
            kind: Some(prost_types::value::Kind::StringValue(id.into())),
        },
    );
    s
}

/// The value of one series on /metrics (0 when absent).
async fn metric(ca: &TestCa, series: &str) -> u64 {
    ca.metrics()
        .await
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0)
}

async fn refusals(ca: &TestCa, reason: &str) -> u64 {
    metric(
        ca,
        &format!("citadel_impersonation_refusals{{reason=\"{reason}\"}}"),
    )
    .await
}

async fn wait_synced(ca: &TestCa) {
    eventually("the pod index syncs", 30, async || {
        metric(ca, "citadel_pod_index_synced").await == 1
    })
    .await;
}

/// ztunnel (on `token`) asks for `id`'s certificate with a CSR for `id`.
async fn ask(
    client: &mut citadel::client::CaClient,
    token: &str,
    id: &str,
) -> Result<Vec<String>, tonic::Status> {
    let key = KeyType::EcP256.generate().unwrap();
    let csr = citadel::pki::csr::build(&key, id).unwrap();
    call(client, &csr, Some(&bearer(token)), 0, Some(impersonate(id))).await
}

/// The leaf names exactly `id` (ztunnel checks this too) and chains to the CA.
fn assert_issued_for(chain: &[String], id: &str) {
    let v = citadel::client::verify_response(
        chain,
        Some(&citadel::identity::SpiffeId::parse(id).unwrap()),
        time::OffsetDateTime::now_utc(),
    )
    .unwrap();
    assert_eq!(v.leaf.uri_sans, vec![id.to_string()]);
}

/// The cluster both tests share: nodes n1 and n2; ztunnel (trusted) on each; an untrusted
/// node proxy on n1; shop/cart on n1, shop/pay only on n2, shop/batch only as a Failed pod
/// on n1, and 16 accounts many/w0..w15 with a pod each on n1. Returns ztunnel's n1 pod UID.
async fn cluster(kube: &KubeEnv) -> String {
    kube.node("n1").await;
    kube.node("n2").await;
    kube.service_account("istio-system", "ztunnel").await;
    kube.service_account("istio-system", "imposter").await;
    let zt = kube
        .pod_on("istio-system", "ztunnel-n1", "ztunnel", Some("n1"))
        .await;
    kube.pod_on("istio-system", "ztunnel-n2", "ztunnel", Some("n2"))
        .await;
    kube.pod_on("istio-system", "imposter-n1", "imposter", Some("n1"))
        .await;
    for sa in ["cart", "pay", "batch"] {
        kube.service_account("shop", sa).await;
    }
    kube.pod_on("shop", "cart-1", "cart", Some("n1")).await;
    kube.pod_on("shop", "pay-1", "pay", Some("n2")).await;
    kube.pod_on("shop", "batch-1", "batch", Some("n1")).await;
    kube.set_phase("shop", "batch-1", "Failed").await;
    for i in 0..16 {
        kube.service_account("many", &format!("w{i}")).await;
        kube.pod_on("many", &format!("w{i}-pod"), &format!("w{i}"), Some("n1"))
            .await;
    }
    zt
}

const CART: &str = "spiffe://cluster.local/ns/shop/sa/cart";

#[tokio::test]
async fn ambient_ztunnel_gets_certificates_for_its_nodes_workloads_only_tokenreview() {
    let Some(kube) = KubeEnv::start().await else {
        return;
    };
    let zt_uid = cluster(&kube).await;
    let kubeconfig = kube.kubeconfig.to_str().unwrap().to_string();
    let ca = TestCa::start(&[
        "--kubeconfig",
        &kubeconfig,
        "--auth",
        "tokenreview",
        "--trusted-node-accounts",
        "istio-system/ztunnel",
    ])
    .await;
    wait_synced(&ca).await;
    let mut client = ca.client().await;
    let zt = kube
        .pod_token("istio-system", "ztunnel", "ztunnel-n1", &zt_uid)
        .await;

    // Many identities at once, each certificate naming exactly the one asked for.
    let mut tasks = Vec::new();
    for i in 0..16 {
        let (mut c, t) = (client.clone(), zt.clone());
        tasks.push(tokio::spawn(async move {
            let id = format!("spiffe://cluster.local/ns/many/sa/w{i}");
            let chain = ask(&mut c, &t, &id)
                .await
                .unwrap_or_else(|e| panic!("{id}: {e:?}"));
            assert_issued_for(&chain, &id);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_issued_for(&ask(&mut client, &zt, CART).await.unwrap(), CART);
    assert_eq!(
        metric(
            &ca,
            "citadel_impersonated_issuance_count{node_account=\"istio-system/ztunnel\"}"
        )
        .await,
        17
    );

    // ztunnel's own certificate, for the client-certificate case below.
    let zt_id = "spiffe://cluster.local/ns/istio-system/sa/ztunnel";
    let zt_key = KeyType::EcP256.generate().unwrap();
    let zt_csr = citadel::pki::csr::build(&zt_key, zt_id).unwrap();
    let zt_chain = call(&mut client, &zt_csr, Some(&bearer(&zt)), 0, None)
        .await
        .unwrap();
    let mut zt_mtls = ca
        .client_with(Some((
            zt_chain[..2].concat().into_bytes(),
            zt_key.serialize_pem().into_bytes(),
        )))
        .await;

    let imposter_uid = {
        // The pod exists already; read its UID back for the bound token.
        use kube::api::Api;
        Api::<k8s_openapi::api::core::v1::Pod>::namespaced(kube.client.clone(), "istio-system")
            .get("imposter-n1")
            .await
            .unwrap()
            .metadata
            .uid
            .unwrap()
    };
    let imposter = kube
        .pod_token("istio-system", "imposter", "imposter-n1", &imposter_uid)
        .await;

    // Each refusal: PermissionDenied with the one vague message, counted under the check
    // that failed; the server goes on serving.
    struct Case<'a> {
        name: &'a str,
        token: Option<&'a str>,
        id: &'a str,
        reason: &'a str,
    }
    let cases = [
        Case {
            name: "all its pods are on n2",
            token: Some(&zt),
            id: "spiffe://cluster.local/ns/shop/sa/pay",
            reason: "not_on_node",
        },
        Case {
            name: "its only pod on n1 Failed",
            token: Some(&zt),
            id: "spiffe://cluster.local/ns/shop/sa/batch",
            reason: "not_on_node",
        },
        Case {
            name: "no pod anywhere",
            token: Some(&zt),
            id: "spiffe://cluster.local/ns/shop/sa/ghost",
            reason: "not_on_node",
        },
        Case {
            name: "an account that is not listed",
            token: Some(&imposter),
            id: CART,
            reason: "untrusted_account",
        },
        Case {
            name: "another trust domain",
            token: Some(&zt),
            id: "spiffe://evil.example/ns/shop/sa/cart",
            reason: "foreign_trust_domain",
        },
        Case {
            name: "not ns/sa",
            token: Some(&zt),
            id: "spiffe://cluster.local/ns/shop",
            reason: "malformed_identity",
        },
        Case {
            name: "not a SPIFFE ID",
            token: Some(&zt),
            id: "shop/cart",
            reason: "malformed_identity",
        },
        Case {
            name: "a client certificate names no pod",
            token: None,
            id: CART,
            reason: "not_token_authenticated",
        },
    ];
    for c in cases {
        let before = refusals(&ca, c.reason).await;
        let key = KeyType::EcP256.generate().unwrap();
        // The CSR names what is asked for (a malformed ID gets ztunnel's own, valid, SAN).
        let csr_id = if c.id.starts_with("spiffe://") {
            c.id
        } else {
            zt_id
        };
        let csr = citadel::pki::csr::build(&key, csr_id).unwrap();
        let result = match c.token {
            Some(t) => {
                call(
                    &mut client,
                    &csr,
                    Some(&bearer(t)),
                    0,
                    Some(impersonate(c.id)),
                )
                .await
            }
            None => call(&mut zt_mtls, &csr, None, 0, Some(impersonate(c.id))).await,
        };
        let err = result.expect_err(c.name);
        assert_eq!(err.code(), Code::PermissionDenied, "{}: {err:?}", c.name);
        assert_eq!(err.message(), REFUSED, "{}: one vague message", c.name);
        assert_eq!(
            refusals(&ca, c.reason).await,
            before + 1,
            "{}: counted as {}",
            c.name,
            c.reason
        );
        assert_issued_for(&ask(&mut client, &zt, CART).await.unwrap(), CART);
    }

    // A pod that arrives on n1 after the watch started is seen within seconds; and once it
    // is gone, so is ztunnel's right to its identity.
    kube.service_account("shop", "late").await;
    let late = "spiffe://cluster.local/ns/shop/sa/late";
    assert_eq!(
        ask(&mut client, &zt, late).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    let t0 = std::time::Instant::now();
    kube.pod_on("shop", "late-1", "late", Some("n1")).await;
    eventually("a new pod on n1 is seen", 10, async || {
        ask(&mut client.clone(), &zt, late).await.is_ok()
    })
    .await;
    eprintln!(
        "a new pod was usable for impersonation after {:?}",
        t0.elapsed()
    );
    kube.set_phase("shop", "late-1", "Succeeded").await;
    eventually("a Succeeded pod no longer vouches", 10, async || {
        ask(&mut client.clone(), &zt, late).await.is_err()
    })
    .await;

    // ztunnel's own pod deleted: its bound token dies with it (the API server refuses it,
    // Unauthenticated, once its own token cache lets go), and until then the pod index
    // refuses it (PermissionDenied). Never a certificate.
    kube.delete_pod("istio-system", "ztunnel-n1").await;
    eventually(
        "a deleted ztunnel pod gets nothing",
        10,
        async || match ask(&mut client.clone(), &zt, CART).await {
            Ok(_) => false,
            Err(e) => {
                assert!(
                    matches!(e.code(), Code::PermissionDenied | Code::Unauthenticated),
                    "{e:?}"
                );
                true
            }
        },
    )
    .await;
    for _ in 0..3 {
        assert!(ask(&mut client, &zt, CART).await.is_err());
    }
    ca.stop().await;
}

/// With local JWKS verification the API server never sees the token again, so the pod index
/// alone must catch a deleted or re-created ztunnel pod (the token stays cryptographically
/// valid); pod and node come from the bound token's claims.
#[tokio::test]
async fn ambient_with_cluster_jwks_catches_deleted_and_recreated_node_pods() {
    let Some(kube) = KubeEnv::start().await else {
        return;
    };
    let zt_uid = cluster(&kube).await;
    let kubeconfig = kube.kubeconfig.to_str().unwrap().to_string();
    let ca = TestCa::start(&[
        "--kubeconfig",
        &kubeconfig,
        "--jwks-from-cluster",
        "--trusted-node-accounts",
        "kube-system/other,istio-system/ztunnel",
    ])
    .await;
    wait_synced(&ca).await;
    let mut client = ca.client().await;
    let zt = kube
        .pod_token("istio-system", "ztunnel", "ztunnel-n1", &zt_uid)
        .await;
    assert_issued_for(&ask(&mut client, &zt, CART).await.unwrap(), CART);
    // Its claims name node n1; the n2 ztunnel cannot ask for n1's workloads.
    let zt2_uid = {
        use kube::api::Api;
        Api::<k8s_openapi::api::core::v1::Pod>::namespaced(kube.client.clone(), "istio-system")
            .get("ztunnel-n2")
            .await
            .unwrap()
            .metadata
            .uid
            .unwrap()
    };
    let zt2 = kube
        .pod_token("istio-system", "ztunnel", "ztunnel-n2", &zt2_uid)
        .await;
    let before = refusals(&ca, "not_on_node").await;
    let err = ask(&mut client, &zt2, CART).await.unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (Code::PermissionDenied, REFUSED)
    );
    assert_eq!(refusals(&ca, "not_on_node").await, before + 1);
    assert!(
        ask(&mut client, &zt2, "spiffe://cluster.local/ns/shop/sa/pay")
            .await
            .is_ok()
    );

    // A token not bound to a pod.
    let unbound = kube.token("istio-system", "ztunnel", "istio-ca").await;
    let err = ask(&mut client, &unbound, CART).await.unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (Code::PermissionDenied, REFUSED)
    );
    assert_eq!(refusals(&ca, "no_pod_in_token").await, 1);

    // ztunnel's pod deleted: the token still verifies, the index refuses.
    kube.delete_pod("istio-system", "ztunnel-n1").await;
    eventually("the deletion reaches the index", 10, async || {
        let _ = ask(&mut client.clone(), &zt, CART).await;
        refusals(&ca, "caller_pod_not_found").await > 0
    })
    .await;
    let err = ask(&mut client, &zt, CART).await.unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (Code::PermissionDenied, REFUSED)
    );

    // Re-created under the same name: another UID than the token's.
    kube.pod_on("istio-system", "ztunnel-n1", "ztunnel", Some("n1"))
        .await;
    eventually("the re-created pod reaches the index", 10, async || {
        let _ = ask(&mut client.clone(), &zt, CART).await;
        refusals(&ca, "caller_pod_uid_mismatch").await > 0
    })
    .await;
    let err = ask(&mut client, &zt, CART).await.unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (Code::PermissionDenied, REFUSED)
    );
    // The server still serves the other node.
    assert!(
        ask(&mut client, &zt2, "spiffe://cluster.local/ns/shop/sa/pay")
            .await
            .is_ok()
    );
    ca.stop().await;
}

/// Refused at start: a malformed entry (flag or CA_TRUSTED_NODE_ACCOUNTS), or trusted node
/// accounts without a cluster to watch pods in.
#[tokio::test]
async fn ambient_configuration_errors_stop_the_start() {
    let tmp = tempfile::tempdir().unwrap();
    let e = TestCa::try_start_in(tmp.path(), &["--trusted-node-accounts", "ztunnel"])
        .await
        .err()
        .expect("refused");
    assert!(
        e.contains("\"ztunnel\"") && e.contains("NAMESPACE/SERVICE_ACCOUNT"),
        "{e}"
    );
    let e = TestCa::try_start_in(
        tmp.path(),
        &["--trusted-node-accounts", "istio-system/ztunnel"],
    )
    .await
    .err()
    .expect("refused");
    assert!(e.contains("needs the cluster"), "{e}");

    // The environment variable, as istiod reads it, through the real binary.
    let out = std::process::Command::new(BIN)
        .args(["serve", "--dev", "--state-dir"])
        .arg(tmp.path().join("s"))
        .env("CA_TRUSTED_NODE_ACCOUNTS", "istio-system/ztunnel,Bad/x")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("\"Bad/x\""), "{err}");
}

/// The RBAC in deploy/ (citadel.yaml plus ambient.yaml) is enough, and applied for real:
/// citadel runs as the `citadel` service account with nothing else, watches pods and
/// reviews ztunnel's token.
#[tokio::test]
async fn ambient_runs_with_exactly_the_rbac_in_deploy() {
    let Some(kube) = KubeEnv::start().await else {
        return;
    };
    if !require_tool("kubectl") {
        return;
    }
    kube.namespace("istio-system").await;
    let out = std::process::Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(&kube.kubeconfig)
        .args([
            "apply",
            "-f",
            "deploy/citadel.yaml",
            "-f",
            "deploy/ambient.yaml",
        ])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "kubectl apply failed:\n{text}");
    assert!(
        text.contains("clusterrole.rbac.authorization.k8s.io/citadel-ambient"),
        "{text}"
    );
    let zt_uid = cluster(&kube).await;

    // A kubeconfig for the citadel service account: the admin's, with its token swapped.
    let sa_token = kube
        .token(
            "istio-system",
            "citadel",
            "https://kubernetes.default.svc.cluster.local",
        )
        .await;
    let admin = std::fs::read_to_string(&kube.kubeconfig).unwrap();
    let as_citadel: String = admin
        .lines()
        .map(|l| match l.trim_start().strip_prefix("token: ") {
            Some(_) => format!("    token: {sa_token}"),
            None => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    let tmp = tempfile::tempdir().unwrap();
    let kubeconfig = tmp.path().join("citadel-kubeconfig");
    std::fs::write(&kubeconfig, as_citadel).unwrap();

    let ca = TestCa::start(&[
        "--kubeconfig",
        kubeconfig.to_str().unwrap(),
        "--auth",
        "tokenreview",
        "--trusted-node-accounts",
        "istio-system/ztunnel",
    ])
    .await;
    wait_synced(&ca).await;
    let mut client = ca.client().await;
    let zt = kube
        .pod_token("istio-system", "ztunnel", "ztunnel-n1", &zt_uid)
        .await;
    assert_issued_for(&ask(&mut client, &zt, CART).await.unwrap(), CART);
    ca.stop().await;
}

/// Resident memory of a process, in KiB (VmRSS).
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// `citadel serve` as a process against `kube`: (child, grpc addr, metrics addr, state dir).
fn serve_process(
    kube: &KubeEnv,
    dir: &std::path::Path,
    extra: &[&str],
) -> (
    std::process::Child,
    std::net::SocketAddr,
    std::net::SocketAddr,
    std::path::PathBuf,
) {
    let (addr, metrics) = (
        std::net::SocketAddr::from(([127, 0, 0, 1], free_port())),
        std::net::SocketAddr::from(([127, 0, 0, 1], free_port())),
    );
    let state = dir.join("state");
    let child = std::process::Command::new(BIN)
        .args(["serve", "--auth", "tokenreview", "--kubeconfig"])
        .arg(&kube.kubeconfig)
        .arg("--state-dir")
        .arg(&state)
        .args([
            "--listen",
            &addr.to_string(),
            "--metrics-listen",
            &metrics.to_string(),
        ])
        .args(extra)
        .stderr(std::fs::File::create(dir.join("citadel.log")).unwrap())
        .spawn()
        .unwrap();
    (child, addr, metrics, state)
}

/// The cost of the pod index, measured (docs/kubernetes.md and docs/benchmarks.md quote it):
/// 10,000 pods on 100 nodes in the real API server; two `citadel serve` processes, one with
/// `--trusted-node-accounts` (it lists and watches them all) and one without; the difference
/// in resident memory once the index is synced. Then the latency an impersonated request adds
/// over the caller's own, and the authorizer alone on a 10,000-pod index.
///
/// `scripts/test.sh -- ambient_pod_index_cost -- --ignored --nocapture`
#[tokio::test]
#[ignore = "a measurement: 10,000 pods take a minute to create"]
async fn ambient_pod_index_cost_at_10k_pods() {
    use citadel::auth::node::{NodeAuthorizer, TrustedNodeAccounts};
    use citadel::auth::pods::{PodIndex, PodRecord};
    let Some(kube) = KubeEnv::start().await else {
        return;
    };
    let zt_uid = cluster(&kube).await;
    // 10,000 pods (the cluster above has 21 more that are not Failed): 100 nodes, 500 service accounts.
    kube.namespace("load").await;
    let t0 = std::time::Instant::now();
    // The ServiceAccount admission plugin wants each pod's account to exist.
    let mut sas = tokio::task::JoinSet::new();
    for i in 0..500 {
        let client = kube.client.clone();
        sas.spawn(async move {
            let mut sa = k8s_openapi::api::core::v1::ServiceAccount::default();
            sa.metadata.name = Some(format!("svc-{i}"));
            kube::api::Api::<k8s_openapi::api::core::v1::ServiceAccount>::namespaced(
                client, "load",
            )
            .create(&kube::api::PostParams::default(), &sa)
            .await
            .unwrap();
        });
    }
    while let Some(r) = sas.join_next().await {
        r.unwrap();
    }
    let mut tasks = tokio::task::JoinSet::new();
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(32));
    for i in 0..10_000 {
        let (client, sem) = (kube.client.clone(), sem.clone());
        tasks.spawn(async move {
            let _p = sem.acquire().await.unwrap();
            let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(serde_json::json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": format!("load-{i}-7d9f8b6c5d-x2k4q"), "labels": {"app": format!("svc-{}", i % 500)}},
                "spec": {
                    "serviceAccountName": format!("svc-{}", i % 500),
                    "nodeName": format!("node-{}", i % 100),
                    "automountServiceAccountToken": false,
                    "containers": [{"name": "app", "image": "registry.invalid/app:1"}]
                }
            }))
            .unwrap();
            kube::api::Api::<k8s_openapi::api::core::v1::Pod>::namespaced(client, "load")
                .create(&kube::api::PostParams::default(), &pod)
                .await
                .unwrap();
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    eprintln!("created 10,000 pods in {:?}", t0.elapsed());

    let tmp = tempfile::tempdir().unwrap();
    let (dir_a, dir_b) = (tmp.path().join("a"), tmp.path().join("b"));
    std::fs::create_dir_all(&dir_a).unwrap();
    std::fs::create_dir_all(&dir_b).unwrap();
    let (mut with, addr, metrics, state) = serve_process(
        &kube,
        &dir_a,
        &["--trusted-node-accounts", "istio-system/ztunnel"],
    );
    let (mut without, _, metrics_b, _) = serve_process(&kube, &dir_b, &[]);
    eventually("the index holds every pod", 120, async || {
        http_get(metrics, "/metrics")
            .await
            .map(|(_, m)| m.contains("citadel_pod_index_pods 10021\n"))
            .unwrap_or(false)
    })
    .await;
    eventually("the other one is ready", 60, async || {
        matches!(http_get(metrics_b, "/healthz/ready").await, Ok((200, _)))
    })
    .await;
    // A sleep on purpose: this measures memory, and the allocator's figures settle a moment
    // after the last list (no condition to wait for, nothing on citadel's clock).
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let (a, b) = (rss_kib(with.id()), rss_kib(without.id()));
    eprintln!(
        "RSS with the pod index (10,021 pods): {a} KiB; without: {b} KiB; difference {} KiB",
        a as i64 - b as i64
    );

    // Latency: the same ztunnel token (reviewed once, then cached), its own identity vs a
    // workload on its node, sequential over TLS.
    let mut client = citadel::client::connect(&citadel::client::ConnectOptions {
        addr: addr.to_string(),
        root_pem: std::fs::read(state.join("root-cert.pem")).unwrap(),
        server_name: Some("localhost".into()),
        ..Default::default()
    })
    .await
    .unwrap();
    let zt = kube
        .pod_token("istio-system", "ztunnel", "ztunnel-n1", &zt_uid)
        .await;
    let own = "spiffe://cluster.local/ns/istio-system/sa/ztunnel";
    let key = KeyType::EcP256.generate().unwrap();
    let (own_csr, cart_csr) = (
        citadel::pki::csr::build(&key, own).unwrap(),
        citadel::pki::csr::build(&key, CART).unwrap(),
    );
    let n = 1000;
    let mut timings = [Vec::new(), Vec::new()];
    for round in 0..2 * n {
        let imp = round % 2 == 1;
        let t = std::time::Instant::now();
        let r = if imp {
            call(
                &mut client,
                &cart_csr,
                Some(&bearer(&zt)),
                0,
                Some(impersonate(CART)),
            )
            .await
        } else {
            call(&mut client, &own_csr, Some(&bearer(&zt)), 0, None).await
        };
        r.unwrap();
        timings[usize::from(imp)].push(t.elapsed());
    }
    let stats = |v: &mut Vec<std::time::Duration>| {
        v.sort();
        (v[v.len() / 2], v[v.len() * 99 / 100])
    };
    let (own_p50, own_p99) = stats(&mut timings[0]);
    let (imp_p50, imp_p99) = stats(&mut timings[1]);
    eprintln!("own identity: p50 {own_p50:?} p99 {own_p99:?}; impersonated: p50 {imp_p50:?} p99 {imp_p99:?} ({n} each, interleaved)");
    let _ = with.kill();
    let _ = without.kill();
    let _ = with.wait();
    let _ = without.wait();

    // The authorizer alone, in process, on an index of 10,000 pods.
    let pods = std::sync::Arc::new(PodIndex::default());
    pods.replace_all((0..10_000).map(|i| PodRecord {
        namespace: "load".into(),
        name: format!("load-{i}-7d9f8b6c5d-x2k4q"),
        uid: format!("00000000-0000-0000-0000-{i:012}"),
        service_account: format!("svc-{}", i % 500),
        node: Some(format!("node-{}", i % 100)),
    }));
    eprintln!(
        "a 10,000-pod index (100 nodes, 500 accounts) holds {} KiB of heap by accounting",
        pods.heap_bytes() / 1024
    );
    pods.apply(PodRecord {
        namespace: "istio-system".into(),
        name: "zt".into(),
        uid: "u".into(),
        service_account: "ztunnel".into(),
        node: Some("node-7".into()),
    });
    let a = NodeAuthorizer::new(
        TrustedNodeAccounts::parse(&["istio-system/ztunnel"]).unwrap(),
        td(),
        pods,
    );
    let caller = citadel::auth::Caller {
        identity: spiffe("istio-system", "ztunnel"),
        method: citadel::auth::AuthMethod::TokenReview,
        pod_name: Some("zt".into()),
        pod_uid: Some("u".into()),
        node_name: Some("node-7".into()),
        cluster: None,
    };
    let t = std::time::Instant::now();
    let calls = 200_000;
    for i in 0..calls {
        // svc-7, svc-107, ... run on node-7.
        let id = format!(
            "spiffe://cluster.local/ns/load/sa/svc-{}",
            7 + 100 * (i % 5)
        );
        assert!(a.authorize(&caller, &id).is_ok());
    }
    eprintln!(
        "authorize() on a 10,000-pod index: {:?} per call (debug build of citadel)",
        t.elapsed() / calls
    );
}

/// The pod watch breaks (kube-apiserver killed): the last known pods serve for
/// --pod-index-max-staleness (default 1 min) of citadel's clock, then impersonation is
/// Unavailable (retryable), never judged on pods that may be gone; the caller's own identity
/// is unaffected. Once the API server is back the watch relists and impersonation resumes.
/// Time is a ManualClock kept near real time (TLS checks the serving certificate), moved past
/// the bound in one step once the watch's health gauge says it noticed the outage.
#[tokio::test]
async fn ambient_a_stale_pod_index_is_trusted_only_for_a_bounded_time() {
    let Some(kube) = KubeEnv::start().await else {
        return;
    };
    let zt_uid = cluster(&kube).await;
    let clock = std::sync::Arc::new(citadel::clock::ManualClock::new(
        time::OffsetDateTime::now_utc(),
    ));
    let kubeconfig = kube.kubeconfig.to_str().unwrap().to_string();
    let ca = TestCa::start_on_clock(
        clock.clone(),
        &[
            "--kubeconfig",
            &kubeconfig,
            "--jwks-from-cluster",
            "--trusted-node-accounts",
            "istio-system/ztunnel",
        ],
    )
    .await;
    wait_synced(&ca).await;
    let mut client = ca.client().await;
    let zt = kube
        .pod_token("istio-system", "ztunnel", "ztunnel-n1", &zt_uid)
        .await;
    assert!(ask(&mut client, &zt, CART).await.is_ok());

    kube.stop_apiserver();
    // Just after the outage began: the last known pods still serve.
    assert!(
        ask(&mut client, &zt, CART).await.is_ok(),
        "within the bound"
    );
    // Once the watch has noticed (its health gauge says so), citadel's clock passes the bound
    // in one move: no polling on a moving clock.
    eventually("the pod watch notices the outage", 20, async || {
        metric(&ca, "citadel_pod_index_watch_healthy").await == 0
    })
    .await;
    assert!(
        ask(&mut client, &zt, CART).await.is_ok(),
        "noticed, but still within the bound"
    );
    clock.advance(time::Duration::seconds(61));
    let err = ask(&mut client, &zt, CART)
        .await
        .expect_err("granted past --pod-index-max-staleness into the API server's outage");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains("--pod-index-max-staleness"),
        "{err:?}"
    );
    assert!(metric(&ca, "citadel_impersonation_stale_refusals").await >= 1);
    assert_eq!(metric(&ca, "citadel_pod_index_watch_healthy").await, 0);
    // ztunnel's own certificate needs no pods.
    let own = "spiffe://cluster.local/ns/istio-system/sa/ztunnel";
    let csr = citadel::pki::csr::build(&KeyType::EcP256.generate().unwrap(), own).unwrap();
    call(&mut client, &csr, Some(&bearer(&zt)), 0, None)
        .await
        .expect("the caller's own identity is unaffected");

    kube.start_apiserver();
    eventually(
        "the watch relists and impersonation resumes",
        60,
        async || ask(&mut client.clone(), &zt, CART).await.is_ok(),
    )
    .await;
    assert_eq!(metric(&ca, "citadel_pod_index_watch_healthy").await, 1);
    ca.stop().await;
}

/// A certificate ztunnel got for a workload cannot renew itself by client certificate (its
/// holder would otherwise keep the workload's identity after the pod left the node, for
/// ever); ztunnel renews it the way it got it, with its token and the node check. A
/// workload's own certificate still renews by client certificate.
#[tokio::test]
async fn ambient_an_impersonated_certificate_does_not_renew_itself() {
    let Some(kube) = KubeEnv::start().await else {
        return;
    };
    let zt_uid = cluster(&kube).await;
    let kubeconfig = kube.kubeconfig.to_str().unwrap().to_string();
    let ca = TestCa::start(&[
        "--kubeconfig",
        &kubeconfig,
        "--jwks-from-cluster",
        "--trusted-node-accounts",
        "istio-system/ztunnel",
    ])
    .await;
    wait_synced(&ca).await;
    let mut client = ca.client().await;
    let zt = kube
        .pod_token("istio-system", "ztunnel", "ztunnel-n1", &zt_uid)
        .await;
    let key = KeyType::EcP256.generate().unwrap();
    let csr = citadel::pki::csr::build(&key, CART).unwrap();
    let chain = call(
        &mut client,
        &csr,
        Some(&bearer(&zt)),
        0,
        Some(impersonate(CART)),
    )
    .await
    .unwrap();
    assert_issued_for(&chain, CART);
    let mut as_cart = ca
        .client_with(Some((
            chain[..2].concat().into_bytes(),
            key.serialize_pem().into_bytes(),
        )))
        .await;
    let err = call(&mut as_cart, &csr, None, 0, None).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains("no renewal credential"), "{err:?}");

    // The workload's own certificate (its own token) renews by client certificate.
    let cart_uid = {
        use kube::api::Api;
        Api::<k8s_openapi::api::core::v1::Pod>::namespaced(kube.client.clone(), "shop")
            .get("cart-1")
            .await
            .unwrap()
            .metadata
            .uid
            .unwrap()
    };
    let cart_token = kube.pod_token("shop", "cart", "cart-1", &cart_uid).await;
    let own = call(&mut client, &csr, Some(&bearer(&cart_token)), 0, None)
        .await
        .unwrap();
    let mut renewing = ca
        .client_with(Some((
            own[..2].concat().into_bytes(),
            key.serialize_pem().into_bytes(),
        )))
        .await;
    assert_issued_for(
        &call(&mut renewing, &csr, None, 0, None).await.unwrap(),
        CART,
    );
    // And ztunnel renews the workload's certificate as before.
    assert_issued_for(&ask(&mut client, &zt, CART).await.unwrap(), CART);
    ca.stop().await;
}
