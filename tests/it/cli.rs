//! The `citadel` binary as an operator runs it: help, errors, a real process, signals.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::{free_port, run, BIN};

#[test]
fn help_teaches_and_bad_flags_explain() {
    let tmp = tempfile::tempdir().unwrap();
    let (code, out, _) = run(&["--help"], tmp.path());
    assert_eq!(code, 0);
    for word in ["serve", "dev-token", "request", "ca", "Quick start"] {
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

/// The product binary carries no load generator: `citadel bench` moved to its own crate and
/// binary, `citadel-bench` (bench/), so nothing an operator runs as `citadel` starts a
/// benchmark (issue 21).
#[test]
fn the_product_binary_has_no_bench_subcommand() {
    let tmp = tempfile::tempdir().unwrap();
    let (code, out, _) = run(&["--help"], tmp.path());
    assert_eq!(code, 0);
    // The subcommands open the lines of the "Commands:" section indented by two spaces
    // (a wrapped description continues further in).
    let commands: Vec<&str> = out
        .split("Commands:")
        .nth(1)
        .expect("--help has a Commands section")
        .lines()
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter(|l| !l.starts_with("   "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(commands.first(), Some(&"serve"), "{commands:?}");
    assert!(
        commands.iter().all(|c| !c.contains("bench")),
        "citadel --help lists a bench subcommand: {commands:?}"
    );
    for argv in [&["bench", "--micro"][..], &["bench", "--help"]] {
        let (code, _, err) = run(argv, tmp.path());
        assert_eq!(code, 2, "citadel {argv:?} is a usage error: {err}");
        assert!(err.contains("unrecognized subcommand 'bench'"), "{err}");
    }
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

/// A caller's text in a log line stays one line: a newline-laden `ImpersonatedIdentity`
/// (sent where impersonation is off, so it is refused and logged) cannot forge a second log
/// line, and a 100 KiB one is cut short. The real binary, its plain-text log, read back.
#[tokio::test]
async fn a_newline_in_impersonated_identity_stays_on_one_log_line() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (mut server, port) = spawn_serve(dir, &[]);
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
    let forged = "spiffe://cluster.local/ns/shop/sa/pay\n2026-12-03T00:00:00.000000Z ERROR citadel::audit: FORGED-LINE\r\nlevel=error msg=FORGED-TOO";
    let long = format!("spiffe://cluster.local/ns/shop/sa/{}", "w".repeat(100_000));
    for id in [forged, long.as_str()] {
        let mut m = prost_types::Struct::default();
        m.fields.insert(
            "ImpersonatedIdentity".into(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::StringValue(id.into())),
            },
        );
        let err = crate::support::call(&mut client, &csr, Some(&t), 0, Some(m))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    }
    // The server keeps serving.
    crate::support::call(&mut client, &csr, Some(&t), 0, None)
        .await
        .unwrap();
    let _ = server.kill();
    let _ = server.wait();
    let log = std::fs::read_to_string(dir.join("serve.log")).unwrap();
    let with_forged: Vec<&str> = log.lines().filter(|l| l.contains("FORGED")).collect();
    assert_eq!(with_forged.len(), 1, "one line, not three:\n{log}");
    assert!(
        with_forged[0].contains("refused impersonation")
            && with_forged[0].contains("FORGED-TOO")
            && with_forged[0].contains(r"\n2026-12-03"),
        "the whole value, escaped, on the refusal's own line: {}",
        with_forged[0]
    );
    let longest = log.lines().map(str::len).max().unwrap_or(0);
    assert!(
        longest < 2_000,
        "a line of {longest} bytes: the value is not bounded"
    );
    assert!(log.contains("www…"), "cut with an ellipsis");
}

/// A backup signed with the operator's key: whoever can write the backup file cannot make a
/// restore install their CA (another CA's journal with its SHA-256 recomputed), nor can a
/// wrong key or a stripped signature; an unsigned backup needs --allow-unsigned. Nothing is
/// written when refused.
#[tokio::test]
async fn restore_refuses_a_forged_or_wrongly_keyed_backup() {
    use crate::support::{cli, TestCa};
    let tmp = tempfile::tempdir().unwrap();
    let ca = TestCa::start_in(tmp.path(), &[]).await;
    let state = ca.state_dir();
    ca.stop().await;
    let attacker_dir = tempfile::tempdir().unwrap();
    let attacker = TestCa::start_in(attacker_dir.path(), &[]).await;
    let attacker_state = attacker.state_dir();
    attacker.stop().await;

    let key = tmp.path().join("backup.key");
    let (ok, text) = crate::support::backup_key_cmd(key.to_str().unwrap());
    assert!(ok, "{text}");
    assert_eq!(crate::support::file_mode(&key), 0o600);
    let (ok, text) = crate::support::backup_key_cmd(key.to_str().unwrap());
    assert!(!ok && text.contains("never replaced"), "{text}");
    let other_key = tmp.path().join("other.key");
    assert!(crate::support::backup_key_cmd(other_key.to_str().unwrap()).0);

    let file = tmp.path().join("backup.json");
    let (ok, text) = cli(
        &[
            "ca",
            "backup",
            "--backup-key-file",
            key.to_str().unwrap(),
            "--out",
            file.to_str().unwrap(),
        ],
        &state,
    );
    assert!(ok && text.contains("signed with the backup key"), "{text}");

    // The forgery: the attacker's CA journal in the operator's backup, checksum recomputed.
    let mut forged: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    let evil: serde_json::Value =
        serde_json::from_slice(&std::fs::read(attacker_state.join("ca-journal.json")).unwrap())
            .unwrap();
    let evil_journal = evil.get("journal").cloned().unwrap_or(evil);
    forged["sha256"] = hex::encode(ring::digest::digest(
        &ring::digest::SHA256,
        &serde_json::to_vec(
            &serde_json::from_value::<citadel::journal::Journal>(evil_journal.clone()).unwrap(),
        )
        .unwrap(),
    ))
    .into();
    forged["journal"] = evil_journal;
    let forged_file = tmp.path().join("forged.json");
    std::fs::write(&forged_file, serde_json::to_vec_pretty(&forged).unwrap()).unwrap();
    let mut stripped = forged.clone();
    stripped.as_object_mut().unwrap().remove("hmac_sha256");
    let stripped_file = tmp.path().join("stripped.json");
    std::fs::write(
        &stripped_file,
        serde_json::to_vec_pretty(&stripped).unwrap(),
    )
    .unwrap();

    let fresh = tmp.path().join("fresh");
    let restore = |from: &std::path::Path, key: &std::path::Path, extra: &[&str]| {
        let mut args = vec![
            "ca",
            "restore",
            "--from",
            from.to_str().unwrap(),
            "--backup-key-file",
            key.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        cli(&args, &fresh)
    };
    const BAD_SIGNATURE: &str = "the backup's signature does not match --backup-key-file: \
                                 the file was altered, or signed with another key";
    const UNSIGNED: &str = "the backup is not signed, so nothing shows who wrote it";
    for (what, from, with, says) in [
        ("forged", &forged_file, &key, BAD_SIGNATURE),
        ("wrong key", &file, &other_key, BAD_SIGNATURE),
        ("stripped", &stripped_file, &key, UNSIGNED),
    ] {
        let (ok, text) = restore(from, with, &[]);
        assert!(!ok, "{what}: restored:\n{text}");
        assert!(
            text.contains(&format!("{}: {says}", from.display())),
            "{what}: {text}"
        );
        assert!(
            !fresh.join("ca-journal.json").exists(),
            "{what}: nothing written"
        );
    }
    // Unsigned only on request, with a warning; the real one with its key.
    let (ok, text) = restore(&stripped_file, &key, &["--allow-unsigned"]);
    assert!(
        ok && text.contains("warning: restoring an unsigned backup"),
        "{text}"
    );
    std::fs::remove_dir_all(&fresh).unwrap();
    let (ok, text) = restore(&file, &key, &[]);
    assert!(ok, "{text}");
    assert_eq!(
        std::fs::read(fresh.join("root-cert.pem")).unwrap(),
        std::fs::read(state.join("root-cert.pem")).unwrap(),
        "the operator's CA, not the attacker's"
    );
}

/// `restore --force` over a store that revoked and denied after the backup was taken: it
/// lists them and keeps them (a restore must not un-revoke a compromised certificate or
/// re-admit a denied identity); `--drop-newer` drops them. The restored CA serves and
/// still refuses the denied identity.
#[tokio::test]
async fn restore_force_lists_and_keeps_newer_revocations_unless_drop_newer() {
    use crate::support::{cli, csr_for, issue, spiffe, TestCa};
    let tmp = tempfile::tempdir().unwrap();
    let ca = TestCa::start_in(tmp.path(), &[]).await;
    let state = ca.state_dir();
    let (_, csr) = csr_for(citadel::pki::KeyType::EcP256, &spiffe("shop", "cart"));
    let leaf = issue(&mut ca.client().await, &csr, "shop", "cart").await;
    let serial = citadel::pki::chain::describe(
        &citadel::pki::pem::parse_certs(leaf[0].as_bytes()).unwrap()[0],
    )
    .unwrap()
    .serial_hex;
    ca.stop().await;

    let key = tmp.path().join("backup.key");
    assert!(crate::support::backup_key_cmd(key.to_str().unwrap()).0);
    let file = tmp.path().join("backup.json");
    let (k, f) = (key.to_str().unwrap(), file.to_str().unwrap());
    crate::support::citadel_ok(
        &["ca", "backup", "--backup-key-file", k, "--out", f],
        &state,
    );

    // After the backup: a revocation and a denial.
    crate::support::citadel_ok(
        &["revoke", "--serial", &serial, "--reason", "key-compromise"],
        &state,
    );
    let denied = "spiffe://cluster.local/ns/shop/sa/pay";
    crate::support::citadel_ok(
        &["revoke", "--identity", denied, "--reason", "key-compromise"],
        &state,
    );

    let journal = || -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(state.join("ca-journal.json")).unwrap()).unwrap()
    };
    let (ok, text) = cli(
        &[
            "ca",
            "restore",
            "--backup-key-file",
            k,
            "--from",
            f,
            "--force",
        ],
        &state,
    );
    assert!(ok, "{text}");
    assert!(
        text.contains(&format!("revocation: serial {serial}"))
            && text.contains(&format!("denied identity: {denied}"))
            && text.contains("keeping them"),
        "lists what it keeps:\n{text}"
    );
    let j = journal();
    let j = j.get("journal").unwrap_or(&j);
    assert!(
        j["revocations"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["serial"] == serial.as_str()),
        "the revocation is kept: {j}"
    );
    assert!(
        j["denied"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["identity"] == denied),
        "the denial is kept"
    );
    // The restored CA serves, and the denial holds.
    let ca = TestCa::start_in(tmp.path(), &[]).await;
    let (_, pay_csr) = csr_for(citadel::pki::KeyType::EcP256, &spiffe("shop", "pay"));
    let err = crate::support::call(
        &mut ca.client().await,
        &pay_csr,
        Some(&crate::support::bearer(&crate::support::token(
            "shop", "pay",
        ))),
        0,
        None,
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    issue(&mut ca.client().await, &csr, "shop", "cart").await;
    ca.stop().await;

    // Nothing newer now: listed as nothing. --drop-newer needs --force.
    let (ok, text) = cli(
        &[
            "ca",
            "restore",
            "--backup-key-file",
            k,
            "--from",
            f,
            "--drop-newer",
        ],
        &state,
    );
    assert!(!ok && text.contains("--force"), "{text}");
    let (ok, text) = cli(
        &[
            "ca",
            "restore",
            "--backup-key-file",
            k,
            "--from",
            f,
            "--force",
            "--drop-newer",
        ],
        &state,
    );
    assert!(
        ok && text.contains("dropping them (--drop-newer)"),
        "{text}"
    );
    let j = journal();
    let j = j.get("journal").unwrap_or(&j);
    assert!(j["revocations"].as_array().unwrap().is_empty(), "{j}");
    assert!(j["denied"].as_array().unwrap().is_empty(), "{j}");
}

/// The offline-root ceremony with key files (no token needed; the SoftHSM2 version is in
/// `hsm`): new-root -> init -> sign-intermediate -> install; the bad inputs refused with a
/// message that says what is wrong and nothing written; `rotate-root` refused; then a root
/// rotation as a ceremony (both root keys) starts the staged rotation.
#[test]
fn an_offline_root_ceremony_with_key_files() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let f = |n: &str| d.join(n).display().to_string();
    let ok = |args: &[&str]| {
        let (code, out, err) = run(args, d);
        assert_eq!(code, 0, "citadel {args:?}: {out}{err}");
        out
    };
    let fails = |args: &[&str], why: &str| {
        let (code, out, err) = run(args, d);
        assert_ne!(code, 0, "citadel {args:?} should fail: {out}");
        assert!(err.contains(why), "citadel {args:?}: {err}");
    };
    let (root, key, state) = (f("root.pem"), f("root-key.pem"), f("state"));
    ok(&[
        "ca",
        "new-root",
        "--trust-domain",
        "example.org",
        "--cert-out",
        &root,
        "--key-out",
        &key,
    ]);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    fails(
        &[
            "ca",
            "new-root",
            "--trust-domain",
            "example.org",
            "--cert-out",
            &root,
            "--key-out",
            &key,
        ],
        "never replaces a file",
    );
    fails(
        &[
            "ca",
            "init",
            "--trust-domain",
            "example.org",
            "--root-cert",
            &root,
            "--state-dir",
            &state,
        ],
        "--offline-root",
    );
    let csr = ok(&[
        "ca",
        "init",
        "--offline-root",
        "--trust-domain",
        "example.org",
        "--root-cert",
        &root,
        "--state-dir",
        &state,
        "--csr-out",
        &f("next.csr"),
    ]);
    assert!(csr.contains("BEGIN CERTIFICATE REQUEST"));
    assert_eq!(ok(&["ca", "intermediate-csr", "--state-dir", &state]), csr);
    // Another root's key for this root certificate.
    let (other, other_key) = (f("other.pem"), f("other-key.pem"));
    ok(&[
        "ca",
        "new-root",
        "--trust-domain",
        "example.org",
        "--cert-out",
        &other,
        "--key-out",
        &other_key,
    ]);
    fails(
        &[
            "ca",
            "sign-intermediate",
            "--root-cert",
            &root,
            "--root-key",
            &other_key,
            "--csr",
            &f("next.csr"),
        ],
        "not the key of the root certificate",
    );
    // Signed by the other root: refused at install.
    ok(&[
        "ca",
        "sign-intermediate",
        "--root-cert",
        &other,
        "--root-key",
        &other_key,
        "--csr",
        &f("next.csr"),
        "--out",
        &f("foreign.pem"),
    ]);
    fails(
        &[
            "ca",
            "install-intermediate",
            "--state-dir",
            &state,
            "--cert",
            &f("foreign.pem"),
        ],
        "does not chain to a root",
    );
    // Not a CSR.
    fails(
        &[
            "ca",
            "sign-intermediate",
            "--root-cert",
            &root,
            "--root-key",
            &key,
            "--csr",
            &root,
        ],
        "the intermediate CSR",
    );
    ok(&[
        "ca",
        "sign-intermediate",
        "--root-cert",
        &root,
        "--root-key",
        &key,
        "--csr",
        &f("next.csr"),
        "--ttl",
        "30d",
        "--out",
        &f("int.pem"),
    ]);
    let out = ok(&[
        "ca",
        "install-intermediate",
        "--state-dir",
        &state,
        "--cert",
        &f("int.pem"),
    ]);
    assert!(out.contains("active"), "{out}");
    let status = ok(&["ca", "status", "--state-dir", &state]);
    assert!(
        status.contains("offline root: the root key is held offline"),
        "{status}"
    );
    let bundle = ok(&["ca", "bundle", "--state-dir", &state]);
    let der = |t: &[u8]| citadel::pki::pem::parse_certs(t).unwrap();
    assert_eq!(der(bundle.as_bytes()), der(&std::fs::read(&root).unwrap()));
    fails(
        &["ca", "rotate-root", "--state-dir", &state],
        "held offline",
    );

    // A root rotation as a ceremony.
    ok(&[
        "ca",
        "intermediate-csr",
        "--new",
        "--state-dir",
        &state,
        "--out",
        &f("next2.csr"),
    ]);
    let (new_root, new_key) = (f("new-root.pem"), f("new-root-key.pem"));
    ok(&[
        "ca",
        "new-root",
        "--trust-domain",
        "example.org",
        "--cert-out",
        &new_root,
        "--key-out",
        &new_key,
    ]);
    ok(&[
        "ca",
        "sign-intermediate",
        "--root-cert",
        &new_root,
        "--root-key",
        &new_key,
        "--old-root-cert",
        &root,
        "--old-root-key",
        &key,
        "--csr",
        &f("next2.csr"),
        "--out",
        &f("int2.pem"),
        "--cross-out",
        &f("cross.pem"),
    ]);
    // The cross-signed certificate in place of the intermediate: refused.
    fails(
        &[
            "ca",
            "install-intermediate",
            "--state-dir",
            &state,
            "--cert",
            &f("cross.pem"),
            "--new-root",
            &new_root,
            "--cross-cert",
            &f("cross.pem"),
        ],
        "not signed by --new-root",
    );
    let out = ok(&[
        "ca",
        "install-intermediate",
        "--state-dir",
        &state,
        "--cert",
        &f("int2.pem"),
        "--new-root",
        &new_root,
        "--cross-cert",
        &f("cross.pem"),
    ]);
    assert!(out.contains("root rotation prepared"), "{out}");
    let v: serde_json::Value =
        serde_json::from_str(&ok(&["ca", "status", "--state-dir", &state, "--json"])).unwrap();
    assert_eq!(v["root_rotation"]["trigger"], "ceremony", "{v}");
    assert_eq!(v["root_rotation"]["stage"], "preparing", "{v}");
    let bundle = ok(&["ca", "bundle", "--state-dir", &state]);
    assert!(
        bundle.matches("BEGIN CERTIFICATE").count() == 2,
        "both roots: {bundle}"
    );
}
