//! Running the CA: from a validated [`ServeConfig`], bound listeners, a clock and a shutdown
//! signal to a serving CA. Nothing here reads flags or the wall clock: `cmd::serve` binds the
//! configured addresses and passes the system clock; tests pass `127.0.0.1:0` and a
//! `ManualClock`, and move days in milliseconds.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use super::config::{AuthConfig, CaSource, JwksSource, ServeConfig, StoreConfig};
use crate::auth::client_cert::ClientCertAuthenticator;
use crate::auth::cluster::{LocalCluster, RemoteClusters};
use crate::auth::jwks::Jwks;
use crate::auth::jwt::{JwtAuthenticator, JwtPolicy, DEFAULT_LEEWAY};
use crate::auth::node::NodeAuthorizer;
use crate::auth::pods::PodIndex;
use crate::auth::tokenreview::TokenReviewAuthenticator;
use crate::auth::{AuthChain, Authenticator};
use crate::ca::bootstrap;
use crate::ca::reload::{self, Reloader};
use crate::ca::scheduler::Scheduler;
use crate::ca::Ca;
use crate::clock::SharedClock;
use crate::cluster::podcert::PodCertSigner;
use crate::cluster::replica::Replica;
use crate::cluster::{self, JwksRefresher};
use crate::server::{tls::TlsState, Metrics, Server};
use crate::shutdown::Shutdown;
use crate::store::file::FileStore;
use crate::store::index::{FileIndex, IssuanceIndex};
use crate::store::Store;

/// The two sockets `serve` answers on.
pub struct Listeners {
    /// The CA gRPC service.
    pub grpc: TcpListener,
    /// /metrics and /healthz.
    pub metrics: TcpListener,
    /// The CRL distribution point (`--crl-endpoint`), if configured.
    pub crl: Option<TcpListener>,
}

