//! CA keys in a real PKCS#11 module (SoftHSM2, issue 23): `citadel serve --ca-key-source
//! pkcs11` as a separate process (the key source is process-wide), a token initialised per
//! test in its own directory (`SOFTHSM2_CONF`), leaves issued with the module's key, the key
//! kept across a restart, the intermediate rotated inside the token and the retired key
//! destroyed, a token that disappears answered with Unavailable (a metric, and back once
//! the token is), and start errors for a wrong PIN or a missing token. `pkcs11-tool`
//! (OpenSC) looks into the token from outside.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine as _;
use citadel::client::{self, CaClient, ConnectOptions};
use citadel::hsm::softhsm::{self, SoftHsm};
use citadel::journal::{Journal, Role, Status};
use citadel::pki::KeyType;
use tonic::Code;

use crate::support::*;

const PIN: &str = "24681357";

/// A SoftHSM2 token of its own, in a directory of its own.
struct TestToken {
    tmp: tempfile::TempDir,
    hsm: SoftHsm,
    label: String,
    dir: PathBuf,
    pin_file: PathBuf,
}

impl TestToken {
    /// `None` (the test skips) without SoftHSM2; under CI=true that fails instead.
    fn new(label: &str) -> Option<Self> {
        if !softhsm::available() {
            eprintln!("SKIPPED: SoftHSM2 not installed (scripts/test.sh installs it)");
            return None;
        }
        let tmp = tempfile::tempdir().unwrap();
        let hsm = SoftHsm::new(tmp.path()).unwrap();
        let dir = hsm.init_token(label, PIN).unwrap();
        let pin_file = tmp.path().join("pin");
        std::fs::write(&pin_file, format!("{PIN}\n")).unwrap();
        Some(Self {
            tmp,
            hsm,
            label: label.into(),
            dir,
            pin_file,
        })
    }

    fn flags(&self) -> Vec<String> {
        vec![
            "--ca-key-source".into(),
            "pkcs11".into(),
            "--pkcs11-module".into(),
            softhsm::module().display().to_string(),
            "--pkcs11-token-label".into(),
            self.label.clone(),
            "--pkcs11-pin-file".into(),
            self.pin_file.display().to_string(),
        ]
    }

