//! The offline-root ceremony's commands (`ca::offline` does the work): `citadel ca init
//! --offline-root`, `intermediate-csr`, `sign-intermediate`, `install-intermediate` and
//! `new-root`. `sign-intermediate` and `new-root` run on the machine with the root key and
//! need neither a cluster nor a state directory.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::ca::offline;
use crate::hsm::{PinSource, Pkcs11Config, Pkcs11Key, Token};
use crate::identity::TrustDomain;
use crate::journal::{Role, Status};
use crate::pki::{chain, pem, CaKey, KeyType, SoftwareKey};

use super::state::StateArgs;
use super::{read_file, CmdResult};

const KEY_TYPES: [&str; 5] = ["ec-p256", "ec-p384", "rsa-2048", "rsa-3072", "rsa-4096"];

/// Where this CA's own (intermediate) keys are made: the flags of `citadel serve`.
#[derive(Debug, clap::Args)]
pub struct KeySourceArgs {
    /// Where the intermediate's key is generated: `software` (PKCS#8 in the journal) or
    /// `pkcs11` (inside the token the server uses; give the same --pkcs11-* flags as to
    /// `citadel serve`).
    #[arg(long, default_value = "software", value_name = "SOURCE",
          value_parser = ["software", "pkcs11"])]
    pub ca_key_source: String,
    /// The PKCS#11 module (shared library), e.g. /usr/lib/softhsm/libsofthsm2.so.
    #[arg(long, value_name = "FILE")]
    pub pkcs11_module: Option<PathBuf>,
    /// The label of the server's PKCS#11 token.
    #[arg(long, value_name = "LABEL")]
    pub pkcs11_token_label: Option<String>,
    /// A file holding the token's user PIN.
    #[arg(long, value_name = "FILE", conflicts_with = "pkcs11_pin_env")]
    pub pkcs11_pin_file: Option<PathBuf>,
    /// An environment variable holding the token's user PIN.
    #[arg(long, value_name = "VAR")]
    pub pkcs11_pin_env: Option<String>,
    /// Labels of keys generated in the token: `<prefix>-intermediate-<request id>`.
    #[arg(long, default_value = "citadel", value_name = "PREFIX")]
    pub pkcs11_key_label_prefix: String,
}

fn pin_source(
    file: &Option<PathBuf>,
    env: &Option<String>,
    flag: &str,
) -> Result<PinSource, String> {
    match (file, env) {
        (Some(f), None) => Ok(PinSource::File(f.clone())),
        (None, Some(v)) => Ok(PinSource::Env(v.clone())),
        _ => Err(format!(
            "the token's PIN comes from --{flag}-pin-file or --{flag}-pin-env (never a flag value)"
        )),
    }
}

impl KeySourceArgs {
    /// Installs the token as this process's key source (`--ca-key-source pkcs11`).
    fn install(&self, kt: KeyType) -> Result<(), String> {
        if self.ca_key_source != "pkcs11" {
            if self.pkcs11_module.is_some() || self.pkcs11_token_label.is_some() {
                return Err("the --pkcs11-* flags need --ca-key-source pkcs11".into());
            }
            return Ok(());
        }
        let config = Pkcs11Config {
            module: self
                .pkcs11_module
                .clone()
                .ok_or("--ca-key-source pkcs11 needs --pkcs11-module")?,
            token_label: self
                .pkcs11_token_label
                .clone()
                .ok_or("--ca-key-source pkcs11 needs --pkcs11-token-label")?,
            pin: pin_source(&self.pkcs11_pin_file, &self.pkcs11_pin_env, "pkcs11")?,
            max_sessions: Some(2),
        };
        crate::ca::keysource::connect(config, self.pkcs11_key_label_prefix.clone(), false, kt)?;
        Ok(())
    }
}

