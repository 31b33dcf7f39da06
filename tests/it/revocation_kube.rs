//! Revocation with `--store kube` across replicas, against a REAL kube-apiserver + etcd: the
//! `Revocation` resource (citadel.dev/v1alpha1) reconciled by every replica against its own
//! issuance index, the CRL ConfigMap checked with openssl, the deny list on every replica.

use std::path::Path;
use std::process::Command;

use citadel::cluster::revocations::Revocation;
use citadel::pki::{chain, pem, KeyType};
use kube::api::{Api, PostParams};
use tonic::Code;
use x509_parser::prelude::FromDer;
use x509_parser::revocation_list::CertificateRevocationList;

use crate::support::*;

const CRD: &str = "deploy/crds/revocation.yaml";

/// A `citadel serve --store kube` replica on a state directory the test keeps, so it can be
/// restarted with its issuance index.
struct Replica {
    child: std::process::Child,
    addr: std::net::SocketAddr,
    metrics: std::net::SocketAddr,
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn addr() -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], free_port()))
}

fn spawn(kube: &KubeEnv, name: &str, dir: &Path) -> Replica {
    let (addr, metrics) = (addr(), addr());
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(kube.dir.join(format!("{name}.log")))
        .unwrap();
    let child = Command::new(BIN)
        .args([
            "serve",
            "--dev",
            "--store",
            "kube",
            "--namespace",
            "citadel",
        ])
        .args(["--lease-duration", "3s", "--reconcile-interval", "500ms"])
        .args(["--pod-name", name])
        .arg("--kubeconfig")
        .arg(&kube.kubeconfig)
        .arg("--state-dir")
        .arg(dir)
        .args(["--listen", &addr.to_string()])
        .args(["--metrics-listen", &metrics.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    Replica {
        child,
        addr,
        metrics,
    }
}

async fn ready(r: &Replica) -> bool {
    matches!(http_get(r.metrics, "/healthz/ready").await, Ok((200, _)))
}

async fn client_of(r: &Replica, bundle: &str) -> citadel::client::CaClient {
    citadel::client::connect(&citadel::client::ConnectOptions {
        addr: r.addr.to_string(),
        root_pem: bundle.as_bytes().to_vec(),
        server_name: Some("localhost".into()),
        ..Default::default()
    })
    .await
    .unwrap()
}

async fn try_issue(r: &Replica, bundle: &str, sa: &str) -> Result<Vec<String>, tonic::Status> {
    let mut c = client_of(r, bundle).await;
    let (_, csr) = csr_for(KeyType::EcP256, &spiffe("shop", sa));
    call(&mut c, &csr, Some(&bearer(&token("shop", sa))), 0, None).await
}

fn serial_of(chain_pem: &[String]) -> String {
    chain::describe(&pem::parse_certs(chain_pem[0].as_bytes()).unwrap()[0])
        .unwrap()
        .serial_hex
}

fn kubectl(kube: &KubeEnv, args: &[&str], stdin: Option<&str>) -> (bool, String) {
    use std::io::Write;
    let mut child = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(&kube.kubeconfig)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(s) = stdin {
        child.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// The serials the CRLs in the `istio-ca-crl` ConfigMap of `ns` list (lowercase hex).
async fn crl_serials(kube: &KubeEnv, ns: &str) -> Vec<String> {
    let Some(cm) = kube.configmap(ns, "istio-ca-crl").await else {
        return Vec::new();
    };
    let crl_text = cm
        .data
        .and_then(|d| d.get("ca-crl.pem").cloned())
        .unwrap_or_default();
    let mut out = Vec::new();
    for p in ::pem::parse_many(crl_text.as_bytes()).unwrap_or_default() {
        let (_, crl) = CertificateRevocationList::from_der(p.contents()).unwrap();
        for r in crl.iter_revoked_certificates() {
            out.push(chain::serial_hex(r.raw_serial()));
        }
    }
    out
}

/// An Envoy-style check: openssl verify with -crl_check against the CRLs from the ConfigMap.
fn openssl_check(dir: &Path, chain: &[String], crl_pem: &str) -> String {
    std::fs::write(dir.join("root.pem"), &chain[2]).unwrap();
    std::fs::write(dir.join("int.pem"), &chain[1]).unwrap();
    std::fs::write(dir.join("leaf.pem"), &chain[0]).unwrap();
    std::fs::write(dir.join("crl.pem"), crl_pem).unwrap();
    let out = Command::new("openssl")
        .args([
            "verify",
            "-crl_check",
            "-CRLfile",
            "crl.pem",
            "-CAfile",
            "root.pem",
        ])
        .args(["-untrusted", "int.pem", "leaf.pem"])
        .current_dir(dir)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr)
}

fn revocation_yaml(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: citadel.dev/v1alpha1\nkind: Revocation\nmetadata:\n  name: {name}\n  namespace: citadel\nspec:\n{spec}"
    )
}

#[tokio::test]
async fn a_revocation_resource_revokes_an_identity_on_every_replica() {
    let Some(kube) = KubeEnv::start().await else {
        return;
    };
    assert!(require_tool("kubectl") && require_tool("openssl"));
    kube.namespace("citadel").await;
    kube.namespace("shop").await;
    let (ok, out) = kubectl(&kube, &["apply", "-f", CRD], None);
    assert!(ok, "{out}");
    let (ok, out) = kubectl(
        &kube,
        &[
            "wait",
            "--for=condition=established",
            "--timeout=30s",
            "crd/revocations.citadel.dev",
        ],
        None,
    );
    assert!(ok, "{out}");

    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = spawn(&kube, "replica-a", dir_a.path());
    let mut b = spawn(&kube, "replica-b", dir_b.path());
    eventually("both replicas ready", 60, async || {
        ready(&a).await && ready(&b).await
    })
    .await;
    eventually("bundle ConfigMap in shop", 20, async || {
        kube.bundle("shop").await.is_some()
    })
    .await;
    let bundle = kube.bundle("shop").await.unwrap();

    // Both replicas issue to shop/cart; b restarts afterwards (its index survives on disk).
    let mut carts = Vec::new();
    for r in [&a, &b, &a, &b] {
        carts.push(try_issue(r, &bundle, "cart").await.unwrap());
    }
    let web = try_issue(&a, &bundle, "web").await.unwrap();
    drop(std::mem::replace(
        &mut b,
        spawn(&kube, "replica-b", dir_b.path()),
    ));
    eventually("replica b back", 60, async || ready(&b).await).await;

    // The schema refuses nonsense at the API server, with messages that say what is wrong.
    let api: Api<Revocation> = Api::namespaced(kube.client.clone(), "citadel");
    let ar = kube::core::ApiResource::erase::<Revocation>(&());
    let raw: Api<kube::core::DynamicObject> =
        Api::namespaced_with(kube.client.clone(), "citadel", &ar);
    for (spec, want) in [
        (
            "  serial: 3a9f\n  identity: spiffe://cluster.local/ns/shop/sa/cart\n",
            "exactly one of spec.serial or spec.identity",
        ),
        (
            "  reason: key-compromise\n",
            "exactly one of spec.serial or spec.identity",
        ),
        (
            "  identity: spiffe://cluster.local/ns/shop/sa/cart\n  reason: because\n",
            "Unsupported value: \"because\"",
        ),
        ("  identity: https://example.com/x\n", "must be a SPIFFE ID"),
        ("  serial: xyz\n", "serial must be hex"),
    ] {
        let (ok, out) = kubectl(
            &kube,
            &["apply", "-f", "-"],
            Some(&revocation_yaml("bad", spec)),
        );
        assert!(!ok && out.contains(want), "{spec}: {out}");
        // The same through the API: 422 Invalid.
        let obj = raw_object(&kube, &revocation_yaml("bad", spec));
        match raw.create(&PostParams::default(), &obj).await {
            Err(kube::Error::Api(s)) => assert_eq!(s.code, 422, "{s:?}"),
            other => panic!("{spec}: {other:?}"),
        }
    }
    assert!(api
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .is_empty());

    // One Revocation, applied with kubectl.
    let cart_yaml = revocation_yaml(
        "cart-compromised",
        "  identity: spiffe://cluster.local/ns/shop/sa/cart\n  reason: key-compromise\n",
    );
    let (ok, out) = kubectl(&kube, &["apply", "-f", "-"], Some(&cart_yaml));
    assert!(ok, "{out}");
    let serials: Vec<String> = carts.iter().map(|c| serial_of(c)).collect();
    eventually(
        "every cart certificate on the CRL ConfigMap",
        20,
        async || {
            let listed = crl_serials(&kube, "shop").await;
            serials.iter().all(|s| listed.contains(s))
        },
    )
    .await;
    eventually(
        "status: applied, 4 certificates, both replicas",
        20,
        async || {
            let st = api
                .get("cart-compromised")
                .await
                .unwrap()
                .status
                .unwrap_or_default();
            st.conditions
                .iter()
                .any(|c| c.type_ == "Applied" && c.status == "True")
                && st.certificates_revoked == Some(4)
                && st.replicas.len() == 2
                && st.replicas.values().all(|r| r.found_in_index == 2)
                && !st.crl_versions.is_empty()
        },
    )
    .await;
    // The deny list: neither replica issues to cart again, within seconds.
    for r in [&a, &b] {
        eventually("cart refused", 10, async || {
            matches!(try_issue(r, &bundle, "cart").await, Err(s) if s.code() == Code::PermissionDenied)
        })
        .await;
    }
    // Envoy-style CRL checks refuse every cart certificate and accept web's.
    let crl_pem = kube
        .configmap("shop", "istio-ca-crl")
        .await
        .unwrap()
        .data
        .unwrap()["ca-crl.pem"]
        .clone();
    let tmp = tempfile::tempdir().unwrap();
    for c in &carts {
        let out = openssl_check(tmp.path(), c, &crl_pem);
        assert!(out.contains("certificate revoked"), "{out}");
    }
    let out = openssl_check(tmp.path(), &web, &crl_pem);
    assert!(out.contains("leaf.pem: OK"), "{out}");

    // An Event on the Revocation says it was applied.
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(kube.client.clone(), "citadel");
    eventually("an Applied event", 10, async || {
        events
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .iter()
            .any(|e| {
                e.reason.as_deref() == Some("Applied")
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref())
                        == Some("cart-compromised")
            })
    })
    .await;

    // Re-applying the same YAML changes nothing: not the object, not the journal, not the CRLs.
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(kube.client.clone(), "citadel");
    let before_status = api.get("cart-compromised").await.unwrap().status;
    let before_journal = secrets
        .get("citadel-ca-journal")
        .await
        .unwrap()
        .metadata
        .resource_version;
    let (ok, out) = kubectl(&kube, &["apply", "-f", "-"], Some(&cart_yaml));
    assert!(ok && out.contains("unchanged"), "{out}");
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    assert_eq!(
        api.get("cart-compromised").await.unwrap().status,
        before_status
    );
    assert_eq!(
        secrets
            .get("citadel-ca-journal")
            .await
            .unwrap()
            .metadata
            .resource_version,
        before_journal,
        "the journal was written again"
    );
    // A Revocation is final: editing it is refused.
    let (ok, out) = kubectl(
        &kube,
        &["apply", "-f", "-"],
        Some(&revocation_yaml(
            "cart-compromised",
            "  identity: spiffe://cluster.local/ns/shop/sa/web\n",
        )),
    );
    assert!(!ok && out.contains("cannot be changed"), "{out}");

    // What an operator sees.
    let (ok, out) = kubectl(&kube, &["get", "revocations", "-n", "citadel"], None);
    assert!(
        ok && out.contains("cart-compromised") && out.contains("True"),
        "{out}"
    );
    eprintln!("$ kubectl get revocations -n citadel\n{out}");
    let (ok, out) = kubectl(
        &kube,
        &[
            "describe",
            "revocation",
            "cart-compromised",
            "-n",
            "citadel",
        ],
        None,
    );
    assert!(ok && out.contains("Applied"), "{out}");
    eprintln!("$ kubectl describe revocation cart-compromised -n citadel\n{out}");

    // `citadel revoke --store kube` end to end: web's serial, precisely.
    let web_serial = serial_of(&web);
    let kc = kube.kubeconfig.to_string_lossy().to_string();
    let (code, out, err) = run(
        &[
            "revoke",
            "--store",
            "kube",
            "--namespace",
            "citadel",
            "--kubeconfig",
            &kc,
            "--serial",
            &web_serial,
            "--name",
            "web-one",
            "--timeout",
            "30s",
        ],
        Path::new("."),
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("1 certificate(s) on the CRL"), "{out}");
    eventually("web's serial on the CRL ConfigMap", 20, async || {
        crl_serials(&kube, "shop").await.contains(&web_serial)
    })
    .await;
    // A serial no replica ever recorded still lands on a CRL (after the fallback delay).
    let (code, out, err) = run(
        &[
            "revoke",
            "--store",
            "kube",
            "--namespace",
            "citadel",
            "--kubeconfig",
            &kc,
            "--serial",
            "0a0b0c0d",
            "--timeout",
            "40s",
        ],
        Path::new("."),
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("1 certificate(s) on the CRL"), "{out}");
    eventually("the unknown serial on the CRL ConfigMap", 20, async || {
        crl_serials(&kube, "shop")
            .await
            .contains(&"0a0b0c0d".to_string())
    })
    .await;
    // A bad one through the CLI is refused before anything is created.
    let (code, _, err) = run(
        &[
            "revoke",
            "--store",
            "kube",
            "--namespace",
            "citadel",
            "--kubeconfig",
            &kc,
            "--serial",
            "xyz",
        ],
        Path::new("."),
    );
    assert_ne!(code, 0);
    assert!(err.contains("not a certificate serial"), "{err}");

    // Both replicas kept serving everyone else throughout.
    for r in [&a, &b] {
        try_issue(r, &bundle, "web").await.unwrap();
    }
    drop(b);
    drop(a);
}

/// The object a manifest describes, as kubectl would send it (no client-side checks).
fn raw_object(kube: &KubeEnv, yaml: &str) -> kube::core::DynamicObject {
    let (ok, out) = kubectl(
        kube,
        &["create", "--dry-run=client", "-o", "json", "-f", "-"],
        Some(yaml),
    );
    assert!(ok, "{out}");
    serde_json::from_str(&out).unwrap()
}
