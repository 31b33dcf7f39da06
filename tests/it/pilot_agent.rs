//! Istio's own sidecar agent against citadel: `pilot-agent` (built from the Go module proxy by
//! scripts/istio-agent.sh) runs as the sidecar injector would run it, authenticates with a
//! pod-bound token from a real kube-apiserver (TokenReview), and serves `default` and
//! `ROOTCA` over its SDS socket to a real Envoy. That Envoy does mTLS in both directions with
//! a second Envoy fed by `citadel agent`, while pilot-agent renews short leaves, the
//! intermediate rotates and the root rotates through every stage: no request may fail. Every
//! certificate pilot-agent obtained must be in citadel's audit log with the pod's name, and
//! go-spiffe must accept it against every bundle a peer may have held meanwhile.
//! How pilot-agent is run without istiod: docs/istio-agent.md.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};

use crate::envoy::{
    backend, envoy_binary, rotate_root_to_completion, sds_cluster, spawn_agent_with, stat,
    tls_context, wait_for_intermediate_rotation, wait_ready, Procs,
};
use crate::support::*;

const NS: &str = "shop";
const POD: &str = "cart-7c9d5b8f4-q2x7m";

/// pilot-agent: $CITADEL_PILOT_AGENT (scripts/test.sh exports it), or the binary that
/// scripts/istio-agent.sh caches. None skips; under CI=true a missing one fails.
fn pilot_agent_binary() -> Option<PathBuf> {
    istio_binary("pilot-agent", "CITADEL_PILOT_AGENT", "ensure")
}

/// An Istio binary `name` built by scripts/istio-agent.sh (`target` builds it): `$env`, or the
/// cached build of the pinned version. None skips; under CI=true a missing one fails.
pub(crate) fn istio_binary(name: &str, env: &str, target: &str) -> Option<PathBuf> {
    let mut candidates = vec![];
    if let Some(p) = std::env::var_os(env) {
        candidates.push(PathBuf::from(p));
    }
    if let Ok(out) = Command::new("scripts/istio-agent.sh")
        .arg("version")
        .output()
    {
        let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let cache = std::env::var_os("CITADEL_CACHE")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/citadel")));
        if let (false, Some(cache)) = (version.is_empty(), cache) {
            candidates.push(cache.join(format!("{name}-{version}/{name}")));
        }
    }
    if let Some(found) = candidates.into_iter().find(|c| c.is_file()) {
        return Some(found);
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{name} is required under CI=true; run scripts/test.sh (scripts/istio-agent.sh {target})"
    );
    eprintln!("SKIPPED: {name} not built (run scripts/istio-agent.sh {target})");
    None
}

/// A Pod object for the service account (never scheduled: there is no kubelet), so that a
/// token can be bound to it and carry its name and UID. Returns the UID.
pub(crate) async fn create_pod(kube: &KubeEnv, ns: &str, name: &str, sa: &str) -> String {
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": sa}},
        "spec": {
            "serviceAccountName": sa,
            "automountServiceAccountToken": false,
            "containers": [{"name": "app", "image": "registry.invalid/app:1"}]
        }
    }))
    .unwrap();
    let pods: Api<Pod> = Api::namespaced(kube.client.clone(), ns);
    let created = pods.create(&PostParams::default(), &pod).await.unwrap();
    created.metadata.uid.expect("a pod UID")
}

/// `citadel serve` as a process (its JSON log is the audit trail we read), authenticating
/// tokens with TokenReview against the test cluster; 10s leaves, 40s intermediates.
fn serve(kube: &KubeEnv, dir: &Path) -> (Child, SocketAddr, SocketAddr, PathBuf, PathBuf) {
    let (addr, metrics) = (
        SocketAddr::from(([127, 0, 0, 1], free_port())),
        SocketAddr::from(([127, 0, 0, 1], free_port())),
    );
    let (state, log) = (dir.join("state"), dir.join("citadel.log"));
    let child = Command::new(BIN)
        .args(["--log-format", "json", "serve", "--auth", "tokenreview"])
        .arg("--kubeconfig")
        .arg(&kube.kubeconfig)
        .arg("--state-dir")
        .arg(&state)
        .args([
            "--listen",
            &addr.to_string(),
            "--metrics-listen",
            &metrics.to_string(),
            // The names pilot-agent and citadel agent check on the serving certificate.
            "--server-dns-name",
            "istiod.istio-system.svc",
            "--server-dns-name",
            "localhost",
            "--server-dns-name",
            "127.0.0.1",
            "--default-ttl",
            "10s",
            "--max-ttl",
            "12s",
            "--intermediate-ttl",
            "40s",
            "--reconcile-interval",
            "200ms",
            "--crl-validity",
            "1m",
            "--clock-skew-margin",
            "1s",
        ])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    (child, addr, metrics, state, log)
}

