//! A plugged-in CA that changes while serving: new `cacerts` material (a directory's files
//! or the `cacerts` Secret's data) is validated, then installed without a restart, or refused
//! with a reason while the old signer keeps signing.
//!
//! The trust bundle follows a swap to a new root with an overlap: the old root stays in the
//! bundle (ConfigMaps, ClusterTrustBundle, `root-cert.pem`, the last element of every
//! response, the client-certificate verifier) until every leaf the old chain may have signed
//! has expired, i.e. `min(swap + --max-ttl, old chain notAfter) + --clock-skew-margin`. That
//! "previous roots until T" record is persisted through [`OverlapStore`] *before* the new
//! signer is installed, so a restart during the overlap still publishes both roots.
//!
//! [`decide`] and [`prune`] are pure (now is an argument); [`Reloader`] performs them.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;

use super::plugged::{self, MapSource};
use super::{Ca, CaError, Signer};
use crate::clock::SharedClock;
use crate::future::BoxFuture;
use crate::identity::TrustDomain;
use crate::pki::pem;
use crate::store::Store;

/// The files of Istio's cacerts layout that make up one set of material.
pub const FILES: [&str; 5] = [
    "ca-cert.pem",
    "ca-key.pem",
    "cert-chain.pem",
    "root-cert.pem",
    "ca-crl.pem",
];

/// New material must stay valid at least this long, or it is refused: a CA about to expire
/// would be installed only to make every request fail minutes later.
pub const MIN_REMAINING: Duration = Duration::from_secs(3600);

/// A root that left the plugged-in material but stays in the bundle until `until`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PreviousRoot {
    /// The root certificate, PEM.
    pub pem: String,
    /// Unix time after which no leaf signed under it can still be valid.
    pub until: i64,
}

/// The roots kept in the bundle after swaps (the persisted overlap state).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Overlap {
    /// Previous roots, each with its own end of overlap.
    pub roots: Vec<PreviousRoot>,
}

impl Overlap {
    /// Adds `pem` until `until`, or extends an entry already there (never shortens it).
    fn keep(&mut self, pem: String, until: i64) {
        match self.roots.iter_mut().find(|r| r.pem == pem) {
            Some(r) => r.until = r.until.max(until),
            None => self.roots.push(PreviousRoot { pem, until }),
        }
    }

    /// Both records' roots, each until the later of the two times (replicas merge theirs).
    pub fn merge(&self, other: &Overlap) -> Overlap {
        let mut out = self.clone();
        for r in &other.roots {
            out.keep(r.pem.clone(), r.until);
        }
        out
    }

    fn ders(&self) -> Vec<CertificateDer<'static>> {
        self.roots
            .iter()
            .filter_map(|r| pem::parse_certs(r.pem.as_bytes()).ok())
            .flatten()
            .collect()
    }
}

/// What to do with new material.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Install it; persist `overlap` first. `new_root` says the bundle changed roots.
    Install {
        /// The overlap state to persist, then to add to the new signer's bundle.
        overlap: Overlap,
        /// The new material's roots differ from the old ones.
        new_root: bool,
    },
    /// Keep the old signer; the reason names the file and the problem.
    Refuse(String),
}

