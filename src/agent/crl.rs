//! Follows a CRL file (the CA's `ca-crl.pem`, or the `istio-ca-crl` ConfigMap mounted in a
//! pod) and folds it into the credentials, so a revocation reaches Envoy over SDS.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::CredentialsTx;
use crate::shutdown::Shutdown;

/// Checks `path` every `interval`; on a change publishes credentials with the new CRL.
pub async fn follow(path: PathBuf, tx: CredentialsTx, interval: Duration, shutdown: Shutdown) {
    let mut last: Option<String> = None;
    loop {
        match std::fs::read_to_string(&path) {
            Ok(crl) if last.as_deref() != Some(crl.as_str()) => {
                let ok = ::pem::parse_many(crl.as_bytes())
                    .is_ok_and(|b| b.iter().all(|p| p.tag() == "X509 CRL"));
                if !ok && !crl.trim().is_empty() {
                    tracing::warn!(path = %path.display(), "ignoring a CRL file that is not PEM X509 CRL blocks");
                } else {
                    let crl_opt = (!crl.trim().is_empty()).then(|| crl.clone());
                    let changed = tx.send_if_modified(|cur| match cur {
                        Some(c) if c.crl_pem != crl_opt => {
                            let mut next = (**c).clone();
                            next.crl_pem = crl_opt.clone();
                            next.version += 1;
                            *cur = Some(Arc::new(next));
                            true
                        }
                        _ => false,
                    });
                    if changed {
                        tracing::info!(path = %path.display(), "CRL updated");
                    }
                    // Only remember it once it reached the credentials (they may not exist yet).
                    if tx.borrow().is_some() {
                        last = Some(crl);
                    }
                }
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read the CRL file")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.wait() => return,
        }
    }
}
