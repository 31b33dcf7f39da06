//! A plugged-in CA that changes while serving (issue #10 §4): `--ca-certs-dir` laid out as
//! Kubernetes mounts a Secret (files are symlinks through `..data`, swapped atomically) and
//! the `cacerts` Secret on a real API server. Clients call throughout; not one request may
//! fail. Bad material is refused, naming the file, and the old CA keeps signing. The old
//! root's overlap in the bundle ends by moving a ManualClock, never by sleeping.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use citadel::pki::KeyType;
use kube::api::{Api, PostParams};

use crate::support::wait::{events_about, wait_event, wait_events};
use crate::support::*;
use crate::thirdparty::make_cacerts;

const FILES: [&str; 4] = [
    "ca-cert.pem",
    "ca-key.pem",
    "cert-chain.pem",
    "root-cert.pem",
];

fn sh(dir: &Path, script: &str) {
    let out = Command::new("sh")
        .arg("-ec")
        .arg(script)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A script that re-signs the intermediate of a `material` directory with extensions `ext`
/// (openssl extfile lines) besides CA:true, and rebuilds its cert-chain.pem.
fn resign_int(ext: &str) -> String {
    format!(
        "printf 'basicConstraints=critical,CA:true,pathlen:0\\n{ext}\\n' > bad.cnf
         openssl x509 -req -in ca.csr -CA root-cert.pem -CAkey root-key.pem -CAcreateserial \
           -out ca-cert.pem -days 30 -extfile bad.cnf 2>/dev/null
         cat ca-cert.pem root-cert.pem > cert-chain.pem"
    )
}

/// A new cacerts set (new root, new intermediate) in `base/name`.
fn material(base: &Path, name: &str) -> PathBuf {
    let d = base.join(name);
    std::fs::create_dir_all(&d).unwrap();
    make_cacerts(
        &d,
        "openssl ecparam -name prime256v1 -genkey -noout -out ca-key.pem",
    );
    d
}

/// `good` with one thing broken, as an operator might get it wrong.
fn broken(base: &Path, good: &Path, name: &str, script: &str) -> PathBuf {
    let d = base.join(name);
    sh(base, &format!("cp -r {} {}", good.display(), d.display()));
    sh(&d, script);
    d
}

/// The directory the server watches, laid out like a kubelet-mounted Secret: each file is a
/// symlink to `..data/<file>`, and `..data` a symlink to the current version's directory.
fn mount(base: &Path, first: &Path) -> PathBuf {
    let m = base.join("mounted");
    std::fs::create_dir(&m).unwrap();
    std::os::unix::fs::symlink(first, m.join("..data")).unwrap();
    for f in FILES {
        std::os::unix::fs::symlink(format!("..data/{f}"), m.join(f)).unwrap();
    }
    m
}

/// Swaps the mounted version atomically, as the kubelet does (new symlink, rename over).
fn swap(mounted: &Path, to: &Path) {
    let tmp = mounted.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(to, &tmp).unwrap();
    std::fs::rename(&tmp, mounted.join("..data")).unwrap();
}

fn read(dir: &Path, f: &str) -> String {
    std::fs::read_to_string(dir.join(f)).unwrap()
}

fn metric(text: &str, line: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(line)?.trim().parse().ok())
        .unwrap_or(0)
}

/// `openssl verify` of `chain` (leaf, intermediates..., bundle) against `bundle` alone.
fn verifies(dir: &Path, chain: &[String], bundle: &str) -> bool {
    std::fs::write(dir.join("v-leaf.pem"), &chain[0]).unwrap();
    std::fs::write(dir.join("v-int.pem"), chain[1..chain.len() - 1].concat()).unwrap();
    std::fs::write(dir.join("v-bundle.pem"), bundle).unwrap();
    Command::new("openssl")
        .args([
            "verify",
            "-CAfile",
            "v-bundle.pem",
            "-untrusted",
            "v-int.pem",
            "v-leaf.pem",
        ])
        .current_dir(dir)
        .output()
        .unwrap()
        .status
        .success()
}

