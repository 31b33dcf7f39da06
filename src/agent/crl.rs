//! Follows a CRL file (the CA's `ca-crl.pem`, or the `istio-ca-crl` ConfigMap mounted in a
//! pod) and folds it into the credentials, so a revocation reaches Envoy over SDS.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::CredentialsTx;
use crate::shutdown::Shutdown;

/// Reads the CRL file; `None` if it is absent, empty or not PEM X509 CRL blocks.
fn read(path: &PathBuf) -> Option<String> {
    let crl = match std::fs::read_to_string(path) {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read the CRL file");
            return None;
        }
    };
    let blocks = ::pem::parse_many(crl.as_bytes()).ok()?;
    if blocks.is_empty() || blocks.iter().any(|b| b.tag() != "X509 CRL") {
        tracing::warn!(path = %path.display(), "ignoring a CRL file that is not PEM X509 CRL blocks");
        return None;
    }
    Some(crl)
}

/// Checks `path` every `interval`, and whenever the credentials change (a first certificate
/// gets the CRL at once); publishes credentials carrying the current CRL.
pub async fn follow(path: PathBuf, tx: CredentialsTx, interval: Duration, shutdown: Shutdown) {
    let mut changes = tx.subscribe();
    loop {
        if let Some(crl) = read(&path) {
            let updated = tx.send_if_modified(|cur| match cur {
                Some(c) if c.crl_pem.as_deref() != Some(crl.as_str()) => {
                    let mut next = (**c).clone();
                    next.crl_pem = Some(crl.clone());
                    next.version += 1;
                    *cur = Some(Arc::new(next));
                    true
                }
                _ => false,
            });
            if updated {
                tracing::info!(path = %path.display(), "CRL updated");
            }
        }
        changes.mark_unchanged();
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            r = changes.changed() => if r.is_err() { return },
            _ = shutdown.wait() => return,
        }
    }
}
