//! Plugged-in CA material in Istio's `cacerts` layout:
//! `ca-cert.pem` (the signing CA), `ca-key.pem`, `cert-chain.pem` (the signing CA up to the
//! root) and `root-cert.pem` (the trust bundle), plus an optional `ca-crl.pem`.
//!
//! Every check names the file that is wrong, because "invalid CA" is useless at 3 a.m.

use std::path::Path;

use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;

use super::signer::RevocationView;
use super::{CaError, Signer};
use crate::identity::TrustDomain;
use crate::pki::{chain, keys, pem};

/// Where the cacerts files come from: a directory, or the data of a `cacerts` Secret.
pub trait Source {
    /// How to name `file` in messages, e.g. `/etc/cacerts/ca-key.pem`.
    fn describe(&self, file: &str) -> String;
    /// The file's bytes, `None` when absent.
    fn get(&self, file: &str) -> std::io::Result<Option<Vec<u8>>>;
}

/// The cacerts files in a directory (Istio mounts them at `/etc/cacerts`).
pub struct DirSource<'a>(pub &'a Path);

impl Source for DirSource<'_> {
    fn describe(&self, file: &str) -> String {
        self.0.join(file).display().to_string()
    }
    fn get(&self, file: &str) -> std::io::Result<Option<Vec<u8>>> {
        match std::fs::read(self.0.join(file)) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// Files held in memory (a Secret's data), named `<label>/<key>` in messages. No `Debug`:
/// it holds `ca-key.pem`.
#[derive(Clone)]
pub struct MapSource {
    /// Names the source in messages, as `<label>/<file>`.
    pub label: String,
    /// File name (the Secret's data key) -> contents.
    pub files: std::collections::BTreeMap<String, Vec<u8>>,
}

impl Source for MapSource {
    fn describe(&self, file: &str) -> String {
        format!("{}/{file}", self.label)
    }
    fn get(&self, file: &str) -> std::io::Result<Option<Vec<u8>>> {
        Ok(self.files.get(file).cloned())
    }
}

fn read(src: &dyn Source, name: &str) -> Result<Vec<u8>, CaError> {
    match src.get(name) {
        Ok(Some(b)) => Ok(b),
        Ok(None) => Err(CaError::Plugged {
            file: src.describe(name),
            reason: "missing (a plugged-in CA needs ca-cert.pem, ca-key.pem, cert-chain.pem and root-cert.pem)".into(),
        }),
        Err(e) => Err(CaError::Plugged { file: src.describe(name), reason: format!("cannot read: {e}") }),
    }
}

fn bad(src: &dyn Source, name: &str, reason: impl Into<String>) -> CaError {
    CaError::Plugged {
        file: src.describe(name),
        reason: reason.into(),
    }
}

fn certs(src: &dyn Source, name: &str) -> Result<Vec<CertificateDer<'static>>, CaError> {
    pem::parse_certs(&read(src, name)?).map_err(|e| bad(src, name, e.to_string()))
}

/// Loads a plugged-in CA from a directory in Istio's cacerts layout.
pub fn load(dir: &Path, td: &TrustDomain, now: OffsetDateTime) -> Result<Signer, CaError> {
    load_from(&DirSource(dir), td, now)
}

/// Loads and checks a plugged-in CA from any source; refuses anything incoherent.
pub fn load_from(
    dir: &dyn Source,
    td: &TrustDomain,
    now: OffsetDateTime,
) -> Result<Signer, CaError> {
    load_checked(dir, td, now).map(|l| l.signer)
}

/// A plugged-in CA that passed every check, with what is odd about it but not refused.
#[derive(Debug)]
pub struct Loaded {
    /// The signer built from the material.
    pub signer: Signer,
    /// Things an operator should know (each names the file); logged at install.
    pub warnings: Vec<String>,
}

/// The SPIFFE ID the throwaway self-check leaf is issued for (never handed out).
const SELF_CHECK_SA: (&str, &str) = ("citadel-self-check", "citadel-self-check");

