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
//! The record is a trust anchor list, so it is never taken as written. Each entry carries the
//! SHA-256 of its root and a seal: an HMAC over (digest, since, until) keyed by a key derived
//! from the plugged-in CA's private key ([`RecordKey`]), computed by citadel when it recorded
//! the root at a swap. On load an entry counts only if its seal verifies under the current
//! material's key (whoever can forge that holds `ca-key.pem` and can sign anything anyway),
//! its `until` is capped at `since + --max-ttl + --clock-skew-margin`, and its root is a CA
//! allowed to sign certificates; anything else is dropped with a warning and adds no trust.
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
    /// Unix time the root left the material (the swap); `until` is capped from it.
    #[serde(default)]
    pub since: i64,
    /// SHA-256 of the root's DER, hex: the digest citadel recorded.
    #[serde(default)]
    pub sha256: String,
    /// HMAC-SHA256 (hex) over the digest, `since` and `until` under the [`RecordKey`] of the
    /// material that recorded it; empty in records older than the seal (never trusted).
    #[serde(default)]
    pub seal: String,
}

/// The key that seals the previous-roots record: derived from the plugged-in CA's private
/// key, so every replica with the same `cacerts` derives the same one, and nobody without
/// `ca-key.pem` can make an entry citadel accepts.
pub struct RecordKey(ring::hmac::Key);

impl RecordKey {
    /// The key of the material in `files` (its `ca-key.pem`).
    pub fn from_files(files: &BTreeMap<String, Vec<u8>>) -> Result<Self, CaError> {
        let pem = files.get("ca-key.pem").ok_or_else(|| {
            CaError::Config("ca-key.pem is missing: cannot seal the previous roots".into())
        })?;
        let key = crate::pki::keys::load_private_key_pem(pem)?;
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(b"citadel plugged-previous-roots seal v1\0");
        ctx.update(&key.serialize_der());
        Ok(Self(ring::hmac::Key::new(
            ring::hmac::HMAC_SHA256,
            ctx.finish().as_ref(),
        )))
    }

    fn message(digest: &[u8], since: i64, until: i64) -> Vec<u8> {
        let mut m = b"previous root\0".to_vec();
        m.extend_from_slice(digest);
        m.extend_from_slice(&since.to_be_bytes());
        m.extend_from_slice(&until.to_be_bytes());
        m
    }

    fn seal(&self, digest: &[u8], since: i64, until: i64) -> String {
        hex::encode(ring::hmac::sign(
            &self.0,
            &Self::message(digest, since, until),
        ))
    }

    fn verifies(&self, digest: &[u8], since: i64, until: i64, seal: &str) -> bool {
        let Ok(tag) = hex::decode(seal) else {
            return false;
        };
        ring::hmac::verify(&self.0, &Self::message(digest, since, until), &tag).is_ok()
    }
}

fn sha256(der: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, der)
        .as_ref()
        .to_vec()
}

/// The roots kept in the bundle after swaps (the persisted overlap state).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Overlap {
    /// Previous roots, each with its own end of overlap.
    pub roots: Vec<PreviousRoot>,
}

impl Overlap {
    /// Adds `pem` until `until`, or extends an entry already there (never shortens it).
    fn keep(&mut self, pem: String, until: i64, since: i64) {
        match self.roots.iter_mut().find(|r| r.pem == pem) {
            Some(r) => {
                r.until = r.until.max(until);
                r.since = r.since.max(since);
            }
            None => self.roots.push(PreviousRoot {
                pem,
                until,
                since,
                sha256: String::new(),
                seal: String::new(),
            }),
        }
    }

    /// Both records' roots, each until the later of the two times (replicas merge theirs).
    /// The result is unsealed where it changed: [`Overlap::sealed`] it before storing.
    pub fn merge(&self, other: &Overlap) -> Overlap {
        let mut out = self.clone();
        for r in &other.roots {
            out.keep(r.pem.clone(), r.until, r.since);
        }
        out
    }

    /// Every entry with its digest and a fresh seal under `key`.
    pub fn sealed(mut self, key: &RecordKey) -> Overlap {
        for r in &mut self.roots {
            let Some(der) = one_cert(&r.pem) else {
                continue;
            };
            let digest = sha256(&der);
            r.sha256 = hex::encode(&digest);
            r.seal = key.seal(&digest, r.since, r.until);
        }
        self
    }