/// A root key for the ceremony: a PKCS#8 file, or a key in a PKCS#11 token.
#[derive(Debug, clap::Args)]
pub struct RootKeyArgs {
    /// The root's certificate (PEM): the issuer of what is signed.
    #[arg(long, value_name = "FILE")]
    pub root_cert: PathBuf,
    /// The root's private key, PKCS#8 PEM (a file on the offline machine).
    #[arg(long, value_name = "FILE", conflicts_with = "root_pkcs11_module")]
    pub root_key: Option<PathBuf>,
    /// The PKCS#11 module holding the root key, e.g. /usr/lib/softhsm/libsofthsm2.so.
    #[arg(long, value_name = "FILE")]
    pub root_pkcs11_module: Option<PathBuf>,
    /// The label of the token holding the root key.
    #[arg(long, value_name = "LABEL")]
    pub root_pkcs11_token_label: Option<String>,
    /// A file holding that token's user PIN.
    #[arg(long, value_name = "FILE", conflicts_with = "root_pkcs11_pin_env")]
    pub root_pkcs11_pin_file: Option<PathBuf>,
    /// An environment variable holding that token's user PIN.
    #[arg(long, value_name = "VAR")]
    pub root_pkcs11_pin_env: Option<String>,
    /// The root key's label in the token. Default: `citadel-root-<serial of --root-cert>`,
    /// as `citadel ca new-root` names it.
    #[arg(long, value_name = "LABEL")]
    pub root_key_label: Option<String>,
}

/// A root certificate (PEM text), its key, and the token holding the key (if one does).
type OpenedRoot = (String, Arc<dyn CaKey>, Option<Arc<Token>>);

impl RootKeyArgs {
    /// The root certificate (PEM text) and its key, checked to belong together.
    fn open(&self) -> Result<OpenedRoot, String> {
        let cert = String::from_utf8(read_file(&self.root_cert, "--root-cert")?)
            .map_err(|_| format!("{} is not PEM text", self.root_cert.display()))?;
        let der = pem::parse_certs(cert.as_bytes())
            .map_err(|e| format!("{}: {e}", self.root_cert.display()))?
            .into_iter()
            .next()
            .ok_or_else(|| format!("{} holds no certificate", self.root_cert.display()))?;
        let (key, token) = match (&self.root_key, &self.root_pkcs11_module) {
            (Some(f), None) => {
                let pem = read_file(f, "--root-key")?;
                let key = SoftwareKey::from_pem(&pem)
                    .map_err(|e| format!("{}: {e}", f.display()))?
                    .shared();
                (key, None)
            }
            (None, Some(module)) => {
                let token = Arc::new(
                    Token::connect(Pkcs11Config {
                        module: module.clone(),
                        token_label: self
                            .root_pkcs11_token_label
                            .clone()
                            .ok_or("--root-pkcs11-module needs --root-pkcs11-token-label")?,
                        pin: pin_source(
                            &self.root_pkcs11_pin_file,
                            &self.root_pkcs11_pin_env,
                            "root-pkcs11",
                        )?,
                        max_sessions: Some(1),
                    })
                    .map_err(|e| format!("the root's token: {e}"))?,
                );
                let key = open_in_token(&token, &der, self.root_key_label.as_deref())?;
                (key, Some(token))
            }
            _ => {
                return Err(
                    "give the root key: --root-key FILE, or --root-pkcs11-module with --root-pkcs11-token-label and a PIN flag".into(),
                )
            }
        };
        Ok((cert, key, token))
    }
}

/// The key for certificate `der` in `token`: by `label`, or by the label `citadel ca new-root`
/// gives (`citadel-root-<serial>`); checked against the certificate's public key.
fn open_in_token(
    token: &Arc<Token>,
    der: &[u8],
    label: Option<&str>,
) -> Result<Arc<dyn CaKey>, String> {
    let info = chain::describe(der).map_err(|e| e.to_string())?;
    let label = label.map(str::to_string).unwrap_or_else(|| {
        crate::ca::keysource::label_for("citadel", Role::Root, &info.serial_hex)
    });
    let spki = chain::parse(der)
        .map_err(|e| e.to_string())?
        .public_key()
        .raw
        .to_vec();
    Pkcs11Key::open(token, &label, &spki)
        .map(Pkcs11Key::shared)
        .map_err(|e| format!("root key {label:?} in token {:?}: {e}", token.label()))
}

