//! Third-party validators and third-party material: openssl and Python `cryptography` check
//! what we issue; openssl makes CSRs and a plugged-in CA for us to consume.

use std::path::Path;
use std::process::Command;

use citadel::pki::KeyType;

use crate::support::*;

fn sh(dir: &Path, script: &str) -> std::process::Output {
    let out = Command::new("sh")
        .arg("-ec")
        .arg(script)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{script}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Writes a response as openssl wants it: leaf.pem, chain.pem (intermediates), roots.pem.
pub(crate) fn write_chain(dir: &Path, chain: &[String]) {
    std::fs::write(dir.join("leaf.pem"), &chain[0]).unwrap();
    std::fs::write(dir.join("chain.pem"), chain[1..chain.len() - 1].concat()).unwrap();
    std::fs::write(dir.join("roots.pem"), chain.last().unwrap()).unwrap();
}

pub(crate) fn openssl_verify(dir: &Path) {
    let out = Command::new("openssl")
        .args([
            "verify",
            "-x509_strict",
            "-purpose",
            "sslclient",
            "-CAfile",
            "roots.pem",
            "-untrusted",
            "chain.pem",
            "leaf.pem",
        ])
        .current_dir(dir)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && text.contains("leaf.pem: OK"),
        "openssl verify failed: {text}"
    );
}

const PY_VERIFY: &str = r#"
import sys
from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store
roots = x509.load_pem_x509_certificates(open("roots.pem", "rb").read())
inter = x509.load_pem_x509_certificates(open("chain.pem", "rb").read()) if open("chain.pem").read().strip() else []
leaf = x509.load_pem_x509_certificate(open("leaf.pem", "rb").read())
verified = PolicyBuilder().store(Store(roots)).build_client_verifier().verify(leaf, inter)
print(" ".join(n.value for n in verified.subjects if isinstance(n, x509.UniformResourceIdentifier)))
"#;

fn python_verify(dir: &Path) -> Option<String> {
    let py = python()?;
    let out = Command::new(py)
        .arg("-c")
        .arg(PY_VERIFY)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cryptography rejected the chain: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

#[tokio::test]
async fn openssl_and_python_cryptography_accept_our_chains() {
    if !require_tool("openssl") {
        return;
    }
    for ca_key in ["ec-p256", "rsa-2048"] {
        let ca = TestCa::start(&["--ca-key-type", ca_key]).await;
        let id = spiffe("shop", "cart");
        for kt in [KeyType::EcP256, KeyType::Rsa2048] {
            let (_, csr) = csr_for(kt, &id);
            let chain = issue(&mut ca.client().await, &csr, "shop", "cart").await;
            let tmp = tempfile::tempdir().unwrap();
            write_chain(tmp.path(), &chain);
            openssl_verify(tmp.path());
            if let Some(sans) = python_verify(tmp.path()) {
                assert_eq!(sans, id.to_string());
            }
        }
        ca.stop().await;
    }
}

#[tokio::test]
async fn openssl_csrs_with_extra_extensions_are_accepted_and_weak_keys_refused() {
    if !require_tool("openssl") {
        return;
    }
    let ca = TestCa::start(&[]).await;
    let mut client = ca.client().await;
    let tmp = tempfile::tempdir().unwrap();
    let id = spiffe("shop", "cart");
    // SubjectKeyIdentifier and a CN: rcgen's own CSR parser would reject the SKI.
    sh(tmp.path(), &format!(
        "openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ec.key -out ec.csr \
         -subj /CN=cart -addext 'subjectAltName=critical,URI:{id}' -addext subjectKeyIdentifier=hash 2>/dev/null
         openssl req -new -newkey rsa:3072 -nodes -keyout rsa.key -out rsa.csr -subj /O=x \
         -addext 'subjectAltName=URI:{id}' -addext 'keyUsage=digitalSignature' 2>/dev/null
         openssl req -new -newkey rsa:1024 -nodes -keyout weak.key -out weak.csr -subj /O=x 2>/dev/null"
    ));
    let t = bearer(&token("shop", "cart"));
    for name in ["ec.csr", "rsa.csr"] {
        let csr = std::fs::read_to_string(tmp.path().join(name)).unwrap();
        let chain = call(&mut client, &csr, Some(&t), 0, None)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e:?}"));
        write_chain(tmp.path(), &chain);
        openssl_verify(tmp.path());
        if let Some(gs) = gospiffe() {
            let bundle = String::from_utf8(ca.root_pem()).unwrap();
            gospiffe_accepts(&gs, &chain.concat(), &bundle, &id.to_string());
        }
    }
    let weak = std::fs::read_to_string(tmp.path().join("weak.csr")).unwrap();
    let err = call(&mut client, &weak, Some(&t), 0, None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("RSA-1024"), "{}", err.message());
    ca.stop().await;
}

