//! `citadel ca backup` / `ca restore`: the whole CA state (the journal: every authority with
//! its key, the rotation in progress, revocations, denials, CRLs) in one self-checking file.
//!
//! The file holds the journal with a SHA-256 of its serialized form (damage) and an
//! HMAC-SHA256 under a key the operator holds apart from the file (`--backup-key-file`,
//! [`BackupKey`]): a SHA-256 alone anyone can recompute, so whoever could write the backup
//! file could otherwise make a restore install a CA of their own, keys included. A restore
//! refuses a file whose checksum, signature, backup format or journal format does not match,
//! or whose journal the CA could not sign with, before anything is written; an unsigned file
//! (format 1, or written with `--unsigned`) only with `--allow-unsigned`.
//!
//! [`newer`] and [`merge`] are what `restore --force` does with the journal the store holds:
//! revocations, denials and authorities the backup does not have were made after it (or are
//! unknown to it), and are kept unless the operator drops them. It holds private keys: the
//! file is written 0600.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::identity::TrustDomain;
use crate::journal::{AuthorityRecord, DeniedIdentity, Journal, Revocation, Status};

/// Bumped when the backup file's layout changes incompatibly. Format 2 added the HMAC;
/// format 1 files are still read, as unsigned.
pub const BACKUP_FORMAT: u32 = 2;

/// Bytes of a backup key.
pub const BACKUP_KEY_BYTES: usize = 32;

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
    /// Lowercase hex HMAC-SHA256 under the backup key of everything above ([`signed_text`]);
    /// absent in an unsigned backup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hmac_sha256: Option<String>,
    /// The CA state.
    pub journal: Journal,
}

/// The operator's backup key: 32 random bytes, kept apart from the backups (a password
/// manager, a Secret in another namespace). `Debug` never shows it.
pub struct BackupKey(ring::hmac::Key);

impl fmt::Debug for BackupKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BackupKey(<redacted>)")
    }
}

impl BackupKey {
    /// A new random key, and the bytes of its key file (64 hex digits and a newline).
    pub fn generate() -> Result<(Self, Vec<u8>), String> {
        use ring::rand::SecureRandom;
        let mut raw = [0u8; BACKUP_KEY_BYTES];
        ring::rand::SystemRandom::new()
            .fill(&mut raw)
            .map_err(|_| "the system random generator failed".to_string())?;
        let file = format!("{}\n", hex::encode(raw)).into_bytes();
        Ok((Self::from_raw(&raw), file))
    }

    /// The key in a key file's bytes: 64 hex digits (surrounding whitespace ignored). Errors
    /// never quote the file.
    pub fn from_file_bytes(bytes: &[u8]) -> Result<Self, String> {
        let text = std::str::from_utf8(bytes)
            .map_err(|_| "the backup key file is not text".to_string())?
            .trim();
        let raw = hex::decode(text).map_err(|_| {
            "the backup key file must hold 64 hex digits (made by `citadel ca backup-key`)"
                .to_string()
        })?;
        if raw.len() != BACKUP_KEY_BYTES {
            return Err(format!(
                "the backup key file holds {} bytes; a backup key is {BACKUP_KEY_BYTES} (made by \
                 `citadel ca backup-key`)",
                raw.len()
            ));
        }
        Ok(Self::from_raw(&raw))
    }

    fn from_raw(raw: &[u8]) -> Self {
        Self(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, raw))
    }
}

/// What the HMAC covers: a fixed label, the format, time, source and the journal's SHA-256,
/// each on its own line (the source is length-prefixed, so no field can run into the next).
fn signed_text(b: &Backup) -> Vec<u8> {
    format!(
        "citadel-ca-backup\n{}\n{}\n{}:{}\n{}\n",
        b.backup_format,
        b.created_at,
        b.source.len(),
        b.source,
        b.sha256
    )
    .into_bytes()
}

fn checksum(journal: &Journal) -> Result<String, String> {
    let bytes = serde_json::to_vec(journal).map_err(|e| e.to_string())?;
    Ok(hex::encode(
        ring::digest::digest(&ring::digest::SHA256, &bytes).as_ref(),
    ))
}

