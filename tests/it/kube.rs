//! Against a REAL kube-apiserver + etcd (scripts/kube-test-env.sh builds and caches them):
//! TokenReview authentication with its cache, JWKS from the cluster, and what happens when
//! the API server goes away. Tokens come from the TokenRequest API, as kubelet gets them.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use citadel::pki::KeyType;
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::api::{Api, DeleteParams, PostParams};
use tonic::Code;

use crate::support::*;

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
        let out = Command::new("scripts/kube-test-env.sh")
            .arg("stop")
            .arg(&self.dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
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
}

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
    let ca = ca_with(
        &kube,
        tmp.path(),
        &["--auth", "tokenreview", "--token-cache-ttl", "2s"],
    )
    .await;
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
    tokio::time::sleep(Duration::from_millis(2100)).await; // let the first token's entry expire
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

    tokio::time::sleep(Duration::from_millis(2100)).await;
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
    let t0 = std::time::Instant::now();
    loop {
        match call(&mut client, &front_csr, Some(&bearer(&t1)), 0, None).await {
            Err(e) => {
                assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
                break;
            }
            Ok(_) => assert!(
                t0.elapsed() < Duration::from_secs(20),
                "a deleted service account is still accepted after 20s"
            ),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

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
