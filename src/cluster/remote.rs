//! Remote clusters, learnt the way istiod learns them (`--multicluster`): Secrets in citadel's
//! namespace labelled `istio/multiCluster: "true"`, each data key a cluster id and each value
//! that cluster's kubeconfig (what `istioctl create-remote-secret` writes). One watch keeps
//! [`RemoteClusters`] current: a Secret (or key) added, changed or deleted changes the set of
//! clusters whose tokens are accepted for the next request.
//!
//! Each remote cluster gets its own client and its own token authenticator (TokenReview: its
//! own cache, single-flight and rate limit), so a slow or hostile remote API server cannot use
//! up the local cluster's review budget. An unchanged kubeconfig keeps its authenticator (and
//! its cache) across Secret updates.
//!
//! A kubeconfig in a Secret is data anyone who may write Secrets in this namespace controls,
//! so, as istiod by default, one that would run a command (`exec`, `auth-provider`) or read
//! this pod's files (`tokenFile`, certificate and key paths) is refused. A refused or broken
//! kubeconfig is logged naming the Secret and the key (never its content), counted, and
//! recorded as a Warning Event on the Secret; it affects neither the local cluster nor the
//! other remotes.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::core::v1::Secret;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::events::{self, EventType, Recorder, Reporter};
use kube::runtime::watcher::{self, watcher, Event};
use kube::runtime::WatchStreamExt;

use crate::auth::cluster::{RemoteCluster, RemoteClusters};
use crate::auth::node::PodIndex;
use crate::auth::Authenticator;
use crate::shutdown::{self, Shutdown, Trigger};

/// The label istiod selects remote-cluster Secrets by.
pub const LABEL_SELECTOR: &str = "istio/multiCluster=true";

/// How often a remote API server is probed for `citadel_remote_clusters{state="reachable"}`.
const PROBE_INTERVAL: Duration = Duration::from_secs(30);

/// Builds the token authenticator for one remote cluster from its client.
pub type MakeAuthenticator = Arc<dyn Fn(kube::Client) -> Arc<dyn Authenticator> + Send + Sync>;

/// What a Secret key turned into, remembered by the digest of its content so that an
/// unchanged kubeconfig is neither rebuilt nor reported again.
struct Built {
    digest: [u8; 32],
    cluster: Option<Arc<RemoteCluster>>,
    /// Stops this cluster's pod watch when the entry goes (Secret or key removed, or the
    /// kubeconfig changed).
    _pods: Option<StopOnDrop>,
}

/// Triggers its shutdown signal when dropped.
struct StopOnDrop(Trigger);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.trigger();
    }
}

struct State {
    namespace: String,
    local: String,
    make: MakeAuthenticator,
    registry: Arc<RemoteClusters>,
    /// Whether each remote cluster gets a pod watch (node impersonation is configured).
    with_pods: bool,
    shutdown: Shutdown,
    /// Warning Events on a Secret whose kubeconfig is refused (best effort).
    recorder: Recorder,
    /// Secret name → (key → kubeconfig bytes).
    secrets: BTreeMap<String, BTreeMap<String, Vec<u8>>>,
    /// (Secret name, key) → what was built from it.
    built: HashMap<(String, String), Built>,
}

