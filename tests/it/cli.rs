//! The `citadel` binary as an operator runs it: help, errors, a real process, signals.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::{free_port, run, BIN};

#[test]
fn help_teaches_and_bad_flags_explain() {
    let tmp = tempfile::tempdir().unwrap();
    let (code, out, _) = run(&["--help"], tmp.path());
    assert_eq!(code, 0);
    for word in [
        "serve",
        "dev-token",
        "request",
        "ca",
        "bench",
        "Quick start",
    ] {
        assert!(out.contains(word), "--help lacks {word}");
    }
    let (_, out, _) = run(&["serve", "--help"], tmp.path());
    for word in [
        "--dev",
        "--jwks-file",
        "--ca-certs-dir",
        "--max-ttl",
        "Examples",
    ] {
        assert!(out.contains(word), "serve --help lacks {word}");
    }
    let (code, _, err) = run(&["serve"], tmp.path());
    assert_eq!(code, 1);
    assert!(
        err.contains("--jwks-file") && err.contains("--dev"),
        "{err}"
    );
    let (code, _, err) = run(&["serve", "--dev", "--default-ttl", "100d"], tmp.path());
    assert_eq!(code, 1);
    assert!(err.contains("exceeds --max-ttl"), "{err}");
    let (code, _, err) = run(&["serve", "--dev", "--max-ttl", "10"], tmp.path());
    assert_eq!(code, 2, "usage error");
    assert!(err.contains("missing unit"), "{err}");
    let (code, _, err) = run(
        &["serve", "--trust-domain", "Bad.Domain", "--dev"],
        tmp.path(),
    );
    assert_eq!(code, 2);
    assert!(err.contains("trust domain"), "{err}");
    let (code, _, err) = run(
        &["dev-token", "-n", "Shop", "--service-account", "x"],
        tmp.path(),
    );
    assert_eq!(code, 1);
    assert!(err.contains("namespace"), "{err}");
    let (code, _, err) = run(&["ca", "status", "--state-dir", "nowhere"], tmp.path());
    assert_eq!(code, 1);
    assert!(err.contains("does not exist"), "{err}");
    let (code, _, err) = run(
        &["serve", "--dev", "--jwks-file", "missing.json"],
        tmp.path(),
    );
    assert_eq!(code, 1);
    assert!(err.contains("missing.json"), "{err}");
}

#[test]
fn quickstart_as_a_real_process_with_json_audit_logs_and_sigterm() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (port, mport) = (free_port(), free_port());
    let log = std::fs::File::create(dir.join("serve.log")).unwrap();
    let mut server = Command::new(BIN)
        .args([
            "--log-format",
            "json",
            "serve",
            "--dev",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--metrics-listen",
            &format!("127.0.0.1:{mport}"),
        ])
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let root = dir.join("citadel-data/root-cert.pem");
    let mut up = false;
    for _ in 0..200 {
        if root.exists() && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            up = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        up,
        "server did not start: {}",
        std::fs::read_to_string(dir.join("serve.log")).unwrap()
    );

    let (code, token, err) = run(
        &[
            "dev-token",
            "--namespace",
            "shop",
            "--service-account",
            "cart",
        ],
        dir,
    );
    assert_eq!(code, 0, "{err}");
    std::fs::write(dir.join("token.jwt"), token.trim()).unwrap();
    let (code, out, err) = run(
        &[
            "request",
            "--ca-addr",
            &format!("127.0.0.1:{port}"),
            "--ca-root-cert",
            "citadel-data/root-cert.pem",
            "--token-file",
            "token.jwt",
            "--out-dir",
            "certs",
        ],
        dir,
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("spiffe://cluster.local/ns/shop/sa/cart"),
        "{out}"
    );
    assert_eq!(crate::support::file_mode(&dir.join("certs/key.pem")), 0o600);

    let (code, out, _) = run(&["ca", "bundle"], dir);
    assert_eq!(code, 0);
    assert_eq!(out, std::fs::read_to_string(&root).unwrap());
    let (code, out, _) = run(&["ca", "status", "--json"], dir);
    assert_eq!(code, 0);
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    let roles: Vec<&str> = status["authorities"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["role"].as_str().unwrap())
        .collect();
    assert_eq!(roles, ["root", "intermediate"]);
    let (code, out, _) = run(&["ca", "status"], dir);
    assert_eq!(code, 0);
    assert!(out.contains("intermediate  active"), "{out}");

    // SIGTERM: graceful exit 0.
    unsafe_kill(server.id(), "TERM");
    let status = server.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let log = std::fs::read_to_string(dir.join("serve.log")).unwrap();
    assert!(log.contains("stopped"), "{log}");
    let token = token.trim();
    assert!(
        !log.contains(token) && !log.contains("PRIVATE KEY"),
        "secrets in logs"
    );
    // One JSON audit line per certificate, with the fields operators need.
    let audits: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["event"] == "certificate_issued")
        .collect();
    assert_eq!(audits.len(), 1, "{log}");
    for field in ["serial", "identity", "not_after", "key_type", "auth"] {
        assert!(
            audits[0].get(field).is_some(),
            "audit lacks {field}: {}",
            audits[0]
        );
    }
    assert_eq!(
        audits[0]["identity"],
        "spiffe://cluster.local/ns/shop/sa/cart"
    );
    assert_eq!(audits[0]["auth"], "jwt");
}

