//! `citadel ca status|bundle`: read the CA state without a running server.

use std::path::PathBuf;

use time::OffsetDateTime;

use crate::ca::journal::Journal;
use crate::pki::chain::{self, CertInfo};
use crate::pki::pem;
use crate::store::file::{FileStore, BUNDLE_FILE};
use crate::store::Store;

use super::CmdResult;

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Show each CA certificate: role, status, subject, key type, validity, remaining life.
    Status(StatusArgs),
    /// Print the trust bundle (PEM roots) that workloads should trust.
    Bundle(StateArgs),
}

#[derive(Debug, clap::Args)]
pub struct StateArgs {
    /// The server's state directory.
    #[arg(long, default_value = "citadel-data", value_name = "DIR")]
    pub state_dir: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub state: StateArgs,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

async fn load(dir: &PathBuf) -> Result<Journal, String> {
    if !dir.exists() {
        return Err(format!(
            "state directory {} does not exist; start `citadel serve --state-dir {}` first",
            dir.display(),
            dir.display()
        ));
    }
    let store = FileStore::open(dir).map_err(|e| e.to_string())?;
    store
        .load_journal()
        .await
        .map_err(|e| e.to_string())?
        .map(|v| v.value)
        .ok_or_else(|| {
            format!(
                "{} holds no CA journal (a plugged-in CA keeps none; see its cacerts directory)",
                dir.display()
            )
        })
}

fn remaining(not_after: OffsetDateTime, now: OffsetDateTime) -> String {
    let left = not_after - now;
    if left.is_negative() {
        return "expired".into();
    }
    let days = left.whole_days();
    if days >= 2 {
        format!("{days}d")
    } else {
        format!("{}h{}m", left.whole_hours(), left.whole_minutes() % 60)
    }
}

pub async fn run(cmd: Command) -> CmdResult {
    match cmd {
        Command::Bundle(a) => {
            match load(&a.state_dir).await {
                Ok(j) => {
                    for r in j.trusted_roots() {
                        print!("{}", r.cert_pem);
                    }
                }
                // A plugged-in CA keeps no journal; the published bundle is still there.
                Err(e) => {
                    let published =
                        std::fs::read_to_string(a.state_dir.join(BUNDLE_FILE)).map_err(|_| e)?;
                    print!("{published}");
                }
            }
            Ok(())
        }
        Command::Status(a) => {
            let j = load(&a.state.state_dir).await?;
            let now = OffsetDateTime::now_utc();
            let mut rows = Vec::new();
            for rec in &j.authorities {
                let der = pem::parse_certs(rec.cert_pem.as_bytes())
                    .map_err(|e| format!("authority {}: {e}", rec.id))?;
                let info: CertInfo = chain::describe(&der[0]).map_err(|e| e.to_string())?;
                rows.push((rec, info));
            }
            if a.json {
                let out: Vec<_> = rows
                    .iter()
                    .map(|(rec, info)| {
                        serde_json::json!({
                            "id": rec.id, "role": rec.role, "status": rec.status, "issuer": rec.issuer,
                            "subject": info.subject,
                            "key_type": info.key.as_ref().map(|k| k.to_string()).unwrap_or_else(|e| e.clone()),
                            "not_before": info.not_before.unix_timestamp(),
                            "not_after": info.not_after.unix_timestamp(),
                            "remaining_seconds": (info.not_after - now).whole_seconds().max(0),
                        })
                    })
                    .collect();
                let doc = serde_json::json!({"trust_domain": j.trust_domain, "authorities": out});
                println!(
                    "{}",
                    serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())?
                );
            } else {
                println!("trust domain: {}", j.trust_domain);
                println!(
                    "{:<13} {:<9} {:<9} {:<20} {:<20} {:<9} SUBJECT",
                    "ROLE", "STATUS", "KEY", "NOT BEFORE", "NOT AFTER", "LEFT"
                );
                let fmt = time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]");
                for (rec, info) in rows {
                    println!(
                        "{:<13} {:<9} {:<9} {:<20} {:<20} {:<9} {}",
                        format!("{:?}", rec.role).to_lowercase(),
                        format!("{:?}", rec.status).to_lowercase(),
                        info.key
                            .as_ref()
                            .map(|k| k.to_string())
                            .unwrap_or_else(|_| "?".into()),
                        info.not_before.format(&fmt).unwrap_or_default(),
                        info.not_after.format(&fmt).unwrap_or_default(),
                        remaining(info.not_after, now),
                        info.subject
                    );
                }
            }
            Ok(())
        }
    }
}
