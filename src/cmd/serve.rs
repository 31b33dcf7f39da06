//! `citadel serve`: run the CA.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::auth::client_cert::ClientCertAuthenticator;
use crate::auth::jwks::Jwks;
use crate::auth::jwt::{JwtAuthenticator, JwtPolicy, DEFAULT_LEEWAY};
use crate::auth::tokenreview::{ReviewLimits, TokenReviewAuthenticator};
use crate::auth::{AuthChain, Authenticator};
use crate::ca::bootstrap::{self, CaOptions};
use crate::ca::policy::RotationPolicy;
use crate::ca::policy::TtlPolicy;
use crate::ca::scheduler::Scheduler;
use crate::ca::{plugged, Ca};
use crate::clock::{self, SharedClock};
use crate::cluster::leader::Elector;
use crate::cluster::publish::ConfigMapPublisher;
use crate::cluster::{self, JwksRefresher};
use crate::duration::{self, clap_parse};
use crate::identity::TrustDomain;
use crate::pki::KeyType;
use crate::server::{tls::TlsState, Metrics, Server};
use crate::store::file::FileStore;
use crate::store::index::{FileIndex, IssuanceIndex};
use crate::store::kube::KubeStore;
use crate::store::Store;
use crate::{devkeys, shutdown};
use tokio::net::TcpListener;

use super::CmdResult;

#[derive(Debug, clap::Args)]
#[command(after_long_help = "\
Examples:
  # Local development: a self-signed CA that trusts tokens from `citadel dev-token`.
  citadel serve --dev

  # Trust a cluster's service-account tokens (JWKS from GET /openid/v1/jwks).
  citadel serve --jwks-file jwks.json --token-issuer https://kubernetes.default.svc.cluster.local

  # Sign with a plugged-in CA in Istio's cacerts layout.
  citadel serve --jwks-file jwks.json --ca-certs-dir /etc/cacerts")]
pub struct Args {
    /// Development mode: trust the dev JWT key compiled in from certs-dev/ (its private key is
    /// public; never use in production). Tokens come from `citadel dev-token`.
    #[arg(long)]
    pub dev: bool,

    /// Where CA state lives: ca-journal.json (keys, 0600) and root-cert.pem (trust bundle).
    #[arg(long, default_value = "citadel-data", value_name = "DIR")]
    pub state_dir: PathBuf,

    /// Address for the CA gRPC service (TLS).
    #[arg(long, default_value = "127.0.0.1:15012", value_name = "ADDR")]
    pub listen: SocketAddr,

    /// Address for /metrics, /healthz/ready and /healthz/live (plain HTTP).
    #[arg(long, default_value = "127.0.0.1:15014", value_name = "ADDR")]
    pub metrics_listen: SocketAddr,

    /// SPIFFE trust domain of issued identities: spiffe://<TD>/ns/<ns>/sa/<sa>.
    #[arg(long, default_value = "cluster.local", value_name = "TD")]
    pub trust_domain: TrustDomain,

    /// JWKS that verifies service-account tokens (the JSON a cluster serves at /openid/v1/jwks).
    #[arg(long, value_name = "FILE")]
    pub jwks_file: Option<PathBuf>,

    /// Required `iss` of tokens. Unset: any issuer whose key is in the JWKS.
    #[arg(long, value_name = "ISS")]
    pub token_issuer: Option<String>,

