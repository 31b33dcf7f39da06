//! Measurements at mesh scale against the REAL kube-apiserver + etcd. Ignored by default
//! (they take minutes); scripts/bench.sh runs them and docs/benchmarks.md quotes them. They
//! print figures and assert only that the work completes.

use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{Api, ListParams, PostParams};

use crate::kube::{leads, ready, replica_in};
use crate::support::*;

/// `apiserver_request_total` for one resource, summed per verb, from the API server's own
/// /metrics (a third-party count of what citadel asked for).
async fn requests_by_verb(
    kube: &KubeEnv,
    resource: &str,
) -> std::collections::BTreeMap<String, u64> {
    let req = http::Request::get("/metrics").body(Vec::new()).unwrap();
    let text = kube.client.request_text(req).await.unwrap();
    let mut out = std::collections::BTreeMap::new();
    let want = format!("resource=\"{resource}\"");
    for l in text
        .lines()
        .filter(|l| l.starts_with("apiserver_request_total{") && l.contains(&want))
    {
        let verb = l
            .split("verb=\"")
            .nth(1)
            .and_then(|v| v.split('"').next())
            .unwrap_or("?")
            .to_string();
        let n = l
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
        *out.entry(verb).or_default() += n as u64;
    }
    out
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// How many of the `fan-*` namespaces hold a bundle with `roots` roots: one LIST of the
/// bundle ConfigMaps across all namespaces.
async fn holding(kube: &KubeEnv, roots: usize) -> usize {
    let cms: Api<ConfigMap> = Api::all(kube.client.clone());
    let list = cms
        .list(&ListParams::default().fields("metadata.name=istio-ca-root-cert"))
        .await
        .unwrap();
    list.items
        .iter()
        .filter(|c| {
            c.metadata
                .namespace
                .as_deref()
                .is_some_and(|n| n.starts_with("fan-"))
        })
        .filter(|c| {
            c.data
                .as_ref()
                .and_then(|d| d.get("root-cert.pem"))
                .is_some_and(|b| b.matches("BEGIN CERTIFICATE").count() == roots)
        })
        .count()
}

/// The trust bundle's fan-out: 1,000 namespaces (CITADEL_FANOUT_NAMESPACES overrides), one
/// `citadel serve --store kube` leader; the time from a root rotation's prepare step (the
/// `citadel ca rotate-root` command returning) until every namespace holds the two-root
/// bundle, the ConfigMap writes the API server counted, and the leader's RSS.
///
/// `CI=true scripts/test.sh -- --test it -- scale::bundle_fan_out -- --ignored --nocapture`
#[tokio::test]
#[ignore = "a measurement: 1,000 namespaces take a minute or two to create"]
async fn bundle_fan_out_to_1000_namespaces() {
    let Some(kube) = KubeEnv::start().await else {
        return;
    };
    let n: usize = std::env::var("CITADEL_FANOUT_NAMESPACES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    kube.namespace("citadel").await;
    let t0 = Instant::now();
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(32));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let (client, sem) = (kube.client.clone(), sem.clone());
        tasks.spawn(async move {
            let _p = sem.acquire().await.unwrap();
            let mut ns = Namespace::default();
            ns.metadata.name = Some(format!("fan-{i}"));
            Api::<Namespace>::all(client)
                .create(&PostParams::default(), &ns)
                .await
                .unwrap();
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    eprintln!("created {n} namespaces in {:.1?}", t0.elapsed());

    let leader = replica_in(&kube, "fan-leader", "citadel");
    eventually("the replica is ready and leads", 60, async || {
        ready(&leader).await && leads(&leader).await
    })
    .await;
    let t_first = Instant::now();
    eventually("the first bundle in every namespace", 600, async || {
        holding(&kube, 1).await == n
    })
    .await;
    eprintln!(
        "first publication complete {:.1?} after the leader was ready",
        t_first.elapsed()
    );
    let pid = leader.child.id();
    let rss_before = rss_kib(pid);
    let before = requests_by_verb(&kube, "configmaps").await;

    let t0 = Instant::now();
    let out = Command::new(BIN)
        .args([
            "ca",
            "rotate-root",
            "--activate-after",
            "1h",
            "--retire-after",
            "2h",
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
    let prepared = t0.elapsed();
    let mut last = 0;
    while last < n {
        assert!(
            t0.elapsed() < Duration::from_secs(600),
            "after 600 s only {last} of {n} namespaces hold the two-root bundle"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        last = holding(&kube, 2).await;
    }
    let all = t0.elapsed();
    let after = requests_by_verb(&kube, "configmaps").await;
    let rss_after = rss_kib(pid);
    let delta: std::collections::BTreeMap<_, _> = after
        .iter()
        .map(|(v, c)| (v.clone(), c - before.get(v).copied().unwrap_or(0)))
        .filter(|(_, c)| *c > 0)
        .collect();
    eprintln!(
        "BENCH bundle fan-out: {n} namespaces; rotate-root (prepare) returned in {:.2} s; every namespace held the new bundle {:.2} s after it started (target < 30 s); ConfigMap requests by verb during it {delta:?} (LIST/WATCH include this test's polling, one LIST per 100 ms); leader RSS {:.1} MiB before, {:.1} MiB after",
        prepared.as_secs_f64(),
        all.as_secs_f64(),
        rss_before as f64 / 1024.0,
        rss_after as f64 / 1024.0,
    );
    drop(leader);
}
