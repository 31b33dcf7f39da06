//! The RBAC in deploy/ is least privilege (issue 20, M6), checked against a REAL kube-apiserver
//! with RBAC authorization: the manifests are applied with kubectl, SubjectAccessReviews ask
//! what `system:serviceaccount:istio-system:citadel` may do, and then the real binary runs under
//! a token of exactly that service account and does everything it does in production (TokenReview,
//! the Kubernetes store, publishing into a new namespace, drift repair with an Event, a root
//! rotation through the CertificateAuthority resource, a Revocation, a PodCertificateRequest)
//! without one Forbidden in its log.

use std::process::Command;

use citadel::pki::KeyType;
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, Patch, PatchParams, PostParams};
use tonic::Code;

use crate::support::wait::{condition, wait_condition, wait_event};
use crate::support::*;

const USER: &str = "system:serviceaccount:istio-system:citadel";

/// `kubectl apply -f` each file as the admin; panics with kubectl's output on failure.
pub(crate) fn apply(kube: &KubeEnv, files: &[&str]) -> String {
    let mut cmd = Command::new("kubectl");
    cmd.arg("--kubeconfig").arg(&kube.kubeconfig).arg("apply");
    for f in files {
        cmd.args(["-f", f]);
    }
    let out = cmd.output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "kubectl apply failed:\n{text}");
    text
}

/// One request citadel's service account might make: `verb group/resource[/sub] ns/name`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Req {
    verb: &'static str,
    group: &'static str,
    resource: &'static str,
    namespace: &'static str,
    name: &'static str,
}

pub(crate) const fn req(
    verb: &'static str,
    group: &'static str,
    resource: &'static str,
    namespace: &'static str,
    name: &'static str,
) -> Req {
    Req {
        verb,
        group,
        resource,
        namespace,
        name,
    }
}

