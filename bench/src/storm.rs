//! `citadel-bench --identities N`: a renewal storm. N distinct workloads (one service account,
//! one token and one key each) all ask within one window, the way a mesh does after a root
//! rotation or a mass restart. Each workload asks once and retries what istio-agent retries
//! (Unavailable, DeadlineExceeded, ResourceExhausted, Aborted, Internal; 5 retries with
//! backoff), so the report can say that nothing failed, or that every failure was retryable
//! and was retried.
//!
//! With `--auth tokenreview --kubeconfig FILE` the service accounts are created on that API
//! server, each token comes from the TokenRequest API (audience `istio-ca`, as kubelet
//! projects it), the server reviews every token against the API server, and the API server's
//! own `apiserver_request_total{resource="tokenreviews"}` counts the reviews it served.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, ServiceAccount as KubeServiceAccount};
use kube::api::{Api, PostParams};

use citadel::client::{self, CaClient, ConnectOptions};
use citadel::pki::KeyType;

use crate::measure::{
    ms, percentile, read_file, rss_kib, server_cpu, spawn_load, start_server, workloads,
    BenchResult, Work,
};

/// The namespace the storm's service accounts live in.
pub const STORM_NAMESPACE: &str = "citadel-bench";

/// How the server of a storm authenticates tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StormAuth {
    /// Local JWKS: RS256 dev tokens verified in process (no API call).
    Jwks,
    /// TokenReview against the API server of --kubeconfig, one per distinct token.
    Tokenreview,
}

/// What a storm needs beyond the common flags.
#[derive(Debug, Clone)]
pub struct StormPlan {
    /// Distinct workloads.
    pub identities: usize,
    /// Requests in flight at once (gRPC streams).
    pub concurrency: usize,
    /// HTTP/2 connections.
    pub connections: usize,
    /// CSR key type.
    pub key_type: KeyType,
    /// Token source and the server's authenticator.
    pub auth: StormAuth,
    /// The API server (TokenReview).
    pub kubeconfig: Option<std::path::PathBuf>,
    /// The server's `--kube-qps` and `--kube-burst`.
    pub kube_qps: f64,
    /// See `kube_qps`.
    pub kube_burst: u32,
}

/// The codes istio-agent retries.
fn retryable(code: tonic::Code) -> bool {
    use tonic::Code::*;
    matches!(
        code,
        Unavailable | DeadlineExceeded | ResourceExhausted | Aborted | Internal
    )
}

/// istio-agent's retry budget per request.
const RETRIES: u32 = 5;

/// Creates the service accounts (idempotent) and asks the TokenRequest API for one token
/// each, 64 calls at a time.
async fn cluster_tokens(client: &kube::Client, n: usize) -> Result<Vec<String>, String> {
    let nss: Api<Namespace> = Api::all(client.clone());
    let mut ns = Namespace::default();
    ns.metadata.name = Some(STORM_NAMESPACE.into());
    match nss.create(&PostParams::default(), &ns).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => return Err(format!("cannot create namespace {STORM_NAMESPACE}: {e}")),
    }
    let next = Arc::new(AtomicUsize::new(0));
    let tokens = Arc::new(std::sync::Mutex::new(vec![String::new(); n]));
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let (client, next, tokens) = (client.clone(), next.clone(), tokens.clone());
        tasks.push(tokio::spawn(async move {
            let sas: Api<KubeServiceAccount> = Api::namespaced(client.clone(), STORM_NAMESPACE);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return Ok::<(), String>(());
                }
                let name = format!("w{i}");
                let mut sa = KubeServiceAccount::default();
                sa.metadata.name = Some(name.clone());
                match sas.create(&PostParams::default(), &sa).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(s)) if s.code == 409 => {}
                    Err(e) => return Err(format!("cannot create service account {name}: {e}")),
                }
                let body = serde_json::json!({
                    "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                    "spec": {"audiences": ["istio-ca"], "expirationSeconds": 3600}
                });
                let req = http::Request::post(format!(
                    "/api/v1/namespaces/{STORM_NAMESPACE}/serviceaccounts/{name}/token"
                ))
                .header("content-type", "application/json")
                .body(serde_json::to_vec(&body).map_err(|e| e.to_string())?)
                .map_err(|e| e.to_string())?;
                let resp: serde_json::Value = client
                    .request(req)
                    .await
                    .map_err(|e| format!("TokenRequest for {name}: {e}"))?;
                let token = resp["status"]["token"]
                    .as_str()
                    .ok_or_else(|| format!("TokenRequest for {name} returned no token"))?
                    .to_string();
                tokens.lock().unwrap_or_else(|p| p.into_inner())[i] = token;
            }
        }));
    }
    for t in tasks {
        t.await.map_err(|e| e.to_string())??;
    }
    let out = std::mem::take(&mut *tokens.lock().unwrap_or_else(|p| p.into_inner()));
    Ok(out)
}