/// Clients calling concurrently until stopped; every chain they got, and every failure.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    last: Arc<Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(clients: Vec<citadel::client::CaClient>) -> Self {
        let l = Load {
            stop: Arc::default(),
            ok: Arc::default(),
            failures: Arc::default(),
            last: Arc::default(),
            tasks: vec![],
        };
        let tasks = clients
            .into_iter()
            .enumerate()
            .map(|(i, mut c)| {
                let (stop, ok, failures, last) = (
                    l.stop.clone(),
                    l.ok.clone(),
                    l.failures.clone(),
                    l.last.clone(),
                );
                tokio::spawn(async move {
                    let sa = format!("caller-{i}");
                    let (_, csr) = csr_for(KeyType::EcP256, &spiffe("shop", &sa));
                    let t = bearer(&token("shop", &sa));
                    while !stop.load(Ordering::Relaxed) {
                        match call(&mut c, &csr, Some(&t), 0, None).await {
                            Ok(chain) => {
                                ok.fetch_add(1, Ordering::Relaxed);
                                *last.lock().unwrap() = chain;
                            }
                            Err(e) => failures.lock().unwrap().push(e.to_string()),
                        }
                    }
                })
            })
            .collect();
        Load { tasks, ..l }
    }

    fn last(&self) -> Vec<String> {
        self.last.lock().unwrap().clone()
    }

    /// Waits until `n` more certificates have come back: the load is under way (before a
    /// swap) or has gone on past it (after), counted rather than slept for.
    async fn served(&self, n: u64) {
        let from = self.ok.load(Ordering::Relaxed);
        eventually(
            &format!("{n} more certificates under load"),
            20,
            async || self.ok.load(Ordering::Relaxed) >= from + n,
        )
        .await;
    }

    async fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        let failures = self.failures.lock().unwrap().clone();
        assert!(failures.is_empty(), "failed requests: {failures:?}");
        self.ok.load(Ordering::Relaxed)
    }
}

/// Log lines of the tasks on this (current-thread) runtime, for asserting what an operator
/// reads.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
    fn capture(&self) -> tracing::subscriber::DefaultGuard {
        let me = self.clone();
        tracing::subscriber::set_default(
            tracing_subscriber::fmt()
                .with_writer(move || me.clone())
                .with_ansi(false)
                .with_max_level(tracing::Level::INFO)
                .finish(),
        )
    }
}

#[tokio::test]
async fn a_ca_certs_dir_swap_while_clients_call_fails_no_request() {
    if !require_tool("openssl") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path();
    let (v1, v2) = (material(base, "v1"), material(base, "v2"));
    let mounted = mount(base, &v1);
    let ca = TestCa::start_in(
        base,
        &[
            "--ca-certs-dir",
            mounted.to_str().unwrap(),
            "--ca-certs-poll-interval",
            "200ms",
        ],
    )
    .await;
    let old_root = read(&v1, "root-cert.pem");
    let mut clients = vec![];
    for _ in 0..4 {
        clients.push(ca.client().await);
    }
    let mut c = ca.client().await;
    let (_, csr) = csr_for(KeyType::EcP256, &spiffe("shop", "cart"));
    let old_chain = issue(&mut c, &csr, "shop", "cart").await;
    assert_eq!(old_chain[1].trim(), read(&v1, "ca-cert.pem").trim());

    let load = Load::start(clients);
    load.served(20).await;
    swap(&mounted, &v2);
    let new_int = read(&v2, "ca-cert.pem");
    eventually(
        "the clients get certificates from the new CA",
        20,
        async || load.last().get(1).map(|c| c.trim()) == Some(new_int.trim()),
    )
    .await;
    load.served(20).await;
    let new_chain = load.last();
    let calls = load.finish().await;
    assert!(calls >= 20, "only {calls} calls");
    eprintln!("--ca-certs-dir swap: {calls} calls from 4 concurrent clients, 0 failed");

    // The new leaves chain to the new root alone; the bundle holds both roots.
    let new_root = read(&v2, "root-cert.pem");
    assert!(
        verifies(base, &new_chain, &new_root),
        "new leaf under new root"
    );
    let bundle = String::from_utf8(ca.root_pem()).unwrap();
    assert!(
        bundle.contains(new_root.trim()) && bundle.contains(old_root.trim()),
        "{bundle}"
    );
    assert_eq!(
        new_chain.last().unwrap(),
        &bundle,
        "responses carry both roots"
    );
    // A leaf of the old chain still verifies against the served bundle.
    assert!(
        verifies(base, &old_chain, &bundle),
        "old leaf under the served bundle"
    );
    let m = ca.metrics().await;
    assert_eq!(
        metric(&m, "citadel_ca_plugged_reload_total{result=\"installed\"}"),
        1,
        "{m}"
    );
    assert_eq!(
        metric(&m, "citadel_ca_plugged_reload_total{result=\"refused\"}"),
        0,
        "{m}"
    );
    // The overlap is recorded in the state directory before it takes effect.
    let rec = std::fs::read_to_string(ca.state_dir().join("plugged-previous-roots.json")).unwrap();
    assert!(rec.contains("BEGIN CERTIFICATE"), "{rec}");
    assert_eq!(
        file_mode(&ca.state_dir().join("plugged-previous-roots.json")),
        0o600
    );
    ca.stop().await;
}

