//! What `citadel serve` runs with: a configuration whose invalid combinations cannot be
//! written (a plugged-in CA has no key type to choose, a JWKS source is one of three, TLS is
//! a list of names or absent), validated once by [`ServeConfig::validate`].
//!
//! Flags are turned into this in `cmd::serve`; tests build it the same way, or directly.

use std::path::PathBuf;
use std::time::Duration;

use crate::auth::node::TrustedNodeAccounts;
use crate::auth::tokenreview::ReviewLimits;
use crate::ca::bootstrap::CaOptions;
use crate::ca::policy::{CaPolicy, RotationPolicy, TtlPolicy};
pub use crate::cluster::csrsigner::CsrSignerConfig;
pub use crate::cluster::podcert::PodCertConfig;
use crate::duration;
use crate::identity::TrustDomain;
use crate::server::Limits;

/// The longest lifetime any setting may ask for: beyond it, times leave the representable
/// range.
pub const MAX_LIFETIME: Duration = Duration::from_secs(100 * 365 * 86_400);

/// Where CA state lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StoreKind {
    /// A directory (--state-dir): one replica.
    File,
    /// Secrets in --namespace: N replicas with leader election.
    Kube,
}

/// How bearer tokens are verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AuthMode {
    /// Locally, against a JWKS: no API call per request.
    Jwks,
    /// By the API server, with a TokenReview (cached per token).
    Tokenreview,
}

/// Where CA state lives, and what that needs.
#[derive(Debug, Clone, PartialEq)]
pub enum StoreConfig {
    /// `ca-journal.json` and friends in the state directory.
    File,
    /// Secrets in `namespace`, with leader election on a Lease.
    Kube {
        /// citadel's own namespace: its Secrets, Lease and Events.
        namespace: String,
        /// How long a leader's lease lasts without renewal.
        lease_duration: Duration,
        /// This replica's name in the Lease; `None` derives one from the hostname.
        identity: Option<String>,
    },
}

/// Where the keys that verify service-account tokens come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwksSource {
    /// A JWKS file (what a cluster serves at /openid/v1/jwks).
    File(PathBuf),
    /// The public dev key compiled in from certs-dev/ (`--dev`).
    Dev,
    /// The cluster's discovery document and JWKS, refreshed in the background.
    Cluster,
}

/// How bearer tokens are checked (client certificates are always tried first).
#[derive(Debug, Clone)]
pub enum AuthConfig {
    /// Verified locally against a key set.
    Jwks {
        /// The keys.
        source: JwksSource,
        /// Required `iss`; `None` accepts any issuer whose key is in the set.
        issuer: Option<String>,
        /// Accepted audiences.
        audiences: Vec<String>,
    },
    /// Reviewed by the API server.
    TokenReview {
        /// Audiences sent with each review and required in its answer.
        audiences: Vec<String>,
        /// How long a positive review is reused for the same token.
        cache_ttl: Duration,
        /// Rate, burst and longest wait for reviews.
        limits: ReviewLimits,
    },
}

/// Which CA signs.
#[derive(Debug, Clone)]
pub enum CaSource {
    /// citadel's own self-signed CA, created on first start and rotated by the scheduler.
    /// (With the Kubernetes store, a `cacerts` Secret found at start takes precedence.)
    Own(CaOptions),
    /// A plugged-in CA in Istio's cacerts layout; rotated and revoked upstream.
    Plugged(PathBuf),
}