/// Starts the watch on `namespace`'s remote-cluster Secrets through `client` (the local
/// cluster's), keeping `registry` current until shutdown; `local` is this cluster's own id,
/// which a Secret may not claim. With `with_pods` (node impersonation is on), each remote
/// cluster also gets its own pod watch and index (RBAC in that cluster: pods list/watch).
pub fn watch(
    client: kube::Client,
    namespace: String,
    local: String,
    make: MakeAuthenticator,
    registry: Arc<RemoteClusters>,
    with_pods: bool,
    shutdown: Shutdown,
) {
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "citadel".into(),
            instance: std::env::var("POD_NAME").ok(),
        },
    );
    let api: kube::Api<Secret> = kube::Api::namespaced(client, &namespace);
    let cfg = watcher::Config::default().labels(LABEL_SELECTOR);
    let mut state = State {
        namespace,
        local,
        make,
        registry,
        with_pods,
        shutdown: shutdown.clone(),
        recorder,
        secrets: BTreeMap::new(),
        built: HashMap::new(),
    };
    tokio::spawn(async move {
        let mut events = watcher(api, cfg).default_backoff().boxed();
        // A relist is buffered and swapped in whole at InitDone, so a Secret missing from it
        // (deleted while the watch was down) is dropped then.
        let mut relist: Option<BTreeMap<String, BTreeMap<String, Vec<u8>>>> = None;
        let mut failing = false;
        loop {
            let event = tokio::select! {
                e = events.next() => e,
                _ = shutdown.wait() => return,
            };
            match event {
                None => return,
                Some(Err(e)) => {
                    if !failing {
                        tracing::warn!(namespace = %state.namespace, error = %e, "the remote-cluster Secret watch failed (RBAC: secrets list/watch in this namespace?); the last known remote clusters stay in use until it recovers");
                    }
                    failing = true;
                }
                Some(Ok(ev)) => {
                    if failing {
                        tracing::info!("the remote-cluster Secret watch recovered");
                        failing = false;
                    }
                    match ev {
                        Event::Init => relist = Some(BTreeMap::new()),
                        Event::InitApply(s) => {
                            if let (Some(buf), Some((name, data))) = (relist.as_mut(), entry(s)) {
                                buf.insert(name, data);
                            }
                        }
                        Event::InitDone => {
                            state.secrets = relist.take().unwrap_or_default();
                            state.rebuild().await;
                            state.registry.synced.store(true, Ordering::Release);
                        }
                        Event::Apply(s) => {
                            if let Some((name, data)) = entry(s) {
                                state.secrets.insert(name, data);
                                state.rebuild().await;
                            }
                        }
                        Event::Delete(s) => {
                            if let Some(name) = s.metadata.name {
                                state.secrets.remove(&name);
                                state.rebuild().await;
                            }
                        }
                    }
                }
            }
        }
    });
}

/// A Secret's name and its data (key → bytes).
fn entry(s: Secret) -> Option<(String, BTreeMap<String, Vec<u8>>)> {
    let name = s.metadata.name?;
    let data = s
        .data
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, v.0))
        .collect();
    Some((name, data))
}

impl State {
    /// Recomputes the set of remote clusters from the Secrets and swaps it in whole.
    async fn rebuild(&mut self) {
        let mut clusters: HashMap<String, Arc<RemoteCluster>> = HashMap::new();
        let mut built = HashMap::new();
        let mut invalid = 0u64;
        let secrets = std::mem::take(&mut self.secrets);
        for (secret, data) in &secrets {
            for (id, bytes) in data {
                let key = (secret.clone(), id.clone());
                let digest = digest(bytes);
                let b = match self.built.remove(&key) {
                    Some(b) if b.digest == digest => b,
                    _ => self.build(secret, id, bytes, digest).await,
                };
                match &b.cluster {
                    None if id != &self.local => invalid += 1,
                    None => {}
                    Some(c) => {
                        if clusters.contains_key(id) {
                            tracing::warn!(secret = %secret, cluster = %id, "cluster id is also given by an earlier Secret (by name); this one is ignored");
                        } else {
                            clusters.insert(id.clone(), c.clone());
                        }
                    }
                }
                built.insert(key, b);
            }
        }
        self.secrets = secrets;
        self.built = built;
        self.registry.invalid.store(invalid, Ordering::Relaxed);
        self.registry.replace(clusters);
        tracing::info!(clusters = ?self.registry.ids(), invalid, "remote clusters updated");
    }

