//! Pod Certificates against a REAL kube-apiserver 1.37 (NodeRestriction on): the test acts
//! as the kubelet of node-a with its `system:node:node-a` client certificate, creates
//! PodCertificateRequests for pods bound to that node, and checks what citadel (the real
//! binary, `serve --store kube`) decides, and the ClusterTrustBundle it keeps.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use citadel::cluster::podcert::{is_decided, DEFAULT_SIGNER_NAME};
use futures_util::{StreamExt, TryStreamExt};
use k8s_openapi::api::certificates::v1::{ClusterTrustBundle, PodCertificateRequest};
use k8s_openapi::api::core::v1::{Node, Pod, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Api, DeleteParams, PostParams};
use kube::runtime::{watcher, WatchStreamExt};

use crate::kube::{leads, ready, replica_in, replica_with, Replica};
use crate::support::*;

const CTB: &str = "citadel.dev:spiffe:roots";

/// The kubelet of node-a: its client, and the Node object it registered.
pub(crate) struct Kubelet {
    pub(crate) client: kube::Client,
    pub(crate) node: String,
    node_uid: String,
}

pub(crate) async fn kubelet(kube: &KubeEnv) -> Kubelet {
    let client = citadel::cluster::client(Some(&kube.dir.join("node-kubeconfig")))
        .await
        .unwrap();
    let node = std::env::var("CITADEL_KUBE_NODE_NAME").unwrap_or_else(|_| "node-a".into());
    let nodes: Api<Node> = Api::all(client.clone());
    let mut n = Node::default();
    n.metadata.name = Some(node.clone());
    // NodeRestriction lets a node create its own Node object.
    let created = nodes.create(&PostParams::default(), &n).await.unwrap();
    Kubelet {
        client,
        node,
        node_uid: created.metadata.uid.unwrap(),
    }
}

/// A pod bound to `node` that mounts its SVID and the roots as the docs show.
pub(crate) async fn pod(kube: &KubeEnv, ns: &str, name: &str, sa: &str, node: &str) -> Pod {
    pod_for_signer(kube, ns, name, sa, node, DEFAULT_SIGNER_NAME).await
}

/// The same pod, but its `podCertificate` volume (and trust bundle) name `signer`.
async fn pod_for_signer(
    kube: &KubeEnv,
    ns: &str,
    name: &str,
    sa: &str,
    node: &str,
    signer: &str,
) -> Pod {
    let p: Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "nodeName": node,
            "serviceAccountName": sa,
            "containers": [{"name": "app", "image": "registry.k8s.io/pause:3.10",
                "volumeMounts": [{"name": "spiffe", "mountPath": "/var/run/spiffe", "readOnly": true}]}],
            "volumes": [{"name": "spiffe", "projected": {"sources": [
                {"podCertificate": {"signerName": signer, "keyType": "ECDSAP256",
                                    "credentialBundlePath": "svid.pem"}},
                {"clusterTrustBundle": {"signerName": signer,
                    "labelSelector": {"matchLabels": {"app.kubernetes.io/managed-by": "citadel"}},
                    "path": "roots.pem"}}
            ]}}]
        }
    }))
    .unwrap();
    Api::<Pod>::namespaced(kube.client.clone(), ns)
        .create(&PostParams::default(), &p)
        .await
        .unwrap()
}

pub(crate) async fn sa_uid(kube: &KubeEnv, ns: &str, sa: &str) -> String {
    Api::<ServiceAccount>::namespaced(kube.client.clone(), ns)
        .get(sa)
        .await
        .unwrap()
        .metadata
        .uid
        .unwrap()
}

/// The kubelet's stub PKCS#10 request: empty, signed with the subject key.
fn stub_csr(key: &rcgen::KeyPair) -> Vec<u8> {
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.serialize_request(key).unwrap().der().to_vec()
}

pub(crate) struct Req<'a> {
    pub(crate) name: &'a str,
    pub(crate) pod: &'a Pod,
    pub(crate) sa: &'a str,
    pub(crate) sa_uid: &'a str,
    pub(crate) node: &'a Kubelet,
    pub(crate) key: &'a rcgen::KeyPair,
    pub(crate) max_expiration: Option<i32>,
}

fn pcr_object(r: &Req<'_>) -> PodCertificateRequest {
    let mut spec = serde_json::json!({
        "signerName": DEFAULT_SIGNER_NAME,
        "podName": r.pod.metadata.name,
        "podUID": r.pod.metadata.uid,
        "serviceAccountName": r.sa,
        "serviceAccountUID": r.sa_uid,
        "nodeName": r.node.node,
        "nodeUID": r.node.node_uid,
        "stubPKCS10Request": base64_std(&stub_csr(r.key)),
    });
    if let Some(m) = r.max_expiration {
        spec["maxExpirationSeconds"] = m.into();
    }
    serde_json::from_value(serde_json::json!({
        "apiVersion": "certificates.k8s.io/v1", "kind": "PodCertificateRequest",
        "metadata": {"name": r.name, "namespace": r.pod.metadata.namespace},
        "spec": spec,
    }))
    .unwrap()
}

