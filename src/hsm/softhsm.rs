//! A throwaway SoftHSM2 token directory: what the tests, the benchmark and a first try of
//! `--ca-key-source pkcs11` run against (docs/operations.md, "HSM keys (PKCS#11)").
//!
//! SoftHSM2 (Debian `softhsm2`) reads its token directory from the file `SOFTHSM2_CONF`
//! names; [`SoftHsm::new`] writes one for a directory of its own, and each token it
//! initialises ([`SoftHsm::init_token`], through `softhsm2-util --init-token`) gets its own
//! subdirectory there, which is what "removing the token" removes. `scripts/test.sh` installs
//! the package and exports [`MODULE_ENV`] and [`UTIL_ENV`].

use std::path::{Path, PathBuf};
use std::process::Command;

/// Where Debian installs the module.
pub const DEFAULT_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
/// Overrides [`DEFAULT_MODULE`].
pub const MODULE_ENV: &str = "CITADEL_SOFTHSM2_MODULE";
/// Overrides the `softhsm2-util` found on `PATH`.
pub const UTIL_ENV: &str = "CITADEL_SOFTHSM2_UTIL";

/// The module's path.
pub fn module() -> PathBuf {
    std::env::var_os(MODULE_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_MODULE))
}

fn util() -> PathBuf {
    std::env::var_os(UTIL_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("softhsm2-util"))
}

/// Whether SoftHSM2 can be used here. Without it, tests skip, except under `CI=true`, where
/// this panics: a missing real component fails the run.
pub fn available() -> bool {
    let ok = module().exists()
        && Command::new(util())
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
    if !ok && std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!(
            "SoftHSM2 is required under CI=true: module {} or softhsm2-util missing (scripts/test.sh installs the Debian package softhsm2)",
            module().display()
        );
    }
    ok
}

/// A SoftHSM2 configuration whose tokens live in a directory of their own.
#[derive(Debug, Clone)]
pub struct SoftHsm {
    conf: PathBuf,
    tokens: PathBuf,
}

impl SoftHsm {
    /// Writes `dir/softhsm2.conf` for the token directory `dir/tokens`.
    pub fn new(dir: &Path) -> Result<Self, String> {
        let tokens = dir.join("tokens");
        std::fs::create_dir_all(&tokens).map_err(|e| format!("{}: {e}", tokens.display()))?;
        let conf = dir.join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n",
                tokens.display()
            ),
        )
        .map_err(|e| format!("{}: {e}", conf.display()))?;
        Ok(Self { conf, tokens })
    }

    /// The configuration file, for `SOFTHSM2_CONF`.
    pub fn conf(&self) -> &Path {
        &self.conf
    }

    /// Initialises a new token labelled `label` with user PIN `pin`; returns its directory.
    pub fn init_token(&self, label: &str, pin: &str) -> Result<PathBuf, String> {
        let before = self.token_dirs();
        let out = Command::new(util())
            .env("SOFTHSM2_CONF", &self.conf)
            .args([
                "--init-token",
                "--free",
                "--label",
                label,
                "--pin",
                pin,
                "--so-pin",
            ])
            .arg(format!("so-{pin}"))
            .output()
            .map_err(|e| format!("softhsm2-util: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "softhsm2-util --init-token: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        self.token_dirs()
            .into_iter()
            .find(|d| !before.contains(d))
            .ok_or_else(|| "softhsm2-util made no token directory".to_string())
    }

    fn token_dirs(&self) -> Vec<PathBuf> {
        std::fs::read_dir(&self.tokens)
            .map(|r| r.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default()
    }
}