    /// The remote cluster of one Secret key; without a cluster (logged and counted) when its
    /// kubeconfig is unusable or it claims the local cluster's id.
    async fn build(&self, secret: &str, id: &str, bytes: &[u8], digest: [u8; 32]) -> Built {
        let none = Built {
            digest,
            cluster: None,
            _pods: None,
        };
        if id == self.local {
            tracing::warn!(namespace = %self.namespace, secret, cluster = id, "a remote-cluster Secret names the local cluster (--cluster-id); ignored");
            return none;
        }
        let client = match client_from(bytes).await {
            Ok(c) => c,
            Err(why) => {
                self.registry
                    .kubeconfig_errors
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(namespace = %self.namespace, secret, cluster = id, error = %why, "unusable remote-cluster kubeconfig: this cluster's tokens are refused; the local cluster and other remotes are unaffected");
                self.warn_event(secret, id, &why);
                return none;
            }
        };
        let (pods, stop) = if self.with_pods {
            // Its own signal, also fired by the global one, so the watch ends with the entry.
            let (trigger, sd) = shutdown::channel();
            let (global, t) = (self.shutdown.clone(), trigger.clone());
            let mine = sd.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = global.wait() => t.trigger(),
                    _ = mine.wait() => {}
                }
            });
            let index = Arc::new(PodIndex::default());
            super::pods::watch(client.clone(), index.clone(), sd);
            (Some(index), Some(StopOnDrop(trigger)))
        } else {
            (None, None)
        };
        let cluster = Arc::new(RemoteCluster {
            authenticator: (self.make)(client.clone()),
            pods,
            reachable: AtomicBool::new(false),
        });
        tracing::info!(
            secret,
            cluster = id,
            pod_index = self.with_pods,
            "remote cluster loaded"
        );
        probe(
            id.to_string(),
            client,
            Arc::downgrade(&cluster),
            self.shutdown.clone(),
        );
        Built {
            digest,
            cluster: Some(cluster),
            _pods: stop,
        }
    }
}

impl State {
    /// A Warning Event on the Secret, so `kubectl describe secret` shows why its cluster is
    /// not used. Sent in the background (a slow API server must not delay the other
    /// clusters); a missing RBAC rule is only logged at debug.
    fn warn_event(&self, secret: &str, id: &str, why: &str) {
        let ev = events::Event {
            type_: EventType::Warning,
            reason: "InvalidKubeconfig".into(),
            note: Some(format!(
                "cluster {id:?}: {why}; its tokens are refused until the kubeconfig is fixed"
            )),
            action: "LoadRemoteCluster".into(),
            secondary: None,
        };
        let reference = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Secret".into()),
            name: Some(secret.to_string()),
            namespace: Some(self.namespace.clone()),
            ..Default::default()
        };
        let recorder = self.recorder.clone();
        tokio::spawn(async move {
            if let Err(e) = recorder.publish(&ev, &reference).await {
                tracing::debug!(error = %e, "could not record a Kubernetes Event");
            }
        });
    }
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// A client from a kubeconfig held in a Secret. Error texts never quote the content.
pub async fn client_from(bytes: &[u8]) -> Result<kube::Client, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "the kubeconfig is not UTF-8 text")?;
    let kc = Kubeconfig::from_yaml(text)
        .map_err(|_| "the value is not a kubeconfig (YAML that kube can read)".to_string())?;
    check_kubeconfig(&kc)?;
    let mut config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .map_err(|e| format!("the kubeconfig cannot be used: {e}"))?;
    // A dead remote must not hold a request for the default minutes.
    config.connect_timeout = Some(Duration::from_secs(5));
    config.read_timeout = Some(Duration::from_secs(10));
    kube::Client::try_from(config).map_err(|e| format!("cannot build the client: {e}"))
}

