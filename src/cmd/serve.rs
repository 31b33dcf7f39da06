//! `citadel serve`: run the CA.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::app::config::{AuthConfig, CaSource, JwksSource, KeySourceConfig, StoreConfig};
pub use crate::app::config::{AuthMode, StoreKind};
use crate::app::{Listeners, ServeConfig};
use crate::auth::tokenreview::ReviewLimits;
use crate::ca::bootstrap::CaOptions;
use crate::ca::policy::{JwtKeyPolicy, RotationPolicy, TtlPolicy};
use crate::clock::{self, SharedClock};
use crate::duration::clap_parse;
use crate::hsm::{PinSource, Pkcs11Config};
use crate::identity::TrustDomain;
use crate::pki::KeyType;
use crate::{devkeys, shutdown};

use super::CmdResult;

#[derive(Debug, clap::Args)]
#[command(after_long_help = "\
Examples:
  # Local development: a self-signed CA that trusts tokens from `citadel dev-token`.
  citadel serve --dev

  # Trust a cluster's service-account tokens (JWKS from GET /openid/v1/jwks).
  citadel serve --jwks-file jwks.json --token-issuer https://kubernetes.default.svc.cluster.local

  # Sign with a plugged-in CA in Istio's cacerts layout. Replace the files (or update the
  # mounted Secret) to swap it while serving; `citadel_ca_plugged_reload_total{result}` and
  # the log say whether the change was installed or refused.
  citadel serve --jwks-file jwks.json --ca-certs-dir /etc/cacerts --ca-certs-poll-interval 5s

  # Keep the signing intermediate's key in a PKCS#11 token (SoftHSM2 here); the PIN comes
  # from a file, never a flag (docs/operations.md, \"HSM keys (PKCS#11)\").
  citadel serve --jwks-file jwks.json --ca-key-source pkcs11 \\
    --pkcs11-module /usr/lib/softhsm/libsofthsm2.so --pkcs11-token-label citadel-ca \\
    --pkcs11-pin-file /etc/citadel/pin

  # SPIFFE federation: serve our bundle (https_spiffe) and follow b.example's endpoint,
  # authenticated the first time with its root bundle obtained out of band.
  citadel serve --trust-domain a.example --bundle-endpoint 0.0.0.0:8443 \\
    --federation-bootstrap-bundle b.example=/etc/citadel/b-roots.pem --federate-with \\
    b.example=https://b.example:8443/,spiffe://b.example/citadel/bundle-endpoint")]