/// Decides whether `candidate` (the result of [`plugged::load_from`] on the new material)
/// replaces the signer whose material had `active_roots` and whose chain ends at
/// `active_chain_not_after`. Pure: `now`, `max_ttl` and `skew` are arguments.
pub fn decide(
    active_roots: &[CertificateDer<'static>],
    active_chain_not_after: OffsetDateTime,
    overlap: &Overlap,
    candidate: Result<&Signer, &CaError>,
    now: OffsetDateTime,
    max_ttl: Duration,
    skew: Duration,
) -> Decision {
    let new = match candidate {
        Ok(s) => s,
        Err(e) => return Decision::Refuse(e.to_string()),
    };
    let not_after = new.chain_not_after();
    if not_after < now + MIN_REMAINING {
        return Decision::Refuse(format!(
            "ca-cert.pem: the signing chain expires at {not_after}, less than {} from now",
            crate::duration::format(MIN_REMAINING)
        ));
    }
    let new_roots = new.roots_der();
    let in_new = |d: &[u8]| new_roots.iter().any(|r| r.as_ref() == d);
    // A leaf signed by the old chain lives at most max_ttl and never past that chain.
    let last_leaf = (now + max_ttl).min(active_chain_not_after);
    let until = (last_leaf + skew).unix_timestamp();
    let mut next = prune(overlap, now).unwrap_or_else(|| overlap.clone());
    // A root that came back is part of the material again, not an overlap.
    next.roots.retain(|r| {
        pem::parse_certs(r.pem.as_bytes())
            .map(|c| !c.iter().any(|c| in_new(c.as_ref())))
            .unwrap_or(false)
    });
    let mut new_root = false;
    for old in active_roots.iter().filter(|r| !in_new(r.as_ref())) {
        new_root = true;
        next.keep(pem::cert_to_pem(old), until);
    }
    Decision::Install {
        overlap: next,
        new_root,
    }
}

/// The overlap without the roots whose time is up at `now`; `None` when nothing expired.
pub fn prune(overlap: &Overlap, now: OffsetDateTime) -> Option<Overlap> {
    let t = now.unix_timestamp();
    if overlap.roots.iter().all(|r| r.until > t) {
        return None;
    }
    Some(Overlap {
        roots: overlap
            .roots
            .iter()
            .filter(|r| r.until > t)
            .cloned()
            .collect(),
    })
}

/// Where the overlap state survives a restart: a file in the state directory (file store)
/// or a ConfigMap beside the `cacerts` Secret (Kubernetes). `save` merges with what is
/// stored (several replicas may write) and returns what it stored.
pub trait OverlapStore: Send + Sync {
    /// The stored overlap (empty when none was ever written).
    fn load(&self) -> BoxFuture<'_, Result<Overlap, String>>;
    /// Stores `overlap` merged with the stored record, pruned at `now`; returns the result.
    fn save<'a>(
        &'a self,
        overlap: &'a Overlap,
        now: OffsetDateTime,
    ) -> BoxFuture<'a, Result<Overlap, String>>;
}

/// The overlap in `<state-dir>/plugged-previous-roots.json`, written atomically (0600).
pub struct FileOverlap(pub std::path::PathBuf);

impl FileOverlap {
    /// The record's file name in the state directory.
    pub const NAME: &'static str = "plugged-previous-roots.json";

    fn read(&self) -> Result<Overlap, String> {
        match std::fs::read(&self.0) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| format!("{}: unreadable: {e}", self.0.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Overlap::default()),
            Err(e) => Err(format!("{}: {e}", self.0.display())),
        }
    }
}

impl OverlapStore for FileOverlap {
    fn load(&self) -> BoxFuture<'_, Result<Overlap, String>> {
        Box::pin(async move { self.read() })
    }
    fn save<'a>(
        &'a self,
        overlap: &'a Overlap,
        now: OffsetDateTime,
    ) -> BoxFuture<'a, Result<Overlap, String>> {
        Box::pin(async move {
            let merged = self.read()?.merge(overlap);
            let merged = prune(&merged, now).unwrap_or(merged);
            let bytes = serde_json::to_vec_pretty(&merged).map_err(|e| e.to_string())?;
            crate::fsutil::write_atomic(&self.0, &bytes, 0o600)
                .map_err(|e| format!("{}: {e}", self.0.display()))?;
            Ok(merged)
        })
    }
}

/// What one offer of material came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The same bytes as the installed material: nothing to do.
    Unchanged,
    /// Installed; `new_root` when the bundle now carries a new root beside the old.
    Installed {
        /// The signing certificate's subject.
        signer: String,
        /// The roots changed (the old ones stay in the bundle for the overlap).
        new_root: bool,
    },
    /// Refused; the old CA keeps signing. The reason names the file, never key bytes.
    Refused(String),
}

/// Counters for `citadel_ca_plugged_reload_total{result}`.
#[derive(Debug, Default)]
pub struct ReloadStats {
    /// Material installed after a change.
    pub installed: AtomicU64,
    /// Material refused.
    pub refused: AtomicU64,
    /// Previous roots dropped from the bundle once their overlap ended.
    pub roots_dropped: AtomicU64,
}