fn unsafe_kill(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
}

/// Starts `citadel serve --dev` as a real process in `dir`; returns it and its CA port.
fn spawn_serve(dir: &std::path::Path, extra: &[&str]) -> (std::process::Child, u16) {
    let (port, mport) = (free_port(), free_port());
    let log = std::fs::File::create(dir.join("serve.log")).unwrap();
    let mut args = vec![
        "serve".to_string(),
        "--dev".into(),
        "--listen".into(),
        format!("127.0.0.1:{port}"),
        "--metrics-listen".into(),
        format!("127.0.0.1:{mport}"),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let mut child = Command::new(BIN)
        .args(&args)
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    for _ in 0..200 {
        if dir.join("citadel-data/root-cert.pem").exists()
            && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        {
            return (child, port);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!(
        "server did not start: {}",
        std::fs::read_to_string(dir.join("serve.log")).unwrap()
    );
}

#[test]
fn operators_rotate_and_revoke_with_the_cli_while_serve_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (mut server, port) = spawn_serve(dir, &["--reconcile-interval", "200ms"]);
    let addr = format!("127.0.0.1:{port}");
    let (_, token, _) = run(
        &["dev-token", "-n", "shop", "--service-account", "frontend"],
        dir,
    );
    std::fs::write(dir.join("t.jwt"), token.trim()).unwrap();
    let request = |out: &str| {
        run(
            &[
                "request",
                "--ca-addr",
                &addr,
                "--ca-root-cert",
                "citadel-data/root-cert.pem",
                "--token-file",
                "t.jwt",
                "--out-dir",
                out,
            ],
            dir,
        )
    };
    let roots_in = |out: &str| {
        std::fs::read_to_string(dir.join(out).join("root-cert.pem"))
            .unwrap()
            .matches("BEGIN CERTIFICATE")
            .count()
    };
    let wait_for = |what: &str, f: &dyn Fn() -> bool| {
        for _ in 0..100 {
            if f() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("timed out: {what}");
    };

    let (code, _, err) = request("a");
    assert_eq!(code, 0, "{err}");
    assert_eq!(roots_in("a"), 1);

    // Planned root rotation: the running server hands out the two-root bundle.
    let (code, out, err) = run(&["ca", "rotate-root"], dir);
    assert_eq!(code, 0, "{out}{err}");
    wait_for("two-root bundle in responses", &|| {
        request("b").0 == 0 && roots_in("b") == 2
    });
    let (_, status, _) = run(&["ca", "status"], dir);
    assert!(status.contains("root rotation: prepared"), "{status}");

    // Deny the identity: the running server refuses it within a moment.
    let (code, out, err) = run(
        &[
            "revoke",
            "--identity",
            "spiffe://cluster.local/ns/shop/sa/frontend",
            "--reason",
            "key-compromise",
        ],
        dir,
    );
    assert_eq!(code, 0, "{out}{err}");
    // Every certificate issued so far (the polling above issued several) is revoked.
    let n: usize = out
        .split("revoked ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(n >= 2, "{out}");
    wait_for("PermissionDenied for a denied identity", &|| {
        let (code, _, err) = request("c");
        code == 1 && err.contains("PermissionDenied")
    });
    assert!(std::fs::read_to_string(dir.join("citadel-data/ca-crl.pem"))
        .unwrap()
        .contains("BEGIN X509 CRL"));

    unsafe_kill(server.id(), "TERM");
    assert!(server.wait().unwrap().success());
    let log = std::fs::read_to_string(dir.join("serve.log")).unwrap();
    assert!(
        log.contains("installed CA state"),
        "the server reloaded the journal:\n{log}"
    );
}

#[tokio::test]
async fn agent_once_writes_files_and_a_running_agent_reports_health_and_metrics() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (mut server, port) = spawn_serve(dir, &[]);
    let addr = format!("127.0.0.1:{port}");
    let (_, token, _) = run(
        &["dev-token", "-n", "shop", "--service-account", "cart"],
        dir,
    );
    std::fs::write(dir.join("t.jwt"), token.trim()).unwrap();
    let base = [
        "agent",
        "--ca-addr",
        &addr,
        "--ca-root-cert",
        "citadel-data/root-cert.pem",
        "--token-file",
        "t.jwt",
    ];

    let mut once = base.to_vec();
    once.extend(["--once", "--out-dir", "once"]);
    let (code, out, err) = run(&once, dir);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("spiffe://cluster.local/ns/shop/sa/cart"),
        "{out}"
    );
    assert_eq!(crate::support::file_mode(&dir.join("once/key.pem")), 0o600);
    assert_eq!(
        crate::support::file_mode(&dir.join("once")),
        0o750,
        "the agent creates its output directory without world access, whatever the umask"
    );
    for f in ["cert-chain.pem", "root-cert.pem"] {
        assert!(std::fs::read_to_string(dir.join("once").join(f))
            .unwrap()
            .contains("BEGIN CERTIFICATE"));
    }
    let (code, _, err) = run(
        &[
            "agent",
            "--ca-addr",
            &addr,
            "--ca-root-cert",
            "citadel-data/root-cert.pem",
            "--token-file",
            "t.jwt",
        ],
        dir,
    );
    assert_eq!(code, 1);
    assert!(
        err.contains("--sds-socket") && err.contains("--out-dir"),
        "{err}"
    );

    let mport = free_port();
    let mut running = base.to_vec();
    let metrics = format!("127.0.0.1:{mport}");
    running.extend([
        "--out-dir",
        "live",
        "--metrics-listen",
        &metrics,
        "--crl-file",
        "citadel-data/ca-crl.pem",
    ]);
    let mut agent = Command::new(BIN)
        .args(&running)
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let maddr: std::net::SocketAddr = metrics.parse().unwrap();
    let mut ready = false;
    for _ in 0..100 {
        if let Ok((200, body)) = crate::support::http_get(maddr, "/healthz/ready").await {
            assert!(
                body.contains("spiffe://cluster.local/ns/shop/sa/cart"),
                "{body}"
            );
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, m) = crate::support::http_get(maddr, "/metrics").await.unwrap();
    // The CRL follows the first certificate within a moment.
    for _ in 0..50 {
        if dir.join("live/ca-crl.pem").exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = agent.kill();
    let _ = agent.wait();
    unsafe_kill(server.id(), "TERM");
    let _ = server.wait();
    assert!(ready, "agent never became ready");
    for line in [
        "citadel_agent_last_renewal_result 1\n",
        "citadel_agent_renewal_retries 0\n",
        "citadel_agent_cert_expiry_timestamp ",
    ] {
        assert!(m.contains(line), "metrics lack {line:?}:\n{m}");
    }
    assert!(
        std::fs::read_to_string(dir.join("live/ca-crl.pem"))
            .unwrap()
            .contains("X509 CRL"),
        "the CRL is written beside the certificate"
    );
}

/// The log destination full (stderr on /dev/full, which fails every write with ENOSPC):
/// citadel neither panics nor drops the stream; it refuses to hand out a certificate it could
/// not audit (Unavailable, so agents retry) and counts the lost lines.
#[tokio::test]
async fn with_the_log_destination_full_no_certificate_goes_out_unaudited() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (port, mport) = (free_port(), free_port());
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let mut server = Command::new(BIN)
        .args(["serve", "--dev", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--metrics-listen", &format!("127.0.0.1:{mport}")])
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(full)
        .spawn()
        .unwrap();
    let maddr: std::net::SocketAddr = format!("127.0.0.1:{mport}").parse().unwrap();
    crate::support::eventually("the server is ready", 20, async || {
        matches!(
            crate::support::http_get(maddr, "/healthz/ready").await,
            Ok((200, _))
        )
    })
    .await;
    let mut client = citadel::client::connect(&citadel::client::ConnectOptions {
        addr: format!("127.0.0.1:{port}"),
        root_pem: std::fs::read(dir.join("citadel-data/root-cert.pem")).unwrap(),
        server_name: Some("localhost".into()),
        ..Default::default()
    })
    .await
    .unwrap();
    let (_, csr) = crate::support::csr_for(
        citadel::pki::KeyType::EcP256,
        &crate::support::spiffe("shop", "cart"),
    );
    let t = crate::support::bearer(&crate::support::token("shop", "cart"));
    for _ in 0..5 {
        let err = crate::support::call(&mut client, &csr, Some(&t), 0, None)
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
        assert!(err.message().contains("audit log"), "{err:?}");
    }
    let (_, m) = crate::support::http_get(maddr, "/metrics").await.unwrap();
    let lost: u64 = m
        .lines()
        .find_map(|l| l.strip_prefix("citadel_audit_write_failures "))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{m}"));
    assert!(lost >= 5, "{m}");
    assert!(
        m.contains("citadel_server_csr_sign_err_count{error=\"audit\"} 5"),
        "{m}"
    );
    assert!(server.try_wait().unwrap().is_none(), "the server died");
    let _ = server.kill();
    let _ = server.wait();
}