    /// Accepted token audience; repeat for several.
    #[arg(
        long = "token-audience",
        value_name = "AUD",
        default_value = "istio-ca"
    )]
    pub token_audiences: Vec<String>,

    /// Sign with a plugged-in CA: ca-cert.pem, ca-key.pem, cert-chain.pem, root-cert.pem.
    #[arg(long, value_name = "DIR")]
    pub ca_certs_dir: Option<PathBuf>,

    /// Key type of a newly created self-signed CA (ignored once the CA exists).
    #[arg(long, default_value = "ec-p256", value_name = "TYPE",
          value_parser = ["ec-p256", "ec-p384", "rsa-2048", "rsa-3072", "rsa-4096"])]
    pub ca_key_type: String,

    /// DNS name or IP for the serving certificate; repeat for several.
    #[arg(long = "server-dns-name", value_name = "NAME",
          default_values = ["istiod.istio-system.svc", "localhost", "127.0.0.1"])]
    pub server_dns_names: Vec<String>,

    /// Workload certificate TTL when a request asks for none.
    #[arg(long, default_value = "24h", value_parser = clap_parse, value_name = "DUR")]
    pub default_ttl: Duration,

    /// Longest workload TTL; longer requests are rejected (InvalidArgument), not clamped.
    #[arg(long, default_value = "90d", value_parser = clap_parse, value_name = "DUR")]
    pub max_ttl: Duration,

    /// Lifetime of a newly created self-signed root.
    #[arg(long, default_value = "3650d", value_parser = clap_parse, value_name = "DUR")]
    pub root_ttl: Duration,

    /// Lifetime of a newly created intermediate signing CA.
    #[arg(long, default_value = "365d", value_parser = clap_parse, value_name = "DUR")]
    pub intermediate_ttl: Duration,

    /// Serve gRPC without TLS. For local experiments only: tokens cross the wire in clear.
    #[arg(long)]
    pub plaintext: bool,

    /// Fraction of the active intermediate's life at which its successor is prepared.
    #[arg(long, default_value_t = 0.5, value_name = "F")]
    pub intermediate_prepare_at: f64,

    /// Fraction of the active intermediate's life at which its successor takes over.
    #[arg(long, default_value_t = 5.0 / 6.0, value_name = "F")]
    pub intermediate_activate_at: f64,

    /// Fraction of the root's life at which an automatic root rotation starts.
    #[arg(long, default_value_t = 5.0 / 6.0, value_name = "F")]
    pub root_rotate_at: f64,

    /// Propagation period of an automatic root rotation, between publishing the new root and
    /// signing with it. Default: --max-ttl, so every workload has renewed and seen the bundle.
    #[arg(long, value_parser = clap_parse, value_name = "DUR")]
    pub activate_after: Option<Duration>,

    /// Validity of each CRL; CRLs are re-signed at half of it.
    #[arg(long, default_value = "24h", value_parser = clap_parse, value_name = "DUR")]
    pub crl_validity: Duration,

    /// Where CA state lives: a directory (one replica), or Secrets in --namespace (N
    /// replicas sharing one CA, with leader election on a Lease).
    #[arg(long, value_enum, default_value_t = StoreKind::File)]
    pub store: StoreKind,

    /// citadel's namespace with --store kube: its Secrets, Lease and Events live here.
    #[arg(long, default_value = "istio-system", value_name = "NS")]
    pub namespace: String,

    /// Leader lease duration: a new leader takes over at most this long after the old one
    /// stopped renewing (at once after a clean stop).
    #[arg(long, default_value = "15s", value_parser = clap_parse, value_name = "DUR")]
    pub lease_duration: Duration,

    /// This replica's identity in the Lease (default: hostname plus a random suffix).
    #[arg(long, env = "POD_NAME", value_name = "NAME")]
    pub pod_name: Option<String>,

    /// How tokens are checked: locally against a JWKS (no API call per request), or by the
    /// API server with a TokenReview (cached per token, see --token-cache-ttl).
    #[arg(long, value_enum, default_value_t = AuthMode::Jwks)]
    pub auth: AuthMode,

    /// With --auth jwks: take the issuer and keys from the cluster's
    /// /.well-known/openid-configuration and /openid/v1/jwks, refreshed every 5 minutes and
    /// soon after an unknown key id (at most every 10s).
    #[arg(long, conflicts_with = "jwks_file")]
    pub jwks_from_cluster: bool,

    /// kubeconfig for the API server; default KUBECONFIG, ~/.kube/config, or in-cluster.
    #[arg(long, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,

    /// How long a positive TokenReview is reused for the same token (never past the token's
    /// expiry); 0 disables the cache.
    #[arg(long, default_value = "60s", value_parser = clap_parse, value_name = "DUR")]
    pub token_cache_ttl: Duration,

    /// TokenReviews per second the API server may receive from this replica...
    #[arg(long, default_value_t = 50.0, value_name = "QPS")]
    pub kube_qps: f64,

    /// ...and how many at once.
    #[arg(long, default_value_t = 100, value_name = "N")]
    pub kube_burst: u32,

    /// The longest a request waits for its turn under --kube-qps. A request that would wait
    /// longer fails at once with Unavailable (istio-agent retries it), so a flood of tokens
    /// cannot queue up honest pods' first certificates.
    #[arg(long, default_value = "2s", value_parser = clap_parse, value_name = "DUR")]
    pub kube_review_max_wait: Duration,

    /// CreateCertificate calls in progress at once; beyond it a call is refused at once with
    /// ResourceExhausted, which istio-agent retries. (Each HTTP/2 connection may also carry
    /// at most 256 streams, headers are limited to 32 KiB and a call to 30s.)
    #[arg(long, default_value_t = 1024, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_inflight: u32,

    /// How often the scheduler reloads state (picks up `citadel revoke` and
    /// `citadel ca rotate-root`) and runs what is due.
    #[arg(long, default_value = "1s", value_parser = clap_parse, value_name = "DUR")]
    pub reconcile_interval: Duration,

    /// Clock skew tolerated between the CA and validating peers: retiring a CA waits this
    /// long past the notAfter of its last leaf.
    #[arg(long, default_value = "2m", value_parser = clap_parse, value_name = "DUR")]
    pub clock_skew_margin: Duration,
}