fn base64_std(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(b)
}

pub(crate) async fn create(
    client: &kube::Client,
    r: &Req<'_>,
) -> Result<PodCertificateRequest, kube::Error> {
    let ns = r.pod.metadata.namespace.as_deref().unwrap();
    Api::<PodCertificateRequest>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &pcr_object(r))
        .await
}

pub(crate) async fn decided(kube: &KubeEnv, ns: &str, name: &str) -> PodCertificateRequest {
    let api: Api<PodCertificateRequest> = Api::namespaced(kube.client.clone(), ns);
    let mut out = None;
    eventually(&format!("{ns}/{name} decided"), 30, async || {
        let p = api.get(name).await.unwrap();
        let done = is_decided(&p);
        out = Some(p);
        done
    })
    .await;
    out.unwrap()
}

/// (type, reason) of the one condition; panics if there is not exactly one.
pub(crate) fn condition(p: &PodCertificateRequest) -> (String, String) {
    let cs = p.status.as_ref().unwrap().conditions.as_ref().unwrap();
    assert_eq!(cs.len(), 1, "exactly one condition: {cs:?}");
    assert_eq!(cs[0].status, "True");
    (cs[0].type_.clone(), cs[0].reason.clone())
}

pub(crate) fn pem_blocks(pem: &str) -> Vec<String> {
    pem.split_inclusive("-----END CERTIFICATE-----")
        .map(|b| b.trim_start().to_string())
        .filter(|b| b.contains("BEGIN CERTIFICATE"))
        .map(|b| b + "\n")
        .collect()
}

async fn ctb(kube: &KubeEnv) -> Option<ClusterTrustBundle> {
    Api::<ClusterTrustBundle>::all(kube.client.clone())
        .get_opt(CTB)
        .await
        .unwrap()
}

pub(crate) async fn ctb_roots(kube: &KubeEnv) -> Option<String> {
    ctb(kube).await.map(|c| c.spec.trust_bundle)
}

fn secs(t: &k8s_openapi::apimachinery::pkg::apis::meta::v1::Time) -> i64 {
    t.0.as_second()
}

/// Checks an Issued request: status times equal the leaf's, beginRefreshAt within the API's
/// bounds near half-life, the lifetime, and the chain verified to the ClusterTrustBundle's
/// roots by webpki, openssl and go-spiffe. Returns the leaf's serial.
fn check_issued(
    p: &PodCertificateRequest,
    roots: &str,
    id: &citadel::identity::SpiffeId,
    lifetime: i64,
) -> String {
    assert_eq!(condition(p), ("Issued".into(), "Issued".into()));
    let st = p.status.as_ref().unwrap();
    let chain = st.certificate_chain.as_deref().unwrap();
    let mut elems = pem_blocks(chain);
    assert!(elems.len() >= 2, "leaf and intermediate: {chain}");
    elems.push(roots.to_string());
    // webpki (citadel's verifier), at the wall clock.
    let v = citadel::client::verify_response(&elems, Some(id), time::OffsetDateTime::now_utc())
        .unwrap_or_else(|e| panic!("webpki rejected the pod certificate: {e}"));
    let (nb, na) = (
        secs(st.not_before.as_ref().unwrap()),
        secs(st.not_after.as_ref().unwrap()),
    );
    assert_eq!(nb, v.leaf.not_before.unix_timestamp(), "notBefore = leaf's");
    assert_eq!(na, v.leaf.not_after.unix_timestamp(), "notAfter = leaf's");
    assert_eq!(na - nb, lifetime, "lifetime");
    let refresh = secs(st.begin_refresh_at.as_ref().unwrap());
    assert!(refresh >= nb + 600 && refresh <= na - 600, "API bounds");
    let half = nb + lifetime / 2;
    assert!(
        (refresh - half).abs() <= lifetime / 20 + 1,
        "about half-life: {refresh} vs {half}"
    );
    // openssl.
    let dir = tempfile::tempdir().unwrap();
    crate::thirdparty::write_chain(dir.path(), &elems);
    crate::thirdparty::openssl_verify(dir.path());
    // go-spiffe.
    if let Some(bin) = crate::thirdparty::gospiffe() {
        crate::thirdparty::gospiffe_accepts(&bin, chain, roots, &id.to_string());
    }
    v.leaf.serial_hex
}

async fn metric(r: &Replica, line: &str) -> bool {
    http_get(r.metrics, "/metrics")
        .await
        .map(|(_, m)| m.lines().any(|l| l == line))
        .unwrap_or(false)
}