/// Flags of `citadel serve`.
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

    /// Sign with a plugged-in CA: ca-cert.pem, ca-key.pem, cert-chain.pem, root-cert.pem
    /// (optional ca-crl.pem). The files are re-read while serving: a valid change is installed
    /// without a restart, a bad one is refused (logged, counted) and the old CA keeps signing.
    #[arg(long, value_name = "DIR")]
    pub ca_certs_dir: Option<PathBuf>,

    /// How often --ca-certs-dir is re-read (compared by content, so Kubernetes' symlink swaps
    /// of a mounted Secret are seen), and how often a previous root's overlap in the bundle is
    /// checked for its end (also with the `cacerts` Secret, which is watched).
    #[arg(long, default_value = "2s", value_parser = clap_parse, value_name = "DUR")]
    pub ca_certs_poll_interval: Duration,

    /// Key type of new roots and intermediates: the self-signed CA made at first start, and
    /// every authority minted after (a CertificateAuthority's spec.caKeyType wins).
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

    /// Serve each authority's current CRL over plain HTTP on ADDR, for relying parties
    /// outside the mesh: GET /crl/<authority-id>.crl (DER, application/pkix-crl; the id as
    /// `citadel ca status` shows it), GET /crl/ lists them. Every replica serves its own copy.
    #[arg(long, value_name = "ADDR")]
    pub crl_endpoint: Option<SocketAddr>,

    /// Base URL where --crl-endpoint is reachable, ending in '/' (e.g.
    /// http://citadel-crl.istio-system.svc:15015/crl/): intermediates minted from now on
    /// carry <URL><issuer id>.crl in their CRL Distribution Points extension, so a relying
    /// party finds the CRL that lists them. Existing intermediates keep theirs.
    #[arg(long, value_name = "URL", value_parser = parse_crl_url)]
    pub crl_distribution_url: Option<String>,

    /// Where CA state lives: a directory (one replica), or Secrets in --namespace (N
    /// replicas sharing one CA, with leader election on a Lease).
    #[arg(long, value_enum, default_value_t = StoreKind::File)]
    pub store: StoreKind,

    /// citadel's namespace: with --store kube its Secrets, Lease and Events live here; with
    /// --multicluster the remote clusters' Secrets.
    #[arg(long, default_value = "istio-system", value_name = "NS")]
    pub namespace: String,

    /// Leader lease duration: a new leader takes over at most this long after the old one
    /// stopped renewing (at once after a clean stop).
    #[arg(long, default_value = "15s", value_parser = clap_parse, value_name = "DUR")]
    pub lease_duration: Duration,

    /// This replica's identity in the Lease (default: hostname plus a random suffix).
    #[arg(long, env = "POD_NAME", value_name = "NAME")]
    pub pod_name: Option<String>,

    /// With --store kube: the signerName of Kubernetes PodCertificateRequests that citadel
    /// signs (each pod's SPIFFE SVID, mounted by the kubelet from a projected `podCertificate`
    /// volume); its roots are published as the ClusterTrustBundle `<name with / as :>:roots`.
    /// Pick a name under a domain you own.
    #[arg(long, default_value = crate::cluster::podcert::DEFAULT_SIGNER_NAME, value_name = "NAME")]
    pub pod_cert_signer_name: String,

    /// With --store kube: PodCertificateRequests decided at once by the leader.
    #[arg(long, default_value_t = 32, value_name = "N")]
    pub pod_cert_workers: u16,

    /// With --store kube: undecided PodCertificateRequests the leader holds in memory at most
    /// (the rest wait in the API server and are listed again when there is room).
    #[arg(long, default_value_t = crate::cluster::podcert::DEFAULT_MAX_PENDING, value_name = "N")]
    pub pod_cert_max_pending: usize,

    /// Do not sign PodCertificateRequests nor publish a ClusterTrustBundle (with --store kube,
    /// both are on by default).
    #[arg(long)]
    pub no_pod_certificates: bool,

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

    /// Open connections to the CA port at once, counting those still in their TLS handshake
    /// (which is cut off after 10s); a connection beyond it is closed at once.
    #[arg(long, default_value_t = 10_000, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_connections: u32,

    /// Failed authentications one peer address may make in a row before its requests are
    /// refused unread (ResourceExhausted, with the wait in the message); 0 turns this off.
    /// Successful calls cost nothing. Counted in citadel_auth_throttled_total.
    #[arg(long, default_value_t = 20, value_name = "N")]
    pub auth_failure_burst: u32,

    /// Failures per second a throttled peer earns back (0.5: one every 2 seconds).
    #[arg(long, default_value_t = 0.5, value_name = "PER_SEC")]
    pub auth_failure_rate: f64,

    /// How often the scheduler reloads state (picks up `citadel revoke` and
    /// `citadel ca rotate-root`) and runs what is due.
    #[arg(long, default_value = "1s", value_parser = clap_parse, value_name = "DUR")]
    pub reconcile_interval: Duration,

    /// Clock skew tolerated between the CA and validating peers: retiring a CA waits this
    /// long past the notAfter of its last leaf.
    #[arg(long, default_value = "2m", value_parser = clap_parse, value_name = "DUR")]
    pub clock_skew_margin: Duration,

    /// Ambient mode: a service account (NAMESPACE/NAME, e.g. istio-system/ztunnel) whose pods
    /// may ask for the certificate of any workload with a pod on their own node, naming it in
    /// the ImpersonatedIdentity metadata. Repeat, or give a comma-separated list (also read
    /// from CA_TRUSTED_NODE_ACCOUNTS, as istiod). Needs a cluster (--store kube, --auth
    /// tokenreview or --jwks-from-cluster): citadel watches all pods (RBAC: pods list/watch).
    /// Unset: impersonation is refused.
    #[arg(long = "trusted-node-accounts", env = "CA_TRUSTED_NODE_ACCOUNTS", value_delimiter = ',',
          value_name = "NS/SA", value_parser = parse_node_account)]
    pub trusted_node_accounts: Vec<String>,

    /// SPIFFE Broker API (`spiffe.broker.API` on this port): the SPIFFE ID of a broker (a
    /// node-local component, e.g. a CSI driver or node proxy, that fetches the SVIDs of pods on
    /// its node), exactly, `spiffe://<td>/ns/<ns>/sa/<sa>`. Repeat, or give a comma-separated
    /// list. A broker calls with its X509-SVID as the TLS client certificate, the metadata
    /// `broker.spiffe.io: true`, and its pod-bound token as `authorization: Bearer` (the token
    /// ties it to its node); it gets SVIDs only for pods on that node. Needs a cluster (the
    /// pod index, as --trusted-node-accounts). Unset: the Broker API is not served.
    /// docs/spiffe.md, "Broker API".
    #[arg(long = "broker-ids", value_delimiter = ',', value_name = "SPIFFE_ID")]
    pub broker_ids: Vec<String>,

    /// Ambient mode: how long node impersonation keeps trusting the last known pods after
    /// the pod watch broke (API server down or unreachable). Past it, impersonation requests
    /// get Unavailable (ztunnel retries) until the watch has relisted every pod, so a pod
    /// deleted or moved during an outage cannot vouch for its node meanwhile.
    #[arg(long, default_value = "1m", value_parser = clap_parse, value_name = "DUR")]
    pub pod_index_max_staleness: Duration,

    /// This cluster's name, as workloads send it in the `clusterid` header
    /// (ISTIO_META_CLUSTER_ID). A token whose request names another cluster is refused
    /// (Unauthenticated, naming it); an absent header means this cluster.
    #[arg(
        long,
        env = "CLUSTER_ID",
        default_value = "Kubernetes",
        value_name = "ID"
    )]
    pub cluster_id: String,

    /// Multicluster, as istiod: accept tokens of the remote clusters named by Secrets in
    /// --namespace labelled istio/multiCluster=true (each key a cluster id, each value its
    /// kubeconfig, as `istioctl create-remote-secret` writes them), watched and hot-reloaded.
    /// A request's `clusterid` header picks the cluster whose TokenReview checks its token.
    /// Needs --auth tokenreview, and RBAC: secrets list/watch in --namespace
    /// (deploy/multicluster.yaml). Kubeconfigs that run commands, read local files or set
    /// insecure-skip-tls-verify are refused; a cluster id claimed by two Secrets is refused
    /// (naming both) unless one of them was already serving it. With
    /// --trusted-node-accounts each remote cluster also gets its own pod watch.
    #[arg(long)]
    pub multicluster: bool,

    /// Open connections one peer may hold on the CA port (handshakes included); beyond it its
    /// connection is closed at once, so one client cannot take every --max-connections slot.
    /// A peer is an IPv4 address or an IPv6 /64. Refusals are counted in
    /// citadel_connections_refused_total{reason} and logged at most once per 10s.
    #[arg(long, default_value_t = 128, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_connections_per_peer: u32,

    /// A CA connection with no call in progress for this long is closed (agents reconnect
    /// for their next renewal); 0 keeps idle connections open.
    #[arg(long, default_value = "5m", value_parser = clap_parse, value_name = "DUR")]
    pub idle_timeout: Duration,

    /// A connection whose TLS handshake is not complete this long after it was accepted is
    /// closed.
    #[arg(long, default_value = "10s", value_parser = clap_parse, value_name = "DUR")]
    pub handshake_timeout: Duration,

    /// A source network (ADDR/PREFIX, e.g. the east-west gateway's or an SNAT address) exempt
    /// from the per-peer limits: the failed-authentication throttle (--auth-failure-burst) and
    /// --max-connections-per-peer. The global limits still apply. Repeat for several.
    #[arg(long = "throttle-exempt-cidr", value_name = "CIDR")]
    pub throttle_exempt_cidrs: Vec<crate::server::peer::Cidr>,

    /// With --store kube: the CertificateAuthority resource (citadel.dev/v1alpha1, kubectl
    /// get ca) in --namespace. Each policy field its spec sets wins over the flag here; unset
    /// ones keep the flag (the start-up log says which source each setting came from). The
    /// leader keeps its status and acts on spec.rootRotation.request. Without the resource
    /// (or its CRD), the flags alone apply.
    #[arg(long, default_value = "citadel", value_name = "NAME")]
    pub ca_resource: String,

    /// The longest workload TTL (defaultWorkloadTtl, maxWorkloadTtl) the CertificateAuthority
    /// resource's spec may set; a spec above it is refused (condition Degraded/InvalidSpec
    /// naming the field and the cap). Flags are not capped. The spec's other maxima are fixed:
    /// intermediateTtl 1825d, rootTtl 7300d, crlValidity 7d (docs/operations.md).
    #[arg(long, default_value = "90d", value_parser = clap_parse, value_name = "DUR")]
    pub ca_resource_max_workload_ttl: Duration,

    /// With --store kube: sign Kubernetes CertificateSigningRequests (certificates.k8s.io/v1)
    /// whose spec.signerName is NAME, as istiod in RA mode creates them
    /// (EXTERNAL_CA=ISTIOD_RA_KUBERNETES_API, K8S_SIGNER=NAME; with CERT_SIGNER_DOMAIN, a
    /// proxy's CertSigner metadata picks <domain>/<name>). NAME alone is served by citadel's
    /// own CA; NAME=DIR by the plugged-in CA in DIR (Istio's cacerts layout, checked at
    /// start). Repeat for several. Only Approved CSRs are signed; see docs/istio-ra.md.
    #[arg(long = "csr-signer", value_name = "NAME[=DIR]")]
    pub csr_signers: Vec<crate::cluster::csrsigner::SignerRoute>,

    /// With --csr-signer: a requester (Kubernetes username) that may ask for ANY identity of
    /// the trust domain, as istiod does for the proxies it authenticated. Every other
    /// service account gets its own identity only. Repeat for several.
    #[arg(long = "csr-istiod-requester", value_name = "USER",
          default_value = crate::cluster::csrsigner::DEFAULT_ISTIOD_REQUESTER)]
    pub csr_istiod_requesters: Vec<String>,

    /// With --csr-signer: approve the CSRs of this requester (Kubernetes username) for our
    /// signer names (needs RBAC verb `approve` on them). Without it citadel never approves;
    /// istiod approves its own. Repeat for several.
    #[arg(long = "csr-auto-approve", value_name = "USER")]
    pub csr_auto_approve: Vec<String>,

    /// With --csr-signer: CSRs decided at once by the leader.
    #[arg(long, default_value_t = 32, value_name = "N")]
    pub csr_workers: u16,

    /// With --csr-signer: undecided CSRs of our signers held in memory at most (the rest wait
    /// in the API server and are listed again when there is room).
    #[arg(long, default_value_t = crate::cluster::podcert::DEFAULT_MAX_PENDING, value_name = "N")]
    pub csr_max_pending: usize,

    /// With --csr-signer: the Secret in --namespace whose root-cert.pem the leader keeps equal
    /// to the roots of every CA a signer name maps to: what istiod verifies answers against
    /// (mount it into istiod at /etc/external-ca-cert; docs/istio-ra.md). Empty: none.
    #[arg(long, default_value = crate::cluster::csrsigner::DEFAULT_ROOT_SECRET, value_name = "NAME")]
    pub csr_root_secret: String,

    /// Where new CA keys are generated and held: `software` (PKCS#8 in the CA journal) or
    /// `pkcs11` (generated inside a PKCS#11 token, never extractable; every CA signature is
    /// made there and the journal records only each key's label and public key). Needs
    /// --pkcs11-module, --pkcs11-token-label and --pkcs11-pin-file or --pkcs11-pin-env.
    /// Existing software keys keep signing until rotation replaces them.
    #[arg(long, default_value = "software", value_name = "SOURCE",
          value_parser = ["software", "pkcs11"])]
    pub ca_key_source: String,

    /// The PKCS#11 module (shared library), e.g. /usr/lib/softhsm/libsofthsm2.so.
    #[arg(long, value_name = "FILE")]
    pub pkcs11_module: Option<PathBuf>,

    /// The label of the PKCS#11 token holding the CA keys.
    #[arg(long, value_name = "LABEL")]
    pub pkcs11_token_label: Option<String>,

    /// A file holding the token's user PIN (re-read at each reconnect). The PIN is never a
    /// flag value: process listings show those.
    #[arg(long, value_name = "FILE", conflicts_with = "pkcs11_pin_env")]
    pub pkcs11_pin_file: Option<PathBuf>,

    /// An environment variable holding the token's user PIN.
    #[arg(long, value_name = "VAR")]
    pub pkcs11_pin_env: Option<String>,

    /// Labels of keys generated in the token: `<prefix>-intermediate-<id>`,
    /// `<prefix>-root-<id>` (id: the certificate serial, hex).
    #[arg(long, default_value = "citadel", value_name = "PREFIX")]
    pub pkcs11_key_label_prefix: String,

    /// Which new keys go into the token: `intermediate` (the signing intermediates; roots stay
    /// software keys, e.g. for an offline copy) or `all` (roots too).
    #[arg(long, default_value = "intermediate", value_name = "WHICH",
          value_parser = ["intermediate", "all"])]
    pub pkcs11_keys: String,

    /// The most PKCS#11 sessions to open for signing. Default: the token's own limit, at most
    /// 16.
    #[arg(long, value_name = "N")]
    pub pkcs11_max_sessions: Option<usize>,

    /// Lifetime of each JWT-SVID (`exp - iat`) signed by citadel.v1.JwtSvidService; at most
    /// 24h (SPIFFE recommends short JWT-SVIDs: they are bearer tokens).
    #[arg(long, default_value = "5m", value_parser = clap_parse, value_name = "DUR")]
    pub jwt_svid_ttl: Duration,

    /// Planned life of each JWT-SVID signing key: its successor is prepared (and published
    /// in the JWT bundle) at 1/2 of it and signs from 5/6, once published for 5 refresh hints.
    #[arg(long, default_value = "30d", value_parser = clap_parse, value_name = "DUR")]
    pub jwt_key_ttl: Duration,

    /// The JWT bundle's `spiffe_refresh_hint`: how often relying parties should fetch it. A
    /// new JWT key signs no earlier than 5 hints after its bundle was published.
    #[arg(long, default_value = "5m", value_parser = clap_parse, value_name = "DUR")]
    pub jwt_bundle_refresh_hint: Duration,

    /// Serve Linkerd's identity protocol (io.linkerd.proxy.identity.Identity/Certify) on the CA
    /// port for this identity domain (Linkerd's identityTrustDomain, e.g. cluster.local):
    /// tokens are reviewed by the API server with audience identity.l5d.io, and workloads get
    /// <sa>.<ns>.serviceaccount.identity.<control-plane-ns>.<DOMAIN>. With --store kube the
    /// trust anchors are published as Linkerd reads them (docs/linkerd.md). Off by default.
    #[arg(long, value_name = "DOMAIN")]
    pub linkerd_identity_domain: Option<String>,

    /// Linkerd's control-plane namespace: part of every Linkerd identity, of the CA port's
    /// Linkerd serving name, and where the linkerd-identity-trust-roots ConfigMap is written.
    #[arg(long, default_value = "linkerd", value_name = "NS")]
    pub linkerd_control_plane_namespace: String,

    /// Also put the workload's SPIFFE ID (a URI SAN) in Linkerd leaves, so one workload is
    /// known to both meshes.
    #[arg(long)]
    pub linkerd_spiffe_san: bool,

    /// Serve this trust domain's SPIFFE bundle (a JWK Set: one x509-svid key per root, the
    /// jwt-svid keys, spiffe_sequence, spiffe_refresh_hint) by HTTPS GET on ADDR, for other
    /// trust domains to federate with (docs/spiffe.md, "Federation"). Profile https_spiffe
    /// unless --bundle-endpoint-cert is given. Needs citadel's own CA (not --ca-certs-dir).
    #[arg(long, value_name = "ADDR", help_heading = "SPIFFE federation")]
    pub bundle_endpoint: Option<SocketAddr>,

    /// https_spiffe: the SPIFFE ID of the X.509-SVID the bundle endpoint presents, issued by
    /// this CA and renewed at half-life [default: spiffe://<trust-domain>/citadel/bundle-endpoint].
    /// Federated clients are configured with it.
    #[arg(long, value_name = "SPIFFE_ID", help_heading = "SPIFFE federation")]
    pub bundle_endpoint_spiffe_id: Option<String>,

    /// https_web: serve the bundle endpoint with this PEM certificate chain (e.g. from a
    /// public CA) instead of an SVID; with --bundle-endpoint-key.
    #[arg(
        long,
        value_name = "FILE",
        requires = "bundle_endpoint_key",
        help_heading = "SPIFFE federation"
    )]
    pub bundle_endpoint_cert: Option<PathBuf>,

    /// https_web: the private key (PEM) of --bundle-endpoint-cert.
    #[arg(
        long,
        value_name = "FILE",
        requires = "bundle_endpoint_cert",
        help_heading = "SPIFFE federation"
    )]
    pub bundle_endpoint_key: Option<PathBuf>,

    /// Follow another trust domain's bundle endpoint (repeatable): TD=URL for https_web
    /// (verified against --federation-web-roots), TD=URL,SPIFFE_ID for https_spiffe (the
    /// endpoint must present that SPIFFE ID; first authenticated with
    /// --federation-bootstrap-bundle). Polled at its spiffe_refresh_hint (5m without one);
    /// a refused bundle keeps the last good one, which is kept in <state-dir>/federation/.
    /// Never merged into our trust bundle.
    #[arg(
        long = "federate-with",
        value_name = "TD=URL[,SPIFFE_ID]",
        help_heading = "SPIFFE federation"
    )]
    pub federate_with: Vec<String>,

    /// The bundle that authenticates TD's https_spiffe endpoint until its first fetch
    /// (repeatable): PEM root certificates or a SPIFFE bundle document, obtained out of band
    /// (e.g. `citadel ca bundle` there).
    #[arg(
        long = "federation-bootstrap-bundle",
        value_name = "TD=FILE",
        help_heading = "SPIFFE federation"
    )]
    pub federation_bootstrap_bundles: Vec<String>,

    /// PEM root CAs that https_web bundle endpoints' certificates must chain to.
    #[arg(long, value_name = "FILE", help_heading = "SPIFFE federation")]
    pub federation_web_roots: Option<PathBuf>,
}