/// The authenticators: client certificate first (renewal), then the token, verified locally
/// against a JWKS (`--auth jwks`) or by the API server (`--auth tokenreview`). Also returns
/// the JWKS refresher to run when the keys come from the cluster.
async fn build_auth(
    args: &Args,
    ca: &Arc<Ca>,
    clock: &SharedClock,
) -> Result<(AuthChain, Option<Arc<JwksRefresher>>), String> {
    let mut members: Vec<Arc<dyn Authenticator>> = vec![Arc::new(ClientCertAuthenticator::new(
        ca.clone(),
        args.trust_domain.clone(),
        clock.clone(),
    ))];
    if args.auth == AuthMode::Tokenreview {
        let client = cluster::client(args.kubeconfig.as_deref()).await?;
        tracing::info!(audiences = ?args.token_audiences, cache_ttl = %duration::format(args.token_cache_ttl), qps = args.kube_qps, burst = args.kube_burst, "TokenReview authentication enabled");
        members.push(Arc::new(TokenReviewAuthenticator::new(
            client,
            args.token_audiences.clone(),
            args.trust_domain.clone(),
            clock.clone(),
            args.token_cache_ttl,
            ReviewLimits {
                qps: args.kube_qps,
                burst: args.kube_burst,
                max_wait: args.kube_review_max_wait,
            },
        )));
        return Ok((AuthChain::new(members), None));
    }
    let (jwks, issuer, source, client) = if args.jwks_from_cluster {
        let client = cluster::client(args.kubeconfig.as_deref()).await?;
        let (issuer, jwks) = cluster::fetch_jwks(&client).await?;
        (
            jwks,
            args.token_issuer.clone().or(issuer),
            "the cluster (/openid/v1/jwks)".to_string(),
            Some(client),
        )
    } else {
        let (bytes, issuer, source) = match (&args.jwks_file, args.dev) {
            (Some(path), _) => (
                super::read_file(path, "JWKS file")?,
                args.token_issuer.clone(),
                path.display().to_string(),
            ),
            (None, true) => (
                devkeys::jwks_json().into_bytes(),
                Some(
                    args.token_issuer
                        .clone()
                        .unwrap_or_else(|| devkeys::DEV_ISSUER.to_string()),
                ),
                "the dev key (certs-dev/)".to_string(),
            ),
            (None, false) => {
                return Err(
                    "no way to verify service-account tokens: pass --jwks-file FILE (the JSON \
                            a cluster serves at /openid/v1/jwks), --jwks-from-cluster, \
                            --auth tokenreview, or --dev for local development"
                        .into(),
                )
            }
        };
        (
            Jwks::from_json(&bytes).map_err(|e| format!("{source}: {e}"))?,
            issuer,
            source,
            None,
        )
    };
    if issuer.is_none() {
        tracing::warn!("--token-issuer is not set: tokens from any issuer whose key is in the JWKS are accepted");
    }
    tracing::info!(keys = jwks.len(), jwks = %source, issuer = issuer.as_deref().unwrap_or("(any)"), audiences = ?args.token_audiences, "JWT authentication enabled");
    let jwt = Arc::new(JwtAuthenticator::new(
        jwks,
        JwtPolicy {
            issuer,
            audiences: args.token_audiences.clone(),
            leeway: DEFAULT_LEEWAY,
        },
        args.trust_domain.clone(),
        clock.clone(),
    ));
    let refresher = client.map(|client| {
        let unknown_kid = Arc::new(tokio::sync::Notify::new());
        jwt.on_unknown_kid(unknown_kid.clone());
        Arc::new(JwksRefresher {
            client,
            auth: jwt.clone(),
            unknown_kid,
            fetches: Default::default(),
        })
    });
    members.push(jwt);
    Ok((AuthChain::new(members), refresher))
}

