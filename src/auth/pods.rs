//! The pod index: the cluster's pods that are not Failed or Succeeded, kept in memory by one
//! watch (`cluster::pods` fills it), with only name, UID, service account and node per pod.
//!
//! Node impersonation (`auth::node`) reads it to tie a caller's token to its pod and node, and
//! each remote cluster (`auth::cluster`) holds one of its own: it sits below both so that
//! neither has to import the other for it. It also knows whether it is current (when its
//! watch broke, on the injected clock); how long a stale index may still be trusted is the
//! authorizer's decision (`--pod-index-max-staleness`), not the index's.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::RwLock;
use std::time::Duration;

use crate::clock::SharedClock;
use crate::identity::ServiceAccount;

/// What the index keeps of one pod: about 100 bytes of strings plus map overhead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRecord {
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// `metadata.uid`.
    pub uid: String,
    /// `spec.serviceAccountName`; empty when the pod names none. Such a pod runs as no
    /// account here (not as `default`): it vouches for nobody, and a caller pod without one
    /// matches no token.
    pub service_account: String,
    /// `spec.nodeName`; `None` until the pod is scheduled.
    pub node: Option<String>,
}

/// One pod as the index holds it (what an impersonation check reads of the caller's pod).
#[derive(Debug, Clone)]
pub(super) struct PodEntry {
    pub(super) uid: Box<str>,
    pub(super) service_account: Box<str>,
    pub(super) node: Option<Box<str>>,
}

/// namespace -> service account -> number of pods (on one node).
type AccountCounts = HashMap<Box<str>, HashMap<Box<str>, u32>>;

/// Pods by namespace and name, and how many pods of each service account each node runs.
#[derive(Default)]
struct Pods {
    /// namespace -> pod name -> entry.
    by_name: HashMap<Box<str>, HashMap<Box<str>, PodEntry>>,
    /// node -> namespace -> service account -> number of pods.
    on_node: HashMap<Box<str>, AccountCounts>,
    len: usize,
}

impl Pods {
    fn count(&mut self, node: &str, ns: &str, sa: &str, add: bool) {
        if add {
            *self
                .on_node
                .entry(node.into())
                .or_default()
                .entry(ns.into())
                .or_default()
                .entry(sa.into())
                .or_default() += 1;
            return;
        }
        let Some(by_ns) = self.on_node.get_mut(node) else {
            return;
        };
        if let Some(by_sa) = by_ns.get_mut(ns) {
            if let Some(n) = by_sa.get_mut(sa) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    by_sa.remove(sa);
                }
            }
            if by_sa.is_empty() {
                by_ns.remove(ns);
            }
        }
        if by_ns.is_empty() {
            self.on_node.remove(node);
        }
    }

    fn remove(&mut self, ns: &str, name: &str) {
        let Some(pods) = self.by_name.get_mut(ns) else {
            return;
        };
        let Some(old) = pods.remove(name) else {
            return;
        };
        if pods.is_empty() {
            self.by_name.remove(ns);
        }
        self.len -= 1;
        if let (Some(node), false) = (&old.node, old.service_account.is_empty()) {
            self.count(node, ns, &old.service_account, false);
        }
    }

    fn upsert(&mut self, p: PodRecord) {
        self.remove(&p.namespace, &p.name);
        if let (Some(node), false) = (&p.node, p.service_account.is_empty()) {
            self.count(node, &p.namespace, &p.service_account, true);
        }
        self.by_name
            .entry(p.namespace.into_boxed_str())
            .or_default()
            .insert(
                p.name.into_boxed_str(),
                PodEntry {
                    uid: p.uid.into_boxed_str(),
                    service_account: p.service_account.into_boxed_str(),
                    node: p.node.map(String::into_boxed_str),
                },
            );
        self.len += 1;
    }
}

/// The pods of the cluster that are not Failed or Succeeded, kept current by one watch.
///
/// Readers take a read lock for two hash lookups; the watch takes the write lock per event,
/// and once to swap in a complete relist.
///
/// It also knows whether it is current: the watch reports when it broke
/// ([`PodIndex::watch_failed`]), and only a complete relist ([`PodIndex::replace_all`]) makes
/// it current again; times come from its clock (the server's, injected).
pub struct PodIndex {
    pods: RwLock<Pods>,
    synced: AtomicBool,
    /// Unix milliseconds at which the watch broke and has not relisted since;
    /// [`HEALTHY`] while it is healthy.
    broken_since_ms: AtomicI64,
    clock: SharedClock,
}

const HEALTHY: i64 = i64::MIN;

impl Default for PodIndex {
    /// An index on the system clock.
    fn default() -> Self {
        Self::new(crate::clock::system())
    }
}

impl PodIndex {
    /// An empty index, not synced, reading time from `clock`.
    pub fn new(clock: SharedClock) -> Self {
        Self {
            pods: RwLock::default(),
            synced: AtomicBool::new(false),
            broken_since_ms: AtomicI64::new(HEALTHY),
            clock,
        }
    }

    fn now_ms(&self) -> i64 {
        (self.clock.now().unix_timestamp_nanos() / 1_000_000) as i64
    }

