//! The issuance index: serial, identity, notAfter and issuer of every certificate still
//! valid, so `citadel revoke --identity` can find what to revoke.
//!
//! File form: `issued.log` in the state directory, one line per certificate, appended with a
//! single `write(2)` per issuance (no fsync: it survives a process crash; a machine crash can
//! lose the last lines, whose certificates are still in the audit log and revocable by serial).
//! Pruned of expired entries at start and hourly.
//!
//! A full disk must not stop issuance at once, yet a certificate that is not in the index is
//! never handed out (it could not be revoked by identity). So the file keeps
//! [`RESERVE_BYTES`] allocated past its end (`fallocate(FALLOC_FL_KEEP_SIZE)`; readers see
//! only the lines), topped up as it is used: when the disk fills, issuance carries on from the
//! reserve (about 10,000 certificates) while the operator is warned, and only fails closed
//! (Unavailable) once the reserve is gone. A write that fails half-way is cut back to the
//! last whole line, so the next entry never lands glued to a torn one. At 100k workloads renewing daily it holds
//! ~100-200k lines (~15-25 MB); a lookup is a linear scan (tens of ms), fine for an operator
//! command and never on the request path.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::Mutex;

use super::StoreError;
use crate::fsutil;

/// The index file's name in the state directory.
pub const INDEX_FILE: &str = "issued.log";

/// One issued certificate, as one line of `issued.log`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedEntry {
    /// Serial, lowercase hex.
    pub serial: String,
    /// The SPIFFE ID it was issued for.
    pub identity: String,
    /// notAfter, unix seconds; the entry is pruned after it.
    pub not_after: i64,
    /// Id of the authority that signed it.
    pub issuer: String,
}

impl IssuedEntry {
    fn line(&self) -> String {
        format!(
            "{} {} {} {}\n",
            self.serial, self.identity, self.not_after, self.issuer
        )
    }

    fn parse(line: &str) -> Option<Self> {
        let mut p = line.split(' ');
        let e = IssuedEntry {
            serial: p.next()?.to_string(),
            identity: p.next()?.to_string(),
            not_after: p.next()?.parse().ok()?,
            issuer: p.next()?.to_string(),
        };
        p.next().is_none().then_some(e)
    }
}

/// Where issued certificates are recorded, so a denied identity's live certificates can be found.
pub trait IssuanceIndex: Send + Sync {
    /// Records one certificate; the issue path calls it after signing and refuses the certificate
    /// if it fails.
    fn record(&self, e: &IssuedEntry) -> Result<(), StoreError>;
    /// Every entry still valid at `now`.
    fn live(&self, now: i64) -> Result<Vec<IssuedEntry>, StoreError>;
    /// Drops expired entries; returns how many remain.
    fn prune(&self, now: i64) -> Result<usize, StoreError>;
}

/// Bytes kept allocated past the end of `issued.log` (~10,000 entries).
pub const RESERVE_BYTES: u64 = 1 << 20;

/// The index in `issued.log` of one replica's state directory.
#[derive(Debug)]
pub struct FileIndex {
    path: PathBuf,
    file: Mutex<Option<Open>>,
}

/// The open file, its length (whole lines only) and how far space is allocated.
#[derive(Debug)]
struct Open {
    file: File,
    len: u64,
    reserved_to: u64,
    /// Set while topping up the reserve fails (the disk is full): warned once, not per line.
    short: bool,
}

impl Open {
    /// Keeps at least half the reserve ahead of the end; false if the disk refused.
    fn top_up(&mut self) -> bool {
        if self.reserved_to >= self.len + RESERVE_BYTES / 2 {
            return true;
        }
        match rustix::fs::fallocate(
            &self.file,
            rustix::fs::FallocateFlags::KEEP_SIZE,
            self.len,
            RESERVE_BYTES,
        ) {
            Ok(()) => {
                self.reserved_to = self.len + RESERVE_BYTES;
                true
            }
            // A filesystem without fallocate: no reserve, appends as before.
            Err(rustix::io::Errno::OPNOTSUPP) => {
                self.reserved_to = u64::MAX;
                true
            }
            Err(_) => false,
        }
    }
}

fn io(path: &std::path::Path, source: std::io::Error) -> StoreError {
    StoreError::Io {
        path: path.display().to_string(),
        source,
    }
}

impl FileIndex {
    /// The index at `dir/issued.log`; the file is created on first write (0600).
    pub fn new(dir: &std::path::Path) -> Self {
        Self {
            path: dir.join(INDEX_FILE),
            file: Mutex::new(None),
        }
    }