/// Flags of `citadel ca init`.
#[derive(Debug, clap::Args)]
#[command(after_long_help = "\
Prepares a CA whose root key is held offline (docs/operations.md, \"Offline root\"). The
state directory gets the root certificate(s) (no key) and the first intermediate's key
(software, or in the token with --ca-key-source pkcs11); its CSR is printed (and written to
--csr-out). `citadel serve` refuses to start on it until a root-signed intermediate is
installed:

  citadel ca init --offline-root --trust-domain example.org --root-cert root-cert.pem \\
      --state-dir /var/lib/citadel --csr-out next.csr
  # on the offline machine:
  citadel ca sign-intermediate --root-cert root-cert.pem --root-key root-key.pem \\
      --csr next.csr --out intermediate.pem
  # back here:
  citadel ca install-intermediate --state-dir /var/lib/citadel --cert intermediate.pem
  citadel serve --state-dir /var/lib/citadel --trust-domain example.org ...

Without --offline-root there is nothing to initialise: `citadel serve` creates its own
root and intermediate on first start.")]
pub struct InitArgs {
    /// Where the CA state goes (must hold no journal yet).
    #[command(flatten)]
    pub state: StateArgs,
    /// Run with an intermediate only; the root key stays offline.
    #[arg(long)]
    pub offline_root: bool,
    /// The trust domain (the server's --trust-domain).
    #[arg(long, value_name = "TD")]
    pub trust_domain: String,
    /// The offline root's certificate(s), PEM: what the trust bundle holds.
    #[arg(long, value_name = "FILE")]
    pub root_cert: PathBuf,
    /// Key type of the intermediate's key.
    #[arg(long, default_value = "ec-p256", value_name = "TYPE", value_parser = KEY_TYPES)]
    pub ca_key_type: String,
    /// Also write the CSR to this file.
    #[arg(long, value_name = "FILE")]
    pub csr_out: Option<PathBuf>,
    /// Where the intermediate's key is made.
    #[command(flatten)]
    pub keys: KeySourceArgs,
}

/// Flags of `citadel ca intermediate-csr`.
#[derive(Debug, clap::Args)]
#[command(after_long_help = "\
Prints the CSR of the next intermediate that waits for the offline root's signature. The
server makes it at the active intermediate's prepare point (half its life by default) and
keeps signing with the current intermediate; `citadel ca status`, the metric
citadel_ca_offline_intermediate_needed_seconds and the CertificateAuthority condition
IntermediateSignatureNeeded say by when the signed one must be installed.

--new makes a request now when none waits (for a root rotation, or to sign early); with a
token-held CA give the server's --ca-key-source/--pkcs11-* flags so the key is made there.

  citadel ca intermediate-csr --state-dir /var/lib/citadel > next.csr
  citadel ca intermediate-csr --store kube --namespace istio-system > next.csr")]
pub struct IntermediateCsrArgs {
    /// Where the CA state is.
    #[command(flatten)]
    pub state: StateArgs,
    /// Make a request now if none waits.
    #[arg(long)]
    pub new: bool,
    /// Also write the CSR to this file.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Where a --new request's key is made.
    #[command(flatten)]
    pub keys: KeySourceArgs,
}

/// Flags of `citadel ca sign-intermediate`.
#[derive(Debug, clap::Args)]
#[command(after_long_help = "\
Runs where the root key is (no cluster, no state directory). Checks the CSR's
self-signature and key type, then certifies ONLY its public key with citadel's intermediate
profile: CA:true with pathlen 0, keyUsage keyCertSign + cRLSign + digitalSignature, subject
O=<trust domain>, CN naming the new serial. Nothing else the CSR asks for is copied.
notAfter is capped at the root's.

Root key in a file:
  citadel ca sign-intermediate --root-cert root-cert.pem --root-key root-key.pem \\
      --csr next.csr --ttl 365d --out intermediate.pem
Root key in a PKCS#11 token:
  citadel ca sign-intermediate --root-cert root-cert.pem \\
      --root-pkcs11-module /usr/lib/softhsm/libsofthsm2.so --root-pkcs11-token-label root \\
      --root-pkcs11-pin-file root.pin --csr next.csr --out intermediate.pem
Root rotation (both root keys at hand; --root-* is the NEW root, --old-root-* the current):
  citadel ca sign-intermediate --root-cert new-root.pem --root-key new-root-key.pem \\
      --old-root-cert root-cert.pem --old-root-key root-key.pem \\
      --csr next.csr --out intermediate.pem --cross-out cross.pem")]
pub struct SignIntermediateArgs {
    /// The root that signs.
    #[command(flatten)]
    pub root: RootKeyArgs,
    /// The CSR (`citadel ca intermediate-csr`).
    #[arg(long, value_name = "FILE")]
    pub csr: PathBuf,
    /// The trust domain. Default: the root certificate's subject O.
    #[arg(long, value_name = "TD")]
    pub trust_domain: Option<String>,
    /// Lifetime of the intermediate (capped at the root's notAfter).
    #[arg(long, default_value = "365d", value_parser = crate::duration::clap_parse, value_name = "DUR")]
    pub ttl: Duration,
    /// Where to write the certificate (default: stdout).
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Root rotation: the current root's certificate, which cross-signs the intermediate.
    #[arg(long, value_name = "FILE", requires = "cross_out")]
    pub old_root_cert: Option<PathBuf>,
    /// Root rotation: the current root's key file.
    #[arg(long, value_name = "FILE", requires = "old_root_cert")]
    pub old_root_key: Option<PathBuf>,
    /// Root rotation: the current root's key label in the --root-pkcs11 token.
    #[arg(long, value_name = "LABEL", requires = "old_root_cert")]
    pub old_root_key_label: Option<String>,
    /// Root rotation: where to write the cross-signed certificate.
    #[arg(long, value_name = "FILE", requires = "old_root_cert")]
    pub cross_out: Option<PathBuf>,
}

/// Flags of `citadel ca install-intermediate`.
#[derive(Debug, clap::Args)]
#[command(after_long_help = "\
Checks that the certificate chains to a root in this CA's trust bundle, certifies exactly
the key of the waiting request, and is one of citadel's intermediates; then records it as
the prepared intermediate, which the server activates at 5/6 of the current one's life (the
first, after `ca init --offline-root`, is active at once). A running server picks it up at
its next pass.

  citadel ca install-intermediate --state-dir /var/lib/citadel --cert intermediate.pem
  citadel ca install-intermediate --store kube --namespace istio-system --cert intermediate.pem