/// The TokenReviews the API server has served, from its own /metrics.
async fn token_reviews(client: &kube::Client) -> Result<u64, String> {
    let req = http::Request::get("/metrics")
        .body(Vec::new())
        .map_err(|e| e.to_string())?;
    let text = client
        .request_text(req)
        .await
        .map_err(|e| format!("cannot read the API server's /metrics: {e}"))?;
    Ok(text
        .lines()
        .filter(|l| {
            l.starts_with("apiserver_request_total{") && l.contains("resource=\"tokenreviews\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64)
}

/// What the storm's requests came to.
#[derive(Debug, Default)]
struct StormOutcome {
    latencies: Vec<Duration>,
    /// Retryable failures, each retried.
    retries: usize,
    /// Per code, the retryable failures seen.
    retried_codes: std::collections::BTreeMap<String, usize>,
    /// Requests that failed for good: a non-retryable code, or the retries ran out.
    failed: usize,
}

/// Runs the storm against a `serve --dev` child of `citadel` and prints its report.
pub async fn run(plan: StormPlan, citadel: &Path) -> BenchResult {
    if plan.identities == 0 || plan.concurrency == 0 || plan.connections == 0 {
        return Err("--identities, --concurrency and --connections must be positive".into());
    }
    let kube = match (plan.auth, &plan.kubeconfig) {
        (StormAuth::Tokenreview, Some(k)) => Some(citadel::cluster::client(Some(k)).await?),
        (StormAuth::Tokenreview, None) => {
            return Err("--auth tokenreview needs --kubeconfig FILE (the API server that reviews the tokens; scripts/kube-test-env.sh start DIR writes DIR/kubeconfig)".into())
        }
        (StormAuth::Jwks, _) => None,
    };
    let t_prep = Instant::now();
    let tokens = match &kube {
        Some(c) => {
            eprintln!(
                "creating {} service accounts in {STORM_NAMESPACE} and one token each (TokenRequest)...",
                plan.identities
            );
            Some(cluster_tokens(c, plan.identities).await?)
        }
        None => None,
    };
    eprintln!(
        "generating {} {} keys and CSRs{}...",
        plan.identities,
        plan.key_type,
        if tokens.is_none() {
            " and RS256 dev tokens"
        } else {
            ""
        }
    );
    let (n, kt) = (plan.identities, plan.key_type);
    let work =
        tokio::task::spawn_blocking(move || workloads(STORM_NAMESPACE, n, kt, tokens.as_deref()))
            .await
            .map_err(|e| e.to_string())??;
    eprintln!("prepared in {:.1} s", t_prep.elapsed().as_secs_f64());

    let mut extra: Vec<String> = Vec::new();
    if let (StormAuth::Tokenreview, Some(k)) = (plan.auth, &plan.kubeconfig) {
        extra.extend([
            "--auth".into(),
            "tokenreview".into(),
            "--kubeconfig".into(),
            k.display().to_string(),
            "--kube-qps".into(),
            plan.kube_qps.to_string(),
            "--kube-burst".into(),
            plan.kube_burst.to_string(),
        ]);
    }
    let extra_ref: Vec<&str> = extra.iter().map(String::as_str).collect();
    let child = start_server(citadel, &extra_ref).await?;
    let pid = child.proc.id();
    let root_pem = read_file(&child.root, "CA root certificate")?;
    let opts = ConnectOptions {
        addr: child.addr.clone(),
        root_pem,
        ..Default::default()
    };
    let reviews0 = match &kube {
        Some(c) => Some(token_reviews(c).await?),
        None => None,
    };
    let work = Arc::new(work);
    let concurrency = plan.concurrency;
    // The load generator runs on one thread, as in the other modes.
    let load = spawn_load(opts, plan.connections, move |channels| async move {
        Ok(server_cpu(Some(pid), storm(&channels, &work, concurrency)).await)
    });
    let joined = load
        .join()
        .map_err(|_| "the load generator panicked".to_string())?;
    let rss = rss_kib(pid);
    let (mut out, wall, cpu) = joined?;
    let reviews = match (&kube, reviews0) {
        (Some(c), Some(r0)) => Some(token_reviews(c).await?.saturating_sub(r0)),
        _ => None,
    };
    drop(child);
    out.latencies.sort_unstable();
    let ok = out.latencies.len();
    println!(
        "citadel-bench --identities {}: renewal storm, {} auth, {} CSRs, {} streams on {} connections",
        plan.identities,
        match plan.auth {
            StormAuth::Jwks => "local JWKS (RS256)",
            StormAuth::Tokenreview => "TokenReview",
        },
        plan.key_type,
        plan.concurrency,
        plan.connections
    );
    println!(
        "served:                  {ok} of {} in {:.2} s ({:.0} certificates/s)",
        plan.identities,
        wall.as_secs_f64(),
        ok as f64 / wall.as_secs_f64()
    );
    println!(
        "failures:                {} for good; {} retryable, all retried {:?}",
        out.failed, out.retries, out.retried_codes
    );
    println!(
        "latency p50 / p99 / max: {} / {} / {} (each from its first attempt)",
        ms(percentile(&out.latencies, 0.50)),
        ms(percentile(&out.latencies, 0.99)),
        ms(out.latencies.last().copied().unwrap_or_default())
    );
    match cpu {
        Some(cpu) if ok > 0 => println!(
            "server CPU:              {:.2} s = {:.1} µs per certificate",
            cpu.as_secs_f64(),
            cpu.as_secs_f64() * 1e6 / ok as f64
        ),
        _ => println!("server CPU:              unknown"),
    }
    if let Some(r) = rss {
        println!("server RSS at the end:   {:.1} MiB", r as f64 / 1024.0);
    }
    if let Some(r) = reviews {
        println!(
            "TokenReviews served:     {r} (apiserver_request_total{{resource=\"tokenreviews\"}}, the API server's own count; {:.2} per certificate)",
            r as f64 / ok.max(1) as f64
        );
    }
    if out.failed > 0 || ok != plan.identities {
        return Err(format!(
            "{} of {} workloads got no certificate",
            plan.identities - ok,
            plan.identities
        ));
    }
    Ok(())
}

/// Every workload asks once, `concurrency` at a time, retrying what istio-agent retries.
async fn storm(channels: &[CaClient], work: &Arc<Vec<Work>>, concurrency: usize) -> StormOutcome {
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for t in 0..concurrency {
        let mut ch = channels[t % channels.len()].clone();
        let (next, work) = (next.clone(), work.clone());
        tasks.push(tokio::spawn(async move {
            let mut out = StormOutcome::default();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(w) = work.get(i) else {
                    return out;
                };
                let start = Instant::now();
                let mut attempt = 0;
                loop {
                    match client::create_certificate(&mut ch, w.csr.clone(), Some(&w.token), 0)
                        .await
                    {
                        Ok(_) => {
                            out.latencies.push(start.elapsed());
                            break;
                        }
                        Err(client::ClientError::Rpc { code, message })
                            if retryable(code) && attempt < RETRIES =>
                        {
                            if out.retries == 0 {
                                eprintln!("retrying ({code:?}): {message}");
                            }
                            out.retries += 1;
                            *out.retried_codes.entry(format!("{code:?}")).or_default() += 1;
                            attempt += 1;
                            // istio-agent's backoff is exponential from 100 ms.
                            tokio::time::sleep(Duration::from_millis(100 << attempt.min(5))).await;
                        }
                        Err(e) => {
                            if out.failed == 0 {
                                eprintln!("workload {i} failed for good: {e}");
                            }
                            out.failed += 1;
                            break;
                        }
                    }
                }
            }
        }));
    }
    let mut all = StormOutcome::default();
    for t in tasks {
        if let Ok(o) = t.await {
            all.latencies.extend(o.latencies);
            all.retries += o.retries;
            all.failed += o.failed;
            for (k, v) in o.retried_codes {
                *all.retried_codes.entry(k).or_default() += v;
            }
        }
    }
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> StormPlan {
        StormPlan {
            identities: 10,
            concurrency: 4,
            connections: 1,
            key_type: KeyType::EcP256,
            auth: StormAuth::Jwks,
            kubeconfig: None,
            kube_qps: 100.0,
            kube_burst: 100,
        }
    }

    #[tokio::test]
    async fn refuses_empty_storms_and_tokenreview_without_an_api_server() {
        // Refused before any binary is looked at or started.
        let nowhere = Path::new("/nonexistent/citadel");
        let err = run(
            StormPlan {
                identities: 0,
                ..plan()
            },
            nowhere,
        )
        .await
        .unwrap_err();
        assert!(err.contains("must be positive"), "{err}");
        let err = run(
            StormPlan {
                auth: StormAuth::Tokenreview,
                ..plan()
            },
            nowhere,
        )
        .await
        .unwrap_err();
        assert!(err.contains("--kubeconfig"), "{err}");
    }

    #[test]
    fn istio_agent_retries_these_codes_only() {
        use tonic::Code;
        for c in [
            Code::Unavailable,
            Code::DeadlineExceeded,
            Code::ResourceExhausted,
            Code::Aborted,
            Code::Internal,
        ] {
            assert!(retryable(c), "{c:?}");
        }
        for c in [
            Code::Unauthenticated,
            Code::PermissionDenied,
            Code::InvalidArgument,
        ] {
            assert!(!retryable(c), "{c:?}");
        }
    }
}
