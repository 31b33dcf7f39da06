//! `citadel agent`: the sidecar agent.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::agent::fetch::FetchConfig;
use crate::agent::jwt::{self, CaJwt, JwtCa};
use crate::agent::renew::{self, RenewPolicy};
use crate::agent::workload::{self, WorkloadApi};
use crate::agent::{crl, files, http, sds, AgentStats};
use crate::clock;
use crate::duration::clap_parse;
use crate::identity::{ServiceAccount, TrustDomain};
use crate::pki::KeyType;
use crate::shutdown;

use super::{read_file, CmdResult};

#[derive(Debug, clap::Args)]
#[command(after_long_help = "\
Examples:
  # Sidecar for Envoy: SDS on a Unix socket, renewing at half-life.
  citadel agent --ca-addr istiod.istio-system.svc:15012 --ca-root-cert /var/run/secrets/istio/root-cert.pem \\
      --token-file /var/run/secrets/tokens/istio-token --sds-socket /etc/istio/proxy/SDS
  # SPIFFE Workload API for go-spiffe / py-spiffe applications of this user.
  citadel agent --ca-addr istiod.istio-system.svc:15012 --ca-root-cert /var/run/secrets/istio/root-cert.pem \\
      --token-file /var/run/secrets/tokens/istio-token --workload-api-socket unix:///run/spiffe/agent.sock
  # Init container or job: fetch once into files and exit.
  citadel agent --ca-addr 127.0.0.1:15012 --ca-root-cert citadel-data/root-cert.pem \\
      --token-file token.jwt --out-dir certs/ --once

See docs/agent.md for an Envoy bootstrap, docs/spiffe.md for a go-spiffe application.")]
/// Flags of `citadel agent`.
pub struct Args {
    /// The CA's gRPC address.
    #[arg(long, value_name = "HOST:PORT")]
    pub ca_addr: String,
    /// Roots that issued the CA's serving certificate. Bundles received later are trusted too.
    #[arg(long, value_name = "FILE", required_unless_present = "plaintext")]
    pub ca_root_cert: Option<PathBuf>,
    /// Projected service-account token; re-read on every request (kubelet rotates it).
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Trust domain of the identity.
    #[arg(long, default_value = "cluster.local", value_name = "TD")]
    pub trust_domain: TrustDomain,
    /// Namespace of the identity (default: from the token).
    #[arg(long, value_name = "NS", requires = "service_account")]
    pub namespace: Option<String>,
    /// Service account of the identity (default: from the token).
    #[arg(long, value_name = "SA", requires = "namespace")]
    pub service_account: Option<String>,
    /// Requested certificate validity (istio-agent's SECRET_TTL).
    #[arg(long, default_value = "24h", value_parser = clap_parse, value_name = "DUR")]
    pub cert_ttl: Duration,
    /// Workload key type; the key stays in memory (and in --out-dir's key.pem, 0600).
    #[arg(long, default_value = "ec-p256", value_name = "TYPE", value_parser = ["ec-p256", "ec-p384", "rsa-2048"])]
    pub key_type: String,
    /// Write cert-chain.pem, key.pem, root-cert.pem (and ca-crl.pem) here, atomically.
    #[arg(long, value_name = "DIR")]
    pub out_dir: Option<PathBuf>,
    /// Serve Envoy SDS (secrets "default" and "ROOTCA") on this Unix socket.
    #[arg(long, value_name = "PATH")]
    pub sds_socket: Option<PathBuf>,
    /// Fold this CRL file (ca-crl.pem, or the mounted istio-ca-crl ConfigMap) into ROOTCA.
    #[arg(long, value_name = "FILE")]
    pub crl_file: Option<PathBuf>,
    /// Fetch once, write --out-dir, exit.
    #[arg(long, requires = "out_dir")]
    pub once: bool,
    /// Fraction of the certificate's life at which to renew.
    #[arg(long, default_value_t = 0.5, value_name = "F")]
    pub renew_at: f64,
    /// Random spread around --renew-at, as a fraction of the life.
    #[arg(long, default_value_t = 0.01, value_name = "F")]
    pub renew_jitter: f64,
    /// First retry delay after a failure; doubles up to --retry-max.
    #[arg(long, default_value = "1s", value_parser = clap_parse, value_name = "DUR")]
    pub retry_initial: Duration,
    /// Longest delay between retries.
    #[arg(long, default_value = "60s", value_parser = clap_parse, value_name = "DUR")]
    pub retry_max: Duration,
    /// /healthz/ready and /metrics. Empty to disable.
    #[arg(long, default_value = "127.0.0.1:15020", value_name = "ADDR")]
    pub metrics_listen: String,
    /// TLS server name of the CA; defaults to the host of --ca-addr.
    #[arg(long, value_name = "NAME")]
    pub tls_server_name: Option<String>,
    /// Talk to a CA started with --plaintext.
    #[arg(long)]
    pub plaintext: bool,
    /// Serve the SPIFFE Workload API (go-spiffe, py-spiffe, spiffe-helper) on this Unix
    /// socket: X.509-SVID, bundles and CRLs, JWT-SVIDs. Every caller that can open the socket
    /// receives this agent's identity, so its permissions are the access control.
    /// Accepts `unix:///path` (the form of SPIFFE_ENDPOINT_SOCKET) or a path.
    #[arg(long, value_name = "PATH", env = "SPIFFE_ENDPOINT_SOCKET", value_parser = parse_socket)]
    pub workload_api_socket: Option<PathBuf>,
    /// Permissions of the Workload API socket, octal (0600: only this user; 0660 adds the group).
    #[arg(long, default_value = "0600", value_name = "MODE", value_parser = parse_mode)]
    pub workload_api_socket_mode: u32,
    /// Only these peer UIDs (SO_PEERCRED) receive an identity on the Workload API socket;
    /// others get PermissionDenied. Repeat for several. Default: whoever can open the socket.
    #[arg(long = "workload-api-uid", value_name = "UID")]
    pub workload_api_uids: Vec<u32>,
    /// How often the JWT bundle is re-read from the CA (also after every renewal).
    #[arg(long, default_value = "60s", value_parser = clap_parse, value_name = "DUR")]
    pub jwt_bundle_refresh: Duration,
    /// How often the foreign trust domains' bundles (those the CA follows with
    /// `citadel serve --federate-with`) are re-read from the CA; the Workload API hands them
    /// out as federated bundles, each under its own trust domain.
    #[arg(long, default_value = "30s", value_parser = clap_parse, value_name = "DUR")]
    pub federated_bundles_refresh: Duration,
    /// Also trust this foreign trust domain's X.509 authorities in SDS `ROOTCA`, so Envoy
    /// accepts its workloads' certificates (repeatable; match SANs in Envoy to say which).
    /// Default: none, ROOTCA holds our own roots only.
    #[arg(long = "sds-federated-trust-domain", value_name = "TD")]
    pub sds_federated_trust_domains: Vec<crate::identity::TrustDomain>,
}

