//! The SPIFFE Broker API on the CA port against a REAL kube-apiserver, called by a broker
//! built on go-spiffe's generated Broker API client (tests/gobroker, go-spiffe v2.9.0's
//! `exp/proto/spiffe/broker`; every SVID and bundle it receives is checked by go-spiffe's
//! x509svid / x509bundle / jwtsvid). Nodes and pods are API objects only (no kubelet): a pod
//! is on a node because its spec.nodeName says so. The broker presents its X509-SVID (issued
//! by this CA from its pod-bound token) and that token.

use std::path::{Path, PathBuf};
use std::time::Duration;

use citadel::pki::KeyType;
use serde_json::Value;

use crate::support::*;

const BROKER: &str = "spiffe://cluster.local/ns/spire/sa/broker";
const CART: &str = "spiffe://cluster.local/ns/shop/sa/cart";
/// `pki::profile::NODE_ISSUED_OID`, dotted.
const NODE_ISSUED: &str = "1.3.6.1.4.1.99999.7411.1";

fn gobroker() -> Option<PathBuf> {
    crate::thirdparty::built_program("CITADEL_GOBROKER", "the go-spiffe Broker API client")
}

/// One broker's credentials on disk: its SVID chain and key (PEM), its token.
struct Creds {
    cert: PathBuf,
    key: PathBuf,
    token: PathBuf,
}

async fn creds(ca: &TestCa, dir: &Path, name: &str, id: &str, token: &str) -> Creds {
    let key = KeyType::EcP256.generate().unwrap();
    let csr = citadel::pki::csr::build(&key, id).unwrap();
    let chain = call(&mut ca.client().await, &csr, Some(&bearer(token)), 0, None)
        .await
        .unwrap();
    let c = Creds {
        cert: dir.join(format!("{name}.pem")),
        key: dir.join(format!("{name}-key.pem")),
        token: dir.join(format!("{name}.token")),
    };
    std::fs::write(&c.cert, chain[..chain.len() - 1].concat()).unwrap();
    std::fs::write(&c.key, key.serialize_pem()).unwrap();
    std::fs::write(&c.token, token).unwrap();
    c
}

/// How one run presents itself.
#[derive(Clone, Copy)]
struct As<'a> {
    cert: Option<&'a Creds>,
    token: Option<&'a Creds>,
    header: bool,
}