/// Where CA state lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StoreKind {
    /// A directory (--state-dir): one replica.
    File,
    /// Secrets in --namespace: N replicas with leader election.
    Kube,
}

/// The Kubernetes side of `--store kube`: client, leader election, ConfigMap publisher.
struct KubeParts {
    client: kube::Client,
    elector: Arc<Elector>,
    store: Arc<dyn Store>,
}

async fn kube_parts(
    args: &Args,
    clock: &SharedClock,
    metrics: &Arc<Metrics>,
    shutdown: &shutdown::Shutdown,
) -> Result<KubeParts, String> {
    let client = cluster::client(args.kubeconfig.as_deref()).await?;
    let identity = args.pod_name.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        format!(
            "{}-{}",
            host.trim(),
            &hex::encode(crate::pki::random_serial())[..8]
        )
    });
    let elector = Elector::new(
        client.clone(),
        &args.namespace,
        identity.clone(),
        args.lease_duration,
        clock.clone(),
    );
    let _ = metrics.leader.set(elector.subscribe());
    tokio::spawn(elector.clone().run(shutdown.clone()));
    let publisher = ConfigMapPublisher::new(client.clone(), Some(elector.subscribe()));
    tokio::spawn(publisher.clone().run(shutdown.clone()));
    tracing::info!(namespace = %args.namespace, identity = %identity, lease = %duration::format(args.lease_duration), "Kubernetes store with leader election");
    let store: Arc<dyn Store> = Arc::new(KubeStore::new(
        client.clone(),
        &args.namespace,
        Some(publisher),
    ));
    Ok(KubeParts {
        client,
        elector,
        store,
    })
}