#[tokio::test]
async fn bad_ca_certs_dir_swaps_are_refused_and_the_old_ca_keeps_signing() {
    if !require_tool("openssl") {
        return;
    }
    let logs = Logs::default();
    let _guard = logs.capture();
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path();
    let (v1, v2) = (material(base, "v1"), material(base, "v2"));
    let bad = [
        (
            broken(base, &v2, "wrongkey", "openssl ecparam -name prime256v1 -genkey -noout -out ca-key.pem"),
            "ca-key.pem",
            "does not match",
        ),
        (
            broken(base, &v2, "notca", "cp root-key.pem ca-key.pem; openssl req -new -key ca-key.pem -subj /CN=leaf -out l.csr 2>/dev/null; \
                printf 'basicConstraints=CA:false\\n' > leaf.cnf; \
                openssl x509 -req -in l.csr -CA root-cert.pem -CAkey root-key.pem -CAcreateserial -out ca-cert.pem -days 10 -extfile leaf.cnf 2>/dev/null"),
            "ca-cert.pem",
            "not a CA",
        ),
        (
            broken(base, &v2, "brokenchain", &format!("cp {} root-cert.pem", v1.join("root-cert.pem").display())),
            "root-cert.pem",
            "does not chain",
        ),
        (
            broken(base, &v2, "garbage", "echo nonsense > ca-cert.pem"),
            "ca-cert.pem",
            "CERTIFICATE",
        ),
        // Structurally fine, but nobody would accept what it signs (issue #20 M7).
        (
            broken(base, &v2, "nocertsign", &resign_int("keyUsage=critical,digitalSignature,cRLSign")),
            "ca-cert.pem",
            "keyUsage without keyCertSign",
        ),
        (
            broken(base, &v2, "dnsonly", &resign_int("keyUsage=critical,keyCertSign,cRLSign\nnameConstraints=critical,permitted;DNS:example.com")),
            "ca-cert.pem",
            "permitting only non-URI names",
        ),
        (
            broken(base, &v2, "urinc", &resign_int("keyUsage=critical,keyCertSign,cRLSign\nnameConstraints=critical,excluded;URI:evil.example")),
            "ca-cert.pem",
            "URI nameConstraints",
        ),
    ];
    let mounted = mount(base, &v1);
    let ca = TestCa::start_in(
        base,
        &[
            "--ca-certs-dir",
            mounted.to_str().unwrap(),
            "--ca-certs-poll-interval",
            "100ms",
        ],
    )
    .await;
    let load = Load::start(vec![ca.client().await, ca.client().await]);
    let old_int = read(&v1, "ca-cert.pem");
    for (i, (dir, file, says)) in bad.iter().enumerate() {
        swap(&mounted, dir);
        eventually(&format!("{} refused", dir.display()), 20, async || {
            metric(
                &ca.metrics().await,
                "citadel_ca_plugged_reload_total{result=\"refused\"}",
            ) == i as u64 + 1
        })
        .await;
        let text = logs.text();
        let line = text
            .lines()
            .rfind(|l| l.contains("plugged-in CA change refused"))
            .unwrap_or_else(|| panic!("no refusal logged: {text}"));
        assert!(
            line.contains("WARN")
                && line.contains(&format!("mounted/{file}"))
                && line.contains(says),
            "{line}"
        );
        if i == 0 {
            eprintln!("{line}");
        }
        let chain = issue(
            &mut ca.client().await,
            &csr_for(KeyType::EcP256, &spiffe("shop", "cart")).1,
            "shop",
            "cart",
        )
        .await;
        assert_eq!(chain[1].trim(), old_int.trim(), "the old CA keeps signing");
    }
    assert!(!logs.text().contains("PRIVATE KEY"), "key material logged");
    // The same bad material is reported once, not at every poll. A sleep on purpose: what is
    // under test is that nothing MORE is counted while the 200 ms poll runs again and again.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        metric(
            &ca.metrics().await,
            "citadel_ca_plugged_reload_total{result=\"refused\"}"
        ),
        bad.len() as u64
    );
    // Then a good swap is still picked up.
    swap(&mounted, &v2);
    let new_int = read(&v2, "ca-cert.pem");
    eventually("the good swap is installed", 20, async || {
        load.last().get(1).map(|c| c.trim()) == Some(new_int.trim())
    })
    .await;
    load.finish().await;
    assert!(logs
        .text()
        .contains("plugged-in CA changed: new material installed"));
    ca.stop().await;
}