/// Runs gobroker; its JSON lines (one per message, or the error's code and message).
async fn run(
    bin: &Path,
    ca: &TestCa,
    root: &Path,
    who: As<'_>,
    extra: &[&str],
    call: &[&str],
) -> Vec<Value> {
    let mut cmd = tokio::process::Command::new(bin);
    cmd.arg("-addr")
        .arg(ca.addr.to_string())
        .arg("-ca")
        .arg(root);
    if let Some(c) = who.cert {
        cmd.arg("-cert").arg(&c.cert).arg("-key").arg(&c.key);
    }
    if let Some(c) = who.token {
        cmd.arg("-token").arg(&c.token);
    }
    if !who.header {
        cmd.arg("-no-header");
    }
    cmd.args(extra).args(call);
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("gobroker finishes")
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        matches!(out.status.code(), Some(0 | 1)),
        "gobroker {call:?} failed locally: {stderr}"
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

async fn metric(ca: &TestCa, series: &str) -> u64 {
    ca.metrics()
        .await
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn broker_api_gets_svids_of_pods_on_its_node_only() {
    let Some(kube) = KubeEnv::start().await else {
        return;
    };
    let Some(bin) = gobroker() else {
        return;
    };
    kube.node("n1").await;
    kube.node("n2").await;
    for sa in ["broker", "imposter"] {
        kube.service_account("spire", sa).await;
    }
    let broker_uid = kube
        .pod_on("spire", "broker-n1", "broker", Some("n1"))
        .await;
    let imposter_uid = kube
        .pod_on("spire", "imposter-n1", "imposter", Some("n1"))
        .await;
    for sa in ["cart", "pay", "batch", "late"] {
        kube.service_account("shop", sa).await;
    }
    let cart_uid = kube.pod_on("shop", "cart-1", "cart", Some("n1")).await;
    kube.pod_on("shop", "pay-1", "pay", Some("n2")).await;
    kube.pod_on("shop", "batch-1", "batch", Some("n1")).await;
    kube.set_phase("shop", "batch-1", "Failed").await;

    let kubeconfig = kube.kubeconfig.to_str().unwrap().to_string();
    // The server's clock is a ManualClock near real time, moved below to make the SVID due
    // for renewal without waiting half a day.
    let clock = citadel::clock::ManualClock::new(time::OffsetDateTime::now_utc());
    let ca = TestCa::start_on_clock(
        std::sync::Arc::new(clock.clone()),
        &[
            "--kubeconfig",
            &kubeconfig,
            "--auth",
            "tokenreview",
            "--broker-ids",
            BROKER,
        ],
    )
    .await;
    eventually("the pod index syncs", 30, async || {
        metric(&ca, "citadel_pod_index_synced").await == 1
    })
    .await;
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root.pem");
    std::fs::write(&root, ca.root_pem()).unwrap();

    let broker_token = kube
        .pod_token("spire", "broker", "broker-n1", &broker_uid)
        .await;
    let broker = creds(&ca, tmp.path(), "broker", BROKER, &broker_token).await;
    let imposter_token = kube
        .pod_token("spire", "imposter", "imposter-n1", &imposter_uid)
        .await;
    let imposter = creds(
        &ca,
        tmp.path(),
        "imposter",
        "spiffe://cluster.local/ns/spire/sa/imposter",
        &imposter_token,
    )
    .await;
    let ok_as = As {
        cert: Some(&broker),
        token: Some(&broker),
        header: true,
    };

    // The pod's X509-SVID: go-spiffe parses key and chain and verifies it against the
    // bundle in the same message; the leaf is marked node-issued.
    let svid = run(&bin, &ca, &root, ok_as, &[], &["x509", "shop", "cart-1"]).await;
    assert_eq!(svid.len(), 1, "{svid:?}");
    assert_eq!(svid[0]["code"], "OK", "{svid:?}");
    assert_eq!(svid[0]["spiffe_id"], CART);
    assert_eq!(svid[0]["key"], "*ecdsa.PrivateKey");
    assert_eq!(svid[0]["roots"], 1);
    assert!(
        svid[0]["ext"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e == NODE_ISSUED),
        "{svid:?}"
    );
    // With the pod's UID too.
    let pinned = run(
        &bin,
        &ca,
        &root,
        ok_as,
        &[],
        &["x509", "shop", "cart-1", &cart_uid],
    )
    .await;
    assert_eq!(pinned[0]["spiffe_id"], CART, "{pinned:?}");
    // Bundles, and a JWT-SVID validated by go-spiffe against the JWT bundle the API sent.
    let bundles = run(&bin, &ca, &root, ok_as, &[], &["bundles", "shop", "cart-1"]).await;
    assert_eq!(bundles[0]["code"], "OK", "{bundles:?}");
    assert_eq!(bundles[0]["spiffe://cluster.local"], 1, "{bundles:?}");
    let jwt = run(
        &bin,
        &ca,
        &root,
        ok_as,
        &[],
        &["jwt", "shop", "cart-1", "payments"],
    )
    .await;
    assert_eq!(jwt[0]["code"], "OK", "{jwt:?}");
    assert_eq!(jwt[0]["spiffe_id"], CART);
    assert_eq!(jwt[0]["audience"], serde_json::json!(["payments"]));

    // Each refusal: its exact code, and the server goes on serving the broker.
    struct Case<'a> {
        name: &'a str,
        who: As<'a>,
        call: Vec<&'a str>,
        code: &'a str,
    }
    let cases = [
        Case {
            name: "no broker.spiffe.io header",
            who: As {
                header: false,
                ..ok_as
            },
            call: vec!["x509", "shop", "cart-1"],
            code: "InvalidArgument",
        },
        Case {
            name: "no client certificate",
            who: As {
                cert: None,
                ..ok_as
            },
            call: vec!["x509", "shop", "cart-1"],
            code: "Unauthenticated",
        },
        Case {
            name: "a certificate not in --broker-ids",
            who: As {
                cert: Some(&imposter),
                token: Some(&imposter),
                header: true,
            },
            call: vec!["x509", "shop", "cart-1"],
            code: "PermissionDenied",
        },
        Case {
            name: "the broker's certificate with another pod's token",
            who: As {
                token: Some(&imposter),
                ..ok_as
            },
            call: vec!["x509", "shop", "cart-1"],
            code: "PermissionDenied",
        },
        Case {
            name: "no token to tie the broker to a node",
            who: As {
                token: None,
                ..ok_as
            },
            call: vec!["x509", "shop", "cart-1"],
            code: "Unauthenticated",
        },
        Case {
            name: "a pod on another node",
            who: ok_as,
            call: vec!["x509", "shop", "pay-1"],
            code: "NotFound",
        },
        Case {
            name: "no such pod",
            who: ok_as,
            call: vec!["x509", "shop", "ghost"],
            code: "NotFound",
        },
        Case {
            name: "a Failed pod",
            who: ok_as,
            call: vec!["x509", "shop", "batch-1"],
            code: "NotFound",
        },
        Case {
            name: "the pod's name with another UID",
            who: ok_as,
            call: vec![
                "x509",
                "shop",
                "cart-1",
                "00000000-0000-0000-0000-000000000000",
            ],
            code: "NotFound",
        },
        Case {
            name: "a JWT-SVID for a pod on another node",
            who: ok_as,
            call: vec!["jwt", "shop", "pay-1", "payments"],
            code: "NotFound",
        },
        Case {
            name: "a PID reference on the CA port",
            who: ok_as,
            call: vec!["pid", "1"],
            code: "InvalidArgument",
        },
        Case {
            name: "a Deployment instead of a pod",
            who: ok_as,
            call: vec!["object", "deployments", "apps", "shop", "cart"],
            code: "InvalidArgument",
        },
    ];
    let mut not_found_messages = std::collections::BTreeSet::new();
    for c in &cases {
        let got = run(&bin, &ca, &root, c.who, &[], &c.call).await;
        assert_eq!(got.len(), 1, "{}: {got:?}", c.name);
        assert_eq!(got[0]["code"], c.code, "{}: {got:?}", c.name);
        if c.code == "NotFound" {
            not_found_messages.insert(got[0]["message"].as_str().unwrap().to_string());
        }
        let again = run(&bin, &ca, &root, ok_as, &[], &["x509", "shop", "cart-1"]).await;
        assert_eq!(again[0]["code"], "OK", "after {}: {again:?}", c.name);
    }
    assert_eq!(
        not_found_messages.len(),
        1,
        "one answer for absent, elsewhere, Failed and another UID: {not_found_messages:?}"
    );

    // A stream for a pod that leaves the node ends with NotFound: its SVID is withdrawn.
    kube.pod_on("shop", "late-1", "late", Some("n1")).await;
    let late = "spiffe://cluster.local/ns/shop/sa/late";
    eventually("the new pod is indexed", 10, async || {
        let r = run(&bin, &ca, &root, ok_as, &[], &["x509", "shop", "late-1"]).await;
        r[0]["spiffe_id"] == late
    })
    .await;
    let stream = {
        let (bin, addr, root) = (bin.clone(), ca.addr, root.clone());
        let (cert, key, token) = (
            broker.cert.clone(),
            broker.key.clone(),
            broker.token.clone(),
        );
        tokio::spawn(async move {
            tokio::process::Command::new(bin)
                .arg("-addr")
                .arg(addr.to_string())
                .arg("-ca")
                .arg(root)
                .arg("-cert")
                .arg(cert)
                .arg("-key")
                .arg(key)
                .arg("-token")
                .arg(token)
                .args([
                    "-messages",
                    "2",
                    "-timeout",
                    "60s",
                    "x509",
                    "shop",
                    "late-1",
                ])
                .output()
                .await
                .unwrap()
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    kube.delete_pod("shop", "late-1").await;
    let out = tokio::time::timeout(Duration::from_secs(30), stream)
        .await
        .expect("the stream ends")
        .unwrap();
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(lines[0]["spiffe_id"], late);
    assert_eq!(lines[1]["code"], "NotFound", "{lines:?}");

    // A stream pushes a renewed SVID (full state) once half its life has passed. Last: the
    // server's clock runs ahead of the real one from here on.
    let stream = {
        let (bin, addr, root) = (bin.clone(), ca.addr, root.clone());
        let (cert, key, token) = (
            broker.cert.clone(),
            broker.key.clone(),
            broker.token.clone(),
        );
        tokio::spawn(async move {
            tokio::process::Command::new(bin)
                .arg("-addr")
                .arg(addr.to_string())
                .arg("-ca")
                .arg(root)
                .arg("-cert")
                .arg(cert)
                .arg("-key")
                .arg(key)
                .arg("-token")
                .arg(token)
                .args([
                    "-messages",
                    "2",
                    "-timeout",
                    "60s",
                    "x509",
                    "shop",
                    "cart-1",
                ])
                .output()
                .await
                .unwrap()
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    clock.advance(time::Duration::hours(13));
    let out = tokio::time::timeout(Duration::from_secs(30), stream)
        .await
        .expect("the renewal arrives")
        .unwrap();
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        lines.len(),
        2,
        "{lines:?} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(lines[1]["spiffe_id"], CART);
    assert_ne!(lines[0]["serial"], lines[1]["serial"], "a new SVID");
    assert!(
        lines[1]["not_before"].as_i64().unwrap()
            >= lines[0]["not_before"].as_i64().unwrap() + 12 * 3600,
        "{lines:?}"
    );

    ca.stop().await;
}