impl KubeParts {
    async fn wait_for_ca(
        &self,
        store: &dyn Store,
        opts: &CaOptions,
        clock: &dyn crate::clock::Clock,
    ) -> Result<(), String> {
        let mut waited = 0u32;
        loop {
            if store
                .load_journal()
                .await
                .map_err(|e| e.to_string())?
                .is_some()
            {
                return Ok(());
            }
            if self.elector.is_leader() {
                bootstrap::load_or_create(store, opts, clock)
                    .await
                    .map_err(|e| e.to_string())?;
                return Ok(());
            }
            waited += 1;
            if waited.is_multiple_of(50) {
                tracing::info!("waiting for the leader to create the CA");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// The `cacerts` Secret's files, if the Secret exists (Istio's plugged-in CA).
async fn cacerts_secret(
    client: &kube::Client,
    namespace: &str,
) -> Result<Option<plugged::MapSource>, String> {
    let api: kube::Api<k8s_openapi::api::core::v1::Secret> =
        kube::Api::namespaced(client.clone(), namespace);
    let secret = api
        .get_opt("cacerts")
        .await
        .map_err(|e| format!("cannot read Secret {namespace}/cacerts: {e}"))?;
    Ok(secret.map(|s| plugged::MapSource {
        label: format!("Secret {namespace}/cacerts"),
        files: s
            .data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.0))
            .collect(),
    }))
}

/// Wakes the scheduler whenever the journal Secret changes (another replica or an operator
/// wrote it), so every replica hot-reloads within moments, not at the next poll.
async fn watch_journal(
    client: kube::Client,
    namespace: String,
    wake: Arc<tokio::sync::Notify>,
    shutdown: shutdown::Shutdown,
) {
    use futures_util::StreamExt;
    use kube::runtime::{watcher, WatchStreamExt};
    let api: kube::Api<k8s_openapi::api::core::v1::Secret> =
        kube::Api::namespaced(client, &namespace);
    let cfg = watcher::Config::default().fields(&format!(
        "metadata.name={}",
        crate::store::kube::JOURNAL_SECRET
    ));
    let mut events = watcher(api, cfg)
        .default_backoff()
        .touched_objects()
        .boxed();
    loop {
        tokio::select! {
            e = events.next() => match e {
                Some(Ok(_)) => wake.notify_one(),
                Some(Err(err)) => tracing::debug!(error = %err, "journal watch error; it restarts"),
                None => return,
            },
            _ = shutdown.wait() => return,
        }
    }
}

/// How bearer tokens are verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AuthMode {
    Jwks,
    Tokenreview,
}

fn fraction(name: &str, v: f64) -> Result<f64, String> {
    if v > 0.0 && v < 1.0 {
        Ok(v)
    } else {
        Err(format!(
            "{name} must be between 0 and 1 (exclusive), got {v}"
        ))
    }
}

fn rotation_policy(args: &Args) -> Result<RotationPolicy, String> {
    let p = RotationPolicy {
        root_ttl: args.root_ttl,
        intermediate_ttl: args.intermediate_ttl,
        prepare_at: fraction("--intermediate-prepare-at", args.intermediate_prepare_at)?,
        activate_at: fraction("--intermediate-activate-at", args.intermediate_activate_at)?,
        root_rotate_at: fraction("--root-rotate-at", args.root_rotate_at)?,
        activate_after: args.activate_after.unwrap_or(args.max_ttl),
        max_leaf_ttl: args.max_ttl,
        crl_validity: args.crl_validity,
        skew_margin: args.clock_skew_margin,
    };
    if p.prepare_at > p.activate_at {
        return Err(
            "--intermediate-prepare-at must not be later than --intermediate-activate-at".into(),
        );
    }
    if p.crl_validity < Duration::from_secs(60) {
        return Err("--crl-validity must be at least 1m".into());
    }
    Ok(p)
}

/// Binds the configured addresses, wires SIGTERM/Ctrl-C, and serves until stopped.
pub async fn run(args: Args) -> CmdResult {
    let listener = TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let metrics_listener = TcpListener::bind(args.metrics_listen).await.map_err(|e| {
        format!(
            "cannot listen on {} (--metrics-listen): {e}",
            args.metrics_listen
        )
    })?;
    let (trigger, shutdown) = shutdown::channel();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down: finishing in-flight requests");
        trigger.trigger();
    });
    serve(args, listener, metrics_listener, shutdown).await
}

