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
//! other remotes. A kubeconfig that turns off server verification (`insecure-skip-tls-verify`)
//! is refused too: whoever sits on the path to that "API server" would answer its TokenReviews,
//! that is, choose which identities citadel certifies.
//!
//! A cluster id is trusted from ONE Secret. Two Secrets claiming the same id are an error
//! naming both (log, `citadel_remote_cluster_id_conflicts`, a Warning Event on each): the one
//! already in use for that id, unchanged, stays in use; otherwise neither is. So a Secret
//! created next to the real one (all it takes is `create` on Secrets here) can neither take a
//! cluster over by sorting first, nor knock a working one out.

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
use crate::auth::pods::PodIndex;
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
    /// Cluster id → (Secret, kubeconfig digest) it is trusted from now: the claim that keeps
    /// the id when another Secret claims it too.
    in_use: HashMap<String, (String, [u8; 32])>,
    /// Cluster id → the Secrets claiming it, as last reported (reported again only when
    /// this changes).
    conflicts: BTreeMap<String, Vec<String>>,
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
        in_use: HashMap::new(),
        conflicts: BTreeMap::new(),
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
                        tracing::warn!(namespace = %state.namespace, error = %e, "the remote-cluster Secret watch failed (RBAC: secrets list/watch in this namespace, deploy/multicluster.yaml?); the last known remote clusters stay in use until it recovers");
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
        let mut in_use = HashMap::new();
        let mut built = HashMap::new();
        let mut invalid = 0u64;
        let secrets = std::mem::take(&mut self.secrets);
        let claims = claimants(&secrets, &self.local);
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
                        let contested = claims.get(id).is_some_and(|c| c.len() > 1);
                        let incumbent = self.in_use.get(id) == Some(&(secret.clone(), digest));
                        if !contested || incumbent {
                            clusters.insert(id.clone(), c.clone());
                            in_use.insert(id.clone(), (secret.clone(), digest));
                        }
                    }
                }
                built.insert(key, b);
            }
        }
        let conflicts: BTreeMap<String, Vec<String>> =
            claims.into_iter().filter(|(_, s)| s.len() > 1).collect();
        if conflicts != self.conflicts {
            for (id, names) in &conflicts {
                if self.conflicts.get(id) != Some(names) {
                    self.report_conflict(id, names, in_use.get(id).map(|(s, _)| s.as_str()));
                }
            }
            for id in self
                .conflicts
                .keys()
                .filter(|id| !conflicts.contains_key(*id))
            {
                tracing::info!(cluster = %id, "cluster id claimed by one Secret again");
            }
        }
        self.registry
            .conflicts
            .store(conflicts.len() as u64, Ordering::Relaxed);
        self.conflicts = conflicts;
        self.in_use = in_use;
        self.secrets = secrets;
        self.built = built;
        self.registry.invalid.store(invalid, Ordering::Relaxed);
        self.registry.replace(clusters);
        tracing::info!(clusters = ?self.registry.ids(), invalid, "remote clusters updated");
    }

    /// Logs (error) and records on each claiming Secret that `id` is claimed by all of
    /// `names`, and which one, if any, is still trusted for it.
    fn report_conflict(&self, id: &str, names: &[String], kept: Option<&str>) {
        let listed = names
            .iter()
            .map(|n| format!("{}/{n}", self.namespace))
            .collect::<Vec<_>>()
            .join(", ");
        let outcome = match kept {
            Some(k) => format!("{}/{k}, which was already in use for it unchanged, stays in use; the others are ignored", self.namespace),
            None => "none of them is used: the cluster's tokens are refused".to_string(),
        };
        let why = format!(
            "cluster id {id:?} is claimed by more than one remote-cluster Secret ({listed}); {outcome} until only one claims it"
        );
        tracing::error!(namespace = %self.namespace, cluster = id, secrets = %listed, kept = kept.unwrap_or(""), "{why}");
        for secret in names {
            self.warn_event(secret, "DuplicateClusterId", why.clone());
        }
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
                self.warn_event(
                    secret,
                    "InvalidKubeconfig",
                    format!("cluster {id:?}: {why}; its tokens are refused until the kubeconfig is fixed"),
                );
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
    fn warn_event(&self, secret: &str, reason: &str, note: String) {
        let ev = events::Event {
            type_: EventType::Warning,
            reason: reason.into(),
            note: Some(note),
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

/// Cluster id → the Secrets (by name, sorted) that have a key for it; the local id is left
/// out (it is ignored wherever it appears).
fn claimants(
    secrets: &BTreeMap<String, BTreeMap<String, Vec<u8>>>,
    local: &str,
) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (secret, data) in secrets {
        for id in data.keys().filter(|id| id.as_str() != local) {
            out.entry(id.clone()).or_default().push(secret.clone());
        }
    }
    out
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
/// command or reads a file of this pod. Everything must be inline (`*-data`, `token`). Also
/// refuses `insecure-skip-tls-verify`: the remote API server answers the TokenReviews that
/// decide which identities citadel certifies, so it must be the one the kubeconfig names.
pub fn check_kubeconfig(kc: &Kubeconfig) -> Result<(), String> {
    for c in &kc.clusters {
        let Some(cluster) = c.cluster.as_ref() else {
            continue;
        };
        if cluster.certificate_authority.is_some() {
            return Err(format!(
                "cluster {:?} reads certificate-authority from a file; use certificate-authority-data",
                c.name
            ));
        }
        if cluster.insecure_skip_tls_verify == Some(true) {
            return Err(format!(
                "cluster {:?} sets insecure-skip-tls-verify: anyone on the path could answer its \
                 TokenReviews and so choose the identities citadel certifies; give the API \
                 server's CA in certificate-authority-data instead",
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

    /// A self-contained kubeconfig whose API server CA is a real certificate (kube parses it
    /// when building the client).
    fn inline() -> String {
        use base64::Engine;
        let key = rcgen::KeyPair::generate().unwrap();
        let ca = rcgen::CertificateParams::new(vec!["b.example".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let data = base64::engine::general_purpose::STANDARD.encode(ca.pem());
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: b\n  cluster:\n    server: https://127.0.0.1:1\n    certificate-authority-data: {data}\nusers:\n- name: b\n  user:\n    token: abc\ncontexts:\n- name: b\n  context:\n    cluster: b\n    user: b\ncurrent-context: b\n"
        )
    }

    #[tokio::test]
    async fn inline_kubeconfigs_load_and_file_exec_or_unverified_ones_are_refused() {
        crate::install_crypto_provider();
        let inline = inline();
        client_from(inline.as_bytes()).await.unwrap();
        let ca_line = inline
            .lines()
            .find(|l| l.contains("certificate-authority-data"))
            .unwrap()
            .to_string()
            + "\n";
        let cases = [
            ("    token: abc\n", "    exec:\n      command: /bin/sh\n      apiVersion: client.authentication.k8s.io/v1\n".to_string(), "exec"),
            ("    token: abc\n", "    tokenFile: /var/run/secrets/token\n".to_string(), "tokenFile"),
            ("    token: abc\n", "    client-key: /etc/key.pem\n".to_string(), "client-key"),
            (ca_line.as_str(), "    certificate-authority: /etc/ca.pem\n".to_string(), "certificate-authority"),
            (ca_line.as_str(), "    insecure-skip-tls-verify: true\n".to_string(), "insecure-skip-tls-verify"),
            // Even next to a CA: the flag would turn verification off.
            (ca_line.as_str(), format!("{ca_line}    insecure-skip-tls-verify: true\n"), "insecure-skip-tls-verify"),
        ];
        for (old, new, field) in cases {
            let text = inline.replace(old, &new);
            assert_ne!(text, inline);
            let err = client_from(text.as_bytes()).await.err().unwrap();
            assert!(err.contains(field), "{field}: {err}");
        }
        // Saying false is saying nothing.
        let text = inline.replace(
            &ca_line,
            &format!("{ca_line}    insecure-skip-tls-verify: false\n"),
        );
        client_from(text.as_bytes()).await.unwrap();
        for garbage in [&b"\xff\xfe"[..], b"{", b"- a\n- b\n", b"", b"clusters: 7"] {
            let err = client_from(garbage).await.err().unwrap();
            assert!(!err.is_empty());
        }
        // Errors never quote the content (a token in a broken kubeconfig stays out of logs).
        let leaky = inline.replace("current-context: b", "current-context: [secret-token-xyz");
        let err = client_from(leaky.as_bytes()).await.err().unwrap();
        assert!(!err.contains("secret-token-xyz"), "{err}");
    }

    #[test]
    fn claimants_list_every_secret_per_cluster_id_but_the_local_one() {
        let secrets: BTreeMap<String, BTreeMap<String, Vec<u8>>> = [
            ("b-secret", &["cluster-b", "cluster-a"][..]),
            ("a-evil", &["cluster-b"][..]),
            ("c-secret", &["cluster-c"][..]),
        ]
        .into_iter()
        .map(|(n, ids)| {
            (
                n.to_string(),
                ids.iter().map(|i| (i.to_string(), Vec::new())).collect(),
            )
        })
        .collect();
        let c = claimants(&secrets, "cluster-a");
        assert_eq!(c["cluster-b"], vec!["a-evil", "b-secret"]);
        assert_eq!(c["cluster-c"], vec!["c-secret"]);
        assert!(!c.contains_key("cluster-a"));
    }
}
