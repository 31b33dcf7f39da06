//! `citadel revoke`: revoke one certificate, or deny an identity and revoke what it holds.
//! Works on the state directory; a running server picks the change up within seconds.

use std::path::PathBuf;
use std::time::Duration;

use crate::app::config::StoreKind;
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
  # ... and later let it have certificates again (what was revoked stays revoked):
  citadel revoke --lift --identity spiffe://cluster.local/ns/shop/sa/frontend

  # With replicas (--store kube): creates a Revocation resource that every replica
  # applies against its own issuance index; waits for it and prints its status:
  citadel revoke --store kube --namespace istio-system \\
      --identity spiffe://cluster.local/ns/shop/sa/frontend --reason key-compromise
  # The same with kubectl (kubectl get revocations -n istio-system shows the result):
  kubectl apply -f - <<EOF
  apiVersion: citadel.dev/v1alpha1
  kind: Revocation
  metadata: {name: frontend-compromised, namespace: istio-system}
  spec: {identity: spiffe://cluster.local/ns/shop/sa/frontend, reason: key-compromise}
  EOF

File store: the CRL is re-signed at once and written to <state-dir>/ca-crl.pem; a running
server reloads it within --reconcile-interval (default 1s). Kubernetes store: the servers
write the journal and CRLs (with their own --crl-validity) and publish the CRL ConfigMaps;
this command only creates the resource (RBAC: create/get revocations in --namespace); the
denial lasts while a Revocation names the identity: `kubectl delete revocation NAME` lifts it.")]
/// Flags of `citadel revoke`.
pub struct Args {
    /// Serial number in hex (colons and case are ignored).
    #[arg(long, value_name = "HEX")]
    pub serial: Option<String>,
    /// SPIFFE ID to deny from now on: spiffe://<trust domain>/ns/<namespace>/sa/<name>.
    #[arg(long, value_name = "SPIFFE_ID")]
    pub identity: Option<String>,
    /// Lift the denial of --identity instead (file store): it may get certificates again;
    /// what the denial revoked stays on the CRL. With --store kube, delete the Revocation.
    #[arg(long, requires = "identity", conflicts_with = "serial")]
    pub lift: bool,
    /// RFC 5280 reason.
    #[arg(long, default_value = "unspecified", value_name = "R", value_parser = crl::REASONS)]
    pub reason: String,
    /// The server's state directory.
    #[arg(long, default_value = "citadel-data", value_name = "DIR")]
    pub state_dir: PathBuf,
    /// Validity of the re-signed CRL. Default: the server's --crl-validity, as stored with the
    /// CA state (24h for a journal written before the policy was stored). File store only:
    /// with --store kube the servers use their own.
    #[arg(long, value_parser = clap_parse, value_name = "DUR")]
    pub crl_validity: Option<Duration>,
    /// Where the CA state lives: the state directory, or (kube) the replicas' namespace,
    /// where this creates a Revocation resource.
    #[arg(long, value_enum, default_value_t = StoreKind::File)]
    pub store: StoreKind,
    /// With --store kube: the CA namespace (the servers' --namespace).
    #[arg(long, default_value = "istio-system", value_name = "NS")]
    pub namespace: String,
    /// With --store kube: kubeconfig; default KUBECONFIG, ~/.kube/config, or in-cluster.
    #[arg(long, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// With --store kube: the Revocation's name (default: generated, revoke-XXXXX).
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// With --store kube: return once the resource is created, without waiting for the
    /// replicas to apply it.
    #[arg(long)]
    pub no_wait: bool,
    /// With --store kube: how long to wait for the Applied condition.
    #[arg(long, default_value = "60s", value_parser = clap_parse, value_name = "DUR")]
    pub timeout: Duration,
}

/// Lowercase hex without separators or leading zero octets; `None` if not hex.
pub fn normalize_serial(s: &str) -> Option<String> {
    crate::cluster::revocations::normalize_serial(s)
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

/// The CRL validity to re-sign with: the flag, else the server's as stored with the state, so
/// the CLI never shortens or stretches the server's CRLs by not being told its flags.
fn crl_validity(args: &Args, j: &Journal) -> Duration {
    args.crl_validity
        .or_else(|| {
            j.policy
                .as_ref()
                .map(|p| Duration::from_secs(p.crl_validity_secs))
                .filter(|d| !d.is_zero())
        })
        .unwrap_or(Duration::from_secs(24 * 3600))
}

/// Revokes a serial or denies an identity, writing the journal with compare-and-swap.
pub async fn run(args: Args) -> CmdResult {
    if args.store == StoreKind::Kube {
        return run_kube(args).await;
    }
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
            revocation::revoke_serial(j, &entry, &args.reason, now, crl_validity(&args, j))
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
        // The same rule as a Revocation's spec.identity: a Kubernetes service account's ID.
        crate::cluster::revocations::identity_target(raw, id.trust_domain().as_str())
            .map_err(|e| e.replace("spec.identity", "--identity"))?;
        let wanted = id.to_string();
        if args.lift {
            let (lifted, _) =
                update_journal(&store, |j| revocation::lift_identity(j, &wanted)).await?;
            tracing::info!(target: "citadel::audit", event = "denial_lifted", identity = %id, denied_since = lifted.since, "lifted the denial of an identity");
            println!("lifted the denial of {id}: it may get certificates again; the certificates the denial revoked stay on the CRL until they expire");
            return Ok(());
        }
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
                crl_validity(&args, j),
            )
            .map_err(|e| e.to_string())
        })
        .await?;
        tracing::info!(target: "citadel::audit", event = "identity_revoked", identity = %id, revoked_certificates = n, reason = %args.reason, "denied an identity");
        println!("denied {id}: no new certificates or renewals; revoked {n} live certificate(s); CRL written to {}", args.state_dir.join("ca-crl.pem").display());
    }
    Ok(())
}