/// `unix:///path` or a plain path; any other scheme (`tcp://`) is refused.
fn parse_socket(s: &str) -> Result<PathBuf, String> {
    let path = match s.split_once("://") {
        Some(("unix", rest)) => rest,
        Some((scheme, _)) => {
            return Err(format!(
                "{scheme}:// sockets are not served; use unix:///path or a path"
            ))
        }
        None => s.strip_prefix("unix:").unwrap_or(s),
    };
    if path.is_empty() {
        return Err("an empty socket path".into());
    }
    Ok(PathBuf::from(path))
}

/// An octal mode that keeps the owner's read and write (the agent's own clients need them).
fn parse_mode(s: &str) -> Result<u32, String> {
    let m = u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .map_err(|_| format!("{s:?} is not an octal mode such as 0600"))?;
    if m > 0o777 || m & 0o600 != 0o600 {
        return Err(format!(
            "{s:?}: permission bits only (at most 0777), with the owner's rw (0600)"
        ));
    }
    Ok(m)
}

/// Runs the agent (renewal loop, SDS server and/or file writer, monitoring port) until stopped, or
/// for one fetch with `--once`.
pub async fn run(args: Args) -> CmdResult {
    if args.out_dir.is_none() && args.sds_socket.is_none() && args.workload_api_socket.is_none() {
        return Err(
            "nothing to hand certificates to: pass --sds-socket PATH, --workload-api-socket PATH and/or --out-dir DIR".into(),
        );
    }
    if !(0.05..=0.95).contains(&args.renew_at) || !(0.0..0.5).contains(&args.renew_jitter) {
        return Err("--renew-at must be within 0.05..0.95 and --renew-jitter within 0..0.5".into());
    }
    {
        use super::{check_range, MAX_LIFETIME};
        check_range(
            "--cert-ttl",
            args.cert_ttl,
            Duration::from_secs(1),
            MAX_LIFETIME,
        )?;
        check_range(
            "--retry-initial",
            args.retry_initial,
            Duration::from_millis(10),
            Duration::from_secs(3600),
        )?;
        check_range(
            "--retry-max",
            args.retry_max,
            args.retry_initial,
            Duration::from_secs(86_400),
        )?;
    }
    if args.token_file.is_none() {
        return Err("pass --token-file (the projected service-account token)".into());
    }
    let identity = match (&args.namespace, &args.service_account) {
        (Some(ns), Some(sa)) => Some(
            args.trust_domain
                .service_account_id(&ServiceAccount::new(ns, sa).map_err(|e| e.to_string())?),
        ),
        _ => None,
    };
    let cfg = FetchConfig {
        ca_addr: args.ca_addr.clone(),
        ca_root_file: args.ca_root_cert.clone(),
        ca_root_pem: match &args.ca_root_cert {
            Some(p) => read_file(p, "CA root certificate")?,
            None => Vec::new(),
        },
        tls_server_name: args.tls_server_name.clone(),
        token_file: args.token_file.clone(),
        trust_domain: args.trust_domain.clone(),
        identity,
        key_type: args.key_type.parse::<KeyType>()?,
        cert_ttl: args.cert_ttl,
        plaintext: args.plaintext,
    };
    let policy = RenewPolicy {
        at: args.renew_at,
        jitter: args.renew_jitter,
        retry_initial: args.retry_initial,
        retry_max: args.retry_max,
    };
    let clock = clock::system();
    let stats = AgentStats::new();
    let (tx, rx) = tokio::sync::watch::channel(None);
    let (trigger, sd) = shutdown::channel();

    if args.once {
        renew::run(cfg, policy, clock, tx.clone(), stats, true, sd).await?;
        let c = rx.borrow().clone().ok_or("no certificate")?;
        let dir = args.out_dir.as_ref().ok_or("--once needs --out-dir")?;
        files::write(dir, &c).map_err(|e| format!("cannot write {}: {e}", dir.display()))?;
        println!(
            "wrote {} ({}, serial {}, valid until {})",
            dir.display(),
            c.identity,
            c.serial_hex,
            c.not_after
        );
        return Ok(());
    }

    tokio::spawn({
        let t = trigger.clone();
        async move {
            crate::shutdown::signalled().await;
            tracing::info!("agent shutting down");
            t.trigger();
        }
    });
    if !args.metrics_listen.is_empty() {
        let addr: SocketAddr = args.metrics_listen.parse().map_err(|_| {
            format!(
                "--metrics-listen {:?} is not HOST:PORT",
                args.metrics_listen
            )
        })?;
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        tokio::spawn(http::serve(
            l,
            rx.clone(),
            stats.clone(),
            clock.clone(),
            sd.clone(),
        ));
    }
    if let Some(dir) = args.out_dir.clone() {
        tokio::spawn(files::follow(dir, rx.clone(), sd.clone()));
    }
    if let Some(path) = args.crl_file.clone() {
        tokio::spawn(crl::follow(
            path,
            tx.clone(),
            Duration::from_secs(1),
            sd.clone(),
        ));
    }
    if args.sds_socket.is_some() || args.workload_api_socket.is_some() {
        tokio::spawn(crate::agent::federation::follow(
            cfg.clone(),
            clock.clone(),
            tx.clone(),
            args.sds_federated_trust_domains.clone(),
            args.federated_bundles_refresh,
            sd.clone(),
        ));
    }
    let sds_task = args.sds_socket.clone().map(|p| {
        let (rx, stats, sd) = (rx.clone(), stats.clone(), sd.clone());
        tokio::spawn(async move { sds::serve(&p, rx, stats, sd).await })
    });
    let workload_task = args.workload_api_socket.clone().map(|p| {
        let ca: std::sync::Arc<dyn JwtCa> =
            std::sync::Arc::new(CaJwt::new(cfg.clone(), clock.clone()));
        let (jwt_tx, jwt_rx) = tokio::sync::watch::channel(None);
        tokio::spawn(jwt::follow(
            ca.clone(),
            rx.clone(),
            jwt_tx,
            args.jwt_bundle_refresh,
            sd.clone(),
        ));
        let uids = (!args.workload_api_uids.is_empty()).then(|| args.workload_api_uids.clone());
        let api = WorkloadApi::new(rx.clone(), jwt_rx, ca, clock.clone(), stats.clone(), uids);
        let (mode, sd, stop) = (args.workload_api_socket_mode, sd.clone(), trigger.clone());
        tokio::spawn(async move {
            let served = workload::serve(&p, mode, api, sd).await;
            if let Err(e) = &served {
                // Not serving what was asked for: stop the agent rather than run without it.
                tracing::error!(error = %e, "the SPIFFE Workload API cannot be served");
                stop.trigger();
            }
            served
        })
    });
    renew::run(cfg, policy, clock, tx, stats, false, sd).await?;
    if let Some(t) = sds_task {
        t.await.map_err(|e| e.to_string())??;
    }
    if let Some(t) = workload_task {
        t.await.map_err(|e| e.to_string())??;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_addresses_take_the_spiffe_endpoint_form_or_a_path() {
        assert_eq!(
            parse_socket("unix:///run/spiffe/agent.sock").unwrap(),
            PathBuf::from("/run/spiffe/agent.sock")
        );
        assert_eq!(
            parse_socket("/run/a.sock").unwrap(),
            PathBuf::from("/run/a.sock")
        );
        assert_eq!(
            parse_socket("unix:rel.sock").unwrap(),
            PathBuf::from("rel.sock")
        );
        assert!(parse_socket("tcp://127.0.0.1:8081")
            .unwrap_err()
            .contains("tcp://"));
        assert!(parse_socket("unix://").is_err());
        assert!(parse_socket("").is_err());
    }

    #[test]
    fn socket_modes_are_octal_permission_bits_keeping_the_owners_rw() {
        assert_eq!(parse_mode("0600").unwrap(), 0o600);
        assert_eq!(parse_mode("660").unwrap(), 0o660);
        assert_eq!(parse_mode("0o666").unwrap(), 0o666);
        for bad in ["0400", "04600", "1777", "rw", "0800", ""] {
            assert!(parse_mode(bad).is_err(), "{bad}");
        }
    }
}
