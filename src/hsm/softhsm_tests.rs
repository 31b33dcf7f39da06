//! The PKCS#11 backend against a real module (SoftHSM2): keys generated in the token sign what
//! ring verifies, cannot be read out, are found again by label and checked against their
//! public key, and a token that goes away is unavailable until it is back.
//!
//! One SoftHSM2 configuration per test process (`SOFTHSM2_CONF` is read by the module from
//! the environment), a token per test, and one test at a time: a reconnect finalises the
//! module for the whole process.

use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use cryptoki::object::{Attribute, AttributeInfo, AttributeType};
use ring::signature::{self, UnparsedPublicKey};

use super::softhsm::{self, SoftHsm};
use super::token::find_private_key;
use super::*;
use crate::pki::{CaKey, KeyError, KeyType};

const PIN: &str = "4321";

struct Harness {
    _dir: tempfile::TempDir,
    hsm: SoftHsm,
}

static HARNESS: OnceLock<Option<Harness>> = OnceLock::new();
static SERIAL: Mutex<()> = Mutex::new(());

/// The process's SoftHSM2 and the lock every test holds; `None` (skip) without SoftHSM2,
/// except under CI=true, where [`softhsm::available`] fails the test.
fn harness() -> Option<(&'static SoftHsm, MutexGuard<'static, ()>)> {
    let h = HARNESS.get_or_init(|| {
        if !softhsm::available() {
            eprintln!("SoftHSM2 not installed: skipping (scripts/test.sh installs it)");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let hsm = SoftHsm::new(dir.path()).unwrap();
        std::env::set_var("SOFTHSM2_CONF", hsm.conf());
        Some(Harness { _dir: dir, hsm })
    });
    let lock = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    h.as_ref().map(|h| (&h.hsm, lock))
}

fn pin_file(dir: &std::path::Path, pin: &str) -> PinSource {
    let f = dir.join(format!("pin-{pin}"));
    std::fs::write(&f, format!("{pin}\n")).unwrap();
    PinSource::File(f)
}

fn config(label: &str, pin: PinSource) -> Pkcs11Config {
    Pkcs11Config {
        module: softhsm::module(),
        token_label: label.into(),
        pin,
        max_sessions: Some(4),
    }
}

/// A fresh token labelled `label`, connected.
fn token(hsm: &SoftHsm, label: &str, tmp: &std::path::Path) -> (Arc<Token>, std::path::PathBuf) {
    let dir = hsm.init_token(label, PIN).unwrap();
    let t = Token::connect(config(label, pin_file(tmp, PIN))).unwrap();
    (Arc::new(t), dir)
}

#[test]
fn an_ec_key_made_in_the_token_signs_and_cannot_be_read_out() {
    let Some((hsm, _lock)) = harness() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let (t, _) = token(hsm, "ec-sign", tmp.path());
    for (kt, asn1, fixed) in [
        (
            KeyType::EcP256,
            &signature::ECDSA_P256_SHA256_ASN1,
            &signature::ECDSA_P256_SHA256_FIXED,
        ),
        (
            KeyType::EcP384,
            &signature::ECDSA_P384_SHA384_ASN1,
            &signature::ECDSA_P384_SHA384_FIXED,
        ),
    ] {
        let label = format!("k-{kt}");
        let key = Pkcs11Key::generate(&t, kt, &label, &[1, 2]).unwrap();
        let msg = b"tbsCertificate bytes";
        let der = key.sign(msg).unwrap();
        UnparsedPublicKey::new(asn1, key.public_key())
            .verify(msg, &der)
            .expect("the X.509 (DER) signature verifies");
        let jws = key.sign_jws(msg).unwrap();
        UnparsedPublicKey::new(fixed, key.public_key())
            .verify(msg, &jws)
            .expect("the JWS (r||s) signature verifies");

        // C_GetAttributeValue of CKA_VALUE is refused, and the key says why.
        let attrs = t
            .admin(|s, tl| {
                let h = find_private_key(s, tl, &label)?;
                let info = s.get_attribute_info(h, &[AttributeType::Value]).unwrap();
                let got = s
                    .get_attributes(
                        h,
                        &[
                            AttributeType::Value,
                            AttributeType::Sensitive,
                            AttributeType::Extractable,
                            AttributeType::Token,
                            AttributeType::NeverExtractable,
                        ],
                    )
                    .unwrap();
                Ok((info, got))
            })
            .unwrap();
        assert!(
            matches!(attrs.0.as_slice(), [AttributeInfo::Sensitive]),
            "CKA_VALUE: {:?}",
            attrs.0
        );
        assert!(
            !attrs.1.iter().any(|a| matches!(a, Attribute::Value(_))),
            "the private value was returned: {:?}",
            attrs.1
        );
        for want in [
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Token(true),
            Attribute::NeverExtractable(true),
        ] {
            assert!(attrs.1.contains(&want), "{want:?} not in {:?}", attrs.1);
        }
        let shown = format!("{key:?}");
        assert!(shown.contains(&label) && !shown.contains(PIN), "{shown}");
    }
}

#[test]
fn rsa_keys_of_2048_and_3072_bits_sign_pkcs1_sha256() {
    let Some((hsm, _lock)) = harness() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let (t, _) = token(hsm, "rsa-sign", tmp.path());
    for (kt, bits) in [(KeyType::Rsa2048, 2048), (KeyType::Rsa3072, 3072)] {
        let key = Pkcs11Key::generate(&t, kt, &format!("r{bits}"), &[3]).unwrap();
        let spki = crate::pki::cakey::spki(&key);
        assert_eq!(
            crate::pki::keys::spki_kind(&spki).unwrap(),
            crate::pki::PublicKeyKind::Rsa { bits }
        );
        let sig = key.sign(b"msg").unwrap();
        UnparsedPublicKey::new(&signature::RSA_PKCS1_2048_8192_SHA256, key.public_key())
            .verify(b"msg", &sig)
            .unwrap();
        assert_eq!(
            key.sign_jws(b"msg").unwrap(),
            sig,
            "PKCS#1 v1.5 is deterministic"
        );
    }
}

#[test]
fn a_key_is_found_by_label_checked_against_its_public_key_and_destroyed() {
    let Some((hsm, _lock)) = harness() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let (t, _) = token(hsm, "open", tmp.path());
    let a = Pkcs11Key::generate(&t, KeyType::EcP256, "a", &[1]).unwrap();
    let b = Pkcs11Key::generate(&t, KeyType::EcP256, "b", &[2]).unwrap();
    let spki_a = crate::pki::cakey::spki(&a);
    assert!(
        matches!(Pkcs11Key::generate(&t, KeyType::EcP256, "a", &[1]), Err(HsmError::Config(m)) if m.contains("already holds")),
        "a label names one key"
    );
    let again = Pkcs11Key::open(&t, "a", &spki_a).unwrap();
    assert_eq!(again.public_key(), a.public_key());
    UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_ASN1, a.public_key())
        .verify(b"x", &again.sign(b"x").unwrap())
        .unwrap();
    assert!(matches!(
        Pkcs11Key::open(&t, "b", &spki_a),
        Err(HsmError::KeyMismatch { .. })
    ));
    drop(b);
    assert!(Pkcs11Key::destroy(&t, "a").unwrap());
    assert!(!Pkcs11Key::destroy(&t, "a").unwrap(), "already gone");
    assert!(matches!(
        Pkcs11Key::open(&t, "a", &spki_a),
        Err(HsmError::KeyNotFound { .. })
    ));
    // A key destroyed under a live handle: signing is refused as unavailable, never panics.
    let e = again.sign(b"y").unwrap_err();
    assert!(matches!(e, KeyError::Unavailable(_)), "{e:?}");
}

