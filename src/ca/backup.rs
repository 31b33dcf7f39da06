//! `citadel ca backup` / `ca restore`: the whole CA state (the journal: every authority with
//! its key, the rotation in progress, revocations, denials, CRLs) in one self-checking file.
//!
//! The file holds the journal with a SHA-256 of its serialized form; a restore refuses a file
//! whose checksum, backup format or journal format does not match, or whose journal the CA
//! could not sign with, before anything is written. It holds private keys: written 0600.

use serde::{Deserialize, Serialize};

use crate::identity::TrustDomain;
use crate::journal::Journal;

/// Bumped when the backup file's layout changes incompatibly.
pub const BACKUP_FORMAT: u32 = 1;

/// A backup file.
#[derive(Debug, Serialize, Deserialize)]
pub struct Backup {
    /// [`BACKUP_FORMAT`] of the citadel that wrote it.
    pub backup_format: u32,
    /// When it was taken (unix seconds).
    pub created_at: i64,
    /// The store it was taken from (`file:<dir>`, `kube:<ns>/<secret>`).
    pub source: String,
    /// Lowercase hex SHA-256 of the journal serialized as compact JSON.
    pub sha256: String,
    /// The CA state.
    pub journal: Journal,
}

fn checksum(journal: &Journal) -> Result<String, String> {
    let bytes = serde_json::to_vec(journal).map_err(|e| e.to_string())?;
    Ok(hex::encode(
        ring::digest::digest(&ring::digest::SHA256, &bytes).as_ref(),
    ))
}

/// The backup file's bytes for `journal`.
pub fn make(journal: &Journal, source: &str, now: i64) -> Result<Vec<u8>, String> {
    let b = Backup {
        backup_format: BACKUP_FORMAT,
        created_at: now,
        source: source.to_string(),
        sha256: checksum(journal)?,
        journal: journal.clone(),
    };
    serde_json::to_vec_pretty(&b).map_err(|e| e.to_string())
}

/// Reads and checks a backup file: format, checksum, journal format, and that the journal
/// yields a working signer for its own trust domain. Errors never quote the content.
pub fn open(bytes: &[u8]) -> Result<Backup, String> {
    let b: Backup =
        serde_json::from_slice(bytes).map_err(|e| format!("not a citadel backup: {e}"))?;
    if b.backup_format != BACKUP_FORMAT {
        return Err(format!(
            "backup format {} is not one this citadel reads (format {BACKUP_FORMAT})",
            b.backup_format
        ));
    }
    if checksum(&b.journal)? != b.sha256 {
        return Err("the checksum does not match: the file was altered or damaged".into());
    }
    b.journal.check_format()?;
    let td = TrustDomain::new(&b.journal.trust_domain).map_err(|e| e.to_string())?;
    super::bootstrap::signer_from_journal(&b.journal, &td)
        .map_err(|e| format!("the backed-up CA cannot sign: {e}"))?;
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::bootstrap::{new_journal, CaOptions};

    #[test]
    fn round_trip_and_every_kind_of_damage_is_refused() {
        let td = TrustDomain::new("cluster.local").unwrap();
        let j = new_journal(&CaOptions::new(td), crate::clock::system().now()).unwrap();
        let bytes = make(&j, "file:/x", 1).unwrap();
        assert_eq!(open(&bytes).unwrap().journal, j);

        let mut v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        v["journal"]["revocations"] = serde_json::json!([{
            "serial": "ab", "issuer": "x", "identity": null, "not_after": 1,
            "revoked_at": 1, "reason": "unspecified"
        }]);
        let err = open(&serde_json::to_vec(&v).unwrap()).unwrap_err();
        assert!(err.contains("checksum"), "{err}");

        let mut v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        v["backup_format"] = serde_json::json!(9);
        assert!(open(&serde_json::to_vec(&v).unwrap())
            .unwrap_err()
            .contains("format 9"));

        let err = open(&bytes[..bytes.len() / 2]).unwrap_err();
        assert!(
            err.contains("not a citadel backup") && !err.contains("PRIVATE"),
            "{err}"
        );
    }
}