/// One Envoy with both sides of a sidecar: `inbound` terminates mTLS requiring `peer` and
/// forwards to `backend`; `outbound` takes plain HTTP and originates mTLS to `upstream`
/// requiring `peer`, one request per connection (every request is a fresh handshake).
/// Both take `default` and `ROOTCA` from the SDS server on `sock`.
#[allow(clippy::too_many_arguments)]
fn sidecar_envoy(
    id: &str,
    admin: u16,
    inbound: u16,
    backend: u16,
    outbound: u16,
    upstream: u16,
    sock: &Path,
    peer: &str,
) -> String {
    let hcm = |prefix: &str, cluster: &str| {
        format!(
            r#"{{name: envoy.filters.network.http_connection_manager, typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager, stat_prefix: {prefix}, route_config: {{virtual_hosts: [{{name: all, domains: ["*"], routes: [{{match: {{prefix: "/"}}, route: {{cluster: {cluster}}}}}]}}]}}, http_filters: [{{name: envoy.filters.http.router, typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}}}]}}}}"#
        )
    };
    let endpoint = |name: &str, port: u16| {
        format!(
            r#"{{cluster_name: {name}, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}}}}}]}}]}}"#
        )
    };
    format!(
        r#"node: {{id: {id}, cluster: {id}}}
admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}}}
static_resources:
  listeners:
  - name: inbound
    address: {{socket_address: {{address: 127.0.0.1, port_value: {inbound}}}}}
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true
          {tls_in}
      filters:
      - {hcm_in}
  - name: outbound
    address: {{socket_address: {{address: 127.0.0.1, port_value: {outbound}}}}}
    filter_chains:
    - filters:
      - {hcm_out}
  clusters:
  - name: backend
    type: STATIC
    load_assignment: {backend_ep}
  - name: peer
    type: STATIC
    connect_timeout: 2s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        common_http_protocol_options: {{max_requests_per_connection: 1}}
        explicit_http_config: {{http_protocol_options: {{}}}}
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        {tls_out}
    load_assignment: {peer_ep}{sds}
"#,
        tls_in = tls_context(peer),
        tls_out = tls_context(peer).replace("\n            ", "\n          "),
        hcm_in = hcm("inbound", "backend"),
        hcm_out = hcm("outbound", "peer"),
        backend_ep = endpoint("backend", backend),
        peer_ep = endpoint("peer", upstream),
        sds = sds_cluster(sock),
    )
}

/// Writes `data` to `path` atomically (rename), as kubelet swaps a projected volume.
fn write_atomic(path: &Path, data: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, data).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// pilot-agent and the Envoy it starts live in one process group, killed together.
pub(crate) struct Group(pub(crate) Child);

impl Drop for Group {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.0.id())])
            .status();
        let _ = self.0.wait();
    }
}

/// The serial of the first certificate in a PEM chain.
fn leaf_serial(chain_pem: &str) -> Option<String> {
    let certs = citadel::pki::pem::parse_certs(chain_pem.as_bytes()).ok()?;
    Some(
        citadel::pki::chain::describe(certs.first()?)
            .ok()?
            .serial_hex,
    )
}