/// Istio's cacerts layout, made by openssl: an RSA root and an intermediate whose key is in
/// the traditional PKCS#1 (or SEC1) form many real secrets use.
pub(crate) fn make_cacerts(dir: &Path, int_key_cmd: &str) {
    sh(dir, &format!(
        "openssl req -x509 -newkey rsa:2048 -nodes -keyout root-key.pem -out root-cert.pem -days 3650 \
           -subj '/O=Istio/CN=Root CA' -addext 'basicConstraints=critical,CA:true' \
           -addext 'keyUsage=critical,keyCertSign,cRLSign' 2>/dev/null
         {int_key_cmd}
         openssl req -new -key ca-key.pem -out ca.csr -subj '/O=Istio/CN=Intermediate CA' 2>/dev/null
         printf 'basicConstraints=critical,CA:true,pathlen:0\\nkeyUsage=critical,keyCertSign,cRLSign,digitalSignature\\nsubjectKeyIdentifier=hash\\nauthorityKeyIdentifier=keyid\\n' > ext.cnf
         openssl x509 -req -in ca.csr -CA root-cert.pem -CAkey root-key.pem -CAcreateserial -out ca-cert.pem -days 730 -extfile ext.cnf 2>/dev/null
         cat ca-cert.pem root-cert.pem > cert-chain.pem"
    ));
}

#[tokio::test]
async fn plugged_in_openssl_ca_signs_and_chains() {
    if !require_tool("openssl") {
        return;
    }
    for key_cmd in [
        "openssl genrsa -traditional -out ca-key.pem 2048 2>/dev/null",
        "openssl ecparam -name prime256v1 -genkey -noout -out ca-key.pem",
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let cacerts = tmp.path().join("cacerts");
        std::fs::create_dir(&cacerts).unwrap();
        make_cacerts(&cacerts, key_cmd);
        let ca = TestCa::start_in(tmp.path(), &["--ca-certs-dir", cacerts.to_str().unwrap()]).await;
        assert_eq!(
            ca.root_pem(),
            std::fs::read(cacerts.join("root-cert.pem")).unwrap(),
            "bundle is the plugged root"
        );
        let id = spiffe("shop", "cart");
        let (_, csr) = csr_for(KeyType::EcP256, &id);
        let chain = issue(&mut ca.client().await, &csr, "shop", "cart").await;
        assert_eq!(chain.len(), 3);
        assert_eq!(
            chain[1].trim(),
            std::fs::read_to_string(cacerts.join("ca-cert.pem"))
                .unwrap()
                .trim()
        );
        write_chain(tmp.path(), &chain);
        openssl_verify(tmp.path());
        ca.stop().await;
    }
}

#[tokio::test]
async fn plugged_in_ca_problems_name_the_file() {
    if !require_tool("openssl") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let good = tmp.path().join("good");
    std::fs::create_dir(&good).unwrap();
    make_cacerts(&good, "openssl genrsa -out ca-key.pem 2048 2>/dev/null");

    let variant = |name: &str, script: &str| {
        let d = tmp.path().join(name);
        sh(tmp.path(), &format!("cp -r good {name}"));
        sh(&d, script);
        d
    };
    let cases = [
        (variant("wrongkey", "openssl genrsa -out ca-key.pem 2048 2>/dev/null"), "ca-key.pem", "does not match"),
        (variant("nochain", "rm cert-chain.pem"), "cert-chain.pem", "missing"),
        (variant("nokey", "rm ca-key.pem"), "ca-key.pem", "missing"),
        (variant("otherroot", "openssl req -x509 -newkey rsa:2048 -nodes -keyout k.pem -out root-cert.pem -days 10 -subj /CN=Other 2>/dev/null"), "root-cert.pem", "chain"),
        (variant("leafca", "cp root-key.pem ca-key.pem; openssl req -new -key ca-key.pem -subj /CN=leaf -out l.csr 2>/dev/null; \
                            printf 'basicConstraints=CA:false\\n' > leaf.cnf; \
                            openssl x509 -req -in l.csr -CA root-cert.pem -CAkey root-key.pem -CAcreateserial -out ca-cert.pem -days 10 -extfile leaf.cnf 2>/dev/null"), "ca-cert.pem", "not a CA"),
        (variant("garbage", "echo nonsense > ca-cert.pem"), "ca-cert.pem", "CERTIFICATE"),
    ];
    for (dir, file, says) in cases {
        let err = TestCa::try_start_in(&dir, &["--ca-certs-dir", dir.to_str().unwrap()])
            .await
            .err()
            .expect("refused");
        assert!(
            err.contains(file) && err.contains(says),
            "{}: {err}",
            dir.display()
        );
        assert!(!err.contains("PRIVATE KEY"), "key material in error: {err}");
    }
}