#[tokio::test]
async fn pod_certificates_are_issued_or_denied_and_the_trust_bundle_follows_rotation() {
    let Some(kube) = KubeEnv::start().await else {
        return;
    };
    kube.namespace("citadel").await;
    for sa in ["cart", "other", "banned"] {
        kube.service_account("shop", sa).await;
    }
    let node = kubelet(&kube).await;
    let web = pod(&kube, "shop", "web", "cart", &node.node).await;
    let evil = pod(&kube, "shop", "evil", "banned", &node.node).await;
    let cart_uid = sa_uid(&kube, "shop", "cart").await;
    let other_uid = sa_uid(&kube, "shop", "other").await;
    let banned_uid = sa_uid(&kube, "shop", "banned").await;

    let ca = replica_in(&kube, "podcert-a", "citadel");
    eventually("replica ready and leading", 30, async || {
        ready(&ca).await && leads(&ca).await
    })
    .await;

    // The roots as a ClusterTrustBundle for our signer, the same bundle as the ConfigMaps.
    eventually("ClusterTrustBundle published", 15, async || {
        ctb(&kube).await.is_some() && kube.bundle("shop").await.is_some()
    })
    .await;
    let c = ctb(&kube).await.unwrap();
    assert_eq!(c.spec.signer_name.as_deref(), Some(DEFAULT_SIGNER_NAME));
    let roots = c.spec.trust_bundle;
    assert_eq!(Some(&roots), kube.bundle("shop").await.as_ref());
    assert_eq!(pem_blocks(&roots).len(), 1);

    let pcrs: Api<PodCertificateRequest> = Api::namespaced(kube.client.clone(), "shop");
    let cart = spiffe("shop", "cart");
    let p256 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let req = |name, key, max_expiration| Req {
        name,
        pod: &web,
        sa: "cart",
        sa_uid: &cart_uid,
        node: &node,
        key,
        max_expiration,
    };

    // Issued, as the kubelet asks: maxExpirationSeconds 3600 (below our 24h default) exactly.
    let t0 = Instant::now();
    create(&node.client, &req("web-1", &p256, Some(3600)))
        .await
        .unwrap();
    let issued = decided(&kube, "shop", "web-1").await;
    eprintln!("one request: creation to Issued in {:?}", t0.elapsed());
    check_issued(&issued, &roots, &cart, 3600);
    // The API's default (86400) and a P-384 key.
    let p384 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    create(&node.client, &req("web-2", &p384, None))
        .await
        .unwrap();
    check_issued(
        &decided(&kube, "shop", "web-2").await,
        &roots,
        &cart,
        86_400,
    );

    // Denied: a key type we do not sign (Ed25519), with a supported one suggested.
    let ed = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    create(&node.client, &req("web-ed25519", &ed, None))
        .await
        .unwrap();
    let d = decided(&kube, "shop", "web-ed25519").await;
    assert_eq!(
        condition(&d),
        ("Denied".into(), "UnsupportedKeyType".into())
    );
    let msg = &d.status.as_ref().unwrap().conditions.as_ref().unwrap()[0].message;
    assert!(msg.contains("P-256"), "{msg}");
    assert!(d.status.as_ref().unwrap().certificate_chain.is_none());

    // Pod UID mismatch: NodeRestriction refuses it from the kubelet at admission, so it can
    // only come from elsewhere; created as an admin, citadel's own check denies it.
    let mut stale = web.clone();
    stale.metadata.uid = Some("00000000-0000-0000-0000-000000000000".into());
    let bad_uid = Req {
        pod: &stale,
        ..req("web-stale", &p256, None)
    };
    let e = create(&node.client, &bad_uid).await.unwrap_err();
    eprintln!("NodeRestriction on a pod UID mismatch: {e}");
    create(&kube.client, &bad_uid).await.unwrap();
    let d = decided(&kube, "shop", "web-stale").await;
    assert_eq!(condition(&d), ("Denied".into(), "PodUIDMismatch".into()));

    // Service account mismatch: the same (the node may not; an admin can, and is denied).
    let bad_sa = Req {
        sa: "other",
        sa_uid: &other_uid,
        ..req("web-other-sa", &p256, None)
    };
    let e = create(&node.client, &bad_sa).await.unwrap_err();
    eprintln!("NodeRestriction on a service account mismatch: {e}");
    create(&kube.client, &bad_sa).await.unwrap();
    let d = decided(&kube, "shop", "web-other-sa").await;
    assert_eq!(
        condition(&d),
        ("Denied".into(), "ServiceAccountMismatch".into())
    );

    // The other denials, from requests only someone other than the kubelet could make (as
    // admin): an unknown user annotation, a pod that does not exist, a finished pod, a node
    // UID that is not the node's. (InvalidRequest, a malformed stub request or a maximum
    // under 1h, cannot be created at all: the API server's validation refuses it first.)
    let done = pod(&kube, "shop", "done", "cart", &node.node).await;
    Api::<Pod>::namespaced(kube.client.clone(), "shop")
        .patch_status(
            "done",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(serde_json::json!({"status": {"phase": "Succeeded"}})),
        )
        .await
        .unwrap();
    let mut ghost = web.clone();
    ghost.metadata.name = Some("ghost".into());
    let wrong_node = Kubelet {
        client: node.client.clone(),
        node: node.node.clone(),
        node_uid: "11111111-1111-1111-1111-111111111111".into(),
    };
    let mut annotated = pcr_object(&req("web-annotated", &p256, None));
    annotated.spec.unverified_user_annotations =
        Some([("example.com/flavour".to_string(), "strawberry".to_string())].into());
    let cases = [
        (annotated, "UnsupportedUserAnnotations"),
        (
            pcr_object(&Req {
                pod: &ghost,
                ..req("ghost-1", &p256, None)
            }),
            "PodNotFound",
        ),
        (
            pcr_object(&Req {
                pod: &done,
                ..req("done-1", &p256, None)
            }),
            "PodTerminated",
        ),
        (
            pcr_object(&Req {
                node: &wrong_node,
                ..req("web-wrong-node", &p256, None)
            }),
            "NodeMismatch",
        ),
    ];
    for (obj, _) in &cases {
        pcrs.create(&PostParams::default(), obj).await.unwrap();
    }
    for (obj, why) in &cases {
        let d = decided(&kube, "shop", obj.metadata.name.as_deref().unwrap()).await;
        assert_eq!(condition(&d), ("Denied".into(), why.to_string()));
    }

    // A denied identity (citadel revoke --identity, here through the library against the
    // journal Secret: `revoke` has no --store kube yet).
    let store = citadel::store::kube::KubeStore::new(kube.client.clone(), "citadel", None);
    citadel::ca::update::update_journal(&store, |j| {
        citadel::ca::revocation::deny_identity(
            j,
            "spiffe://cluster.local/ns/shop/sa/banned",
            &[],
            "unspecified",
            time::OffsetDateTime::now_utc(),
            Duration::from_secs(86_400),
        )
        .map_err(|e| e.to_string())
    })
    .await
    .unwrap();
    eventually("the denial installed", 15, async || {
        metric(&ca, "citadel_ca_revoked_identities 1").await
    })
    .await;
    create(
        &node.client,
        &Req {
            pod: &evil,
            sa: "banned",
            sa_uid: &banned_uid,
            ..req("evil-1", &p256, None)
        },
    )
    .await
    .unwrap();
    let d = decided(&kube, "shop", "evil-1").await;
    assert_eq!(condition(&d), ("Denied".into(), "IdentityDenied".into()));

    // Decided requests are never touched again.
    let rv = pcrs.get("web-1").await.unwrap().metadata.resource_version;
    assert_eq!(rv, issued.metadata.resource_version, "written once");

    // Drift: an edited ClusterTrustBundle is put back (with an Event), a deleted one comes back.
    let api: Api<ClusterTrustBundle> = Api::all(kube.client.clone());
    let mut edited = ctb(&kube).await.unwrap();
    edited.spec.trust_bundle = crate::thirdparty::foreign_bundle();
    api.replace(CTB, &PostParams::default(), &edited)
        .await
        .unwrap();
    eventually("edited ClusterTrustBundle repaired", 15, async || {
        ctb_roots(&kube).await.as_deref() == Some(roots.as_str())
    })
    .await;
    api.delete(CTB, &DeleteParams::default()).await.unwrap();
    eventually("deleted ClusterTrustBundle recreated", 15, async || {
        ctb_roots(&kube).await.as_deref() == Some(roots.as_str())
    })
    .await;

    // A root rotation: both roots while the new one propagates, then only the new one. The
    // operator's short --retire-after and --max-ttl make the stages take seconds.
    let out = std::process::Command::new(BIN)
        .args([
            "ca",
            "rotate-root",
            "--activate-after",
            "3s",
            "--retire-after",
            "3s",
            "--max-ttl",
            "1s",
            "--clock-skew-margin",
            "0s",
            "--store",
            "kube",
            "--namespace",
            "citadel",
        ])
        .arg("--kubeconfig")
        .arg(&kube.kubeconfig)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eventually("two roots in the ClusterTrustBundle", 15, async || {
        ctb_roots(&kube)
            .await
            .is_some_and(|b| pem_blocks(&b).len() == 2)
    })
    .await;
    let both = ctb_roots(&kube).await.unwrap();
    assert!(both.contains(roots.trim()), "the old root stays meanwhile");
    assert_eq!(
        kube.bundle("shop").await.as_ref(),
        Some(&both),
        "same as the ConfigMaps"
    );
    eventually(
        "only the new root in the ClusterTrustBundle",
        40,
        async || {
            ctb_roots(&kube)
                .await
                .is_some_and(|b| pem_blocks(&b).len() == 1 && b != roots)
        },
    )
    .await;
    let new_root = ctb_roots(&kube).await.unwrap();
    assert!(
        both.contains(new_root.trim()),
        "the new root is the one added before"
    );
    // Requests are signed by the new chain and verify to the new root alone.
    create(&node.client, &req("web-3", &p256, Some(3600)))
        .await
        .unwrap();
    check_issued(
        &decided(&kube, "shop", "web-3").await,
        &new_root,
        &cart,
        3600,
    );
    drop(ca);
}