    /// `pkcs11-tool` on this token (logged in): its output, or `None` without OpenSC.
    fn p11tool(&self, args: &[&str]) -> Option<String> {
        let tool = std::env::var("CITADEL_PKCS11_TOOL").unwrap_or_else(|_| "pkcs11-tool".into());
        if !require_tool(&tool) {
            return None;
        }
        let out = Command::new(&tool)
            .env("SOFTHSM2_CONF", self.hsm.conf())
            .arg("--module")
            .arg(softhsm::module())
            .args(["--token-label", &self.label, "--login", "--pin", PIN])
            .args(args)
            .output()
            .unwrap();
        Some(
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    }

    /// The private keys in the token, by label, with their access line.
    fn private_keys(&self) -> Option<Vec<(String, String)>> {
        let text = self.p11tool(&["--list-objects", "--type", "privkey"])?;
        let mut keys = Vec::new();
        let mut label = None;
        for line in text.lines() {
            let line = line.trim();
            if let Some(l) = line.strip_prefix("label:") {
                label = Some(l.trim().to_string());
            } else if let (Some(a), Some(l)) = (line.strip_prefix("Access:"), &label) {
                keys.push((l.clone(), a.trim().to_string()));
            }
        }
        Some(keys)
    }
}

/// `citadel serve --dev` as a child process with the token's flags and its `SOFTHSM2_CONF`.
struct HsmServer {
    child: Child,
    addr: SocketAddr,
    metrics_addr: SocketAddr,
    state: PathBuf,
    log: PathBuf,
}

impl Drop for HsmServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl HsmServer {
    async fn start(t: &TestToken, state: &Path, extra: &[&str]) -> Result<Self, String> {
        let (port, mport) = (free_port(), free_port());
        let log = t.tmp.path().join(format!("serve-{port}.log"));
        let mut child = Command::new(crate::support::process::BIN)
            .env("SOFTHSM2_CONF", t.hsm.conf())
            .args(["serve", "--dev"])
            .arg("--state-dir")
            .arg(state)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--metrics-listen", &format!("127.0.0.1:{mport}")])
            .args(t.flags())
            .args(extra)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let metrics_addr: SocketAddr = format!("127.0.0.1:{mport}").parse().unwrap();
        for _ in 0..600 {
            if let Some(status) = child.try_wait().unwrap() {
                return Err(format!(
                    "serve exited ({status}): {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                ));
            }
            if let Ok((200, _)) = http_get(metrics_addr, "/healthz/ready").await {
                return Ok(Self {
                    child,
                    addr: format!("127.0.0.1:{port}").parse().unwrap(),
                    metrics_addr,
                    state: state.to_path_buf(),
                    log,
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(format!(
            "serve did not become ready: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        ))
    }

    /// A TLS client: the serving certificate is signed by the token-held intermediate too.
    async fn client(&self) -> CaClient {
        client::connect(&ConnectOptions {
            addr: self.addr.to_string(),
            root_pem: std::fs::read(self.state.join("root-cert.pem")).unwrap(),
            server_name: Some("localhost".into()),
            ..Default::default()
        })
        .await
        .unwrap()
    }

    async fn metrics(&self) -> String {
        http_get(self.metrics_addr, "/metrics").await.unwrap().1
    }

    async fn journal(&self) -> Journal {
        crate::envoy::journal(&self.state).await
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Issues a leaf for shop/cart; returns the chain's DER (leaf first).
async fn issue_der(client: &mut CaClient) -> Result<Vec<Vec<u8>>, tonic::Status> {
    let (_, csr) = csr_for(KeyType::EcP256, &spiffe("shop", "cart"));
    let chain = call(client, &csr, Some(&bearer(&token("shop", "cart"))), 0, None).await?;
    Ok(chain
        .iter()
        .flat_map(|p| citadel::pki::pem::parse_certs(p.as_bytes()).unwrap())
        .map(|c| c.to_vec())
        .collect())
}

/// The SubjectPublicKeyInfo (DER) of a certificate.
fn spki_of(der: &[u8]) -> Vec<u8> {
    citadel::pki::chain::parse(der)
        .unwrap()
        .public_key()
        .raw
        .to_vec()
}

/// The leaf verifies under the intermediate's key (webpki path building is the other tests'
/// job; here: which key signed).
fn signed_by(leaf: &[u8], issuer: &[u8]) -> bool {
    let leaf = citadel::pki::chain::parse(leaf).unwrap();
    let issuer = citadel::pki::chain::parse(issuer).unwrap();
    leaf.verify_signature(Some(issuer.public_key())).is_ok()
}

/// `citadel_ca_key_signatures_total` for one result.
fn signatures(text: &str, result: &str) -> f64 {
    let line = format!("citadel_ca_key_signatures_total{{backend=\"pkcs11\",result=\"{result}\"}}");
    metric(text, &line).unwrap_or_else(|| panic!("{line} not in {text}"))
}

fn metric(text: &str, line_prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(line_prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaves_are_signed_in_the_token_and_the_same_key_signs_after_a_restart() {
    let Some(t) = TestToken::new("ca-restart") else {
        return;
    };
    let state = t.tmp.path().join("state");
    let server = HsmServer::start(&t, &state, &[]).await.unwrap();
    let mut c = server.client().await;
    let chain = issue_der(&mut c).await.unwrap();
    assert!(chain.len() >= 3, "leaf, intermediate, root");

    // The journal records the intermediate's label and public key, never the key; the root
    // (--pkcs11-keys intermediate, the default) stays a software key.
    let j = server.journal().await;
    let int = j.active_signer().unwrap().clone();
    let r = int
        .key_ref
        .clone()
        .expect("the intermediate's key is in the token");
    assert_eq!(int.key_pem.expose(), "", "no key material in the journal");
    assert_eq!(
        (r.backend.as_str(), r.token.as_str()),
        ("pkcs11", "ca-restart")
    );
    assert_eq!(r.label, format!("citadel-intermediate-{}", int.id));
    assert_eq!(
        base64::engine::general_purpose::STANDARD
            .decode(&r.public_key)
            .unwrap(),
        spki_of(&chain[1]),
        "the recorded public key is the certificate's"
    );
    let root = j.active_root().unwrap();
    assert!(root.key_ref.is_none() && !root.key_pem.expose().is_empty());
    assert!(signed_by(&chain[0], &chain[1]));
    let raw = std::fs::read_to_string(state.join("ca-journal.json")).unwrap();
    // JWT-SVID signing keys are still software keys in the journal with either key source
    // (docs/operations.md, "HSM keys (PKCS#11)"); of the X.509 authorities, only the root's.
    assert_eq!(
        raw.matches("BEGIN PRIVATE KEY").count(),
        1 + j.jwt_keys.len(),
        "only the root's key (and the JWT-SVID keys) is in the journal"
    );

    // From outside: the key is in the token, sensitive and never extractable.
    if let Some(keys) = t.private_keys() {
        let (_, access) = keys
            .iter()
            .find(|(l, _)| *l == r.label)
            .unwrap_or_else(|| panic!("{} not in {keys:?}", r.label));
        assert!(
            access.contains("sensitive") && access.contains("never extractable"),
            "{access}"
        );
    }
    let m = server.metrics().await;
    assert_eq!(metric(&m, "citadel_ca_key_available{"), Some(1.0), "{m}");
    assert!(signatures(&m, "ok") >= 1.0, "{m}");
    let log = server.log();
    assert!(!log.contains(PIN), "the PIN reached the log");
    drop(server);

    // A restart finds the same key in the token by label and keeps signing with it.
    let server = HsmServer::start(&t, &state, &[]).await.unwrap();
    let mut c = server.client().await;
    let again = issue_der(&mut c).await.unwrap();
    assert_eq!(again[1], chain[1], "same intermediate");
    assert!(signed_by(&again[0], &chain[1]));
    assert!(!server.log().contains(PIN));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_intermediate_rotates_inside_the_token_and_the_retired_key_is_destroyed() {
    let Some(t) = TestToken::new("ca-rotate") else {
        return;
    };
    let state = t.tmp.path().join("state");
    // A 30 s intermediate, prepared at 3 s, active at 6 s, retired once its 1 s leaves and
    // the (zero) skew margin have passed.
    let server = HsmServer::start(
        &t,
        &state,
        &[
            "--intermediate-ttl",
            "30s",
            "--intermediate-prepare-at",
            "0.1",
            "--intermediate-activate-at",
            "0.2",
            "--max-ttl",
            "2s",
            "--default-ttl",
            "1s",
            "--clock-skew-margin",
            "0s",
            "--reconcile-interval",
            "200ms",
            "--ca-key-type",
            "rsa-2048",
        ],
    )
    .await
    .unwrap();
    let mut c = server.client().await;
    let first = issue_der(&mut c).await.unwrap();
    let first_int = server.journal().await.active_signer().unwrap().clone();
    let first_label = first_int.key_ref.as_ref().unwrap().label.clone();

    let second = until("the next intermediate to sign", 40, async || {
        let chain = issue_der(&mut c).await.map_err(|e| e.to_string())?;
        if chain[1] != first[1] {
            Ok(chain)
        } else {
            Err("still the first intermediate".into())
        }
    })
    .await;
    assert!(signed_by(&second[0], &second[1]));
    let j = server.journal().await;
    let new_int = j.active_signer().unwrap();
    let new_ref = new_int.key_ref.as_ref().expect("generated in the token");
    assert_ne!(new_ref.label, first_label);
    assert_eq!(
        base64::engine::general_purpose::STANDARD
            .decode(&new_ref.public_key)
            .unwrap(),
        spki_of(&second[1])
    );
    assert_eq!(
        citadel::pki::keys::spki_kind(&spki_of(&second[1])).unwrap(),
        citadel::pki::PublicKeyKind::Rsa { bits: 2048 },
        "the next key has the same type"
    );

    // Retired (its leaves expired): the old key is destroyed in the token, the new one stays.
    until("the first intermediate to retire", 40, async || {
        let j = server.journal().await;
        match j.get(&first_int.id).map(|a| a.status) {
            Some(Status::Retired) => Ok(()),
            s => Err(format!("{s:?}")),
        }
    })
    .await;
    if t.private_keys().is_some() {
        eventually("the retired key to leave the token", 10, async || {
            let keys = t.private_keys().unwrap();
            !keys.iter().any(|(l, _)| *l == first_label)
                && keys.iter().any(|(l, _)| *l == new_ref.label)
        })
        .await;
    }
    let roots: Vec<_> = j
        .authorities
        .iter()
        .filter(|a| a.role == Role::Root)
        .collect();
    assert_eq!(roots.len(), 1);
    // And the CA still signs.
    issue_der(&mut c).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_token_is_unavailable_with_a_metric_and_signing_resumes_when_it_is_back() {
    let Some(t) = TestToken::new("ca-vanish") else {
        return;
    };
    let state = t.tmp.path().join("state");
    let server = HsmServer::start(&t, &state, &[]).await.unwrap();
    let mut c = server.client().await;
    let before = issue_der(&mut c).await.unwrap();

    let away = t.tmp.path().join("token-away");
    std::fs::rename(&t.dir, &away).unwrap();
    let e = issue_der(&mut c).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert_eq!(
        e.message(),
        "CA is not ready: the CA signing key is unavailable; retry shortly"
    );
    // The server keeps serving (health, metrics), counting the refusals.
    let m = server.metrics().await;
    assert_eq!(metric(&m, "citadel_ca_key_available{"), Some(0.0), "{m}");
    assert!(signatures(&m, "unavailable") >= 1.0, "{m}");
    assert!(
        metric(
            &m,
            "citadel_server_csr_sign_err_count{error=\"key_unavailable\"}"
        )
        .unwrap()
            >= 1.0,
        "{m}"
    );
    assert!(matches!(
        http_get(server.metrics_addr, "/healthz/live").await,
        Ok((200, _))
    ));
    let e = issue_der(&mut c).await.unwrap_err();
    assert_eq!(
        e.code(),
        Code::Unavailable,
        "still unavailable, never another key"
    );

    std::fs::rename(&away, &t.dir).unwrap();
    let after = until("signing to resume", 20, async || {
        issue_der(&mut c).await.map_err(|e| format!("{e:?}"))
    })
    .await;
    assert_eq!(after[1], before[1], "the same intermediate, the same key");
    assert!(signed_by(&after[0], &before[1]));
    let m = server.metrics().await;
    assert_eq!(metric(&m, "citadel_ca_key_available{"), Some(1.0));
    assert!(metric(&m, "citadel_ca_key_reconnects_total{").unwrap() >= 1.0);
    assert!(!server.log().contains(PIN));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_pin_a_missing_token_or_missing_flags_stop_the_start_with_a_clear_error() {
    let Some(t) = TestToken::new("ca-start") else {
        return;
    };
    let state = t.tmp.path().join("state");
    let run = |args: Vec<String>| {
        let out = Command::new(crate::support::process::BIN)
            .env("SOFTHSM2_CONF", t.hsm.conf())
            .args([
                "serve",
                "--dev",
                "--listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
            ])
            .arg("--state-dir")
            .arg(&state)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let with = |f: &dyn Fn(&mut Vec<String>)| {
        let mut a = t.flags();
        f(&mut a);
        a
    };

    let wrong = t.tmp.path().join("wrong-pin");
    std::fs::write(&wrong, "11112222\n").unwrap();
    let (ok, err) = run(with(&|a| a[7] = wrong.display().to_string()));
    assert!(!ok);
    assert!(
        err.contains("login to PKCS#11 token \"ca-start\" refused: PinIncorrect"),
        "{err}"
    );
    assert!(!err.contains("11112222"), "the PIN is never shown: {err}");

    let (ok, err) = run(with(&|a| a[5] = "nope".into()));
    assert!(!ok);
    assert!(
        err.contains("no PKCS#11 token labelled \"nope\"") && err.contains("ca-start"),
        "{err}"
    );

    let (ok, err) = run(with(&|a| {
        a.truncate(6);
    }));
    assert!(!ok);
    assert!(
        err.contains("--pkcs11-pin-file or --pkcs11-pin-env"),
        "{err}"
    );

    let (ok, err) = run(with(&|a| a[1] = "software".into()));
    assert!(!ok);
    assert!(
        err.contains("the --pkcs11-* flags need --ca-key-source pkcs11"),
        "{err}"
    );

    let (ok, err) = run(with(&|a| a[3] = "/nonexistent/libp11.so".into()));
    assert!(!ok);
    assert!(
        err.contains("PKCS#11 module /nonexistent/libp11.so"),
        "{err}"
    );

    // A CA whose intermediate key is in a token refuses to start without it, naming it,
    // rather than signing with anything else.
    let server = HsmServer::start(&t, &state, &[]).await.unwrap();
    drop(server);
    let (ok, err) = run(vec![]);
    assert!(!ok);
    assert!(err.contains("held in PKCS#11 token \"ca-start\""), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoys_speak_mtls_with_leaves_from_a_module_held_intermediate() {
    use crate::envoy::*;
    let Some(envoy) = envoy_binary() else { return };
    let Some(t) = TestToken::new("ca-envoy") else {
        return;
    };
    let dir = t.tmp.path().to_path_buf();
    let state = dir.join("state");
    let server = HsmServer::start(&t, &state, &[]).await.unwrap();
    let int = server.journal().await.active_signer().unwrap().clone();
    assert!(
        int.key_ref.is_some(),
        "the intermediate's key is in the token"
    );

    let before = signatures(&server.metrics().await, "ok");
    let backend = backend().await;
    let agent = |sa: &str| {
        let tok = dir.join(format!("{sa}.jwt"));
        std::fs::write(&tok, token("shop", sa)).unwrap();
        spawn_agent_with(&dir, server.addr, &state, sa, &tok)
    };
    let (cart_agent, cart_sock) = agent("cart");
    let (front_agent, front_sock) = agent("frontend");
    let base = std::process::id() % 1000 * 10 + 5;
    let mesh = start_mesh(&envoy, &dir, backend, &cart_sock, &front_sock, base).await;
    let mut procs = Procs(vec![cart_agent, front_agent]);
    procs.0.extend(mesh.envoys);
    let (front, cart_admin) = (mesh.front, mesh.cart_admin);
    for _ in 0..5 {
        assert_eq!(http_get(front, "/").await.unwrap(), (200, "ok".to_string()));
    }
    assert!(
        stat(cart_admin, "handshake").await >= 1,
        "mTLS handshakes at the cart"
    );
    // Both workload leaves were signed in the token: the only intermediate is the token-held
    // one, and the token made a signature for each.
    let j = server.journal().await;
    let ints: Vec<_> = j
        .authorities
        .iter()
        .filter(|a| a.role == Role::Intermediate)
        .collect();
    assert_eq!(ints.len(), 1);
    assert_eq!(ints[0].id, int.id);
    let signed = signatures(&server.metrics().await, "ok");
    assert!(signed >= before + 2.0, "{before} -> {signed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_pkcs11_keys_all_the_root_key_is_made_in_the_token_too() {
    let Some(t) = TestToken::new("ca-all") else {
        return;
    };
    let state = t.tmp.path().join("state");
    let server = HsmServer::start(
        &t,
        &state,
        &["--pkcs11-keys", "all", "--ca-key-type", "rsa-3072"],
    )
    .await
    .unwrap();
    let mut c = server.client().await;
    let chain = issue_der(&mut c).await.unwrap();
    let j = server.journal().await;
    let (root, int) = (j.active_root().unwrap(), j.active_signer().unwrap());
    let raw = std::fs::read_to_string(state.join("ca-journal.json")).unwrap();
    // No X.509 authority's key material in the journal; the JWT-SVID keys are still
    // software keys (docs/operations.md, "HSM keys (PKCS#11)").
    assert_eq!(
        raw.matches("BEGIN PRIVATE KEY").count(),
        j.jwt_keys.len(),
        "no authority key material in the journal"
    );
    for a in [root, int] {
        let r = a.key_ref.as_ref().expect("in the token");
        assert_eq!(a.key_pem.expose(), "");
        assert!(r.label.starts_with("citadel-"), "{}", r.label);
    }
    assert!(signed_by(&chain[0], &chain[1]));
    assert!(
        signed_by(&chain[1], &chain[2]),
        "the intermediate was signed by the token-held root"
    );
    assert_eq!(
        citadel::pki::keys::spki_kind(&spki_of(&chain[2])).unwrap(),
        citadel::pki::PublicKeyKind::Rsa { bits: 3072 }
    );
    if let Some(keys) = t.private_keys() {
        let labels: Vec<&str> = keys.iter().map(|(l, _)| l.as_str()).collect();
        assert!(
            labels.contains(&format!("citadel-root-{}", root.id).as_str()),
            "{labels:?}"
        );
        assert!(
            labels.contains(&format!("citadel-intermediate-{}", int.id).as_str()),
            "{labels:?}"
        );
    }
}

/// `citadel ARGS` with `SOFTHSM2_CONF` of `t` (the token the command may reach): success,
/// stdout, stderr.
fn cli_with(t: &TestToken, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(crate::support::process::BIN)
        .env("SOFTHSM2_CONF", t.hsm.conf())
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn cli_ok(t: &TestToken, args: &[&str]) -> String {
    let (ok, out, err) = cli_with(t, args);
    assert!(ok, "citadel {args:?}: {out}{err}");
    out
}

/// `openssl verify` of the leaf up to `root` through `intermediate`, all DER: openssl's
/// own answer, or `None` without openssl.
fn openssl_verifies(dir: &Path, root: &Path, intermediate: &[u8], leaf: &[u8]) -> Option<String> {
    if !require_tool("openssl") {
        return None;
    }
    let int = dir.join("int-under-test.pem");
    let leaf_file = dir.join("leaf-under-test.pem");
    std::fs::write(&int, citadel::pki::pem::cert_to_pem(intermediate)).unwrap();
    std::fs::write(&leaf_file, citadel::pki::pem::cert_to_pem(leaf)).unwrap();
    let out = Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(root)
        .arg("-untrusted")
        .arg(&int)
        .arg(&leaf_file)
        .output()
        .unwrap();
    Some(String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
}

/// Issue 23, section 2: an offline root in a SECOND SoftHSM2 token (its own SOFTHSM2_CONF,
/// which the server never sees). new-root in the root token -> `ca init --offline-root` (the
/// intermediate's key in the CA's token) -> serve refuses until installed -> sign-intermediate
/// with the token root -> install -> leaves verify with openssl up to the root. At the
/// intermediate's prepare point the server makes the next CSR (its key in the CA token) and
/// raises the alarm (metric, `ca status`) -> sign -> install -> activated: leaves chain to the
/// new intermediate. The next request is then left unsigned: past its deadline the metric
/// goes negative and the current intermediate keeps signing. Last, a root rotation as a
/// ceremony with both root keys in the root token: the new chain signs after the staged
/// steps, and openssl verifies its leaves to the new root, and through the cross-signed
/// certificate to the old one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_root_in_a_second_token_signs_intermediates_in_a_ceremony() {
    let (Some(ca), Some(root)) = (TestToken::new("ca-int"), TestToken::new("offline-root")) else {
        return;
    };
    let dir = ca.tmp.path();
    let state = dir.join("state");
    let p = |x: &Path| x.display().to_string();
    let module = softhsm::module().display().to_string();
    let root_cert = dir.join("root.pem");
    let root_flags = [
        "--root-pkcs11-module".to_string(),
        module.clone(),
        "--root-pkcs11-token-label".into(),
        root.label.clone(),
        "--root-pkcs11-pin-file".into(),
        p(&root.pin_file),
    ];
    let mut args = vec![
        "ca",
        "new-root",
        "--trust-domain",
        "cluster.local",
        "--cert-out",
    ];
    let root_cert_s = p(&root_cert);
    args.push(root_cert_s.as_str());
    args.extend(root_flags.iter().map(String::as_str));
    let out = cli_ok(&root, &args);
    assert!(out.contains("in the token"), "{out}");
    if let Some(keys) = root.private_keys() {
        assert_eq!(keys.len(), 1, "the root key is in the root token: {keys:?}");
    }

    // init: the first intermediate's key in the CA token, its CSR out; no root key anywhere
    // near the server.
    let csr1 = dir.join("csr1.pem");
    let state_s = p(&state);
    let mut init = vec![
        "ca",
        "init",
        "--offline-root",
        "--trust-domain",
        "cluster.local",
        "--root-cert",
        &root_cert_s,
        "--state-dir",
        &state_s,
    ];
    let csr1_s = p(&csr1);
    init.extend(["--csr-out", csr1_s.as_str()]);
    let ca_flags = ca.flags();
    init.extend(ca_flags.iter().map(String::as_str));
    let printed = cli_ok(&ca, &init);
    assert!(printed.contains("BEGIN CERTIFICATE REQUEST"), "{printed}");
    let j = crate::envoy::journal(&state).await;
    assert!(j.offline_root);
    assert_eq!(j.active_root().unwrap().key_pem.expose(), "");
    assert!(
        j.active_root().unwrap().key_ref.is_none(),
        "no root key recorded"
    );
    let req = j.intermediate_request.clone().unwrap();
    assert_eq!(req.key_ref.as_ref().unwrap().token, "ca-int");
    // A second init never replaces the state.
    let (ok, _, err) = cli_with(&ca, &init);
    assert!(!ok && err.contains("already holds a CA journal"), "{err}");

    // The server refuses to start before an intermediate is installed, saying what to do.
    let flags = [
        "--intermediate-prepare-at",
        "0.2",
        "--intermediate-activate-at",
        "0.6",
        "--max-ttl",
        "2s",
        "--default-ttl",
        "1s",
        "--clock-skew-margin",
        "0s",
        "--reconcile-interval",
        "200ms",
    ];
    let e = HsmServer::start(&ca, &state, &flags).await.err().unwrap();
    assert!(e.contains("citadel ca intermediate-csr"), "{e}");

    // The ceremony, on the "offline machine" (only the root token's SOFTHSM2_CONF).
    let sign = |csr: &Path, out: &Path, ttl: &str| {
        let (csr, out) = (p(csr), p(out));
        let mut a = vec![
            "ca",
            "sign-intermediate",
            "--root-cert",
            &root_cert_s,
            "--csr",
            &csr,
            "--out",
            &out,
            "--ttl",
            ttl,
        ];
        a.extend(root_flags.iter().map(String::as_str));
        cli_ok(&root, &a);
    };
    // A wrong PIN for the root token fails, without echoing it.
    let wrong = dir.join("wrong");
    std::fs::write(&wrong, "99990000\n").unwrap();
    let (ok, _, err) = cli_with(
        &root,
        &[
            "ca",
            "sign-intermediate",
            "--root-cert",
            &root_cert_s,
            "--csr",
            &csr1_s,
            "--root-pkcs11-module",
            &module,
            "--root-pkcs11-token-label",
            "offline-root",
            "--root-pkcs11-pin-file",
            &p(&wrong),
        ],
    );
    assert!(
        !ok && err.contains("PinIncorrect") && !err.contains("99990000"),
        "{err}"
    );
    let int1 = dir.join("int1.pem");
    sign(&csr1, &int1, "40s");
    let install = |cert: &Path| {
        cli_ok(
            &ca,
            &[
                "ca",
                "install-intermediate",
                "--state-dir",
                &state_s,
                "--cert",
                &p(cert),
            ],
        )
    };
    // Installing it twice: the second finds no request waiting.
    assert!(install(&int1).contains("active"));
    let (ok, _, err) = cli_with(
        &ca,
        &[
            "ca",
            "install-intermediate",
            "--state-dir",
            &state_s,
            "--cert",
            &p(&int1),
        ],
    );
    assert!(
        !ok && err.contains("no intermediate request is waiting"),
        "{err}"
    );

    let server = HsmServer::start(&ca, &state, &flags).await.unwrap();
    let mut c = server.client().await;
    let first = issue_der(&mut c).await.unwrap();
    let int1_der =
        citadel::pki::pem::parse_certs(&std::fs::read(&int1).unwrap()).unwrap()[0].to_vec();
    assert_eq!(first[1], int1_der, "the installed intermediate signs");
    if let Some(v) = openssl_verifies(dir, &root_cert, &first[1], &first[0]) {
        assert!(v.contains(": OK"), "{v}");
    }

    // The prepare point (0.2 of 40 s): the server requests the next intermediate in the CA
    // token and raises the alarm.
    let req2 = until(
        "the server to request the next intermediate",
        30,
        async || {
            server
                .journal()
                .await
                .intermediate_request
                .ok_or_else(|| "not yet".to_string())
        },
    )
    .await;
    assert_eq!(req2.key_ref.as_ref().unwrap().token, "ca-int");
    let needed = until("the alarm metric", 10, async || {
        metric(
            &server.metrics().await,
            &format!(
                "citadel_ca_offline_intermediate_needed_seconds{{request=\"{}\"}}",
                req2.id
            ),
        )
        .ok_or_else(|| "absent".to_string())
    })
    .await;
    assert!(needed > 0.0 && needed <= 24.0, "{needed}");
    let status = cli_ok(&ca, &["ca", "status", "--state-dir", &state_s, "--json"]);
    let v: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(
        v["intermediate_signature_needed"]["request"],
        req2.id.as_str(),
        "{status}"
    );
    let csr2 = dir.join("csr2.pem");
    let printed = cli_ok(
        &ca,
        &[
            "ca",
            "intermediate-csr",
            "--state-dir",
            &state_s,
            "--out",
            &p(&csr2),
        ],
    );
    assert_eq!(printed, req2.csr_pem);
    let int2 = dir.join("int2.pem");
    sign(&csr2, &int2, "30s");
    assert!(install(&int2).contains("prepared"));
    let int2_der =
        citadel::pki::pem::parse_certs(&std::fs::read(&int2).unwrap()).unwrap()[0].to_vec();
    // Activated at 0.6 of the first one's life: leaves chain to the new intermediate.
    let second = until("the new intermediate to sign", 40, async || {
        let chain = issue_der(&mut c).await.map_err(|e| e.to_string())?;
        if chain[1] == int2_der {
            Ok(chain)
        } else {
            Err("still the first".into())
        }
    })
    .await;
    if let Some(v) = openssl_verifies(dir, &root_cert, &second[1], &second[0]) {
        assert!(v.contains(": OK"), "{v}");
    }

    // The next request is left unsigned: past its deadline (0.6 of 30 s) the metric is
    // negative, and the current intermediate keeps signing.
    let req3 = until("the third request", 30, async || {
        server
            .journal()
            .await
            .intermediate_request
            .ok_or_else(|| "not yet".to_string())
    })
    .await;
    let line = format!(
        "citadel_ca_offline_intermediate_needed_seconds{{request=\"{}\"}}",
        req3.id
    );
    until("the deadline to pass", 40, async || {
        match metric(&server.metrics().await, &line) {
            Some(v) if v < 0.0 => Ok(v),
            v => Err(format!("{v:?}")),
        }
    })
    .await;
    let still = issue_der(&mut c).await.unwrap();
    assert_eq!(still[1], int2_der, "keeps serving the current intermediate");
    let status = cli_ok(&ca, &["ca", "status", "--state-dir", &state_s]);
    assert!(status.contains("OVERDUE"), "{status}");
    assert!(
        server.log().contains("intermediate_signature_overdue"),
        "{}",
        server.log()
    );

    // A root rotation as a ceremony, both root keys in the root token: a new root, the
    // waiting request signed under it and cross-signed by the current root (found by the
    // label new-root gave it), installed as a staged rotation the server carries out.
    let new_root = dir.join("new-root.pem");
    let new_root_s = p(&new_root);
    let mut a = vec![
        "ca",
        "new-root",
        "--trust-domain",
        "cluster.local",
        "--cert-out",
    ];
    a.push(new_root_s.as_str());
    a.extend(root_flags.iter().map(String::as_str));
    cli_ok(&root, &a);
    let csr3 = dir.join("csr3.pem");
    cli_ok(
        &ca,
        &[
            "ca",
            "intermediate-csr",
            "--state-dir",
            &state_s,
            "--out",
            &p(&csr3),
        ],
    );
    let (int3, cross) = (dir.join("int3.pem"), dir.join("cross.pem"));
    let (csr3_s, int3_s, cross_s) = (p(&csr3), p(&int3), p(&cross));
    let mut a = vec![
        "ca",
        "sign-intermediate",
        "--root-cert",
        &new_root_s,
        "--old-root-cert",
        &root_cert_s,
        "--csr",
        &csr3_s,
        "--out",
        &int3_s,
        "--cross-out",
        &cross_s,
        "--ttl",
        "60s",
    ];
    a.extend(root_flags.iter().map(String::as_str));
    cli_ok(&root, &a);
    let out = cli_ok(
        &ca,
        &[
            "ca",
            "install-intermediate",
            "--state-dir",
            &state_s,
            "--cert",
            &int3_s,
            "--new-root",
            &new_root_s,
            "--cross-cert",
            &cross_s,
        ],
    );
    assert!(out.contains("root rotation prepared"), "{out}");
    let int3_der =
        citadel::pki::pem::parse_certs(&std::fs::read(&int3).unwrap()).unwrap()[0].to_vec();
    let rotated = until("the new root's chain to sign", 40, async || {
        let chain = issue_der(&mut c).await.map_err(|e| e.to_string())?;
        if chain[1] == int3_der {
            Ok(chain)
        } else {
            Err("not yet".into())
        }
    })
    .await;
    if let Some(v) = openssl_verifies(dir, &new_root, &rotated[1], &rotated[0]) {
        assert!(v.contains(": OK"), "{v}");
    }
    // Holders of only the old root verify through the cross-signed certificate.
    let cross_der =
        citadel::pki::pem::parse_certs(&std::fs::read(&cross).unwrap()).unwrap()[0].to_vec();
    if let Some(v) = openssl_verifies(dir, &root_cert, &cross_der, &rotated[0]) {
        assert!(v.contains(": OK"), "{v}");
    }
}
