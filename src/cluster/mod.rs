//! Talking to the Kubernetes API: building the client, and reading the service-account
//! issuer's discovery document and JWKS (`--jwks-from-cluster`).

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use crate::auth::jwks::Jwks;
use crate::auth::jwt::JwtAuthenticator;
use crate::shutdown::Shutdown;

/// A client from `kubeconfig`, else KUBECONFIG, `~/.kube/config` or the in-cluster config.
pub async fn client(kubeconfig: Option<&Path>) -> Result<kube::Client, String> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| format!("cannot read kubeconfig {}: {e}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| format!("kubeconfig {}: {e}", path.display()))?
        }
        None => kube::Config::infer().await.map_err(|e| {
            format!(
                "no Kubernetes configuration found (KUBECONFIG, ~/.kube/config or in-cluster): {e}"
            )
        })?,
    };
    kube::Client::try_from(config).map_err(|e| format!("cannot build the Kubernetes client: {e}"))
}

async fn get_json(client: &kube::Client, path: &str) -> Result<serde_json::Value, String> {
    let req = http::Request::get(path)
        .body(Vec::new())
        .map_err(|e| e.to_string())?;
    let text = client
        .request_text(req)
        .await
        .map_err(|e| format!("GET {path}: {e}"))?;
    serde_json::from_str(&text).map_err(|e| format!("GET {path}: not JSON: {e}"))
}

/// The issuer (from `/.well-known/openid-configuration`) and the keys (`/openid/v1/jwks`).
pub async fn fetch_jwks(client: &kube::Client) -> Result<(Option<String>, Jwks), String> {
    let discovery = get_json(client, "/.well-known/openid-configuration").await?;
    let issuer = discovery
        .get("issuer")
        .and_then(|i| i.as_str())
        .map(str::to_string);
    let keys = get_json(client, "/openid/v1/jwks").await?;
    let jwks =
        Jwks::from_json(keys.to_string().as_bytes()).map_err(|e| format!("cluster JWKS: {e}"))?;
    Ok((issuer, jwks))
}

/// Keeps a JWT authenticator's keys fresh: every `interval`, and soon after a token with an
/// unknown kid (at most once per `min_gap`, so garbage tokens cannot hammer the API server).
pub struct JwksRefresher {
    /// Client for the GETs of the issuer discovery document and the JWKS.
    pub client: kube::Client,
    /// The authenticator whose keys are replaced.
    pub auth: Arc<JwtAuthenticator>,
    /// Notified when a token names an unknown kid; triggers an early refresh.
    pub unknown_kid: Arc<Notify>,
    /// JWKS fetches made (each is two GETs); requests themselves make none.
    pub fetches: AtomicU64,
}

impl JwksRefresher {
    /// Refreshes every `interval`, and after an unknown kid at most once per `min_gap`, until
    /// shutdown.
    pub async fn run(self: Arc<Self>, interval: Duration, min_gap: Duration, shutdown: Shutdown) {
        let mut last = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = self.unknown_kid.notified() => {
                    let wait = min_gap.saturating_sub(last.elapsed());
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = shutdown.wait() => return,
                    }
                }
                _ = shutdown.wait() => return,
            }
            last = tokio::time::Instant::now();
            self.fetches.fetch_add(1, Ordering::Relaxed);
            match fetch_jwks(&self.client).await {
                Ok((_, jwks)) => {
                    tracing::debug!(keys = jwks.len(), "refreshed the cluster JWKS");
                    self.auth.replace_keys(jwks);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not refresh the cluster JWKS; keeping the current keys")
                }
            }
        }
    }
}

pub mod ca_resource;
pub mod cacerts;
pub mod controller;
pub mod crds;
pub mod csrsigner;
pub mod leader;
pub mod linkerd_drift;
pub mod names;
pub mod pending;
pub mod podcert;
pub mod pods;
pub mod publish;
pub mod remote;
pub mod replica;
pub mod revocations;
pub mod trustbundle;