/// First time each request was seen decided, and every distinct status seen per request.
#[derive(Default)]
struct Seen {
    decided_at: HashMap<String, Instant>,
    statuses: HashMap<String, HashSet<String>>,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn burst(
    node: &Kubelet,
    pods: &[Pod],
    cart_uid: &str,
    prefix: &str,
    n: usize,
) -> HashMap<String, Instant> {
    let keys: Vec<rcgen::KeyPair> = (0..n)
        .map(|_| rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap())
        .collect();
    let names: Vec<String> = (0..n).map(|i| format!("{prefix}-{i}")).collect();
    let (names, keys) = (&names, &keys);
    futures_util::stream::iter(0..n)
        .map(|i| {
            let r = Req {
                name: &names[i],
                pod: &pods[i % pods.len()],
                sa: "cart",
                sa_uid: cart_uid,
                node,
                key: &keys[i],
                max_expiration: Some(3600),
            };
            async move {
                create(&node.client, &r).await.unwrap();
                (names[i].clone(), Instant::now())
            }
        })
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect()
}

#[tokio::test]
async fn a_burst_of_500_is_decided_once_each_even_when_the_leader_dies() {
    let Some(kube) = KubeEnv::start().await else {
        return;
    };
    kube.namespace("citadel").await;
    kube.service_account("shop", "cart").await;
    let node = kubelet(&kube).await;
    let mut pods = Vec::new();
    for i in 0..10 {
        pods.push(pod(&kube, "shop", &format!("web-{i}"), "cart", &node.node).await);
    }
    let cart_uid = sa_uid(&kube, "shop", "cart").await;
    let (a, b) = (
        replica_in(&kube, "burst-a", "citadel"),
        replica_in(&kube, "burst-b", "citadel"),
    );
    eventually("both ready, one leads", 30, async || {
        ready(&a).await && ready(&b).await && (leads(&a).await || leads(&b).await)
    })
    .await;

    // What the API server says, as it happens: a watch of our signer's requests.
    let seen = Arc::new(Mutex::new(Seen::default()));
    let watch = tokio::spawn({
        let (seen, api) = (
            seen.clone(),
            Api::<PodCertificateRequest>::all(kube.client.clone()),
        );
        async move {
            let cfg = watcher::Config::default()
                .fields(&format!("spec.signerName={DEFAULT_SIGNER_NAME}"));
            let mut s = watcher(api, cfg).applied_objects().boxed();
            while let Ok(Some(p)) = s.try_next().await {
                if !is_decided(&p) {
                    continue;
                }
                let name = p.metadata.name.clone().unwrap();
                let st = serde_json::to_string(&p.status).unwrap();
                let mut g = seen.lock().unwrap();
                g.decided_at
                    .entry(name.clone())
                    .or_insert_with(Instant::now);
                g.statuses.entry(name).or_default().insert(st);
            }
        }
    });
    let decided_with = |prefix: &str| {
        seen.lock()
            .unwrap()
            .decided_at
            .keys()
            .filter(|k| k.starts_with(prefix))
            .count()
    };

    // Burst 1, measured: 500 at once, one leader.
    let start = Instant::now();
    let created = burst(&node, &pods, &cart_uid, "one", 500).await;
    eprintln!(
        "500 created (64 at a time, as node-a) in {:.2?}",
        start.elapsed()
    );
    eventually("500 decided", 120, async || decided_with("one-") == 500).await;
    let (mut lat, last) = {
        let g = seen.lock().unwrap();
        let lat: Vec<Duration> = created
            .iter()
            .map(|(n, c)| g.decided_at[n].saturating_duration_since(*c))
            .collect();
        let last = created.keys().map(|n| g.decided_at[n]).max().unwrap();
        (lat, last)
    };
    lat.sort();
    let span = last - start;
    eprintln!(
        "BENCH pod certificates: 500 requests decided in {:.2?} = {:.0} decided/s; creation->Issued p50 {:?} p99 {:?} max {:?}",
        span,
        500.0 / span.as_secs_f64(),
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        lat.last().unwrap()
    );

    // Burst 2: the leader is killed (-9) halfway; the follower finishes.
    let (mut leader, follower) = if leads(&a).await { (a, b) } else { (b, a) };
    let creating = tokio::spawn({
        let (client, node_name, node_uid, pods, cart_uid) = (
            node.client.clone(),
            node.node.clone(),
            node.node_uid.clone(),
            pods.clone(),
            cart_uid.clone(),
        );
        async move {
            let node = Kubelet {
                client,
                node: node_name,
                node_uid,
            };
            burst(&node, &pods, &cart_uid, "two", 500).await
        }
    });
    eventually("half of the second burst decided", 60, async || {
        decided_with("two-") >= 250
    })
    .await;
    let _ = leader.child.kill();
    let _ = leader.child.wait();
    let killed_at = decided_with("two-");
    creating.await.unwrap();
    eventually("the follower finishes the burst", 90, async || {
        decided_with("two-") == 500
    })
    .await;
    assert!(leads(&follower).await, "the follower took over");
    eprintln!("leader killed at {killed_at}/500 decided; the follower decided the rest");

    // Every request: one Issued condition, one status ever, for the pod's identity.
    let all = Api::<PodCertificateRequest>::namespaced(kube.client.clone(), "shop")
        .list(&Default::default())
        .await
        .unwrap()
        .items;
    assert_eq!(all.len(), 1000);
    let cart = spiffe("shop", "cart").to_string();
    let mut serials = HashSet::new();
    for p in &all {
        assert_eq!(condition(p).0, "Issued", "{:?}", p.metadata.name);
        let chain = p
            .status
            .as_ref()
            .unwrap()
            .certificate_chain
            .as_deref()
            .unwrap();
        let leaf = citadel::pki::pem::parse_certs(chain.as_bytes()).unwrap();
        let info = citadel::pki::chain::describe(&leaf[0]).unwrap();
        assert_eq!(info.uri_sans, vec![cart.clone()]);
        assert!(
            serials.insert(info.serial_hex),
            "a certificate in two requests"
        );
    }
    let g = seen.lock().unwrap();
    for (name, st) in &g.statuses {
        assert_eq!(st.len(), 1, "{name}: its decided status changed: {st:?}");
    }
    drop(g);
    // Every certificate in a status was audited (auth=pod-certificate, with the node).
    let logs = std::fs::read_to_string(kube.dir.join("burst-a.log")).unwrap()
        + &std::fs::read_to_string(kube.dir.join("burst-b.log")).unwrap();
    let audited: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("certificate_issued") && l.contains("pod-certificate"))
        .collect();
    assert!(
        audited.iter().all(|l| l.contains("node-a")),
        "the node is in each audit line"
    );
    let missing = serials
        .iter()
        .filter(|s| !audited.iter().any(|l| l.contains(s.as_str())))
        .count();
    assert_eq!(missing, 0, "certificates handed out without an audit line");
    eprintln!(
        "{} audit lines for 1000 requests (signed by the killed leader but never written: {})",
        audited.len(),
        audited.len() - 1000
    );
    watch.abort();
    drop(follower);
}