struct State {
    /// SHA-256 of the installed material's files, to skip unchanged offers.
    digest: [u8; 32],
    /// The installed material, kept to rebuild the signer when the bundle changes.
    files: BTreeMap<String, Vec<u8>>,
    label: String,
    /// The installed material's own roots (without the overlap).
    roots: Vec<CertificateDer<'static>>,
    chain_not_after: OffsetDateTime,
    overlap: Overlap,
    /// The digest of the last refused material, so a bad file is reported once, not every poll.
    refused: Option<[u8; 32]>,
    /// Material whose install failed for a passing reason (the overlap record or the bundle
    /// could not be written): offered again at the next tick, since a watched Secret may
    /// not change again.
    retry: Option<MapSource>,
}

/// Installs plugged-in material into a [`Ca`], now and whenever it changes.
pub struct Reloader {
    ca: Arc<Ca>,
    store: Arc<dyn Store>,
    overlap_store: Arc<dyn OverlapStore>,
    td: TrustDomain,
    clock: SharedClock,
    max_ttl: Duration,
    skew: Duration,
    state: tokio::sync::Mutex<Option<State>>,
    /// Counters for the metrics endpoint.
    pub stats: Arc<ReloadStats>,
    last_refusal: Mutex<Option<String>>,
    publish_required: bool,
}

