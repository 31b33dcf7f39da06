//! The `clusterid` header (pilot-agent sends ISTIO_META_CLUSTER_ID): absent or this
//! cluster's `--cluster-id` means the local cluster; a remote cluster known from a Secret
//! labelled `istio/multiCluster: "true"` (`--multicluster`) has its tokens checked by its own
//! API server only; any other cluster is refused for token authentication, naming the
//! cluster. Client certificates ignore it, as in istiod.

use std::collections::BTreeMap;

use citadel::pki::KeyType;
use citadel::proto::IstioCertificateRequest;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;
use kube::api::{Api, DeleteParams, PostParams};
use tonic::Code;

use crate::support::wait::wait_events;
use crate::support::*;

async fn call_from(
    client: &mut citadel::client::CaClient,
    csr: &str,
    token: Option<&str>,
    cluster_ids: &[&str],
) -> Result<Vec<String>, tonic::Status> {
    call_for(client, csr, token, cluster_ids, None).await
}

/// `call_from`, naming `impersonated` in the ImpersonatedIdentity metadata (as ztunnel).
async fn call_for(
    client: &mut citadel::client::CaClient,
    csr: &str,
    token: Option<&str>,
    cluster_ids: &[&str],
    impersonated: Option<&str>,
) -> Result<Vec<String>, tonic::Status> {
    let metadata = impersonated.map(|id| {
        let mut s = prost_types::Struct::default();
        s.fields.insert(
            "ImpersonatedIdentity".into(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::StringValue(id.into())),
            },
        );
        s
    });
    let mut req = tonic::Request::new(IstioCertificateRequest {
        csr: csr.to_string(),
        validity_duration: 0,
        metadata,
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

fn base64_std(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The value of one series on /metrics (`None` when absent).
async fn metric(ca: &TestCa, series: &str) -> Option<u64> {
    ca.metrics()
        .await
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// A remote-cluster Secret in `ns`, as `istioctl create-remote-secret` writes it: labelled
/// `istio/multiCluster: "true"`, one key per cluster id, each value a kubeconfig.
async fn remote_secret(kube: &KubeEnv, ns: &str, name: &str, entries: &[(&str, Vec<u8>)]) {
    let mut s = Secret::default();
    s.metadata.name = Some(name.into());
    s.metadata.labels = Some(BTreeMap::from([(
        "istio/multiCluster".to_string(),
        "true".to_string(),
    )]));
    s.data = Some(
        entries
            .iter()
            .map(|(k, v)| (k.to_string(), ByteString(v.clone())))
            .collect(),
    );
    Api::<Secret>::namespaced(kube.client.clone(), ns)
        .create(&PostParams::default(), &s)
        .await
        .unwrap();
}

/// Two real API servers: A is citadel's own cluster, B a remote one known from a Secret in
/// A. B's tokens are accepted only when the request names B; removing the Secret revokes B;
/// a broken or unsafe kubeconfig next to it is reported and harms nobody.
#[tokio::test]
async fn multicluster_remote_cluster_from_secret_two_api_servers() {
    let Some(a) = KubeEnv::start().await else {
        return;
    };
    let Some(b) = KubeEnv::start().await else {
        return;
    };
    let (ka, kb) = (
        std::fs::read(&a.kubeconfig).unwrap(),
        std::fs::read(&b.kubeconfig).unwrap(),
    );
    assert_ne!(ka, kb, "the two API servers must be distinct");
    for k in [&a, &b] {
        k.service_account("shop", "cart").await;
    }
    a.namespace("istio-system").await;
    remote_secret(
        &a,
        "istio-system",
        "istio-remote-secret-b",
        &[("cluster-b", kb.clone())],
    )
    .await;
    // Broken: not a kubeconfig; unsafe: runs a command; and one claiming the local id.
    let exec = String::from_utf8(kb.clone()).unwrap().replace(
        "    token: ",
        "    exec:\n      apiVersion: client.authentication.k8s.io/v1\n      command: /bin/false\n    token: ",
    );
    assert_ne!(exec.as_bytes(), &kb[..]);
    remote_secret(
        &a,
        "istio-system",
        "istio-remote-secret-bad",
        &[
            ("cluster-x", b"clusters: [not: {a kubeconfig".to_vec()),
            ("cluster-y", exec.into_bytes()),
            ("cluster-a", kb.clone()),
        ],
    )
    .await;

    let kubeconfig = a.kubeconfig.to_str().unwrap().to_string();
    let ca = TestCa::start(&[
        "--kubeconfig",
        &kubeconfig,
        "--auth",
        "tokenreview",
        "--cluster-id",
        "cluster-a",
        "--multicluster",
    ])
    .await;
    eventually("cluster-b is known and reachable", 30, async || {
        metric(&ca, "citadel_remote_clusters{state=\"reachable\"}").await == Some(1)
    })
    .await;
    assert_eq!(
        metric(&ca, "citadel_remote_clusters{state=\"known\"}").await,
        Some(1)
    );
    // cluster-x and cluster-y are reported; cluster-a (the local id) is ignored, not an error.
    assert_eq!(
        metric(&ca, "citadel_remote_cluster_kubeconfig_errors").await,
        Some(2)
    );
    assert_eq!(
        metric(&ca, "citadel_remote_cluster_kubeconfigs_invalid").await,
        Some(2)
    );
    // And on the Secret, for `kubectl describe`: one Warning per refused key, never quoting
    // the kubeconfig.
    let notes = warnings(
        &a,
        "istio-system",
        "istio-remote-secret-bad",
        "InvalidKubeconfig",
        |evs| evs.len() == 2,
    )
    .await;
    let token_b = std::fs::read_to_string(b.dir.join("pki/admin.token")).unwrap();
    for n in &notes {
        assert!(!n.contains(token_b.trim()), "{n}");
    }
    assert!(
        notes.iter().any(|n| n.contains("\"cluster-x\"")),
        "{notes:?}"
    );
    assert!(
        notes
            .iter()
            .any(|n| n.contains("\"cluster-y\"") && n.contains("exec")),
        "{notes:?}"
    );

    let mut client = ca.client().await;
    let (_, csr) = csr_for(KeyType::EcP256, &spiffe("shop", "cart"));
    let tb = b.token("shop", "cart", "istio-ca").await;
    let ta = a.token("shop", "cart", "istio-ca").await;
    let local_ok = async |client: &mut citadel::client::CaClient| {
        call_from(client, &csr, Some(&ta), &[]).await.unwrap();
        call_from(client, &csr, Some(&ta), &["cluster-a"])
            .await
            .unwrap();
    };

    // B's token, naming B: B's API server vouches for it.
    let chain = call_from(&mut client, &csr, Some(&tb), &["cluster-b"])
        .await
        .unwrap();
    assert!(!chain.is_empty());
    local_ok(&mut client).await;

    // B's token without the header, or naming A: A's TokenReview refuses it.
    for ids in [&[][..], &["cluster-a"][..]] {
        let err = call_from(&mut client, &csr, Some(&tb), ids)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{ids:?}: {err:?}");
        assert!(!err.message().contains(&tb));
        local_ok(&mut client).await;
    }
    // A's token naming B: B's TokenReview refuses it.
    let err = call_from(&mut client, &csr, Some(&ta), &["cluster-b"])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    local_ok(&mut client).await;
    // The broken and unsafe kubeconfigs gave no cluster: unknown, named.
    for unknown in ["cluster-x", "cluster-y", "cluster-c"] {
        let err = call_from(&mut client, &csr, Some(&tb), &[unknown])
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{unknown}: {err:?}");
        assert!(
            err.message().contains(&format!("{unknown:?}")),
            "{unknown}: {err:?}"
        );
        local_ok(&mut client).await;
    }

    // An update is followed too: B's key broken, then mended.
    let secrets: Api<Secret> = Api::namespaced(a.client.clone(), "istio-system");
    let set_b = async |value: &[u8]| {
        let patch = serde_json::json!({"data": {"cluster-b": base64_std(value)}});
        secrets
            .patch(
                "istio-remote-secret-b",
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(&patch),
            )
            .await
            .unwrap();
    };
    set_b(b"not: [a kubeconfig").await;
    eventually("cluster-b is dropped after its key broke", 10, async || {
        metric(&ca, "citadel_remote_clusters{state=\"known\"}").await == Some(0)
    })
    .await;
    let err = call_from(&mut client, &csr, Some(&tb), &["cluster-b"])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert_eq!(
        metric(&ca, "citadel_remote_cluster_kubeconfigs_invalid").await,
        Some(3)
    );
    local_ok(&mut client).await;
    set_b(&kb).await;
    // Waiting on the metric, not on refusals: each refusal counts against this peer's
    // authentication-failure budget.
    eventually(
        "cluster-b is back after its key was mended",
        10,
        async || metric(&ca, "citadel_remote_clusters{state=\"known\"}").await == Some(1),
    )
    .await;
    call_from(&mut client, &csr, Some(&tb), &["cluster-b"])
        .await
        .unwrap();

    // Removing B's Secret revokes B within seconds (its cached review goes with it).
    Api::<Secret>::namespaced(a.client.clone(), "istio-system")
        .delete("istio-remote-secret-b", &DeleteParams::default())
        .await
        .unwrap();
    let t0 = std::time::Instant::now();
    let mut last = None;
    eventually("cluster-b is revoked", 10, async || {
        match call_from(&mut client, &csr, Some(&tb), &["cluster-b"]).await {
            Ok(_) => false,
            Err(e) => {
                last = Some(e);
                true
            }
        }
    })
    .await;
    eprintln!(
        "cluster-b revoked {:?} after its Secret was deleted",
        t0.elapsed()
    );
    let err = last.unwrap();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains("\"cluster-b\""), "{err:?}");
    assert_eq!(
        metric(&ca, "citadel_remote_clusters{state=\"known\"}").await,
        Some(0)
    );
    local_ok(&mut client).await;
    ca.stop().await;
}

/// Ambient across clusters: a ztunnel of remote cluster B impersonates only workloads with a
/// pod on its node in B (B's own pod index), never on the strength of A's pods.
#[tokio::test]
async fn multicluster_remote_ztunnel_is_judged_by_its_own_clusters_pods() {
    let Some(a) = KubeEnv::start().await else {
        return;
    };
    let Some(b) = KubeEnv::start().await else {
        return;
    };
    for k in [&a, &b] {
        k.namespace("istio-system").await;
        k.service_account("istio-system", "ztunnel").await;
        k.service_account("shop", "cart").await;
        k.service_account("shop", "pay").await;
        k.node("n1").await;
    }
    let zt_uid = b
        .pod_on("istio-system", "ztunnel-n1", "ztunnel", Some("n1"))
        .await;
    b.pod_on("shop", "cart-1", "cart", Some("n1")).await;
    // pay has a pod on a node called n1 only in A: it must not count for B's ztunnel.
    a.pod_on("shop", "pay-1", "pay", Some("n1")).await;
    let kb = std::fs::read(&b.kubeconfig).unwrap();
    remote_secret(
        &a,
        "istio-system",
        "istio-remote-secret-b",
        &[("cluster-b", kb)],
    )
    .await;

    let kubeconfig = a.kubeconfig.to_str().unwrap().to_string();
    let ca = TestCa::start(&[
        "--kubeconfig",
        &kubeconfig,
        "--auth",
        "tokenreview",
        "--cluster-id",
        "cluster-a",
        "--multicluster",
        "--trusted-node-accounts",
        "istio-system/ztunnel",
    ])
    .await;
    let mut client = ca.client().await;
    let zt = b
        .pod_token("istio-system", "ztunnel", "ztunnel-n1", &zt_uid)
        .await;
    let cart = spiffe("shop", "cart").to_string();
    let pay = spiffe("shop", "pay").to_string();
    let (_, cart_csr) = csr_for(KeyType::EcP256, &spiffe("shop", "cart"));
    let (_, pay_csr) = csr_for(KeyType::EcP256, &spiffe("shop", "pay"));

    // Granted once B is loaded and its pod index synced (Unavailable until then).
    eventually("B's ztunnel gets cart's certificate", 30, async || {
        call_for(
            &mut client,
            &cart_csr,
            Some(&zt),
            &["cluster-b"],
            Some(&cart),
        )
        .await
        .is_ok()
    })
    .await;
    // pay runs on n1 in A only: refused, with the one vague message.
    let err = call_for(&mut client, &pay_csr, Some(&zt), &["cluster-b"], Some(&pay))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert_eq!(err.message(), citadel::server::istio::IMPERSONATION_REFUSED);
    // B's ztunnel token without the header: A's TokenReview refuses it.
    let err = call_for(&mut client, &cart_csr, Some(&zt), &[], Some(&cart))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert_eq!(
        metric(
            &ca,
            "citadel_impersonation_refusals{reason=\"not_on_node\"}"
        )
        .await,
        Some(1)
    );

    // B's Secret removed: B's ztunnel is refused (Unauthenticated, naming the cluster).
    Api::<Secret>::namespaced(a.client.clone(), "istio-system")
        .delete("istio-remote-secret-b", &DeleteParams::default())
        .await
        .unwrap();
    let mut last = None;
    eventually("cluster-b is revoked", 10, async || {
        match call_for(
            &mut client,
            &cart_csr,
            Some(&zt),
            &["cluster-b"],
            Some(&cart),
        )
        .await
        {
            Ok(_) => false,
            Err(e) => {
                last = Some(e);
                true
            }
        }
    })
    .await;
    let err = last.unwrap();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains("\"cluster-b\""), "{err:?}");
    ca.stop().await;
}

#[tokio::test]
async fn multicluster_needs_tokenreview() {
    let dir = tempfile::tempdir().unwrap();
    let err = TestCa::try_start_in(dir.path(), &["--multicluster"])
        .await
        .err()
        .expect("refused");
    assert!(
        err.contains("--multicluster needs --auth tokenreview"),
        "{err}"
    );
}

/// Waits until `done` holds for the Events `reason` about `name` in `ns` (wait::wait_events:
/// a timeout lists what the namespace had), checks they are all Warnings, and returns their
/// notes.
async fn warnings(
    kube: &KubeEnv,
    ns: &str,
    name: &str,
    reason: &str,
    done: impl FnMut(&[k8s_openapi::api::events::v1::Event]) -> bool,
) -> Vec<String> {
    let evs = wait_events(&kube.client, ns, name, reason, 20, done).await;
    for e in &evs {
        assert_eq!(e.type_.as_deref(), Some("Warning"), "{e:?}");
    }
    evs.into_iter().filter_map(|e| e.note).collect()
}

/// Whether one of `evs` has a note `ok` accepts.
fn any_note(evs: &[k8s_openapi::api::events::v1::Event], ok: impl Fn(&str) -> bool) -> bool {
    evs.iter().any(|e| e.note.as_deref().is_some_and(&ok))
}

/// Issue 20 (Low, multicluster), against two real API servers. A kubeconfig that turns off
/// server verification is refused (its "API server" would choose the identities citadel
/// certifies). Two Secrets claiming one cluster id are an error naming both: at start neither
/// is used; a second claim on a working id, sorting first by name and pointing at another API
/// server, neither takes the id over nor knocks it out, and leaving ends the conflict.
#[tokio::test]
async fn multicluster_refuses_unverified_kubeconfigs_and_ambiguous_cluster_ids() {
    let Some(a) = KubeEnv::start().await else {
        return;
    };
    let Some(b) = KubeEnv::start().await else {
        return;
    };
    let (ka, kb) = (
        std::fs::read(&a.kubeconfig).unwrap(),
        std::fs::read(&b.kubeconfig).unwrap(),
    );
    for k in [&a, &b] {
        k.service_account("shop", "cart").await;
    }
    a.namespace("istio-system").await;
    let ns = "istio-system";
    remote_secret(
        &a,
        ns,
        "istio-remote-secret-b",
        &[("cluster-b", kb.clone())],
    )
    .await;
    // B's kubeconfig with its CA swapped for "don't verify": the server is still B, so only
    // the refusal keeps its tokens out.
    let text = String::from_utf8(kb.clone()).unwrap();
    let ca_line = text
        .lines()
        .find(|l| l.contains("certificate-authority-data:"))
        .unwrap();
    let insecure = text.replace(ca_line, "    insecure-skip-tls-verify: true");
    assert_ne!(insecure, text);
    remote_secret(
        &a,
        ns,
        "istio-remote-secret-i",
        &[("cluster-i", insecure.into_bytes())],
    )
    .await;
    // Two Secrets claiming cluster-c, both working kubeconfigs of B.
    remote_secret(
        &a,
        ns,
        "istio-remote-secret-c1",
        &[("cluster-c", kb.clone())],
    )
    .await;
    remote_secret(
        &a,
        ns,
        "istio-remote-secret-c2",
        &[("cluster-c", kb.clone())],
    )
    .await;

    let kubeconfig = a.kubeconfig.to_str().unwrap().to_string();
    let ca = TestCa::start(&[
        "--kubeconfig",
        &kubeconfig,
        "--auth",
        "tokenreview",
        "--cluster-id",
        "cluster-a",
        "--multicluster",
        "--auth-failure-burst",
        "1000",
    ])
    .await;
    eventually("cluster-b known", 30, async || {
        metric(&ca, "citadel_remote_clusters{state=\"known\"}").await == Some(1)
    })
    .await;
    assert_eq!(
        metric(&ca, "citadel_remote_cluster_id_conflicts").await,
        Some(1)
    );
    assert_eq!(
        metric(&ca, "citadel_remote_cluster_kubeconfigs_invalid").await,
        Some(1)
    );

    let mut client = ca.client().await;
    let (_, csr) = csr_for(KeyType::EcP256, &spiffe("shop", "cart"));
    let (ta, tb) = (
        a.token("shop", "cart", "istio-ca").await,
        b.token("shop", "cart", "istio-ca").await,
    );
    call_from(&mut client, &csr, Some(&tb), &["cluster-b"])
        .await
        .unwrap();
    for refused in ["cluster-i", "cluster-c"] {
        let err = call_from(&mut client, &csr, Some(&tb), &[refused])
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{refused}: {err:?}");
        assert!(err.message().contains(&format!("{refused:?}")), "{err:?}");
        call_from(&mut client, &csr, Some(&ta), &[]).await.unwrap();
    }

    // Said on the Secrets: the insecure one names the setting, the rivals name each other.
    warnings(
        &a,
        ns,
        "istio-remote-secret-i",
        "InvalidKubeconfig",
        |evs| {
            any_note(evs, |n| {
                n.contains("insecure-skip-tls-verify") && n.contains("\"cluster-i\"")
            })
        },
    )
    .await;
    for s in ["istio-remote-secret-c1", "istio-remote-secret-c2"] {
        warnings(&a, ns, s, "DuplicateClusterId", |evs| {
            any_note(evs, |n| {
                n.contains("\"cluster-c\"")
                    && n.contains("istio-system/istio-remote-secret-c1")
                    && n.contains("istio-system/istio-remote-secret-c2")
                    && n.contains("none of them is used")
            })
        })
        .await;
    }

    // A second claim on working cluster-b, sorting first and pointing at A's API server:
    // cluster-b stays B (B's token accepted, A's refused), and the conflict is reported.
    remote_secret(&a, ns, "aaa-remote-secret-b", &[("cluster-b", ka.clone())]).await;
    eventually("the new conflict is counted", 20, async || {
        metric(&ca, "citadel_remote_cluster_id_conflicts").await == Some(2)
    })
    .await;
    warnings(&a, ns, "aaa-remote-secret-b", "DuplicateClusterId", |evs| {
        any_note(evs, |n| {
            n.contains("istio-system/aaa-remote-secret-b")
                && n.contains("istio-system/istio-remote-secret-b, which was already in use")
        })
    })
    .await;
    call_from(&mut client, &csr, Some(&tb), &["cluster-b"])
        .await
        .unwrap();
    let err = call_from(&mut client, &csr, Some(&ta), &["cluster-b"])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");

    // The newcomer leaves: one claim again; and with c2 gone, c1 alone gives cluster-c.
    let secrets: Api<Secret> = Api::namespaced(a.client.clone(), ns);
    for s in ["aaa-remote-secret-b", "istio-remote-secret-c2"] {
        secrets.delete(s, &DeleteParams::default()).await.unwrap();
    }
    eventually(
        "no conflict, cluster-b and cluster-c known",
        20,
        async || {
            metric(&ca, "citadel_remote_cluster_id_conflicts").await == Some(0)
                && metric(&ca, "citadel_remote_clusters{state=\"known\"}").await == Some(2)
        },
    )
    .await;
    call_from(&mut client, &csr, Some(&tb), &["cluster-c"])
        .await
        .unwrap();
    call_from(&mut client, &csr, Some(&tb), &["cluster-b"])
        .await
        .unwrap();
    ca.stop().await;
}

/// Issue 20 (Low): a ClusterTrustBundle that another writer published under citadel's signer
/// name (kubelet would merge its roots into what pods trust) is reported (warning log,
/// `citadel_foreign_trust_bundles`, a Warning Event on it) and never merged into citadel's
/// own trust: not in its ClusterTrustBundle, its bundle ConfigMaps or its chains.
#[tokio::test]
async fn a_foreign_cluster_trust_bundle_claiming_our_signer_is_reported_never_trusted() {
    use k8s_openapi::api::certificates::v1::ClusterTrustBundle;
    let Some(kube) = KubeEnv::start().await else {
        return;
    };
    kube.namespace("citadel").await;
    kube.namespace("shop").await;
    // The foreign object first (before citadel starts), then one more while it runs.
    let foreign_root = |cn: &str| {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::default();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        p.self_signed(&key).unwrap().pem()
    };
    let ctbs: Api<ClusterTrustBundle> = Api::all(kube.client.clone());
    let create = async |name: &str, pem: &str| {
        let c: ClusterTrustBundle = serde_json::from_value(serde_json::json!({
            "apiVersion": "certificates.k8s.io/v1", "kind": "ClusterTrustBundle",
            "metadata": {"name": name},
            "spec": {"signerName": "citadel.dev/spiffe", "trustBundle": pem}
        }))
        .unwrap();
        ctbs.create(&PostParams::default(), &c).await.unwrap();
    };
    let evil = foreign_root("evil root");
    create("citadel.dev:spiffe:extra", &evil).await;

    let r = crate::kube::replica_in(&kube, "replica-a", "citadel");
    let metric_is = async |series: &str| {
        http_get(r.metrics, "/metrics")
            .await
            .map(|(_, m)| m.contains(series))
            .unwrap_or(false)
    };
    eventually("leading, the foreign bundle counted", 60, async || {
        crate::kube::leads(&r).await && metric_is("citadel_foreign_trust_bundles 1\n").await
    })
    .await;
    warnings(
        &kube,
        "default",
        "citadel.dev:spiffe:extra",
        "ForeignTrustBundle",
        |evs| {
            any_note(evs, |n| {
                n.contains("citadel.dev/spiffe") && n.contains("citadel.dev:spiffe:roots")
            })
        },
    )
    .await;
    let second = foreign_root("second evil root");
    create("citadel.dev:spiffe:more", &second).await;
    eventually("the second is counted", 20, async || {
        metric_is("citadel_foreign_trust_bundles 2\n").await
    })
    .await;
    warnings(
        &kube,
        "default",
        "citadel.dev:spiffe:more",
        "ForeignTrustBundle",
        |evs| !evs.is_empty(),
    )
    .await;

    // citadel's own trust holds neither.
    let own = ctbs.get("citadel.dev:spiffe:roots").await.unwrap();
    let bundle = kube.bundle("shop").await.expect("bundle in shop");
    for pem in [&evil, &second] {
        let body = pem.lines().nth(1).unwrap();
        assert!(!own.spec.trust_bundle.contains(body));
        assert!(!bundle.contains(body));
    }
    assert_eq!(
        own.spec.trust_bundle.matches("BEGIN CERTIFICATE").count(),
        1
    );
    assert_eq!(bundle.matches("BEGIN CERTIFICATE").count(), 1);
    // The foreign objects are the operator's to delete; citadel left them in place.
    ctbs.get("citadel.dev:spiffe:extra").await.unwrap();
    for name in ["citadel.dev:spiffe:extra", "citadel.dev:spiffe:more"] {
        ctbs.delete(name, &DeleteParams::default()).await.unwrap();
    }
    eventually("none counted once deleted", 20, async || {
        metric_is("citadel_foreign_trust_bundles 0\n").await
    })
    .await;
}