/// A client for the API server as someone else: the admin's kubeconfig with `user` (YAML
/// lines under `user:`) in place of the admin's credentials, or added to them.
async fn client_as(kube: &KubeEnv, file: &str, user: &str, keep_admin: bool) -> kube::Client {
    let admin = std::fs::read_to_string(&kube.kubeconfig).unwrap();
    let mut out = String::new();
    for l in admin.lines() {
        if l.trim_start().starts_with("token: ") {
            if keep_admin {
                out.push_str(l);
                out.push('\n');
            }
            for u in user.lines() {
                out.push_str("    ");
                out.push_str(u);
                out.push('\n');
            }
        } else {
            out.push_str(l);
            out.push('\n');
        }
    }
    let path = kube.dir.join(file);
    std::fs::write(&path, out).unwrap();
    citadel::cluster::client(Some(&path)).await.unwrap()
}

/// The API server's refusal of a create: (HTTP code, message).
fn refusal(r: Result<PodCertificateRequest, kube::Error>) -> (u16, String) {
    match r {
        Err(kube::Error::Api(s)) => (s.code, s.message.to_string()),
        other => panic!("expected a refusal by the API server, got {other:?}"),
    }
}

fn condition_message(p: &PodCertificateRequest) -> String {
    p.status.as_ref().unwrap().conditions.as_ref().unwrap()[0]
        .message
        .clone()
}