/// Whether the API server's authorizer allows `r` to citadel's service account, asked with a
/// SubjectAccessReview (as the admin) for the user and the groups its token carries. A list or
/// watch with a `metadata.name` field selector is authorized as one with that name, which is
/// what a SubjectAccessReview with `name` asks.
pub(crate) async fn allowed(kube: &KubeEnv, r: Req) -> bool {
    let (resource, subresource) = match r.resource.split_once('/') {
        Some((res, sub)) => (res, Some(sub.to_string())),
        None => (r.resource, None),
    };
    let some = |s: &str| (!s.is_empty()).then(|| s.to_string());
    let sar = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(USER.into()),
            groups: Some(vec![
                "system:serviceaccounts".into(),
                "system:serviceaccounts:istio-system".into(),
                "system:authenticated".into(),
            ]),
            resource_attributes: Some(ResourceAttributes {
                verb: Some(r.verb.into()),
                group: Some(r.group.into()),
                resource: Some(resource.into()),
                subresource,
                namespace: some(r.namespace),
                name: some(r.name),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let out = Api::<SubjectAccessReview>::all(kube.client.clone())
        .create(&PostParams::default(), &sar)
        .await
        .unwrap();
    out.status.is_some_and(|s| s.allowed)
}

/// What citadel must never be able to do with the manifests in deploy/ (without the
/// optional multicluster.yaml).
const MUST_NOT: &[Req] = &[
    // Other namespaces' Secrets: the cluster's keys and tokens.
    req(
        "get",
        "",
        "secrets",
        "kube-system",
        "bootstrap-token-abcdef",
    ),
    req("list", "", "secrets", "kube-system", ""),
    req("watch", "", "secrets", "kube-system", ""),
    req("list", "", "secrets", "", ""),
    // Its own namespace's other Secrets (istiod's, anyone's), one by one or all at once.
    req("get", "", "secrets", "istio-system", "istiod-tls"),
    req("list", "", "secrets", "istio-system", ""),
    req("watch", "", "secrets", "istio-system", ""),
    req("update", "", "secrets", "istio-system", "istiod-tls"),
    req(
        "delete",
        "",
        "secrets",
        "istio-system",
        "citadel-ca-journal",
    ),
    // Other ConfigMaps: the cluster DNS configuration, anyone's settings.
    req("update", "", "configmaps", "kube-system", "coredns"),
    req("patch", "", "configmaps", "kube-system", "coredns"),
    req("get", "", "configmaps", "kube-system", "coredns"),
    req("get", "", "configmaps", "shop", "app-settings"),
    req("list", "", "configmaps", "shop", ""),
    req("list", "", "configmaps", "", ""),
    req("delete", "", "configmaps", "shop", "istio-ca-root-cert"),
    // The JWT bundle is the CA namespace's only: not another namespace's of that name.
    req("update", "", "configmaps", "shop", "citadel-jwt-bundle"),
    // citadel's old plugged-roots record is a Secret now, not a ConfigMap it may rewrite.
    req(
        "update",
        "",
        "configmaps",
        "istio-system",
        "citadel-plugged-roots",
    ),
    // Other Leases: other controllers' leader election.
    req(
        "get",
        "coordination.k8s.io",
        "leases",
        "istio-system",
        "istiod-leader",
    ),
    req(
        "update",
        "coordination.k8s.io",
        "leases",
        "istio-system",
        "istiod-leader",
    ),
    req("list", "coordination.k8s.io", "leases", "istio-system", ""),
    req(
        "get",
        "coordination.k8s.io",
        "leases",
        "kube-system",
        "kube-controller-manager",
    ),
    req(
        "update",
        "coordination.k8s.io",
        "leases",
        "kube-system",
        "kube-controller-manager",
    ),
    // Other ClusterTrustBundles, and signing for someone else's signer.
    req(
        "update",
        "certificates.k8s.io",
        "clustertrustbundles",
        "",
        "example.com:other:roots",
    ),
    req(
        "delete",
        "certificates.k8s.io",
        "clustertrustbundles",
        "",
        "citadel.dev:spiffe:roots",
    ),
    req(
        "sign",
        "certificates.k8s.io",
        "signers",
        "",
        "kubernetes.io/kube-apiserver-client",
    ),
    req(
        "attest",
        "certificates.k8s.io",
        "signers",
        "",
        "example.com/other",
    ),
    // Revocations are the operator's: citadel only reads them and reports.
    req("create", "citadel.dev", "revocations", "istio-system", ""),
    req(
        "update",
        "citadel.dev",
        "certificateauthorities",
        "istio-system",
        "citadel",
    ),
    req(
        "get",
        "citadel.dev",
        "certificateauthorities",
        "istio-system",
        "another",
    ),
    req(
        "patch",
        "citadel.dev",
        "certificateauthorities/status",
        "istio-system",
        "another",
    ),
    // Core Events: it records through events.k8s.io only.
    req("create", "", "events", "istio-system", ""),
];

/// Everything citadel does (docs/kubernetes.md, "RBAC"), each as precisely as it asks it.
const MUST: &[Req] = &[
    req("create", "authentication.k8s.io", "tokenreviews", "", ""),
    req("list", "", "namespaces", "", ""),
    req("watch", "", "namespaces", "", ""),
    // The bundle and CRL ConfigMaps in every namespace: one list-watch each, by name.
    req("list", "", "configmaps", "", "istio-ca-root-cert"),
    req("watch", "", "configmaps", "", "istio-ca-root-cert"),
    req("list", "", "configmaps", "", "istio-ca-crl"),
    req("watch", "", "configmaps", "", "istio-ca-crl"),
    req("create", "", "configmaps", "shop", ""),
    req("update", "", "configmaps", "shop", "istio-ca-root-cert"),
    req("update", "", "configmaps", "shop", "istio-ca-crl"),
    req("create", "events.k8s.io", "events", "shop", ""),
    req(
        "patch",
        "events.k8s.io",
        "events",
        "shop",
        "istio-ca-root-cert.1",
    ),
    req("create", "events.k8s.io", "events", "istio-system", ""),
    // The CA's own Secrets.
    req("create", "", "secrets", "istio-system", ""),
    req("get", "", "secrets", "istio-system", "citadel-ca-journal"),
    req("list", "", "secrets", "istio-system", "citadel-ca-journal"),
    req("watch", "", "secrets", "istio-system", "citadel-ca-journal"),
    req(
        "update",
        "",
        "secrets",
        "istio-system",
        "citadel-ca-journal",
    ),
    req("get", "", "secrets", "istio-system", "istio-ca-secret"),
    req("update", "", "secrets", "istio-system", "istio-ca-secret"),
    // The JWT bundle ConfigMap, in its own namespace.
    req(
        "get",
        "",
        "configmaps",
        "istio-system",
        "citadel-jwt-bundle",
    ),
    req(
        "update",
        "",
        "configmaps",
        "istio-system",
        "citadel-jwt-bundle",
    ),
    req("get", "", "secrets", "istio-system", "cacerts"),
    req("list", "", "secrets", "istio-system", "cacerts"),
    req("watch", "", "secrets", "istio-system", "cacerts"),
    req(
        "get",
        "",
        "secrets",
        "istio-system",
        "citadel-plugged-roots",
    ),
    req(
        "update",
        "",
        "secrets",
        "istio-system",
        "citadel-plugged-roots",
    ),
    req(
        "patch",
        "",
        "secrets",
        "istio-system",
        "citadel-plugged-roots",
    ),
    // Its Lease.
    req(
        "create",
        "coordination.k8s.io",
        "leases",
        "istio-system",
        "",
    ),
    req(
        "get",
        "coordination.k8s.io",
        "leases",
        "istio-system",
        "citadel-leader",
    ),
    req(
        "update",
        "coordination.k8s.io",
        "leases",
        "istio-system",
        "citadel-leader",
    ),
    // Its resources.
    req("get", "citadel.dev", "revocations", "istio-system", "x"),
    req("list", "citadel.dev", "revocations", "istio-system", ""),
    req("watch", "citadel.dev", "revocations", "istio-system", ""),
    req(
        "patch",
        "citadel.dev",
        "revocations/status",
        "istio-system",
        "x",
    ),
    req(
        "get",
        "citadel.dev",
        "certificateauthorities",
        "istio-system",
        "citadel",
    ),
    req(
        "list",
        "citadel.dev",
        "certificateauthorities",
        "istio-system",
        "citadel",
    ),
    req(
        "watch",
        "citadel.dev",
        "certificateauthorities",
        "istio-system",
        "citadel",
    ),
    req(
        "patch",
        "citadel.dev",
        "certificateauthorities/status",
        "istio-system",
        "citadel",
    ),
    // Pod Certificates.
    req(
        "list",
        "certificates.k8s.io",
        "podcertificaterequests",
        "",
        "",
    ),
    req(
        "watch",
        "certificates.k8s.io",
        "podcertificaterequests",
        "",
        "",
    ),
    req(
        "update",
        "certificates.k8s.io",
        "podcertificaterequests/status",
        "shop",
        "p",
    ),
    req(
        "sign",
        "certificates.k8s.io",
        "signers",
        "",
        "citadel.dev/spiffe",
    ),
    req(
        "attest",
        "certificates.k8s.io",
        "signers",
        "",
        "citadel.dev/spiffe",
    ),
    req(
        "create",
        "certificates.k8s.io",
        "clustertrustbundles",
        "",
        "",
    ),
    req(
        "get",
        "certificates.k8s.io",
        "clustertrustbundles",
        "",
        "citadel.dev:spiffe:roots",
    ),
    req(
        "update",
        "certificates.k8s.io",
        "clustertrustbundles",
        "",
        "citadel.dev:spiffe:roots",
    ),
    req("list", "certificates.k8s.io", "clustertrustbundles", "", ""),
    req(
        "watch",
        "certificates.k8s.io",
        "clustertrustbundles",
        "",
        "",
    ),
    req("get", "", "pods", "shop", "p"),
    req("get", "", "serviceaccounts", "shop", "cart"),
    req("get", "", "nodes", "", "node-a"),
];

/// Waits until the authorizer has seen the roles just applied (its caches follow the API).
pub(crate) async fn rbac_in_effect(kube: &KubeEnv) {
    eventually("deploy/'s RBAC in effect", 10, async || {
        allowed(
            kube,
            req("create", "authentication.k8s.io", "tokenreviews", "", ""),
        )
        .await
            && allowed(
                kube,
                req(
                    "update",
                    "coordination.k8s.io",
                    "leases",
                    "istio-system",
                    "citadel-leader",
                ),
            )
            .await
    })
    .await;
}

/// Asks every request of `list`; returns those whose answer is not `want`.
async fn wrong(kube: &KubeEnv, list: &[Req], want: bool) -> Vec<String> {
    let mut out = Vec::new();
    for r in list {
        if allowed(kube, *r).await != want {
            out.push(format!("{r:?}"));
        }
    }
    out
}

/// The SubjectAccessReviews: deploy/citadel.yaml grants every request citadel makes and none
/// of the others; deploy/multicluster.yaml adds exactly the Secret list/watch in istio-system.
#[tokio::test]
async fn deploy_rbac_grants_citadel_only_what_it_uses() {
    let Some(kube) = KubeEnv::start().await else {
        return;
    };
    if !require_tool("kubectl") {
        return;
    }
    kube.namespace("istio-system").await;
    apply(&kube, &["deploy/citadel.yaml"]);
    rbac_in_effect(&kube).await;
    let granted = wrong(&kube, MUST_NOT, false).await;
    let missing = wrong(&kube, MUST, true).await;
    assert!(
        granted.is_empty() && missing.is_empty(),
        "granted but must not be:\n  {}\nneeded but not granted:\n  {}",
        granted.join("\n  "),
        missing.join("\n  ")
    );

    // The optional multicluster Role: the remote-cluster Secret watch (a label selector,
    // which RBAC cannot narrow) in citadel's namespace, nothing more.
    let text = apply(&kube, &["deploy/multicluster.yaml"]);
    assert!(
        text.contains("role.rbac.authorization.k8s.io/citadel-multicluster"),
        "{text}"
    );
    eventually("the multicluster Role in effect", 10, async || {
        allowed(&kube, req("watch", "", "secrets", "istio-system", "")).await
    })
    .await;
    for r in [
        req("list", "", "secrets", "istio-system", ""),
        req("watch", "", "secrets", "istio-system", ""),
    ] {
        assert!(allowed(&kube, r).await, "{r:?}");
    }
    for r in [
        req("list", "", "secrets", "kube-system", ""),
        req("update", "", "secrets", "istio-system", "istiod-tls"),
        req("update", "", "configmaps", "kube-system", "coredns"),
    ] {
        assert!(!allowed(&kube, r).await, "{r:?}");
    }
}

/// A kubeconfig for citadel's service account: the admin's, with its token swapped for one
/// from the TokenRequest API.
pub(crate) async fn sa_kubeconfig(kube: &KubeEnv, dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("citadel-kubeconfig");
    kube.kubeconfig_as("istio-system", "citadel", &path).await;
    path
}

/// Pinning by name works for list and watch when the request selects `metadata.name` (what
/// citadel's watches send), and only then: checked with real requests under the service
/// account's token, not only with SubjectAccessReviews.
async fn pinned_list_needs_the_name_selector(client: &kube::Client) {
    use kube::api::ListParams;
    let all: Api<ConfigMap> = Api::all(client.clone());
    all.list(&ListParams::default().fields("metadata.name=istio-ca-root-cert"))
        .await
        .expect("list by name across namespaces");
    let err = all.list(&ListParams::default()).await.unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 403),
        "{err:?}"
    );
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(client.clone(), "istio-system");
    secrets
        .list(&ListParams::default().fields("metadata.name=citadel-ca-journal"))
        .await
        .expect("list the journal by name");
    for bad in [
        ListParams::default(),
        ListParams::default().fields("metadata.name=istiod-tls"),
        ListParams::default().labels("istio/multiCluster=true"),
    ] {
        let err = secrets.list(&bad).await.unwrap_err();
        assert!(
            matches!(&err, kube::Error::Api(s) if s.code == 403),
            "{err:?}"
        );
    }
    let cm: Api<ConfigMap> = Api::namespaced(client.clone(), "kube-system");
    let err = cm.get("coredns").await.unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 403),
        "{err:?}"
    );
}