    /// The entries citadel itself recorded, as far as it can tell: one CA root (CA:true,
    /// allowed to sign certificates) whose digest matches, sealed under one of `keys`, its
    /// `until` capped at `since + max_ttl + skew` (and `since` at `now`). Returns them and,
    /// for each entry dropped, why: a dropped entry never reaches a bundle or a verifier.
    pub fn verified(
        &self,
        keys: &[&RecordKey],
        now: OffsetDateTime,
        max_ttl: Duration,
        skew: Duration,
    ) -> (Overlap, Vec<String>) {
        let mut out = Overlap::default();
        let mut dropped = Vec::new();
        let horizon = i64::try_from((max_ttl + skew).as_secs()).unwrap_or(i64::MAX);
        for r in &self.roots {
            let Some(der) = one_cert(&r.pem) else {
                dropped.push("an entry that is not exactly one PEM certificate".to_string());
                continue;
            };
            let info = match crate::pki::chain::describe(&der) {
                Ok(i) => i,
                Err(e) => {
                    dropped.push(format!("an unreadable root ({e})"));
                    continue;
                }
            };
            let digest = sha256(&der);
            if !r.sha256.eq_ignore_ascii_case(&hex::encode(&digest))
                || !keys
                    .iter()
                    .any(|k| k.verifies(&digest, r.since, r.until, &r.seal))
            {
                dropped.push(format!(
                    "{:?} (sha256 {}): not recorded by citadel under the current CA key",
                    info.subject,
                    hex::encode(&digest)
                ));
                continue;
            }
            if !info.is_ca || !crate::pki::chain::may_sign_certificates(&der).unwrap_or(false) {
                dropped.push(format!(
                    "{:?}: not a CA allowed to sign certificates",
                    info.subject
                ));
                continue;
            }
            let since = r.since.min(now.unix_timestamp());
            let until = r.until.min(since.saturating_add(horizon));
            out.roots.push(PreviousRoot {
                since,
                until,
                ..r.clone()
            });
        }
        (out, dropped)
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
        next.keep(pem::cert_to_pem(old), until, now.unix_timestamp());
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

fn one_cert(pem_text: &str) -> Option<CertificateDer<'static>> {
    let mut certs = pem::parse_certs(pem_text.as_bytes()).ok()?;
    (certs.len() == 1).then(|| certs.remove(0))
}

/// The `update` of [`OverlapStore::update`]: the stored record in, the record to store out.
pub type UpdateFn<'a> = dyn Fn(Overlap) -> Overlap + Send + Sync + 'a;

/// Where the overlap state survives a restart: a file in the state directory (file store)
/// or the Secret `citadel-plugged-roots` beside the `cacerts` Secret (Kubernetes). What it
/// returns is untrusted: the [`Reloader`] verifies every entry ([`Overlap::verified`]).
pub trait OverlapStore: Send + Sync {
    /// The stored overlap (empty when none was ever written).
    fn load(&self) -> BoxFuture<'_, Result<Overlap, String>>;
    /// Reads the stored record, stores `update(stored)` (compare-and-swap where several
    /// replicas write, retried on conflict) and returns what it stored.
    fn update<'a>(&'a self, update: &'a UpdateFn<'a>) -> BoxFuture<'a, Result<Overlap, String>>;
}

/// The overlap in `<state-dir>/plugged-previous-roots.json`, written atomically (0600).
pub struct FileOverlap(pub std::path::PathBuf);

impl FileOverlap {
    /// The record's file name in the state directory.
    pub const NAME: &'static str = "plugged-previous-roots.json";

    /// The stored record; one that does not parse counts as empty (it could add no trust,
    /// and the next write replaces it), an I/O error is an error.
    fn read(&self) -> Result<Overlap, String> {
        match std::fs::read(&self.0) {
            Ok(b) => Ok(serde_json::from_slice(&b).unwrap_or_else(|e| {
                tracing::warn!(file = %self.0.display(), error = %e, "the previous-roots record is unreadable; ignoring it");
                Overlap::default()
            })),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Overlap::default()),
            Err(e) => Err(format!("{}: {e}", self.0.display())),
        }
    }
}

