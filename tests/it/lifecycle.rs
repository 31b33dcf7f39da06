//! Restarts, concurrency, readiness and shutdown.

use std::collections::HashSet;
use std::sync::Arc;

use citadel::ca::bootstrap::{self, CaOptions};
use citadel::ca::Ca;
use citadel::client::verify_response;
use citadel::pki::{pem, KeyType};
use citadel::store::file::FileStore;

use crate::support::*;

#[tokio::test]
async fn restart_keeps_the_same_ca() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = TestCa::start_in(tmp.path(), &[]).await;
    let root_before = ca.root_pem();
    let id = spiffe("shop", "cart");
    let (_, csr) = csr_for(KeyType::EcP256, &id);
    let old = issue(&mut ca.client().await, &csr, "shop", "cart").await;
    ca.stop().await;

    let ca = TestCa::start_in(tmp.path(), &["--ca-key-type", "rsa-2048"]).await;
    assert_eq!(
        ca.root_pem(),
        root_before,
        "same root after restart (key type flag ignored once the CA exists)"
    );
    let new = issue(&mut ca.client().await, &csr, "shop", "cart").await;
    assert_eq!(old[1], new[1], "same intermediate");
    // A certificate from before the restart still verifies against the bundle after it.
    let bundle_now = String::from_utf8(ca.root_pem()).unwrap();
    let mut old_with_new_bundle = old.clone();
    *old_with_new_bundle.last_mut().unwrap() = bundle_now;
    verify_response(
        &old_with_new_bundle,
        Some(&id),
        time::OffsetDateTime::now_utc(),
    )
    .unwrap();
    ca.stop().await;

    // A different trust domain on the same state is refused with a clear message.
    let err = TestCa::try_start_in(tmp.path(), &["--trust-domain", "prod.example"])
        .await
        .err()
        .unwrap();
    assert!(
        err.contains("trust domain") && err.contains("cluster.local"),
        "{err}"
    );
}

#[tokio::test]
async fn key_files_are_private_and_keys_stay_out_of_logs() {
    let ca = TestCa::start(&[]).await;
    let state = ca.state_dir();
    let mode = |p: &str| file_mode(&state.join(p));
    assert_eq!(mode("ca-journal.json"), 0o600);
    assert_eq!(mode("root-cert.pem"), 0o644);
    let journal = std::fs::read_to_string(state.join("ca-journal.json")).unwrap();
    assert!(journal.contains("PRIVATE KEY"));
    let bundle = String::from_utf8(ca.root_pem()).unwrap();
    assert!(!bundle.contains("PRIVATE"), "the bundle holds no key");
    ca.stop().await;
}

#[tokio::test]
async fn two_hundred_concurrent_requests_all_succeed_with_distinct_serials() {
    let ca = TestCa::start(&[]).await;
    let client = ca.client().await;
    let mut tasks = Vec::new();
    for i in 0..200 {
        let mut c = client.clone();
        let sa = format!("w{i}");
        let (t, (_, csr)) = (
            token("load", &sa),
            csr_for(KeyType::EcP256, &spiffe("load", &sa)),
        );
        tasks.push(tokio::spawn(async move {
            let chain = call(&mut c, &csr, Some(&bearer(&t)), 0, None)
                .await
                .unwrap();
            let v = verify_response(
                &chain,
                Some(&spiffe("load", &sa)),
                time::OffsetDateTime::now_utc(),
            )
            .unwrap();
            v.leaf.serial_hex
        }));
    }
    let mut serials = HashSet::new();
    for t in tasks {
        assert!(serials.insert(t.await.unwrap()), "duplicate serial");
    }
    assert_eq!(serials.len(), 200);
    ca.stop().await;
}

#[tokio::test]
async fn concurrent_first_starts_on_one_state_dir_make_one_ca() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Arc::new(FileStore::open(tmp.path()).unwrap());
    let opts = CaOptions::new(td());
    let clock = citadel::clock::system();
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (store, opts, clock) = (store.clone(), opts.clone(), clock.clone());
        tasks.push(tokio::spawn(async move {
            let (_, signer) = bootstrap::load_or_create(store.as_ref(), &opts, clock.as_ref())
                .await
                .unwrap();
            signer.roots_pem().to_string()
        }));
    }
    let mut roots = HashSet::new();
    for t in tasks {
        roots.insert(t.await.unwrap());
    }
    assert_eq!(roots.len(), 1, "every starter ends with the same single CA");
}

