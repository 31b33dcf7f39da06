//! The file store: CA state in a directory.
//!
//! Layout:
//! - `ca-journal.json` (0600): the journal with every CA key. Replaced atomically.
//! - `root-cert.pem` (0644): the trust bundle, for clients and `citadel request`.
//! - `.lock`: serialises compare-and-swap between processes sharing the directory.
//!
//! Every write goes to a temporary file in the same directory, is fsynced, renamed over the
//! target, and the directory is fsynced, so a crash leaves either the old or the new file.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{Revision, Store, StoreError, Versioned};
use crate::fsutil;
use crate::future::BoxFuture;
use crate::journal::Journal;

/// The journal's file name (0600: it holds the CA keys).
pub const JOURNAL_FILE: &str = "ca-journal.json";
/// The trust bundle's file name (0644).
pub const BUNDLE_FILE: &str = "root-cert.pem";
/// The CRLs' file name (0644).
pub const CRL_FILE: &str = "ca-crl.pem";
/// The JWT bundle's file name (0644): a JWK Set of the JWT-SVID signing keys.
pub const JWKS_FILE: &str = "jwt-bundle.json";

/// CA state in a local directory; see the module comment for the layout.
#[derive(Debug, Clone)]
pub struct FileStore {
    dir: PathBuf,
}

#[derive(Serialize, Deserialize)]
struct OnDisk {
    revision: u64,
    journal: Journal,
}

fn io(path: &Path, source: std::io::Error) -> StoreError {
    StoreError::Io {
        path: path.display().to_string(),
        source,
    }
}

impl FileStore {
    /// Opens (creating with 0700 if needed) a state directory.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let dir = dir.into();
        if !dir.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .map_err(|e| io(&dir, e))?;
        }
        Ok(Self { dir })
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn lock(&self) -> Result<File, StoreError> {
        let path = self.dir.join(".lock");
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| io(&path, e))?;
        f.lock().map_err(|e| io(&path, e))?;
        Ok(f)
    }

    fn read(&self) -> Result<Option<OnDisk>, StoreError> {
        let path = self.dir.join(JOURNAL_FILE);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(&path, e)),
        };
        // serde_json errors carry a line and column, never the content.
        let disk: OnDisk = serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
            what: path.display().to_string(),
            reason: e.to_string(),
        })?;
        disk.journal
            .check_format()
            .map_err(|reason| StoreError::Corrupt {
                what: path.display().to_string(),
                reason,
            })?;
        Ok(Some(disk))
    }

    /// Writes a public file (0644) if its content changed.
    fn publish_file(&self, name: &str, content: &str) -> Result<(), StoreError> {
        let path = self.dir.join(name);
        if fs::read(&path).ok().as_deref() == Some(content.as_bytes()) {
            return Ok(());
        }
        fsutil::write_atomic(&path, content.as_bytes(), 0o644).map_err(|e| io(&path, e))
    }

    fn save_sync(
        &self,
        journal: &Journal,
        expected: Option<&Revision>,
    ) -> Result<Revision, StoreError> {
        let _guard = self.lock()?;
        let current = self.read()?.map(|d| d.revision);
        let expected_num = expected.map(|r| r.0.parse::<u64>().unwrap_or(u64::MAX));
        if current != expected_num {
            return Err(StoreError::Conflict);
        }
        let revision = current.unwrap_or(0) + 1;
        let body = serde_json::to_vec_pretty(&OnDisk {
            revision,
            journal: journal.clone(),
        })
        .map_err(|e| StoreError::Corrupt {
            what: "journal".into(),
            reason: e.to_string(),
        })?;
        fsutil::write_atomic(&self.dir.join(JOURNAL_FILE), &body, 0o600)
            .map_err(|e| io(&self.dir.join(JOURNAL_FILE), e))?;
        Ok(Revision(revision.to_string()))
    }
}

impl Store for FileStore {
    fn describe(&self) -> String {
        format!("file:{}", self.dir.display())
    }

    fn load_journal(&self) -> BoxFuture<'_, Result<Option<Versioned<Journal>>, StoreError>> {
        Box::pin(async move {
            Ok(self.read()?.map(|d| Versioned {
                value: d.journal,
                revision: Revision(d.revision.to_string()),
            }))
        })
    }

    fn save_journal<'a>(
        &'a self,
        journal: &'a Journal,
        expected: Option<&'a Revision>,
    ) -> BoxFuture<'a, Result<Revision, StoreError>> {
        Box::pin(async move { self.save_sync(journal, expected) })
    }

    fn publish_bundle<'a>(&'a self, roots_pem: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move { self.publish_file(BUNDLE_FILE, roots_pem) })
    }

    fn publish_crl<'a>(&'a self, crl_pem: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move { self.publish_file(CRL_FILE, crl_pem) })
    }

    fn publish_jwks<'a>(&'a self, jwks: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move { self.publish_file(JWKS_FILE, jwks) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn journal() -> Journal {
        Journal::new("cluster.local")
    }

    #[tokio::test]
    async fn compare_and_swap() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path().join("state")).unwrap();
        assert!(store.load_journal().await.unwrap().is_none());
        let r1 = store.save_journal(&journal(), None).await.unwrap();
        // A second "create" loses.
        assert!(matches!(
            store.save_journal(&journal(), None).await,
            Err(StoreError::Conflict)
        ));
        let r2 = store.save_journal(&journal(), Some(&r1)).await.unwrap();
        assert_ne!(r1, r2);
        // A stale revision loses.
        assert!(matches!(
            store.save_journal(&journal(), Some(&r1)).await,
            Err(StoreError::Conflict)
        ));
        let loaded = store.load_journal().await.unwrap().unwrap();
        assert_eq!(loaded.revision, r2);
        assert_eq!(loaded.value, journal());
    }

    #[tokio::test]
    async fn files_have_safe_modes_and_no_temp_left() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path().join("s")).unwrap();
        store.save_journal(&journal(), None).await.unwrap();
        store.publish_bundle("PEM").await.unwrap();
        let mode = |p: &str| {
            fs::metadata(dir.path().join("s").join(p))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode(JOURNAL_FILE), 0o600);
        assert_eq!(mode(BUNDLE_FILE), 0o644);
        assert_eq!(
            fs::metadata(dir.path().join("s"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o700
        );
        let leftovers: Vec<_> = fs::read_dir(dir.path().join("s"))
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains(".tmp."))
            .collect();
        assert!(leftovers.is_empty());
    }

    #[tokio::test]
    async fn corrupt_journal_is_reported_without_content() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(JOURNAL_FILE), "{\"secret-ish\": ").unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        let err = store.load_journal().await.unwrap_err().to_string();
        assert!(err.contains("corrupt"), "{err}");
        assert!(!err.contains("secret-ish"), "{err}");
    }
}