/// Loads or creates the CA and serves until `shutdown`.
pub async fn run(
    mut config: ServeConfig,
    listeners: Listeners,
    clock: SharedClock,
    shutdown: Shutdown,
) -> Result<(), String> {
    config.validate()?;
    if config.dev {
        tracing::warn!("DEV MODE: trusting the public dev JWT key from certs-dev/; anyone can mint tokens. Never use --dev in production.");
    }
    if config.tls_names.is_none() {
        tracing::warn!("--plaintext: the CA port serves WITHOUT TLS; bearer tokens and certificates cross the network in clear");
    }
    let ca = Ca::new();
    let metrics = Arc::new(Metrics::default());
    if let super::config::KeySourceConfig::Pkcs11 {
        token,
        label_prefix,
        roots_in_token,
    } = config.key_source.clone()
    {
        let kt = match &config.ca {
            CaSource::Own(o) => o.key_type,
            CaSource::Plugged(_) => crate::pki::KeyType::EcP256,
        };
        let token = tokio::task::spawn_blocking(move || {
            crate::ca::keysource::connect(token, label_prefix, roots_in_token, kt)
        })
        .await
        .map_err(|e| e.to_string())??;
        metrics
            .sources
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Box::new(move |out| token.stats().render(out)));
    }
    let replica = match &config.store {
        StoreConfig::File => None,
        StoreConfig::Kube {
            namespace,
            lease_duration,
            identity,
        } => {
            let r = Replica::start(
                config.kubeconfig.as_deref(),
                namespace,
                identity.clone(),
                *lease_duration,
                config
                    .pod_certificates
                    .as_ref()
                    .map(|p| p.signer_name.as_str()),
                &clock,
                &shutdown,
                config.linkerd.as_ref().map(|l| l.names.control_plane_ns()),
            )
            .await?;
            let _ = metrics.leader.set(r.elector.subscribe().changes());
            if let Some(f) = &r.foreign_trust_bundles {
                let _ = metrics.foreign_trust_bundles.set(f.clone());
            }
            Some(r)
        }
    };
    // What the server runs with, and where it came from (stored with the state).
    let flags_policy = config.ca_policy();
    let mut policy_source = "flags".to_string();
    if let (Some(r), StoreConfig::Kube { namespace, .. }, CaSource::Own(_)) =
        (&replica, config.store.clone(), &config.ca)
    {
        policy_source = apply_ca_resource(&mut config, &r.client, &namespace).await?;
    }
    // The running policy: one cell every consumer reads per request or per step, and the
    // CertificateAuthority reconciler swaps on every replica when the spec changes.
    let live_policy = crate::ca::policy::LivePolicy::new(config.ca_policy());
    // Linkerd anchor drift's gauges (`--linkerd-identity-domain` with the Kubernetes store):
    // counted by the drift watch, read by the metrics and the CertificateAuthority's status.
    let linkerd_drift = (replica.is_some() && config.linkerd.is_some())
        .then(cluster::linkerd_drift::DriftStats::new);
    let store: Arc<dyn Store> = match &replica {
        Some(r) => r.store.clone(),
        None => Arc::new(FileStore::open(&config.state_dir).map_err(|e| e.to_string())?),
    };
    {
        // A bounded store's journal size against its limit and the revocation ceiling.
        let store = store.clone();
        metrics
            .sources
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Box::new(move |out| {
                use std::fmt::Write;
                let (Some((bytes, limit)), Some(ceiling)) =
                    (store.journal_size(), store.revocation_ceiling())
                else {
                    return;
                };
                let _ = writeln!(out, "# HELP citadel_ca_journal_bytes Bytes of the CA journal as this replica last read or wrote it.\n# TYPE citadel_ca_journal_bytes gauge\ncitadel_ca_journal_bytes {bytes}");
                let _ = writeln!(out, "# HELP citadel_ca_journal_limit_bytes The most the journal's store holds (a Kubernetes Secret: 1 MiB); a write past it fails.\n# TYPE citadel_ca_journal_limit_bytes gauge\ncitadel_ca_journal_limit_bytes {limit}");
                let _ = writeln!(out, "# HELP citadel_ca_journal_revocation_ceiling_bytes Past this size, new revocations and denials are refused (the rest is kept for rotation and CRLs).\n# TYPE citadel_ca_journal_revocation_ceiling_bytes gauge\ncitadel_ca_journal_revocation_ceiling_bytes {ceiling}");
            }));
    }
    // The issuance index stays a per-replica file in the state directory (see
    // docs/kubernetes.md).
    std::fs::create_dir_all(&config.state_dir)
        .map_err(|e| format!("cannot create {}: {e}", config.state_dir.display()))?;

    // A plugged-in CA: a directory, or (with the Kubernetes store) the `cacerts` Secret.
    // Either is watched while serving: a valid change is installed, a bad one refused.
    let plugged = match (&config.ca, &replica) {
        (CaSource::Plugged(dir), _) => {
            Some(reload::read_dir_set(dir).map_err(|e| format!("plugged-in CA refused: {e}"))?)
        }
        (CaSource::Own(_), Some(r)) => r.cacerts().await?,
        (CaSource::Own(_), None) => None,
    };
    let (index, scheduler) = match (plugged, &config.ca) {
        (Some(src), _) => {
            let overlap: Arc<dyn reload::OverlapStore> = match &replica {
                Some(r) => Arc::new(cluster::cacerts::KubeOverlap::new(
                    r.client.clone(),
                    r.namespace(),
                )),
                None => Arc::new(reload::FileOverlap(
                    config.state_dir.join(reload::FileOverlap::NAME),
                )),
            };
            let reloader = Reloader::new(
                ca.clone(),
                store.clone(),
                overlap,
                config.trust_domain.clone(),
                clock.clone(),
                config.ttl.max,
                config.rotation.skew_margin,
            )
            // Without a cluster nobody else publishes: the bundle file must be written.
            .publish_required(replica.is_none());
            reloader
                .start(src)
                .await
                .map_err(|e| format!("plugged-in CA refused: {e}"))?;
            let _ = metrics.plugged.set(reloader.stats.clone());
            match (&config.ca, &replica) {
                (CaSource::Plugged(dir), _) => {
                    tracing::info!(dir = %dir.display(), every = %crate::duration::format(config.plugged_poll), "watching the plugged-in CA directory for changes");
                    tokio::spawn(reloader.poll_dir(
                        dir.clone(),
                        config.plugged_poll,
                        shutdown.clone(),
                    ));
                }
                (_, Some(r)) => {
                    tracing::info!(namespace = %r.namespace(), secret = cluster::cacerts::SECRET, "watching the cacerts Secret for changes");
                    cluster::cacerts::watch(
                        r.client.clone(),
                        r.namespace().to_string(),
                        reloader,
                        config.plugged_poll,
                        shutdown.clone(),
                    );
                }
                _ => {}
            }
            (None, None)
        }
        (None, CaSource::Own(opts)) => {
            match &replica {
                // Only the leader creates the CA; the others wait for its journal.
                Some(r) => r.wait_for_ca(opts, clock.as_ref()).await?,
                None => {
                    bootstrap::load_or_create(store.as_ref(), opts, clock.as_ref())
                        .await
                        .map_err(|e| e.to_string())?;
                }
            }
            if replica.is_none() {
                store_policy(store.as_ref(), &config.ca_policy(), &policy_source).await?;
            }
            let index = Arc::new(FileIndex::new(&config.state_dir));
            let live = index
                .prune(clock.now().unix_timestamp())
                .map_err(|e| e.to_string())?;
            tracing::debug!(live, "issuance index pruned");
            let mut scheduler = Scheduler::new(
                store.clone(),
                ca.clone(),
                live_policy.clone(),
                clock.clone(),
                config.trust_domain.clone(),
            )
            .with_index(index.clone());
            if config.linkerd.is_some() {
                // Linkerd's proxies read anchors only at pod start: no root leaves the bundle
                // while a leaf that chains only to it is unexpired.
                scheduler = scheduler.with_old_root_hold();
            }
            if let Some(r) = &replica {
                scheduler = scheduler.with_leader(r.elector.subscribe());
                r.watch_journal(scheduler.wake.clone(), shutdown.clone());
                // Every replica reconciles every Revocation against its own index.
                let revocations = cluster::revocations::RevocationController::new(
                    r.client.clone(),
                    &r.namespace,
                    &r.identity,
                    store.clone(),
                    index.clone(),
                    clock.clone(),
                    config.trust_domain.as_str(),
                    live_policy.clone(),
                    scheduler.wake.clone(),
                    &config.ca_resource,
                );
                tokio::spawn(revocations.run(shutdown.clone()));
                r.publisher.report_to(r.namespace(), &config.ca_resource);
                let reconciler = cluster::ca_resource::Reconciler::new(
                    r.client.clone(),
                    r.namespace(),
                    &config.ca_resource,
                    store.clone(),
                    ca.clone(),
                    clock.clone(),
                    live_policy.clone(),
                    policy_source.clone(),
                    &r.identity,
                    config.trust_domain.as_str(),
                    flags_policy.clone(),
                    config.activate_after_explicit,
                    config.ca_resource_caps,
                    scheduler.wake.clone(),
                    config.reconcile_interval,
                );
                if let Some(d) = &linkerd_drift {
                    reconciler.report_linkerd_drift(d.clone());
                }
                tokio::spawn(reconciler.run(Some(r.elector.subscribe()), shutdown.clone()));
            }
            let scheduler = Arc::new(scheduler);
            // Catch up on anything that fell due while we were down, install, publish. With
            // the Kubernetes store the first passes may find the ConfigMap watches not ready.
            let mut attempts = 0;
            while let Err(e) = scheduler.step().await {
                attempts += 1;
                if replica.is_none() || attempts >= 60 {
                    return Err(e.to_string());
                }
                tracing::info!(reason = %e, "CA not fully published yet; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            (Some(index as Arc<dyn IssuanceIndex>), Some(scheduler))
        }
        (None, CaSource::Plugged(_)) => {
            unreachable!("a plugged-in directory always loads or fails")
        }
    };
    let signer = ca.current().ok_or("no CA was installed")?;
    tracing::info!(
        signer = %signer.signing_cert().subject,
        signer_not_after = %signer.signing_cert().not_after,
        roots = signer.roots_der().len(),
        key_type = %signer.key_kind(),
        bundle = %config.state_dir.join("root-cert.pem").display(),
        "CA ready"
    );

    let federated = start_federation(&config, &ca, &store, &metrics, &clock, &shutdown).await?;

    let (auth, jwks_refresher, remotes) = build_auth(&config, &ca, &clock, &metrics).await?;
    let registry = remotes.as_ref().map(|r| r.registry.clone());
    if let Some(r) = remotes {
        let _ = metrics.remote_clusters.set(r.registry.clone());
        tracing::info!(namespace = %r.namespace, selector = cluster::remote::LABEL_SELECTOR, local = %config.cluster_id, "multicluster: watching Secrets for remote clusters");
        cluster::remote::watch(
            r.client,
            r.namespace,
            config.cluster_id.clone(),
            r.make,
            r.registry,
            !config.trusted_node_accounts.is_empty(),
            shutdown.clone(),
        );
    }
    if let Some(r) = jwks_refresher {
        tokio::spawn(r.run(
            Duration::from_secs(300),
            Duration::from_secs(10),
            shutdown.clone(),
        ));
    }
    let tls = match &config.tls_names {
        None => None,
        Some(names) => {
            let t = TlsState::new(names.clone()).map_err(|e| e.to_string())?;
            let signer = ca.current().ok_or("CA vanished")?;
            t.refresh(&signer, clock.now())
                .map_err(|e| format!("cannot issue the serving certificate: {e}"))?;
            Some(t)
        }
    };

    tracing::info!(
        grpc = %listeners.grpc.local_addr().map_err(|e| e.to_string())?,
        metrics = %listeners.metrics.local_addr().map_err(|e| e.to_string())?,
        tls = tls.is_some(),
        trust_domain = %config.trust_domain,
        auth = ?auth.names(),
        "citadel serving"
    );
    let node_auth = start_node_authorizer(
        &config,
        replica.as_ref(),
        registry,
        &metrics,
        &clock,
        &shutdown,
    )
    .await?;
    let linkerd = start_linkerd(&config, replica.as_ref(), &clock).await?;
    if let (Some(r), Some(l)) = (replica.as_ref(), &config.linkerd) {
        // Linkerd's proxies read anchors only at pod start: count those behind the bundle.
        let drift = cluster::linkerd_drift::DriftWatch::new(
            r.client.clone(),
            l.names.control_plane_ns(),
            Some(r.elector.subscribe()),
            linkerd_drift
                .clone()
                .unwrap_or_else(cluster::linkerd_drift::DriftStats::new),
        );
        let stats = drift.stats.clone();
        metrics
            .sources
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Box::new(move |out| stats.render(out)));
        let period = config.reconcile_interval.max(Duration::from_millis(100)) * 10;
        tokio::spawn(drift.run(period, shutdown.clone()));
    }
    let sweep = scheduler
        .as_ref()
        .map(|s| s.sweep.clone())
        .unwrap_or_default();
    if let (Some(r), Some(pc)) = (
        replica.as_ref().filter(|r| r.pod_certificates),
        &config.pod_certificates,
    ) {
        let signer = PodCertSigner::new(
            r.client.clone(),
            Some(r.elector.subscribe()),
            ca.clone(),
            index.clone(),
            sweep.clone(),
            clock.clone(),
            config.trust_domain.clone(),
            pc.clone(),
            live_policy.clone(),
        );
        let stats = signer.stats();
        metrics
            .sources
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Box::new(move |out| stats.render(out)));
        tokio::spawn(signer.run(shutdown.clone()));
    }
    if let (Some(r), Some(cc)) = (&replica, &config.csr_signer) {
        let routes = cluster::csrsigner::routes(cc, &ca, &config.trust_domain, clock.now())?;
        let signer = cluster::csrsigner::CsrSigner::new(
            r.client.clone(),
            Some(r.elector.subscribe()),
            routes,
            ca.clone(),
            index.clone(),
            sweep.clone(),
            clock.clone(),
            config.trust_domain.clone(),
            cc.clone(),
            live_policy.clone(),
            r.namespace(),
        );
        let m = signer.clone();
        metrics
            .sources
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Box::new(move |out| m.render_metrics(out)));
        tokio::spawn(signer.run(shutdown.clone()));
    }
    let server = Server {
        ca,
        auth,
        ttl: live_policy.clone(),
        clock,
        metrics,
        tls,
        index: index.clone(),
        sweep,
        limits: config.limits.clone(),
        node_auth,
        linkerd,
        federated,
    };
    if let Some(s) = scheduler {
        tokio::spawn(s.run(config.reconcile_interval, shutdown.clone()));
    }
    if let Some(l) = listeners.crl {
        tracing::info!(addr = %l.local_addr().map_err(|e| e.to_string())?, path = crate::server::crl_http::PREFIX, url = ?config.rotation.crl_distribution_url, "serving CRLs over HTTP (--crl-endpoint)");
        let (ca, sd) = (server.ca.clone(), shutdown.clone());
        tokio::spawn(async move {
            if let Err(e) = crate::server::crl_http::serve(l, ca, sd).await {
                tracing::error!(error = %e, "the CRL endpoint stopped");
            }
        });
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
        .run(listeners.grpc, Some(listeners.metrics), shutdown)
        .await
        .map_err(|e| format!("server failed: {e}"))?;
    tracing::info!("stopped");
    Ok(())
}