/// Loads and checks a plugged-in CA, returning warnings beside the signer.
///
/// Structure is not enough: material whose leaves nobody accepts (a CA without keyCertSign,
/// a pathLenConstraint or nameConstraints that rule out our leaves, an element outside its
/// validity, a stale CRL) would be installed only to break every workload at its next
/// handshake. So beyond the structural checks a throwaway leaf is signed with the candidate
/// through the normal leaf profile and verified by rustls-webpki, as a client and as a
/// server certificate, against the candidate's own roots at `now`.
pub fn load_checked(
    dir: &dyn Source,
    td: &TrustDomain,
    now: OffsetDateTime,
) -> Result<Loaded, CaError> {
    let mut warnings = Vec::new();
    let ca_cert = certs(dir, "ca-cert.pem")?.remove(0);
    let info = check_ca(dir, "ca-cert.pem", &ca_cert, now)?;

    let key = keys::load_private_key_pem(&read(dir, "ca-key.pem")?)
        .map_err(|e| bad(dir, "ca-key.pem", e.to_string()))?;
    if !chain::key_matches_cert(&key, &ca_cert)
        .map_err(|e| bad(dir, "ca-cert.pem", e.to_string()))?
    {
        return Err(bad(
            dir,
            "ca-key.pem",
            "does not match the public key in ca-cert.pem",
        ));
    }

    let roots = certs(dir, "root-cert.pem")?;
    for r in &roots {
        check_ca(dir, "root-cert.pem", r, now)?;
    }

    // cert-chain.pem lists the signing CA up to the root; keep what lies strictly between.
    let mut between = certs(dir, "cert-chain.pem")?;
    between.retain(|c| {
        c.as_ref() != ca_cert.as_ref() && !roots.iter().any(|r| r.as_ref() == c.as_ref())
    });
    let mut link = ca_cert.clone();
    for c in &between {
        chain::check_issued_by(&link, c).map_err(|e| bad(dir, "cert-chain.pem", e.to_string()))?;
        check_ca(dir, "cert-chain.pem", c, now)?;
        link = c.clone();
    }
    let Some(anchor) = roots
        .iter()
        .find(|r| r.as_ref() == link.as_ref() || chain::check_issued_by(&link, r).is_ok())
        .cloned()
    else {
        return Err(bad(
            dir,
            "root-cert.pem",
            "no certificate in it issued the top of cert-chain.pem (ca-cert.pem does not chain to this root)",
        ));
    };
    // The path a leaf takes: ca-cert.pem, what lies between, then the anchor (unless
    // ca-cert.pem is the anchor itself).
    let mut path: Vec<(&str, CertificateDer<'static>)> = vec![("ca-cert.pem", ca_cert.clone())];
    path.extend(between.iter().map(|c| ("cert-chain.pem", c.clone())));
    if anchor.as_ref() != ca_cert.as_ref() {
        path.push(("root-cert.pem", anchor.clone()));
    }
    check_path_len(dir, &path)?;
    let leaf_id = td.service_account_id(
        &crate::identity::ServiceAccount::new(SELF_CHECK_SA.0, SELF_CHECK_SA.1)
            .map_err(|e| CaError::Config(e.to_string()))?,
    );
    for (file, c) in &path {
        check_name_constraints(dir, file, c, &leaf_id)?;
    }
    if info.self_signed || roots.iter().any(|r| r.as_ref() == ca_cert.as_ref()) {
        warnings.push(format!(
            "{}: {:?} is itself the root: its key signs every leaf online, so a leak of \
             ca-key.pem means replacing the root everywhere; prefer an intermediate under an \
             offline root",
            dir.describe("ca-cert.pem"),
            info.subject
        ));
    }
    for r in roots.iter().filter(|r| r.as_ref() != anchor.as_ref()) {
        let subject = chain::describe(r).map(|i| i.subject).unwrap_or_default();
        warnings.push(format!(
            "{}: the root {subject:?} does not anchor the chain of ca-cert.pem: it is trusted \
             (bundles, client-certificate renewal) but signs nothing citadel issues",
            dir.describe("root-cert.pem")
        ));
    }
    let view = if dir.get("ca-crl.pem").ok().flatten().is_some() {
        load_crl(dir, &ca_cert, &roots, now)?
    } else {
        RevocationView::default()
    };
    let key = crate::pki::SoftwareKey::new(key)
        .map_err(|e| bad(dir, "ca-key.pem", e.to_string()))?
        .shared();
    let signer = Signer::new(td.clone(), ca_cert, key, between, roots)
        .map_err(|e| bad(dir, "cert-chain.pem", e.to_string()))?
        .with_revocations(view);
    self_check(dir, &signer, &leaf_id, &path, now)?;
    Ok(Loaded { signer, warnings })
}

/// The latest notBefore among the material's certificates, when it lies after `now`: the
/// moment refused-as-not-yet-valid material becomes worth offering again.
pub fn valid_from(src: &dyn Source, now: OffsetDateTime) -> Option<OffsetDateTime> {
    ["ca-cert.pem", "cert-chain.pem", "root-cert.pem"]
        .iter()
        .filter_map(|f| src.get(f).ok().flatten())
        .filter_map(|b| pem::parse_certs(&b).ok())
        .flatten()
        .filter_map(|c| chain::describe(&c).ok())
        .map(|i| i.not_before)
        .filter(|nb| *nb > now)
        .max()
}

/// A CA certificate of the material: CA:true, allowed to sign certificates, valid at `now`.
fn check_ca(
    dir: &dyn Source,
    file: &str,
    der: &CertificateDer<'_>,
    now: OffsetDateTime,
) -> Result<chain::CertInfo, CaError> {
    let info = chain::describe(der).map_err(|e| bad(dir, file, e.to_string()))?;
    if !info.is_ca {
        return Err(bad(
            dir,
            file,
            format!(
                "{:?} is not a CA certificate (basicConstraints CA:true missing)",
                info.subject
            ),
        ));
    }
    if !chain::may_sign_certificates(der).map_err(|e| bad(dir, file, e.to_string()))? {
        return Err(bad(
            dir,
            file,
            format!(
                "{:?} has a keyUsage without keyCertSign: verifiers refuse what it signs",
                info.subject
            ),
        ));
    }
    if info.not_after <= now {
        return Err(bad(
            dir,
            file,
            format!("{:?} expired at {}", info.subject, info.not_after),
        ));
    }
    if info.not_before > now {
        return Err(bad(
            dir,
            file,
            format!(
                "{:?} is not valid before {} (notBefore is in the future; check the clocks)",
                info.subject, info.not_before
            ),
        ));
    }
    Ok(info)
}

/// Each CA's pathLenConstraint must allow the CA certificates below it on the leaf's path
/// (OpenSSL and BoringSSL also enforce it on the root).
fn check_path_len(
    dir: &dyn Source,
    path: &[(&str, CertificateDer<'static>)],
) -> Result<(), CaError> {
    for (below, (file, c)) in path.iter().enumerate() {
        let info = chain::describe(c).map_err(|e| bad(dir, file, e.to_string()))?;
        if let Some(limit) = info.path_len {
            if below as u64 > u64::from(limit) {
                return Err(bad(
                    dir,
                    file,
                    format!(
                        "{:?} has pathLenConstraint {limit} but {below} CA certificate(s) lie \
                         below it on the way to a leaf: verifiers refuse every leaf",
                        info.subject
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// nameConstraints that would reject our leaves: any URI subtree (rustls-webpki fails
/// closed on URI constraints, so no client certificate could renew), or permitted subtrees
/// that name no URI at all (the CA was meant for other names; a SPIFFE URI is not among them).
fn check_name_constraints(
    dir: &dyn Source,
    file: &str,
    der: &CertificateDer<'_>,
    leaf_id: &crate::identity::SpiffeId,
) -> Result<(), CaError> {
    use x509_parser::extensions::GeneralName;
    let c = chain::parse(der).map_err(|e| bad(dir, file, e.to_string()))?;
    let Some(nc) = c
        .name_constraints()
        .map_err(|e| bad(dir, file, format!("unreadable nameConstraints: {e}")))?
    else {
        return Ok(());
    };
    let subject = c.subject().to_string();
    let uri = |t: &Option<Vec<x509_parser::extensions::GeneralSubtree<'_>>>| {
        t.iter()
            .flatten()
            .any(|s| matches!(s.base, GeneralName::URI(_)))
    };
    if uri(&nc.value.permitted_subtrees) || uri(&nc.value.excluded_subtrees) {
        return Err(bad(
            dir,
            file,
            format!(
                "{subject:?} has URI nameConstraints: rustls-webpki (citadel's own client-certificate \
                 check) refuses every leaf with a URI SAN such as {leaf_id} under them"
            ),
        ));
    }
    if nc
        .value
        .permitted_subtrees
        .as_ref()
        .is_some_and(|p| !p.is_empty())
    {
        return Err(bad(
            dir,
            file,
            format!(
                "{subject:?} has nameConstraints permitting only non-URI names: it was not made \
                 for SPIFFE identities such as {leaf_id}"
            ),
        ));
    }
    Ok(())
}

/// Signs a throwaway leaf with the candidate through the normal leaf profile and verifies it
/// with rustls-webpki as a client and as a server certificate against the candidate's roots.
fn self_check(
    dir: &dyn Source,
    signer: &Signer,
    id: &crate::identity::SpiffeId,
    path: &[(&str, CertificateDer<'static>)],
    now: OffsetDateTime,
) -> Result<(), CaError> {
    let key = crate::pki::KeyType::EcP256
        .generate()
        .map_err(|e| CaError::Config(format!("self-check key: {e}")))?;
    let csr = crate::pki::csr::build(&key, &id.to_string())
        .map_err(|e| CaError::Config(format!("self-check CSR: {e}")))?;
    let csr = crate::pki::csr::parse_pem(csr.as_bytes())
        .map_err(|e| CaError::Config(format!("self-check CSR: {e}")))?;
    let leaf = signer
        .issue_workload(&csr.key, id, now, std::time::Duration::from_secs(600))
        .map_err(|e| bad(dir, "ca-cert.pem", format!("cannot sign a test leaf: {e}")))?;
    let blame = path
        .iter()
        .rev()
        .find(|(_, c)| {
            chain::parse(c)
                .map(|c| c.name_constraints().ok().flatten().is_some())
                .unwrap_or(false)
        })
        .map_or("ca-cert.pem", |(f, _)| f);
    for usage in [chain::Usage::ClientAuth, chain::Usage::ServerAuth] {
        chain::verify_leaf(
            &leaf.der,
            signer.intermediates_der(),
            signer.roots_der(),
            now,
            usage,
        )
        .map_err(|e| {
            bad(
                dir,
                blame,
                format!("a test leaf signed with this CA does not verify as a {usage:?} certificate against root-cert.pem: {e}"),
            )
        })?;
    }
    Ok(())
}

/// Honours the plugged-in CA's `ca-crl.pem`: every CRL in it must be signed by ca-cert.pem
/// or a root; the serials it lists can no longer renew by client certificate.
fn load_crl(
    dir: &dyn Source,
    ca_cert: &CertificateDer<'_>,
    roots: &[CertificateDer<'static>],
    now: OffsetDateTime,
) -> Result<RevocationView, CaError> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    use x509_parser::revocation_list::CertificateRevocationList;
    let text = read(dir, "ca-crl.pem")?;
    let blocks = ::pem::parse_many(&text)
        .map_err(|e| bad(dir, "ca-crl.pem", format!("malformed PEM: {e}")))?;
    let mut view = RevocationView::default();
    let issuers: Vec<X509Certificate<'_>> = std::iter::once(ca_cert.as_ref())
        .chain(roots.iter().map(|r| r.as_ref()))
        .filter_map(|d| X509Certificate::from_der(d).ok().map(|x| x.1))
        .collect();
    for b in blocks.iter().filter(|b| b.tag() == "X509 CRL") {
        let (_, crl) = CertificateRevocationList::from_der(b.contents())
            .map_err(|e| bad(dir, "ca-crl.pem", format!("unreadable CRL: {e}")))?;
        let signed = issuers.iter().any(|i| {
            i.subject().as_raw() == crl.issuer().as_raw()
                && crl.verify_signature(i.public_key()).is_ok()
        });
        if !signed {
            return Err(bad(
                dir,
                "ca-crl.pem",
                format!(
                    "a CRL from {:?} is not signed by ca-cert.pem or a root",
                    crl.issuer().to_string()
                ),
            ));
        }
        for r in crl.iter_revoked_certificates() {
            view.revoked.insert((
                crl.issuer().as_raw().to_vec(),
                chain::serial_hex(r.raw_serial()),
            ));
        }
        if let Some(next) = crl.next_update() {
            let n = next.timestamp();
            // A stale CRL says nothing about what was revoked since: enforcing it would
            // let those serials renew, so the material is refused until it is re-signed.
            if n <= now.unix_timestamp() {
                return Err(bad(
                    dir,
                    "ca-crl.pem",
                    format!(
                        "the CRL from {:?} is stale: its nextUpdate {} has passed; re-sign it upstream",
                        crl.issuer().to_string(),
                        next.to_datetime()
                    ),
                ));
            }
            view.crl_next_update = Some(view.crl_next_update.map_or(n, |c: i64| c.min(n)));
        }
    }
    view.crl_entries = view.revoked.len();
    view.crl_pem = String::from_utf8_lossy(&text).into_owned();
    Ok(view)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, CustomExtension, DnType, IsCa, Issuer, KeyPair,
        KeyUsagePurpose,
    };
    use std::collections::BTreeMap;
    use time::Duration;

    fn now() -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap()
    }

    fn td() -> TrustDomain {
        TrustDomain::new("cluster.local").unwrap()
    }

    /// One CA certificate of a test chain.
    #[derive(Clone)]
    struct Ca {
        name: &'static str,
        path_len: Option<u8>,
        usages: Vec<KeyUsagePurpose>,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
        /// DER of a NameConstraints value, hand-built (rcgen cannot write URI subtrees).
        name_constraints: Option<Vec<u8>>,
    }

    fn ca(name: &'static str) -> Ca {
        Ca {
            name,
            path_len: None,
            usages: vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign],
            not_before: now() - Duration::days(1),
            not_after: now() + Duration::days(365),
            name_constraints: None,
        }
    }

    fn params(c: &Ca) -> CertificateParams {
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, c.name);
        p.is_ca = IsCa::Ca(match c.path_len {
            Some(n) => BasicConstraints::Constrained(n),
            None => BasicConstraints::Unconstrained,
        });
        p.key_usages = c.usages.clone();
        p.not_before = c.not_before;
        p.not_after = c.not_after;
        p.serial_number = Some(rcgen::SerialNumber::from_slice(&crate::pki::random_serial()));
        if let Some(nc) = &c.name_constraints {
            let mut e = CustomExtension::from_oid_content(&[2, 5, 29, 30], nc.clone());
            e.set_criticality(true);
            p.custom_extensions.push(e);
        }
        p
    }

    /// cacerts material: `chain[0]` is the root, the last one signs (ca-cert.pem).
    struct Material {
        files: BTreeMap<String, Vec<u8>>,
        signer_issuer: Issuer<'static, KeyPair>,
    }

    fn material(chain: &[Ca]) -> Material {
        let key = KeyPair::generate().unwrap();
        let root = params(&chain[0]).self_signed(&key).unwrap();
        let mut issuer = Issuer::new(params(&chain[0]), key);
        let mut pems = vec![root.pem()];
        for c in &chain[1..] {
            let key = KeyPair::generate().unwrap();
            let cert = params(c).signed_by(&key, &issuer).unwrap();
            pems.push(cert.pem());
            issuer = Issuer::new(params(c), key);
        }
        let top: String = pems.iter().rev().cloned().collect();
        let files = BTreeMap::from([
            (
                "ca-cert.pem".to_string(),
                pems.last().unwrap().clone().into_bytes(),
            ),
            (
                "ca-key.pem".to_string(),
                issuer.key().serialize_pem().into_bytes(),
            ),
            ("cert-chain.pem".to_string(), top.into_bytes()),
            ("root-cert.pem".to_string(), pems[0].clone().into_bytes()),
        ]);
        Material {
            files,
            signer_issuer: issuer,
        }
    }

    fn load(files: &BTreeMap<String, Vec<u8>>) -> Result<Loaded, CaError> {
        let src = MapSource {
            label: "cacerts".into(),
            files: files.clone(),
        };
        load_checked(&src, &td(), now())
    }

    fn refused(chain: &[Ca], file: &str, says: &str) {
        let m = material(chain);
        let e = load(&m.files).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("cacerts/{file}: ")) && e.contains(says),
            "{e}"
        );
    }

    fn root_and_int() -> Vec<Ca> {
        vec![
            ca("root"),
            Ca {
                path_len: Some(0),
                ..ca("int")
            },
        ]
    }

    /// DER of NameConstraints with one subtree: `[tag] { SEQUENCE { GeneralName } }`.
    fn one_subtree(excluded: bool, general_name_tag: u8, value: &[u8]) -> Vec<u8> {
        let name = [&[general_name_tag, value.len() as u8][..], value].concat();
        let subtree = [&[0x30, name.len() as u8][..], &name].concat();
        let subtrees = [
            &[if excluded { 0xa1 } else { 0xa0 }, subtree.len() as u8][..],
            &subtree,
        ]
        .concat();
        [&[0x30, subtrees.len() as u8][..], &subtrees].concat()
    }

    #[test]
    fn good_material_loads_without_warnings() {
        let m = material(&root_and_int());
        let l = load(&m.files).unwrap();
        assert!(l.warnings.is_empty(), "{:?}", l.warnings);
        // Root (pathLen 2) -> mid (1) -> int (0): each allows exactly what lies below it.
        let chain = [
            Ca {
                path_len: Some(2),
                ..ca("root")
            },
            Ca {
                path_len: Some(1),
                ..ca("mid")
            },
            Ca {
                path_len: Some(0),
                ..ca("int")
            },
        ];
        let l = load(&material(&chain).files).unwrap();
        assert!(l.warnings.is_empty(), "{:?}", l.warnings);
    }

    #[test]
    fn a_ca_without_key_cert_sign_is_refused() {
        let mut chain = root_and_int();
        chain[1].usages = vec![KeyUsagePurpose::DigitalSignature];
        refused(&chain, "ca-cert.pem", "keyUsage without keyCertSign");
        let mut chain = root_and_int();
        chain[0].usages = vec![KeyUsagePurpose::CrlSign];
        refused(&chain, "root-cert.pem", "keyUsage without keyCertSign");
    }

    #[test]
    fn a_path_len_that_rules_out_our_leaves_is_refused() {
        // The root allows no CA below it, but two lie between it and a leaf.
        let chain = [
            Ca {
                path_len: Some(0),
                ..ca("root")
            },
            ca("mid"),
            Ca {
                path_len: Some(0),
                ..ca("int")
            },
        ];
        refused(&chain, "root-cert.pem", "pathLenConstraint 0 but 2");
        // An intermediate of pathLen 0 with a CA under it.
        let chain = [
            ca("root"),
            Ca {
                path_len: Some(0),
                ..ca("mid")
            },
            ca("int"),
        ];
        refused(&chain, "cert-chain.pem", "pathLenConstraint 0 but 1");
    }

    #[test]
    fn name_constraints_that_reject_our_leaves_are_refused() {
        let mut chain = root_and_int();
        chain[1].name_constraints = Some(one_subtree(true, 0x86, b"spiffe://cluster.local"));
        refused(&chain, "ca-cert.pem", "URI nameConstraints");
        chain[1].name_constraints = Some(one_subtree(false, 0x86, b"cluster.local"));
        refused(&chain, "ca-cert.pem", "URI nameConstraints");
        // Permitting only DNS names, on the root.
        let mut chain = root_and_int();
        chain[0].name_constraints = Some(one_subtree(false, 0x82, b"example.com"));
        refused(&chain, "root-cert.pem", "permitting only non-URI names");
        // Excluding a DNS name says nothing about SPIFFE URIs: accepted.
        let mut chain = root_and_int();
        chain[1].name_constraints = Some(one_subtree(true, 0x82, b"evil.example"));
        load(&material(&chain).files).unwrap();
    }

    #[test]
    fn an_expired_or_not_yet_valid_element_is_refused() {
        let mut chain = root_and_int();
        chain[1].not_after = now() - Duration::seconds(1);
        refused(&chain, "ca-cert.pem", "expired at");
        let mut chain = root_and_int();
        chain[0].not_after = now() - Duration::seconds(1);
        refused(&chain, "root-cert.pem", "expired at");
        let mid = [ca("root"), ca("mid"), ca("int")];
        let mut chain = mid.to_vec();
        chain[1].not_after = now() - Duration::seconds(1);
        refused(&chain, "cert-chain.pem", "expired at");
        let mut chain = root_and_int();
        chain[1].not_before = now() + Duration::minutes(5);
        refused(&chain, "ca-cert.pem", "notBefore is in the future");
        let m = material(&chain);
        let src = MapSource {
            label: "cacerts".into(),
            files: m.files,
        };
        // Offered again once it becomes valid (rcgen writes whole seconds).
        assert_eq!(valid_from(&src, now()), Some(now() + Duration::minutes(5)));
        assert_eq!(valid_from(&src, now() + Duration::minutes(5)), None);
    }

    #[test]
    fn a_stale_crl_is_refused_and_a_fresh_one_honoured() {
        let crl = |m: &Material, next: OffsetDateTime| {
            rcgen::CertificateRevocationListParams {
                this_update: now() - Duration::hours(2),
                next_update: next,
                crl_number: rcgen::SerialNumber::from(1u64),
                issuing_distribution_point: None,
                revoked_certs: vec![],
                key_identifier_method: rcgen::KeyIdMethod::Sha256,
            }
            .signed_by(&m.signer_issuer)
            .unwrap()
            .pem()
            .unwrap()
        };
        let mut m = material(&root_and_int());
        let stale = crl(&m, now() - Duration::minutes(1));
        m.files.insert("ca-crl.pem".into(), stale.into_bytes());
        let e = load(&m.files).unwrap_err().to_string();
        assert!(
            e.starts_with("cacerts/ca-crl.pem: ") && e.contains("stale"),
            "{e}"
        );
        let fresh = crl(&m, now() + Duration::hours(1));
        m.files.insert("ca-crl.pem".into(), fresh.into_bytes());
        load(&m.files).unwrap();
    }

    #[test]
    fn a_root_as_signer_and_a_root_that_anchors_nothing_are_warned_about() {
        let m = material(&[ca("root")]);
        let l = load(&m.files).unwrap();
        assert_eq!(l.warnings.len(), 1, "{:?}", l.warnings);
        assert!(
            l.warnings[0].starts_with("cacerts/ca-cert.pem: ")
                && l.warnings[0].contains("is itself the root"),
            "{:?}",
            l.warnings
        );
        let mut m = material(&root_and_int());
        let other = material(&[ca("unrelated root")]);
        let mut roots = m.files["root-cert.pem"].clone();
        roots.extend_from_slice(&other.files["root-cert.pem"]);
        m.files.insert("root-cert.pem".into(), roots);
        let l = load(&m.files).unwrap();
        assert_eq!(l.warnings.len(), 1, "{:?}", l.warnings);
        assert!(
            l.warnings[0].starts_with("cacerts/root-cert.pem: ")
                && l.warnings[0].contains("\"CN=unrelated root\" does not anchor"),
            "{:?}",
            l.warnings
        );
    }
}