/// What the sampler saw of pilot-agent's certificates and of citadel's published bundle.
#[derive(Default)]
struct Seen {
    /// chain PEM -> (first seen, last seen), Unix seconds.
    chains: BTreeMap<String, (f64, f64)>,
    /// bundle PEM -> (first seen, last seen).
    bundles: BTreeMap<String, (f64, f64)>,
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

fn note(map: &mut BTreeMap<String, (f64, f64)>, key: String, t: f64) {
    map.entry(key).and_modify(|e| e.1 = t).or_insert((t, t));
}

/// One traffic loop: GETs through `port` every 20 ms until `stop`, counted.
fn load(
    port: u16,
    stop: Arc<AtomicBool>,
    what: &'static str,
) -> tokio::task::JoinHandle<(u64, u64)> {
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    tokio::spawn(async move {
        let (mut ok, mut failed) = (0, 0);
        while !stop.load(Ordering::Relaxed) {
            match http_get(addr, "/").await {
                Ok((200, _)) => ok += 1,
                other => {
                    eprintln!("{what}: request failed: {other:?}");
                    failed += 1
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        (ok, failed)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_pilot_agent_gets_certificates_from_citadel_through_renewal_and_rotation() {
    let Some(envoy) = envoy_binary() else { return };
    let Some(pilot_agent) = pilot_agent_binary() else {
        return;
    };
    let gospiffe = crate::thirdparty::gospiffe();
    let version = Command::new(&pilot_agent).arg("version").output().unwrap();
    eprintln!(
        "pilot-agent {}: {}",
        pilot_agent.display(),
        String::from_utf8_lossy(&version.stdout).trim()
    );
    let Some(kube) = KubeEnv::start().await else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();

    // The cluster: the cart pod (pilot-agent) and the frontend (citadel agent).
    kube.service_account(NS, "cart").await;
    kube.service_account(NS, "frontend").await;
    let pod_uid = create_pod(&kube, NS, POD, "cart").await;
    let cart_token = kube.pod_token(NS, "cart", POD, &pod_uid).await;
    let front_uid = create_pod(&kube, NS, "frontend-0", "frontend").await;
    let front_token = kube
        .pod_token(NS, "frontend", "frontend-0", &front_uid)
        .await;

    // citadel, TokenReview against that cluster.
    let (citadel, ca_addr, ca_metrics, state, citadel_log) = serve(&kube, &dir);
    let mut procs = Procs(vec![citadel]);
    let t0 = Instant::now();
    while !matches!(http_get(ca_metrics, "/healthz/ready").await, Ok((200, _))) {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "citadel did not become ready: {}",
            std::fs::read_to_string(&citadel_log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The pod's filesystem, relative to pilot-agent's working directory.
    let pod_dir = dir.join("cart-pod");
    let token_file = pod_dir.join("var/run/secrets/tokens/istio-token");
    let root_file = pod_dir.join("var/run/secrets/istio/root-cert.pem");
    let sds_sock = pod_dir.join("var/run/secrets/workload-spiffe-uds/socket");
    let out_dir = pod_dir.join("out");
    for d in [
        token_file.parent().unwrap(),
        root_file.parent().unwrap(),
        sds_sock.parent().unwrap(),
        &pod_dir.join("etc/istio/proxy"),
        &out_dir,
    ] {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::write(&token_file, &cart_token).unwrap();
    std::fs::write(
        &root_file,
        std::fs::read(state.join("root-cert.pem")).unwrap(),
    )
    .unwrap();

    let backend = backend().await;
    let cart_id = spiffe(NS, "cart").to_string();
    let front_id = spiffe(NS, "frontend").to_string();
    let [cart_admin, cart_in, cart_out, front_admin, front_in, front_out, status, dead] =
        std::array::from_fn(|_| free_port());

    // Envoy #1, started by pilot-agent itself (a custom bootstrap instead of istiod's xDS).
    let bootstrap = pod_dir.join("envoy.yaml");
    std::fs::write(
        &bootstrap,
        sidecar_envoy(
            "cart", cart_admin, cart_in, backend, cart_out, front_in, &sds_sock, &front_id,
        ),
    )
    .unwrap();
    let proxy_config = format!(
        "{{binaryPath: {envoy}, customConfigFile: {bootstrap}, proxyAdminPort: {cart_admin}, \
         statusPort: {status}, discoveryAddress: '127.0.0.1:{dead}', concurrency: 1, \
         drainDuration: 1s, terminationDrainDuration: 1s}}",
        envoy = envoy.display(),
        bootstrap = bootstrap.display(),
    );
    let agent_log = dir.join("pilot-agent.log");
    let mut cmd = Command::new(&pilot_agent);
    cmd.args(["proxy", "sidecar", "--proxyLogLevel", "warning"])
        .current_dir(&pod_dir)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        // What the sidecar injector sets on istio-proxy.
        .env("CA_ADDR", ca_addr.to_string())
        .env("PILOT_CERT_PROVIDER", "istiod")
        .env("JWT_POLICY", "third-party-jwt")
        .env("ISTIO_META_CLUSTER_ID", "Kubernetes")
        .env("POD_NAME", POD)
        .env("POD_NAMESPACE", NS)
        .env("SERVICE_ACCOUNT", "cart")
        .env("INSTANCE_IP", "127.0.0.1")
        .env("PROXY_CONFIG", &proxy_config)
        // Short leaves, so that it renews during the test.
        .env("SECRET_TTL", "10s")
        // A copy of what it serves over SDS, for the audit and go-spiffe checks.
        .env("OUTPUT_CERTS", &out_dir)
        .stdout(std::fs::File::create(&agent_log).unwrap())
        .stderr(std::fs::File::create(dir.join("pilot-agent.stderr")).unwrap());
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let agent = Group(cmd.spawn().expect("start pilot-agent"));

    // Envoy #2, fed by `citadel agent` over SDS, with the frontend's pod-bound token.
    let front_token_file = dir.join("frontend.jwt");
    std::fs::write(&front_token_file, &front_token).unwrap();
    let (front_agent, front_sock) =
        spawn_agent_with(&dir, ca_addr, &state, "frontend", &front_token_file);
    procs.0.push(front_agent);
    procs.0.push(crate::envoy::spawn_envoy(
        &envoy,
        &dir,
        "frontend-envoy",
        &sidecar_envoy(
            "frontend",
            front_admin,
            front_in,
            backend,
            front_out,
            cart_in,
            &front_sock,
            &cart_id,
        ),
        std::process::id() % 1000 * 10 + 5,
    ));

    // kubelet's part: the istio-ca-root-cert ConfigMap follows citadel's bundle. And a
    // sampler of what pilot-agent holds and what citadel publishes.
    let seen = Arc::new(Mutex::new(Seen::default()));
    let stop_sync = Arc::new(AtomicBool::new(false));
    let sync = tokio::spawn({
        let (seen, stop, state, root_file, out_dir) = (
            seen.clone(),
            stop_sync.clone(),
            state.clone(),
            root_file.clone(),
            out_dir.clone(),
        );
        async move {
            while !stop.load(Ordering::Relaxed) {
                let t = unix_now();
                if let Ok(bundle) = std::fs::read(state.join("root-cert.pem")) {
                    if std::fs::read(&root_file).ok().as_ref() != Some(&bundle) {
                        write_atomic(&root_file, &bundle);
                    }
                    note(
                        &mut seen.lock().unwrap().bundles,
                        String::from_utf8(bundle).unwrap(),
                        t,
                    );
                }
                if let Ok(chain) = std::fs::read_to_string(out_dir.join("cert-chain.pem")) {
                    if leaf_serial(&chain).is_some() {
                        note(&mut seen.lock().unwrap().chains, chain, t);
                    }
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    });

    wait_ready(cart_admin, "pilot-agent's envoy", &dir).await;
    wait_ready(front_admin, "frontend envoy", &dir).await;
    for (port, what) in [
        (cart_out, "cart -> frontend"),
        (front_out, "frontend -> cart"),
    ] {
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let t0 = Instant::now();
        loop {
            match http_get(addr, "/").await {
                Ok((200, body)) if body == "ok" => break,
                other => assert!(
                    t0.elapsed() < Duration::from_secs(20),
                    "first request {what}: {other:?}; logs in {}",
                    dir.display()
                ),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    // Continuous traffic both ways.
    let stop = Arc::new(AtomicBool::new(false));
    let loads = [
        load(cart_out, stop.clone(), "cart -> frontend"),
        load(front_out, stop.clone(), "frontend -> cart"),
    ];

    // 1. The intermediate rotates on its own (prepared at 20s, active at ~33s).
    wait_for_intermediate_rotation(&state).await;
    tokio::time::sleep(Duration::from_secs(8)).await;

    // 2. A staged root rotation, driven by the CLI on the file store. Propagation and
    // retirement periods of one full leaf lifetime (12s), as an operator would choose them,
    // so that even a peer that never renewed holds a bundle that verifies every chain.
    rotate_root_to_completion(&state, "12s", 90).await;
    // Renewals under the new-only bundle.
    tokio::time::sleep(Duration::from_secs(8)).await;
    stop.store(true, Ordering::Relaxed);
    let (mut ok, mut failed) = (vec![], vec![]);
    for l in loads {
        let (o, f) = l.await.unwrap();
        ok.push(o);
        failed.push(f);
    }
    stop_sync.store(true, Ordering::Relaxed);
    sync.await.unwrap();

    // What pilot-agent did, from its own log.
    let log = std::fs::read_to_string(&agent_log).unwrap()
        + &std::fs::read_to_string(dir.join("pilot-agent.stderr")).unwrap();
    let generated = log.matches("generated new workload certificate").count();
    let sign_failures = log.matches("failed to sign").count();
    let handshakes = (
        stat(cart_admin, "handshake").await,
        stat(front_admin, "handshake").await,
    );
    eprintln!(
        "pilot-agent: {generated} certificates from citadel ({} renewals), {sign_failures} failed CSR calls",
        generated.saturating_sub(1)
    );
    eprintln!(
        "through {} renewals, an intermediate and a root rotation: cart -> frontend {} ok / {} failed, \
         frontend -> cart {} ok / {} failed; inbound handshakes: cart {}, frontend {}",
        generated.saturating_sub(1),
        ok[0],
        failed[0],
        ok[1],
        failed[1],
        handshakes.0,
        handshakes.1
    );
    if failed.iter().sum::<u64>() > 0 || generated < 3 {
        std::mem::forget(tmp); // keep the logs
    }
    assert_eq!(
        failed,
        vec![0, 0],
        "requests failed; logs in {}",
        dir.display()
    );
    assert!(
        ok.iter().all(|&o| o > 200),
        "too few requests were sent: {ok:?}"
    );
    assert!(
        generated >= 3,
        "pilot-agent renewed at least twice ({generated} certificates); logs in {}",
        dir.display()
    );

    // Every certificate pilot-agent obtained is in citadel's audit log, with the pod's name
    // (from the TokenReview of its pod-bound token).
    let audit: Vec<serde_json::Value> = std::fs::read_to_string(&citadel_log)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["event"] == "certificate_issued")
        .collect();
    let for_cart: Vec<&serde_json::Value> = audit
        .iter()
        .filter(|v| v["identity"] == cart_id.as_str())
        .collect();
    assert_eq!(
        for_cart.len(),
        generated,
        "one audit line per certificate pilot-agent received"
    );
    for v in &for_cart {
        assert_eq!(v["pod"], POD, "audit line without the pod name: {v}");
        assert_eq!(v["auth"], "tokenreview", "{v}");
    }
    let seen = seen.lock().unwrap();
    let serials: std::collections::BTreeSet<String> = for_cart
        .iter()
        .filter_map(|v| v["serial"].as_str().map(str::to_lowercase))
        .collect();
    for chain in seen.chains.keys() {
        let serial = leaf_serial(chain).unwrap().to_lowercase();
        assert!(
            serials.contains(&serial),
            "pilot-agent's certificate {serial} is not in the audit log"
        );
    }
    eprintln!(
        "audit: {} lines for {cart_id}, all with pod={POD}; {} distinct chains sampled from pilot-agent, {} bundles published",
        for_cart.len(),
        seen.chains.len(),
        seen.bundles.len()
    );
    assert!(seen.bundles.len() >= 3, "old, transitional and new bundles");

    // go-spiffe accepts each of pilot-agent's chains against every bundle a peer may have
    // held while it was in use (published from one leaf lifetime before it appeared until
    // it was replaced), and rejects it for another identity.
    if let Some(gs) = gospiffe {
        let mut checks = 0;
        for (chain, (first, last)) in &seen.chains {
            for (bundle, (b_first, b_last)) in &seen.bundles {
                if *b_last < first - 12.0 || b_first > last {
                    continue;
                }
                // At an instant when the chain was in use (leaves live 10s: "now" is too late).
                let at = b_first.clamp(*first, *last) as i64;
                crate::thirdparty::gospiffe_verify(&gs, chain, bundle, &cart_id, Some(at))
                    .unwrap_or_else(|e| {
                        panic!("go-spiffe rejected pilot-agent's chain seen {first:.1}..{last:.1} against the bundle published {b_first:.1}..{b_last:.1}: {e}")
                    });
                checks += 1;
                // The same chain, bundle and instant, for the wrong identity: refused.
                let err =
                    crate::thirdparty::gospiffe_verify(&gs, chain, bundle, &front_id, Some(at))
                        .expect_err("go-spiffe accepted the cart's certificate as the frontend");
                assert!(err.contains("expected"), "{err}");
            }
        }
        eprintln!("go-spiffe: {checks} chain x bundle checks passed");
        assert!(checks > seen.chains.len());
    }
    drop(agent);
    drop(procs);
}
