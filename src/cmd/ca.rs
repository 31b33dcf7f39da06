//! `citadel ca status|bundle|crl|jwt-bundle`: read the CA state without a running server;
//! `rotate-root`, `backup`, `restore`: change it.

use std::path::PathBuf;

use time::OffsetDateTime;

use crate::journal::Journal;
use crate::pki::chain::{self, CertInfo};
use crate::pki::pem;
use crate::store::file::BUNDLE_FILE;

use super::CmdResult;

/// `citadel ca` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Show each CA certificate: role, status, subject, key type, validity, remaining life.
    Status(StatusArgs),
    /// Print the trust bundle (PEM roots) that workloads should trust.
    Bundle(StateArgs),
    /// Print the current CRLs (PEM), one per authority.
    Crl(StateArgs),
    /// Print the JWT bundle: the JWK Set of the JWT-SVID signing keys (prepared, active and
    /// retiring ones), as FetchJwtBundle and the citadel-jwt-bundle ConfigMap serve it.
    JwtBundle(StateArgs),
    /// Rotate the JWT-SVID signing key now: a new key joins the JWT bundle at once and signs
    /// once the running server has published that bundle for 5 refresh hints.
    RotateJwtKey(StateArgs),
    /// Start a staged root rotation: prepare now, activate after a propagation period,
    /// retire the old root after the old chain's last leaf expired.
    RotateRoot(RotateArgs),
    /// Write the whole CA state (keys included) to a checksummed file signed with your backup
    /// key, mode 0600.
    Backup(BackupArgs),
    /// Make a backup key (32 random bytes, as hex) that signs backups and proves them on
    /// restore; keep it apart from the backups.
    BackupKey(BackupKeyArgs),
    /// Put a backup's CA state back into the store (stop every citadel first).
    Restore(RestoreArgs),
    /// Prepare a CA whose root key is held offline (--offline-root): root certificate in,
    /// first intermediate's CSR out.
    Init(super::ceremony::InitArgs),
    /// Offline root: print the CSR of the next intermediate waiting for the root's signature.
    IntermediateCsr(super::ceremony::IntermediateCsrArgs),
    /// Offline root: sign an intermediate CSR with the root key (file or PKCS#11 token); needs
    /// no cluster and no state directory.
    SignIntermediate(super::ceremony::SignIntermediateArgs),
    /// Offline root: install the root-signed intermediate (or a root rotation's outputs).
    InstallIntermediate(super::ceremony::InstallIntermediateArgs),
    /// Offline root: make a new self-signed root (key to a file or into a PKCS#11 token).
    NewRoot(super::ceremony::NewRootArgs),
}

/// Flags of `citadel ca backup`.
#[derive(Debug, clap::Args)]
#[command(after_long_help = "\
The file holds every CA private key: keep it as you keep the CA. It is written atomically
with mode 0600, and carries a SHA-256 and an HMAC-SHA256 under your backup key that
`citadel ca restore` checks: whoever can write the backup file but lacks the key cannot make
a restore install a CA of their own. Keep the key apart from the backups.

  citadel ca backup-key --out backup.key          # once
  citadel ca backup --backup-key-file backup.key --out ca-backup.json
  citadel ca backup --store kube --namespace istio-system --backup-key-file backup.key --out ca-backup.json")]
pub struct BackupArgs {
    /// Where the CA state is.
    #[command(flatten)]
    pub state: StateArgs,
    /// The backup file to write (replaced atomically if it exists).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// The backup key that signs the file (`citadel ca backup-key`).
    #[arg(long, value_name = "FILE", required_unless_present = "unsigned")]
    pub backup_key_file: Option<PathBuf>,
    /// Write an unsigned backup (restorable only with --allow-unsigned).
    #[arg(long, conflicts_with = "backup_key_file")]
    pub unsigned: bool,
}

/// Flags of `citadel ca backup-key`.
#[derive(Debug, clap::Args)]
#[command(after_long_help = "\
Writes 64 hex digits (32 random bytes) with mode 0600, and refuses to replace a file that
exists (a lost key makes every backup signed with it unrestorable).

  citadel ca backup-key --out backup.key")]