Root rotation (the outputs of `sign-intermediate --old-root-*`): starts the staged rotation,
as `citadel ca rotate-root` does for an online root:
  citadel ca install-intermediate --cert intermediate.pem --new-root new-root.pem \\
      --cross-cert cross.pem")]
pub struct InstallIntermediateArgs {
    /// Where the CA state is.
    #[command(flatten)]
    pub state: StateArgs,
    /// The signed intermediate certificate (PEM).
    #[arg(long, value_name = "FILE")]
    pub cert: PathBuf,
    /// Root rotation: the new root's certificate, which signed --cert.
    #[arg(long, value_name = "FILE", requires = "cross_cert")]
    pub new_root: Option<PathBuf>,
    /// Root rotation: --cert's key and subject cross-signed by the current root.
    #[arg(long, value_name = "FILE", requires = "new_root")]
    pub cross_cert: Option<PathBuf>,
}

/// Flags of `citadel ca new-root`.
#[derive(Debug, clap::Args)]
#[command(after_long_help = "\
Makes a self-signed root of citadel's profile on the offline machine (no cluster, no state
directory). The key goes to --key-out (PKCS#8, mode 0600; refuses to replace a file) or is
generated inside a PKCS#11 token (never extractable) and named citadel-root-<serial>.

  citadel ca new-root --trust-domain example.org --cert-out root-cert.pem --key-out root-key.pem
  citadel ca new-root --trust-domain example.org --cert-out root-cert.pem \\
      --root-pkcs11-module /usr/lib/softhsm/libsofthsm2.so --root-pkcs11-token-label root \\
      --root-pkcs11-pin-file root.pin")]
pub struct NewRootArgs {
    /// The trust domain (written as the subject's O).
    #[arg(long, value_name = "TD")]
    pub trust_domain: String,
    /// Where to write the certificate.
    #[arg(long, value_name = "FILE")]
    pub cert_out: PathBuf,
    /// Where to write the private key (PKCS#8 PEM, 0600).
    #[arg(long, value_name = "FILE", conflicts_with = "root_pkcs11_module")]
    pub key_out: Option<PathBuf>,
    /// Key type.
    #[arg(long, default_value = "ec-p256", value_name = "TYPE", value_parser = KEY_TYPES)]
    pub key_type: String,
    /// Lifetime.
    #[arg(long, default_value = "3650d", value_parser = crate::duration::clap_parse, value_name = "DUR")]
    pub ttl: Duration,
    /// The PKCS#11 module to make the key in.
    #[arg(long, value_name = "FILE")]
    pub root_pkcs11_module: Option<PathBuf>,
    /// The token's label.
    #[arg(long, value_name = "LABEL")]
    pub root_pkcs11_token_label: Option<String>,
    /// A file holding that token's user PIN.
    #[arg(long, value_name = "FILE", conflicts_with = "root_pkcs11_pin_env")]
    pub root_pkcs11_pin_file: Option<PathBuf>,
    /// An environment variable holding that token's user PIN.
    #[arg(long, value_name = "VAR")]
    pub root_pkcs11_pin_env: Option<String>,
}

fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), String> {
    crate::fsutil::write_atomic(path, bytes, mode)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

fn now() -> time::OffsetDateTime {
    crate::clock::system().now()
}

/// `citadel ca init --offline-root`.
pub async fn init(a: InitArgs) -> CmdResult {
    if !a.offline_root {
        return Err("`citadel ca init` prepares an offline-root CA: pass --offline-root (an online CA is created by `citadel serve` at its first start)".into());
    }
    let td = TrustDomain::new(&a.trust_domain).map_err(|e| e.to_string())?;
    let kt: KeyType = a.ca_key_type.parse()?;
    let roots = String::from_utf8(read_file(&a.root_cert, "--root-cert")?)
        .map_err(|_| format!("{} is not PEM text", a.root_cert.display()))?;
    if a.state.store == super::serve::StoreKind::File {
        std::fs::create_dir_all(&a.state.state_dir)
            .map_err(|e| format!("cannot create {}: {e}", a.state.state_dir.display()))?;
    }
    a.keys.install(kt)?;
    let store = a.state.open().await?;
    if let Some(j) = store.load_journal().await.map_err(|e| e.to_string())? {
        return Err(format!(
            "{} already holds a CA journal (trust domain {:?}, {} authorities): init never replaces one",
            store.describe(),
            j.value.trust_domain,
            j.value.authorities.len()
        ));
    }
    let j = offline::new_journal(&td, &roots, kt, now()).map_err(|e| e.to_string())?;
    let empty = crate::journal::Journal::new(td.as_str());
    match store.save_journal(&j, None).await {
        Ok(_) => crate::ca::keysource::settle(&empty, &j, true),
        Err(e) => {
            crate::ca::keysource::settle(&empty, &j, false);
            return Err(e.to_string());
        }
    }
    let bundle: String = j.trusted_roots().map(|r| r.cert_pem.as_str()).collect();
    store
        .publish_bundle(&bundle)
        .await
        .map_err(|e| e.to_string())?;
    let req = j
        .intermediate_request
        .as_ref()
        .ok_or("no request was made")?;
    tracing::info!(target: "citadel::audit", event = "offline_root_init", trust_domain = %td, store = %store.describe(), request = %req.id, "prepared an offline-root CA; waiting for the first intermediate");
    if let Some(out) = &a.csr_out {
        write_new(out, req.csr_pem.as_bytes(), 0o644)?;
    }
    print!("{}", req.csr_pem);
    eprintln!(
        "offline-root CA prepared in {} (request {}): sign this CSR with `citadel ca sign-intermediate` where the root key is, then `citadel ca install-intermediate`",
        store.describe(),
        req.id
    );
    Ok(())
}

/// `citadel ca intermediate-csr`.
pub async fn intermediate_csr(a: IntermediateCsrArgs) -> CmdResult {
    let store = a.state.open().await?;
    let cur = store
        .load_journal()
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("{} holds no CA journal", store.describe()))?;
    if !cur.value.offline_root {
        return Err(format!(
            "{} is not an offline-root CA: its intermediates are minted by the server",
            store.describe()
        ));
    }
    let csr = match (&cur.value.intermediate_request, a.new) {
        (Some(r), _) => r.csr_pem.clone(),
        (None, false) => {
            return Err("no intermediate request is waiting: the server makes one at the active intermediate's prepare point (`citadel ca status`); pass --new to make one now".into())
        }
        (None, true) => {
            let kt = cur
                .value
                .active_signer()
                .or_else(|| cur.value.active_root())
                .map(crate::ca::mint::key_type_of)
                .transpose()
                .map_err(|e| e.to_string())?
                .unwrap_or(KeyType::EcP256);
            a.keys.install(kt)?;
            let at = now();
            let (_, j) = super::revoke::update_journal(store.as_ref(), |j| {
                if j.intermediate_request.is_none() {
                    offline::request_intermediate(j, at, kt).map_err(|e| e.to_string())?;
                }
                Ok(())
            })
            .await?;
            let r = j
                .intermediate_request
                .as_ref()
                .ok_or("no request was made")?;
            tracing::info!(target: "citadel::audit", event = "intermediate_requested", request = %r.id, "operator made an intermediate request");
            r.csr_pem.clone()
        }
    };
    if let Some(out) = &a.out {
        write_new(out, csr.as_bytes(), 0o644)?;
    }
    print!("{csr}");
    Ok(())
}

