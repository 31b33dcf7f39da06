//! The bounded in-memory set of undecided requests a signing controller works from, and its
//! metrics: shared by the Pod Certificates signer (`citadel_pod_cert_*`,
//! `--pod-cert-max-pending`) and the Kubernetes CSR signer (`citadel_csr_*`,
//! `--csr-max-pending`). Each request kind says what "decided" means for it and what of it the
//! store keeps ([`Pendable`]); [`run`] is the controller loop both signers run on it.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{FutureExt, StreamExt, TryFuture, TryStreamExt};
use kube::api::Api;
use kube::runtime::controller::{self, Action};
use kube::runtime::{reflector, watcher, Controller, WatchStreamExt};

/// A request kind a signer decides once: what the bounded cache needs to know of it.
pub trait Pendable: kube::Resource + Clone {
    /// Whether the request needs nothing more from the signer (it is issued, denied or
    /// failed): it leaves memory.
    fn is_decided(&self) -> bool;
    /// The request as the store keeps it: only what deciding and the one `/status` write need.
    fn slim(self) -> Self;
}

/// Drops what no signer reads from a request's metadata (labels, annotations, owner
/// references, finalizers, managedFields): a `/status` write cannot change them anyway, since
/// the API server keeps the stored metadata and spec.
pub fn slim_meta(m: &mut kube::api::ObjectMeta) {
    m.managed_fields = None;
    m.annotations = None;
    m.labels = None;
    m.owner_references = None;
    m.finalizers = None;
}

/// Names the metrics and the flag of one signer's cache.
#[derive(Debug, Clone, Copy, Default)]
pub struct StatsNames {
    /// Metric name prefix, e.g. `citadel_pod_cert`.
    pub prefix: &'static str,
    /// The request kind, plural, for the help text, e.g. `PodCertificateRequests`.
    pub noun: &'static str,
    /// The flag that sets the limit, e.g. `--pod-cert-max-pending`.
    pub flag: &'static str,
}

/// What the signer holds in memory, as `/metrics` shows it.
#[derive(Debug, Default)]
pub struct PendingStats {
    names: StatsNames,
    limit: usize,
    pending: AtomicUsize,
    peak: AtomicUsize,
    deferred: AtomicU64,
    /// Fresh listings made to pick up requests left out at the limit.
    pub relists: AtomicU64,
}

impl PendingStats {
    /// Stats for a cache of at most `limit` requests, named by `names`.
    pub fn new(names: StatsNames, limit: usize) -> Self {
        Self {
            names,
            limit,
            ..Self::default()
        }
    }

    fn set_pending(&self, n: usize) {
        self.pending.store(n, Ordering::Relaxed);
        self.peak.fetch_max(n, Ordering::Relaxed);
    }

    /// Appends the `<prefix>_*` metrics to a Prometheus text exposition.
    pub fn render(&self, out: &mut String) {
        let StatsNames { prefix, noun, flag } = self.names;
        let g = |o: &mut String, name: &str, kind: &str, help: &str, v: u64| {
            let _ = writeln!(
                o,
                "# HELP {prefix}_{name} {help}\n# TYPE {prefix}_{name} {kind}\n{prefix}_{name} {v}"
            );
        };
        g(
            out,
            "pending_requests",
            "gauge",
            &format!("Undecided {noun} the leader holds in memory (decided ones are dropped)."),
            self.pending.load(Ordering::Relaxed) as u64,
        );
        g(
            out,
            "pending_requests_peak",
            "gauge",
            &format!("The most undecided {noun} held in memory at once since start."),
            self.peak.load(Ordering::Relaxed) as u64,
        );
        g(
            out,
            "pending_limit",
            "gauge",
            &format!("Undecided {noun} held in memory at most ({flag})."),
            self.limit as u64,
        );
        g(out, "requests_deferred_total", "counter", &format!("Times one of the {noun} was left in the API server because the in-memory limit was reached; it is listed again when there is room."), self.deferred.load(Ordering::Relaxed));
        g(
            out,
            "relists_total",
            "counter",
            &format!("Times the signer listed {noun} again to pick up ones left out at the limit."),
            self.relists.load(Ordering::Relaxed),
        );
    }
}

/// The bounded in-memory set of requests the controller works from, as a filter in front of
/// its store: each watch event goes through [`Pending::admit`], which passes on what the
/// store should hold. It keeps only undecided requests, slimmed ([`Pendable::slim`]); a request seen
/// decided is removed; a new one that would take the store (plus, during a listing, the
/// listing's buffer) past `limit` is left out and counted. After that, once the store has
/// emptied to half the limit, `admit` says so, and the caller lists again from scratch.
pub struct Pending<K> {
    limit: usize,
    /// The (namespace, name) of every request in the store.
    keys: HashSet<(String, String)>,
    /// During a listing: the requests of the listing's buffer, which replaces the store at
    /// its end.
    listing: Option<HashSet<(String, String)>>,
    /// Some request was left out since the last listing began.
    left_out: bool,
    stats: Arc<PendingStats>,
    _kind: std::marker::PhantomData<fn(K)>,
}

