//! Revocation while the server runs: by serial and by identity, through the real CLI, with
//! openssl checking the CRLs. And root rotation driven by the CLI against a running server.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use citadel::pki::{chain, pem, KeyType};
use tonic::Code;

use crate::support::*;

fn serial_of(chain_pem: &[String]) -> String {
    chain::describe(&pem::parse_certs(chain_pem[0].as_bytes()).unwrap()[0])
        .unwrap()
        .serial_hex
}

#[tokio::test]
async fn revoking_a_serial_and_an_identity_takes_effect_without_restart() {
    let ca = TestCa::start(&["--reconcile-interval", "100ms"]).await;
    let state = ca.state_dir();
    let mut client = ca.client().await;
    let (cart_key, cart_csr) = csr_for(KeyType::EcP256, &spiffe("shop", "cart"));
    let (front_key, front_csr) = csr_for(KeyType::EcP256, &spiffe("shop", "frontend"));
    let cart = issue(&mut client, &cart_csr, "shop", "cart").await;
    let front = issue(&mut client, &front_csr, "shop", "frontend").await;
    let mtls = |chain: &[String], key: &rcgen::KeyPair| {
        Some((
            chain[..2].concat().into_bytes(),
            key.serialize_pem().into_bytes(),
        ))
    };

    // Bad input changes nothing.
    let journal_before = std::fs::read(state.join("ca-journal.json")).unwrap();
    for (args, says) in [
        (
            vec!["revoke", "--serial", "not-hex"],
            "not a certificate serial",
        ),
        (vec!["revoke", "--serial", "abcdef"], "no live certificate"),
        (
            vec![
                "revoke",
                "--identity",
                "spiffe://other.domain/ns/shop/sa/cart",
            ],
            "outside this CA's trust domain",
        ),
        (vec!["revoke", "--identity", "not a spiffe id"], "invalid"),
        (vec!["revoke"], "required"),
    ] {
        let (ok, out) = cli(&args, &state);
        assert!(!ok && out.contains(says), "{args:?}: {out}");
    }
    assert_eq!(
        std::fs::read(state.join("ca-journal.json")).unwrap(),
        journal_before,
        "failed commands change nothing"
    );

    // 1. Revoke the cart's certificate by serial.
    let serial = serial_of(&cart);
    let (ok, out) = cli(
        &[
            "revoke",
            "--serial",
            &serial.to_uppercase(),
            "--reason",
            "key-compromise",
        ],
        &state,
    );
    assert!(ok, "{out}");
    let (ok, out) = cli(&["revoke", "--serial", &serial], &state);
    assert!(!ok && out.contains("already revoked"), "twice: {out}");

    // Renewal with the revoked certificate is refused, once the server has reloaded.
    eventually("revoked certificate cannot renew", 5, async || {
        let (c, k) = (cart.clone(), cart_key.serialize_pem());
        let csr = cart_csr.clone();
        let ca = &ca;
        {
            let mut m = ca.client_with(Some((c[..2].concat().into_bytes(), k.into_bytes()))).await;
            matches!(call(&mut m, &csr, None, 0, None).await, Err(s) if s.code() == Code::Unauthenticated && s.message().contains("revoked"))
        }
    })
    .await;
    // ...but the cart identity itself is not denied: its token still works.
    issue(&mut client, &cart_csr, "shop", "cart").await;
    // The frontend still renews by certificate.
    let mut m = ca.client_with(mtls(&front, &front_key)).await;
    call(&mut m, &front_csr, None, 0, None).await.unwrap();

    // 2. Deny the frontend identity: no new certificates by token or by renewal.
    let (ok, out) = cli(
        &[
            "revoke",
            "--identity",
            "spiffe://cluster.local/ns/shop/sa/frontend",
        ],
        &state,
    );
    assert!(ok && out.contains("revoked 2 live certificate(s)"), "{out}");
    let (ok, out) = cli(
        &[
            "revoke",
            "--identity",
            "spiffe://cluster.local/ns/shop/sa/frontend",
        ],
        &state,
    );
    assert!(!ok && out.contains("already denied"), "{out}");
    eventually("denied identity gets PermissionDenied", 5, async || {
        let mut c = client.clone();
        let csr = front_csr.clone();
        matches!(call(&mut c, &csr, Some(&bearer(&token("shop", "frontend"))), 0, None).await, Err(s) if s.code() == Code::PermissionDenied)
    })
    .await;
    let mut m = ca.client_with(mtls(&front, &front_key)).await;
    assert_eq!(
        call(&mut m, &front_csr, None, 0, None)
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );

    let metrics = ca.metrics().await;
    // The cart's serial and the frontend's two live certificates; possibly more: a request
    // polling above may have signed just before the denial was installed, and was then
    // refused and its certificate revoked by the sweep.
    let entries: usize = metrics
        .lines()
        .find_map(|l| l.strip_prefix("citadel_ca_crl_entries "))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{metrics}"));
    assert!(entries >= 3, "{metrics}");
    assert!(
        metrics.contains("citadel_ca_revoked_identities 1\n"),
        "{metrics}"
    );

    // 3. The CRLs verify with openssl and list exactly the revoked serials.
    if require_tool("openssl") {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        std::fs::write(d.join("root.pem"), &cart[2]).unwrap();
        std::fs::write(d.join("int.pem"), &cart[1]).unwrap();
        std::fs::write(d.join("leaf-cart.pem"), &cart[0]).unwrap();
        std::fs::write(
            d.join("leaf-other.pem"),
            &issue(&mut client, &cart_csr, "shop", "cart").await[0],
        )
        .unwrap();
        std::fs::write(d.join("chain.pem"), format!("{}{}", cart[1], cart[2])).unwrap();
        let crls = ::pem::parse_many(std::fs::read(state.join("ca-crl.pem")).unwrap()).unwrap();
        assert_eq!(crls.len(), 2, "one CRL per authority (root, intermediate)");
        let mut listed = String::new();
        for (i, c) in crls.iter().enumerate() {
            std::fs::write(d.join(format!("crl{i}.pem")), ::pem::encode(c)).unwrap();
            let out = Command::new("openssl")
                .args([
                    "crl",
                    "-in",
                    &format!("crl{i}.pem"),
                    "-CAfile",
                    "chain.pem",
                    "-verify",
                    "-noout",
                    "-text",
                ])
                .current_dir(d)
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr);
            assert!(
                out.status.success() && text.contains("verify OK"),
                "openssl crl -verify: {text}"
            );
            listed.push_str(&text.to_lowercase());
        }
        assert!(listed.contains(&serial), "CRL lists {serial}:\n{listed}");
        assert!(listed.contains("key compromise"), "reason recorded");
        // And openssl's chain check with CRLs: the revoked leaf fails, a fresh one passes.
        let check = |leaf: &str| {
            let out = Command::new("openssl")
                .args([
                    "verify",
                    "-crl_check",
                    "-CRLfile",
                    "crl0.pem",
                    "-CRLfile",
                    "crl1.pem",
                    "-CAfile",
                    "root.pem",
                    "-untrusted",
                    "int.pem",
                    leaf,
                ])
                .current_dir(d)
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr)
        };
        assert!(
            check("leaf-cart.pem").contains("certificate revoked"),
            "{}",
            check("leaf-cart.pem")
        );
        assert!(
            check("leaf-other.pem").contains("leaf-other.pem: OK"),
            "{}",
            check("leaf-other.pem")
        );
    }
    let (ok, out) = cli(&["ca", "crl"], &state);
    assert!(ok && out.matches("BEGIN X509 CRL").count() == 2, "{out}");
    let (ok, out) = cli(&["ca", "status"], &state);
    assert!(
        ok && out.contains(&format!(
            "{entries} revoked certificate(s), 1 denied identity"
        )),
        "{out}"
    );
    ca.stop().await;
}