/// Checks one `--trusted-node-accounts` entry at parse time, so a typo stops the start with
/// the entry named (istiod only logs and skips it).
fn parse_node_account(s: &str) -> Result<String, String> {
    let s = s.trim();
    if !s.is_empty() {
        crate::auth::node::parse_account(s)?;
    }
    Ok(s.to_string())
}

impl Args {
    /// The flags as a validated configuration.
    pub fn into_config(self) -> Result<ServeConfig, String> {
        let store = match self.store {
            StoreKind::File => StoreConfig::File,
            StoreKind::Kube => StoreConfig::Kube {
                namespace: self.namespace.clone(),
                lease_duration: self.lease_duration,
                identity: self.pod_name.clone(),
            },
        };
        let auth = match self.auth {
            AuthMode::Tokenreview => AuthConfig::TokenReview {
                audiences: self.token_audiences.clone(),
                cache_ttl: self.token_cache_ttl,
                limits: ReviewLimits {
                    qps: self.kube_qps,
                    burst: self.kube_burst,
                    max_wait: self.kube_review_max_wait,
                },
            },
            AuthMode::Jwks => {
                let (source, issuer) =
                    match (&self.jwks_file, self.jwks_from_cluster, self.dev) {
                        (Some(path), _, _) => {
                            (JwksSource::File(path.clone()), self.token_issuer.clone())
                        }
                        (None, true, _) => (JwksSource::Cluster, self.token_issuer.clone()),
                        (None, false, true) => (
                            JwksSource::Dev,
                            Some(
                                self.token_issuer
                                    .clone()
                                    .unwrap_or_else(|| devkeys::DEV_ISSUER.to_string()),
                            ),
                        ),
                        (None, false, false) => return Err(
                            "no way to verify service-account tokens: pass --jwks-file FILE (the \
                             JSON a cluster serves at /openid/v1/jwks), --jwks-from-cluster, \
                             --auth tokenreview, or --dev for local development"
                                .into(),
                        ),
                    };
                AuthConfig::Jwks {
                    source,
                    issuer,
                    audiences: self.token_audiences.clone(),
                }
            }
        };
        let ca = match &self.ca_certs_dir {
            Some(dir) => CaSource::Plugged(dir.clone()),
            None => {
                let mut o = CaOptions::new(self.trust_domain.clone());
                o.key_type = self.ca_key_type.parse::<KeyType>()?;
                o.root_ttl = self.root_ttl;
                o.intermediate_ttl = self.intermediate_ttl;
                o.crl_distribution_url = self.crl_distribution_url.clone();
                CaSource::Own(o)
            }
        };
        let key_source = self.key_source()?;
        let broker_ids =
            crate::auth::broker::BrokerIds::parse(&self.broker_ids, &self.trust_domain)?;
        let linkerd = match &self.linkerd_identity_domain {
            None => None,
            Some(domain) => Some(crate::app::config::LinkerdConfig {
                names: crate::identity::LinkerdNames::new(
                    &self.linkerd_control_plane_namespace,
                    domain,
                )
                .map_err(|e| format!("--linkerd-identity-domain: {e}"))?,
                spiffe_san: self.linkerd_spiffe_san,
                cache_ttl: self.token_cache_ttl,
                limits: ReviewLimits {
                    qps: self.kube_qps,
                    burst: self.kube_burst,
                    max_wait: self.kube_review_max_wait,
                },
            }),
        };
        let federation = self.federation()?;
        // Linkerd's proxies expect the CA port to present the identity service's own name.
        let mut tls_names = self.server_dns_names;
        if let Some(l) = &linkerd {
            tls_names.push(l.names.service_name());
        }
        let config = ServeConfig {
            dev: self.dev,
            state_dir: self.state_dir,
            trust_domain: self.trust_domain,
            store,
            auth,
            ca,
            ttl: TtlPolicy {
                default: self.default_ttl,
                max: self.max_ttl,
            },
            rotation: RotationPolicy {
                root_ttl: self.root_ttl,
                intermediate_ttl: self.intermediate_ttl,
                prepare_at: self.intermediate_prepare_at,
                activate_at: self.intermediate_activate_at,
                root_rotate_at: self.root_rotate_at,
                activate_after: self.activate_after.unwrap_or(self.max_ttl),
                max_leaf_ttl: self.max_ttl,
                crl_validity: self.crl_validity,
                skew_margin: self.clock_skew_margin,
                jwt: JwtKeyPolicy {
                    key_ttl: self.jwt_key_ttl,
                    svid_ttl: self.jwt_svid_ttl,
                    refresh_hint: self.jwt_bundle_refresh_hint,
                    ..JwtKeyPolicy::default()
                },
                // Read from the policy's key type (`LivePolicy::rotation`).
                new_key_type: None,
                crl_distribution_url: self.crl_distribution_url.clone(),
            },
            tls_names: (!self.plaintext).then_some(tls_names),
            reconcile_interval: self.reconcile_interval,
            plugged_poll: self.ca_certs_poll_interval,
            limits: crate::server::Limits {
                max_inflight: self.max_inflight as usize,
                max_connections: self.max_connections as usize,
                auth_throttle: crate::server::throttle::ThrottlePolicy {
                    burst: self.auth_failure_burst,
                    per_second: self.auth_failure_rate,
                },
                max_connections_per_peer: self.max_connections_per_peer as usize,
                idle_timeout: self.idle_timeout,
                handshake_timeout: self.handshake_timeout,
                exempt: crate::server::peer::PeerSet::new(self.throttle_exempt_cidrs.clone()),
            },
            kubeconfig: self.kubeconfig,
            trusted_node_accounts: crate::auth::node::TrustedNodeAccounts::parse(
                &self.trusted_node_accounts,
            )?,
            broker_ids,
            pod_index_max_staleness: self.pod_index_max_staleness,
            cluster_id: self.cluster_id,
            ca_resource: self.ca_resource,
            ca_resource_caps: crate::cluster::ca_resource::SpecCaps {
                workload_ttl: self.ca_resource_max_workload_ttl,
            },
            activate_after_explicit: self.activate_after.is_some(),
            remote_secrets_namespace: self.multicluster.then(|| self.namespace.clone()),
            pod_certificates: (self.store == StoreKind::Kube && !self.no_pod_certificates).then(
                || crate::app::config::PodCertConfig {
                    signer_name: self.pod_cert_signer_name.clone(),
                    workers: self.pod_cert_workers,
                    max_pending: self.pod_cert_max_pending,
                },
            ),
            csr_signer: (!self.csr_signers.is_empty()).then(|| {
                crate::app::config::CsrSignerConfig {
                    signers: self.csr_signers.clone(),
                    istiod_requesters: self.csr_istiod_requesters.clone(),
                    auto_approve: self.csr_auto_approve.clone(),
                    workers: self.csr_workers,
                    max_pending: self.csr_max_pending,
                    root_secret: (!self.csr_root_secret.is_empty())
                        .then(|| self.csr_root_secret.clone()),
                }
            }),
            key_source,
            linkerd,
            federation,
        };
        config.validate()?;
        Ok(config)
    }
}

