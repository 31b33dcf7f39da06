//! The agent's Unix sockets (SDS, the SPIFFE Workload API): created with a chosen mode and
//! published at their path in one rename, replacing only a stale *socket* left by an earlier
//! run. Both sockets hand out a private key, so neither may ever be reachable with looser
//! permissions than configured, nor may starting the agent delete a file that is not a socket.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;

/// Binds a listener at `path` with permissions `mode` (e.g. 0o600).
///
/// - A socket already at `path` is a stale one from an earlier run (the agent owns the path)
///   and is replaced; anything else there (a file, a directory) is refused and left alone.
/// - A missing directory is created with 0700, plus search permission for the group and
///   others when `mode` grants them anything (else they could not reach the socket).
/// - The socket is bound under a temporary name, restricted, then renamed into place: no
///   moment exists in which `path` is reachable with looser permissions.
pub fn bind(path: &Path, mode: u32) -> Result<tokio::net::UnixListener, String> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)
            .map_err(|e| format!("cannot remove stale socket {}: {e}", path.display()))?,
        Ok(_) => {
            return Err(format!(
                "{} exists and is not a socket; refusing to replace it",
                path.display()
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("cannot inspect {}: {e}", path.display())),
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        crate::fsutil::create_private_dir(dir, dir_mode(mode))
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    let tmp = path.with_file_name(format!(
        ".{}.{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("sock"),
        std::process::id()
    ));
    let _ = std::fs::remove_file(&tmp);
    let listener = tokio::net::UnixListener::bind(&tmp)
        .map_err(|e| format!("cannot listen on {}: {e}", path.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            format!(
                "cannot restrict and publish the socket {}: {e}",
                path.display()
            )
        })?;
    Ok(listener)
}

/// 0700, plus search (x) for group and others wherever the socket's mode grants them access.
fn dir_mode(socket_mode: u32) -> u32 {
    let group = if socket_mode & 0o070 != 0 { 0o010 } else { 0 };
    let other = if socket_mode & 0o007 != 0 { 0o001 } else { 0 };
    0o700 | group | other
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[tokio::test]
    async fn replaces_a_stale_socket_but_never_another_file() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("d/agent.sock");
        let first = bind(&path, 0o600).unwrap();
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(path.parent().unwrap()), 0o700);
        drop(first); // the socket file stays behind, as after a crash
        let _second = bind(&path, 0o660).expect("a stale socket is replaced");
        assert_eq!(mode(&path), 0o660);

        let file = tmp.path().join("not-a-socket");
        std::fs::write(&file, b"keep me").unwrap();
        let err = bind(&file, 0o600).unwrap_err();
        assert!(err.contains("not a socket"), "{err}");
        assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
    }

    #[test]
    fn the_directory_lets_through_whom_the_socket_admits() {
        assert_eq!(dir_mode(0o600), 0o700);
        assert_eq!(dir_mode(0o660), 0o710);
        assert_eq!(dir_mode(0o666), 0o711);
        assert_eq!(dir_mode(0o606), 0o701);
    }
}
