//! One replica of a replicated CA (`--store kube`): the client, leader election on the
//! Lease, the ConfigMap publisher, the journal Secret as the store, and a watch on that
//! Secret that wakes the scheduler when another replica or an operator writes it.
//!
//! The application layer starts one of these and hands its store and leadership signal to
//! the CA scheduler; everything that talks to the API server as a controller is started here.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::leader::Elector;
use super::publish::ConfigMapPublisher;
use super::trustbundle::{AllPublishers, TrustBundlePublisher};
use crate::ca::bootstrap::{self, CaOptions};
use crate::ca::plugged;
use crate::clock::{Clock, SharedClock};
use crate::shutdown::Shutdown;
use crate::store::kube::KubeStore;
use crate::store::Store;

/// The Kubernetes side of one replica.
pub struct Replica {
    /// The API client every controller of this replica shares.
    pub client: kube::Client,
    /// Leader election; only the leader writes the journal and publishes.
    pub elector: Arc<Elector>,
    /// The journal Secret, publishing through the ConfigMap publisher.
    pub store: Arc<dyn Store>,
    /// Whether the Pod Certificates signer runs: asked for, and served by the API server.
    pub pod_certificates: bool,
    /// This replica's name (`--pod-name`, else hostname plus a random suffix): its Lease
    /// holder identity and its key in a Revocation's `status.replicas`.
    pub identity: String,
    /// The CA namespace.
    pub namespace: String,
    /// The bundle and CRL ConfigMap publisher (acts only while this replica leads).
    pub publisher: Arc<ConfigMapPublisher>,
    /// With the ClusterTrustBundle: how many other objects claim its signer name now.
    pub foreign_trust_bundles: Option<Arc<std::sync::atomic::AtomicU64>>,
}

impl Replica {
    /// Connects, and starts leader election and the ConfigMap publisher (which acts only
    /// while this replica leads; with `linkerd_anchors_ns`, it also writes Linkerd's trust
    /// anchors there).
    // Plain settings, each used once at start; a struct for them would only be unpacked here.
    #[allow(clippy::too_many_arguments)]
    pub async fn start(
        kubeconfig: Option<&Path>,
        namespace: &str,
        identity: Option<String>,
        lease_duration: Duration,
        trust_bundle_signer: Option<&str>,
        clock: &SharedClock,
        shutdown: &Shutdown,
        linkerd_anchors_ns: Option<&str>,
    ) -> Result<Self, String> {
        let client = super::client(kubeconfig).await?;
        let identity = identity.unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
            format!(
                "{}-{}",
                host.trim(),
                &hex::encode(crate::pki::random_serial())[..8]
            )
        });
        let elector = Elector::new(
            client.clone(),
            namespace,
            identity.clone(),
            lease_duration,
            clock.clone(),
        );
        tokio::spawn(elector.clone().run(shutdown.clone()));
        let configmaps = ConfigMapPublisher::new(client.clone(), Some(elector.subscribe()));
        configmaps.jwks_namespace(namespace);
        if let Some(ns) = linkerd_anchors_ns {
            configmaps.publish_linkerd_anchors(ns, clock.clone());
        }
        tokio::spawn(configmaps.clone().run(shutdown.clone()));
        let publisher = configmaps.clone();
        // With the Pod Certificates signer, the bundle is also a ClusterTrustBundle, if this
        // API server has them (a citadel on an older cluster must still start).
        let trust_bundle_signer = match trust_bundle_signer {
            Some(s) if super::podcert::served(&client).await? => Some(s),
            Some(_) => {
                tracing::warn!("this API server does not serve certificates.k8s.io/v1 PodCertificateRequests and ClusterTrustBundles (Kubernetes 1.37+): the Pod Certificates signer is off");
                None
            }
            None => None,
        };
        let mut foreign_trust_bundles = None;
        let publisher: Arc<dyn crate::store::kube::Publisher> = match trust_bundle_signer {
            Some(signer) => {
                let ctb =
                    TrustBundlePublisher::new(client.clone(), signer, Some(elector.subscribe()));
                foreign_trust_bundles = Some(ctb.foreign.clone());
                tokio::spawn(ctb.clone().run(shutdown.clone()));
                tracing::info!(clustertrustbundle = %ctb.name(), "publishing the trust bundle as a ClusterTrustBundle");
                Arc::new(AllPublishers(vec![publisher, ctb]))
            }
            None => publisher,
        };
        tracing::info!(namespace = %namespace, identity = %identity, lease = %crate::duration::format(lease_duration), "Kubernetes store with leader election");
        let store: Arc<dyn Store> =
            Arc::new(KubeStore::new(client.clone(), namespace, Some(publisher)));
        Ok(Self {
            pod_certificates: trust_bundle_signer.is_some(),
            client,
            elector,
            store,
            identity,
            namespace: namespace.to_string(),
            publisher: configmaps,
            foreign_trust_bundles,
        })
    }

    /// The namespace of the CA's Secrets (journal, `cacerts`) and Lease.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// Waits until the store holds a CA journal; the leader creates it, the others wait.
    pub async fn wait_for_ca(&self, opts: &CaOptions, clock: &dyn Clock) -> Result<(), String> {
        let mut waited = 0u32;
        loop {
            if self
                .store
                .load_journal()
                .await
                .map_err(|e| e.to_string())?
                .is_some()
            {
                return Ok(());
            }
            if self.elector.is_leader() {
                bootstrap::load_or_create(self.store.as_ref(), opts, clock)
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

    /// The `cacerts` Secret's files, if the Secret exists (Istio's plugged-in CA).
    pub async fn cacerts(&self) -> Result<Option<plugged::MapSource>, String> {
        let api: kube::Api<k8s_openapi::api::core::v1::Secret> =
            kube::Api::namespaced(self.client.clone(), &self.namespace);
        let secret = api
            .get_opt(super::cacerts::SECRET)
            .await
            .map_err(|e| format!("cannot read Secret {}/cacerts: {e}", self.namespace))?;
        Ok(secret.map(|s| super::cacerts::source(&self.namespace, &s)))
    }

    /// Wakes `wake` whenever the journal Secret changes (another replica or an operator
    /// wrote it), so every replica hot-reloads within moments, not at the next poll.
    pub fn watch_journal(&self, wake: Arc<tokio::sync::Notify>, shutdown: Shutdown) {
        use futures_util::StreamExt;
        use kube::runtime::{watcher, WatchStreamExt};
        let api: kube::Api<k8s_openapi::api::core::v1::Secret> =
            kube::Api::namespaced(self.client.clone(), &self.namespace);
        let cfg = watcher::Config::default().fields(&format!(
            "metadata.name={}",
            crate::store::kube::JOURNAL_SECRET
        ));
        tokio::spawn(async move {
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
        });
    }
}