pub struct BackupKeyArgs {
    /// The key file to create.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
}

/// Flags of `citadel ca restore`.
#[derive(Debug, clap::Args)]
#[command(after_long_help = "\
Checks the file first (checksum, signature under --backup-key-file, formats, that its CA
can sign) and writes nothing if any check fails. Stop every citadel using the store before
restoring, and start them after.

With --force over a journal that is there, it lists what that journal holds and the backup
does not (revocations and denials made after the backup, authorities from rotations since)
and KEEPS them: revocations and denials are merged into the restored state, newer
authorities stay as retiring (trusted while their certificates live, no longer signing).
--drop-newer drops them instead.

  citadel ca restore --backup-key-file backup.key --from ca-backup.json          # into an empty store
  citadel ca restore --backup-key-file backup.key --from ca-backup.json --force  # over the CA that is there")]
pub struct RestoreArgs {
    /// Where the CA state goes.
    #[command(flatten)]
    pub state: StateArgs,
    /// The backup file to read.
    #[arg(long, value_name = "FILE")]
    pub from: PathBuf,
    /// The backup key the file was signed with (`citadel ca backup-key`).
    #[arg(long, value_name = "FILE")]
    pub backup_key_file: Option<PathBuf>,
    /// Restore a backup that carries no signature (an older citadel's, or --unsigned).
    #[arg(long)]
    pub allow_unsigned: bool,
    /// Replace a CA journal the store already holds.
    #[arg(long)]
    pub force: bool,
    /// With --force: drop what the store holds beyond the backup (listed) instead of
    /// keeping it.
    #[arg(long, requires = "force")]
    pub drop_newer: bool,
}

#[derive(Debug, clap::Args)]
#[command(after_long_help = "\
Stages (see docs/operations.md):
  1. prepare   now: a new root and an intermediate under it (cross-signed by the old root);
               the bundle becomes old + new root and is published everywhere.
  2. activate  after the propagation period (the server's --activate-after, default its
               --max-ttl): the new intermediate signs.
  3. retire    the old root leaves the bundle once the old chain's last leaf expired.