/// Everything `app::serve::run` needs besides listeners, a clock and a shutdown signal.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Development mode (trusts the public dev key); logged loudly.
    pub dev: bool,
    /// The state directory: the file store, the issuance index, the published bundle.
    pub state_dir: PathBuf,
    /// The SPIFFE trust domain of issued identities.
    pub trust_domain: TrustDomain,
    /// Where the journal lives.
    pub store: StoreConfig,
    /// How tokens are checked.
    pub auth: AuthConfig,
    /// Which CA signs.
    pub ca: CaSource,
    /// Workload certificate lifetimes.
    pub ttl: TtlPolicy,
    /// Rotation and CRL timing.
    pub rotation: RotationPolicy,
    /// Names and IPs of the serving certificate; `None` serves plaintext.
    pub tls_names: Option<Vec<String>>,
    /// How often the scheduler reloads state and runs what is due.
    pub reconcile_interval: Duration,
    /// How often a `--ca-certs-dir` is re-read, and a plugged-in CA's root overlap checked.
    pub plugged_poll: Duration,
    /// Limits on the CA port.
    pub limits: Limits,
    /// kubeconfig for the API server (store, TokenReview, JWKS); `None` infers one.
    pub kubeconfig: Option<PathBuf>,
    /// Service accounts that may ask for the certificates of workloads on their node (ztunnel);
    /// empty refuses impersonation. Needs a cluster: the pod index watches its pods.
    pub trusted_node_accounts: TrustedNodeAccounts,
    /// Who may use the SPIFFE Broker API on the CA port (`--broker-ids`); empty: not served.
    /// Needs a cluster, like impersonation: the same pod index ties brokers to nodes.
    pub broker_ids: crate::auth::broker::BrokerIds,
    /// How long after the pod watch broke impersonation is still judged on the last known
    /// pods (`--pod-index-max-staleness`); past it, Unavailable until a relist.
    pub pod_index_max_staleness: Duration,
    /// This cluster's name in the `clusterid` header (`--cluster-id`); tokens that say they
    /// come from another cluster are refused.
    pub cluster_id: String,
    /// `--multicluster`: the namespace whose Secrets labelled `istio/multiCluster: "true"`
    /// name the remote clusters (ids and kubeconfigs) whose tokens are accepted; `None` knows
    /// only the local cluster.
    pub remote_secrets_namespace: Option<String>,
    /// `--ca-resource`: the CertificateAuthority resource in the CA namespace whose spec
    /// overrides the policy flags and whose status the leader keeps (`--store kube` only).
    pub ca_resource: String,
    /// What that resource's spec may set at most (`--ca-resource-max-workload-ttl`).
    pub ca_resource_caps: crate::cluster::ca_resource::SpecCaps,
    /// `--activate-after` was given; otherwise it follows the (possibly spec-set) max TTL.
    pub activate_after_explicit: bool,
    /// The Pod Certificates signer and its ClusterTrustBundle (`--store kube` only); `None`
    /// signs no PodCertificateRequests.
    pub pod_certificates: Option<PodCertConfig>,
    /// The Kubernetes CSR signer (`--csr-signer`, `--store kube` only); `None` signs no
    /// CertificateSigningRequests.
    pub csr_signer: Option<CsrSignerConfig>,
    /// Where new CA keys are generated and held (`--ca-key-source`).
    pub key_source: KeySourceConfig,
    /// Linkerd's Certify on the CA port (`--linkerd-identity-domain`); `None` does not serve it.
    pub linkerd: Option<LinkerdConfig>,
    /// The SPIFFE bundle endpoint and the trust domains we federate with
    /// (`--bundle-endpoint`, `--federate-with`); the default serves and follows nothing.
    pub federation: crate::server::federation::FederationConfig,
}

/// Where new CA keys are generated and held.
#[derive(Debug, Clone, Default)]
pub enum KeySourceConfig {
    /// In memory, stored (PKCS#8) in the journal: the default.
    #[default]
    Software,
    /// Inside a PKCS#11 token; the journal records each key's label and public key.
    Pkcs11 {
        /// Module, token, PIN source, sessions.
        token: crate::hsm::Pkcs11Config,
        /// Key labels are `<prefix>-<role>-<authority id>`.
        label_prefix: String,
        /// Roots too (`--pkcs11-keys all`), not only intermediates.
        roots_in_token: bool,
    },
}

/// Linkerd's identity service on the CA port (docs/linkerd.md).
#[derive(Debug, Clone)]
pub struct LinkerdConfig {
    /// The control-plane namespace and identity domain of the DNS-form identities.
    pub names: crate::identity::LinkerdNames,
    /// Also put the SPIFFE ID in Linkerd leaves, so one workload is known to both meshes.
    pub spiffe_san: bool,
    /// How long a positive TokenReview (audience `identity.l5d.io`) is reused.
    pub cache_ttl: Duration,
    /// Rate, burst and longest wait for those reviews.
    pub limits: ReviewLimits,
}

