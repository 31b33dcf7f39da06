//! citadel as a Kubernetes CSR signer against a REAL kube-apiserver 1.37: CSRs are created by
//! real service accounts (their tokens from the TokenRequest API, so `spec.username` and
//! `spec.groups` are what the API server vouches for), approved or denied as istiod and an
//! admin would, and answered by the real binary (`serve --store kube --csr-signer ...`).

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use citadel::pki::KeyType;
use futures_util::{StreamExt, TryStreamExt};
use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use kube::api::{Api, PostParams};
use kube::runtime::{watcher, WatchStreamExt};

use crate::kube::{leads, ready, replica_with};
use crate::podcert::pem_blocks;
use crate::support::wait::{condition, wait_event};
use crate::support::*;

const MAIN: &str = "citadel.dev/spiffe";
const LEGACY: &str = "citadel.dev/legacy";

/// Lets every service account create, read and approve CSRs for any signer under
/// citadel.dev (what istiod's chart grants it; the others only need create and get).
pub(crate) async fn grant_csr_rights(kube: &KubeEnv) {
    let role: ClusterRole = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "test-csr-requester"},
        "rules": [
            {"apiGroups": ["certificates.k8s.io"], "resources": ["certificatesigningrequests"],
             "verbs": ["create", "get", "list", "watch", "delete"]},
            {"apiGroups": ["certificates.k8s.io"], "resources": ["certificatesigningrequests/approval"],
             "verbs": ["update"]},
            {"apiGroups": ["certificates.k8s.io"], "resources": ["signers"],
             "resourceNames": ["citadel.dev/*"], "verbs": ["approve"]},
        ]
    }))
    .unwrap();
    let binding: ClusterRoleBinding = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "test-csr-requester"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "test-csr-requester"},
        "subjects": [{"kind": "Group", "apiGroup": "rbac.authorization.k8s.io", "name": "system:serviceaccounts"}]
    }))
    .unwrap();
    let pp = PostParams::default();
    let _ = Api::<ClusterRole>::all(kube.client.clone())
        .create(&pp, &role)
        .await;
    let _ = Api::<ClusterRoleBinding>::all(kube.client.clone())
        .create(&pp, &binding)
        .await;
}

/// A second CA in Istio's cacerts layout, for `--csr-signer citadel.dev/legacy=DIR`: its
/// directory and its root's PEM.
pub(crate) fn legacy_ca(dir: &Path) -> (std::path::PathBuf, String) {
    let legacy = dir.join("legacy-ca");
    std::fs::create_dir(&legacy).unwrap();
    crate::thirdparty::make_cacerts(
        &legacy,
        "openssl ecparam -name prime256v1 -genkey -noout -out ca-key.pem",
    );
    let root = std::fs::read_to_string(legacy.join("root-cert.pem")).unwrap();
    (legacy, root)
}

/// The roots citadel publishes for istiod: `root-cert.pem` of the Secret `external-ca-cert`
/// in `ns`, once it exists.
pub(crate) async fn published_roots(kube: &KubeEnv, ns: &str) -> String {
    let secret = Api::<Secret>::namespaced(kube.client.clone(), ns);
    until("external-ca-cert published", 20, async || {
        match secret.get_opt("external-ca-cert").await {
            Ok(Some(s)) => s
                .data
                .and_then(|d| {
                    d.get("root-cert.pem")
                        .map(|b| String::from_utf8(b.0.clone()).unwrap())
                })
                .ok_or("no root-cert.pem".to_string()),
            other => Err(format!("{other:?}")),
        }
    })
    .await
}

/// A client acting as the service account `ns/sa`.
pub(crate) async fn client_as(kube: &KubeEnv, dir: &Path, ns: &str, sa: &str) -> kube::Client {
    let path = dir.join(format!("{ns}-{sa}.kubeconfig"));
    kube.kubeconfig_as(ns, sa, &path).await;
    citadel::cluster::client(Some(&path)).await.unwrap()
}