/// The backup file's bytes for `journal`, signed with `key` (unsigned without one).
pub fn make(
    journal: &Journal,
    source: &str,
    now: i64,
    key: Option<&BackupKey>,
) -> Result<Vec<u8>, String> {
    let mut b = Backup {
        backup_format: BACKUP_FORMAT,
        created_at: now,
        source: source.to_string(),
        sha256: checksum(journal)?,
        hmac_sha256: None,
        journal: journal.clone(),
    };
    if let Some(k) = key {
        b.hmac_sha256 = Some(hex::encode(
            ring::hmac::sign(&k.0, &signed_text(&b)).as_ref(),
        ));
    }
    serde_json::to_vec_pretty(&b).map_err(|e| e.to_string())
}

/// Refused: the backup carries no signature.
pub const UNSIGNED: &str = "the backup is not signed, so nothing shows who wrote it; restore \
                            a backup made with --backup-key-file, or pass --allow-unsigned if \
                            you trust every byte of this file";

/// Refused: the signature does not match the key.
pub const BAD_SIGNATURE: &str = "the backup's signature does not match --backup-key-file: the \
                                 file was altered, or signed with another key";

/// A checked backup, and whether its signature was verified.
#[derive(Debug)]
pub struct Opened {
    /// The backup.
    pub backup: Backup,
    /// Verified under the operator's key (false: accepted unsigned, `--allow-unsigned`).
    pub signed: bool,
}

/// Reads and checks a backup file: format, checksum, the signature under `key` (an unsigned
/// file only with `allow_unsigned`), journal format, and that the journal yields a working
/// signer for its own trust domain. Errors never quote the content.
pub fn open(bytes: &[u8], key: Option<&BackupKey>, allow_unsigned: bool) -> Result<Opened, String> {
    let b: Backup =
        serde_json::from_slice(bytes).map_err(|e| format!("not a citadel backup: {e}"))?;
    if !(1..=BACKUP_FORMAT).contains(&b.backup_format)
        || (b.backup_format == 1 && b.hmac_sha256.is_some())
    {
        return Err(format!(
            "backup format {} is not one this citadel reads (formats 1 to {BACKUP_FORMAT})",
            b.backup_format
        ));
    }
    if checksum(&b.journal)? != b.sha256 {
        return Err("the checksum does not match: the file was altered or damaged".into());
    }
    let signed = match (&b.hmac_sha256, key) {
        (Some(mac), Some(k)) => {
            let mac = hex::decode(mac).map_err(|_| BAD_SIGNATURE.to_string())?;
            ring::hmac::verify(&k.0, &signed_text(&b), &mac)
                .map_err(|_| BAD_SIGNATURE.to_string())?;
            true
        }
        (Some(_), None) => {
            return Err("the backup is signed: pass the --backup-key-file it was made with".into())
        }
        (None, _) if allow_unsigned => false,
        (None, _) => return Err(UNSIGNED.into()),
    };
    b.journal.check_format()?;
    let td = TrustDomain::new(&b.journal.trust_domain).map_err(|e| e.to_string())?;
    super::bootstrap::signer_from_journal(&b.journal, &td)
        .map_err(|e| format!("the backed-up CA cannot sign: {e}"))?;
    Ok(Opened { backup: b, signed })
}

/// What the store's journal holds that a backup does not: made after the backup was taken
/// (or pruned from it meanwhile). A restore drops these unless they are merged.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Newer {
    /// Revoked certificates (by issuer and serial).
    pub revocations: Vec<Revocation>,
    /// Denied identities.
    pub denied: Vec<DeniedIdentity>,
    /// Authorities (by id): rotations since the backup.
    pub authorities: Vec<AuthorityRecord>,
}

impl Newer {
    /// Whether there is nothing to drop or keep.
    pub fn is_empty(&self) -> bool {
        self.revocations.is_empty() && self.denied.is_empty() && self.authorities.is_empty()
    }