#[tokio::test]
async fn a_server_without_a_ca_answers_unavailable_then_recovers() {
    citadel::install_crypto_provider();
    let ca = Ca::new();
    let server = dev_server(ca.clone(), None);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let metrics = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (addr, maddr) = (
        listener.local_addr().unwrap(),
        metrics.local_addr().unwrap(),
    );
    let (trigger, sd) = citadel::shutdown::channel();
    let task = tokio::spawn(server.run(listener, Some(metrics), sd));

    let mut client = plaintext_client(addr).await;
    let (_, csr) = csr_for(KeyType::EcP256, &spiffe("shop", "cart"));
    let t = bearer(&token("shop", "cart"));
    let err = call(&mut client, &csr, Some(&t), 0, None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    let (code, body) = http_get(maddr, "/healthz/ready").await.unwrap();
    assert_eq!(code, 503);
    assert!(body.contains("no signing CA"), "{body}");

    // Installing a signer makes the same server ready, without a restart.
    let journal =
        bootstrap::new_journal(&CaOptions::new(td()), time::OffsetDateTime::now_utc()).unwrap();
    ca.install(bootstrap::signer_from_journal(&journal, &td()).unwrap());
    let chain = call(&mut client, &csr, Some(&t), 0, None).await.unwrap();
    assert_eq!(pem::parse_certs(chain[2].as_bytes()).unwrap().len(), 1);
    assert_eq!(http_get(maddr, "/healthz/ready").await.unwrap().0, 200);
    trigger.trigger();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_new_signer_takes_effect_for_tls_and_issuance_without_restart() {
    use citadel::server::tls::TlsState;
    citadel::install_crypto_provider();
    let now = time::OffsetDateTime::now_utc();
    let make = || {
        bootstrap::signer_from_journal(
            &bootstrap::new_journal(&CaOptions::new(td()), now).unwrap(),
            &td(),
        )
        .unwrap()
    };
    let (a, b) = (make(), make());
    let (root_a, root_b) = (a.roots_pem().to_string(), b.roots_pem().to_string());
    let ca = Ca::new();
    ca.install(a);
    let tls = TlsState::new(vec!["localhost".into()]).unwrap();
    tls.refresh(&ca.current().unwrap(), now).unwrap();
    let server = dev_server(ca.clone(), Some(tls));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (trigger, sd) = citadel::shutdown::channel();
    let task = tokio::spawn(server.run(listener, None, sd));
    let connect = |root: String| {
        let opts = citadel::client::ConnectOptions {
            addr: addr.to_string(),
            root_pem: root.into_bytes(),
            server_name: Some("localhost".into()),
            ..Default::default()
        };
        async move { citadel::client::connect(&opts).await }
    };
    let (_, csr) = csr_for(KeyType::EcP256, &spiffe("shop", "cart"));
    let t = bearer(&token("shop", "cart"));
    let mut old = connect(root_a.clone()).await.unwrap();
    assert_eq!(
        call(&mut old, &csr, Some(&t), 0, None).await.unwrap()[2],
        root_a
    );

    ca.install(b);
    // The serving certificate follows the new CA within a moment.
    let mut new = until(
        "a client trusting only the new root connects",
        2,
        async || match connect(root_b.clone()).await {
            Ok(mut c) => match call(&mut c, &csr, Some(&t), 0, None).await {
                Ok(_) => Ok(c),
                Err(e) => Err(format!("connected, but the call failed: {e:?}")),
            },
            Err(e) => Err(format!("cannot connect: {e:?}")),
        },
    )
    .await;
    assert_eq!(
        call(&mut new, &csr, Some(&t), 0, None).await.unwrap()[2],
        root_b
    );
    // The connection opened before the swap keeps working and now gets the new chain.
    assert_eq!(
        call(&mut old, &csr, Some(&t), 0, None).await.unwrap()[2],
        root_b
    );
    trigger.trigger();
    task.await.unwrap().unwrap();
}

/// A journal citadel cannot trust is refused at start, named, and never overwritten: an
/// unknown format (a newer or foreign layout), and a key that does not match its
/// certificate.
#[tokio::test]
async fn a_journal_it_cannot_trust_is_refused_named_and_left_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = TestCa::start_in(tmp.path(), &[]).await;
    let state = ca.state_dir();
    ca.stop().await;
    let path = state.join("ca-journal.json");
    let good: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();

    let mut newer = good.clone();
    newer["journal"]["format"] = serde_json::json!(2);
    let mut swapped = good.clone();
    // The root's key in place of the intermediate's: parses, but cannot sign for its cert.
    let auths = swapped["journal"]["authorities"].as_array_mut().unwrap();
    let root_key = auths.iter().find(|a| a["role"] == "root").unwrap()["key_pem"].clone();
    for a in auths.iter_mut().filter(|a| a["role"] == "intermediate") {
        a["key_pem"] = root_key.clone();
    }
    for (bad, says) in [
        (newer, "journal format 2"),
        (swapped, "private key does not match"),
    ] {
        let bytes = serde_json::to_vec_pretty(&bad).unwrap();
        std::fs::write(&path, &bytes).unwrap();
        let err = TestCa::try_start_in(tmp.path(), &[]).await.err().unwrap();
        assert!(err.contains(says), "{err}");
        assert!(
            err.contains(&state.display().to_string()),
            "the error names where the journal is: {err}"
        );
        assert!(
            !err.contains("PRIVATE KEY"),
            "no key material in errors: {err}"
        );
        assert_eq!(std::fs::read(&path).unwrap(), bytes, "left as it was");
    }
}

/// `ca backup` and `ca restore` with the real binary: the whole CA round-trips, the file is
/// 0600 and checksummed, damage is refused before anything is written, and a CA that is
/// already there is only replaced with --force.
#[tokio::test]
async fn backup_and_restore_round_trip_the_ca() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = TestCa::start_in(tmp.path(), &[]).await;
    let state = ca.state_dir();
    let id = spiffe("shop", "cart");
    let (_, csr) = csr_for(KeyType::EcP256, &id);
    let leaf = issue(&mut ca.client().await, &csr, "shop", "cart").await;
    let root = ca.root_pem();
    ca.stop().await;

    let file = tmp.path().join("backup.json");
    let out = file.to_str().unwrap();
    let key = tmp.path().join("backup.key");
    let k = key.to_str().unwrap();
    let (ok, text) = crate::support::backup_key_cmd(k);
    assert!(ok, "{text}");
    let (ok, text) = cli(
        &["ca", "backup", "--backup-key-file", k, "--out", out],
        &state,
    );
    assert!(ok && text.contains("mode 0600"), "{text}");
    assert_eq!(file_mode(&file), 0o600);

    // Damage is refused, and nothing is written.
    let fresh = tmp.path().join("fresh");
    let mut bad: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    bad["journal"]["denied"] = serde_json::json!([{"identity": "x", "since": 1, "reason": "r"}]);
    let bad_file = tmp.path().join("bad.json");
    std::fs::write(&bad_file, serde_json::to_vec(&bad).unwrap()).unwrap();
    let (ok, text) = cli(
        &[
            "ca",
            "restore",
            "--backup-key-file",
            k,
            "--from",
            bad_file.to_str().unwrap(),
        ],
        &fresh,
    );
    assert!(!ok && text.contains("checksum"), "{text}");
    assert!(!fresh.join("ca-journal.json").exists());

    // Not over an existing CA without --force.
    let (ok, text) = cli(
        &["ca", "restore", "--backup-key-file", k, "--from", out],
        &state,
    );
    assert!(!ok && text.contains("--force"), "{text}");

    // Into an empty directory: the same CA serves again, and the old leaf still verifies.
    let (ok, text) = cli(
        &["ca", "restore", "--backup-key-file", k, "--from", out],
        &fresh,
    );
    assert!(ok, "{text}");
    assert_eq!(file_mode(&fresh.join("ca-journal.json")), 0o600);
    let restored_dir = tempfile::tempdir().unwrap();
    std::fs::rename(&fresh, restored_dir.path().join("state")).unwrap();
    let ca = TestCa::start_in(restored_dir.path(), &[]).await;
    assert_eq!(ca.root_pem(), root, "the same root");
    let again = issue(&mut ca.client().await, &csr, "shop", "cart").await;
    assert_eq!(again[1], leaf[1], "the same intermediate signs");
    verify_response(&leaf, Some(&id), time::OffsetDateTime::now_utc()).unwrap();
    ca.stop().await;

    // --force replaces what is there.
    let (ok, text) = cli(
        &[
            "ca",
            "restore",
            "--backup-key-file",
            k,
            "--from",
            out,
            "--force",
        ],
        &state,
    );
    assert!(ok, "{text}");
}
