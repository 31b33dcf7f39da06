//! Proof that every CA signature goes through the key seam ([`crate::pki::CaKey`]): a key
//! that counts its signatures and can be made to fail stands in for the software key, and
//! a leaf, a CRL, an intermediate and a cross-signed certificate are each signed by it and
//! verified by webpki or x509-parser.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::bootstrap::{self, CaOptions};
use super::{crl, mint, CaError, SignError, Signer};
use crate::identity::{ServiceAccount, SpiffeId, TrustDomain};
use crate::journal::{AuthorityRecord, Journal, Role, Status};
use crate::pki::chain::{self, Usage};
use crate::pki::csr::{self, SubjectKey};
use crate::pki::{pem, CaKey, KeyError, KeyType, PkiError, SignatureAlgorithm};
use rustls_pki_types::CertificateDer;

/// A CA key that counts signatures and, when told to, fails as an unreachable HSM would.
#[derive(Debug)]
struct Counting {
    inner: Arc<dyn CaKey>,
    calls: AtomicUsize,
    down: AtomicBool,
}

impl Counting {
    fn wrap(inner: Arc<dyn CaKey>) -> Arc<Self> {
        Arc::new(Self {
            inner,
            calls: AtomicUsize::new(0),
            down: AtomicBool::new(false),
        })
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl CaKey for Counting {
    fn algorithm(&self) -> SignatureAlgorithm {
        self.inner.algorithm()
    }
    fn public_key(&self) -> &[u8] {
        self.inner.public_key()
    }
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, KeyError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.down.load(Ordering::SeqCst) {
            return Err(KeyError::Unavailable("the token is not present".into()));
        }
        self.inner.sign(msg)
    }
}

fn td() -> TrustDomain {
    TrustDomain::new("cluster.local").unwrap()
}

fn cert(rec: &AuthorityRecord) -> CertificateDer<'static> {
    pem::parse_certs(rec.cert_pem.as_bytes()).unwrap().remove(0)
}

fn authority(j: &Journal, role: Role) -> AuthorityRecord {
    j.authorities
        .iter()
        .find(|a| a.role == role)
        .cloned()
        .unwrap()
}

fn subject(id: &SpiffeId) -> SubjectKey {
    let key = KeyType::EcP256.generate().unwrap();
    csr::parse_pem(csr::build(&key, &id.to_string()).unwrap().as_bytes())
        .unwrap()
        .key
}

fn workload_id() -> SpiffeId {
    td().service_account_id(&ServiceAccount::new("shop", "cart").unwrap())
}