#[tokio::test]
async fn plugged_in_ca_crl_is_honoured_and_published() {
    if !require_tool("openssl") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let cacerts = tmp.path().join("cacerts");
    std::fs::create_dir(&cacerts).unwrap();
    make_cacerts(
        &cacerts,
        "openssl ecparam -name prime256v1 -genkey -noout -out ca-key.pem",
    );
    let dir = cacerts.to_str().unwrap().to_string();
    let id = spiffe("shop", "cart");
    let (key, csr) = csr_for(KeyType::EcP256, &id);

    let ca = TestCa::start_in(tmp.path(), &["--ca-certs-dir", &dir]).await;
    let chain = issue(&mut ca.client().await, &csr, "shop", "cart").await;
    ca.stop().await;
    let serial = citadel::pki::chain::describe(
        &citadel::pki::pem::parse_certs(chain[0].as_bytes()).unwrap()[0],
    )
    .unwrap()
    .serial_hex;

    // The upstream PKI revokes the leaf: `openssl ca` writes a CRL signed by the
    // intermediate from its database, where the serial is marked revoked (R).
    sh(&cacerts, &format!(
        "mkdir -p db && echo 01 > db/crlnumber
         printf 'R\\t300101000000Z\\t250101000000Z\\t{}\\tunknown\\t/CN=x\\n' > db/index
         printf '[ca]\\ndefault_ca=c\\n[c]\\ndatabase=db/index\\ncrlnumber=db/crlnumber\\ndefault_md=sha256\\ndefault_crl_days=7\\n' > ca.cnf
         openssl ca -config ca.cnf -cert ca-cert.pem -keyfile ca-key.pem -gencrl -out ca-crl.pem 2>/dev/null",
        serial.to_uppercase()
    ));

    let ca = TestCa::start_in(tmp.path(), &["--ca-certs-dir", &dir]).await;
    let identity = Some((
        chain[..2].concat().into_bytes(),
        key.serialize_pem().into_bytes(),
    ));
    let err = call(&mut ca.client_with(identity).await, &csr, None, 0, None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    assert!(err.message().contains("revoked"), "{}", err.message());
    assert_eq!(
        std::fs::read_to_string(ca.state_dir().join("ca-crl.pem")).unwrap(),
        std::fs::read_to_string(cacerts.join("ca-crl.pem")).unwrap(),
        "the plugged-in CRL is published beside the bundle"
    );
    assert!(ca.metrics().await.contains("citadel_ca_crl_entries 1\n"));
    // Tokens still work: revoking a certificate does not deny the identity.
    issue(&mut ca.client().await, &csr, "shop", "cart").await;
    ca.stop().await;

    // A CRL signed by someone else is refused at start, naming the file.
    sh(&cacerts, "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout o.key -out o.pem -days 1 -subj /CN=other 2>/dev/null
                  openssl ca -config ca.cnf -cert o.pem -keyfile o.key -gencrl -out ca-crl.pem 2>/dev/null");
    let err = TestCa::try_start_in(tmp.path(), &["--ca-certs-dir", &dir])
        .await
        .err()
        .unwrap();
    assert!(
        err.contains("ca-crl.pem") && err.contains("not signed"),
        "{err}"
    );
}

// --- go-spiffe ------------------------------------------------------------------------------

/// go-spiffe's `x509svid.Verify` as a program (tests/gospiffe, built and cached by
/// scripts/test.sh, which exports its path as CITADEL_GOSPIFFE). None skips the caller's
/// check; under CI=true a missing validator fails instead.
pub(crate) fn gospiffe() -> Option<std::path::PathBuf> {
    built_program("CITADEL_GOSPIFFE", "the go-spiffe validator")
}

/// A program scripts/test.sh built and exported as `var`; None skips the caller's check,
/// and under CI=true a missing one fails instead.
pub(crate) fn built_program(var: &str, what: &str) -> Option<std::path::PathBuf> {
    if let Some(p) = std::env::var_os(var).map(std::path::PathBuf::from) {
        if p.is_file() {
            return Some(p);
        }
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{what} is required under CI=true ({var}); run scripts/test.sh"
    );
    eprintln!("SKIPPED: {what} not built (set {var}; scripts/test.sh builds it)");
    None
}

/// One go-spiffe verdict: `chain` (PEM, leaf first) against `bundle` (PEM roots) for `id`,
/// now or at `at` (Unix seconds). Ok(the verified ID) or Err(go-spiffe's reason).
pub(crate) fn gospiffe_verify(
    bin: &Path,
    chain: &str,
    bundle: &str,
    id: &str,
    at: Option<i64>,
) -> Result<String, String> {
    let tmp = tempfile::tempdir().unwrap();
    let (c, b) = (tmp.path().join("chain.pem"), tmp.path().join("bundle.pem"));
    std::fs::write(&c, chain).unwrap();
    std::fs::write(&b, bundle).unwrap();
    let mut cmd = Command::new(bin);
    cmd.arg(&c).arg(&b).arg(id);
    if let Some(t) = at {
        cmd.arg(t.to_string());
    }
    let out = cmd.output().unwrap();
    match out.status.code() {
        Some(0) => Ok(String::from_utf8_lossy(&out.stdout).trim().to_string()),
        Some(1) => Err(String::from_utf8_lossy(&out.stderr).trim().to_string()),
        _ => panic!(
            "gospiffe-check could not run: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// A root of a CA nobody trusts, same trust domain: what a wrong bundle looks like.
pub(crate) fn foreign_bundle() -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "someone else's root");
    p.self_signed(&key).unwrap().pem()
}

/// go-spiffe accepts `chain` for `id` against `bundle`, and (so that the check can fail)
/// rejects it for another ID and against a foreign bundle.
pub(crate) fn gospiffe_accepts(bin: &Path, chain: &str, bundle: &str, id: &str) {
    assert_eq!(
        gospiffe_verify(bin, chain, bundle, id, None)
            .unwrap_or_else(|e| panic!("go-spiffe rejected a chain for {id}: {e}")),
        id
    );
    let other = format!("{id}-other");
    let err = gospiffe_verify(bin, chain, bundle, &other, None).expect_err("wrong ID accepted");
    assert!(err.contains("REJECTED"), "{err}");
    let err = gospiffe_verify(bin, chain, &foreign_bundle(), id, None)
        .expect_err("a foreign bundle accepted");
    assert!(err.contains("could not verify leaf certificate"), "{err}");
}

#[tokio::test]
async fn go_spiffe_accepts_svids_from_every_issuance_path() {
    let Some(gs) = gospiffe() else { return };
    let id = spiffe("shop", "cart");
    let ids = id.to_string();
    for ca_key in ["ec-p256", "rsa-2048"] {
        let ca = TestCa::start(&["--ca-key-type", ca_key]).await;
        let bundle = String::from_utf8(ca.root_pem()).unwrap();
        let mut client = ca.client().await;
        for kt in [KeyType::EcP256, KeyType::EcP384, KeyType::Rsa2048] {
            // JWT (dev token) with an EC or RSA CSR.
            let (key, csr) = csr_for(kt, &id);
            let chain = issue(&mut client, &csr, "shop", "cart").await;
            gospiffe_accepts(&gs, &chain.concat(), &bundle, &ids);
            // Renewal by client certificate (mTLS, no token).
            let identity = Some((
                chain[..chain.len() - 1].concat().into_bytes(),
                key.serialize_pem().into_bytes(),
            ));
            let (_, csr2) = csr_for(kt, &id);
            let renewed = call(&mut ca.client_with(identity).await, &csr2, None, 0, None)
                .await
                .unwrap_or_else(|e| panic!("{ca_key}/{kt:?} renewal: {e:?}"));
            assert_ne!(renewed[0], chain[0]);
            gospiffe_accepts(&gs, &renewed.concat(), &bundle, &ids);
        }
        ca.stop().await;
    }
    if !require_tool("openssl") {
        return;
    }
    // A plugged-in CA made by openssl (RSA root, EC intermediate).
    let tmp = tempfile::tempdir().unwrap();
    let cacerts = tmp.path().join("cacerts");
    std::fs::create_dir(&cacerts).unwrap();
    make_cacerts(
        &cacerts,
        "openssl ecparam -name prime256v1 -genkey -noout -out ca-key.pem",
    );
    let ca = TestCa::start_in(tmp.path(), &["--ca-certs-dir", cacerts.to_str().unwrap()]).await;
    let bundle = std::fs::read_to_string(cacerts.join("root-cert.pem")).unwrap();
    let (_, csr) = csr_for(KeyType::Rsa2048, &id);
    let chain = issue(&mut ca.client().await, &csr, "shop", "cart").await;
    gospiffe_accepts(&gs, &chain.concat(), &bundle, &ids);
    ca.stop().await;
}