/// `citadel ca sign-intermediate`.
pub fn sign_intermediate(a: SignIntermediateArgs) -> CmdResult {
    let csr = read_file(&a.csr, "--csr")?;
    let (root_pem, root_key, token) = a.root.open()?;
    let root_der = pem::parse_certs(root_pem.as_bytes())
        .map_err(|e| e.to_string())?
        .remove(0);
    let td = match &a.trust_domain {
        Some(t) => TrustDomain::new(t).map_err(|e| e.to_string())?,
        None => offline::trust_domain_of_root(&root_der).map_err(|e| e.to_string())?,
    };
    let at = now();
    let (cert, cross) = match &a.old_root_cert {
        None => (
            offline::sign_request(&td, &csr, &root_pem, root_key, at, a.ttl)
                .map_err(|e| e.to_string())?,
            None,
        ),
        Some(old) => {
            let old_pem = String::from_utf8(read_file(old, "--old-root-cert")?)
                .map_err(|_| format!("{} is not PEM text", old.display()))?;
            let old_der = pem::parse_certs(old_pem.as_bytes())
                .map_err(|e| format!("{}: {e}", old.display()))?
                .into_iter()
                .next()
                .ok_or("--old-root-cert holds no certificate")?;
            let old_key = match (&a.old_root_key, &token) {
                (Some(f), _) => SoftwareKey::from_pem(&read_file(f, "--old-root-key")?)
                    .map_err(|e| format!("{}: {e}", f.display()))?
                    .shared(),
                (None, Some(token)) => {
                    open_in_token(token, &old_der, a.old_root_key_label.as_deref())?
                }
                (None, None) => {
                    return Err("a root rotation needs the current root's key: --old-root-key FILE, or --old-root-key-label with the --root-pkcs11-* token".into())
                }
            };
            let out = offline::sign_root_rotation(
                &td, &csr, &root_pem, root_key, &old_pem, old_key, at, a.ttl,
            )
            .map_err(|e| e.to_string())?;
            (out.intermediate_pem, Some(out.cross_pem))
        }
    };
    let info = chain::describe(
        &pem::parse_certs(cert.as_bytes())
            .map_err(|e| e.to_string())?
            .remove(0),
    )
    .map_err(|e| e.to_string())?;
    tracing::info!(target: "citadel::audit", event = "intermediate_signed", trust_domain = %td, serial = %info.serial_hex, not_after = %info.not_after, cross_signed = cross.is_some(), "signed an intermediate with the offline root");
    match &a.out {
        Some(out) => write_new(out, cert.as_bytes(), 0o644)?,
        None => print!("{cert}"),
    }
    if let (Some(c), Some(out)) = (&cross, &a.cross_out) {
        write_new(out, c.as_bytes(), 0o644)?;
    }
    eprintln!(
        "signed intermediate {} for {td}, valid until {}; install it with `citadel ca install-intermediate`",
        info.serial_hex, info.not_after
    );
    Ok(())
}

