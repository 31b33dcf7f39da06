//! citadel as a Kubernetes CSR signer (`certificates.k8s.io/v1` CertificateSigningRequest),
//! so that an unmodified istiod in RA mode (`EXTERNAL_CA=ISTIOD_RA_KUBERNETES_API`,
//! `K8S_SIGNER`, `CERT_SIGNER_DOMAIN`) gets its workloads' certificates from citadel: istiod
//! authenticates the proxy, creates a CSR carrying the proxy's PEM request, approves it itself,
//! and waits up to 60 s for `status.certificate`.
//!
//! Only the leader signs (the controller runs under
//! [`super::controller::while_leading`]). It acts only on CSRs whose `spec.signerName` is one
//! of ours (`--csr-signer`, each watched with a field selector, so other signers' CSRs never
//! reach us), only once they are Approved, never after Denied, never on a CSR that already has
//! a certificate or a Failed condition. Its answer is ONE `/status` write: the certificate
//! (PEM, leaf first, then the intermediates; the roots are for the trust bundle), or a
//! `Failed` condition with a reason, at once.
//!
//! What is checked, because the CSR's author chose everything in it except `spec.username`
//! and `spec.groups` (which the API server fills from the requester's credentials): the PEM
//! request's self-signature and key; exactly one URI SAN, a SPIFFE ID of our trust domain;
//! the requester may ask for it (istiod's service account, `--csr-istiod-requester`, for any
//! identity it vouches for: it authenticated the proxy; any other service account for its
//! own `spiffe://<td>/ns/<ns>/sa/<sa>` only; anyone else for nothing); `spec.usages` within
//! what our leaf profile carries; `spec.expirationSeconds` honoured under `--max-ttl`; the
//! identity not denied (`citadel revoke --identity`, on every CA, mapped ones included).
//!
//! Signer names map to CAs: `--csr-signer NAME` is served by citadel's own CA,
//! `--csr-signer NAME=DIR` by a plugged-in CA in Istio's `cacerts` layout in DIR (loaded and
//! checked with `ca::plugged` at start). The roots of every mapped CA are published for
//! istiod (`roots`), which verifies every answer against them.
//!
//! The parts, one concern each: `request` (decode and check a CSR; pure), `status` (the ONE
//! mapping from the shared issue path's error to `Failed` or a retry, and the status
//! objects), `stats` (metrics), `roots` (the Secret istiod reads its roots from),
//! `controller` (watch, approve when told to, decide, write `/status`, Events).

mod controller;
mod request;
mod roots;
mod stats;
mod status;

use std::path::PathBuf;
use std::sync::Arc;

pub use controller::CsrSigner;
pub use request::{state, CsrState, ALLOWED_USAGES};
pub use stats::CsrStats;
pub use status::{is_decided, reason};

use crate::ca::plugged::{self, DirSource};
use crate::ca::Ca;
use crate::identity::TrustDomain;

/// istiod's service account as the API server names it: the default of
/// `--csr-istiod-requester`.
pub const DEFAULT_ISTIOD_REQUESTER: &str = "system:serviceaccount:istio-system:istiod";

/// The API's lower bound on `spec.expirationSeconds`, and the shortest leaf we hand out.
pub const MIN_EXPIRATION_SECS: u64 = 600;

/// The Secret (in `--namespace`) whose `root-cert.pem` holds the roots of every mapped CA:
/// what istiod reads at `/etc/external-ca-cert` in RA mode, once mounted there.
pub const DEFAULT_ROOT_SECRET: &str = "external-ca-cert";

/// One `--csr-signer`: a signer name, and the plugged-in CA directory that serves it (`None`:
/// citadel's own CA).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignerRoute {
    /// The `spec.signerName` served.
    pub name: String,
    /// The plugged-in CA (Istio's cacerts layout) that signs for it, if not the main CA.
    pub ca_dir: Option<PathBuf>,
}

impl std::str::FromStr for SignerRoute {
    type Err = String;

    /// `NAME` or `NAME=DIR`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, dir) = match s.split_once('=') {
            Some((n, "")) => return Err(format!("--csr-signer {n:?}=: the CA directory is empty")),
            Some((n, d)) => (n, Some(PathBuf::from(d))),
            None => (s, None),
        };
        super::podcert::check_signer_name("--csr-signer", name)?;
        Ok(Self {
            name: name.to_string(),
            ca_dir: dir,
        })
    }
}

/// How the CSR signer is configured (`serve --csr-signer`, `--csr-istiod-requester`,
/// `--csr-auto-approve`, `--csr-workers`, `--csr-max-pending`, `--csr-root-secret`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CsrSignerConfig {
    /// The signer names served, each with its CA.
    pub signers: Vec<SignerRoute>,
    /// Requesters (Kubernetes usernames) that may ask for any identity of the trust domain:
    /// istiod, which authenticated the proxy it asks for.
    pub istiod_requesters: Vec<String>,
    /// Requesters whose CSRs for our signers citadel approves itself (needs `approve` on
    /// the signer names); empty: citadel never approves.
    pub auto_approve: Vec<String>,
    /// CSRs decided at once.
    pub workers: u16,
    /// Undecided CSRs held in memory at most.
    pub max_pending: usize,
    /// The Secret in `--namespace` citadel keeps the mapped CAs' roots in (`root-cert.pem`);
    /// `None` publishes none.
    pub root_secret: Option<String>,
}

