//! `citadel request`: a small Istio-protocol client. Generates a key and CSR, calls
//! CreateCertificate, verifies the answer, and writes cert-chain.pem, key.pem, root-cert.pem.

use std::path::PathBuf;
use std::time::Duration;

use crate::client::{self, ConnectOptions};
use crate::duration::clap_parse;
use crate::fsutil::write_atomic;
use crate::identity::{ServiceAccount, SpiffeId, TrustDomain};
use crate::pki::{csr, KeyType};

use super::{read_file, CmdResult};

/// Flags of `citadel request`.
#[derive(Debug, clap::Args)]
#[command(after_long_help = "\
Examples:
  citadel request --ca-addr 127.0.0.1:15012 --ca-root-cert citadel-data/root-cert.pem \\
      --token-file token.jwt --out-dir certs/
  # Renew with the certificate from a previous request instead of a token:
  citadel request --ca-addr 127.0.0.1:15012 --ca-root-cert certs/root-cert.pem --renew-from certs/")]
pub struct Args {
    /// The CA's gRPC address.
    #[arg(long, value_name = "HOST:PORT")]
    pub ca_addr: String,

    /// PEM roots that issued the CA's serving certificate (e.g. <state-dir>/root-cert.pem).
    #[arg(long, value_name = "FILE", required_unless_present = "plaintext")]
    pub ca_root_cert: Option<PathBuf>,

    /// Service-account token to authenticate with.
    #[arg(long, value_name = "JWT", conflicts_with = "token_file")]
    pub token: Option<String>,

    /// File holding the service-account token.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,

    /// Authenticate with DIR/cert-chain.pem and DIR/key.pem (a previous --out-dir) over mTLS.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["token", "token_file"])]
    pub renew_from: Option<PathBuf>,

    /// Key type of the new workload key.
    #[arg(long, default_value = "ec-p256", value_name = "TYPE",
          value_parser = ["ec-p256", "ec-p384", "rsa-2048", "rsa-3072", "rsa-4096"])]
    pub key_type: String,

    /// Requested validity; the server's default when unset.
    #[arg(long, value_parser = clap_parse, value_name = "DUR")]
    pub ttl: Option<Duration>,

    /// Trust domain used to name the identity in the CSR.
    #[arg(long, default_value = "cluster.local", value_name = "TD")]
    pub trust_domain: TrustDomain,

    /// Where to write cert-chain.pem, key.pem (0600) and root-cert.pem.
    #[arg(long, default_value = ".", value_name = "DIR")]
    pub out_dir: PathBuf,

    /// TLS server name to verify; defaults to the host of --ca-addr.
    #[arg(long, value_name = "NAME")]
    pub tls_server_name: Option<String>,

    /// Talk to a server started with --plaintext.
    #[arg(long)]
    pub plaintext: bool,
}

/// The identity a token names, read WITHOUT verifying it: only to fill the CSR's SAN the way
/// istio-agent does. The CA verifies the token and overrides the SAN anyway.
fn identity_from_token(token: &str, td: &TrustDomain) -> Option<SpiffeId> {
    let claims = crate::auth::jws::unverified_claims(token)?;
    let sa = ServiceAccount::from_username(claims.get("sub")?.as_str()?).ok()?;
    Some(td.service_account_id(&sa))
}

/// Requests one certificate and writes it to files.
pub async fn run(args: Args) -> CmdResult {
    let key_type: KeyType = args.key_type.parse()?;
    let token = match (&args.token, &args.token_file) {
        (Some(t), _) => Some(t.trim().to_string()),
        (None, Some(f)) => Some(
            String::from_utf8(read_file(f, "token file")?)
                .map_err(|_| format!("{} is not text", f.display()))?
                .trim()
                .to_string(),
        ),
        (None, None) => None,
    };
    let (identity_pem, expected) = match &args.renew_from {
        Some(dir) => {
            let chain = read_file(&dir.join("cert-chain.pem"), "certificate chain")?;
            let key = read_file(&dir.join("key.pem"), "private key")?;
            let leaf = crate::pki::pem::parse_certs(&chain)
                .map_err(|e| format!("{}: {e}", dir.join("cert-chain.pem").display()))?;
            let info = crate::pki::chain::describe(&leaf[0]).map_err(|e| e.to_string())?;
            let id = info.uri_sans.first().and_then(|u| SpiffeId::parse(u).ok());
            (Some((chain, key)), id)
        }
        None => {
            let t = token
                .as_deref()
                .ok_or("pass --token, --token-file or --renew-from")?;
            (None, identity_from_token(t, &args.trust_domain))
        }
    };
    let root_pem = match &args.ca_root_cert {
        Some(p) => read_file(p, "CA root certificate")?,
        None => Vec::new(),
    };
    let mut ca = client::connect(&ConnectOptions {
        addr: args.ca_addr.clone(),
        root_pem,
        server_name: args.tls_server_name.clone(),
        identity: identity_pem,
        plaintext: args.plaintext,
        local_address: None,
    })
    .await
    .map_err(|e| e.to_string())?;

    let key = key_type.generate().map_err(|e| e.to_string())?;
    let san = expected
        .as_ref()
        .map(|id| id.to_string())
        .unwrap_or_default();
    let csr_pem = if san.is_empty() {
        let mut p = rcgen::CertificateParams::default();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.serialize_request(&key).and_then(|c| c.pem())
    } else {
        csr::build(&key, &san)
    }
    .map_err(|e| format!("cannot build the CSR: {e}"))?;

    let ttl = args.ttl.map_or(0, |d| d.as_secs() as i64);
    let chain = client::create_certificate(&mut ca, csr_pem, token.as_deref(), ttl)
        .await
        .map_err(|e| e.to_string())?;
    let verified = client::verify_response(&chain, expected.as_ref(), crate::clock::system().now())
        .map_err(|e| e.to_string())?;

    std::fs::create_dir_all(&args.out_dir)
        .map_err(|e| format!("cannot create {}: {e}", args.out_dir.display()))?;
    let write = |name: &str, bytes: &[u8], mode| {
        let p = args.out_dir.join(name);
        write_atomic(&p, bytes, mode).map_err(|e| format!("cannot write {}: {e}", p.display()))
    };
    write("key.pem", key.serialize_pem().as_bytes(), 0o600)?;
    write("cert-chain.pem", verified.cert_chain_pem.as_bytes(), 0o644)?;
    write("root-cert.pem", verified.roots_pem.as_bytes(), 0o644)?;
    println!(
        "identity:  {}\nserial:    {}\nnot after: {}\nkey type:  {}\nwrote:     {}/{{cert-chain.pem,key.pem,root-cert.pem}}",
        verified.leaf.uri_sans.join(", "),
        verified.leaf.serial_hex,
        verified.leaf.not_after,
        key_type,
        args.out_dir.display()
    );
    Ok(())
}