    /// One line per item, for the operator (no key material).
    pub fn lines(&self) -> Vec<String> {
        let mut out = Vec::new();
        for r in &self.revocations {
            out.push(format!(
                "revocation: serial {} (issuer {}{}), revoked at unix time {}, reason {}",
                r.serial,
                r.issuer,
                r.identity
                    .as_deref()
                    .map(|i| format!(", {i}"))
                    .unwrap_or_default(),
                r.revoked_at,
                r.reason
            ));
        }
        for d in &self.denied {
            out.push(format!(
                "denied identity: {} since unix time {}, reason {}",
                d.identity, d.since, d.reason
            ));
        }
        for a in &self.authorities {
            out.push(format!(
                "authority: {} {} ({}), created at unix time {}",
                format!("{:?}", a.role).to_lowercase(),
                a.id,
                format!("{:?}", a.status).to_lowercase(),
                a.created_at
            ));
        }
        out
    }
}

/// What `current` holds that `backup` lacks.
pub fn newer(backup: &Journal, current: &Journal) -> Newer {
    Newer {
        revocations: current
            .revocations
            .iter()
            .filter(|r| {
                !backup
                    .revocations
                    .iter()
                    .any(|b| b.serial == r.serial && b.issuer == r.issuer)
            })
            .cloned()
            .collect(),
        denied: current
            .denied
            .iter()
            .filter(|d| backup.is_denied(&d.identity).is_none())
            .cloned()
            .collect(),
        authorities: current
            .authorities
            .iter()
            .filter(|a| backup.get(&a.id).is_none())
            .cloned()
            .collect(),
    }
}