    fn open(&self) -> Result<Open, StoreError> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&self.path)
            .map_err(|e| io(&self.path, e))?;
        let len = file.metadata().map_err(|e| io(&self.path, e))?.len();
        let mut open = Open {
            file,
            len,
            reserved_to: len,
            short: false,
        };
        open.top_up();
        Ok(open)
    }

    fn read_all(&self) -> Result<Vec<IssuedEntry>, StoreError> {
        let f = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io(&self.path, e)),
        };
        // A torn last line (crash mid-write) is skipped, not fatal.
        Ok(BufReader::new(f)
            .lines()
            .map_while(Result::ok)
            .filter_map(|l| IssuedEntry::parse(&l))
            .collect())
    }
}

impl IssuanceIndex for FileIndex {
    fn record(&self, e: &IssuedEntry) -> Result<(), StoreError> {
        let mut guard = self.file.lock().unwrap_or_else(|p| p.into_inner());
        if guard.is_none() {
            *guard = Some(self.open()?);
        }
        let f = guard.as_mut().expect("opened above");
        if !f.top_up() && !f.short {
            f.short = true;
            tracing::warn!(path = %self.path.display(), left_bytes = f.reserved_to.saturating_sub(f.len), "the disk is full: issuance continues from the issuance index's reserve, and stops (Unavailable) when it is used up; free space in the state directory");
        } else if f.short && f.reserved_to >= f.len + RESERVE_BYTES / 2 {
            f.short = false;
            tracing::info!(path = %self.path.display(), "the issuance index's reserve is restored");
        }
        let line = e.line();
        match f.file.write_all(line.as_bytes()) {
            Ok(()) => {
                f.len += line.len() as u64;
                Ok(())
            }
            Err(err) => {
                // Cut a torn line off (shrinking needs no space), so the next append starts
                // on a line of its own; if even that fails, reopen to re-read the length.
                if f.file.set_len(f.len).is_err() {
                    *guard = None;
                }
                Err(io(&self.path, err))
            }
        }
    }

    fn live(&self, now: i64) -> Result<Vec<IssuedEntry>, StoreError> {
        Ok(self
            .read_all()?
            .into_iter()
            .filter(|e| e.not_after >= now)
            .collect())
    }

    fn prune(&self, now: i64) -> Result<usize, StoreError> {
        let mut guard = self.file.lock().unwrap_or_else(|p| p.into_inner());
        let keep = self.live(now)?;
        let body: String = keep.iter().map(IssuedEntry::line).collect();
        fsutil::write_atomic(&self.path, body.as_bytes(), 0o600).map_err(|e| io(&self.path, e))?;
        *guard = Some(self.open()?);
        Ok(keep.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(serial: &str, id: &str, na: i64) -> IssuedEntry {
        IssuedEntry {
            serial: serial.into(),
            identity: id.into(),
            not_after: na,
            issuer: "i1".into(),
        }
    }

    #[test]
    fn the_reserve_is_allocated_past_the_end_and_invisible_to_readers() {
        let dir = tempfile::tempdir().unwrap();
        let idx = FileIndex::new(dir.path());
        idx.record(&e("aa", "spiffe://td/ns/a/sa/b", 100)).unwrap();
        let path = dir.path().join(INDEX_FILE);
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(
            meta.len(),
            e("aa", "spiffe://td/ns/a/sa/b", 100).line().len() as u64
        );
        use std::os::unix::fs::MetadataExt;
        // On filesystems with fallocate (ext4, xfs, tmpfs) the blocks are there already.
        let fallocate_works = rustix::fs::fallocate(
            File::create(dir.path().join("probe")).unwrap(),
            rustix::fs::FallocateFlags::KEEP_SIZE,
            0,
            4096,
        )
        .is_ok();
        if fallocate_works {
            assert!(
                meta.blocks() * 512 >= RESERVE_BYTES,
                "{} blocks",
                meta.blocks()
            );
        }
        assert_eq!(idx.live(0).unwrap().len(), 1);
    }

    #[test]
    fn record_live_prune_and_torn_lines() {
        let dir = tempfile::tempdir().unwrap();
        let idx = FileIndex::new(dir.path());
        idx.record(&e("aa", "spiffe://td/ns/a/sa/b", 100)).unwrap();
        idx.record(&e("bb", "spiffe://td/ns/a/sa/c", 200)).unwrap();
        std::fs::OpenOptions::new()
            .append(true)
            .open(dir.path().join(INDEX_FILE))
            .unwrap()
            .write_all(b"cc spiffe://x 3")
            .unwrap();
        assert_eq!(
            idx.live(150).unwrap(),
            vec![e("bb", "spiffe://td/ns/a/sa/c", 200)]
        );
        assert_eq!(idx.prune(150).unwrap(), 1);
        idx.record(&e("dd", "spiffe://td/ns/a/sa/d", 300)).unwrap();
        assert_eq!(
            idx.live(0).unwrap().len(),
            2,
            "appends continue after a prune"
        );
    }
}
