//! Against a REAL kube-apiserver + etcd (scripts/kube-test-env.sh builds and caches them):
//! TokenReview authentication with its cache, JWKS from the cluster, and what happens when
//! the API server goes away. Tokens come from the TokenRequest API, as kubelet gets them.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use citadel::pki::KeyType;
use kube::api::{Api, DeleteParams, PostParams};
use tonic::Code;

use crate::support::wait::wait_event;
use crate::support::*;

async fn ca_with(kube: &KubeEnv, dir: &Path, extra: &[&str]) -> TestCa {
    let mut args = vec!["--kubeconfig", kube.kubeconfig.to_str().unwrap()];
    args.extend_from_slice(extra);
    TestCa::start_in(dir, &args).await
}

#[tokio::test]
async fn tokenreview_authenticates_real_tokens_caches_them_and_refuses_the_rest() {
    let Some(kube) = KubeEnv::start().await else {
        return;
    };
    kube.service_account("shop", "cart").await;
    kube.service_account("shop", "frontend").await;
    let tmp = tempfile::tempdir().unwrap();
    // The token cache runs on the server's clock: moved, not slept through.
    let clock = std::sync::Arc::new(citadel::clock::ManualClock::new(
        time::OffsetDateTime::now_utc(),
    ));
    let kubeconfig = kube.kubeconfig.to_str().unwrap().to_string();
    let ca = TestCa::try_start_with(
        tmp.path(),
        &[
            "--kubeconfig",
            &kubeconfig,
            "--auth",
            "tokenreview",
            "--token-cache-ttl",
            "2s",
        ],
        "127.0.0.1:0".parse().unwrap(),
        clock.clone(),
    )
    .await
    .unwrap();
    let mut client = ca.client().await;
    let (cart_key, cart_csr) = csr_for(KeyType::EcP256, &spiffe("shop", "cart"));

    // A projected token with audience istio-ca: a certificate for exactly that account.
    let token = kube.token("shop", "cart", "istio-ca").await;
    let chain = call(&mut client, &cart_csr, Some(&bearer(&token)), 0, None)
        .await
        .unwrap();
    let v = citadel::client::verify_response(
        &chain,
        Some(&spiffe("shop", "cart")),
        time::OffsetDateTime::now_utc(),
    )
    .unwrap();
    assert_eq!(
        v.leaf.uri_sans,
        vec!["spiffe://cluster.local/ns/shop/sa/cart".to_string()]
    );
    if let Some(gs) = crate::thirdparty::gospiffe() {
        let bundle = String::from_utf8(ca.root_pem()).unwrap();
        crate::thirdparty::gospiffe_accepts(&gs, &chain.concat(), &bundle, &v.leaf.uri_sans[0]);
    }

    // Refused: the wrong audience; a token signed by another cluster's key (the dev key).
    let wrong_aud = kube.token("shop", "cart", "vault").await;
    let err = call(&mut client, &cart_csr, Some(&bearer(&wrong_aud)), 0, None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(!err.message().contains(&wrong_aud));
    let foreign = self::token("shop", "cart");
    let err = call(&mut client, &cart_csr, Some(&bearer(&foreign)), 0, None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");

    // One review per distinct token per cache window, also for concurrent requests.
    clock.advance(time::Duration::milliseconds(2100)); // the first token's entry expires
    let before = kube.token_reviews().await;
    let t1 = kube.token("shop", "frontend", "istio-ca").await;
    let (_, front_csr) = csr_for(KeyType::EcP256, &spiffe("shop", "frontend"));
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let (mut c, csr, t) = (client.clone(), front_csr.clone(), bearer(&t1));
        tasks.push(tokio::spawn(async move {
            call(&mut c, &csr, Some(&t), 0, None).await.map(|_| ())
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(
        kube.token_reviews().await - before,
        1,
        "20 concurrent requests with one token: one review"
    );
    for _ in 0..5 {
        call(&mut client, &front_csr, Some(&bearer(&t1)), 0, None)
            .await
            .unwrap();
    }
    assert_eq!(
        kube.token_reviews().await - before,
        1,
        "cached within the window"
    );

    clock.advance(time::Duration::milliseconds(2100));
    call(&mut client, &front_csr, Some(&bearer(&t1)), 0, None)
        .await
        .unwrap();
    assert_eq!(
        kube.token_reviews().await - before,
        2,
        "one more review after the window"
    );

    // A deleted service account: still accepted from our cache, refused once the window has
    // passed. (kube-apiserver caches successful token authentications itself, so the
    // refusal can take a few more seconds: poll, bounded.)
    kube.delete_service_account("shop", "frontend").await;
    call(&mut client, &front_csr, Some(&bearer(&t1)), 0, None)
        .await
        .unwrap();
    // Real time for the API server's own cache, the same on our clock for ours.
    let err = until(
        "a deleted service account refused",
        20,
        async || match call(&mut client, &front_csr, Some(&bearer(&t1)), 0, None).await {
            Err(e) => Ok(e),
            Ok(_) => {
                clock.advance(time::Duration::milliseconds(50));
                Err("still accepted".into())
            }
        },
    )
    .await;
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");

    // The API server goes away: a token that needs a review gets Unavailable (retryable),
    // not Unauthenticated; a client certificate still renews.
    kube.stop();
    let t2 = token.clone();
    let err = call(&mut client, &cart_csr, Some(&bearer(&t2)), 0, None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    let identity = Some((
        chain[..2].concat().into_bytes(),
        cart_key.serialize_pem().into_bytes(),
    ));
    let mut mtls = ca.client_with(identity).await;
    call(&mut mtls, &cart_csr, None, 0, None)
        .await
        .expect("renewal by certificate needs no API server");
    ca.stop().await;
}

#[tokio::test]
async fn jwks_from_the_cluster_needs_no_api_call_per_request() {
    let Some(kube) = KubeEnv::start().await else {
        return;
    };
    kube.service_account("shop", "cart").await;
    let tmp = tempfile::tempdir().unwrap();
    let ca = ca_with(&kube, tmp.path(), &["--jwks-from-cluster"]).await;
    let mut client = ca.client().await;
    let (key, csr) = csr_for(KeyType::EcP256, &spiffe("shop", "cart"));
    let token = kube.token("shop", "cart", "istio-ca").await;
    let chain = call(&mut client, &csr, Some(&bearer(&token)), 0, None)
        .await
        .unwrap();
    citadel::client::verify_response(
        &chain,
        Some(&spiffe("shop", "cart")),
        time::OffsetDateTime::now_utc(),
    )
    .unwrap();
    let wrong_aud = kube.token("shop", "cart", "vault").await;
    assert_eq!(
        call(&mut client, &csr, Some(&bearer(&wrong_aud)), 0, None)
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );
    let reviews = kube.token_reviews().await;

    // With the API server gone, the JWKS path keeps verifying tokens and signing: it made no
    // API call per request, and no TokenReview ever.
    kube.stop();
    for _ in 0..10 {
        call(&mut client, &csr, Some(&bearer(&token)), 0, None)
            .await
            .unwrap();
    }
    assert_eq!(reviews, 0, "the JWKS path never sends TokenReviews");
    // Renewal by client certificate works too while the API server is down.
    let mut mtls = ca
        .client_with(Some((
            chain[..2].concat().into_bytes(),
            key.serialize_pem().into_bytes(),
        )))
        .await;
    call(&mut mtls, &csr, None, 0, None).await.unwrap();
    ca.stop().await;
}

/// A `citadel serve --store kube` replica as a real process.
pub(crate) struct Replica {
    pub(crate) child: std::process::Child,
    pub(crate) addr: std::net::SocketAddr,
    pub(crate) metrics: std::net::SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_addr() -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], free_port()))
}

fn replica(kube: &KubeEnv, name: &str) -> Replica {
    replica_in(kube, name, "citadel")
}

pub(crate) fn replica_in(kube: &KubeEnv, name: &str, namespace: &str) -> Replica {
    replica_with(kube, name, namespace, &[])
}

/// A replica with `extra` flags appended to the usual ones.
pub(crate) fn replica_with(kube: &KubeEnv, name: &str, namespace: &str, extra: &[&str]) -> Replica {
    let dir = tempfile::tempdir().unwrap();
    let (addr, metrics) = (free_addr(), free_addr());
    let log = std::fs::File::create(kube.dir.join(format!("{name}.log"))).unwrap();
    let child = Command::new(BIN)
        .args([
            "serve",
            "--dev",
            "--store",
            "kube",
            "--namespace",
            namespace,
            "--lease-duration",
            "3s",
            "--reconcile-interval",
            "500ms",
            "--pod-name",
            name,
        ])
        .arg("--kubeconfig")
        .arg(&kube.kubeconfig)
        .arg("--state-dir")
        .arg(dir.path())
        .args([
            "--listen",
            &addr.to_string(),
            "--metrics-listen",
            &metrics.to_string(),
        ])
        .args(extra)
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    Replica {
        child,
        addr,
        metrics,
        _dir: dir,
    }
}

pub(crate) async fn ready(r: &Replica) -> bool {
    matches!(http_get(r.metrics, "/healthz/ready").await, Ok((200, _)))
}

pub(crate) async fn leads(r: &Replica) -> bool {
    http_get(r.metrics, "/metrics")
        .await
        .map(|(_, m)| m.contains("citadel_leader 1\n"))
        .unwrap_or(false)
}

async fn issue_from(r: &Replica, bundle: &str, sa: &str) -> Vec<String> {
    let mut c = citadel::client::connect(&citadel::client::ConnectOptions {
        addr: r.addr.to_string(),
        root_pem: bundle.as_bytes().to_vec(),
        server_name: Some("localhost".into()),
        ..Default::default()
    })
    .await
    .unwrap();
    let (_, csr) = csr_for(KeyType::EcP256, &spiffe("shop", sa));
    issue(&mut c, &csr, "shop", sa).await
}

#[tokio::test]
async fn replicas_share_one_ca_publish_the_bundle_everywhere_and_survive_the_leader() {
    let Some(kube) = KubeEnv::start().await else {
        return;
    };
    kube.namespace("citadel").await;
    kube.namespace("shop").await;
    // Two replicas start at the same moment on an empty cluster.
    let (a, b) = (replica(&kube, "replica-a"), replica(&kube, "replica-b"));
    eventually("both replicas ready", 30, async || {
        ready(&a).await && ready(&b).await
    })
    .await;
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(kube.client.clone(), "citadel");
    let journals: Vec<_> = secrets
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|s| s.metadata.name.as_deref() == Some("citadel-ca-journal"))
        .collect();
    assert_eq!(journals.len(), 1, "exactly one CA journal");
    let istio = secrets.get("istio-ca-secret").await.unwrap().data.unwrap();
    for k in [
        "ca-cert.pem",
        "ca-key.pem",
        "cert-chain.pem",
        "root-cert.pem",
    ] {
        assert!(istio.contains_key(k), "istio-ca-secret lacks {k}");
    }

    // The bundle is in every namespace (kube-public and kube-node-lease excepted).
    eventually("bundle ConfigMap in shop", 15, async || {
        kube.bundle("shop").await.is_some()
    })
    .await;
    let bundle = kube.bundle("shop").await.unwrap();
    let cm = kube.configmap("shop", "istio-ca-root-cert").await.unwrap();
    assert_eq!(
        cm.metadata
            .labels
            .unwrap()
            .get("istio.io/config")
            .map(String::as_str),
        Some("true")
    );
    assert!(kube
        .configmap("kube-public", "istio-ca-root-cert")
        .await
        .is_none());
    eventually("CRL ConfigMap in shop", 15, async || {
        kube.configmap("shop", "istio-ca-crl").await.is_some()
    })
    .await;

    // Both replicas sign, and each one's certificates verify against the other's bundle.
    let (ca, cb) = (
        issue_from(&a, &bundle, "cart").await,
        issue_from(&b, &bundle, "cart").await,
    );
    let now = time::OffsetDateTime::now_utc();
    let mut x = ca.clone();
    *x.last_mut().unwrap() = cb.last().unwrap().clone();
    citadel::client::verify_response(&x, Some(&spiffe("shop", "cart")), now).unwrap();
    let mut y = cb.clone();
    *y.last_mut().unwrap() = ca.last().unwrap().clone();
    citadel::client::verify_response(&y, Some(&spiffe("shop", "cart")), now).unwrap();

    // A new namespace gets its ConfigMap within seconds; an edited one is put back.
    kube.namespace("payments").await;
    eventually("bundle in a new namespace", 10, async || {
        kube.bundle("payments").await.as_deref() == Some(bundle.as_str())
    })
    .await;
    let cms: Api<k8s_openapi::api::core::v1::ConfigMap> =
        Api::namespaced(kube.client.clone(), "shop");
    let mut edited = cms.get("istio-ca-root-cert").await.unwrap();
    edited.data = Some([("root-cert.pem".to_string(), "tampered".to_string())].into());
    cms.replace("istio-ca-root-cert", &PostParams::default(), &edited)
        .await
        .unwrap();
    eventually("edited ConfigMap put back", 10, async || {
        kube.bundle("shop").await.as_deref() == Some(bundle.as_str())
    })
    .await;
    // ...and the repair is a Kubernetes Event on that ConfigMap, for `kubectl describe`.
    wait_event(&kube.client, "shop", "istio-ca-root-cert", "Drifted", 10).await;
    // A new bundle is an update, not drift: no Event for those in other namespaces.
    let other: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(kube.client.clone(), "payments");
    assert!(other
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .iter()
        .all(|e| e.reason.as_deref() != Some("Drifted")));

    // Kill the leader (-9, no goodbye): the other takes over within the lease duration and
    // repairs a deleted ConfigMap.
    eventually("a leader", 10, async || leads(&a).await || leads(&b).await).await;
    let (mut leader, follower) = if leads(&a).await { (a, b) } else { (b, a) };
    assert!(!leads(&follower).await, "exactly one leader");
    let _ = leader.child.kill();
    let _ = leader.child.wait();
    let t0 = std::time::Instant::now();
    eventually("the follower takes over", 10, async || {
        leads(&follower).await
    })
    .await;
    eprintln!("takeover after {:?} (lease 3s)", t0.elapsed());
    cms.delete("istio-ca-root-cert", &DeleteParams::default())
        .await
        .unwrap();
    eventually(
        "deleted ConfigMap repaired by the new leader",
        10,
        async || kube.bundle("shop").await.as_deref() == Some(bundle.as_str()),
    )
    .await;
    // It still signs.
    issue_from(&follower, &bundle, "frontend").await;

    // An operator rotates the root against the Kubernetes store; the leader publishes the
    // two-root bundle everywhere, then activates the new chain.
    let cli = |args: &[&str]| {
        let out = Command::new(BIN)
            .args(args)
            .args(["--store", "kube", "--namespace", "citadel"])
            .arg("--kubeconfig")
            .arg(&kube.kubeconfig)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (ok, out) = cli(&[
        "ca",
        "rotate-root",
        "--activate-after",
        "2s",
        "--retire-after",
        "1h",
    ]);
    assert!(ok, "{out}");
    let roots = |b: &str| b.matches("BEGIN CERTIFICATE").count();
    eventually("two-root bundle in every namespace", 15, async || {
        kube.bundle("shop").await.is_some_and(|b| roots(&b) == 2)
            && kube
                .bundle("payments")
                .await
                .is_some_and(|b| roots(&b) == 2)
    })
    .await;
    let two_roots = kube.bundle("shop").await.unwrap();
    eventually("the new chain signs", 15, async || {
        issue_from(&follower, &two_roots, "cart").await.len() == 4
    })
    .await;
    let (ok, status) = cli(&["ca", "status"]);
    assert!(
        ok && status.contains("root rotation: activated (operator)"),
        "{status}"
    );
    drop(leader);
}

#[tokio::test]
async fn deploy_manifests_pass_server_side_dry_run() {
    let Some(kube) = KubeEnv::start().await else {
        return;
    };
    if !require_tool("kubectl") {
        return;
    }
    // Namespaced objects need their namespace to exist, even in a dry run.
    kube.namespace("istio-system").await;
    let out = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(&kube.kubeconfig)
        .args(["apply", "--dry-run=server", "-f", "deploy/citadel.yaml"])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "kubectl apply --dry-run=server failed:\n{text}"
    );
    for kind in [
        "serviceaccount/citadel",
        "clusterrole.rbac.authorization.k8s.io/citadel",
        "role.rbac.authorization.k8s.io/citadel",
        "deployment.apps/citadel",
        "service/citadel",
    ] {
        assert!(text.contains(kind), "{kind} missing from:\n{text}");
    }
}

#[tokio::test]
async fn a_cacerts_secret_is_the_plugged_in_ca() {
    let Some(kube) = KubeEnv::start().await else {
        return;
    };
    if !require_tool("openssl") {
        return;
    }
    kube.namespace("mesh-ca").await;
    kube.namespace("shop").await;
    let tmp = tempfile::tempdir().unwrap();
    crate::thirdparty::make_cacerts(
        tmp.path(),
        "openssl ecparam -name prime256v1 -genkey -noout -out ca-key.pem",
    );
    let mut secret = k8s_openapi::api::core::v1::Secret::default();
    secret.metadata.name = Some("cacerts".into());
    secret.data = Some(
        [
            "ca-cert.pem",
            "ca-key.pem",
            "cert-chain.pem",
            "root-cert.pem",
        ]
        .iter()
        .map(|f| {
            (
                f.to_string(),
                k8s_openapi::ByteString(std::fs::read(tmp.path().join(f)).unwrap()),
            )
        })
        .collect(),
    );
    Api::<k8s_openapi::api::core::v1::Secret>::namespaced(kube.client.clone(), "mesh-ca")
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let r = replica_in(&kube, "plugged", "mesh-ca");
    eventually("ready", 30, async || ready(&r).await).await;
    let root = std::fs::read_to_string(tmp.path().join("root-cert.pem")).unwrap();
    eventually("the plugged root published as the bundle", 15, async || {
        kube.bundle("shop").await.as_deref() == Some(root.as_str())
    })
    .await;
    let chain = issue_from(&r, &root, "cart").await;
    assert_eq!(
        chain[1].trim(),
        std::fs::read_to_string(tmp.path().join("ca-cert.pem"))
            .unwrap()
            .trim(),
        "signed by the Secret's ca-cert.pem"
    );
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(kube.client.clone(), "mesh-ca");
    assert!(
        secrets
            .get_opt("citadel-ca-journal")
            .await
            .unwrap()
            .is_none(),
        "no self-signed CA was created"
    );
}

/// `ca backup` from the journal Secret, `ca restore` into another namespace's: a replica
/// there serves the same CA.
#[tokio::test]
async fn backup_and_restore_through_the_kubernetes_store() {
    let Some(kube) = KubeEnv::start().await else {
        return;
    };
    kube.namespace("citadel").await;
    kube.namespace("restored").await;
    let a = replica_in(&kube, "a", "citadel");
    eventually("replica ready", 30, async || ready(&a).await).await;
    let bundle = kube.bundle("citadel").await;
    let kc = kube.kubeconfig.to_str().unwrap();
    let file = kube.dir.join("backup.json");
    let run_ca = |args: &[&str]| {
        let (code, out, err) = run(args, &kube.dir);
        (code == 0, out + &err)
    };
    let key = kube.dir.join("backup.key");
    let (ok, text) = run_ca(&["ca", "backup-key", "--out", key.to_str().unwrap()]);
    assert!(ok, "{text}");
    let (ok, text) = run_ca(&[
        "ca",
        "backup",
        "--backup-key-file",
        key.to_str().unwrap(),
        "--store",
        "kube",
        "--namespace",
        "citadel",
        "--kubeconfig",
        kc,
        "--out",
        file.to_str().unwrap(),
    ]);
    assert!(ok, "{text}");
    assert_eq!(file_mode(&file), 0o600);
    drop(a);
    let (ok, text) = run_ca(&[
        "ca",
        "restore",
        "--backup-key-file",
        key.to_str().unwrap(),
        "--store",
        "kube",
        "--namespace",
        "restored",
        "--kubeconfig",
        kc,
        "--from",
        file.to_str().unwrap(),
    ]);
    assert!(ok, "{text}");
    let b = replica_in(&kube, "b", "restored");
    eventually("restored replica ready", 30, async || ready(&b).await).await;
    let root = bundle.expect("the first replica published its bundle");
    eventually("the same root published", 15, async || {
        kube.bundle("restored").await.as_deref() == Some(root.as_str())
    })
    .await;
    issue_from(&b, &root, "cart").await;
}

fn signal(child: &std::process::Child, sig: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{sig}"), &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{sig}");
}

/// Freeze the leader (SIGSTOP) past its lease; the follower takes over and the operator
/// rotates the root through it; resume the old leader (SIGCONT). It must not act on its stale
/// view: no leadership claim, no second CA, no stale bundle written back, and it signs with
/// the new chain.
#[tokio::test]
async fn a_paused_leader_is_fenced_off() {
    let Some(kube) = KubeEnv::start().await else {
        return;
    };
    kube.namespace("citadel").await;
    kube.namespace("shop").await;
    let a = replica(&kube, "a");
    let b = replica(&kube, "b");
    eventually("both replicas ready", 30, async || {
        ready(&a).await && ready(&b).await
    })
    .await;
    eventually("a leader", 10, async || leads(&a).await || leads(&b).await).await;
    let (old, new) = if leads(&a).await { (a, b) } else { (b, a) };
    eventually("the bundle in shop", 15, async || {
        kube.bundle("shop").await.is_some()
    })
    .await;
    let before = kube.bundle("shop").await.unwrap();

    signal(&old.child, "STOP");
    eventually("the follower takes over", 15, async || leads(&new).await).await;
    let kc = kube.kubeconfig.to_str().unwrap().to_string();
    let ca = |args: &[&str]| {
        let mut argv = args.to_vec();
        argv.extend([
            "--store",
            "kube",
            "--namespace",
            "citadel",
            "--kubeconfig",
            &kc,
        ]);
        let (code, out, err) = run(&argv, &kube.dir);
        assert_eq!(code, 0, "citadel {args:?}: {err}");
        out
    };
    ca(&["ca", "rotate-root", "--now"]);
    // The new leader publishes the two-root bundle, then activates the new chain.
    eventually("the new bundle everywhere", 30, async || {
        let want = ca(&["ca", "bundle"]);
        want != before && kube.bundle("shop").await.as_deref() == Some(want.as_str())
    })
    .await;

    signal(&old.child, "CONT");
    // Let the old leader's timers, watches and scheduler all fire on its stale state. A sleep
    // on purpose: what is under test is that NOTHING is written back during this window (a
    // separate process on the real clock, so there is no clock to move and no event to await).
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        leads(&new).await && !leads(&old).await,
        "exactly one leader: the new one"
    );
    let want = ca(&["ca", "bundle"]);
    for ns in ["shop", "citadel", "default"] {
        assert_eq!(
            kube.bundle(ns).await.as_deref(),
            Some(want.as_str()),
            "{ns}: no stale bundle written back"
        );
    }
    let status = ca(&["ca", "status", "--json"]);
    let s: serde_json::Value = serde_json::from_str(&status).unwrap();
    let roots = s["authorities"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|x| x["role"] == "root" && x["status"] != "retired")
                .count()
        })
        .unwrap_or(0);
    assert!(roots <= 2, "one CA, mid-rotation at most: {status}");
    // Both replicas sign, with a chain the current bundle verifies.
    issue_from(&new, &want, "cart").await;
    issue_from(&old, &want, "cart").await;
}