impl ServeConfig {
    /// A development configuration: own CA in `state_dir`, dev tokens, TLS, the defaults of
    /// every flag. Tests start from it.
    pub fn dev(state_dir: impl Into<PathBuf>) -> Self {
        let td = TrustDomain::new("cluster.local").expect("a valid trust domain");
        Self {
            dev: true,
            state_dir: state_dir.into(),
            trust_domain: td.clone(),
            store: StoreConfig::File,
            auth: AuthConfig::Jwks {
                source: JwksSource::Dev,
                issuer: Some(crate::devkeys::DEV_ISSUER.to_string()),
                audiences: vec!["istio-ca".into()],
            },
            ca: CaSource::Own(CaOptions::new(td)),
            ttl: TtlPolicy::default(),
            rotation: RotationPolicy::default(),
            tls_names: Some(vec![
                "istiod.istio-system.svc".into(),
                "localhost".into(),
                "127.0.0.1".into(),
            ]),
            reconcile_interval: Duration::from_secs(1),
            plugged_poll: Duration::from_secs(2),
            limits: Limits::default(),
            kubeconfig: None,
            trusted_node_accounts: TrustedNodeAccounts::default(),
            broker_ids: Default::default(),
            pod_index_max_staleness: crate::auth::node::DEFAULT_MAX_STALENESS,
            cluster_id: crate::auth::cluster::DEFAULT_CLUSTER_ID.to_string(),
            remote_secrets_namespace: None,
            ca_resource: crate::cluster::ca_resource::DEFAULT_NAME.to_string(),
            ca_resource_caps: Default::default(),
            activate_after_explicit: false,
            pod_certificates: None,
            csr_signer: None,
            key_source: KeySourceConfig::Software,
            linkerd: None,
            federation: Default::default(),
        }
    }

    /// The policy as stored with the state (`Journal::policy`) and overridden by a
    /// CertificateAuthority resource.
    pub fn ca_policy(&self) -> CaPolicy {
        CaPolicy {
            ttl: self.ttl,
            rotation: self.rotation.clone(),
            key_type: match &self.ca {
                CaSource::Own(o) => o.key_type.to_string(),
                CaSource::Plugged(_) => "plugged".into(),
            },
        }
    }

    /// Runs with `p` instead of the flags' policy (a CertificateAuthority spec won).
    pub fn set_ca_policy(&mut self, p: &CaPolicy) -> Result<(), String> {
        self.ttl = p.ttl;
        self.rotation = p.rotation.clone();
        if let CaSource::Own(o) = &mut self.ca {
            o.key_type = p.key_type.parse()?;
            o.root_ttl = p.rotation.root_ttl;
            o.intermediate_ttl = p.rotation.intermediate_ttl;
        }
        self.validate()
    }