/// M1 (issue 20): a request's facts (pod, UIDs, node) are readable by whoever creates it, so
/// only the admission policy in deploy/ (the requester must be the pod's node) keeps a user
/// or ServiceAccount granted `create` on podcertificaterequests from getting a pod's SVID for
/// its own key; citadel on its own refuses what it can see (a pod that mounts no
/// `podCertificate` volume for its signer), from anyone.
#[tokio::test]
async fn only_the_pods_kubelet_gets_a_pod_certificate() {
    let Some(kube) = KubeEnv::start().await else {
        return;
    };
    if !require_tool("kubectl") {
        return;
    }
    kube.namespace("citadel").await;
    for sa in ["cart", "attacker"] {
        kube.service_account("shop", sa).await;
    }
    let node = kubelet(&kube).await;
    let web = pod(&kube, "shop", "web", "cart", &node.node).await;
    // Mounts a pod certificate, but from another signer.
    let plain = pod_for_signer(
        &kube,
        "shop",
        "plain",
        "cart",
        &node.node,
        "example.com/other",
    )
    .await;
    let cart_uid = sa_uid(&kube, "shop", "cart").await;

    // Requesters other than the kubelet, each granted `create` on podcertificaterequests in
    // shop by RBAC: a ServiceAccount, a user, and a user named like the node but outside
    // the system:nodes group (so neither the Node authorizer nor NodeRestriction apply to it).
    let roles: Api<Role> = Api::namespaced(kube.client.clone(), "shop");
    let bindings: Api<RoleBinding> = Api::namespaced(kube.client.clone(), "shop");
    let role = serde_json::from_value(serde_json::json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": {"name": "pcr-creator", "namespace": "shop"},
        "rules": [{"apiGroups": ["certificates.k8s.io"], "resources": ["podcertificaterequests"],
                   "verbs": ["create", "get"]}]
    }))
    .unwrap();
    roles.create(&PostParams::default(), &role).await.unwrap();
    let binding = serde_json::from_value(serde_json::json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": "pcr-creator", "namespace": "shop"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pcr-creator"},
        "subjects": [
            {"kind": "ServiceAccount", "name": "attacker", "namespace": "shop"},
            {"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "mallory"},
            {"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": format!("system:node:{}", node.node)},
        ]
    }))
    .unwrap();
    bindings
        .create(&PostParams::default(), &binding)
        .await
        .unwrap();
    let sa_token = kube
        .token(
            "shop",
            "attacker",
            "https://kubernetes.default.svc.cluster.local",
        )
        .await;
    let as_sa = client_as(&kube, "sa-kubeconfig", &format!("token: {sa_token}"), false).await;
    let as_user = client_as(&kube, "mallory-kubeconfig", "as: mallory", true).await;
    let as_fake_node = client_as(
        &kube,
        "fake-node-kubeconfig",
        &format!("as: system:node:{}\nas-groups: [spoofers]", node.node),
        true,
    )
    .await;
    let others = [
        ("sa", &as_sa),
        ("user", &as_user),
        ("fake-node", &as_fake_node),
        ("admin", &kube.client),
    ];

    let ca = replica_in(&kube, "m1-a", "citadel");
    eventually("replica ready and leading", 30, async || {
        ready(&ca).await && leads(&ca).await
    })
    .await;
    eventually("ClusterTrustBundle published", 15, async || {
        ctb(&kube).await.is_some()
    })
    .await;
    let roots = ctb_roots(&kube).await.unwrap();
    let cart = spiffe("shop", "cart");
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    // The same request (the pod's facts, one key) whoever sends it.
    let req = |name: &str, pod: &Pod| {
        pcr_object(&Req {
            name,
            pod,
            sa: "cart",
            sa_uid: &cart_uid,
            node: &node,
            key: &key,
            max_expiration: Some(3600),
        })
    };
    let create = async |client: &kube::Client, pcr: PodCertificateRequest| {
        Api::<PodCertificateRequest>::namespaced(client.clone(), "shop")
            .create(&PostParams::default(), &pcr)
            .await
    };

    // 1. citadel alone (no policy installed). A pod that mounts no podCertificate volume for
    // citadel's signer: its kubelet may not even ask (NodeRestriction), and a request from
    // anyone else is Denied by citadel, with the reason.
    let (code, msg) = refusal(create(&node.client, req("plain-kubelet", &plain)).await);
    eprintln!("NodeRestriction, pod without the volume: {code} {msg}");
    assert_eq!(code, 403, "{msg}");
    assert!(
        msg.contains("does not mount a podCertificate projected volume"),
        "{msg}"
    );
    for (who, client) in others {
        let name = format!("plain-{who}");
        create(client, req(&name, &plain)).await.unwrap();
        let d = decided(&kube, "shop", &name).await;
        assert_eq!(
            condition(&d),
            ("Denied".into(), "NoPodCertificateVolume".into()),
            "{who}"
        );
        let msg = condition_message(&d);
        assert!(
            msg.contains("shop/plain") && msg.contains(DEFAULT_SIGNER_NAME),
            "{msg}"
        );
        assert!(d.status.as_ref().unwrap().certificate_chain.is_none());
    }
    // What citadel cannot see: the same request for a pod that does mount the volume, from
    // the ServiceAccount, with its own key. Nothing in the object says who created it
    // (managedFields name a field manager the client picks, not the user), so without the
    // policy it is Issued: this is what deploy/podcertificate-policy.yaml is for.
    create(&as_sa, req("web-sa-without-policy", &web))
        .await
        .unwrap();
    let d = decided(&kube, "shop", "web-sa-without-policy").await;
    assert_eq!(condition(&d).0, "Issued", "citadel alone cannot tell");

    // 2. With the policy from deploy/, applied as an operator would.
    let out = std::process::Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(&kube.kubeconfig)
        .args(["apply", "-f", "deploy/podcertificate-policy.yaml"])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "kubectl apply failed:\n{text}");
    // The API server compiles and starts enforcing a new policy within moments: wait with
    // dry runs, which go through admission but store nothing.
    let dry = PostParams {
        dry_run: true,
        ..Default::default()
    };
    let sa_pcrs: Api<PodCertificateRequest> = Api::namespaced(as_sa.clone(), "shop");
    eventually("the policy enforced", 30, async || {
        sa_pcrs.create(&dry, &req("probe", &web)).await.is_err()
    })
    .await;

    // The pod's kubelet: admitted and Issued, verified to the ClusterTrustBundle's roots.
    create(&node.client, req("web-kubelet", &web))
        .await
        .unwrap();
    check_issued(
        &decided(&kube, "shop", "web-kubelet").await,
        &roots,
        &cart,
        3600,
    );
    // Everyone else, the cluster admin included: refused at admission, nothing stored.
    for (who, client) in others {
        let name = format!("web-{who}");
        let (code, msg) = refusal(create(client, req(&name, &web)).await);
        eprintln!("the policy, {who}: {code} {msg}");
        assert_eq!(code, 403, "{who}: {msg}");
        assert!(
            msg.contains("citadel-pod-certificate-requests")
                && msg.contains("only the kubelet of node node-a"),
            "{who}: {msg}"
        );
        assert!(
            Api::<PodCertificateRequest>::namespaced(kube.client.clone(), "shop")
                .get_opt(&name)
                .await
                .unwrap()
                .is_none(),
            "{who}: refused requests are not stored"
        );
    }
    // Requests for other signers are not the policy's business.
    let mut other = req("other-signer", &web);
    other.spec.signer_name = "example.com/other".into();
    sa_pcrs.create(&dry, &other).await.unwrap();
    // The kubelet still cannot ask for a pod without the volume (NodeRestriction).
    let (code, _) = refusal(create(&node.client, req("plain-kubelet-2", &plain)).await);
    assert_eq!(code, 403);
    assert!(ready(&ca).await, "the signer keeps serving");
    drop(ca);
}