impl OverlapStore for FileOverlap {
    fn load(&self) -> BoxFuture<'_, Result<Overlap, String>> {
        Box::pin(async move { self.read() })
    }
    fn update<'a>(&'a self, update: &'a UpdateFn<'a>) -> BoxFuture<'a, Result<Overlap, String>> {
        Box::pin(async move {
            let next = update(self.read()?);
            let bytes = serde_json::to_vec_pretty(&next).map_err(|e| e.to_string())?;
            crate::fsutil::write_atomic(&self.0, &bytes, 0o600)
                .map_err(|e| format!("{}: {e}", self.0.display()))?;
            Ok(next)
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
        /// What is odd about the material but not refused (see [`plugged::load_checked`]).
        warnings: Vec<String>,
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
    /// Seals the previous-roots record; derived from the installed material's key.
    key: RecordKey,
    /// The digest of the last refused material, so a bad file is reported once, not every poll.
    refused: Option<[u8; 32]>,
    /// Material whose install failed for a passing reason (the overlap record or the bundle
    /// could not be written): offered again at the next tick, since a watched Secret may
    /// not change again.
    retry: Option<MapSource>,
    /// Material refused only because an element's notBefore lies ahead: offered again at
    /// that time (the same bytes are otherwise never re-offered).
    not_yet: Option<(OffsetDateTime, MapSource)>,
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
        let loaded = plugged::load_checked(&src, &self.td, now)?;
        for w in &loaded.warnings {
            tracing::warn!(warning = %w, "plugged-in CA loaded with a warning");
        }
        let signer = loaded.signer;
        let key = RecordKey::from_files(&src.files)?;
        let stored = self.overlap_store.load().await.map_err(CaError::Config)?;
        let (stored, dropped) = stored.verified(&[&key], now, self.max_ttl, self.skew);
        if !dropped.is_empty() {
            tracing::warn!(dropped = ?dropped, "previous-roots record: entries ignored, they add no trust (a record written by someone else, by an older citadel, or under another cacerts key)");
        }
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
            key,
            refused: None,
            retry: None,
            not_yet: None,
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

    /// Stores `ours` merged with the stored record's entries that verify under one of
    /// `verify`, pruned at `now`, sealed with `seal`; returns what was stored.
    async fn save(
        &self,
        ours: &Overlap,
        now: OffsetDateTime,
        verify: &[&RecordKey],
        seal: &RecordKey,
    ) -> Result<Overlap, String> {
        let update = |stored: Overlap| {
            let (trusted, dropped) = stored.verified(verify, now, self.max_ttl, self.skew);
            if !dropped.is_empty() {
                tracing::warn!(dropped = ?dropped, "previous-roots record: entries not recorded by citadel are dropped");
            }
            let merged = trusted.merge(ours);
            prune(&merged, now).unwrap_or(merged).sealed(seal)
        };
        self.overlap_store.update(&update).await
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
        state.not_yet = None;
        let d = digest(&src.files);
        if d == state.digest {
            return Outcome::Unchanged;
        }
        if state.refused == Some(d) {
            return Outcome::Unchanged;
        }
        let now = self.clock.now();
        let candidate = plugged::load_checked(&src, &self.td, now).and_then(|l| {
            let key = RecordKey::from_files(&src.files)?;
            Ok((l, key))
        });
        let (candidate, warnings, new_key) = match candidate {
            Ok((l, key)) => (Ok(l.signer), l.warnings, Some(key)),
            Err(e) => (Err(e), vec![], None),
        };
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
            Decision::Refuse(reason) => {
                if let Some(t) = plugged::valid_from(&src, now) {
                    state.not_yet = Some((t, src));
                }
                return self.refuse(state, d, reason);
            }
            Decision::Install { overlap, new_root } => (overlap, new_root),
        };
        let (Ok(signer), Some(new_key)) = (candidate, new_key) else {
            return self.refuse(state, d, "unreachable: refused material".into());
        };
        // Journal first: the overlap must survive a crash right after the swap. Entries
        // another replica sealed already under the new material count too.
        let saved = self
            .save(&overlap, now, &[&state.key, &new_key], &new_key)
            .await;
        let overlap = match saved {
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
        for w in &warnings {
            tracing::warn!(source = %src.label, warning = %w, "plugged-in CA installed with a warning");
        }
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
            key: new_key,
            refused: None,
            retry: None,
            not_yet: None,
        };
        self.stats.installed.fetch_add(1, Ordering::Relaxed);
        *self.last_refusal.lock().unwrap_or_else(|p| p.into_inner()) = None;
        Outcome::Installed {
            signer: subject,
            new_root,
            warnings,
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
        let now = self.clock.now();
        let due = self
            .state
            .lock()
            .await
            .as_mut()
            .and_then(|s| match &s.not_yet {
                Some((t, _)) if *t <= now => {
                    s.refused = None;
                    s.not_yet.take().map(|(_, src)| src)
                }
                _ => None,
            });
        if let Some(src) = due {
            self.offer(src).await;
        }
        let mut guard = self.state.lock().await;
        let Some(state) = guard.as_mut() else {
            return 0;
        };
        let Some(pruned) = prune(&state.overlap, now) else {
            return 0;
        };
        let dropped = state.overlap.roots.len() - pruned.roots.len();
        // The stored record is pruned by the same rule; merge keeps other replicas' entries.
        let stored = match self.save(&pruned, now, &[&state.key], &state.key).await {
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
                since: now.unix_timestamp(),
                sha256: String::new(),
                seal: String::new(),
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
                until: now.unix_timestamp() + 500,
                ..overlap.roots[0].clone()
            }],
        };
        assert_eq!(overlap.merge(&later), later);
        assert_eq!(later.merge(&overlap), later);
    }

    /// cacerts material (root, intermediate) from rcgen, as a Secret's data would hold it.
    fn cacerts(name: &str, now: OffsetDateTime) -> (MapSource, String) {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        let mk = |cn: String, path_len: Option<u8>| {
            let mut p = CertificateParams::default();
            p.distinguished_name.push(DnType::CommonName, cn);
            p.is_ca = IsCa::Ca(path_len.map_or(BasicConstraints::Unconstrained, |n| {
                BasicConstraints::Constrained(n)
            }));
            p.key_usages = vec![
                rcgen::KeyUsagePurpose::KeyCertSign,
                rcgen::KeyUsagePurpose::CrlSign,
            ];
            p.not_before = now - time::Duration::days(1);
            p.not_after = now + time::Duration::days(3650);
            p.serial_number = Some(rcgen::SerialNumber::from_slice(&crate::pki::random_serial()));
            p
        };
        let root_key = KeyPair::generate().unwrap();
        let root_params = mk(format!("{name} root"), None);
        let root = root_params.self_signed(&root_key).unwrap();
        let issuer = Issuer::new(root_params, root_key);
        let key = KeyPair::generate().unwrap();
        let int = mk(format!("{name} int"), Some(0))
            .signed_by(&key, &issuer)
            .unwrap();
        let files = BTreeMap::from([
            ("ca-cert.pem".to_string(), int.pem().into_bytes()),
            ("ca-key.pem".to_string(), key.serialize_pem().into_bytes()),
            (
                "cert-chain.pem".to_string(),
                format!("{}{}", int.pem(), root.pem()).into_bytes(),
            ),
            ("root-cert.pem".to_string(), root.pem().into_bytes()),
        ]);
        (
            MapSource {
                label: format!("Secret ns/cacerts ({name})"),
                files,
            },
            root.pem(),
        )
    }

    async fn reloader(
        dir: &Path,
        clock: &Arc<crate::clock::ManualClock>,
    ) -> (Arc<Reloader>, Arc<Ca>) {
        let ca = Ca::new();
        let store: Arc<dyn Store> = Arc::new(crate::store::mem::MemStore::default());
        let r = Reloader::new(
            ca.clone(),
            store,
            Arc::new(FileOverlap(dir.join(FileOverlap::NAME))),
            TrustDomain::new("cluster.local").unwrap(),
            clock.clone(),
            Duration::from_secs(86400),
            Duration::from_secs(300),
        );
        (r, ca)
    }

    fn bundle(ca: &Ca) -> String {
        ca.current().unwrap().roots_pem().to_string()
    }

    /// H1 (file store): whoever can write `plugged-previous-roots.json` (a restore from a
    /// backup, a shared volume, another tool) must not add a trust anchor: a root of their
    /// own in the record, written the way citadel writes it, stays out of the bundle and the
    /// client-certificate verifier after a restart; a genuine overlap survives the restart.
    #[tokio::test]
    async fn a_root_written_into_the_previous_roots_file_is_not_trusted_after_a_restart() {
        let now = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        let clock = Arc::new(crate::clock::ManualClock::new(now));
        let dir = tempfile::tempdir().unwrap();
        let (v1, root1) = cacerts("v1", now);
        let (v2, root2) = cacerts("v2", now);
        let (_, evil) = cacerts("attacker", now);
        let (r, _) = reloader(dir.path(), &clock).await;
        r.start(v1).await.unwrap();
        let again = MapSource {
            label: v2.label.clone(),
            files: v2.files.clone(),
        };
        assert!(matches!(
            r.offer(again).await,
            Outcome::Installed { new_root: true, .. }
        ));
        // The attacker adds their root to the record beside the genuine entry, with a far end.
        let path = dir.path().join(FileOverlap::NAME);
        let mut rec: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        let mut forged = rec["roots"][0].clone();
        forged["pem"] = evil.clone().into();
        forged["until"] = (now.unix_timestamp() + 10 * 365 * 86400).into();
        rec["roots"].as_array_mut().unwrap().push(forged);
        // And one in the shape older records had (pem and until only).
        rec["roots"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({
                "pem": evil, "until": now.unix_timestamp() + 10 * 365 * 86400
            }));
        std::fs::write(&path, serde_json::to_vec(&rec).unwrap()).unwrap();

        clock.advance(time::Duration::hours(1));
        let (r, ca) = reloader(dir.path(), &clock).await;
        r.start(v2).await.unwrap();
        let b = bundle(&ca);
        assert!(
            !b.contains(evil.trim()),
            "the attacker's root is trusted: {b}"
        );
        assert!(b.contains(root1.trim()) && b.contains(root2.trim()), "{b}");
        assert_eq!(ca.current().unwrap().roots_der().len(), 2);
    }

    #[test]
    fn only_sealed_capped_ca_roots_of_the_record_count() {
        let now = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        let (mine, _) = cacerts("mine", now);
        let (other, _) = cacerts("other", now);
        let key = RecordKey::from_files(&mine.files).unwrap();
        let other_key = RecordKey::from_files(&other.files).unwrap();
        let (_, root_a) = cacerts("a", now);
        let (_, root_b) = cacerts("b", now);
        let t = now.unix_timestamp();
        let entry = |pem: &str, since: i64, until: i64| PreviousRoot {
            pem: pem.to_string(),
            until,
            since,
            sha256: String::new(),
            seal: String::new(),
        };
        let (ttl, skew) = (Duration::from_secs(86400), Duration::from_secs(300));
        let genuine = Overlap {
            roots: vec![entry(&root_a, t, t + 86400 + 300)],
        }
        .sealed(&key);
        let (v, dropped) = genuine.verified(&[&key], now, ttl, skew);
        assert_eq!(v, genuine);
        assert!(dropped.is_empty());
        // Unsealed, sealed under another CA's key, or altered after sealing: dropped.
        let unsealed = Overlap {
            roots: vec![entry(&root_b, t, t + 100)],
        };
        let foreign = unsealed.clone().sealed(&other_key);
        let mut extended = genuine.clone();
        extended.roots[0].until += 365 * 86400;
        let mut swapped = genuine.clone();
        swapped.roots[0].pem = root_b.clone();
        for bad in [unsealed, foreign, extended, swapped] {
            let (v, dropped) = bad.verified(&[&key], now, ttl, skew);
            assert!(v.roots.is_empty(), "{bad:?}");
            assert_eq!(dropped.len(), 1);
            assert!(
                dropped[0].contains("not recorded by citadel"),
                "{dropped:?}"
            );
        }
        // A sealed entry never outlives since + max-ttl + skew, nor starts in the future.
        let long = Overlap {
            roots: vec![entry(&root_a, t - 10 * 86400, t + 100 * 86400)],
        }
        .sealed(&key);
        let (v, _) = long.verified(&[&key], now, ttl, skew);
        assert_eq!(v.roots[0].until, t - 10 * 86400 + 86400 + 300);
        assert!(prune(&v, now).unwrap().roots.is_empty());
        let future = Overlap {
            roots: vec![entry(&root_a, t + 1000, t + 2000)],
        }
        .sealed(&key);
        let (v, _) = future.verified(&[&key], now, ttl, skew);
        assert_eq!((v.roots[0].since, v.roots[0].until), (t, t + 2000));
        // A sealed certificate that is no CA (or may not sign certificates) is dropped too.
        let leaf = {
            let k = rcgen::KeyPair::generate().unwrap();
            let mut p = rcgen::CertificateParams::default();
            p.is_ca = rcgen::IsCa::ExplicitNoCa;
            p.self_signed(&k).unwrap().pem()
        };
        let no_sign = {
            let k = rcgen::KeyPair::generate().unwrap();
            let mut p = rcgen::CertificateParams::default();
            p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            p.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
            p.self_signed(&k).unwrap().pem()
        };
        for pem in [leaf, no_sign] {
            let o = Overlap {
                roots: vec![entry(&pem, t, t + 100)],
            }
            .sealed(&key);
            let (v, dropped) = o.verified(&[&key], now, ttl, skew);
            assert!(v.roots.is_empty());
            assert!(
                dropped[0].contains("not a CA allowed to sign"),
                "{dropped:?}"
            );
        }
    }
}