    /// Refuses settings that cannot work together or are out of range, naming the flag.
    pub fn validate(&self) -> Result<(), String> {
        let s = Duration::from_secs;
        if self.ttl.default > self.ttl.max {
            return Err(format!(
                "--default-ttl {} exceeds --max-ttl {}",
                duration::format(self.ttl.default),
                duration::format(self.ttl.max)
            ));
        }
        if self.ttl.default.is_zero() {
            return Err("--default-ttl must be positive".into());
        }
        check_range("--max-ttl", self.ttl.max, s(1), MAX_LIFETIME)?;
        check_range(
            "--ca-resource-max-workload-ttl",
            self.ca_resource_caps.workload_ttl,
            s(1),
            MAX_LIFETIME,
        )?;
        let r = &self.rotation;
        check_range("--root-ttl", r.root_ttl, s(60), MAX_LIFETIME)?;
        check_range(
            "--intermediate-ttl",
            r.intermediate_ttl,
            s(30),
            MAX_LIFETIME,
        )?;
        check_range("--crl-validity", r.crl_validity, s(60), MAX_LIFETIME)?;
        check_range(
            "--activate-after",
            r.activate_after,
            Duration::ZERO,
            MAX_LIFETIME,
        )?;
        check_range(
            "--clock-skew-margin",
            r.skew_margin,
            Duration::ZERO,
            s(86_400),
        )?;
        for (flag, v) in [
            ("--intermediate-prepare-at", r.prepare_at),
            ("--intermediate-activate-at", r.activate_at),
            ("--root-rotate-at", r.root_rotate_at),
        ] {
            if !(v > 0.0 && v < 1.0) {
                return Err(format!(
                    "{flag} must be between 0 and 1 (exclusive), got {v}"
                ));
            }
        }
        if r.prepare_at > r.activate_at {
            return Err(
                "--intermediate-prepare-at must not be later than --intermediate-activate-at"
                    .into(),
            );
        }
        check_range(
            "--jwt-svid-ttl",
            r.jwt.svid_ttl,
            s(10),
            crate::ca::policy::JwtKeyPolicy::MAX_SVID_TTL,
        )?;
        check_range("--jwt-key-ttl", r.jwt.key_ttl, s(60), MAX_LIFETIME)?;
        check_range(
            "--jwt-bundle-refresh-hint",
            r.jwt.refresh_hint,
            s(1),
            s(7 * 86_400),
        )?;
        if r.max_leaf_ttl != self.ttl.max {
            return Err("the rotation policy's leaf TTL must be --max-ttl".into());
        }
        check_range(
            "--reconcile-interval",
            self.reconcile_interval,
            Duration::from_millis(100),
            s(3600),
        )?;
        check_range(
            "--ca-certs-poll-interval",
            self.plugged_poll,
            Duration::from_millis(100),
            s(3600),
        )?;
        if let StoreConfig::Kube {
            lease_duration,
            namespace,
            ..
        } = &self.store
        {
            check_range("--lease-duration", *lease_duration, s(1), s(3600))?;
            if namespace.is_empty() {
                return Err("--namespace must not be empty".into());
            }
        }
        match &self.auth {
            AuthConfig::TokenReview {
                audiences,
                cache_ttl,
                limits,
            } => {
                check_range("--token-cache-ttl", *cache_ttl, Duration::ZERO, s(86_400))?;
                check_range(
                    "--kube-review-max-wait",
                    limits.max_wait,
                    Duration::ZERO,
                    s(60),
                )?;
                if !(limits.qps > 0.0 && limits.qps.is_finite()) {
                    return Err(format!("--kube-qps must be positive, got {}", limits.qps));
                }
                if audiences.is_empty() {
                    return Err("at least one --token-audience is needed".into());
                }
            }
            AuthConfig::Jwks { audiences, .. } => {
                if audiences.is_empty() {
                    return Err("at least one --token-audience is needed".into());
                }
            }
        }
        if self.limits.max_inflight == 0 {
            return Err("--max-inflight must be at least 1".into());
        }
        if self.limits.max_connections == 0 {
            return Err("--max-connections must be at least 1".into());
        }
        if self.limits.max_connections_per_peer == 0 {
            return Err("--max-connections-per-peer must be at least 1".into());
        }
        if !self.limits.idle_timeout.is_zero() {
            check_range(
                "--idle-timeout",
                self.limits.idle_timeout,
                Duration::from_millis(100),
                s(86_400),
            )?;
        }
        check_range(
            "--handshake-timeout",
            self.limits.handshake_timeout,
            Duration::from_millis(100),
            s(300),
        )?;
        let t = self.limits.auth_throttle;
        if t.burst > 0 && !(t.per_second.is_finite() && t.per_second > 0.0) {
            return Err(format!(
                "--auth-failure-rate must be a positive number of failures per second (got {}); use --auth-failure-burst 0 to turn throttling off",
                t.per_second
            ));
        }
        if let (KeySourceConfig::Pkcs11 { label_prefix, .. }, ca) = (&self.key_source, &self.ca) {
            if matches!(ca, CaSource::Plugged(_)) {
                return Err("--ca-key-source pkcs11 is for citadel's own CA; a plugged-in CA (--ca-certs-dir) brings its own ca-key.pem".into());
            }
            if label_prefix.is_empty() || label_prefix.len() > 64 {
                return Err("--pkcs11-key-label-prefix must be 1 to 64 characters".into());
            }
        }
        if let CaSource::Own(o) = &self.ca {
            if o.trust_domain != self.trust_domain {
                return Err("the CA's trust domain must be --trust-domain".into());
            }
        }
        if self.cluster_id.is_empty() {
            return Err("--cluster-id must not be empty".into());
        }
        if let Some(ns) = &self.remote_secrets_namespace {
            if !matches!(self.auth, AuthConfig::TokenReview { .. }) {
                return Err(
                    "--multicluster needs --auth tokenreview: each remote cluster's \
                            tokens are checked by its own API server"
                        .into(),
                );
            }
            if ns.is_empty() {
                return Err("--namespace must not be empty".into());
            }
        }
        if !self.trusted_node_accounts.is_empty() && !self.uses_cluster() {
            return Err(
                "--trusted-node-accounts needs the cluster's pods, and no cluster is \
                        configured: add --store kube, --auth tokenreview or --jwks-from-cluster \
                        (with --kubeconfig, KUBECONFIG or in-cluster credentials)"
                    .into(),
            );
        }
        if !self.broker_ids.is_empty() && !self.uses_cluster() {
            return Err(
                "--broker-ids needs the cluster's pods (a broker gets SVIDs only for pods on its \
                 node), and no cluster is configured: add --store kube, --auth tokenreview or \
                 --jwks-from-cluster (with --kubeconfig, KUBECONFIG or in-cluster credentials)"
                    .into(),
            );
        }
        if let Some(p) = &self.pod_certificates {
            if self.store == StoreConfig::File {
                return Err("the Pod Certificates signer needs --store kube".into());
            }
            p.validate()?;
        }
        if let Some(c) = &self.csr_signer {
            if self.store == StoreConfig::File {
                return Err("the CSR signer (--csr-signer) needs --store kube".into());
            }
            c.validate()?;
        }
        if self.tls_names.as_ref().is_some_and(|n| n.is_empty()) {
            return Err("TLS needs at least one --server-dns-name".into());
        }
        Ok(())
    }
}