/// `--bundle-endpoint` (our bundle, needs our own CA's journal) and `--federate-with` (the
/// followers of foreign bundle endpoints); returns the foreign bundles they keep current.
async fn start_federation(
    config: &ServeConfig,
    ca: &Arc<Ca>,
    store: &Arc<dyn Store>,
    metrics: &Arc<Metrics>,
    clock: &SharedClock,
    shutdown: &Shutdown,
) -> Result<crate::server::federation::FederatedBundles, String> {
    use crate::server::federation::{endpoint, fetch, FederatedBundles};
    let fed = &config.federation;
    if let Some(ep) = &fed.endpoint {
        if matches!(config.ca, CaSource::Plugged(_)) {
            return Err("--bundle-endpoint needs citadel's own CA: a plugged-in CA (--ca-certs-dir) keeps no journal to number the bundle's spiffe_sequence from".into());
        }
        let listener = TcpListener::bind(ep.listen)
            .await
            .map_err(|e| format!("cannot listen on {} (--bundle-endpoint): {e}", ep.listen))?;
        endpoint::start(
            ep,
            listener,
            ca.clone(),
            store.clone(),
            &config.rotation,
            clock.clone(),
            shutdown.clone(),
        )
        .await?;
    }
    let bundles = FederatedBundles::default();
    if !fed.peers.is_empty() {
        let stats = fetch::FederationStats::default();
        fetch::start(
            &fed.peers,
            &config.state_dir,
            bundles.clone(),
            stats.clone(),
            clock.clone(),
            shutdown.clone(),
        )?;
        metrics
            .sources
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Box::new(move |out| stats.render(out)));
    }
    Ok(bundles)
}