/// Loads or creates the CA and serves on already-bound listeners until `shutdown`.
/// Tests call this with listeners on 127.0.0.1:0.
pub async fn serve(
    args: Args,
    listener: TcpListener,
    metrics_listener: TcpListener,
    shutdown: shutdown::Shutdown,
) -> CmdResult {
    if args.default_ttl > args.max_ttl {
        return Err(format!(
            "--default-ttl {} exceeds --max-ttl {}",
            duration::format(args.default_ttl),
            duration::format(args.max_ttl)
        ));
    }
    if args.default_ttl.is_zero() {
        return Err("--default-ttl must be positive".into());
    }
    {
        use super::{check_range, MAX_LIFETIME};
        let s = Duration::from_secs;
        check_range("--max-ttl", args.max_ttl, s(1), MAX_LIFETIME)?;
        check_range("--root-ttl", args.root_ttl, s(60), MAX_LIFETIME)?;
        check_range(
            "--intermediate-ttl",
            args.intermediate_ttl,
            s(30),
            MAX_LIFETIME,
        )?;
        check_range("--crl-validity", args.crl_validity, s(60), MAX_LIFETIME)?;
        check_range("--lease-duration", args.lease_duration, s(1), s(3600))?;
        check_range(
            "--reconcile-interval",
            args.reconcile_interval,
            Duration::from_millis(100),
            s(3600),
        )?;
        check_range(
            "--kube-review-max-wait",
            args.kube_review_max_wait,
            Duration::ZERO,
            s(60),
        )?;
        check_range(
            "--token-cache-ttl",
            args.token_cache_ttl,
            Duration::ZERO,
            s(86_400),
        )?;
    }
    if args.dev {
        tracing::warn!("DEV MODE: trusting the public dev JWT key from certs-dev/; anyone can mint tokens. Never use --dev in production.");
    }
    if args.plaintext {
        tracing::warn!("--plaintext: the CA port serves WITHOUT TLS; bearer tokens and certificates cross the network in clear");
    }
    let clock = clock::system();
    let ca = Ca::new();
    let metrics = Arc::new(Metrics::default());
    let kube = match args.store {
        StoreKind::File => None,
        StoreKind::Kube => Some(kube_parts(&args, &clock, &metrics, &shutdown).await?),
    };
    let store: Arc<dyn Store> = match &kube {
        Some(k) => k.store.clone(),
        None => Arc::new(FileStore::open(&args.state_dir).map_err(|e| e.to_string())?),
    };
    // The issuance index stays a per-replica file in --state-dir (see docs/kubernetes.md).
    std::fs::create_dir_all(&args.state_dir)
        .map_err(|e| format!("cannot create {}: {e}", args.state_dir.display()))?;

    // A plugged-in CA: --ca-certs-dir, or (with --store kube) the `cacerts` Secret.
    let plugged = match (&args.ca_certs_dir, &kube) {
        (Some(dir), _) => Some(
            plugged::load(dir, &args.trust_domain, clock.now())
                .map_err(|e| format!("plugged-in CA refused: {e}"))?,
        ),
        (None, Some(k)) => match cacerts_secret(&k.client, &args.namespace).await? {
            Some(src) => Some(
                plugged::load_from(&src, &args.trust_domain, clock.now())
                    .map_err(|e| format!("plugged-in CA refused: {e}"))?,
            ),
            None => None,
        },
        (None, None) => None,
    };
    let (index, scheduler) = match plugged {
        Some(s) => {
            tracing::info!(signer = %s.signing_cert().subject, revoked = s.revocations().crl_entries, "loaded plugged-in CA (rotation and revocation are managed upstream)");
            let published = async {
                store.publish_bundle(s.roots_pem()).await?;
                store.publish_crl(&s.revocations().crl_pem).await
            }
            .await;
            match (published, &kube) {
                (Ok(()), _) => {}
                // The leader's ConfigMap publisher keeps the desired state and writes it once
                // its watches are up.
                (Err(e), Some(_)) => {
                    tracing::info!(reason = %e, "bundle ConfigMaps will be published by the leader")
                }
                (Err(e), None) => return Err(format!("cannot publish the trust bundle: {e}")),
            }
            ca.install(s);
            (None, None)
        }
        None => {
            let mut opts = CaOptions::new(args.trust_domain.clone());
            opts.key_type = args.ca_key_type.parse::<KeyType>()?;
            opts.root_ttl = args.root_ttl;
            opts.intermediate_ttl = args.intermediate_ttl;
            match &kube {
                // Only the leader creates the CA; the others wait for its journal.
                Some(k) => k.wait_for_ca(store.as_ref(), &opts, clock.as_ref()).await?,
                None => {
                    bootstrap::load_or_create(store.as_ref(), &opts, clock.as_ref())
                        .await
                        .map_err(|e| e.to_string())?;
                }
            }
            let index = Arc::new(FileIndex::new(&args.state_dir));
            let live = index
                .prune(clock.now().unix_timestamp())
                .map_err(|e| e.to_string())?;
            tracing::debug!(live, "issuance index pruned");
            let mut scheduler = Scheduler::new(
                store.clone(),
                ca.clone(),
                rotation_policy(&args)?,
                clock.clone(),
                args.trust_domain.clone(),
            )
            .with_index(index.clone());
            if let Some(k) = &kube {
                scheduler = scheduler.with_leader(k.elector.subscribe());
                tokio::spawn(watch_journal(
                    k.client.clone(),
                    args.namespace.clone(),
                    scheduler.wake.clone(),
                    shutdown.clone(),
                ));
            }
            let scheduler = Arc::new(scheduler);
            // Catch up on anything that fell due while we were down, install, publish. With
            // the Kubernetes store the first passes may find the ConfigMap watches not ready.
            let mut attempts = 0;
            while let Err(e) = scheduler.step().await {
                attempts += 1;
                if kube.is_none() || attempts >= 60 {
                    return Err(e.to_string());
                }
                tracing::info!(reason = %e, "CA not fully published yet; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            (Some(index as Arc<dyn IssuanceIndex>), Some(scheduler))
        }
    };
    let signer = ca.current().ok_or("no CA was installed")?;
    tracing::info!(
        signer = %signer.signing_cert().subject,
        signer_not_after = %signer.signing_cert().not_after,
        roots = signer.roots_der().len(),
        key_type = %signer.key_kind(),
        bundle = %args.state_dir.join("root-cert.pem").display(),
        "CA ready"
    );

    let (auth, jwks_refresher) = build_auth(&args, &ca, &clock).await?;
    if let Some(r) = jwks_refresher {
        tokio::spawn(r.run(
            Duration::from_secs(300),
            Duration::from_secs(10),
            shutdown.clone(),
        ));
    }
    let tls = if args.plaintext {
        None
    } else {
        let t = TlsState::new(args.server_dns_names.clone()).map_err(|e| e.to_string())?;
        let signer = ca.current().ok_or("CA vanished")?;
        t.refresh(&signer, clock.now())
            .map_err(|e| format!("cannot issue the serving certificate: {e}"))?;
        Some(t)
    };

    tracing::info!(
        grpc = %listener.local_addr().map_err(|e| e.to_string())?,
        metrics = %metrics_listener.local_addr().map_err(|e| e.to_string())?,
        tls = !args.plaintext,
        trust_domain = %args.trust_domain,
        auth = ?auth.names(),
        "citadel serving"
    );
    let server = Server {
        ca,
        auth,
        ttl: TtlPolicy {
            default: args.default_ttl,
            max: args.max_ttl,
        },
        clock,
        metrics,
        tls,
        index: index.clone(),
        sweep: scheduler
            .as_ref()
            .map(|s| s.sweep.clone())
            .unwrap_or_default(),
        limits: crate::server::Limits {
            max_inflight: args.max_inflight as usize,
        },
    };
    if let Some(s) = scheduler {
        tokio::spawn(s.run(args.reconcile_interval, shutdown.clone()));
    }
    if let Some(index) = index {
        let (clock, sd) = (server.clock.clone(), shutdown.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(3600)) => {}
                    _ = sd.wait() => return,
                }
                if let Err(e) = index.prune(clock.now().unix_timestamp()) {
                    tracing::warn!(error = %e, "could not prune the issuance index");
                }
            }
        });
    }
    server
        .run(listener, Some(metrics_listener), shutdown)
        .await
        .map_err(|e| format!("server failed: {e}"))?;
    tracing::info!("stopped");
    Ok(())
}

pub(crate) async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM; only Ctrl-C stops the server");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
