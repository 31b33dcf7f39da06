//! The CRL distribution point (`serve --crl-endpoint`, `--crl-distribution-url`) with a real
//! relying party outside the mesh: openssl reads the URL from the intermediate's CRL
//! Distribution Points extension, the CRLs fetched over HTTP parse with `openssl crl`, and
//! `openssl verify -crl_check_all` accepts a live leaf and refuses it once it is revoked
//! through the real CLI while the server runs.

use std::path::Path;
use std::process::Command;

use citadel::pki::{chain, pem, KeyType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::*;

/// One plain HTTP/1.1 GET: status and body bytes (DER must not go through a String).
async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String, Vec<u8>) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: crl\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, head, raw[split + 4..].to_vec())
}

fn openssl(args: &[&str], dir: &Path) -> (bool, String) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// Fetches every CRL the endpoint lists into `dir` as PEM (through `openssl crl`, which
/// must parse each); their file names.
async fn fetch_all(addr: std::net::SocketAddr, dir: &Path) -> Vec<String> {
    let (status, _, index) = get(addr, "/crl/").await;
    assert_eq!(status, 200);
    let mut files = Vec::new();
    for name in String::from_utf8(index).unwrap().lines() {
        let (status, head, der) = get(addr, &format!("/crl/{name}")).await;
        assert_eq!(status, 200, "{head}");
        assert!(
            head.to_lowercase()
                .contains("content-type: application/pkix-crl"),
            "{head}"
        );
        std::fs::write(dir.join(name), &der).unwrap();
        let pem = format!("{name}.pem");
        let (ok, out) = openssl(&["crl", "-inform", "DER", "-in", name, "-out", &pem], dir);
        assert!(ok, "openssl crl {name}: {out}");
        files.push(pem);
    }
    files
}

#[tokio::test]
async fn openssl_finds_the_crl_through_the_intermediates_distribution_point_and_sees_a_revocation()
{
    if !require_tool("openssl") {
        return;
    }
    let port = free_port();
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let base = format!("http://127.0.0.1:{port}/crl/");
    let ca = TestCa::start(&[
        "--reconcile-interval",
        "100ms",
        "--crl-endpoint",
        &addr.to_string(),
        "--crl-distribution-url",
        &base,
    ])
    .await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut client = ca.client().await;
    let (_, csr) = csr_for(KeyType::EcP256, &spiffe("shop", "cart"));
    let leaf = issue(&mut client, &csr, "shop", "cart").await;
    std::fs::write(d.join("leaf.pem"), &leaf[0]).unwrap();
    std::fs::write(d.join("int.pem"), &leaf[1]).unwrap();
    std::fs::write(d.join("root.pem"), leaf.last().unwrap()).unwrap();

    // The intermediate names its issuer's CRL at the configured URL.
    let (ok, out) = openssl(
        &[
            "x509",
            "-in",
            "int.pem",
            "-noout",
            "-ext",
            "crlDistributionPoints",
        ],
        d,
    );
    assert!(ok && out.contains(&format!("URI:{base}")), "{out}");
    let url = out
        .split("URI:")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    let (status, _, root_crl) = get(addr, url.trim_start_matches(&format!("http://{addr}"))).await;
    assert_eq!(status, 200, "{url}");
    std::fs::write(d.join("root.crl"), &root_crl).unwrap();
    let (ok, out) = openssl(
        &[
            "crl", "-inform", "DER", "-in", "root.crl", "-noout", "-issuer",
        ],
        d,
    );
    let (_, root_subject) = openssl(&["x509", "-in", "root.pem", "-noout", "-subject"], d);
    assert!(
        ok && out.trim().trim_start_matches("issuer=")
            == root_subject.trim().trim_start_matches("subject="),
        "the CDP names the root's CRL: {out} vs {root_subject}"
    );

    // Every CRL over HTTP, and openssl's verdict with all of them.
    let crls = fetch_all(addr, d).await;
    assert!(crls.len() >= 2, "{crls:?}");
    let verify = |crls: &[String]| {
        let mut args = vec![
            "verify",
            "-crl_check_all",
            "-CAfile",
            "root.pem",
            "-untrusted",
            "int.pem",
        ];
        for c in crls {
            args.extend(["-CRLfile", c.as_str()]);
        }
        args.push("leaf.pem");
        openssl(&args, d)
    };
    let (ok, out) = verify(&crls);
    assert!(ok && out.contains("leaf.pem: OK"), "{out}");

    // Revoked through the CLI while serving: the next CRL fetched says so.
    let serial = chain::describe(&pem::parse_certs(leaf[0].as_bytes()).unwrap()[0])
        .unwrap()
        .serial_hex;
    let (ok, out) = cli(&["revoke", "--serial", &serial], &ca.state_dir());
    assert!(ok, "{out}");
    eventually(
        "openssl sees the leaf revoked in the fetched CRL",
        10,
        async || {
            let crls = fetch_all(addr, d).await;
            let (ok, out) = verify(&crls);
            !ok && out.contains("certificate revoked")
        },
    )
    .await;

    // Unknown paths: 404 saying where CRLs are; the endpoint keeps serving.
    let (status, _, body) = get(addr, "/crl/ffff.crl").await;
    assert_eq!(status, 404);
    assert!(String::from_utf8_lossy(&body).contains("/crl/"));
    let (status, _, _) = get(addr, "/crl/notacrl").await;
    assert_eq!(status, 404);
    assert_eq!(get(addr, "/crl/").await.0, 200);
}

/// A distribution URL that is not an http(s) base ending in '/' is refused at start, naming
/// the flag's expected form.
#[tokio::test]
async fn a_malformed_distribution_url_is_refused_at_start() {
    for bad in ["ftp://x/crl/", "http://x/crl", "http://x/a b/"] {
        let dir = tempfile::tempdir().unwrap();
        let e = TestCa::try_start_in(dir.path(), &["--crl-distribution-url", bad])
            .await
            .err()
            .unwrap_or_else(|| panic!("{bad} accepted"));
        assert!(e.contains("not a CRL base URL"), "{bad}: {e}");
    }
}