impl Args {
    /// `--bundle-endpoint*` and `--federate-with` / `--federation-*`.
    fn federation(&self) -> Result<crate::server::federation::FederationConfig, String> {
        use crate::server::federation::{endpoint, EndpointConfig, EndpointProfile, Peer};
        let endpoint = match self.bundle_endpoint {
            None => {
                if self.bundle_endpoint_spiffe_id.is_some() || self.bundle_endpoint_cert.is_some() {
                    return Err("--bundle-endpoint-spiffe-id and --bundle-endpoint-cert need --bundle-endpoint ADDR".into());
                }
                None
            }
            Some(listen) => {
                let profile = match (&self.bundle_endpoint_cert, &self.bundle_endpoint_key) {
                    (Some(cert), Some(key)) => {
                        if self.bundle_endpoint_spiffe_id.is_some() {
                            return Err("--bundle-endpoint-spiffe-id is for https_spiffe; --bundle-endpoint-cert selects https_web: give one".into());
                        }
                        EndpointProfile::Web {
                            cert: cert.clone(),
                            key: key.clone(),
                        }
                    }
                    _ => {
                        let id = self
                            .bundle_endpoint_spiffe_id
                            .clone()
                            .unwrap_or_else(|| endpoint::default_id(&self.trust_domain));
                        let id = crate::identity::SpiffeId::parse(&id)
                            .map_err(|e| format!("--bundle-endpoint-spiffe-id {id}: {e}"))?;
                        if id.trust_domain() != &self.trust_domain {
                            return Err(format!("--bundle-endpoint-spiffe-id {id}: must be in this trust domain ({})", self.trust_domain.as_str()));
                        }
                        EndpointProfile::Spiffe { id }
                    }
                };
                Some(EndpointConfig { listen, profile })
            }
        };
        let mut bootstrap = std::collections::BTreeMap::new();
        for b in &self.federation_bootstrap_bundles {
            let (td, file) = b
                .split_once('=')
                .ok_or_else(|| format!("--federation-bootstrap-bundle {b:?}: expected TD=FILE"))?;
            bootstrap.insert(td.to_string(), PathBuf::from(file));
        }
        let mut peers: Vec<Peer> = Vec::new();
        for f in &self.federate_with {
            let p = Peer::parse(f, &bootstrap, self.federation_web_roots.as_ref())?;
            if p.trust_domain == self.trust_domain {
                return Err(format!("--federate-with {f:?}: that is our own trust domain; federation is with other trust domains"));
            }
            if peers.iter().any(|q| q.trust_domain == p.trust_domain) {
                return Err(format!(
                    "--federate-with {f:?}: {} is given twice",
                    p.trust_domain.as_str()
                ));
            }
            peers.push(p);
        }
        for td in bootstrap.keys() {
            if !peers.iter().any(|p| p.trust_domain.as_str() == td) {
                return Err(format!(
                    "--federation-bootstrap-bundle {td}=...: no --federate-with for {td}"
                ));
            }
        }
        Ok(crate::server::federation::FederationConfig { endpoint, peers })
    }

