//! `citadel revoke`: revoke one certificate, or deny an identity and revoke what it holds.
//! Works on the state directory; a running server picks the change up within seconds.

use std::path::PathBuf;
use std::time::Duration;

use crate::ca::{crl, revocation};
use crate::duration::clap_parse;
use crate::identity::SpiffeId;
use crate::journal::Journal;
use crate::store::file::FileStore;
use crate::store::index::{FileIndex, IssuanceIndex};
use crate::store::Store;

use super::CmdResult;

#[derive(Debug, clap::Args)]
#[command(
    group(clap::ArgGroup::new("what").required(true).args(["serial", "identity"])),
    after_long_help = "\
Examples:
  # One certificate (serial as printed by `citadel request` or `openssl x509 -serial`):
  citadel revoke --serial 3a9f0c...e1 --reason key-compromise
  # A workload: no new certificates, no renewal, and every live certificate revoked:
  citadel revoke --identity spiffe://cluster.local/ns/shop/sa/frontend

The CRL is re-signed at once and written to <state-dir>/ca-crl.pem; a running server reloads
it within --reconcile-interval (default 1s).")]
/// Flags of `citadel revoke`.
pub struct Args {
    /// Serial number in hex (colons and case are ignored).
    #[arg(long, value_name = "HEX")]
    pub serial: Option<String>,
    /// SPIFFE ID to deny from now on.
    #[arg(long, value_name = "SPIFFE_ID")]
    pub identity: Option<String>,
    /// RFC 5280 reason.
    #[arg(long, default_value = "unspecified", value_name = "R", value_parser = crl::REASONS)]
    pub reason: String,
    /// The server's state directory.
    #[arg(long, default_value = "citadel-data", value_name = "DIR")]
    pub state_dir: PathBuf,
    /// Validity of the re-signed CRL (match the server's --crl-validity).
    #[arg(long, default_value = "24h", value_parser = clap_parse, value_name = "DUR")]
    pub crl_validity: Duration,
}

/// Lowercase hex without separators or leading zero octets; `None` if not hex.
pub fn normalize_serial(s: &str) -> Option<String> {
    let hex: String = s
        .trim()
        .chars()
        .filter(|c| *c != ':')
        .collect::<String>()
        .to_ascii_lowercase();
    // Accept `openssl x509 -serial` output (`serial=3A9F...`) and 0x-prefixed forms.
    let hex = hex.strip_prefix("serial=").unwrap_or(&hex);
    let hex = hex.strip_prefix("0x").unwrap_or(hex).to_string();
    if hex.is_empty() || hex.len() > 40 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let padded = if hex.len() % 2 == 1 {
        format!("0{hex}")
    } else {
        hex
    };
    let bytes = hex::decode(padded).ok()?;
    Some(crate::pki::chain::serial_hex(&bytes))
}

/// Applies `change` to the journal (see [`crate::ca::update`]); errors become CLI text.
/// Shared by revoke and rotate-root.
pub(crate) async fn update_journal<T>(
    store: &dyn Store,
    change: impl FnMut(&mut Journal) -> Result<T, String>,
) -> Result<(T, Journal), String> {
    crate::ca::update::update_journal(store, change)
        .await
        .map(|(out, j, _)| (out, j))
        .map_err(|e| e.to_string())
}

/// Revokes a serial or denies an identity, writing the journal with compare-and-swap.
pub async fn run(args: Args) -> CmdResult {
    if !args
        .state_dir
        .join(crate::store::file::JOURNAL_FILE)
        .exists()
    {
        return Err(format!(
            "{} holds no CA journal: pass the server's --state-dir. (A plugged-in CA is revoked \
             upstream: add the serial to its ca-crl.pem and restart citadel.)",
            args.state_dir.display()
        ));
    }
    let store = FileStore::open(&args.state_dir).map_err(|e| e.to_string())?;
    let index = FileIndex::new(&args.state_dir);
    let now = crate::clock::system().now();
    if let Some(raw) = &args.serial {
        let serial = normalize_serial(raw).ok_or_else(|| format!("{raw:?} is not a certificate serial: expected up to 20 bytes of hex, e.g. 3a:9f:0c or 3a9f0c"))?;
        let live = index
            .live(now.unix_timestamp(), &|e| e.serial == serial)
            .map_err(|e| e.to_string())?;
        let entry = live.first().cloned().ok_or_else(|| {
            format!("no live certificate with serial {serial} in {}: it may have expired (nothing to revoke) or come from another CA", index_path(&args))
        })?;
        update_journal(&store, |j| {
            revocation::revoke_serial(j, &entry, &args.reason, now, args.crl_validity)
                .map_err(|e| e.to_string())
        })
        .await?;
        tracing::info!(target: "citadel::audit", event = "certificate_revoked", serial = %serial, identity = %entry.identity, reason = %args.reason, "revoked a certificate");
        println!(
            "revoked serial {serial} ({}, reason {}); CRL written to {}",
            entry.identity,
            args.reason,
            args.state_dir.join("ca-crl.pem").display()
        );
    } else if let Some(raw) = &args.identity {
        let id = SpiffeId::parse(raw).map_err(|e| e.to_string())?;
        let wanted = id.to_string();
        let live = index
            .live(now.unix_timestamp(), &|e| e.identity == wanted)
            .map_err(|e| e.to_string())?;
        let (n, _) = update_journal(&store, |j| {
            if id.trust_domain().as_str() != j.trust_domain {
                return Err(format!(
                    "{id} is outside this CA's trust domain {:?}; nothing changed",
                    j.trust_domain
                ));
            }
            revocation::deny_identity(
                j,
                &id.to_string(),
                &live,
                &args.reason,
                now,
                args.crl_validity,
            )
            .map_err(|e| e.to_string())
        })
        .await?;
        tracing::info!(target: "citadel::audit", event = "identity_revoked", identity = %id, revoked_certificates = n, reason = %args.reason, "denied an identity");
        println!("denied {id}: no new certificates or renewals; revoked {n} live certificate(s); CRL written to {}", args.state_dir.join("ca-crl.pem").display());
    }
    Ok(())
}

fn index_path(args: &Args) -> String {
    args.state_dir
        .join(crate::store::index::INDEX_FILE)
        .display()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::normalize_serial;

    #[test]
    fn serial_forms() {
        assert_eq!(normalize_serial("3A:9F:0C").as_deref(), Some("3a9f0c"));
        assert_eq!(normalize_serial("00ab").as_deref(), Some("ab"));
        assert_eq!(normalize_serial("0x1").as_deref(), Some("01"));
        assert_eq!(
            normalize_serial("serial=3A9F0C\n").as_deref(),
            Some("3a9f0c"),
            "openssl x509 -serial"
        );
        for bad in ["", "xyz", "12 34", &"a".repeat(41)] {
            assert!(normalize_serial(bad).is_none(), "{bad:?}");
        }
    }
}