#[test]
fn a_wrong_pin_or_a_missing_token_is_a_clear_start_error() {
    let Some((hsm, _lock)) = harness() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    hsm.init_token("pin-check", PIN).unwrap();
    let e = Token::connect(config("pin-check", pin_file(tmp.path(), "0000"))).unwrap_err();
    assert!(matches!(&e, HsmError::Login { .. }), "{e:?}");
    let shown = e.to_string();
    assert!(
        shown.contains("PinIncorrect") && !shown.contains("0000"),
        "{shown}"
    );

    let e = Token::connect(config("no-such-token", pin_file(tmp.path(), PIN))).unwrap_err();
    let shown = e.to_string();
    assert!(
        matches!(&e, HsmError::TokenNotFound { .. }) && shown.contains("pin-check"),
        "the message lists the tokens present: {shown}"
    );
    let mut bad = config("pin-check", pin_file(tmp.path(), PIN));
    bad.module = "/nonexistent/libpkcs11.so".into();
    let e = Token::connect(bad).unwrap_err();
    assert!(matches!(&e, HsmError::Module { .. }), "{e:?}");
    assert!(e.to_string().contains("/nonexistent/libpkcs11.so"), "{e}");
}

#[test]
fn a_removed_token_is_unavailable_and_signing_resumes_when_it_is_back() {
    let Some((hsm, _lock)) = harness() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let (t, dir) = token(hsm, "removable", tmp.path());
    let key = Pkcs11Key::generate(&t, KeyType::EcP256, "int", &[9]).unwrap();
    key.sign(b"before").unwrap();
    assert_eq!(
        t.stats()
            .signatures
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );

    let away = tmp.path().join("away");
    std::fs::rename(&dir, &away).unwrap();
    let e = key.sign(b"while away").unwrap_err();
    assert!(matches!(e, KeyError::Unavailable(_)), "{e:?}");
    assert!(!t
        .stats()
        .available
        .load(std::sync::atomic::Ordering::Relaxed));
    assert!(
        t.stats()
            .unavailable
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );

    std::fs::rename(&away, &dir).unwrap();
    // Reconnects are at most one a second; the token is back within a few.
    let mut last = None;
    for _ in 0..50 {
        match key.sign(b"after") {
            Ok(sig) => {
                UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_ASN1, key.public_key())
                    .verify(b"after", &sig)
                    .unwrap();
                last = None;
                break;
            }
            Err(e) => last = Some(e),
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(last, None, "signing resumed with the same key");
    assert!(t
        .stats()
        .available
        .load(std::sync::atomic::Ordering::Relaxed));
    assert!(
        t.stats()
            .reconnects
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
}

#[test]
fn sessions_are_pooled_up_to_the_limit_under_concurrent_signing() {
    let Some((hsm, _lock)) = harness() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let (t, _) = token(hsm, "pool", tmp.path());
    assert_eq!(t.max_sessions(), 4);
    let key = Arc::new(Pkcs11Key::generate(&t, KeyType::EcP256, "int", &[9]).unwrap());
    let threads: Vec<_> = (0..8)
        .map(|i| {
            let key = key.clone();
            std::thread::spawn(move || {
                for j in 0..20 {
                    let msg = format!("{i}-{j}");
                    let sig = key.sign(msg.as_bytes()).unwrap();
                    UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_ASN1, key.public_key())
                        .verify(msg.as_bytes(), &sig)
                        .unwrap();
                }
            })
        })
        .collect();
    for th in threads {
        th.join().unwrap();
    }
    assert_eq!(
        t.stats()
            .signatures
            .load(std::sync::atomic::Ordering::Relaxed),
        160
    );
    assert!(t.open_sessions() <= 4, "{} sessions", t.open_sessions());
}

/// Imports `bare` (an RSA key made in memory) into the token as a sensitive key pair
/// labelled `label`: test-only, so one key can sign both ways.
fn import_rsa(t: &Token, label: &str, bare: &rcgen::KeyPair) {
    use cryptoki::object::{KeyType as CkKeyType, ObjectClass};
    use rsa::pkcs1::EncodeRsaPrivateKey;
    use rsa::pkcs8::DecodePrivateKey;
    let key = rsa::RsaPrivateKey::from_pkcs8_der(&bare.serialize_der()).unwrap();
    let der = key.to_pkcs1_der().unwrap();
    let k = rsa::pkcs1::RsaPrivateKey::try_from(der.as_bytes()).unwrap();
    let b = |u: rsa::pkcs1::UintRef<'_>| u.as_bytes().to_vec();
    let common = |class| {
        vec![
            Attribute::Class(class),
            Attribute::KeyType(CkKeyType::RSA),
            Attribute::Token(true),
            Attribute::Label(label.as_bytes().to_vec()),
            Attribute::Modulus(b(k.modulus)),
            Attribute::PublicExponent(b(k.public_exponent)),
        ]
    };
    let mut private = common(ObjectClass::PRIVATE_KEY);
    private.extend([
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Sign(true),
        Attribute::PrivateExponent(b(k.private_exponent)),
        Attribute::Prime1(b(k.prime1)),
        Attribute::Prime2(b(k.prime2)),
        Attribute::Exponent1(b(k.exponent1)),
        Attribute::Exponent2(b(k.exponent2)),
        Attribute::Coefficient(b(k.coefficient)),
    ]);
    let mut public = common(ObjectClass::PUBLIC_KEY);
    public.push(Attribute::Verify(true));
    t.admin(|s, tl| {
        for template in [&private, &public] {
            s.create_object(template)
                .map_err(|e| HsmError::call(tl, "create object", e))?;
        }
        Ok(())
    })
    .unwrap();
}

/// Issue 23: the leaf profile and the chain are byte for byte what the software backend
/// makes. With the same RSA key in the token and in memory (PKCS#1 v1.5 is deterministic),
/// a root, an intermediate under it, a workload leaf and a CRL signed through the token equal
/// those signed with the software key, signatures included.
#[test]
fn certificates_signed_through_the_token_are_byte_for_byte_the_software_ones() {
    use crate::identity::{ServiceAccount, TrustDomain};
    use crate::pki::{profile, RcgenKey, SoftwareKey};
    let Some((hsm, _lock)) = harness() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let (t, _) = token(hsm, "same-bytes", tmp.path());
    let bare = KeyType::Rsa2048.generate().unwrap();
    import_rsa(&t, "imported", &bare);
    let soft = SoftwareKey::from_pem(bare.serialize_pem().as_bytes())
        .unwrap()
        .shared();
    let spki = crate::pki::cakey::spki(soft.as_ref());
    let token_key = Pkcs11Key::open(&t, "imported", &spki).unwrap().shared();
    let (soft, token_key) = (RcgenKey::new(soft), RcgenKey::new(token_key));

    let td = TrustDomain::new("cluster.local").unwrap();
    let nb = time::macros::datetime!(2030-01-01 00:00 UTC);
    let na = time::macros::datetime!(2031-01-01 00:00 UTC);
    let root = profile::root(&td, &[7; 16], nb, na);
    let root_soft = root.self_signed(&soft).unwrap();
    assert_eq!(root_soft.der(), root.self_signed(&token_key).unwrap().der());

    let issuer =
        |k: &RcgenKey| rcgen::Issuer::from_ca_cert_der(root_soft.der(), k.clone()).unwrap();
    let int = profile::intermediate(&td, &[8; 16], nb, na);
    let subject = KeyType::EcP256.generate().unwrap();
    assert_eq!(
        int.signed_by(&subject, &issuer(&soft)).unwrap().der(),
        int.signed_by(&subject, &issuer(&token_key)).unwrap().der()
    );
    let id = td.service_account_id(&ServiceAccount::new("shop", "cart").unwrap());
    let leaf = profile::workload(&id, &[9; 16], nb, na).unwrap();
    assert_eq!(
        leaf.signed_by(&subject, &issuer(&soft)).unwrap().der(),
        leaf.signed_by(&subject, &issuer(&token_key)).unwrap().der()
    );
    let crl = rcgen::CertificateRevocationListParams {
        this_update: nb,
        next_update: na,
        crl_number: rcgen::SerialNumber::from(3u64),
        issuing_distribution_point: None,
        revoked_certs: vec![],
        key_identifier_method: rcgen::KeyIdMethod::Sha256,
    };
    assert_eq!(
        crl.signed_by(&issuer(&soft)).unwrap().der(),
        crl.signed_by(&issuer(&token_key)).unwrap().der()
    );
}