    /// `--ca-key-source` and the `--pkcs11-*` flags, each missing one named.
    fn key_source(&self) -> Result<KeySourceConfig, String> {
        if self.ca_key_source != "pkcs11" {
            let set = [
                self.pkcs11_module.is_some(),
                self.pkcs11_token_label.is_some(),
                self.pkcs11_pin_file.is_some(),
                self.pkcs11_pin_env.is_some(),
            ];
            if set.into_iter().any(|s| s) {
                return Err("the --pkcs11-* flags need --ca-key-source pkcs11".into());
            }
            return Ok(KeySourceConfig::Software);
        }
        let module = self
            .pkcs11_module
            .clone()
            .ok_or("--ca-key-source pkcs11 needs --pkcs11-module (the module's .so)")?;
        let token_label = self
            .pkcs11_token_label
            .clone()
            .ok_or("--ca-key-source pkcs11 needs --pkcs11-token-label")?;
        let pin = match (&self.pkcs11_pin_file, &self.pkcs11_pin_env) {
            (Some(f), None) => PinSource::File(f.clone()),
            (None, Some(v)) => PinSource::Env(v.clone()),
            _ => return Err("--ca-key-source pkcs11 needs the PIN from --pkcs11-pin-file or --pkcs11-pin-env (never a flag value)".into()),
        };
        if self.pkcs11_max_sessions == Some(0) {
            return Err("--pkcs11-max-sessions must be at least 1".into());
        }
        Ok(KeySourceConfig::Pkcs11 {
            token: Pkcs11Config {
                module,
                token_label,
                pin,
                max_sessions: self.pkcs11_max_sessions,
            },
            label_prefix: self.pkcs11_key_label_prefix.clone(),
            roots_in_token: self.pkcs11_keys == "all",
        })
    }
}

