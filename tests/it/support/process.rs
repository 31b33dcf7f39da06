//! Running the real `citadel` binary, as operators and the docs do.

use std::path::Path;
use std::process::Command;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_citadel");

/// `citadel ARGS` in `dir`: exit code, stdout, stderr.
pub fn run(args: &[&str], dir: &Path) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// `citadel ARGS --state-dir STATE`: success, and stdout followed by stderr.
pub fn cli(args: &[&str], state: &Path) -> (bool, String) {
    let mut argv: Vec<&str> = args.to_vec();
    let s = state.to_str().unwrap();
    argv.extend(["--state-dir", s]);
    let (code, out, err) = run(&argv, Path::new("."));
    (code == 0, out + &err)
}

/// `citadel ARGS --state-dir STATE`, which must succeed.
pub fn citadel_ok(args: &[&str], state: &Path) {
    let (ok, text) = cli(args, state);
    assert!(ok, "citadel {args:?}: {text}");
}

/// `citadel ca backup-key --out PATH` (it takes no state flags): success, and its output.
pub fn backup_key_cmd(path: &str) -> (bool, String) {
    let (code, out, err) = run(&["ca", "backup-key", "--out", path], Path::new("."));
    (code == 0, out + &err)
}
