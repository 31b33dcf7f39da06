//! The bounded in-memory set of undecided requests the leader works from, and its
//! `citadel_pod_cert_*` metrics (`--pod-cert-max-pending`).

use std::collections::HashSet;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use k8s_openapi::api::certificates::v1::PodCertificateRequest;
use kube::runtime::watcher;

use super::status::is_decided;

/// What the signer holds in memory, as `/metrics` shows it.
#[derive(Debug, Default)]
pub struct PendingStats {
    limit: usize,
    pending: AtomicUsize,
    peak: AtomicUsize,
    deferred: AtomicU64,
    /// Fresh listings made to pick up requests left out at the limit.
    pub(super) relists: AtomicU64,
}

impl PendingStats {
    /// Stats for a cache of at most `limit` requests.
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            ..Self::default()
        }
    }

    fn set_pending(&self, n: usize) {
        self.pending.store(n, Ordering::Relaxed);
        self.peak.fetch_max(n, Ordering::Relaxed);
    }

    /// Appends the `citadel_pod_cert_*` metrics to a Prometheus text exposition.
    pub fn render(&self, out: &mut String) {
        let g = |o: &mut String, name: &str, kind: &str, help: &str, v: u64| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
        };
        g(out, "citadel_pod_cert_pending_requests", "gauge", "Undecided PodCertificateRequests the leader holds in memory (decided ones are dropped).", self.pending.load(Ordering::Relaxed) as u64);
        g(
            out,
            "citadel_pod_cert_pending_requests_peak",
            "gauge",
            "The most undecided PodCertificateRequests held in memory at once since start.",
            self.peak.load(Ordering::Relaxed) as u64,
        );
        g(
            out,
            "citadel_pod_cert_pending_limit",
            "gauge",
            "Undecided PodCertificateRequests held in memory at most (--pod-cert-max-pending).",
            self.limit as u64,
        );
        g(out, "citadel_pod_cert_requests_deferred_total", "counter", "Times a PodCertificateRequest was left in the API server because the in-memory limit was reached; it is listed again when there is room.", self.deferred.load(Ordering::Relaxed));
        g(out, "citadel_pod_cert_relists_total", "counter", "Times the signer listed PodCertificateRequests again to pick up ones left out at the limit.", self.relists.load(Ordering::Relaxed));
    }
}

/// The bounded in-memory set of requests the controller works from, as a filter in front of
/// its store: each watch event goes through [`Pending::admit`], which passes on what the
/// store should hold. It keeps only undecided requests, slimmed ([`slim`]); a request seen
/// decided is removed; a new one that would take the store (plus, during a listing, the
/// listing's buffer) past `limit` is left out and counted. After that, once the store has
/// emptied to half the limit, `admit` says so, and the caller lists again from scratch.
pub struct Pending {
    limit: usize,
    /// The (namespace, name) of every request in the store.
    keys: HashSet<(String, String)>,
    /// During a listing: the requests of the listing's buffer, which replaces the store at
    /// its end.
    listing: Option<HashSet<(String, String)>>,
    /// Some request was left out since the last listing began.
    left_out: bool,
    stats: Arc<PendingStats>,
}

pub type Event = watcher::Event<PodCertificateRequest>;

fn key(p: &PodCertificateRequest) -> (String, String) {
    (
        p.metadata.namespace.clone().unwrap_or_default(),
        p.metadata.name.clone().unwrap_or_default(),
    )
}

impl Pending {
    pub fn new(limit: usize, stats: Arc<PendingStats>) -> Self {
        stats.set_pending(0);
        Self {
            limit,
            keys: HashSet::new(),
            listing: None,
            left_out: false,
            stats,
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
    pub fn admit(&mut self, event: Event) -> (Option<Event>, bool) {
        let out = match event {
            Event::Apply(p) | Event::Delete(p) if is_decided(&p) => {
                self.keys.remove(&key(&p)).then_some(Event::Delete(p))
            }
            Event::Delete(p) => self.keys.remove(&key(&p)).then_some(Event::Delete(p)),
            Event::Apply(p) => {
                let k = key(&p);
                if self.keys.contains(&k) || self.held() < self.limit {
                    self.keys.insert(k);
                    Some(Event::Apply(slim(p)))
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
            Event::InitApply(p) if is_decided(&p) => None,
            Event::InitApply(p) => {
                let k = key(&p);
                let known = self.listing.as_ref().is_some_and(|l| l.contains(&k));
                if known || self.held() < self.limit {
                    self.listing.get_or_insert_default().insert(k);
                    Some(Event::InitApply(slim(p)))
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

/// A request as the store keeps it: what deciding and the one `/status` write need. Labels,
/// annotations, owner references and managedFields go (a status write cannot change them
/// anyway: the API server keeps the stored metadata and spec), and of
/// `unverifiedUserAnnotations` (up to 256 KiB) only the names the denial message shows.
fn slim(mut p: PodCertificateRequest) -> PodCertificateRequest {
    let m = &mut p.metadata;
    m.managed_fields = None;
    m.annotations = None;
    m.labels = None;
    m.owner_references = None;
    m.finalizers = None;
    if let Some(a) = p.spec.unverified_user_annotations.as_mut() {
        *a = a
            .keys()
            .take(5)
            .map(|k| (k.clone(), String::new()))
            .collect();
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::podcert::status::{deny, reason, status};
    use crate::cluster::podcert::DEFAULT_SIGNER_NAME;
    use time::macros::datetime;

    fn pcr(name: &str, decided: bool) -> PodCertificateRequest {
        let mut p: PodCertificateRequest = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "shop",
                         "annotations": {"big": "x".repeat(10_000)},
                         "managedFields": [{"manager": "kubelet", "operation": "Update"}]},
            "spec": {"signerName": DEFAULT_SIGNER_NAME, "podName": "web", "podUID": "u",
                     "serviceAccountName": "cart", "serviceAccountUID": "s",
                     "nodeName": "node-a", "nodeUID": "n", "stubPKCS10Request": ""},
        }))
        .unwrap();
        if decided {
            p.status = Some(status(
                deny(reason::POD_NOT_FOUND, "no"),
                datetime!(2030-01-01 00:00 UTC),
                None,
            ));
        }
        p
    }

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
        let stats = Arc::new(PendingStats::new(3));
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
        let stats = Arc::new(PendingStats::new(2));
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

    #[test]
    fn the_store_keeps_a_slim_request() {
        let mut p = pcr("a", false);
        p.spec.unverified_user_annotations = Some(
            (0..7)
                .map(|i| (format!("example.com/k{i}"), "v".repeat(1000)))
                .collect(),
        );
        let s = slim(p);
        assert!(s.metadata.annotations.is_none() && s.metadata.managed_fields.is_none());
        let a = s.spec.unverified_user_annotations.unwrap();
        assert_eq!(a.len(), 5, "still non-empty: the request is still denied");
        assert!(a.values().all(String::is_empty));
        assert_eq!(s.spec.pod_name, "web");
    }
}