/// A CSR object for `signer` carrying a PEM request for `identity`.
pub(crate) fn csr_object(
    name: &str,
    signer: &str,
    identity: &str,
    usages: &[&str],
    expiration: Option<i32>,
) -> CertificateSigningRequest {
    use base64::Engine;
    let key = KeyType::EcP256.generate().unwrap();
    let pem = citadel::pki::csr::build(&key, identity).unwrap();
    let mut spec = serde_json::json!({
        "signerName": signer,
        "request": base64::engine::general_purpose::STANDARD.encode(pem),
        "usages": usages,
    });
    if let Some(e) = expiration {
        spec["expirationSeconds"] = e.into();
    }
    serde_json::from_value(serde_json::json!({
        "apiVersion": "certificates.k8s.io/v1", "kind": "CertificateSigningRequest",
        "metadata": {"name": name}, "spec": spec,
    }))
    .unwrap()
}

const ISTIOD_USAGES: [&str; 4] = [
    "digital signature",
    "key encipherment",
    "server auth",
    "client auth",
];

pub(crate) async fn create(client: &kube::Client, csr: &CertificateSigningRequest) {
    Api::<CertificateSigningRequest>::all(client.clone())
        .create(&PostParams::default(), csr)
        .await
        .unwrap();
}

/// Adds an `Approved` (or `Denied`) condition through `/approval`, as istiod does.
pub(crate) async fn decide(client: &kube::Client, name: &str, type_: &str) {
    let api = Api::<CertificateSigningRequest>::all(client.clone());
    let mut csr = api.get(name).await.unwrap();
    csr.status
        .get_or_insert_default()
        .conditions
        .get_or_insert_default()
        .push(
            serde_json::from_value(serde_json::json!({
                "type": type_, "status": "True", "reason": "Test", "message": "by the test"
            }))
            .unwrap(),
        );
    api.replace_subresource("approval", name, &PostParams::default(), &csr)
        .await
        .unwrap();
}

/// Waits for the CSR to carry a certificate or a Failed condition.
pub(crate) async fn answered(kube: &KubeEnv, name: &str) -> CertificateSigningRequest {
    let api = Api::<CertificateSigningRequest>::all(kube.client.clone());
    until(&format!("CSR {name} answered"), 30, async || {
        let c = api.get(name).await.map_err(|e| e.to_string())?;
        if certificate(&c).is_some() || condition(&c, "Failed").is_some() {
            Ok(c)
        } else {
            Err(format!("{:?}", c.status))
        }
    })
    .await
}

pub(crate) fn certificate(c: &CertificateSigningRequest) -> Option<String> {
    c.status
        .as_ref()?
        .certificate
        .as_ref()
        .map(|b| String::from_utf8(b.0.clone()).unwrap())
}

fn failed_reason(c: &CertificateSigningRequest) -> Option<String> {
    condition(c, "Failed")
        .filter(|f| f.status == "True")
        .map(|f| f.reason)
}

/// The certificates of a PEM text, as DER (PEM line widths differ between writers).
pub(crate) fn ders(pem: &str) -> Vec<Vec<u8>> {
    citadel::pki::pem::parse_certs(pem.as_bytes())
        .unwrap()
        .iter()
        .map(|c| c.as_ref().to_vec())
        .collect()
}

/// Verifies the CSR's certificate (leaf, intermediates) to `roots` for `identity` with webpki
/// and openssl; returns the leaf's lifetime in seconds.
fn verify(chain: &str, roots: &str, identity: &citadel::identity::SpiffeId) -> i64 {
    let mut elems = pem_blocks(chain);
    assert!(elems.len() >= 2, "leaf and intermediate: {chain}");
    elems.push(roots.to_string());
    let v =
        citadel::client::verify_response(&elems, Some(identity), time::OffsetDateTime::now_utc())
            .unwrap_or_else(|e| panic!("webpki rejected the CSR's certificate: {e}"));
    let dir = tempfile::tempdir().unwrap();
    crate::thirdparty::write_chain(dir.path(), &elems);
    crate::thirdparty::openssl_verify(dir.path());
    (v.leaf.not_after - v.leaf.not_before).whole_seconds()
}

async fn metrics(r: &crate::kube::Replica) -> String {
    http_get(r.metrics, "/metrics")
        .await
        .map(|(_, m)| m)
        .unwrap_or_default()
}

