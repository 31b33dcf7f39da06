//! Writes the current credentials to a directory, each file replaced atomically:
//! `cert-chain.pem`, `key.pem` (0600), `root-cert.pem` and, with a CRL, `ca-crl.pem`.

use std::path::Path;

use super::{Credentials, CredentialsRx};
use crate::fsutil::{create_private_dir, write_atomic};
use crate::shutdown::Shutdown;

/// Writes `c` into `dir` (created 0750 if needed): `key.pem` 0600, the rest 0644; `ca-crl.pem` only
/// when a CRL is known.
pub fn write(dir: &Path, c: &Credentials) -> std::io::Result<()> {
    // 0750: the workload's group may read the chain; the key file itself is 0600.
    create_private_dir(dir, 0o750)?;
    // Key first: a reader that sees a new chain always finds its key.
    write_atomic(&dir.join("key.pem"), c.key_pem.as_bytes(), 0o600)?;
    write_atomic(&dir.join("cert-chain.pem"), c.chain_pem.as_bytes(), 0o644)?;
    write_atomic(&dir.join("root-cert.pem"), c.roots_pem.as_bytes(), 0o644)?;
    if let Some(crl) = &c.crl_pem {
        write_atomic(&dir.join("ca-crl.pem"), crl.as_bytes(), 0o644)?;
    }
    Ok(())
}

/// Rewrites the files on every change until shutdown.
pub async fn follow(dir: std::path::PathBuf, mut rx: CredentialsRx, shutdown: Shutdown) {
    loop {
        let current = rx.borrow_and_update().clone();
        if let Some(c) = current {
            match write(&dir, &c) {
                Ok(()) => {
                    tracing::debug!(dir = %dir.display(), version = c.version, "credentials written")
                }
                Err(e) => {
                    tracing::error!(dir = %dir.display(), error = %e, "cannot write credentials")
                }
            }
        }
        tokio::select! {
            r = rx.changed() => if r.is_err() { return },
            _ = shutdown.wait() => return,
        }
    }
}