/// The backup's journal with what the store holds beyond it kept: its revocations and
/// denials (a restore must not un-revoke a compromised certificate or re-admit a denied
/// identity), and its newer authorities as retiring (they no longer sign, but their
/// certificates stay trusted and their CRLs keep being signed, so their revoked
/// certificates stay revoked). Of each authority's CRL the one with the higher number is
/// kept, so CRL numbers never go back.
pub fn merge(mut backup: Journal, current: &Journal, now: i64) -> Journal {
    let n = newer(&backup, current);
    backup.revocations.extend(n.revocations);
    backup.denied.extend(n.denied);
    for mut a in n.authorities {
        if matches!(a.status, Status::Active | Status::Prepared) {
            a.status = Status::Retiring;
            a.deactivated_at = Some(now);
        }
        backup.authorities.push(a);
    }
    // JWT keys made after the backup may have signed tokens still live: they stay in the
    // bundle as retiring, and the bundle's sequence moves forward, never back.
    for k in &current.jwt_keys {
        if backup.jwt_keys.iter().any(|b| b.kid == k.kid) {
            continue;
        }
        let mut k = k.clone();
        if matches!(k.status, Status::Active | Status::Prepared) {
            k.status = Status::Retiring;
            k.deactivated_at = Some(now);
        }
        backup.jwt_keys.push(k);
    }
    backup.jwt_bundle_sequence = backup.jwt_bundle_sequence.max(current.jwt_bundle_sequence) + 1;
    for c in &current.crls {
        let known = backup.get(&c.issuer).is_some();
        match backup.crls.iter_mut().find(|b| b.issuer == c.issuer) {
            Some(b) if b.number < c.number => *b = c.clone(),
            Some(_) => {}
            None if known => backup.crls.push(c.clone()),
            None => {}
        }
    }
    backup
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::bootstrap::{new_journal, CaOptions};

    fn journal() -> Journal {
        let td = TrustDomain::new("cluster.local").unwrap();
        new_journal(&CaOptions::new(td), crate::clock::system().now()).unwrap()
    }

    #[test]
    fn round_trip_and_every_kind_of_damage_is_refused() {
        let j = journal();
        let (key, _) = BackupKey::generate().unwrap();
        let bytes = make(&j, "file:/x", 1, Some(&key)).unwrap();
        let opened = open(&bytes, Some(&key), false).unwrap();
        assert!(opened.signed);
        assert_eq!(opened.backup.journal, j);

        let mut v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        v["journal"]["revocations"] = serde_json::json!([{
            "serial": "ab", "issuer": "x", "identity": null, "not_after": 1,
            "revoked_at": 1, "reason": "unspecified"
        }]);
        let err = open(&serde_json::to_vec(&v).unwrap(), Some(&key), false).unwrap_err();
        assert!(err.contains("checksum"), "{err}");

        let mut v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        v["backup_format"] = serde_json::json!(9);
        assert!(open(&serde_json::to_vec(&v).unwrap(), Some(&key), false)
            .unwrap_err()
            .contains("format 9"));

        let err = open(&bytes[..bytes.len() / 2], Some(&key), false).unwrap_err();
        assert!(
            err.contains("not a citadel backup") && !err.contains("PRIVATE"),
            "{err}"
        );
    }

    /// The attack: another CA's journal with its checksum recomputed, or the signature
    /// stripped, or another key; and the metadata the HMAC covers changed.
    #[test]
    fn only_the_operators_key_makes_a_backup_restorable() {
        let (key, _) = BackupKey::generate().unwrap();
        let (other, _) = BackupKey::generate().unwrap();
        let bytes = make(&journal(), "file:/x", 1, Some(&key)).unwrap();
        let mut forged: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        let evil = journal();
        forged["journal"] = serde_json::to_value(&evil).unwrap();
        forged["sha256"] = checksum(&evil).unwrap().into();
        let forged = serde_json::to_vec(&forged).unwrap();
        assert_eq!(open(&forged, Some(&key), false).unwrap_err(), BAD_SIGNATURE);
        assert_eq!(
            open(&bytes, Some(&other), false).unwrap_err(),
            BAD_SIGNATURE
        );

        let mut moved: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        moved["created_at"] = 2.into();
        let moved = serde_json::to_vec(&moved).unwrap();
        assert_eq!(open(&moved, Some(&key), false).unwrap_err(), BAD_SIGNATURE);

        let mut stripped: serde_json::Value = serde_json::from_slice(&forged).unwrap();
        stripped.as_object_mut().unwrap().remove("hmac_sha256");
        let stripped = serde_json::to_vec(&stripped).unwrap();
        assert_eq!(open(&stripped, Some(&key), false).unwrap_err(), UNSIGNED);
        assert!(!open(&stripped, Some(&key), true).unwrap().signed);
        assert!(open(&bytes, None, true)
            .unwrap_err()
            .contains("pass the --backup-key-file"));
        assert_eq!(
            open(&make(&journal(), "s", 1, None).unwrap(), None, false).unwrap_err(),
            UNSIGNED
        );
    }

    #[test]
    fn key_files_are_64_hex_digits_and_never_shown() {
        let (_, file) = BackupKey::generate().unwrap();
        assert_eq!(file.len(), 65);
        let k = BackupKey::from_file_bytes(&file).unwrap();
        assert_eq!(format!("{k:?}"), "BackupKey(<redacted>)");
        assert!(BackupKey::from_file_bytes(b"abcd")
            .unwrap_err()
            .contains("2 bytes"));
        let err = BackupKey::from_file_bytes(b"not hex at all").unwrap_err();
        assert!(!err.contains("not hex at all"), "{err}");
    }

    #[test]
    fn merge_keeps_what_the_store_has_beyond_the_backup() {
        let backup = journal();
        let mut current = backup.clone();
        current.revocations.push(Revocation {
            serial: "ab".into(),
            issuer: backup.active_signer().unwrap().id.clone(),
            identity: Some("spiffe://cluster.local/ns/a/sa/b".into()),
            not_after: i64::MAX,
            revoked_at: 5,
            reason: "keyCompromise".into(),
        });
        current.denied.push(DeniedIdentity {
            identity: "spiffe://cluster.local/ns/a/sa/c".into(),
            since: 5,
            reason: "keyCompromise".into(),
            revocation: None,
        });
        let mut newer_int = backup.active_signer().unwrap().clone();
        newer_int.id = "newer".into();
        current.authorities.push(newer_int);
        let n = newer(&backup, &current);
        assert_eq!(
            (n.revocations.len(), n.denied.len(), n.authorities.len()),
            (1, 1, 1)
        );
        assert_eq!(n.lines().len(), 3);
        let merged = merge(backup.clone(), &current, 9);
        assert_eq!(merged.revocations, current.revocations);
        assert_eq!(merged.denied, current.denied);
        let kept = merged.get("newer").unwrap();
        assert_eq!(
            (kept.status, kept.deactivated_at),
            (Status::Retiring, Some(9))
        );
        assert_eq!(
            merged.active_signer().unwrap().id,
            backup.active_signer().unwrap().id,
            "the backup's signer signs"
        );
        assert!(newer(&merged, &current).is_empty());
    }
}