#[tokio::test]
async fn csrs_of_our_signers_are_signed_by_the_mapped_ca_or_failed_at_once() {
    let Some(kube) = KubeEnv::start().await else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    kube.namespace("citadel").await;
    kube.service_account("istio-system", "istiod").await;
    for sa in ["cart", "payments", "auto"] {
        kube.service_account("shop", sa).await;
    }
    grant_csr_rights(&kube).await;
    // The Revocation CRD, so that an identity can be denied below.
    crate::rbac::apply(&kube, &["deploy/crds/revocation.yaml"]);
    let (legacy, legacy_root) = legacy_ca(tmp.path());

    let legacy_flag = format!("{LEGACY}={}", legacy.display());
    let ca = replica_with(
        &kube,
        "csr-a",
        "citadel",
        &[
            "--csr-signer",
            MAIN,
            "--csr-signer",
            &legacy_flag,
            "--csr-auto-approve",
            "system:serviceaccount:shop:auto",
            "--max-ttl",
            "48h",
        ],
    );
    eventually("replica ready and leading", 30, async || {
        ready(&ca).await && leads(&ca).await
    })
    .await;
    eventually("bundle published", 15, async || {
        kube.bundle("shop").await.is_some()
    })
    .await;
    let roots = kube.bundle("shop").await.unwrap();

    let istiod = client_as(&kube, tmp.path(), "istio-system", "istiod").await;
    let cart = client_as(&kube, tmp.path(), "shop", "cart").await;
    let auto = client_as(&kube, tmp.path(), "shop", "auto").await;
    let cart_id = spiffe("shop", "cart");
    let payments_id = spiffe("shop", "payments");

    // Left alone: a CSR nobody approved, and another signer's CSR even when approved.
    create(
        &istiod,
        &csr_object(
            "unapproved",
            MAIN,
            &cart_id.to_string(),
            &ISTIOD_USAGES,
            None,
        ),
    )
    .await;
    create(
        &kube.client,
        &csr_object(
            "not-ours",
            "example.com/other",
            &cart_id.to_string(),
            &ISTIOD_USAGES,
            None,
        ),
    )
    .await;
    decide(&kube.client, "not-ours", "Approved").await;
    // Denied: never signed (the API refuses to add Approved to it later).
    create(
        &istiod,
        &csr_object("denied", MAIN, &cart_id.to_string(), &ISTIOD_USAGES, None),
    )
    .await;
    decide(&kube.client, "denied", "Denied").await;

    // istiod asks for the cart proxy, as RA mode does: approved by itself, 1h asked.
    let t0 = Instant::now();
    create(
        &istiod,
        &csr_object(
            "istiod-cart",
            MAIN,
            &cart_id.to_string(),
            &ISTIOD_USAGES,
            Some(3600),
        ),
    )
    .await;
    decide(&istiod, "istiod-cart", "Approved").await;
    let c = answered(&kube, "istiod-cart").await;
    eprintln!("one CSR: creation to certificate in {:?}", t0.elapsed());
    let chain = certificate(&c).expect("a certificate");
    assert_eq!(
        verify(&chain, &roots, &cart_id),
        3600 + 120,
        "1h asked, notBefore backdated 2 min"
    );
    assert_eq!(
        pem_blocks(&chain).len(),
        2,
        "leaf and intermediate, no root"
    );
    assert!(failed_reason(&c).is_none());

    // The second signer name: signed by the plugged-in CA mapped to it, which citadel's own
    // roots do not verify.
    create(
        &istiod,
        &csr_object(
            "istiod-legacy",
            LEGACY,
            &payments_id.to_string(),
            &ISTIOD_USAGES,
            None,
        ),
    )
    .await;
    decide(&istiod, "istiod-legacy", "Approved").await;
    let chain = certificate(&answered(&kube, "istiod-legacy").await).expect("a certificate");
    assert_eq!(
        verify(&chain, &legacy_root, &payments_id),
        86_400 + 120,
        "the default TTL"
    );
    assert!(
        citadel::client::verify_response(
            &[pem_blocks(&chain), vec![roots.clone()]].concat(),
            Some(&payments_id),
            time::OffsetDateTime::now_utc()
        )
        .is_err(),
        "not citadel's own CA"
    );
    let legacy_int = std::fs::read_to_string(legacy.join("ca-cert.pem")).unwrap();
    assert!(
        ders(&chain).contains(&ders(&legacy_int)[0]),
        "the mapped CA's intermediate"
    );

    // The roots istiod verifies against: both CAs', in the Secret istiod mounts.
    let published = published_roots(&kube, "citadel").await;
    assert_eq!(
        ders(&published),
        [ders(&roots), ders(&legacy_root)].concat(),
        "citadel's roots, then the mapped CA's"
    );

    // A service account for itself, approved by an admin: signed. For another identity: Failed
    // at once, with the reason, an Event and a metric.
    create(
        &cart,
        &csr_object(
            "cart-self",
            MAIN,
            &cart_id.to_string(),
            &["client auth"],
            Some(600),
        ),
    )
    .await;
    decide(&kube.client, "cart-self", "Approved").await;
    let c = answered(&kube, "cart-self").await;
    assert_eq!(
        verify(&certificate(&c).unwrap(), &roots, &cart_id),
        600 + 120
    );
    let t1 = Instant::now();
    create(
        &cart,
        &csr_object(
            "cart-steals",
            MAIN,
            &payments_id.to_string(),
            &ISTIOD_USAGES,
            None,
        ),
    )
    .await;
    decide(&kube.client, "cart-steals", "Approved").await;
    let c = answered(&kube, "cart-steals").await;
    assert!(
        t1.elapsed() < Duration::from_secs(10),
        "refused at once: {:?}",
        t1.elapsed()
    );
    assert_eq!(failed_reason(&c).as_deref(), Some("RequesterNotAllowed"));
    assert!(certificate(&c).is_none());
    let f = condition(&c, "Failed").unwrap();
    assert!(
        f.message.contains("system:serviceaccount:shop:cart") && f.message.contains("payments"),
        "{}",
        f.message
    );
    wait_event(
        &kube.client,
        "default",
        "cart-steals",
        "RequesterNotAllowed",
        15,
    )
    .await;
    wait_event(&kube.client, "default", "istiod-cart", "Issued", 15).await;

    // Usages we do not issue; a foreign trust domain: Failed with their reasons.
    create(
        &istiod,
        &csr_object(
            "code-signing",
            MAIN,
            &cart_id.to_string(),
            &["digital signature", "code signing"],
            None,
        ),
    )
    .await;
    decide(&istiod, "code-signing", "Approved").await;
    assert_eq!(
        failed_reason(&answered(&kube, "code-signing").await).as_deref(),
        Some("UnsupportedUsage")
    );
    create(
        &istiod,
        &csr_object(
            "foreign",
            MAIN,
            "spiffe://evil.example/ns/shop/sa/cart",
            &ISTIOD_USAGES,
            None,
        ),
    )
    .await;
    decide(&istiod, "foreign", "Approved").await;
    assert_eq!(
        failed_reason(&answered(&kube, "foreign").await).as_deref(),
        Some("InvalidIdentity")
    );

    // --csr-auto-approve: the listed requester's CSR is approved by citadel, then signed.
    let auto_id = spiffe("shop", "auto");
    create(
        &auto,
        &csr_object(
            "auto-self",
            MAIN,
            &auto_id.to_string(),
            &ISTIOD_USAGES,
            None,
        ),
    )
    .await;
    let c = answered(&kube, "auto-self").await;
    assert_eq!(
        condition(&c, "Approved").map(|a| a.reason).as_deref(),
        Some("AutoApproved")
    );
    verify(&certificate(&c).unwrap(), &roots, &auto_id);

    // Still serving after every refusal; and what it left alone is untouched.
    create(
        &istiod,
        &csr_object(
            "istiod-again",
            MAIN,
            &cart_id.to_string(),
            &ISTIOD_USAGES,
            None,
        ),
    )
    .await;
    decide(&istiod, "istiod-again", "Approved").await;
    assert!(certificate(&answered(&kube, "istiod-again").await).is_some());
    let api = Api::<CertificateSigningRequest>::all(kube.client.clone());
    for name in ["unapproved", "not-ours", "denied"] {
        let c = api.get(name).await.unwrap();
        assert!(
            certificate(&c).is_none() && failed_reason(&c).is_none(),
            "{name} was touched: {:?}",
            c.status
        );
    }
    let m = metrics(&ca).await;
    for line in [
        "citadel_csr_signed_total 5",
        "citadel_csr_failed_total{reason=\"RequesterNotAllowed\"} 1",
        "citadel_csr_failed_total{reason=\"UnsupportedUsage\"} 1",
        "citadel_csr_failed_total{reason=\"InvalidIdentity\"} 1",
        "citadel_csr_approved_total 1",
        "citadel_csr_answer_seconds_count 8",
    ] {
        assert!(m.lines().any(|l| l == line), "{line} missing in:\n{m}");
    }

    // A denied identity (a Revocation): Failed/IdentityDenied under citadel's own signer name
    // once the denial is in force, and under the mapped CA's too.
    let banned = spiffe("shop", "banned");
    let rev = tmp.path().join("revocation.yaml");
    std::fs::write(
        &rev,
        format!(
            "apiVersion: citadel.dev/v1alpha1\nkind: Revocation\nmetadata:\n  name: ban\n  namespace: citadel\nspec:\n  identity: {banned}\n  reason: key-compromise\n"
        ),
    )
    .unwrap();
    crate::rbac::apply(&kube, &[rev.to_str().unwrap()]);
    let mut attempt = 0;
    until(
        "a CSR for the denied identity Failed/IdentityDenied",
        30,
        async || {
            attempt += 1;
            let name = format!("banned-{attempt}");
            create(
                &istiod,
                &csr_object(&name, MAIN, &banned.to_string(), &ISTIOD_USAGES, None),
            )
            .await;
            decide(&istiod, &name, "Approved").await;
            match failed_reason(&answered(&kube, &name).await).as_deref() {
                Some("IdentityDenied") => Ok(()),
                other => Err(format!(
                    "{name}: {other:?} (the denial is not in force yet)"
                )),
            }
        },
    )
    .await;
    create(
        &istiod,
        &csr_object(
            "banned-legacy",
            LEGACY,
            &banned.to_string(),
            &ISTIOD_USAGES,
            None,
        ),
    )
    .await;
    decide(&istiod, "banned-legacy", "Approved").await;
    let c = answered(&kube, "banned-legacy").await;
    assert_eq!(
        failed_reason(&c).as_deref(),
        Some("IdentityDenied"),
        "the mapped CA honours citadel's deny list"
    );
    assert!(certificate(&c).is_none());
}