/// SHA-256 over the files' names and contents.
pub fn digest(files: &BTreeMap<String, Vec<u8>>) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for (k, v) in files {
        ctx.update(&(k.len() as u64).to_be_bytes());
        ctx.update(k.as_bytes());
        ctx.update(&(v.len() as u64).to_be_bytes());
        ctx.update(v);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// Reads the cacerts files of `dir` as one set: reads them all twice and retries while the
/// two reads differ (Kubernetes swaps a mounted Secret's `..data` symlink, and an operator
/// copies files one by one), so a half-written set is never offered.
pub fn read_dir_set(dir: &Path) -> Result<MapSource, String> {
    let once = || -> Result<BTreeMap<String, Vec<u8>>, String> {
        let mut files = BTreeMap::new();
        for f in FILES {
            match std::fs::read(dir.join(f)) {
                Ok(b) => {
                    files.insert(f.to_string(), b);
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(format!("{}: cannot read: {e}", dir.join(f).display())),
            }
        }
        Ok(files)
    };
    let mut last = once()?;
    for _ in 0..10 {
        let again = once()?;
        if again == last {
            return Ok(MapSource {
                label: dir.display().to_string(),
                files: again,
            });
        }
        last = again;
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!(
        "{}: the files kept changing while being read; will retry",
        dir.display()
    ))
}

impl Reloader {
    /// A reloader for `ca`, publishing through `store` and keeping the overlap in
    /// `overlap_store`; `max_ttl` and `skew` size the overlap.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        ca: Arc<Ca>,
        store: Arc<dyn Store>,
        overlap_store: Arc<dyn OverlapStore>,
        td: TrustDomain,
        clock: SharedClock,
        max_ttl: Duration,
        skew: Duration,
    ) -> Arc<Self> {
        Arc::new(Self {
            ca,
            store,
            overlap_store,
            td,
            clock,
            max_ttl,
            skew,
            state: tokio::sync::Mutex::new(None),
            stats: Arc::default(),
            last_refusal: Mutex::new(None),
            publish_required: false,
        })
    }

    /// Makes a failure to publish the first bundle stop the start (the file store: nobody
    /// else writes `root-cert.pem`). With Kubernetes the leader's publisher retries.
    pub fn publish_required(self: Arc<Self>, yes: bool) -> Arc<Self> {
        match Arc::try_unwrap(self) {
            Ok(mut me) => {
                me.publish_required = yes;
                Arc::new(me)
            }
            Err(me) => me,
        }
    }

    /// The last refusal's reason (for health output and tests).
    pub fn last_refusal(&self) -> Option<String> {
        self.last_refusal
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Loads the first material: an error here stops the start (nothing signs yet). The
    /// persisted overlap from before a restart is honoured.
    pub async fn start(&self, src: MapSource) -> Result<(), CaError> {
        let now = self.clock.now();
        let signer = plugged::load_from(&src, &self.td, now)?;
        let stored = self.overlap_store.load().await.map_err(CaError::Config)?;
        let roots = signer.roots_der().to_vec();
        let mut overlap = prune(&stored, now).unwrap_or(stored);
        overlap.roots.retain(|r| {
            pem::parse_certs(r.pem.as_bytes())
                .map(|c| {
                    !c.iter()
                        .any(|c| roots.iter().any(|r| r.as_ref() == c.as_ref()))
                })
                .unwrap_or(false)
        });
        let state = State {
            digest: digest(&src.files),
            files: src.files,
            label: src.label,
            chain_not_after: signer.chain_not_after(),
            roots,
            overlap,
            refused: None,
            retry: None,
        };
        let signer = self.with_overlap(signer, &state.overlap)?;
        tracing::info!(signer = %signer.signing_cert().subject, revoked = signer.revocations().crl_entries, previous_roots = state.overlap.roots.len(), "loaded plugged-in CA (rotation and revocation are managed upstream; changes to its material are picked up while serving)");
        if let Err(e) = self.publish_and_install(signer).await {
            if self.publish_required {
                return Err(CaError::Config(format!(
                    "cannot publish the trust bundle: {e}"
                )));
            }
        }
        *self.state.lock().await = Some(state);
        Ok(())
    }

    /// Adds the overlap's roots to the bundle of `signer` (the anchor is unchanged).
    fn with_overlap(&self, signer: Signer, overlap: &Overlap) -> Result<Signer, CaError> {
        if overlap.roots.is_empty() {
            return Ok(signer);
        }
        signer
            .with_extra_roots(overlap.ders())
            .map_err(CaError::from)
    }

    /// Publishes the bundle and CRL, then installs the signer. With `publish_required` (file
    /// store) a failed write installs nothing; with Kubernetes the leader's publisher keeps
    /// the desired state and retries by itself.
    async fn publish_and_install(&self, signer: Signer) -> Result<(), String> {
        let published = async {
            self.store.publish_bundle(signer.roots_pem()).await?;
            self.store.publish_crl(&signer.revocations().crl_pem).await
        }
        .await
        .map_err(|e| e.to_string());
        match published {
            // A root must be in the bundle file before anything it signs is handed out.
            Err(e) if self.publish_required => return Err(e),
            Err(e) => {
                tracing::info!(reason = %e, "the trust bundle is not published yet (the leader publishes it)")
            }
            Ok(()) => {}
        }
        self.ca.install(signer);
        Ok(())
    }

    /// Offers new material: validates, decides, persists the overlap, publishes, installs.
    pub async fn offer(&self, src: MapSource) -> Outcome {
        let mut guard = self.state.lock().await;
        let Some(state) = guard.as_mut() else {
            return Outcome::Refused("the plugged-in CA is not started".into());
        };
        // Newer material supersedes any retry.
        state.retry = None;
        let d = digest(&src.files);
        if d == state.digest {
            return Outcome::Unchanged;
        }
        if state.refused == Some(d) {
            return Outcome::Unchanged;
        }
        let now = self.clock.now();
        let candidate = plugged::load_from(&src, &self.td, now);
        let decision = decide(
            &state.roots,
            state.chain_not_after,
            &state.overlap,
            candidate.as_ref(),
            now,
            self.max_ttl,
            self.skew,
        );
        let (overlap, new_root) = match decision {
            Decision::Refuse(reason) => return self.refuse(state, d, reason),
            Decision::Install { overlap, new_root } => (overlap, new_root),
        };
        let Ok(signer) = candidate else {
            return self.refuse(state, d, "unreachable: refused material".into());
        };
        // Journal first: the overlap must survive a crash right after the swap.
        let overlap = match self.overlap_store.save(&overlap, now).await {
            Ok(o) => o,
            Err(e) => {
                let reason = format!("cannot record the previous roots ({e}); will retry");
                state.retry = Some(src);
                return self.refuse(state, [0; 32], reason);
            }
        };
        let roots = signer.roots_der().to_vec();
        let chain_not_after = signer.chain_not_after();
        let signer = match self.with_overlap(signer, &overlap) {
            Ok(s) => s,
            Err(e) => return self.refuse(state, d, e.to_string()),
        };
        let subject = signer.signing_cert().subject.clone();
        tracing::info!(source = %src.label, signer = %subject, not_after = %chain_not_after, new_root, bundle_roots = signer.roots_der().len(), previous_roots_until = ?overlap.roots.iter().map(|r| r.until).collect::<Vec<_>>(), "plugged-in CA changed: new material installed");
        if let Err(e) = self.publish_and_install(signer).await {
            let reason = format!("cannot publish the trust bundle ({e}); will retry");
            state.retry = Some(src);
            return self.refuse(state, [0; 32], reason);
        }
        *state = State {
            digest: d,
            files: src.files,
            label: src.label,
            roots,
            chain_not_after,
            overlap,
            refused: None,
            retry: None,
        };
        self.stats.installed.fetch_add(1, Ordering::Relaxed);
        *self.last_refusal.lock().unwrap_or_else(|p| p.into_inner()) = None;
        Outcome::Installed {
            signer: subject,
            new_root,
        }
    }

    fn refuse(&self, state: &mut State, d: [u8; 32], reason: String) -> Outcome {
        tracing::warn!(source = %state.label, reason = %reason, "plugged-in CA change refused; the previous CA keeps signing");
        if d != [0; 32] {
            state.refused = Some(d);
        }
        self.stats.refused.fetch_add(1, Ordering::Relaxed);
        *self.last_refusal.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason.clone());
        Outcome::Refused(reason)
    }

    /// Retries material whose install failed for a passing reason, then drops previous
    /// roots whose overlap ended: persists the shorter record, then publishes
    /// and installs a signer without them. Returns how many were dropped.
    pub async fn tick(&self) -> usize {
        let retry = self
            .state
            .lock()
            .await
            .as_mut()
            .and_then(|s| s.retry.take());
        if let Some(src) = retry {
            self.offer(src).await;
        }
        let mut guard = self.state.lock().await;
        let Some(state) = guard.as_mut() else {
            return 0;
        };
        let now = self.clock.now();
        let Some(pruned) = prune(&state.overlap, now) else {
            return 0;
        };
        let dropped = state.overlap.roots.len() - pruned.roots.len();
        // The stored record is pruned by the same rule; merge keeps other replicas' entries.
        let stored = match self.overlap_store.save(&pruned, now).await {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!(error = %e, "cannot record the end of a root overlap; retrying");
                return 0;
            }
        };
        let src = MapSource {
            label: state.label.clone(),
            files: state.files.clone(),
        };
        let signer = match plugged::load_from(&src, &self.td, now)
            .and_then(|s| self.with_overlap(s, &stored))
        {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(reason = %e, "cannot rebuild the plugged-in CA without its previous roots; the bundle keeps them");
                return 0;
            }
        };
        tracing::info!(
            dropped,
            bundle_roots = signer.roots_der().len(),
            "root overlap ended: previous plugged-in root dropped from the trust bundle"
        );
        if let Err(e) = self.publish_and_install(signer).await {
            tracing::warn!(error = %e, "cannot publish the trust bundle without the previous root; retrying");
            return 0;
        }
        state.overlap = stored;
        self.stats
            .roots_dropped
            .fetch_add(dropped as u64, Ordering::Relaxed);
        dropped
    }

    /// Polls `dir` every `interval` until shutdown: offers changed material, ends overlaps.
    pub async fn poll_dir(
        self: Arc<Self>,
        dir: std::path::PathBuf,
        interval: Duration,
        shutdown: crate::shutdown::Shutdown,
    ) {
        let mut read_error: Option<String> = None;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = shutdown.wait() => return,
            }
            let d = dir.clone();
            match tokio::task::spawn_blocking(move || read_dir_set(&d)).await {
                Ok(Ok(src)) => {
                    read_error = None;
                    self.offer(src).await;
                }
                Ok(Err(e)) => {
                    if read_error.as_ref() != Some(&e) {
                        tracing::warn!(error = %e, "cannot read the plugged-in CA directory; the current CA keeps signing");
                        read_error = Some(e);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "plugged-in CA poll task failed"),
            }
            self.tick().await;
        }
    }

    /// Runs [`Reloader::tick`] every `interval` until shutdown (the Secret watch offers
    /// material itself).
    pub async fn tick_every(
        self: Arc<Self>,
        interval: Duration,
        shutdown: crate::shutdown::Shutdown,
    ) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = shutdown.wait() => return,
            }
            self.tick().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pem_of(s: &Signer) -> String {
        s.roots_pem().to_string()
    }

    fn signer(now: OffsetDateTime) -> Signer {
        let td = TrustDomain::new("cluster.local").unwrap();
        let opts = crate::ca::bootstrap::CaOptions::new(td.clone());
        let journal = crate::ca::bootstrap::new_journal(&opts, now).unwrap();
        crate::ca::bootstrap::signer_from_journal(&journal, &td).unwrap()
    }

    #[test]
    fn a_new_root_keeps_the_old_one_until_the_last_old_leaf_expired() {
        let now = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        let (old, new) = (signer(now), signer(now));
        let ttl = Duration::from_secs(86400);
        let skew = Duration::from_secs(120);
        let d = decide(
            old.roots_der(),
            old.chain_not_after(),
            &Overlap::default(),
            Ok(&new),
            now,
            ttl,
            skew,
        );
        let Decision::Install { overlap, new_root } = d else {
            panic!("{d:?}")
        };
        assert!(new_root);
        assert_eq!(overlap.roots.len(), 1);
        assert_eq!(overlap.roots[0].pem, pem_of(&old));
        assert_eq!(overlap.roots[0].until, now.unix_timestamp() + 86400 + 120);
        // Still there just before, gone at `until`.
        let before = now + Duration::from_secs(86400 + 119);
        assert_eq!(prune(&overlap, before), None);
        let at = now + Duration::from_secs(86400 + 120);
        assert_eq!(prune(&overlap, at).unwrap().roots.len(), 0);
    }

    #[test]
    fn the_same_root_needs_no_overlap_and_a_returning_root_leaves_it() {
        let now = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        let old = signer(now);
        let d = decide(
            old.roots_der(),
            old.chain_not_after(),
            &Overlap::default(),
            Ok(&old),
            now,
            Duration::from_secs(60),
            Duration::ZERO,
        );
        assert_eq!(
            d,
            Decision::Install {
                overlap: Overlap::default(),
                new_root: false
            }
        );
        // Swap back to a root that is in the overlap: it is material again.
        let other = signer(now);
        let overlap = Overlap {
            roots: vec![PreviousRoot {
                pem: pem_of(&old),
                until: now.unix_timestamp() + 1000,
            }],
        };
        let d = decide(
            other.roots_der(),
            other.chain_not_after(),
            &overlap,
            Ok(&old),
            now,
            Duration::from_secs(60),
            Duration::ZERO,
        );
        let Decision::Install { overlap, .. } = d else {
            panic!()
        };
        assert_eq!(overlap.roots.len(), 1);
        assert_eq!(overlap.roots[0].pem, pem_of(&other));
    }

    #[test]
    fn bad_or_expiring_material_is_refused_with_the_reason() {
        let now = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        let old = signer(now);
        let err = CaError::Plugged {
            file: "/etc/cacerts/ca-key.pem".into(),
            reason: "does not match the public key in ca-cert.pem".into(),
        };
        let d = decide(
            old.roots_der(),
            old.chain_not_after(),
            &Overlap::default(),
            Err(&err),
            now,
            Duration::from_secs(60),
            Duration::ZERO,
        );
        assert_eq!(
            d,
            Decision::Refuse(
                "/etc/cacerts/ca-key.pem: does not match the public key in ca-cert.pem".into()
            )
        );
        // Valid now, but its chain ends within the hour.
        let late = now + (old.chain_not_after() - now) - Duration::from_secs(60);
        let d = decide(
            old.roots_der(),
            old.chain_not_after(),
            &Overlap::default(),
            Ok(&old),
            late,
            Duration::from_secs(60),
            Duration::ZERO,
        );
        assert!(matches!(d, Decision::Refuse(r) if r.contains("expires")));
    }

    #[test]
    fn the_overlap_is_capped_at_the_old_chain_and_merges_by_latest() {
        let now = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        let (old, new) = (signer(now), signer(now));
        let d = decide(
            old.roots_der(),
            now + Duration::from_secs(100),
            &Overlap::default(),
            Ok(&new),
            now,
            Duration::from_secs(86400 * 90),
            Duration::from_secs(5),
        );
        let Decision::Install { overlap, .. } = d else {
            panic!()
        };
        assert_eq!(overlap.roots[0].until, now.unix_timestamp() + 105);
        let later = Overlap {
            roots: vec![PreviousRoot {
                pem: overlap.roots[0].pem.clone(),
                until: now.unix_timestamp() + 500,
            }],
        };
        assert_eq!(overlap.merge(&later), later);
        assert_eq!(later.merge(&overlap), later);
    }
}