/// citadel under exactly deploy/'s RBAC (the `citadel` service account's token, nothing
/// else) does all it does: CA state in its Secrets, the Lease, TokenReview, the bundle and
/// CRL in a namespace created after it started, a drift repair with an Event in the workload
/// namespace, a root rotation requested on the CertificateAuthority resource (status kept),
/// a Revocation (status kept, identity refused), a PodCertificateRequest signed and the
/// ClusterTrustBundle written; and its log (debug, so a refused Event shows too) never says
/// forbidden.
#[tokio::test]
async fn citadel_does_everything_under_exactly_the_deploy_rbac() {
    use citadel::cluster::ca_resource::CertificateAuthority;
    use citadel::cluster::revocations::Revocation;
    let Some(kube) = KubeEnv::start().await else {
        return;
    };
    if !require_tool("kubectl") {
        return;
    }
    kube.namespace("istio-system").await;
    apply(&kube, &["deploy/citadel.yaml"]);
    rbac_in_effect(&kube).await;
    kube.service_account("shop", "cart").await;
    kube.service_account("shop", "web").await;
    // The operator's CertificateAuthority, before citadel starts.
    let cas: Api<CertificateAuthority> = Api::namespaced(kube.client.clone(), "istio-system");
    let ca_obj: CertificateAuthority = serde_json::from_value(serde_json::json!({
        "apiVersion": "citadel.dev/v1alpha1", "kind": "CertificateAuthority",
        "metadata": {"name": "citadel", "namespace": "istio-system"},
        "spec": {"trustDomain": "cluster.local"}
    }))
    .unwrap();
    cas.create(&PostParams::default(), &ca_obj).await.unwrap();

    let tmp = tempfile::tempdir().unwrap();
    let kubeconfig = sa_kubeconfig(&kube, tmp.path()).await;
    let sa_client = citadel::cluster::client(Some(&kubeconfig)).await.unwrap();
    pinned_list_needs_the_name_selector(&sa_client).await;

    let (addr, metrics) = (
        std::net::SocketAddr::from(([127, 0, 0, 1], free_port())),
        std::net::SocketAddr::from(([127, 0, 0, 1], free_port())),
    );
    let log_path = tmp.path().join("citadel.log");
    let mut child = Command::new(BIN)
        .args([
            "serve",
            "--store",
            "kube",
            "--namespace",
            "istio-system",
            "--auth",
            "tokenreview",
            "--lease-duration",
            "3s",
            "--reconcile-interval",
            "500ms",
            "--pod-name",
            "citadel-0",
            "--pod-cert-signer-name",
            "citadel.dev/spiffe",
            "--server-dns-name",
            "localhost",
        ])
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .arg("--state-dir")
        .arg(tmp.path().join("state"))
        .args([
            "--listen",
            &addr.to_string(),
            "--metrics-listen",
            &metrics.to_string(),
        ])
        .env("RUST_LOG", "info,citadel=debug")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let leading = async || {
        http_get(metrics, "/metrics")
            .await
            .map(|(_, m)| m.contains("citadel_leader 1\n"))
            .unwrap_or(false)
    };
    eventually("citadel ready and leading", 60, async || {
        matches!(http_get(metrics, "/healthz/ready").await, Ok((200, _))) && leading().await
    })
    .await;

    // The bundle reaches a namespace that existed and one created afterwards.
    eventually("bundle in shop", 30, async || {
        kube.bundle("shop").await.is_some()
    })
    .await;
    kube.namespace("late").await;
    eventually("bundle in a new namespace", 30, async || {
        kube.bundle("late").await.is_some()
    })
    .await;
    let bundle = kube.bundle("shop").await.unwrap();
    assert_eq!(bundle.matches("BEGIN CERTIFICATE").count(), 1);

    // A certificate for a TokenReview-checked token.
    let mut client = citadel::client::connect(&citadel::client::ConnectOptions {
        addr: addr.to_string(),
        root_pem: bundle.as_bytes().to_vec(),
        server_name: Some("localhost".into()),
        ..Default::default()
    })
    .await
    .unwrap();
    let (_, csr) = csr_for(KeyType::EcP256, &spiffe("shop", "cart"));
    let cart_token = kube.token("shop", "cart", "istio-ca").await;
    let chain = call(&mut client, &csr, Some(&bearer(&cart_token)), 0, None)
        .await
        .unwrap();
    assert!(chain.len() >= 2, "{chain:?}");

    // Drift: someone edits the bundle in shop; citadel puts it back and says so there.
    let cms: Api<ConfigMap> = Api::namespaced(kube.client.clone(), "shop");
    cms.patch(
        "istio-ca-root-cert",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"data": {"root-cert.pem": "not a root"}})),
    )
    .await
    .unwrap();
    eventually("drift repaired", 20, async || {
        kube.bundle("shop").await.as_deref() == Some(bundle.as_str())
    })
    .await;
    wait_event(&kube.client, "shop", "istio-ca-root-cert", "Drifted", 20).await;

    // A root rotation asked on the resource: handled, the new root published everywhere.
    cas.patch(
        "citadel",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"spec": {"rootRotation": {"request": "rbac-1"}}})),
    )
    .await
    .unwrap();
    eventually(
        "rotation handled and both roots published",
        30,
        async || {
            let handled = cas
                .get("citadel")
                .await
                .unwrap()
                .status
                .and_then(|s| s.root_rotation)
                .and_then(|r| r.handled_request);
            handled.as_deref() == Some("rbac-1")
                && kube
                    .bundle("late")
                    .await
                    .is_some_and(|b| b.matches("BEGIN CERTIFICATE").count() == 2)
        },
    )
    .await;
    let ca = cas.get("citadel").await.unwrap();
    assert_eq!(
        condition(&ca, "Ready").map(|c| c.status).as_deref(),
        Some("True"),
        "{:?}",
        ca.status
    );

    // A Revocation: applied (status kept), the identity refused.
    let revs: Api<Revocation> = Api::namespaced(kube.client.clone(), "istio-system");
    let rev: Revocation = serde_json::from_value(serde_json::json!({
        "apiVersion": "citadel.dev/v1alpha1", "kind": "Revocation",
        "metadata": {"name": "cart-compromised", "namespace": "istio-system"},
        "spec": {"identity": "spiffe://cluster.local/ns/shop/sa/cart", "reason": "key-compromise"}
    }))
    .unwrap();
    revs.create(&PostParams::default(), &rev).await.unwrap();
    wait_condition(&revs, "cart-compromised", "Applied", "True", 30).await;
    eventually("cart refused", 20, async || {
        matches!(call(&mut client, &csr, Some(&bearer(&cart_token)), 0, None).await,
            Err(s) if s.code() == Code::PermissionDenied)
    })
    .await;
    let (_, web_csr) = csr_for(KeyType::EcP256, &spiffe("shop", "web"));
    let web_token = kube.token("shop", "web", "istio-ca").await;
    call(&mut client, &web_csr, Some(&bearer(&web_token)), 0, None)
        .await
        .unwrap();
    eventually("the CRL in the new namespace", 20, async || {
        kube.configmap("late", "istio-ca-crl").await.is_some()
    })
    .await;

    // A PodCertificateRequest from the kubelet: signed, and the ClusterTrustBundle written.
    let kubelet = crate::podcert::kubelet(&kube).await;
    let pod = crate::podcert::pod(&kube, "shop", "web-0", "web", &kubelet.node).await;
    let web_uid = crate::podcert::sa_uid(&kube, "shop", "web").await;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    crate::podcert::create(
        &kubelet.client,
        &crate::podcert::Req {
            name: "web-0-svid",
            pod: &pod,
            sa: "web",
            sa_uid: &web_uid,
            node: &kubelet,
            key: &key,
            max_expiration: None,
        },
    )
    .await
    .unwrap();
    let decided = crate::podcert::decided(&kube, "shop", "web-0-svid").await;
    assert_eq!(crate::podcert::condition(&decided).0, "Issued");
    eventually("the ClusterTrustBundle holds both roots", 20, async || {
        crate::podcert::ctb_roots(&kube)
            .await
            .is_some_and(|b| b.matches("BEGIN CERTIFICATE").count() == 2)
    })
    .await;

    let _ = child.kill();
    let _ = child.wait();
    let text = log();
    let forbidden: Vec<&str> = text
        .lines()
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            l.contains("forbidden")
        })
        .collect();
    assert!(
        forbidden.is_empty(),
        "citadel was refused under deploy/'s RBAC:\n{}",
        forbidden.join("\n")
    );
    assert!(
        text.contains("published istio-ca-root-cert in late"),
        "{text}"
    );
}