/// `citadel ca install-intermediate`.
pub async fn install_intermediate(a: InstallIntermediateArgs) -> CmdResult {
    let read_text = |p: &Path, what: &str| -> Result<String, String> {
        String::from_utf8(read_file(p, what)?)
            .map_err(|_| format!("{} is not PEM text", p.display()))
    };
    let cert = read_text(&a.cert, "--cert")?;
    let rotation = match (&a.new_root, &a.cross_cert) {
        (Some(r), Some(c)) => Some((read_text(r, "--new-root")?, read_text(c, "--cross-cert")?)),
        _ => None,
    };
    let store = a.state.open().await?;
    let at = now();
    let ((id, status), j) = super::revoke::update_journal(store.as_ref(), |j| match &rotation {
        None => offline::install(j, &cert, at).map_err(|e| e.to_string()),
        Some((root, cross)) => {
            let p = j
                .policy
                .as_ref()
                .map(|p| crate::ca::policy::CaPolicy::from_stored(p).rotation)
                .unwrap_or_default();
            offline::install_root_rotation(
                j,
                root,
                &cert,
                cross,
                at,
                p.activate_after,
                p.max_leaf_ttl,
                p.leaf_grace(),
            )
            .map(|id| (id, Status::Prepared))
            .map_err(|e| e.to_string())
        }
    })
    .await?;
    if rotation.is_some() || status == Status::Active {
        let bundle: String = j.trusted_roots().map(|r| r.cert_pem.as_str()).collect();
        store
            .publish_bundle(&bundle)
            .await
            .map_err(|e| e.to_string())?;
    }
    tracing::info!(target: "citadel::audit", event = "intermediate_installed", id = %id, status = ?status, root_rotation = rotation.is_some(), store = %store.describe(), "installed a root-signed intermediate");
    match (rotation.is_some(), status) {
        (true, _) => println!("root rotation prepared with intermediate {id}: the server publishes the two-root bundle, then activates the new chain after the propagation period; `citadel ca status` shows progress"),
        (false, Status::Active) => println!("installed intermediate {id}: active; start (or restart) `citadel serve` on this state"),
        _ => println!("installed intermediate {id}: prepared; the server activates it at 5/6 of the current intermediate's life"),
    }
    Ok(())
}