#[tokio::test]
async fn the_old_root_stays_in_the_bundle_across_a_restart_until_its_leaves_expired() {
    if !require_tool("openssl") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path();
    let (v1, v2) = (material(base, "v1"), material(base, "v2"));
    let mounted = mount(base, &v1);
    let clock = Arc::new(citadel::clock::ManualClock::new(
        time::OffsetDateTime::from_unix_timestamp(now()).unwrap(),
    ));
    let args = [
        "--ca-certs-dir",
        mounted.to_str().unwrap(),
        "--ca-certs-poll-interval",
        "100ms",
        "--plaintext",
        "--max-ttl",
        "2d",
        "--clock-skew-margin",
        "5m",
    ];
    let ca = TestCa::try_start_with(base, &args, "127.0.0.1:0".parse().unwrap(), clock.clone())
        .await
        .unwrap();
    let (old_root, new_root) = (read(&v1, "root-cert.pem"), read(&v2, "root-cert.pem"));
    swap(&mounted, &v2);
    eventually("both roots in the bundle", 20, async || {
        let b = String::from_utf8(ca.root_pem()).unwrap();
        b.contains(old_root.trim()) && b.contains(new_root.trim())
    })
    .await;
    ca.stop().await;

    // A restart during the overlap still publishes and serves both roots.
    clock.advance(time::Duration::days(1));
    let ca = TestCa::try_start_with(base, &args, "127.0.0.1:0".parse().unwrap(), clock.clone())
        .await
        .unwrap();
    let b = String::from_utf8(ca.root_pem()).unwrap();
    assert!(
        b.contains(old_root.trim()) && b.contains(new_root.trim()),
        "{b}"
    );
    let (_, csr) = csr_for(KeyType::EcP256, &spiffe("shop", "cart"));
    let chain = issue_at(&mut plaintext_client(ca.addr).await, &csr, clock.as_ref()).await;
    assert!(chain.last().unwrap().contains(old_root.trim()));

    // Just before max-ttl + skew after the swap the old root is still there; then it goes.
    clock.advance(time::Duration::days(1) - time::Duration::minutes(1));
    // A sleep on purpose: what is under test is that the root does NOT leave yet, so the
    // reloader gets a few of its 200 ms polls on the moved clock to (wrongly) drop it.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(String::from_utf8(ca.root_pem())
        .unwrap()
        .contains(old_root.trim()));
    clock.advance(time::Duration::minutes(10));
    eventually("the old root leaves the bundle", 20, async || {
        ca.root_pem() == new_root.as_bytes()
    })
    .await;
    let chain = issue_at(&mut plaintext_client(ca.addr).await, &csr, clock.as_ref()).await;
    assert_eq!(chain.last().unwrap(), &new_root);
    assert_eq!(
        metric(
            &ca.metrics().await,
            "citadel_ca_plugged_previous_roots_dropped_total"
        ),
        1
    );
    ca.stop().await;
}