/// With `--store kube`: the CertificateAuthority resource's spec over the flags. Logs which
/// source each setting came from, and returns the source to store with the policy.
async fn apply_ca_resource(
    config: &mut ServeConfig,
    client: &kube::Client,
    namespace: &str,
) -> Result<String, String> {
    use cluster::ca_resource;
    let name = config.ca_resource.clone();
    let Some(cr) = ca_resource::get(client, namespace, &name).await? else {
        tracing::info!(resource = %format!("{namespace}/{name}"), "no CertificateAuthority resource: the policy comes from the flags");
        return Ok("flags".into());
    };
    let label = format!("CertificateAuthority {namespace}/{name}");
    if let Some(td) = &cr.spec.trust_domain {
        if td.as_str() != config.trust_domain.as_str() {
            tracing::info!(spec = %td, flag = %config.trust_domain, "{label} sets the trust domain; it wins over --trust-domain");
            let td = crate::identity::TrustDomain::new(td)
                .map_err(|e| format!("{label}: spec.trustDomain: {e}"))?;
            config.trust_domain = td.clone();
            if let CaSource::Own(o) = &mut config.ca {
                o.trust_domain = td;
            }
        }
    }
    let (policy, sources) = ca_resource::effective_policy(
        &cr.spec,
        &config.ca_policy(),
        config.activate_after_explicit,
        &config.ca_resource_caps,
    )
    .map_err(|e| format!("{label}: {e}"))?;
    config
        .set_ca_policy(&policy)
        .map_err(|e| format!("{label} with the flags: {e}"))?;
    let summary: Vec<String> = sources
        .iter()
        .map(|(field, value, source)| format!("{field}={value} ({source})"))
        .collect();
    tracing::info!(resource = %label, "policy: {}", summary.join(", "));
    Ok(label)
}