/// 200 CSRs created at once, as a mesh restart would make istiod create them, each approved
/// right after its creation: the time from creation to certificate, seen by a watch as
/// istiod sees it. istiod gives up after 60 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_csrs_at_once_are_answered_well_inside_istiods_timeout() {
    let Some(kube) = KubeEnv::start().await else {
        return;
    };
    kube.namespace("citadel").await;
    let ca = replica_with(
        &kube,
        "csr-bench",
        "citadel",
        &[
            "--csr-signer",
            MAIN,
            "--csr-istiod-requester",
            "citadel-admin",
        ],
    );
    eventually("replica ready and leading", 30, async || {
        ready(&ca).await && leads(&ca).await
    })
    .await;
    const N: usize = 200;
    let seen: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let watch = tokio::spawn({
        let (client, seen) = (kube.client.clone(), seen.clone());
        async move {
            let api = Api::<CertificateSigningRequest>::all(client);
            let mut events = watcher(api, watcher::Config::default())
                .applied_objects()
                .boxed();
            while let Ok(Some(c)) = events.try_next().await {
                if certificate(&c).is_some() {
                    let mut s = seen.lock().unwrap();
                    let n = c.metadata.name.unwrap();
                    s.entry(n).or_insert_with(Instant::now);
                    if s.len() == N {
                        return;
                    }
                }
            }
        }
    });
    // The CSRs (keys and requests) are made before the clock starts.
    let objects: Vec<_> = (0..N)
        .map(|i| {
            csr_object(
                &format!("bench-{i}"),
                MAIN,
                &spiffe("shop", &format!("w{i}")).to_string(),
                &ISTIOD_USAGES,
                None,
            )
        })
        .collect();
    let started: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let t0 = Instant::now();
    let mut tasks = vec![];
    for obj in objects {
        let (client, started) = (kube.client.clone(), started.clone());
        tasks.push(tokio::spawn(async move {
            let name = obj.metadata.name.clone().unwrap();
            started.lock().unwrap().insert(name.clone(), Instant::now());
            create(&client, &obj).await;
            decide(&client, &name, "Approved").await;
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    tokio::time::timeout(Duration::from_secs(120), watch)
        .await
        .expect("every CSR answered within 2 minutes")
        .unwrap();
    let mut lat: Vec<Duration> = {
        let (started, seen) = (started.lock().unwrap(), seen.lock().unwrap());
        started.iter().map(|(n, t)| seen[n] - *t).collect()
    };
    lat.sort();
    let p = |q: f64| lat[((lat.len() as f64 * q).ceil() as usize).min(lat.len()) - 1];
    eprintln!(
        "CSR signer: {N} CSRs at once, creation to certificate p50 {:?} p99 {:?} max {:?}; all answered {:?} after the first creation",
        p(0.50),
        p(0.99),
        lat[lat.len() - 1],
        t0.elapsed()
    );
    assert!(
        p(0.99) < Duration::from_secs(30),
        "p99 {:?} is not well inside istiod's 60 s",
        p(0.99)
    );
    let m = metrics(&ca).await;
    assert!(
        m.lines()
            .any(|l| l == format!("citadel_csr_signed_total {N}")),
        "{m}"
    );
}

/// deploy/istio-ra.yaml gives citadel's service account what the CSR signer does and nothing
/// more: `sign` for its own signer names only, the CSRs' status, its roots Secret by name;
/// never `approve`, which only deploy/istio-ra-auto-approve.yaml adds (for its names only).
/// Both files are the chart's `istioRA` RBAC rendered by scripts/render-deploy.sh (checked by
/// `kit::the_chart_renders_deploy_byte_for_byte`).
#[tokio::test]
async fn the_csr_signer_rbac_signs_for_our_names_only_and_approves_only_when_asked() {
    use crate::rbac::{allowed, apply, req, Req};
    let Some(kube) = KubeEnv::start().await else {
        return;
    };
    if !require_tool("kubectl") {
        return;
    }
    apply(&kube, &["deploy/citadel.yaml", "deploy/istio-ra.yaml"]);
    let g = "certificates.k8s.io";
    let must: [Req; 7] = [
        req("list", g, "certificatesigningrequests", "", ""),
        req("watch", g, "certificatesigningrequests", "", ""),
        req("get", g, "certificatesigningrequests", "", "csr-workload-x"),
        req(
            "update",
            g,
            "certificatesigningrequests/status",
            "",
            "csr-workload-x",
        ),
        req("sign", g, "signers", "", MAIN),
        req("sign", g, "signers", "", LEGACY),
        req("update", "", "secrets", "istio-system", "external-ca-cert"),
    ];
    eventually("deploy/istio-ra.yaml's RBAC in effect", 10, async || {
        allowed(&kube, must[0]).await
    })
    .await;
    for r in must {
        assert!(allowed(&kube, r).await, "citadel needs {r:?}");
    }
    let must_not: [Req; 8] = [
        req("sign", g, "signers", "", "example.com/other"),
        req(
            "sign",
            g,
            "signers",
            "",
            "kubernetes.io/kube-apiserver-client",
        ),
        req("sign", g, "signers", "", "citadel.dev/other"),
        req("approve", g, "signers", "", MAIN),
        req(
            "update",
            g,
            "certificatesigningrequests/approval",
            "",
            "csr-workload-x",
        ),
        req("create", g, "certificatesigningrequests", "", ""),
        req(
            "delete",
            g,
            "certificatesigningrequests",
            "",
            "csr-workload-x",
        ),
        req("get", "", "secrets", "istio-system", "istiod-token"),
    ];
    for r in must_not {
        assert!(!allowed(&kube, r).await, "citadel must not have {r:?}");
    }
    // With auto-approval: approve for our names, and nothing else.
    apply(&kube, &["deploy/istio-ra-auto-approve.yaml"]);
    let approve = req("approve", g, "signers", "", MAIN);
    eventually(
        "deploy/istio-ra-auto-approve.yaml's RBAC in effect",
        10,
        async || allowed(&kube, approve).await,
    )
    .await;
    assert!(
        allowed(
            &kube,
            req("update", g, "certificatesigningrequests/approval", "", "x")
        )
        .await
    );
    assert!(!allowed(&kube, req("approve", g, "signers", "", "example.com/other")).await);
}