/// Refuses what istiod refuses by default in a remote kubeconfig: anything that runs a
/// command or reads a file of this pod. Everything must be inline (`*-data`, `token`).
pub fn check_kubeconfig(kc: &Kubeconfig) -> Result<(), String> {
    for c in &kc.clusters {
        if c.cluster
            .as_ref()
            .is_some_and(|c| c.certificate_authority.is_some())
        {
            return Err(format!(
                "cluster {:?} reads certificate-authority from a file; use certificate-authority-data",
                c.name
            ));
        }
    }
    for u in &kc.auth_infos {
        let Some(a) = &u.auth_info else { continue };
        let refused = [
            (a.exec.is_some(), "exec"),
            (a.auth_provider.is_some(), "auth-provider"),
            (a.token_file.is_some(), "tokenFile"),
            (a.client_certificate.is_some(), "client-certificate"),
            (a.client_key.is_some(), "client-key"),
        ];
        if let Some((_, what)) = refused.iter().find(|(bad, _)| *bad) {
            return Err(format!(
                "user {:?} uses {what}, which would run a command or read a local file; \
                 remote kubeconfigs must be self-contained (token or *-data fields)",
                u.name
            ));
        }
    }
    Ok(())
}

/// Probes the remote API server until the cluster is dropped or shutdown, keeping its
/// `reachable` flag current; logs a change of state only.
fn probe(id: String, client: kube::Client, cluster: Weak<RemoteCluster>, shutdown: Shutdown) {
    tokio::spawn(async move {
        let mut last: Option<bool> = None;
        loop {
            let ok = tokio::time::timeout(Duration::from_secs(10), client.apiserver_version())
                .await
                .map_err(|_| "timed out".to_string())
                .and_then(|r| r.map(|_| ()).map_err(|e| e.to_string()));
            let Some(c) = cluster.upgrade() else { return };
            c.reachable.store(ok.is_ok(), Ordering::Relaxed);
            drop(c);
            if last != Some(ok.is_ok()) {
                match &ok {
                    Ok(()) => tracing::info!(cluster = %id, "remote API server reachable"),
                    Err(e) => {
                        tracing::warn!(cluster = %id, error = %e, "remote API server unreachable")
                    }
                }
                last = Some(ok.is_ok());
            }
            tokio::select! {
                _ = tokio::time::sleep(PROBE_INTERVAL) => {}
                _ = shutdown.wait() => return,
            }
            if cluster.strong_count() == 0 {
                return;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    const INLINE: &str = "apiVersion: v1\nkind: Config\nclusters:\n- name: b\n  cluster:\n    server: https://127.0.0.1:1\n    insecure-skip-tls-verify: true\nusers:\n- name: b\n  user:\n    token: abc\ncontexts:\n- name: b\n  context:\n    cluster: b\n    user: b\ncurrent-context: b\n";

    #[tokio::test]
    async fn inline_kubeconfigs_load_and_file_or_exec_ones_are_refused() {
        crate::install_crypto_provider();
        client_from(INLINE.as_bytes()).await.unwrap();
        let cases = [
            ("    token: abc\n", "    exec:\n      command: /bin/sh\n      apiVersion: client.authentication.k8s.io/v1\n", "exec"),
            ("    token: abc\n", "    tokenFile: /var/run/secrets/token\n", "tokenFile"),
            ("    token: abc\n", "    client-key: /etc/key.pem\n", "client-key"),
            ("    insecure-skip-tls-verify: true\n", "    certificate-authority: /etc/ca.pem\n", "certificate-authority"),
        ];
        for (old, new, field) in cases {
            let text = INLINE.replace(old, new);
            assert_ne!(text, INLINE);
            let err = client_from(text.as_bytes()).await.err().unwrap();
            assert!(err.contains(field), "{field}: {err}");
        }
        for garbage in [&b"\xff\xfe"[..], b"{", b"- a\n- b\n", b"", b"clusters: 7"] {
            let err = client_from(garbage).await.err().unwrap();
            assert!(!err.is_empty());
        }
        // Errors never quote the content (a token in a broken kubeconfig stays out of logs).
        let leaky = INLINE.replace("current-context: b", "current-context: [secret-token-xyz");
        let err = client_from(leaky.as_bytes()).await.err().unwrap();
        assert!(!err.contains("secret-token-xyz"), "{err}");
    }
}