/// Stores the running policy with the state (file store; the CertificateAuthority
/// reconciler does it for the Kubernetes store), so `citadel ca rotate-root` and other CLI
/// commands plan with the server's numbers. Written only when it changed.
async fn store_policy(
    store: &dyn Store,
    policy: &crate::ca::policy::CaPolicy,
    source: &str,
) -> Result<(), String> {
    let stored = policy.to_stored(source);
    let current = store.load_journal().await.map_err(|e| e.to_string())?;
    if current.as_ref().and_then(|c| c.value.policy.as_ref()) == Some(&stored) {
        return Ok(());
    }
    crate::ca::update::update_journal(store, |j| {
        j.policy = Some(stored.clone());
        Ok(())
    })
    .await
    .map_err(|e| format!("cannot store the policy with the CA state: {e}"))?;
    tracing::info!(source, max_ttl = %crate::duration::format(policy.ttl.max), "stored the running policy with the CA state");
    Ok(())
}

/// Node impersonation, when `--trusted-node-accounts` lists anyone: the pod index and the
/// one watch that fills it (on the replica's client, or one of its own). Requests that need
/// it before its first list get Unavailable, so start-up does not wait for it. Remote
/// clusters' callers are judged against their own cluster's pod index (`remotes`).
async fn start_node_authorizer(
    config: &ServeConfig,
    replica: Option<&Replica>,
    remotes: Option<Arc<RemoteClusters>>,
    metrics: &Metrics,
    clock: &SharedClock,
    shutdown: &Shutdown,
) -> Result<Option<Arc<NodeAuthorizer>>, String> {
    if config.trusted_node_accounts.is_empty() && config.broker_ids.is_empty() {
        return Ok(None);
    }
    let client = match replica {
        Some(r) => r.client.clone(),
        None => cluster::client(config.kubeconfig.as_deref()).await?,
    };
    let pods = Arc::new(PodIndex::new(clock.clone()));
    cluster::pods::watch(client, pods.clone(), shutdown.clone());
    let _ = metrics.impersonation.pods.set(pods.clone());
    tracing::info!(
        trusted_node_accounts = ?config.trusted_node_accounts.names(),
        "node impersonation enabled: watching pods in all namespaces"
    );
    let authorizer = NodeAuthorizer::new(
        config.trusted_node_accounts.clone(),
        config.trust_domain.clone(),
        pods,
    )
    .with_max_staleness(config.pod_index_max_staleness)
    .with_brokers(config.broker_ids.clone());
    if !config.broker_ids.is_empty() {
        tracing::info!(broker_ids = ?config.broker_ids.names(), "SPIFFE Broker API enabled on the CA port");
    }
    Ok(Some(Arc::new(match remotes {
        Some(r) => authorizer.with_remotes(r),
        None => authorizer,
    })))
}