async fn metric_value(r: &Replica, name: &str) -> Option<f64> {
    let (_, m) = http_get(r.metrics, "/metrics").await.ok()?;
    m.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// Low (issue 20): what the leader keeps in memory per request is bounded. 300 requests wait
/// undecided before any signer runs; the leader, allowed 25 in memory, holds at most 25 at a
/// time (the rest are listed again as those are decided), keeps none once decided, and still
/// issues all 300, once each.
#[tokio::test]
async fn many_requests_never_hold_more_than_max_pending_in_memory() {
    let Some(kube) = KubeEnv::start().await else {
        return;
    };
    kube.namespace("citadel").await;
    kube.service_account("shop", "cart").await;
    let node = kubelet(&kube).await;
    let mut pods = Vec::new();
    for i in 0..5 {
        pods.push(pod(&kube, "shop", &format!("web-{i}"), "cart", &node.node).await);
    }
    let cart_uid = sa_uid(&kube, "shop", "cart").await;
    burst(&node, &pods, &cart_uid, "many", 300).await;

    let ca = replica_with(
        &kube,
        "bound-a",
        "citadel",
        &["--pod-cert-max-pending", "25"],
    );
    eventually("replica ready and leading", 30, async || {
        ready(&ca).await && leads(&ca).await
    })
    .await;
    let pcrs: Api<PodCertificateRequest> = Api::namespaced(kube.client.clone(), "shop");
    let t0 = Instant::now();
    let mut peak_seen = 0.0f64;
    eventually("all 300 decided", 120, async || {
        if let Some(v) = metric_value(&ca, "citadel_pod_cert_pending_requests").await {
            peak_seen = peak_seen.max(v);
        }
        let all = pcrs.list(&Default::default()).await.unwrap().items;
        all.iter().filter(|p| is_decided(p)).count() == 300
    })
    .await;
    eprintln!(
        "300 requests decided in {:?} with at most 25 in memory (largest sample {peak_seen})",
        t0.elapsed()
    );
    let all = pcrs.list(&Default::default()).await.unwrap().items;
    let mut serials = HashSet::new();
    for p in &all {
        assert_eq!(condition(p).0, "Issued", "{:?}", p.metadata.name);
        let chain = p
            .status
            .as_ref()
            .unwrap()
            .certificate_chain
            .as_deref()
            .unwrap();
        let leaf = citadel::pki::pem::parse_certs(chain.as_bytes()).unwrap();
        let info = citadel::pki::chain::describe(&leaf[0]).unwrap();
        assert!(
            serials.insert(info.serial_hex),
            "a certificate in two requests"
        );
    }
    assert_eq!(
        metric_value(&ca, "citadel_pod_cert_pending_limit").await,
        Some(25.0)
    );
    let peak = metric_value(&ca, "citadel_pod_cert_pending_requests_peak")
        .await
        .unwrap();
    assert!(
        peak <= 25.0 && peak_seen <= 25.0,
        "peak {peak}, sampled {peak_seen}"
    );
    assert_eq!(peak, 25.0, "the cache was full while 300 waited");
    assert!(
        metric_value(&ca, "citadel_pod_cert_requests_deferred_total")
            .await
            .unwrap()
            >= 275.0,
        "the ones that did not fit were counted"
    );
    eventually("decided requests leave memory", 15, async || {
        metric_value(&ca, "citadel_pod_cert_pending_requests").await == Some(0.0)
    })
    .await;
    assert!(
        metric_value(&ca, "citadel_pod_cert_relists_total")
            .await
            .unwrap()
            >= 1.0
    );
    drop(ca);
}