    /// The watch failed: from now on the index may miss changes, until the next complete
    /// relist. The first failure of an outage counts; repeated ones do not move the time.
    pub fn watch_failed(&self) {
        let now = self.now_ms();
        let _ = self.broken_since_ms.compare_exchange(
            HEALTHY,
            now,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }

    /// How long the index has been possibly out of date: `None` while its watch is healthy,
    /// else the time since the watch broke.
    pub fn stale_for(&self) -> Option<Duration> {
        match self.broken_since_ms.load(Ordering::Acquire) {
            HEALTHY => None,
            since => Some(Duration::from_millis(
                self.now_ms().saturating_sub(since).max(0) as u64,
            )),
        }
    }

    /// Adds or replaces a pod (the watch saw it created or changed).
    pub fn apply(&self, pod: PodRecord) {
        self.write().upsert(pod);
    }

    /// Forgets a pod (deleted, or no longer matching: it became Failed or Succeeded).
    pub fn delete(&self, namespace: &str, name: &str) {
        self.write().remove(namespace, name);
    }

    /// Replaces everything with a complete list (the watch's initial list or a relist), and
    /// marks the index synced and current: until the first list, requests cannot be judged,
    /// and after a watch failure only a complete list proves nothing was missed.
    pub fn replace_all(&self, pods: impl IntoIterator<Item = PodRecord>) {
        let mut fresh = Pods::default();
        for p in pods {
            fresh.upsert(p);
        }
        *self.write() = fresh;
        self.synced.store(true, Ordering::Release);
        self.broken_since_ms.store(HEALTHY, Ordering::Release);
    }

    /// Whether the first complete list has arrived.
    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    /// Pods indexed.
    pub fn len(&self) -> usize {
        self.read().len
    }

    /// Whether no pod is indexed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The heap the index holds, by accounting: every map's table (capacity times key,
    /// value and control byte) and every string's bytes. Allocator overhead per allocation
    /// (about 16 bytes for each of the ~4 strings per pod) is not included.
    pub fn heap_bytes(&self) -> usize {
        use std::mem::size_of;
        fn table<K, V>(m: &HashMap<K, V>) -> usize {
            m.capacity() * (size_of::<K>() + size_of::<V>() + 1)
        }
        let p = self.read();
        let mut n = table(&p.by_name) + table(&p.on_node);
        for (ns, pods) in &p.by_name {
            n += ns.len() + table(pods);
            for (name, e) in pods {
                n += name.len() + e.uid.len() + e.service_account.len();
                n += e.node.as_ref().map_or(0, |x| x.len());
            }
        }
        for (node, by_ns) in &p.on_node {
            n += node.len() + table(by_ns);
            for (ns, by_sa) in by_ns {
                n += ns.len() + table(by_sa) + by_sa.keys().map(|k| k.len()).sum::<usize>();
            }
        }
        n
    }

    /// The caller pod `namespace/name`: its UID, service account and node.
    pub(super) fn pod(&self, namespace: &str, name: &str) -> Option<PodEntry> {
        self.read().by_name.get(namespace)?.get(name).cloned()
    }

    /// Whether `node` runs a pod of `sa`.
    pub fn runs_on(&self, node: &str, sa: &ServiceAccount) -> bool {
        self.read()
            .on_node
            .get(node)
            .and_then(|n| n.get(sa.namespace.as_str()))
            .and_then(|n| n.get(sa.name.as_str()))
            .is_some_and(|c| *c > 0)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Pods> {
        self.pods.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Pods> {
        self.pods.write().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A pod record (also for `auth::node`'s tests).
    pub(in crate::auth) fn rec(
        ns: &str,
        name: &str,
        uid: &str,
        sa: &str,
        node: Option<&str>,
    ) -> PodRecord {
        PodRecord {
            namespace: ns.into(),
            name: name.into(),
            uid: uid.into(),
            service_account: sa.into(),
            node: node.map(Into::into),
        }
    }

    #[test]
    fn the_index_follows_moves_updates_and_deletes() {
        let pods = PodIndex::default();
        pods.replace_all([]);
        let cart = ServiceAccount::new("shop", "cart").unwrap();
        pods.apply(rec("shop", "cart-1", "c1", "cart", None));
        assert!(!pods.runs_on("n1", &cart), "not scheduled yet");
        pods.apply(rec("shop", "cart-1", "c1", "cart", Some("n1")));
        pods.apply(rec("shop", "cart-2", "c2", "cart", Some("n1")));
        assert!(pods.runs_on("n1", &cart));
        assert_eq!(pods.len(), 2);
        pods.delete("shop", "cart-1");
        assert!(pods.runs_on("n1", &cart), "cart-2 is still there");
        pods.delete("shop", "cart-2");
        pods.delete("shop", "cart-2");
        assert!(!pods.runs_on("n1", &cart));
        assert!(pods.is_empty());
        let inner = pods.read();
        assert!(
            inner.on_node.is_empty() && inner.by_name.is_empty(),
            "no empty maps left behind"
        );
    }
}