/// `--crl-distribution-url`: an http(s) URL ending in '/', under which `<id>.crl` is appended.
fn parse_crl_url(s: &str) -> Result<String, String> {
    let scheme_ok = s.starts_with("http://") || s.starts_with("https://");
    if !scheme_ok
        || !s.ends_with('/')
        || s.len() > 512
        || s.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(format!(
            "{s:?} is not a CRL base URL: give an http:// URL ending in '/' (at most 512 characters), e.g. http://citadel-crl.istio-system.svc:15015/crl/"
        ));
    }
    Ok(s.to_string())
}

/// Binds the configured addresses, wires SIGTERM/Ctrl-C, and serves until stopped.
pub async fn run(args: Args) -> CmdResult {
    let grpc = TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let metrics = TcpListener::bind(args.metrics_listen).await.map_err(|e| {
        format!(
            "cannot listen on {} (--metrics-listen): {e}",
            args.metrics_listen
        )
    })?;
    let (trigger, shutdown) = shutdown::channel();
    tokio::spawn(async move {
        shutdown::signalled().await;
        tracing::info!("shutting down: finishing in-flight requests");
        trigger.trigger();
    });
    serve(args, grpc, metrics, shutdown).await
}

/// Serves on already-bound listeners until `shutdown`, on the system clock.
pub async fn serve(
    args: Args,
    grpc: TcpListener,
    metrics: TcpListener,
    shutdown: shutdown::Shutdown,
) -> CmdResult {
    serve_with_clock(args, grpc, metrics, clock::system(), shutdown).await
}

/// The same on any clock: tests pass a `ManualClock` and move time.
pub async fn serve_with_clock(
    args: Args,
    grpc: TcpListener,
    metrics: TcpListener,
    clock: SharedClock,
    shutdown: shutdown::Shutdown,
) -> CmdResult {
    let crl = match args.crl_endpoint {
        None => None,
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|e| format!("cannot listen on {addr} (--crl-endpoint): {e}"))?,
        ),
    };
    crate::app::run(
        args.into_config()?,
        Listeners { grpc, metrics, crl },
        clock,
        shutdown,
    )
    .await
}