/// A watch event of the request kind.
pub type Event<K> = watcher::Event<K>;

fn key<K: kube::Resource>(p: &K) -> (String, String) {
    let m = p.meta();
    (
        m.namespace.clone().unwrap_or_default(),
        m.name.clone().unwrap_or_default(),
    )
}

impl<K: Pendable> Pending<K> {
    /// An empty cache of at most `limit` requests, reporting to `stats`.
    pub fn new(limit: usize, stats: Arc<PendingStats>) -> Self {
        stats.set_pending(0);
        Self {
            limit,
            keys: HashSet::new(),
            listing: None,
            left_out: false,
            stats,
            _kind: std::marker::PhantomData,
        }
    }

    fn held(&self) -> usize {
        self.keys.len() + self.listing.as_ref().map_or(0, HashSet::len)
    }

    fn leave_out(&mut self) {
        self.left_out = true;
        self.stats.deferred.fetch_add(1, Ordering::Relaxed);
    }

    /// The event for the store (`None`: nothing to store), and whether it is time to list
    /// again (requests were left out and half the room is free).
    pub fn admit(&mut self, event: Event<K>) -> (Option<Event<K>>, bool) {
        let out = match event {
            Event::Apply(p) | Event::Delete(p) if p.is_decided() => {
                self.keys.remove(&key(&p)).then_some(Event::Delete(p))
            }
            Event::Delete(p) => self.keys.remove(&key(&p)).then_some(Event::Delete(p)),
            Event::Apply(p) => {
                let k = key(&p);
                if self.keys.contains(&k) || self.held() < self.limit {
                    self.keys.insert(k);
                    Some(Event::Apply(p.slim()))
                } else {
                    self.leave_out();
                    None
                }
            }
            Event::Init => {
                self.listing = Some(HashSet::new());
                self.left_out = false;
                Some(Event::Init)
            }
            Event::InitApply(p) if p.is_decided() => None,
            Event::InitApply(p) => {
                let k = key(&p);
                let known = self.listing.as_ref().is_some_and(|l| l.contains(&k));
                if known || self.held() < self.limit {
                    self.listing.get_or_insert_default().insert(k);
                    Some(Event::InitApply(p.slim()))
                } else {
                    self.leave_out();
                    None
                }
            }
            Event::InitDone => {
                self.keys = self.listing.take().unwrap_or_default();
                Some(Event::InitDone)
            }
        };
        self.stats.set_pending(self.held());
        let room = self.left_out && self.listing.is_none() && self.keys.len() <= self.limit / 2;
        if room {
            // Said once; the caller starts a fresh listing.
            self.left_out = false;
        }
        (out, room)
    }
}

/// What a signing controller over the cache is made of.
pub struct Bounded<K: kube::Resource, Ctx> {
    /// The requests to watch (cluster-wide or namespaced)...
    pub api: Api<K>,
    /// ...with this selection (a field selector on the signer name, where one suffices)...
    pub config: watcher::Config,
    /// ...of which only these are ours; the rest never reach the cache.
    pub ours: fn(&Ctx, &K) -> bool,
    /// Undecided requests held at most.
    pub limit: usize,
    /// The cache's metrics.
    pub stats: Arc<PendingStats>,
    /// Requests decided at once.
    pub workers: u16,
    /// How long after a failed reconcile it runs again.
    pub retry: Duration,
}