#[test]
fn every_ca_signature_goes_through_the_key_seam() {
    let now = crate::clock::system().now();
    let mut journal = bootstrap::new_journal(&CaOptions::new(td()), now).unwrap();
    let root = authority(&journal, Role::Root);
    let int = authority(&journal, Role::Intermediate);
    let int_key = Counting::wrap(mint::ca_key_of(&int).unwrap());

    // A leaf, signed by the signer's key.
    let signer = Signer::new(
        td(),
        cert(&int),
        int_key.clone(),
        Vec::new(),
        vec![cert(&root)],
    )
    .unwrap();
    let id = workload_id();
    let leaf = signer
        .issue_workload(&subject(&id), &id, now, Duration::from_secs(3600))
        .unwrap();
    assert_eq!(int_key.calls(), 1, "the leaf was signed through the seam");
    chain::verify_leaf(
        &leaf.der,
        signer.intermediates_der(),
        signer.roots_der(),
        now,
        Usage::ClientAuth,
    )
    .expect("webpki accepts the leaf");
    assert!(Arc::ptr_eq(
        &(signer.key().clone() as Arc<dyn CaKey>),
        &(int_key.clone() as Arc<dyn CaKey>)
    ));

    // A CRL, signed by the same key.
    crl::sign_with(
        &mut journal,
        &int.id,
        int_key.clone(),
        now,
        Duration::from_secs(3600),
    )
    .unwrap();
    assert_eq!(int_key.calls(), 2, "the CRL was signed through the seam");
    let crl_pem = &journal
        .crls
        .iter()
        .find(|c| c.issuer == int.id)
        .unwrap()
        .pem;
    let crl_der = ::pem::parse(crl_pem.as_bytes()).unwrap().into_contents();
    let (_, parsed) = x509_parser::parse_x509_crl(&crl_der).unwrap();
    let int_der = cert(&int);
    let (_, int_cert) = x509_parser::parse_x509_certificate(&int_der).unwrap();
    parsed
        .verify_signature(int_cert.public_key())
        .expect("x509-parser verifies the CRL with the intermediate's key");

    // A root rotation: a new intermediate under a new root, cross-signed by the old root.
    let new_root = mint::mint_root(
        &td(),
        KeyType::EcP256,
        now,
        Duration::from_secs(86_400 * 30),
        Status::Prepared,
    )
    .unwrap();
    let new_root_key = Counting::wrap(mint::ca_key_of(&new_root).unwrap());
    let (new_int, new_int_key) = mint::mint_intermediate_under(
        &td(),
        KeyType::EcP256,
        &new_root,
        new_root_key.clone(),
        now,
        Duration::from_secs(86_400),
        Status::Prepared,
        None,
    )
    .unwrap();
    assert_eq!(
        new_root_key.calls(),
        1,
        "the intermediate was signed through the seam"
    );
    chain::check_issued_by(&cert(&new_int), &cert(&new_root)).expect("x509-parser verifies it");

    let old_root_key = Counting::wrap(mint::ca_key_of(&root).unwrap());
    let cross = mint::cross_sign_with(
        &td(),
        &new_int,
        &new_int_key,
        &root,
        old_root_key.clone(),
        now,
    )
    .unwrap();
    assert_eq!(
        old_root_key.calls(),
        1,
        "the cross-sign was signed through the seam"
    );
    let cross = pem::parse_certs(cross.as_bytes()).unwrap().remove(0);
    chain::check_issued_by(&cross, &cert(&root)).expect("x509-parser verifies the cross-sign");
    // A leaf of the new intermediate verifies to the old root through the cross-signed
    // certificate alone (webpki).
    let new_signer = Signer::new(
        td(),
        cert(&new_int),
        new_int_key,
        Vec::new(),
        vec![cert(&new_root)],
    )
    .unwrap();
    let leaf = new_signer
        .issue_workload(&subject(&id), &id, now, Duration::from_secs(3600))
        .unwrap();
    chain::verify_leaf(&leaf.der, &[cross], &[cert(&root)], now, Usage::ServerAuth)
        .expect("webpki accepts the leaf through the cross-signed intermediate");
}

#[test]
fn a_failing_key_is_an_error_not_a_panic() {
    let now = crate::clock::system().now();
    let mut journal = bootstrap::new_journal(&CaOptions::new(td()), now).unwrap();
    let root = authority(&journal, Role::Root);
    let int = authority(&journal, Role::Intermediate);
    let key = Counting::wrap(mint::ca_key_of(&int).unwrap());
    let signer = Signer::new(td(), cert(&int), key.clone(), Vec::new(), vec![cert(&root)]).unwrap();
    key.down.store(true, Ordering::SeqCst);

    let id = workload_id();
    let err = signer
        .issue_workload(&subject(&id), &id, now, Duration::from_secs(3600))
        .unwrap_err();
    assert!(
        matches!(&err, SignError::Key(KeyError::Unavailable(m)) if m.contains("not present")),
        "{err:?}"
    );

    let err = crl::sign_with(
        &mut journal,
        &int.id,
        key.clone(),
        now,
        Duration::from_secs(60),
    )
    .unwrap_err();
    assert!(
        matches!(err, CaError::Pki(PkiError::Key(KeyError::Unavailable(_)))),
        "{err:?}"
    );
    assert!(
        journal.crls.iter().all(|c| c.issuer != int.id),
        "no CRL recorded"
    );

    let err = mint::cross_sign_with(
        &td(),
        &int,
        &(key.clone() as Arc<dyn CaKey>),
        &root,
        key.clone(),
        now,
    )
    .unwrap_err();
    assert!(matches!(err, CaError::Pki(PkiError::Key(_))), "{err:?}");
    assert_eq!(key.calls(), 3);

    // The key comes back: the same signer signs again.
    key.down.store(false, Ordering::SeqCst);
    signer
        .issue_workload(&subject(&id), &id, now, Duration::from_secs(3600))
        .expect("signs once the key is back");
}
