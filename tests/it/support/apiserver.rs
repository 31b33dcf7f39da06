//! A REAL kube-apiserver + etcd for a test (scripts/kube-test-env.sh builds and caches
//! them), with the few API calls the tests share.

use std::path::PathBuf;
use std::process::Command;

use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::api::{Api, DeleteParams, PostParams};

/// A running API server, stopped on drop.
pub struct KubeEnv {
    pub dir: PathBuf,
    pub kubeconfig: PathBuf,
    pub client: kube::Client,
    _tmp: tempfile::TempDir,
}

impl Drop for KubeEnv {
    fn drop(&mut self) {
        let _ = Command::new("scripts/kube-test-env.sh")
            .arg("stop")
            .arg(&self.dir)
            .output();
    }
}

impl KubeEnv {
    /// Starts one, or returns None (skipping) when it cannot run here; under CI=true that
    /// is a failure instead.
    pub async fn start() -> Option<Self> {
        citadel::install_crypto_provider();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("kube");
        let out = Command::new("scripts/kube-test-env.sh")
            .arg("start")
            .arg(&dir)
            .output()
            .unwrap();
        if !out.status.success() {
            let msg = String::from_utf8_lossy(&out.stderr).to_string();
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "the Kubernetes test environment must start under CI=true:\n{msg}"
            );
            eprintln!(
                "SKIPPED: no kube-apiserver here (run scripts/kube-test-env.sh ensure):\n{msg}"
            );
            return None;
        }
        let kubeconfig = dir.join("kubeconfig");
        let client = citadel::cluster::client(Some(&kubeconfig)).await.unwrap();
        Some(KubeEnv {
            dir,
            kubeconfig,
            client,
            _tmp: tmp,
        })
    }

    pub fn stop(&self) {
        self.script("stop");
    }

    /// Kills kube-apiserver alone (as a crash would); etcd keeps the data.
    pub fn stop_apiserver(&self) {
        self.script("stop-apiserver");
    }

    /// Brings kube-apiserver back on the same port after `stop_apiserver`.
    pub fn start_apiserver(&self) {
        self.script("start-apiserver");
    }

    fn script(&self, command: &str) {
        let out = Command::new("scripts/kube-test-env.sh")
            .arg(command)
            .arg(&self.dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "kube-test-env.sh {command}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub async fn service_account(&self, ns: &str, sa: &str) {
        let nss: Api<Namespace> = Api::all(self.client.clone());
        let mut n = Namespace::default();
        n.metadata.name = Some(ns.into());
        let _ = nss.create(&PostParams::default(), &n).await;
        let sas: Api<ServiceAccount> = Api::namespaced(self.client.clone(), ns);
        let mut s = ServiceAccount::default();
        s.metadata.name = Some(sa.into());
        sas.create(&PostParams::default(), &s).await.unwrap();
    }

    pub async fn delete_service_account(&self, ns: &str, sa: &str) {
        let sas: Api<ServiceAccount> = Api::namespaced(self.client.clone(), ns);
        sas.delete(sa, &DeleteParams::default()).await.unwrap();
    }

    /// A token from the TokenRequest API, exactly as kubelet gets a projected one.
    pub async fn token(&self, ns: &str, sa: &str, audience: &str) -> String {
        let body = serde_json::json!({
            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
            "spec": {"audiences": [audience], "expirationSeconds": 3600}
        });
        let req = http::Request::post(format!(
            "/api/v1/namespaces/{ns}/serviceaccounts/{sa}/token"
        ))
        .header("content-type", "application/json")
        .body(serde_json::to_vec(&body).unwrap())
        .unwrap();
        let resp: serde_json::Value = self.client.request(req).await.unwrap();
        resp["status"]["token"]
            .as_str()
            .expect("a token")
            .to_string()
    }

    /// A kubeconfig at `path` that acts as the service account `ns/sa`: the admin's, with its
    /// token swapped for one from the TokenRequest API (for the API server's own audience).
    pub async fn kubeconfig_as(&self, ns: &str, sa: &str, path: &std::path::Path) {
        let token = self
            .token(ns, sa, "https://kubernetes.default.svc.cluster.local")
            .await;
        let admin = std::fs::read_to_string(&self.kubeconfig).unwrap();
        let mut swapped = 0;
        let as_sa: String = admin
            .lines()
            .map(|l| match l.trim_start().strip_prefix("token: ") {
                Some(_) => {
                    swapped += 1;
                    format!("    token: {token}")
                }
                None => l.to_string(),
            })
            .collect::<Vec<_>>()
            .join("\n");
        assert_eq!(swapped, 1, "the admin kubeconfig has one token");
        std::fs::write(path, as_sa).unwrap();
    }

    /// TokenReviews the API server has served, from its own metrics (a third-party count).
    pub async fn token_reviews(&self) -> u64 {
        let req = http::Request::get("/metrics").body(Vec::new()).unwrap();
        let text = self.client.request_text(req).await.unwrap();
        text.lines()
            .filter(|l| {
                l.starts_with("apiserver_request_total{") && l.contains("resource=\"tokenreviews\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    }

    /// Every request the API server has served, from its own metrics, summed by
    /// `"<VERB> <resource>[/<subresource>]"` (e.g. `GET secrets`, `PATCH revocations/status`).
    pub async fn requests(&self) -> std::collections::BTreeMap<String, u64> {
        let req = http::Request::get("/metrics").body(Vec::new()).unwrap();
        let text = self.client.request_text(req).await.unwrap();
        let mut out = std::collections::BTreeMap::new();
        for l in text
            .lines()
            .filter(|l| l.starts_with("apiserver_request_total{"))
        {
            let label = |k: &str| {
                let pat = format!("{k}=\"");
                l.split(&pat)
                    .nth(1)
                    .and_then(|r| r.split('"').next())
                    .unwrap_or("")
                    .to_string()
            };
            let (verb, resource, sub) = (label("verb"), label("resource"), label("subresource"));
            let key = if sub.is_empty() {
                format!("{verb} {resource}")
            } else {
                format!("{verb} {resource}/{sub}")
            };
            let n = l
                .rsplit(' ')
                .next()
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0) as u64;
            *out.entry(key).or_insert(0) += n;
        }
        out
    }
}

impl KubeEnv {
    pub async fn namespace(&self, ns: &str) {
        let nss: Api<Namespace> = Api::all(self.client.clone());
        let mut n = Namespace::default();
        n.metadata.name = Some(ns.into());
        let _ = nss.create(&PostParams::default(), &n).await;
    }

    pub async fn configmap(
        &self,
        ns: &str,
        name: &str,
    ) -> Option<k8s_openapi::api::core::v1::ConfigMap> {
        Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(self.client.clone(), ns)
            .get_opt(name)
            .await
            .unwrap()
    }

    pub async fn bundle(&self, ns: &str) -> Option<String> {
        self.configmap(ns, "istio-ca-root-cert")
            .await?
            .data?
            .get("root-cert.pem")
            .cloned()
    }
}

/// Nodes, pods bound to them and pod-bound tokens, for node impersonation (ambient mode).
/// There is no kubelet or scheduler: a pod is "on" a node because its spec.nodeName says so.
impl KubeEnv {
    /// A Node object (no kubelet behind it).
    pub async fn node(&self, name: &str) {
        let node: k8s_openapi::api::core::v1::Node = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Node", "metadata": {"name": name}
        }))
        .unwrap();
        Api::<k8s_openapi::api::core::v1::Node>::all(self.client.clone())
            .create(&PostParams::default(), &node)
            .await
            .unwrap();
    }

    /// A pod of `sa` bound to `node` (unscheduled when `None`); returns its UID.
    pub async fn pod_on(&self, ns: &str, name: &str, sa: &str, node: Option<&str>) -> String {
        let mut spec = serde_json::json!({
            "serviceAccountName": sa,
            "automountServiceAccountToken": false,
            "containers": [{"name": "app", "image": "registry.invalid/app:1"}]
        });
        if let Some(n) = node {
            spec["nodeName"] = n.into();
        }
        let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec
        }))
        .unwrap();
        Api::<k8s_openapi::api::core::v1::Pod>::namespaced(self.client.clone(), ns)
            .create(&PostParams::default(), &pod)
            .await
            .unwrap()
            .metadata
            .uid
            .expect("a pod UID")
    }

    /// Deletes a pod at once (no kubelet to wait for).
    pub async fn delete_pod(&self, ns: &str, name: &str) {
        Api::<k8s_openapi::api::core::v1::Pod>::namespaced(self.client.clone(), ns)
            .delete(name, &DeleteParams::default().grace_period(0))
            .await
            .unwrap();
        // Pods without a kubelet may linger with a deletionTimestamp; wait until gone.
        let api = Api::<k8s_openapi::api::core::v1::Pod>::namespaced(self.client.clone(), ns);
        crate::support::eventually("the pod is gone", 20, async || {
            api.get_opt(name).await.unwrap().is_none()
        })
        .await;
    }

    /// Sets a pod's status.phase through the status subresource (Failed, Succeeded...).
    pub async fn set_phase(&self, ns: &str, name: &str, phase: &str) {
        let api = Api::<k8s_openapi::api::core::v1::Pod>::namespaced(self.client.clone(), ns);
        let patch = serde_json::json!({"status": {"phase": phase}});
        api.patch_status(
            name,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await
        .unwrap();
    }

    /// A token from the TokenRequest API bound to a pod, as kubelet projects ztunnel's.
    pub async fn pod_token(&self, ns: &str, sa: &str, pod: &str, uid: &str) -> String {
        let body = serde_json::json!({
            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
            "spec": {
                "audiences": ["istio-ca"], "expirationSeconds": 3600,
                "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": pod, "uid": uid}
            }
        });
        let req = http::Request::post(format!(
            "/api/v1/namespaces/{ns}/serviceaccounts/{sa}/token"
        ))
        .header("content-type", "application/json")
        .body(serde_json::to_vec(&body).unwrap())
        .unwrap();
        let resp: serde_json::Value = self.client.request(req).await.unwrap();
        resp["status"]["token"]
            .as_str()
            .expect("a token")
            .to_string()
    }
}
