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

/// Files held in memory (a Secret's data), named `<label>/<key>` in messages.
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
    let ca_cert = certs(dir, "ca-cert.pem")?.remove(0);
    let info = chain::describe(&ca_cert).map_err(|e| bad(dir, "ca-cert.pem", e.to_string()))?;
    if !info.is_ca {
        return Err(bad(
            dir,
            "ca-cert.pem",
            format!(
                "{:?} is not a CA certificate (basicConstraints CA:true missing)",
                info.subject
            ),
        ));
    }
    if info.not_after <= now {
        return Err(bad(
            dir,
            "ca-cert.pem",
            format!("expired at {}", info.not_after),
        ));
    }

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
        let ri = chain::describe(r).map_err(|e| bad(dir, "root-cert.pem", e.to_string()))?;
        if !ri.is_ca {
            return Err(bad(
                dir,
                "root-cert.pem",
                format!("{:?} is not a CA certificate", ri.subject),
            ));
        }
    }

    // cert-chain.pem lists the signing CA up to the root; keep what lies strictly between.
    let mut between = certs(dir, "cert-chain.pem")?;
    between.retain(|c| {
        c.as_ref() != ca_cert.as_ref() && !roots.iter().any(|r| r.as_ref() == c.as_ref())
    });
    let mut link = ca_cert.clone();
    for c in &between {
        chain::check_issued_by(&link, c).map_err(|e| bad(dir, "cert-chain.pem", e.to_string()))?;
        link = c.clone();
    }
    let anchored = roots
        .iter()
        .any(|r| r.as_ref() == link.as_ref() || chain::check_issued_by(&link, r).is_ok());
    if !anchored {
        return Err(bad(
            dir,
            "root-cert.pem",
            "no certificate in it issued the top of cert-chain.pem (ca-cert.pem does not chain to this root)",
        ));
    }
    let view = if dir.get("ca-crl.pem").ok().flatten().is_some() {
        load_crl(dir, &ca_cert, &roots)?
    } else {
        RevocationView::default()
    };
    Ok(Signer::new(td.clone(), ca_cert, key, between, roots)
        .map_err(|e| bad(dir, "cert-chain.pem", e.to_string()))?
        .with_revocations(view))
}

/// Honours the plugged-in CA's `ca-crl.pem`: every CRL in it must be signed by ca-cert.pem
/// or a root; the serials it lists can no longer renew by client certificate.
fn load_crl(
    dir: &dyn Source,
    ca_cert: &CertificateDer<'_>,
    roots: &[CertificateDer<'static>],
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
            view.crl_next_update = Some(view.crl_next_update.map_or(n, |c: i64| c.min(n)));
        }
    }
    view.crl_entries = view.revoked.len();
    view.crl_pem = String::from_utf8_lossy(&text).into_owned();
    Ok(view)
}