impl ServeConfig {
    /// Whether some setting already makes this server talk to an API server.
    pub fn uses_cluster(&self) -> bool {
        matches!(self.store, StoreConfig::Kube { .. })
            || matches!(self.auth, AuthConfig::TokenReview { .. })
            || matches!(
                self.auth,
                AuthConfig::Jwks {
                    source: JwksSource::Cluster,
                    ..
                }
            )
    }
}

/// Refuses a duration outside `min..=max`, naming the flag.
pub fn check_range(flag: &str, d: Duration, min: Duration, max: Duration) -> Result<(), String> {
    if d < min || d > max {
        return Err(format!(
            "{flag} {} is out of range ({} to {})",
            duration::format(d),
            duration::format(min),
            duration::format(max)
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    type Change = Box<dyn FnOnce(&mut ServeConfig)>;

    fn err(f: impl FnOnce(&mut ServeConfig)) -> String {
        let mut c = ServeConfig::dev("x");
        f(&mut c);
        c.validate().expect_err("should be refused")
    }

    #[test]
    fn pkcs11_keys_are_for_the_own_ca_with_a_sane_label_prefix() {
        let pkcs11 = |prefix: &str| KeySourceConfig::Pkcs11 {
            token: crate::hsm::Pkcs11Config {
                module: "/usr/lib/softhsm/libsofthsm2.so".into(),
                token_label: "ca".into(),
                pin: crate::hsm::PinSource::Env("PIN".into()),
                max_sessions: None,
            },
            label_prefix: prefix.into(),
            roots_in_token: false,
        };
        let mut ok = ServeConfig::dev("x");
        ok.key_source = pkcs11("citadel");
        ok.validate().unwrap();
        let plugged = err(|c| {
            c.key_source = pkcs11("citadel");
            c.ca = CaSource::Plugged("/etc/cacerts".into());
        });
        assert!(plugged.contains("--ca-certs-dir"), "{plugged}");
        let empty = err(|c| c.key_source = pkcs11(""));
        assert!(empty.contains("--pkcs11-key-label-prefix"), "{empty}");
    }

    #[test]
    fn the_dev_defaults_are_valid() {
        ServeConfig::dev("x").validate().unwrap();
    }

    #[test]
    fn each_bad_setting_is_refused_naming_its_flag() {
        let cases: Vec<(Change, &str)> = vec![
            (
                Box::new(|c| c.ttl.default = Duration::from_secs(100 * 86_400)),
                "--default-ttl",
            ),
            (
                Box::new(|c| c.ttl.default = Duration::ZERO),
                "--default-ttl must be positive",
            ),
            (
                Box::new(|c| {
                    c.ttl.max = Duration::ZERO;
                    c.ttl.default = Duration::ZERO;
                }),
                "--default-ttl",
            ),
            (
                Box::new(|c| c.rotation.root_ttl = Duration::from_secs(5)),
                "--root-ttl",
            ),
            (
                Box::new(|c| c.rotation.intermediate_ttl = MAX_LIFETIME * 2),
                "--intermediate-ttl",
            ),
            (
                Box::new(|c| c.rotation.crl_validity = Duration::from_secs(59)),
                "--crl-validity",
            ),
            (
                Box::new(|c| c.rotation.prepare_at = 0.0),
                "--intermediate-prepare-at",
            ),
            (
                Box::new(|c| c.rotation.activate_at = 1.0),
                "--intermediate-activate-at",
            ),
            (
                Box::new(|c| c.rotation.root_rotate_at = f64::NAN),
                "--root-rotate-at",
            ),
            (
                Box::new(|c| {
                    c.rotation.prepare_at = 0.9;
                    c.rotation.activate_at = 0.8;
                }),
                "must not be later",
            ),
            (
                Box::new(|c| c.reconcile_interval = Duration::from_millis(10)),
                "--reconcile-interval",
            ),
            (
                Box::new(|c| {
                    c.store = StoreConfig::Kube {
                        namespace: "ns".into(),
                        lease_duration: Duration::ZERO,
                        identity: None,
                    }
                }),
                "--lease-duration",
            ),
            (
                Box::new(|c| {
                    c.auth = AuthConfig::TokenReview {
                        audiences: vec!["istio-ca".into()],
                        cache_ttl: Duration::from_secs(2 * 86_400),
                        limits: ReviewLimits::default(),
                    }
                }),
                "--token-cache-ttl",
            ),
            (
                Box::new(|c| {
                    c.auth = AuthConfig::TokenReview {
                        audiences: vec!["istio-ca".into()],
                        cache_ttl: Duration::ZERO,
                        limits: ReviewLimits {
                            max_wait: Duration::from_secs(61),
                            ..ReviewLimits::default()
                        },
                    }
                }),
                "--kube-review-max-wait",
            ),
            (
                Box::new(|c| {
                    c.auth = AuthConfig::Jwks {
                        source: JwksSource::Dev,
                        issuer: None,
                        audiences: vec![],
                    }
                }),
                "--token-audience",
            ),
            (Box::new(|c| c.limits.max_inflight = 0), "--max-inflight"),
            (
                Box::new(|c| c.limits.max_connections = 0),
                "--max-connections",
            ),
            (
                Box::new(|c| c.limits.max_connections_per_peer = 0),
                "--max-connections-per-peer",
            ),
            (
                Box::new(|c| c.limits.idle_timeout = Duration::from_millis(1)),
                "--idle-timeout",
            ),
            (
                Box::new(|c| c.limits.handshake_timeout = Duration::ZERO),
                "--handshake-timeout",
            ),
            (
                Box::new(|c| c.tls_names = Some(vec![])),
                "--server-dns-name",
            ),
            (
                Box::new(|c| {
                    c.trusted_node_accounts =
                        TrustedNodeAccounts::parse(&["istio-system/ztunnel"]).unwrap()
                }),
                "--trusted-node-accounts needs the cluster",
            ),
            (
                Box::new(|c| {
                    c.broker_ids = crate::auth::broker::BrokerIds::parse(
                        &["spiffe://cluster.local/ns/spire/sa/broker"],
                        &c.trust_domain,
                    )
                    .unwrap()
                }),
                "--broker-ids needs the cluster",
            ),
            (
                Box::new(|c| {
                    c.pod_certificates = Some(PodCertConfig {
                        signer_name: "citadel.dev/spiffe".into(),
                        workers: 8,
                        ..Default::default()
                    })
                }),
                "needs --store kube",
            ),
            (
                Box::new(|c| {
                    c.store = StoreConfig::Kube {
                        namespace: "ns".into(),
                        lease_duration: Duration::from_secs(15),
                        identity: None,
                    };
                    c.pod_certificates = Some(PodCertConfig {
                        signer_name: "kubernetes.io/mine".into(),
                        workers: 8,
                        ..Default::default()
                    })
                }),
                "--pod-cert-signer-name",
            ),
            (
                Box::new(|c| {
                    c.store = StoreConfig::Kube {
                        namespace: "ns".into(),
                        lease_duration: Duration::from_secs(15),
                        identity: None,
                    };
                    c.pod_certificates = Some(PodCertConfig {
                        signer_name: "citadel.dev/spiffe".into(),
                        workers: 0,
                        ..Default::default()
                    })
                }),
                "--pod-cert-workers",
            ),
            (
                Box::new(|c| {
                    c.csr_signer = Some(CsrSignerConfig {
                        signers: vec!["citadel.dev/spiffe".parse().unwrap()],
                        ..Default::default()
                    })
                }),
                "--csr-signer) needs --store kube",
            ),
        ];
        for (change, flag) in cases {
            let e = err(change);
            assert!(e.contains(flag), "expected {flag:?} in {e:?}");
        }
    }
}