The timings come from the policy the server stored with the CA state (its flags, or the
CertificateAuthority resource's spec), so nothing here needs repeating. The timing flags
below override one setting for this rotation only.

With --store kube this sets spec.rootRotation.request on the CertificateAuthority resource
(creating it if needed), which the leader acts on exactly once, and prints the progress from
its status; `kubectl patch ca citadel --type merge -p '{\"spec\":{\"rootRotation\":{\"request\":\"2026-11-29\"}}}'`
does the same.

Planned:    citadel ca rotate-root
            citadel ca rotate-root --store kube --namespace istio-system
Emergency:  citadel ca rotate-root --now          (activate at once; cross-signing keeps
                                                  workloads that hold only the old bundle working)")]
/// Flags of `citadel ca rotate-root`.
pub struct RotateArgs {
    /// Where the CA state is.
    #[command(flatten)]
    pub state: StateArgs,
    /// Override: propagation period before the new chain signs. Default: the server's.
    #[arg(long, value_parser = crate::duration::clap_parse, value_name = "DUR")]
    pub activate_after: Option<std::time::Duration>,
    /// Override: how long after activation the cross-signed chain is served. Default: the
    /// server's max TTL.
    #[arg(long, value_parser = crate::duration::clap_parse, value_name = "DUR")]
    pub retire_after: Option<std::time::Duration>,
    /// Emergency: activate at once (same as --activate-after 0).
    #[arg(long)]
    pub now: bool,
    /// Override: lifetime of the new root. Default: the server's.
    #[arg(long, value_parser = crate::duration::clap_parse, value_name = "DUR")]
    pub root_ttl: Option<std::time::Duration>,
    /// Override: the longest a leaf of the old chain can live. Default: the server's
    /// --max-ttl; a shorter value than the server's retires the old root too early.
    #[arg(long, value_parser = crate::duration::clap_parse, value_name = "DUR")]
    pub max_ttl: Option<std::time::Duration>,
    /// Override: clock skew tolerated by peers. Default: the server's.
    #[arg(long, value_parser = crate::duration::clap_parse, value_name = "DUR")]
    pub clock_skew_margin: Option<std::time::Duration>,
    /// Override: lifetime of the new intermediate. Default: the server's.
    #[arg(long, value_parser = crate::duration::clap_parse, value_name = "DUR")]
    pub intermediate_ttl: Option<std::time::Duration>,
    /// With --store kube: the CertificateAuthority resource to write (the server's
    /// --ca-resource).
    #[arg(long, default_value = "citadel", value_name = "NAME")]
    pub ca_resource: String,
    /// With --store kube: how long to follow the rotation's progress in the resource's
    /// status (0: do not wait).
    #[arg(long, default_value = "30s", value_parser = crate::duration::clap_parse, value_name = "DUR")]
    pub wait: std::time::Duration,
}

pub use super::state::StateArgs;

/// Flags of `citadel ca status`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// Where the CA state is.
    #[command(flatten)]
    pub state: StateArgs,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

async fn load(state: &StateArgs) -> Result<Journal, String> {
    let store = state.open().await?;
    store
        .load_journal()
        .await
        .map_err(|e| e.to_string())?
        .map(|v| v.value)
        .ok_or_else(|| {
            format!(
                "{} holds no CA journal (a plugged-in CA keeps none; see its cacerts)",
                state.describe()
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

fn read_backup_key(path: &std::path::Path) -> Result<crate::ca::backup::BackupKey, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    crate::ca::backup::BackupKey::from_file_bytes(&bytes)
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// `citadel ca backup-key`: a new backup key, 0600, never over an existing file.
fn backup_key(a: BackupKeyArgs) -> CmdResult {
    if a.out.exists() {
        return Err(format!(
            "{} exists; a backup key is never replaced (backups signed with it would become \
             unrestorable): choose another path",
            a.out.display()
        ));
    }
    let (_, file) = crate::ca::backup::BackupKey::generate()?;
    crate::fsutil::write_atomic(&a.out, &file, 0o600)
        .map_err(|e| format!("cannot write {}: {e}", a.out.display()))?;
    println!(
        "wrote a new backup key to {} (mode 0600); keep it apart from the backups",
        a.out.display()
    );
    Ok(())
}

/// `citadel ca backup`: the journal, checksummed and signed, to a 0600 file.
async fn backup(a: BackupArgs) -> CmdResult {
    let key = a
        .backup_key_file
        .as_deref()
        .map(read_backup_key)
        .transpose()?;
    let store = a.state.open().await?;
    let current = store
        .load_journal()
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("{} holds no CA journal to back up", a.state.describe()))?;
    let now = crate::clock::system().now().unix_timestamp();
    let bytes = crate::ca::backup::make(&current.value, &store.describe(), now, key.as_ref())?;
    crate::fsutil::write_atomic(&a.out, &bytes, 0o600)
        .map_err(|e| format!("cannot write {}: {e}", a.out.display()))?;
    let b = crate::ca::backup::open(&bytes, key.as_ref(), key.is_none())?.backup;
    if key.is_none() {
        eprintln!("warning: the backup is unsigned (--unsigned): a restore cannot tell it from a forged one and needs --allow-unsigned");
    }
    println!(
        "backed up {} ({} authorities, {} revocations) to {} (mode 0600, sha256 {}, {})",
        b.source,
        b.journal.authorities.len(),
        b.journal.revocations.len(),
        a.out.display(),
        b.sha256,
        if key.is_some() {
            "signed with the backup key"
        } else {
            "unsigned"
        }
    );
    Ok(())
}

/// `citadel ca restore`: a checked backup into the store (refuses to replace without --force).
async fn restore(a: RestoreArgs) -> CmdResult {
    use crate::ca::backup;
    let key = a
        .backup_key_file
        .as_deref()
        .map(read_backup_key)
        .transpose()?;
    let bytes =
        std::fs::read(&a.from).map_err(|e| format!("cannot read {}: {e}", a.from.display()))?;
    let opened = backup::open(&bytes, key.as_ref(), a.allow_unsigned)
        .map_err(|e| format!("{}: {e}", a.from.display()))?;
    if !opened.signed {
        eprintln!("warning: restoring an unsigned backup (--allow-unsigned): nothing shows it was not altered");
    }
    let opened_signed = opened.signed;
    let b = opened.backup;
    if a.state.store == super::serve::StoreKind::File {
        std::fs::create_dir_all(&a.state.state_dir)
            .map_err(|e| format!("cannot create {}: {e}", a.state.state_dir.display()))?;
    }
    let store = a.state.open().await?;
    let current = store.load_journal().await;
    let now = crate::clock::system().now().unix_timestamp();
    let mut journal = b.journal.clone();
    let expected = match current {
        Ok(None) => None,
        Ok(Some(c)) if a.force => {
            let newer = backup::newer(&b.journal, &c.value);
            if !newer.is_empty() {
                println!(
                    "{} holds {} item(s) the backup (taken at unix time {}) does not:",
                    store.describe(),
                    newer.lines().len(),
                    b.created_at
                );
                for l in newer.lines() {
                    println!("  {l}");
                }
                if a.drop_newer {
                    println!("dropping them (--drop-newer)");
                } else if c.value.trust_domain != b.journal.trust_domain {
                    return Err(format!(
                        "the store's CA is of trust domain {:?} and the backup's of {:?}: its \
                         items cannot be kept; pass --drop-newer to drop them",
                        c.value.trust_domain, b.journal.trust_domain
                    ));
                } else {
                    journal = backup::merge(b.journal.clone(), &c.value, now);
                    let td = crate::identity::TrustDomain::new(&journal.trust_domain)
                        .map_err(|e| e.to_string())?;
                    crate::ca::bootstrap::signer_from_journal(&journal, &td)
                        .map_err(|e| format!("the merged CA state cannot sign: {e}"))?;
                    println!(
                        "keeping them: merged into the restored state (newer authorities as \
                         retiring); pass --drop-newer to drop them"
                    );
                }
            }
            tracing::info!(target: "citadel::audit", event = "ca_restore_newer", revocations = newer.revocations.len(), denied = newer.denied.len(), authorities = newer.authorities.len(), dropped = a.drop_newer, "the store held items the backup does not");
            Some(c.revision)
        }
        Ok(Some(c)) => {
            return Err(format!(
                "{} already holds a CA journal (trust domain {:?}, {} authorities); pass --force \
                 to replace it with the backup (stop every citadel using it first)",
                store.describe(),
                c.value.trust_domain,
                c.value.authorities.len()
            ))
        }
        // An unreadable journal is what a restore is for, but only on request.
        Err(e) if a.force => {
            return Err(format!(
                "{e}; move the damaged journal aside, then restore into the empty store"
            ))
        }
        Err(e) => return Err(e.to_string()),
    };
    store
        .save_journal(&journal, expected.as_ref())
        .await
        .map_err(|e| e.to_string())?;
    let bundle: String = journal
        .trusted_roots()
        .map(|r| r.cert_pem.as_str())
        .collect();
    store
        .publish_bundle(&bundle)
        .await
        .map_err(|e| e.to_string())?;
    store
        .publish_crl(&crate::ca::crl::bundle(&journal))
        .await
        .map_err(|e| e.to_string())?;
    tracing::info!(target: "citadel::audit", event = "ca_restored", store = %store.describe(), backup_source = %crate::audit::shown(&b.source), signed = opened_signed, backup_created_at = b.created_at, "restored the CA state from a backup");
    println!(
        "restored {} from {} (taken from {} at unix time {}); start citadel to use it",
        store.describe(),
        a.from.display(),
        b.source,
        b.created_at
    );
    Ok(())
}

/// Runs one `citadel ca` subcommand.
pub async fn run(cmd: Command) -> CmdResult {
    match cmd {
        Command::Backup(a) => backup(a).await,
        Command::BackupKey(a) => backup_key(a),
        Command::Restore(a) => restore(a).await,
        Command::Init(a) => super::ceremony::init(a).await,
        Command::IntermediateCsr(a) => super::ceremony::intermediate_csr(a).await,
        Command::SignIntermediate(a) => super::ceremony::sign_intermediate(a),
        Command::InstallIntermediate(a) => super::ceremony::install_intermediate(a).await,
        Command::NewRoot(a) => super::ceremony::new_root(a),
        Command::Bundle(a) => {
            match load(&a).await {
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
        Command::Crl(a) => {
            match load(&a).await {
                Ok(j) => print!("{}", crate::ca::crl::bundle(&j)),
                Err(e) => {
                    let published =
                        std::fs::read_to_string(a.state_dir.join(crate::store::file::CRL_FILE))
                            .map_err(|_| e)?;
                    print!("{published}");
                }
            }
            Ok(())
        }
        Command::JwtBundle(a) => {
            match load(&a).await {
                Ok(j) => {
                    let hint = j
                        .policy
                        .as_ref()
                        .map(|p| crate::ca::policy::CaPolicy::from_stored(p).rotation.jwt)
                        .unwrap_or_default()
                        .refresh_hint;
                    println!(
                        "{}",
                        crate::ca::jwt::render_jwks(&j, hint).map_err(|e| e.to_string())?
                    );
                }
                Err(e) => {
                    let published =
                        std::fs::read_to_string(a.state_dir.join(crate::store::file::JWKS_FILE))
                            .map_err(|_| e)?;
                    println!("{}", published.trim_end());
                }
            }
            Ok(())
        }
        Command::RotateRoot(a) => rotate_root(a).await,
        Command::RotateJwtKey(a) => rotate_jwt_key(a).await,
        Command::Status(a) => {
            let j = load(&a.state).await?;
            let now = crate::clock::system().now();
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
                let doc = serde_json::json!({
                    "trust_domain": j.trust_domain,
                    "authorities": out,
                    "root_rotation": j.root_rotation.as_ref().map(|r| serde_json::json!({
                        "stage": r.stage(), "trigger": r.trigger, "prepared_at": r.prepared_at,
                        "bundle_published_at": r.bundle_published_at, "activated_at": r.activated_at,
                        "next_stage_due": r.next_due(), "old_root": r.old_root, "new_root": r.new_root,
                    })),
                    "revoked_certificates": j.revocations.len(),
                    "denied_identities": j.denied.iter().map(|d| &d.identity).collect::<Vec<_>>(),
                    "crl_next_update": j.crls.iter().map(|c| c.next_update).min(),
                    "jwt_keys": j.jwt_keys.iter().map(|k| serde_json::json!({
                        "kid": k.kid, "stage": k.stage(), "created_at": k.created_at,
                        "published_at": k.published_at, "activated_at": k.activated_at,
                        "deactivated_at": k.deactivated_at, "retired_at": k.retired_at,
                        "planned_end": k.not_after,
                    })).collect::<Vec<_>>(),
                    "jwt_bundle_sequence": j.jwt_bundle_sequence,
                    "policy": j.policy,
                    "offline_root": j.offline_root,
                    "intermediate_request": j.intermediate_request.as_ref().map(|r| serde_json::json!({
                        "id": r.id, "created_at": r.created_at,
                        "key_in_token": r.key_ref.as_ref().map(|k| &k.token),
                    })),
                    "intermediate_signature_needed": offline_needed(&j, now).map(|(n, left)| serde_json::json!({
                        "request": n.request, "deadline": n.deadline, "seconds_left": left,
                        "signer_expires": n.signer_expires,
                    })),
                });
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
                let when = |t: i64| {
                    OffsetDateTime::from_unix_timestamp(t)
                        .map(|d| d.format(&fmt).unwrap_or_default())
                        .unwrap_or_default()
                };
                match &j.root_rotation {
                    None => println!("root rotation: none in progress"),
                    Some(r) => println!(
                        "root rotation: {} ({}), prepared {}, next stage due {}",
                        r.stage(),
                        r.trigger,
                        when(r.prepared_at),
                        r.next_due()
                            .map(when)
                            .unwrap_or_else(|| "after the bundle is published".into())
                    ),
                }
                if j.jwt_keys.is_empty() {
                    println!("JWT-SVID keys: none yet (the server prepares the first at start)");
                } else {
                    println!(
                        "JWT-SVID keys (bundle sequence {}):\n  {:<24} {:<10} {:<17} {:<17} {:<17} PLANNED END",
                        j.jwt_bundle_sequence, "KID", "STAGE", "CREATED", "PUBLISHED", "ACTIVATED"
                    );
                    let or_dash = |t: Option<i64>| t.map(when).unwrap_or_else(|| "-".into());
                    for k in &j.jwt_keys {
                        println!(
                            "  {:<24} {:<10} {:<17} {:<17} {:<17} {}",
                            k.kid,
                            k.stage(),
                            when(k.created_at),
                            or_dash(k.published_at),
                            or_dash(k.activated_at),
                            when(k.not_after)
                        );
                    }
                }
                if j.offline_root {
                    match offline_needed(&j, now) {
                        Some((n, left)) => println!(
                            "offline root: INTERMEDIATE SIGNATURE NEEDED: request {} waits for the root's signature; {} (deadline {}); the current intermediate keeps signing{}. `citadel ca intermediate-csr` prints the CSR",
                            n.request,
                            if left >= 0 { format!("{} left", crate::duration::format(std::time::Duration::from_secs(left as u64))) } else { format!("OVERDUE by {}", crate::duration::format(std::time::Duration::from_secs(left.unsigned_abs()))) },
                            when(n.deadline),
                            n.signer_expires.map(|e| format!(" until {}", when(e))).unwrap_or_default()
                        ),
                        None => println!("offline root: the root key is held offline; no intermediate signature is needed now"),
                    }
                }
                match &j.policy {
                    Some(p) => println!(
                        "policy (stored by the server, from {}): max TTL {}, default TTL {}, propagation {}, clock skew margin {}, CRL validity {}, key type {}",
                        if p.source.is_empty() { "flags" } else { p.source.as_str() },
                        crate::duration::format(std::time::Duration::from_secs(p.max_ttl_secs)),
                        crate::duration::format(std::time::Duration::from_secs(p.default_ttl_secs)),
                        crate::duration::format(std::time::Duration::from_secs(p.activate_after_secs)),
                        crate::duration::format(std::time::Duration::from_secs(p.skew_margin_secs)),
                        crate::duration::format(std::time::Duration::from_secs(p.crl_validity_secs)),
                        p.key_type
                    ),
                    None => println!("policy: none stored (a server of this version stores it at start)"),
                }
                println!(
                    "revocation: {} revoked certificate(s), {} denied identit{}; CRLs valid until {}",
                    j.revocations.len(),
                    j.denied.len(),
                    if j.denied.len() == 1 { "y" } else { "ies" },
                    j.crls.iter().map(|c| c.next_update).min().map(when).unwrap_or_else(|| "(not signed yet)".into())
                );
            }
            Ok(())
        }
    }
}

/// Offline root: the request waiting for the root's signature and the seconds left at `now`.
fn offline_needed(
    j: &Journal,
    now: OffsetDateTime,
) -> Option<(crate::ca::offline::SignatureNeeded, i64)> {
    let activate_at = j
        .policy
        .as_ref()
        .map(|p| p.activate_at)
        .unwrap_or(crate::ca::policy::RotationPolicy::default().activate_at);
    crate::ca::offline::signature_needed(j, activate_at).map(|n| {
        let left = n.deadline - now.unix_timestamp();
        (n, left)
    })
}

/// The rotation policy `rotate-root` plans with: the one the server stored with the state,
/// with any override flags on top. Says which on stderr, so an operator sees the numbers.
fn rotation_policy(
    a: &RotateArgs,
    j: &Journal,
) -> (crate::ca::policy::RotationPolicy, std::time::Duration) {
    use crate::ca::policy::{CaPolicy, RotationPolicy};
    let mut p = match &j.policy {
        Some(stored) => {
            let p = CaPolicy::from_stored(stored).rotation;
            eprintln!(
                "using the server's policy stored with the CA state (from {}): max TTL {}, propagation {}, clock skew margin {}",
                if stored.source.is_empty() { "flags" } else { stored.source.as_str() },
                crate::duration::format(p.max_leaf_ttl),
                crate::duration::format(p.activate_after),
                crate::duration::format(p.skew_margin)
            );
            p
        }
        None => {
            eprintln!(
                "warning: the CA state holds no policy (written by an older citadel): planning with the defaults (90d max TTL); start the current server once, or pass --max-ttl/--activate-after/--clock-skew-margin"
            );
            RotationPolicy::default()
        }
    };
    let over = |flag: &str, v: Option<std::time::Duration>, field: &mut std::time::Duration| {
        if let Some(v) = v {
            if *field != v {
                eprintln!(
                    "{flag} {} overrides the server's {} for this rotation",
                    crate::duration::format(v),
                    crate::duration::format(*field)
                );
            }
            *field = v;
        }
    };
    over("--root-ttl", a.root_ttl, &mut p.root_ttl);
    over(
        "--intermediate-ttl",
        a.intermediate_ttl,
        &mut p.intermediate_ttl,
    );
    over("--max-ttl", a.max_ttl, &mut p.max_leaf_ttl);
    over(
        "--clock-skew-margin",
        a.clock_skew_margin,
        &mut p.skew_margin,
    );
    over("--activate-after", a.activate_after, &mut p.activate_after);
    if a.now {
        p.activate_after = std::time::Duration::ZERO;
    }
    let retire_after = a.retire_after.unwrap_or(p.max_leaf_ttl);
    (p, retire_after)
}

/// `rotate-root --store kube`: the request goes to the CertificateAuthority resource, which
/// the leader acts on once. `Ok(false)` when the API server does not serve the resource
/// (CRD not installed): the caller then writes the journal directly, as before.
async fn request_rotation_via_resource(a: &RotateArgs) -> Result<bool, String> {
    use crate::cluster::ca_resource::CertificateAuthority;
    use kube::api::{Api, Patch, PatchParams, PostParams};
    let client = crate::cluster::client(a.state.kubeconfig.as_deref()).await?;
    let (ns, name) = (a.state.namespace.as_str(), a.ca_resource.as_str());
    let api: Api<CertificateAuthority> = Api::namespaced(client, ns);
    let request = crate::clock::system()
        .now()
        .format(&time::format_description::well_known::Rfc3339)
        .map_err(|e| e.to_string())?;
    let rotation = serde_json::json!({"request": request, "activateImmediately": a.now});
    let patched = api
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"rootRotation": rotation}})),
        )
        .await;
    match patched {
        Ok(_) => {}
        Err(kube::Error::Api(s))
            if s.code == 404 && s.message.contains("certificateauthorities") =>
        {
            let cr: CertificateAuthority = serde_json::from_value(serde_json::json!({
                "apiVersion": "citadel.dev/v1alpha1", "kind": "CertificateAuthority",
                "metadata": {"name": name, "namespace": ns},
                "spec": {"rootRotation": rotation},
            }))
            .map_err(|e| e.to_string())?;
            api.create(&PostParams::default(), &cr)
                .await
                .map_err(|e| format!("cannot create CertificateAuthority {ns}/{name}: {e}"))?;
        }
        Err(kube::Error::Api(s)) if s.code == 404 => return Ok(false),
        Err(e) => {
            return Err(format!(
                "cannot write CertificateAuthority {ns}/{name}: {e}"
            ))
        }
    }
    println!("requested a root rotation: CertificateAuthority {ns}/{name} spec.rootRotation.request={request}");
    let deadline = tokio::time::Instant::now() + a.wait;
    let mut last = String::new();
    while tokio::time::Instant::now() < deadline {
        if let Ok(cr) = api.get(name).await {
            let status = cr.status.unwrap_or_default();
            let handled = status
                .root_rotation
                .as_ref()
                .and_then(|r| r.handled_request.as_deref())
                == Some(request.as_str());
            let cond = status
                .conditions
                .iter()
                .find(|c| c.type_ == "RootRotationInProgress");
            if let (true, Some(c)) = (handled, cond) {
                if c.message != last {
                    println!("{}: {}", c.reason, c.message);
                    last = c.message.clone();
                }
                if c.reason != "Preparing" {
                    println!("`kubectl get ca {name} -n {ns}` or `citadel ca status --store kube` shows further progress");
                    return Ok(true);
                }
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    if !a.wait.is_zero() {
        println!("no citadel leader has acted on the request yet; it stays in the spec and the leader acts on it once when it runs (`kubectl describe ca {name} -n {ns}` shows its Events)");
    }
    Ok(true)
}

/// `citadel ca rotate-jwt-key`: a new JWT key (or the one already prepared), marked as
/// requested; the server publishes it and activates it after the lead (`ca::plan`).
async fn rotate_jwt_key(a: StateArgs) -> CmdResult {
    use crate::ca::plan::Action;
    let store = a.open().await?;
    let journal = load(&a).await?;
    let policy = journal
        .policy
        .as_ref()
        .map(|p| crate::ca::policy::CaPolicy::from_stored(p).rotation)
        .unwrap_or_default();
    let now = crate::clock::system().now();
    let (kid, _) = super::revoke::update_journal(store.as_ref(), |j| {
        if j.next_jwt_key().is_none() {
            crate::ca::apply::apply(j, &Action::PrepareJwtKey, now, &policy)
                .map_err(|e| e.to_string())?;
        }
        let k = j
            .jwt_keys
            .iter_mut()
            .find(|k| k.status == crate::journal::Status::Prepared)
            .ok_or("no JWT key could be prepared")?;
        k.requested = true;
        Ok(k.kid.clone())
    })
    .await?;
    tracing::info!(target: "citadel::audit", event = "jwt_key_rotation_requested", kid = %kid, "operator asked for a JWT key rotation");
    println!(
        "JWT key {kid} prepared: the server publishes it in the JWT bundle at its next pass and it signs {} after that",
        crate::duration::format(std::time::Duration::from_secs(
            policy.jwt.publish_lead() as u64
        ))
    );
    Ok(())
}

async fn rotate_root(a: RotateArgs) -> CmdResult {
    use crate::ca::apply::prepare_root_rotation;
    if a.state.store == super::serve::StoreKind::Kube && request_rotation_via_resource(&a).await? {
        return Ok(());
    }
    let store = a.state.open().await?;
    let journal = load(&a.state).await?;
    let (policy, retire_after) = rotation_policy(&a, &journal);
    let activate_after = policy.activate_after;
    let now = crate::clock::system().now();
    let (_, j) = super::revoke::update_journal(store.as_ref(), |j| {
        prepare_root_rotation(j, now, &policy, "operator", activate_after, retire_after)
            .map_err(|e| e.to_string())
    })
    .await?;
    let r = j.root_rotation.as_ref().ok_or("rotation vanished")?;
    tracing::info!(target: "citadel::audit", event = "root_rotation_prepared", new_root = %r.new_root, activate_after_secs = r.activate_after_secs, "operator started a root rotation");
    if a.state.store == super::serve::StoreKind::Kube {
        // The leader publishes the two-root bundle to every namespace, marks it published,
        // and activates after the propagation period: nothing to do here.
        println!(
            "root rotation prepared: new root {}; the leader publishes the two-root bundle to every namespace, then activates {}s later; `citadel ca status --store kube` shows progress",
            r.new_root, r.activate_after_secs
        );
        return Ok(());
    }
    // Publish the two-root bundle now (and, with --now, activate): the same step a running
    // server performs, so it works whether or not one is running.
    let td = crate::identity::TrustDomain::new(&j.trust_domain).map_err(|e| e.to_string())?;
    let scheduler = crate::ca::scheduler::Scheduler::new(
        store.clone(),
        crate::ca::Ca::new(),
        policy,
        crate::clock::system(),
        td,
    );
    scheduler.step().await.map_err(|e| e.to_string())?;
    let j = load(&a.state).await?;
    let stage = j.root_rotation.as_ref().map_or("complete", |r| r.stage());
    println!(
        "root rotation started: new root {} is in the trust bundle ({}); stage {stage}",
        r.new_root,
        a.state.state_dir.join(BUNDLE_FILE).display()
    );
    if let Some(due) = j.root_rotation.as_ref().and_then(|r| r.next_due()) {
        println!("next stage due at unix time {due}; `citadel ca status` shows progress");
    }
    Ok(())
}