/// Runs one kube-runtime `Controller` over the bounded store ([`Pending`]) rather than its
/// default reflector, which would keep every request of the signer, decided or not, for as
/// long as it exists; until `stop`. When requests had to be left out and half of the room is
/// free again, the controller stops (gracefully: in-flight decisions finish) and a fresh one
/// lists the undecided requests again.
pub async fn run<K, Ctx, F, Fut>(
    b: Bounded<K, Ctx>,
    ctx: Arc<Ctx>,
    stop: super::controller::Stop,
    reconcile: F,
) where
    K: Pendable + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + std::fmt::Debug + Unpin + Default,
    Ctx: Send + Sync + 'static,
    F: FnMut(Arc<K>, Arc<Ctx>) -> Fut + Clone,
    Fut: TryFuture<Ok = Action> + Send + 'static,
    Fut::Error: std::error::Error + Send + 'static,
{
    let stop = stop.shared();
    let noun = b.stats.names.noun;
    loop {
        let relist = Arc::new(tokio::sync::Notify::new());
        let (reader, mut writer) = reflector::store::<K>();
        let mut pending: Pending<K> = Pending::new(b.limit, b.stats.clone());
        let notify = relist.clone();
        let (ours, me) = (b.ours, ctx.clone());
        let trigger = watcher(b.api.clone(), b.config.clone())
            .map_ok(move |event| {
                let event = match event {
                    Event::Apply(k) | Event::InitApply(k) | Event::Delete(k) if !ours(&me, &k) => {
                        None
                    }
                    e => Some(e),
                }?;
                let (event, room) = pending.admit(event);
                if room {
                    notify.notify_one();
                }
                if let Some(e) = &event {
                    writer.apply_watcher_event(e);
                }
                event
            })
            .try_filter_map(|e| std::future::ready(Ok(e)))
            .applied_objects();
        let relisting = Box::pin(async move { relist.notified().await });
        let until = futures_util::future::select(stop.clone(), relisting).map(|_| ());
        let retry = b.retry;
        Controller::for_stream(trigger, reader)
            .with_config(controller::Config::default().concurrency(b.workers))
            .graceful_shutdown_on(until)
            .run(
                reconcile.clone(),
                move |k: Arc<K>, e, _| {
                    let (ns, name) = key(k.as_ref());
                    tracing::warn!(request = %format!("{ns}/{name}"), error = %e, "could not decide one of the {noun} yet; will retry");
                    Action::requeue(retry)
                },
                ctx.clone(),
            )
            .for_each(|_| std::future::ready(()))
            .await;
        if stop.peek().is_some() {
            return;
        }
        b.stats.relists.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            max_pending = b.limit,
            "listing {noun} again: some did not fit in memory and there is room now"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::podcert::{pending_test_request as pcr, STATS_NAMES};
    use k8s_openapi::api::certificates::v1::PodCertificateRequest;

    type Event = super::Event<PodCertificateRequest>;
    type Pending = super::Pending<PodCertificateRequest>;

    fn names(e: &Option<Event>) -> String {
        match e {
            Some(Event::Apply(p)) => format!("apply {}", p.metadata.name.as_deref().unwrap()),
            Some(Event::Delete(p)) => format!("delete {}", p.metadata.name.as_deref().unwrap()),
            Some(Event::InitApply(p)) => format!("list {}", p.metadata.name.as_deref().unwrap()),
            Some(Event::Init) => "init".into(),
            Some(Event::InitDone) => "done".into(),
            None => "-".into(),
        }
    }

    /// The store never holds more than the limit, decided requests leave it, and once requests
    /// were left out, half the room free asks for a new listing (once).
    #[test]
    fn pending_requests_are_bounded_and_decided_ones_leave() {
        let stats = Arc::new(PendingStats::new(STATS_NAMES, 3));
        let mut p = Pending::new(3, stats.clone());
        let mut admit = |e: Event| {
            let (out, room) = p.admit(e);
            (names(&out), room)
        };
        assert_eq!(admit(Event::Init), ("init".into(), false));
        for n in ["a", "b", "c"] {
            assert_eq!(
                admit(Event::InitApply(pcr(n, false))),
                (format!("list {n}"), false)
            );
        }
        // Decided ones are never stored; beyond the limit, left out.
        assert_eq!(
            admit(Event::InitApply(pcr("old", true))),
            ("-".into(), false)
        );
        assert_eq!(
            admit(Event::InitApply(pcr("d", false))),
            ("-".into(), false)
        );
        assert_eq!(admit(Event::InitDone), ("done".into(), false));
        assert_eq!(admit(Event::Apply(pcr("e", false))), ("-".into(), false));
        // An update of one it holds still passes when full.
        assert_eq!(
            admit(Event::Apply(pcr("a", false))),
            ("apply a".into(), false)
        );
        assert_eq!(stats.pending.load(Ordering::Relaxed), 3);
        assert_eq!(stats.deferred.load(Ordering::Relaxed), 2);
        // Decisions empty it; at half the limit (1), it is time to list again, said once.
        assert_eq!(
            admit(Event::Apply(pcr("a", true))),
            ("delete a".into(), false)
        );
        assert_eq!(
            admit(Event::Apply(pcr("b", true))),
            ("delete b".into(), true)
        );
        assert_eq!(
            admit(Event::Delete(pcr("c", false))),
            ("delete c".into(), false)
        );
        assert_eq!(
            admit(Event::Apply(pcr("b", true))),
            ("-".into(), false),
            "gone already"
        );
        assert_eq!(stats.pending.load(Ordering::Relaxed), 0);
        assert_eq!(stats.peak.load(Ordering::Relaxed), 3);
    }

    /// A new listing while the store is full counts against the same limit (the old store
    /// lives until the listing ends), and asks for a fresh one when it ends short.
    #[test]
    fn a_listing_and_the_store_together_stay_under_the_limit() {
        let stats = Arc::new(PendingStats::new(STATS_NAMES, 2));
        let mut p = Pending::new(2, stats.clone());
        for e in [
            Event::Init,
            Event::InitApply(pcr("a", false)),
            Event::InitApply(pcr("b", false)),
            Event::InitDone,
        ] {
            p.admit(e);
        }
        assert!(!p.admit(Event::Init).1);
        assert!(
            p.admit(Event::InitApply(pcr("a", false))).0.is_none(),
            "no room: a is in the old store"
        );
        assert_eq!(stats.peak.load(Ordering::Relaxed), 2);
        let (out, room) = p.admit(Event::InitDone);
        assert!(matches!(out, Some(Event::InitDone)));
        assert!(
            room,
            "the listing came up short: list again with an empty store"
        );
        assert_eq!(stats.pending.load(Ordering::Relaxed), 0);
    }
}