fn secret(dir: &Path) -> k8s_openapi::api::core::v1::Secret {
    let mut s = k8s_openapi::api::core::v1::Secret::default();
    s.metadata.name = Some("cacerts".into());
    s.data = Some(
        FILES
            .iter()
            .map(|f| {
                (
                    f.to_string(),
                    k8s_openapi::ByteString(std::fs::read(dir.join(f)).unwrap()),
                )
            })
            .collect(),
    );
    s
}

async fn put(api: &Api<k8s_openapi::api::core::v1::Secret>, dir: &Path) {
    let mut s = secret(dir);
    s.metadata.resource_version = api.get("cacerts").await.unwrap().metadata.resource_version;
    api.replace("cacerts", &PostParams::default(), &s)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_cacerts_secret_swap_on_the_api_server_fails_no_request_and_bad_ones_get_an_event() {
    let Some(kube) = KubeEnv::start().await else {
        return;
    };
    if !require_tool("openssl") {
        return;
    }
    let ns = "plug-swap";
    kube.namespace(ns).await;
    kube.namespace("shop").await;
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path();
    let (v1, v2) = (material(base, "v1"), material(base, "v2"));
    let wrongkey = broken(
        base,
        &v2,
        "wrongkey",
        "openssl ecparam -name prime256v1 -genkey -noout -out ca-key.pem",
    );
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(kube.client.clone(), ns);
    secrets
        .create(&PostParams::default(), &secret(&v1))
        .await
        .unwrap();
    let r = crate::kube::replica_in(&kube, "plugswap", ns);
    eventually("ready", 30, async || crate::kube::ready(&r).await).await;
    let (old_root, new_root) = (read(&v1, "root-cert.pem"), read(&v2, "root-cert.pem"));
    eventually("the plugged root published", 20, async || {
        kube.bundle("shop").await.as_deref() == Some(old_root.as_str())
    })
    .await;
    let connect = async || {
        citadel::client::connect(&citadel::client::ConnectOptions {
            addr: r.addr.to_string(),
            root_pem: old_root.as_bytes().to_vec(),
            server_name: Some("localhost".into()),
            ..Default::default()
        })
        .await
        .unwrap()
    };
    let mut clients = vec![];
    for _ in 0..4 {
        clients.push(connect().await);
    }
    let load = Load::start(clients);
    load.served(20).await;
    // The documented way: kubectl create --dry-run | kubectl apply.
    let out = Command::new("sh")
        .arg("-ec")
        .arg(format!(
            "kubectl --kubeconfig {kc} create secret generic cacerts -n {ns} \
               --from-file=ca-cert.pem --from-file=ca-key.pem \
               --from-file=root-cert.pem --from-file=cert-chain.pem \
               --dry-run=client -o yaml | kubectl --kubeconfig {kc} apply -f - 2>&1",
            kc = kube.kubeconfig.display()
        ))
        .current_dir(&v2)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{said}");
    eprintln!("$ kubectl create secret generic cacerts ... --dry-run=client -o yaml | kubectl apply -f -\n{said}");
    let new_int = read(&v2, "ca-cert.pem");
    eventually(
        "the clients get certificates from the new CA",
        30,
        async || load.last().get(1).map(|c| c.trim()) == Some(new_int.trim()),
    )
    .await;
    eventually("the bundle ConfigMap holds both roots", 30, async || {
        kube.bundle("shop")
            .await
            .is_some_and(|b| b.contains(old_root.trim()) && b.contains(new_root.trim()))
    })
    .await;
    let rec = secrets.get("citadel-plugged-roots").await.unwrap();
    assert_eq!(rec.type_.as_deref(), Some("Opaque"));
    assert!(
        String::from_utf8_lossy(&rec.data.unwrap()["previous-roots.json"].0)
            .contains("BEGIN CERTIFICATE"),
        "the overlap is recorded in a Secret beside cacerts"
    );

    // A bad Secret: a Warning Event on it says why; the new CA keeps signing.
    put(&secrets, &wrongkey).await;
    let refused = wait_event(&kube.client, ns, "cacerts", "CACertsRefused", 30).await;
    assert_eq!(refused[0].type_.as_deref(), Some("Warning"));
    let note = refused[0].note.clone().unwrap_or_default();
    assert!(
        note.contains("Secret plug-swap/cacerts/ca-key.pem") && note.contains("does not match"),
        "{note}"
    );
    // Material that is well-formed but signs nothing a verifier accepts gets one too.
    let nocertsign = broken(
        base,
        &v2,
        "nocertsign",
        &resign_int("keyUsage=critical,digitalSignature,cRLSign"),
    );
    put(&secrets, &nocertsign).await;
    wait_events(&kube.client, ns, "cacerts", "CACertsRefused", 30, |evs| {
        evs.iter().any(|e| {
            e.note.as_deref().is_some_and(|n| {
                n.contains("Secret plug-swap/cacerts/ca-cert.pem")
                    && n.contains("keyUsage without keyCertSign")
            })
        })
    })
    .await;
    load.served(20).await;
    assert_eq!(
        load.last()[1].trim(),
        new_int.trim(),
        "the good CA keeps signing"
    );
    let calls = load.finish().await;
    assert!(calls >= 20, "only {calls} calls");
    eprintln!("cacerts Secret swap: {calls} calls from 4 concurrent clients, 0 failed");
    let installed = events_about(&kube.client, ns, "cacerts", "CACertsInstalled").await;
    assert!(
        !installed.is_empty(),
        "a Normal Event for the accepted swap"
    );
    // What an operator sees (printed for docs/operations.md; run with --nocapture).
    let kc = kube.kubeconfig.to_str().unwrap();
    for args in [
        vec![
            "get",
            "events",
            "-n",
            ns,
            "--field-selector",
            "involvedObject.name=cacerts",
        ],
        vec!["get", "secret", "citadel-plugged-roots", "-n", ns],
    ] {
        let out = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(kc)
            .args(&args)
            .output()
            .unwrap();
        eprintln!(
            "$ kubectl {}\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A root of the attacker's own (rcgen, P-256) and a client certificate under it for any
/// identity they like: what issue #20 H1 renews into a real citadel certificate.
fn attacker_root_and_leaf(id: &str) -> (String, String, String) {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose, SanType,
    };
    let root_key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.distinguished_name
        .push(DnType::CommonName, "attacker root");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let root = p.self_signed(&root_key).unwrap();
    let issuer = Issuer::new(p, root_key);
    let leaf_key = KeyPair::generate().unwrap();
    let mut l = CertificateParams::default();
    l.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
    l.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    l.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ClientAuth,
        ExtendedKeyUsagePurpose::ServerAuth,
    ];
    let leaf = l.signed_by(&leaf_key, &issuer).unwrap();
    (root.pem(), leaf.pem(), leaf_key.serialize_pem())
}

/// Issue #20 H1: someone who may write ConfigMaps in the CA's namespace (where the overlap
/// record used to live) writes a root of their own there, and someone who may write Secrets
/// tampers with the real record (a genuine entry's seal replayed onto their root, a genuine
/// entry's end pushed out by years). After a restart of the real binary against a real
/// kube-apiserver, the attacker's root is in no `istio-ca-root-cert`, not in the
/// ClusterTrustBundle, not in a CreateCertificate response, and a client certificate under
/// it does not renew; the genuine overlap survives.
#[tokio::test]
async fn a_root_written_into_the_overlap_record_is_trusted_nowhere_after_a_restart() {
    let Some(kube) = KubeEnv::start().await else {
        return;
    };
    if !require_tool("openssl") {
        return;
    }
    let ns = "plug-h1";
    kube.namespace(ns).await;
    kube.namespace("shop").await;
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path();
    let (v1, v2) = (material(base, "v1"), material(base, "v2"));
    let (old_root, new_root) = (read(&v1, "root-cert.pem"), read(&v2, "root-cert.pem"));
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(kube.client.clone(), ns);
    secrets
        .create(&PostParams::default(), &secret(&v1))
        .await
        .unwrap();
    let r = crate::kube::replica_in(&kube, "plug-h1-a", ns);
    eventually("ready", 30, async || crate::kube::ready(&r).await).await;
    put(&secrets, &v2).await;
    eventually("the bundle ConfigMap holds both roots", 30, async || {
        kube.bundle("shop")
            .await
            .is_some_and(|b| b.contains(old_root.trim()) && b.contains(new_root.trim()))
    })
    .await;
    let record = secrets.get_opt("citadel-plugged-roots").await.unwrap();
    drop(r);

    let spiffe_admin = "spiffe://cluster.local/ns/istio-system/sa/istiod";
    let (evil, evil_leaf, evil_key) = attacker_root_and_leaf(spiffe_admin);
    let far = now() + 10 * 365 * 86400;
    // ConfigMap write: the record's old place and shape.
    // (Where an older citadel kept its record there, the attacker adds to it.)
    let cms = Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(kube.client.clone(), ns);
    let mut cm = cms
        .get_opt("citadel-plugged-roots")
        .await
        .unwrap()
        .unwrap_or_default();
    let mut old_rec: serde_json::Value = cm
        .data
        .as_ref()
        .and_then(|d| d.get("previous-roots.json"))
        .map(|j| serde_json::from_str(j).unwrap())
        .unwrap_or_else(|| serde_json::json!({ "roots": [] }));
    old_rec["roots"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({ "pem": evil, "until": far }));
    cm.metadata.name = Some("citadel-plugged-roots".into());
    cm.data = Some([("previous-roots.json".to_string(), old_rec.to_string())].into());
    if cm.metadata.resource_version.is_some() {
        cms.replace("citadel-plugged-roots", &PostParams::default(), &cm)
            .await
            .unwrap();
    } else {
        cms.create(&PostParams::default(), &cm).await.unwrap();
    }
    // Secret write: the genuine entry's digest and seal replayed onto the attacker's root,
    // and the genuine entry itself extended.
    if let Some(record) = &record {
        let mut rec: serde_json::Value =
            serde_json::from_slice(&record.data.as_ref().unwrap()["previous-roots.json"].0)
                .unwrap();
        let genuine = rec["roots"][0].clone();
        assert!(genuine["pem"].as_str().unwrap().contains(old_root.trim()));
        let mut forged = genuine.clone();
        forged["pem"] = evil.clone().into();
        forged["until"] = far.into();
        rec["roots"].as_array_mut().unwrap().push(forged);
        rec["roots"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({ "pem": evil, "until": far }));
        let mut tampered = record.clone();
        tampered.data.as_mut().unwrap().insert(
            "previous-roots.json".into(),
            k8s_openapi::ByteString(serde_json::to_vec(&rec).unwrap()),
        );
        secrets
            .replace("citadel-plugged-roots", &PostParams::default(), &tampered)
            .await
            .unwrap();
    }

    // The CA restarts (a new pod, a new leader).
    let r = crate::kube::replica_in(&kube, "plug-h1-b", ns);
    eventually("ready after the restart", 30, async || {
        crate::kube::ready(&r).await
    })
    .await;
    eventually("the restarted replica leads", 30, async || {
        crate::kube::leads(&r).await
    })
    .await;
    // A namespace made now gets the bundle the restarted leader holds.
    kube.namespace("late").await;
    let mut late = String::new();
    eventually(
        "the restarted leader publishes to a new namespace",
        30,
        async || match kube.bundle("late").await {
            Some(b) => {
                late = b;
                true
            }
            None => false,
        },
    )
    .await;
    assert!(
        !late.contains(evil.trim()),
        "istio-ca-root-cert trusts the attacker: {late}"
    );
    assert!(
        late.contains(old_root.trim()) && late.contains(new_root.trim()),
        "the genuine overlap survives the restart: {late}"
    );
    for n in ["shop", ns] {
        let b = kube.bundle(n).await.unwrap_or_default();
        assert!(!b.contains(evil.trim()), "{n}: {b}");
    }
    let ctb =
        Api::<k8s_openapi::api::certificates::v1::ClusterTrustBundle>::all(kube.client.clone());
    eventually("the ClusterTrustBundle holds the bundle", 30, async || {
        ctb.list(&Default::default())
            .await
            .unwrap()
            .items
            .iter()
            .any(|c| c.spec.trust_bundle.contains(new_root.trim()))
    })
    .await;
    for c in ctb.list(&Default::default()).await.unwrap().items {
        assert!(
            !c.spec.trust_bundle.contains(evil.trim()),
            "ClusterTrustBundle {:?} trusts the attacker",
            c.metadata.name
        );
    }
    // The roots of a CreateCertificate response.
    let connect = async |identity: Option<(Vec<u8>, Vec<u8>)>| {
        citadel::client::connect(&citadel::client::ConnectOptions {
            addr: r.addr.to_string(),
            root_pem: new_root.as_bytes().to_vec(),
            server_name: Some("localhost".into()),
            identity,
            ..Default::default()
        })
        .await
    };
    let (_, csr) = csr_for(KeyType::EcP256, &spiffe("shop", "cart"));
    let chain = issue(&mut connect(None).await.unwrap(), &csr, "shop", "cart").await;
    let roots = chain.last().unwrap();
    assert!(
        !roots.contains(evil.trim()),
        "the response trusts the attacker: {roots}"
    );
    assert!(roots.contains(old_root.trim()) && roots.contains(new_root.trim()));
    // Renewal by a client certificate under the attacker's root: refused (the handshake
    // fails, or the call is Unauthenticated), never a certificate. Under TLS 1.3 the client
    // finishes its side of the handshake before the server has judged its certificate, so
    // the server's refusal can also reach the first call as a closed connection (Cancelled).
    let (_, admin_csr) = csr_for(
        KeyType::EcP256,
        &citadel::identity::SpiffeId::parse(spiffe_admin).unwrap(),
    );
    match connect(Some((
        format!("{evil_leaf}{evil}").into_bytes(),
        evil_key.into_bytes(),
    )))
    .await
    {
        Err(_) => {}
        Ok(mut c) => {
            let err = call(&mut c, &admin_csr, None, 0, None)
                .await
                .expect_err("a certificate under the attacker's root renewed");
            assert!(
                matches!(
                    err.code(),
                    tonic::Code::Unavailable
                        | tonic::Code::Unknown
                        | tonic::Code::Unauthenticated
                        | tonic::Code::Cancelled
                ),
                "{err:?}"
            );
        }
    }
    // The server keeps serving, and its log says what it ignored.
    issue(&mut connect(None).await.unwrap(), &csr, "shop", "cart").await;
    let log = std::fs::read_to_string(kube.dir.join("plug-h1-b.log")).unwrap();
    assert!(
        log.contains("previous-roots record: entries ignored")
            && log.contains("not recorded by citadel under the current CA key"),
        "{log}"
    );
    assert_eq!(
        log.matches("ignoring the ConfigMap an older citadel kept")
            .count(),
        1,
        "{log}"
    );
    assert!(!log.contains("PRIVATE KEY"));
    assert!(
        record.is_some(),
        "the overlap is recorded in the Secret citadel-plugged-roots"
    );
}
