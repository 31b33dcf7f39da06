//! Crash-safe file writes, shared by the file store and the client/agent file output.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Writes `bytes` to `path` with `mode`: temp file in the same directory, fsync, rename over
/// the target, fsync the directory. A crash leaves the old file or the new one, never half.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    write_atomic_with(path, mode, &mut |f| f.write_all(bytes))
}

/// [`write_atomic`] for content produced by `fill` (streamed, never all in memory).
pub fn write_atomic_with(
    path: &Path,
    mode: u32,
    fill: &mut dyn FnMut(&mut File) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let result = (|| {
        let _ = fs::remove_file(&tmp);
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        // The umask may have narrowed the mode; set it exactly.
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        fill(&mut f)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Creates `dir` and any missing parents with `mode` (e.g. 0o700), not with the process
/// umask's default of 0755: directories that hold private keys or a socket serving them must
/// not be listable by everyone. Existing directories are left as they are.
pub fn create_private_dir(dir: &Path, mode: u32) -> std::io::Result<()> {
    fs::DirBuilder::new().recursive(true).mode(mode).create(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn private_dirs_and_atomic_files_get_their_modes() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b");
        create_private_dir(&dir, 0o700).unwrap();
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&tmp.path().join("a")), 0o700, "parents too");
        create_private_dir(&dir, 0o700).unwrap();
        write_atomic(&dir.join("key.pem"), b"k", 0o600).unwrap();
        assert_eq!(mode(&dir.join("key.pem")), 0o600);
    }
}