/// `--store kube`: creates the Revocation, then (unless --no-wait) waits for the Applied
/// condition and prints the status the replicas computed from the journal.
async fn run_kube(args: Args) -> CmdResult {
    use crate::cluster::revocations::{
        Revocation, RevocationReason as Reason, RevocationSpec, APPLIED,
    };
    use kube::api::{Api, PostParams};
    let reason =
        Reason::parse(&args.reason).ok_or_else(|| format!("unknown reason {:?}", args.reason))?;
    // Checked here too, so a typo is reported before anything is created.
    if let Some(raw) = &args.serial {
        normalize_serial(raw).ok_or_else(|| format!("{raw:?} is not a certificate serial: expected up to 20 bytes of hex, e.g. 3a:9f:0c or 3a9f0c"))?;
    }
    if let Some(raw) = &args.identity {
        let id = SpiffeId::parse(raw).map_err(|e| e.to_string())?;
        // The trust domain is the servers' to check; the shape is checked here already.
        crate::cluster::revocations::identity_target(raw, id.trust_domain().as_str())
            .map_err(|e| e.replace("spec.identity", "--identity"))?;
        if args.lift {
            return Err(format!(
                "with --store kube a denial lasts while a Revocation names {id}: delete it \
                 (kubectl get revocations -n {ns}; kubectl delete revocation NAME -n {ns}) and \
                 the replicas lift the denial within seconds",
                ns = args.namespace
            ));
        }
    }
    let client = crate::cluster::client(args.kubeconfig.as_deref()).await?;
    let api: Api<Revocation> = Api::namespaced(client, &args.namespace);
    let mut rev = Revocation::new(
        args.name.as_deref().unwrap_or_default(),
        RevocationSpec {
            serial: args.serial.clone(),
            identity: args.identity.clone(),
            reason,
            expiration_timestamp: None,
        },
    );
    if args.name.is_none() {
        rev.metadata.name = None;
        rev.metadata.generate_name = Some("revoke-".into());
    }
    let created = api.create(&PostParams::default(), &rev).await.map_err(|e| match e {
        kube::Error::Api(s) if s.code == 404 => format!(
            "the API server does not know Revocations in namespace {}: install the CRD (kubectl apply -f deploy/crds/revocation.yaml) and check --namespace",
            args.namespace
        ),
        kube::Error::Api(s) => format!("the API server refused the Revocation: {}", s.message),
        e => format!("cannot create the Revocation: {e}"),
    })?;
    let name = created.metadata.name.clone().unwrap_or_default();
    println!(
        "created revocation.citadel.dev/{name} in namespace {}",
        args.namespace
    );
    if args.no_wait {
        return Ok(());
    }
    let deadline = tokio::time::Instant::now() + args.timeout;
    loop {
        let cur = api
            .get(&name)
            .await
            .map_err(|e| format!("cannot read Revocation {name}: {e}"))?;
        let st = cur.status.unwrap_or_default();
        let cond = st.conditions.iter().find(|c| c.type_ == APPLIED);
        match cond {
            Some(c) if c.status == "True" => {
                let crls: Vec<String> = st
                    .crl_versions
                    .iter()
                    .map(|c| format!("{} #{}", c.issuer, c.number))
                    .collect();
                println!(
                    "applied at {}: {} certificate(s) on the CRL; CRLs: {}; replicas reporting: {}",
                    st.applied_at.as_deref().unwrap_or("?"),
                    st.certificates_revoked.unwrap_or(0),
                    if crls.is_empty() {
                        "none needed".to_string()
                    } else {
                        crls.join(", ")
                    },
                    st.replicas.keys().cloned().collect::<Vec<_>>().join(", ")
                );
                println!("{}", c.message);
                return Ok(());
            }
            Some(c) if c.reason == "Invalid" || c.reason == "JournalFull" => {
                return Err(format!("Revocation {name} was refused: {}", c.message));
            }
            _ => {}
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!(
                "Revocation {name} is not applied after {}: are citadel replicas running in namespace {}? (kubectl describe revocation {name} -n {})",
                crate::duration::format(args.timeout),
                args.namespace,
                args.namespace
            ));
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
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