/// Serials on the CRLs in `<state>/ca-crl.pem`.
fn crl_serials(state: &Path) -> std::collections::HashSet<String> {
    use x509_parser::prelude::FromDer;
    use x509_parser::revocation_list::CertificateRevocationList;
    let text = std::fs::read(state.join("ca-crl.pem")).unwrap_or_default();
    let mut out = std::collections::HashSet::new();
    for b in ::pem::parse_many(text).unwrap() {
        let (_, crl) = CertificateRevocationList::from_der(b.contents()).unwrap();
        for r in crl.iter_revoked_certificates() {
            out.insert(chain::serial_hex(r.raw_serial()));
        }
    }
    out
}

/// `revoke --identity` under steady load. The CLI reads the issuance index and writes the
/// denial; the server goes on signing with what it has until it loads the denial (here up to
/// a 1s reconcile interval later). Every certificate of the identity handed out, including
/// those signed in that window, must end up on the CRL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denial_revokes_every_certificate_signed_while_it_was_being_applied() {
    let ca = TestCa::start(&["--reconcile-interval", "1s"]).await;
    let state = ca.state_dir();
    let victim = spiffe("shop", "cart");
    let (_, csr) = csr_for(KeyType::EcP256, &victim);
    let stop = Arc::new(AtomicBool::new(false));
    let refused = Arc::new(AtomicUsize::new(0));
    let handed_out = Arc::new(Mutex::new(Vec::new()));
    let mut load = Vec::new();
    for _ in 0..6 {
        let (mut client, csr) = (ca.client().await, csr.clone());
        let (stop, refused, handed_out) = (stop.clone(), refused.clone(), handed_out.clone());
        load.push(tokio::spawn(async move {
            let auth = bearer(&token("shop", "cart"));
            while !stop.load(Ordering::Relaxed) {
                match call(&mut client, &csr, Some(&auth), 0, None).await {
                    Ok(chain) => handed_out.lock().unwrap().push(serial_of(&chain)),
                    Err(s) if s.code() == Code::PermissionDenied => {
                        refused.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(s) => panic!("unexpected refusal under load: {s:?}"),
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (ok, out) = tokio::task::spawn_blocking({
        let state = state.clone();
        move || {
            cli(
                &["revoke", "--identity", &spiffe("shop", "cart").to_string()],
                &state,
            )
        }
    })
    .await
    .unwrap();
    assert!(ok, "{out}");
    let before_server = handed_out.lock().unwrap().len();
    eventually("the server refuses the denied identity", 5, async || {
        let r = refused.clone();
        r.load(Ordering::Relaxed) > 0
    })
    .await;
    // A little more load after the denial is in force: all refused.
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.await.unwrap();
    }
    let handed_out: Vec<String> = std::mem::take(&mut *handed_out.lock().unwrap());
    assert!(
        handed_out.len() > before_server,
        "the test must exercise the window: certificates were signed after the CLI wrote the denial ({} before, {} in all)",
        before_server,
        handed_out.len()
    );
    eventually(
        "every certificate handed out is on the CRL",
        5,
        async || {
            let (state, handed_out) = (state.clone(), handed_out.clone());
            {
                let crl = crl_serials(&state);
                handed_out.iter().all(|s| crl.contains(s))
            }
        },
    )
    .await;
    let crl = crl_serials(&state);
    let missing = handed_out.iter().filter(|s| !crl.contains(*s)).count();
    assert_eq!(missing, 0, "of {} handed out", handed_out.len());
    // The server keeps serving everyone else.
    let (_, other) = csr_for(KeyType::EcP256, &spiffe("shop", "frontend"));
    issue(&mut ca.client().await, &other, "shop", "frontend").await;
    ca.stop().await;
}

#[tokio::test]
async fn root_rotation_from_the_cli_reaches_a_running_server() {
    let ca = TestCa::start(&["--reconcile-interval", "100ms"]).await;
    let state = ca.state_dir();
    let mut client = ca.client().await;
    let id = spiffe("shop", "cart");
    let (_, csr) = csr_for(KeyType::EcP256, &id);
    let t = bearer(&token("shop", "cart"));
    let before = call(&mut client, &csr, Some(&t), 0, None).await.unwrap();
    assert_eq!(pem::parse_certs(before[2].as_bytes()).unwrap().len(), 1);

    // Planned rotation: the new root is published at once, the old chain keeps signing.
    let (ok, out) = cli(&["ca", "rotate-root"], &state);
    assert!(ok, "{out}");
    assert_eq!(
        pem::parse_certs(&std::fs::read(state.join("root-cert.pem")).unwrap())
            .unwrap()
            .len(),
        2
    );
    let (ok, out) = cli(&["ca", "rotate-root"], &state);
    assert!(!ok && out.contains("already in progress"), "{out}");
    let (_, status) = cli(&["ca", "status"], &state);
    assert!(
        status.contains("root rotation: prepared (operator)"),
        "{status}"
    );
    eventually("responses carry the two-root bundle", 5, async || {
        let (mut c, csr, t) = (client.clone(), csr.clone(), t.clone());
        {
            pem::parse_certs(call(&mut c, &csr, Some(&t), 0, None).await.unwrap()[2].as_bytes())
                .unwrap()
                .len()
                == 2
        }
    })
    .await;
    let during = call(&mut client, &csr, Some(&t), 0, None).await.unwrap();
    assert_eq!(
        during[1], before[1],
        "still the old intermediate until activation"
    );
    ca.stop().await;
}

#[tokio::test]
async fn emergency_rotation_activates_at_once_and_old_bundle_holders_still_verify() {
    let ca = TestCa::start(&["--reconcile-interval", "100ms"]).await;
    let state = ca.state_dir();
    let old_root = ca.root_pem();
    let mut client = ca.client().await;
    let id = spiffe("shop", "cart");
    let (_, csr) = csr_for(KeyType::EcP256, &id);
    let t = bearer(&token("shop", "cart"));
    let (ok, out) = cli(
        &["ca", "rotate-root", "--now", "--retire-after", "1h"],
        &state,
    );
    assert!(ok && out.contains("stage activated"), "{out}");
    eventually("the new chain signs", 5, async || {
        let (mut c, csr, t) = (client.clone(), csr.clone(), t.clone());
        call(&mut c, &csr, Some(&t), 0, None).await.unwrap().len() == 4
    })
    .await;
    let chain = call(&mut client, &csr, Some(&t), 0, None).await.unwrap();
    // [leaf, the new intermediate cross-signed by the old root, the new intermediate, bundle].
    let leaf = pem::parse_certs(chain[0].as_bytes()).unwrap();
    let ints: Vec<_> = chain[1..3]
        .iter()
        .flat_map(|p| pem::parse_certs(p.as_bytes()).unwrap())
        .collect();
    let now = time::OffsetDateTime::now_utc();
    let old_only = pem::parse_certs(&old_root).unwrap();
    chain::verify_leaf(
        &leaf[0],
        &ints[..1],
        &old_only,
        now,
        chain::Usage::ClientAuth,
    )
    .expect("old bundle verifies via the cross-signed intermediate");
    let bundle = pem::parse_certs(chain[3].as_bytes()).unwrap();
    assert_eq!(
        bundle.len(),
        2,
        "the bundle keeps the old root while cross-signed chains live"
    );
    let new_only: Vec<_> = bundle
        .into_iter()
        .filter(|r| r.as_ref() != old_only[0].as_ref())
        .collect();
    chain::verify_leaf(
        &leaf[0],
        &ints[1..],
        &new_only,
        now,
        chain::Usage::ClientAuth,
    )
    .expect("new root verifies the regular intermediate");
    // A client that still trusts only the OLD root can reach the CA (its serving chain
    // carries the cross-signed intermediate) and so can fetch the new bundle.
    let mut old_trust = citadel::client::connect(&citadel::client::ConnectOptions {
        addr: ca.addr.to_string(),
        root_pem: old_root.clone(),
        server_name: Some("localhost".into()),
        ..Default::default()
    })
    .await
    .expect("the CA's serving chain verifies with the old root alone");
    let fresh = issue(&mut old_trust, &csr, "shop", "cart").await;
    assert_eq!(
        pem::parse_certs(fresh[3].as_bytes()).unwrap().len(),
        2,
        "and it hands out the two-root bundle"
    );
    if require_tool("openssl") {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("leaf.pem"), &chain[0]).unwrap();
        std::fs::write(
            tmp.path().join("ints.pem"),
            format!("{}{}", chain[1], chain[2]),
        )
        .unwrap();
        std::fs::write(tmp.path().join("old.pem"), &old_root).unwrap();
        let out = Command::new("openssl")
            .args([
                "verify",
                "-CAfile",
                "old.pem",
                "-untrusted",
                "ints.pem",
                "leaf.pem",
            ])
            .current_dir(tmp.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "openssl with the old root only: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    ca.stop().await;
}