impl Default for CsrSignerConfig {
    fn default() -> Self {
        Self {
            signers: vec![],
            istiod_requesters: vec![DEFAULT_ISTIOD_REQUESTER.into()],
            auto_approve: vec![],
            workers: 32,
            max_pending: crate::cluster::podcert::DEFAULT_MAX_PENDING,
            root_secret: Some(DEFAULT_ROOT_SECRET.into()),
        }
    }
}

impl CsrSignerConfig {
    /// Refuses a configuration that cannot work: no signer, a name twice, zero workers.
    pub fn validate(&self) -> Result<(), String> {
        if self.signers.is_empty() {
            return Err("the CSR signer needs at least one --csr-signer".into());
        }
        for (i, s) in self.signers.iter().enumerate() {
            super::podcert::check_signer_name("--csr-signer", &s.name)?;
            if self.signers[..i].iter().any(|o| o.name == s.name) {
                return Err(format!("--csr-signer {:?} is given twice", s.name));
            }
        }
        if self.workers == 0 {
            return Err("--csr-workers must be at least 1".into());
        }
        if self.max_pending == 0 {
            return Err("--csr-max-pending must be at least 1".into());
        }
        if self.istiod_requesters.iter().any(|r| r.trim().is_empty())
            || self.auto_approve.iter().any(|r| r.trim().is_empty())
        {
            return Err("--csr-istiod-requester and --csr-auto-approve take a username".into());
        }
        Ok(())
    }
}

/// A signer name and the CA that signs for it.
pub struct Route {
    /// The signer name.
    pub name: String,
    /// The CA: citadel's own, or a plugged-in one mapped to this name.
    pub ca: Arc<Ca>,
    /// Whether `ca` is a mapped (plugged-in) CA rather than citadel's own.
    pub mapped: bool,
}

/// Builds each signer name's CA: the main CA, or the plugged-in CA in its directory, loaded
/// and checked (`ca::plugged::load_checked`: key match, chain to a root, expiry, a throwaway
/// leaf verified) at `now`. Two names mapped to the same directory share one CA.
pub fn routes(
    config: &CsrSignerConfig,
    main: &Arc<Ca>,
    td: &TrustDomain,
    now: time::OffsetDateTime,
) -> Result<Vec<Route>, String> {
    let mut loaded: Vec<(PathBuf, Arc<Ca>)> = vec![];
    let mut out = vec![];
    for s in &config.signers {
        let (ca, mapped) = match &s.ca_dir {
            None => (main.clone(), false),
            Some(dir) => match loaded.iter().find(|(d, _)| d == dir) {
                Some((_, ca)) => (ca.clone(), true),
                None => {
                    let l = plugged::load_checked(&DirSource(dir), td, now)
                        .map_err(|e| format!("--csr-signer {}={}: {e}", s.name, dir.display()))?;
                    for w in &l.warnings {
                        tracing::warn!(signer = %s.name, "{w}");
                    }
                    tracing::info!(signer = %s.name, dir = %dir.display(), ca = %l.signer.signing_cert().subject, not_after = %l.signer.signing_cert().not_after, "CSR signer name mapped to a plugged-in CA");
                    let ca = Ca::new();
                    ca.install(l.signer);
                    loaded.push((dir.clone(), ca.clone()));
                    (ca, true)
                }
            },
        };
        out.push(Route {
            name: s.name.clone(),
            ca,
            mapped,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signer_flags_parse_and_bad_ones_are_refused() {
        let r: SignerRoute = "citadel.dev/spiffe".parse().unwrap();
        assert_eq!((r.name.as_str(), r.ca_dir), ("citadel.dev/spiffe", None));
        let r: SignerRoute = "mesh.example.com/legacy=/etc/legacy-ca".parse().unwrap();
        assert_eq!(r.ca_dir, Some(PathBuf::from("/etc/legacy-ca")));
        for bad in [
            "spiffe",
            "kubernetes.io/kube-apiserver-client",
            "example.com/x=",
            "Example.com/x",
        ] {
            let e = bad.parse::<SignerRoute>().unwrap_err();
            assert!(e.contains("--csr-signer"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_config_needs_distinct_signers_and_workers() {
        let route = |n: &str| SignerRoute {
            name: n.into(),
            ca_dir: None,
        };
        let mut c = CsrSignerConfig {
            signers: vec![route("citadel.dev/spiffe")],
            ..Default::default()
        };
        c.validate().unwrap();
        c.signers.push(route("citadel.dev/spiffe"));
        assert!(c.validate().unwrap_err().contains("twice"));
        c.signers.pop();
        c.workers = 0;
        assert!(c.validate().unwrap_err().contains("--csr-workers"));
        c.workers = 1;
        c.auto_approve = vec![" ".into()];
        assert!(c.validate().unwrap_err().contains("--csr-auto-approve"));
        assert!(CsrSignerConfig::default()
            .validate()
            .unwrap_err()
            .contains("at least one"));
    }
}