/// `citadel ca new-root`.
pub fn new_root(a: NewRootArgs) -> CmdResult {
    let td = TrustDomain::new(&a.trust_domain).map_err(|e| e.to_string())?;
    let kt: KeyType = a.key_type.parse()?;
    for p in [Some(&a.cert_out), a.key_out.as_ref()]
        .into_iter()
        .flatten()
    {
        if p.exists() {
            return Err(format!(
                "{} exists; new-root never replaces a file",
                p.display()
            ));
        }
    }
    match (&a.key_out, &a.root_pkcs11_module) {
        (Some(_), None) => {}
        (None, Some(module)) => {
            let config = Pkcs11Config {
                module: module.clone(),
                token_label: a
                    .root_pkcs11_token_label
                    .clone()
                    .ok_or("--root-pkcs11-module needs --root-pkcs11-token-label")?,
                pin: pin_source(&a.root_pkcs11_pin_file, &a.root_pkcs11_pin_env, "root-pkcs11")?,
                max_sessions: Some(1),
            };
            crate::ca::keysource::connect(config, "citadel".into(), true, kt)?;
        }
        _ => return Err("give --key-out FILE, or --root-pkcs11-module with --root-pkcs11-token-label and a PIN flag".into()),
    }
    let (cert, key, label) = offline::new_root(&td, kt, now(), a.ttl).map_err(|e| e.to_string())?;
    if let Some(out) = &a.key_out {
        write_new(out, key.expose().as_bytes(), 0o600)?;
    }
    write_new(&a.cert_out, cert.as_bytes(), 0o644)?;
    tracing::info!(target: "citadel::audit", event = "offline_root_created", trust_domain = %td, label = ?label, "made a new root");
    match label {
        Some(l) => println!(
            "wrote {}; the key is {l:?} in the token",
            a.cert_out.display()
        ),
        None => println!(
            "wrote {} and the key to {} (mode 0600)",
            a.cert_out.display(),
            a.key_out
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        ),
    }
    Ok(())
}