/// What the remote-cluster Secret watcher needs, when `--multicluster` is on.
struct Remotes {
    client: kube::Client,
    namespace: String,
    make: cluster::remote::MakeAuthenticator,
    registry: Arc<RemoteClusters>,
}

/// The authenticators: client certificate first (renewal), then the token, verified locally
/// against a JWKS or by the API server. Also returns the JWKS refresher to run when the keys
/// come from the cluster, and the remote clusters' registry to keep current (`--multicluster`).
async fn build_auth(
    config: &ServeConfig,
    ca: &Arc<Ca>,
    clock: &SharedClock,
    metrics: &Metrics,
) -> Result<(AuthChain, Option<Arc<JwksRefresher>>, Option<Remotes>), String> {
    let mut members: Vec<Arc<dyn Authenticator>> = vec![Arc::new(ClientCertAuthenticator::new(
        ca.clone(),
        config.trust_domain.clone(),
        clock.clone(),
    ))];
    let (source, issuer, audiences) = match &config.auth {
        AuthConfig::TokenReview {
            audiences,
            cache_ttl,
            limits,
        } => {
            let client = cluster::client(config.kubeconfig.as_deref()).await?;
            tracing::info!(audiences = ?audiences, cache_ttl = %crate::duration::format(*cache_ttl), qps = limits.qps, burst = limits.burst, max_wait = %crate::duration::format(limits.max_wait), "TokenReview authentication enabled");
            // One authenticator per cluster: each has its own cache, single-flight and rate
            // limit, so one cluster's load never delays another's reviews.
            let make: cluster::remote::MakeAuthenticator = {
                let (audiences, td, clock) = (
                    audiences.clone(),
                    config.trust_domain.clone(),
                    clock.clone(),
                );
                let (cache_ttl, limits) = (*cache_ttl, *limits);
                // Every cluster's authenticator counts into one set (citadel_tokenreview_*).
                let stats = Arc::new(crate::auth::tokenreview::ReviewStats::default());
                let shown = stats.clone();
                metrics
                    .sources
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(Box::new(move |out| shown.render(out)));
                Arc::new(move |client: kube::Client| -> Arc<dyn Authenticator> {
                    Arc::new(
                        TokenReviewAuthenticator::new(
                            client,
                            audiences.clone(),
                            td.clone(),
                            clock.clone(),
                            cache_ttl,
                            limits,
                        )
                        .with_stats(stats.clone()),
                    )
                })
            };
            let local = LocalCluster::new(config.cluster_id.clone(), make(client.clone()));
            let (local, remotes) = match &config.remote_secrets_namespace {
                None => (local, None),
                Some(ns) => {
                    let registry = Arc::new(RemoteClusters::default());
                    let remotes = Remotes {
                        client: client.clone(),
                        namespace: ns.clone(),
                        make,
                        registry: registry.clone(),
                    };
                    (local.with_remotes(registry), Some(remotes))
                }
            };
            members.push(Arc::new(local));
            return Ok((AuthChain::new(members), None, remotes));
        }
        AuthConfig::Jwks {
            source,
            issuer,
            audiences,
        } => (source, issuer, audiences),
    };
    let (jwks, issuer, described, client) = match source {
        JwksSource::Cluster => {
            let client = cluster::client(config.kubeconfig.as_deref()).await?;
            let (discovered, jwks) = cluster::fetch_jwks(&client).await?;
            (
                jwks,
                issuer.clone().or(discovered),
                "the cluster (/openid/v1/jwks)".to_string(),
                Some(client),
            )
        }
        JwksSource::File(path) => {
            let bytes = std::fs::read(path)
                .map_err(|e| format!("cannot read JWKS file {}: {e}", path.display()))?;
            let label = path.display().to_string();
            (
                Jwks::from_json(&bytes).map_err(|e| format!("{label}: {e}"))?,
                issuer.clone(),
                label,
                None,
            )
        }
        JwksSource::Dev => (
            Jwks::from_json(crate::devkeys::jwks_json().as_bytes())
                .map_err(|e| format!("the dev key: {e}"))?,
            issuer.clone(),
            "the dev key (certs-dev/)".to_string(),
            None,
        ),
    };
    if issuer.is_none() {
        tracing::warn!("--token-issuer is not set: tokens from any issuer whose key is in the JWKS are accepted");
    }
    tracing::info!(keys = jwks.len(), jwks = %described, issuer = issuer.as_deref().unwrap_or("(any)"), audiences = ?audiences, "JWT authentication enabled");
    let jwt = Arc::new(JwtAuthenticator::new(
        jwks,
        JwtPolicy {
            issuer,
            audiences: audiences.clone(),
            leeway: DEFAULT_LEEWAY,
        },
        config.trust_domain.clone(),
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
    members.push(Arc::new(LocalCluster::new(config.cluster_id.clone(), jwt)));
    Ok((AuthChain::new(members), refresher, None))
}

/// Linkerd's Certify (`--linkerd-identity-domain`): its own TokenReview authenticator, with
/// audience `identity.l5d.io` only (whatever `--auth` says: Linkerd's tokens are reviewed by
/// the API server, as Linkerd's identity service does), on the replica's client or one of its
/// own.
async fn start_linkerd(
    config: &ServeConfig,
    replica: Option<&Replica>,
    clock: &SharedClock,
) -> Result<Option<crate::server::port::LinkerdPort>, String> {
    let Some(l) = &config.linkerd else {
        return Ok(None);
    };
    let client = match replica {
        Some(r) => r.client.clone(),
        None => cluster::client(config.kubeconfig.as_deref())
            .await
            .map_err(|e| format!("--linkerd-identity-domain needs the API server: {e}"))?,
    };
    let reviews = TokenReviewAuthenticator::new(
        client,
        vec![crate::server::linkerd::AUDIENCE.to_string()],
        config.trust_domain.clone(),
        clock.clone(),
        l.cache_ttl,
        l.limits,
    );
    tracing::info!(
        domain = l.names.domain(),
        control_plane_namespace = l.names.control_plane_ns(),
        serving_name = %l.names.service_name(),
        spiffe_san = l.spiffe_san,
        "Linkerd identity (Certify) enabled on the CA port"
    );
    Ok(Some(crate::server::port::LinkerdPort {
        auth: AuthChain::new(vec![Arc::new(reviews)]),
        names: l.names.clone(),
        spiffe_san: l.spiffe_san,
    }))
}
