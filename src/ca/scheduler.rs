//! The rotation scheduler: a thin loop around the pure planner.
//!
//! Each `step` reloads the journal (so changes made by `citadel revoke` or
//! `citadel ca rotate-root`, or by another replica, are picked up), asks `plan` what is due,
//! applies it in memory, and writes it with compare-and-swap BEFORE anything acts on it.
//! Side effects (publishing the bundle and CRLs, installing the signer) are derived from the
//! committed journal and are idempotent, so a crash between any two writes is completed by
//! the next step. A new root is only marked published after the bundle file was written, and
//! activation waits from that mark.
//!
//! Every replica, leader or not, also sweeps its own issuance index once it has installed a
//! new identity denial (see [`revocation::revoke_denied`]): certificates it signed before it
//! saw the denial go on the CRL. The issue path re-checks the installed signer after
//! recording each certificate, so no certificate is handed out that this sweep can miss.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::apply::apply;
use super::plan::{plan, Action};
use super::policy::LivePolicy;
use super::revocation::{self, SweepRequest};
use super::{bootstrap, crl, jwt, Ca, CaError};
use crate::clock::SharedClock;
use crate::identity::TrustDomain;
use crate::journal::Journal;
use crate::shutdown::Shutdown;
use crate::store::index::IssuanceIndex;
use crate::store::{Revision, Store, StoreError};

/// Plans and applies rotation, publishes the bundle and CRLs, and installs the signer: one `step`
/// at a time.
pub struct Scheduler {
    /// Where the journal lives.
    pub store: Arc<dyn Store>,
    /// The live CA whose signer each step installs.
    pub ca: Arc<Ca>,
    /// When to prepare, activate and retire authorities, read afresh at every step (a
    /// CertificateAuthority spec change applies to the next one).
    pub policy: LivePolicy,
    /// The time every step plans with.
    pub clock: SharedClock,
    /// The trust domain the installed signer certifies.
    pub trust_domain: TrustDomain,
    installed: Mutex<Option<Revision>>,
    /// With several replicas: only while this says true does the scheduler write; otherwise
    /// it only loads and installs what the leader wrote.
    leader: Option<crate::leadership::Leadership>,
    /// Wakes `run` early (a watch saw the journal change).
    pub wake: Arc<tokio::sync::Notify>,
    /// This replica's record of what it signed, swept for denied identities.
    index: Option<Arc<dyn IssuanceIndex>>,
    /// Denied identities already swept from the index.
    swept: Mutex<HashSet<String>>,
    /// Set by the issue path to force another sweep.
    pub sweep: Arc<SweepRequest>,
    /// The old root may not leave the bundle before this (unix seconds): the latest notAfter
    /// of a leaf in this replica's index that chains only to it ([`Scheduler::hold_old_root`]).
    old_root_needed_until: Mutex<Option<i64>>,
    /// Whether [`Scheduler::hold_old_root`] applies (`--linkerd-identity-domain`).
    hold_old_root: bool,
}

/// What one step did.
#[derive(Debug, Default)]
pub struct StepReport {
    /// The actions applied and written, in order.
    pub actions: Vec<Action>,
    /// Whether a new signer was installed.
    pub installed: bool,
}

fn describe(a: &Action) -> String {
    match a {
        Action::Retire { id } => format!("retire authority {id}"),
        Action::SignCrl { issuer } => format!("sign CRL of {issuer}"),
        Action::RetireJwtKey { kid } => format!("retire JWT key {kid}"),
        other => format!("{other:?}"),
    }
}

impl Scheduler {
    /// A scheduler that writes whenever it runs (no leader election; see
    /// [`Scheduler::with_leader`]).
    pub fn new(
        store: Arc<dyn Store>,
        ca: Arc<Ca>,
        policy: impl Into<LivePolicy>,
        clock: SharedClock,
        trust_domain: TrustDomain,
    ) -> Self {
        Self {
            store,
            ca,
            policy: policy.into(),
            clock,
            trust_domain,
            installed: Mutex::new(None),
            leader: None,
            wake: Arc::new(tokio::sync::Notify::new()),
            index: None,
            swept: Mutex::new(HashSet::new()),
            old_root_needed_until: Mutex::new(None),
            hold_old_root: false,
            sweep: Arc::new(SweepRequest::default()),
        }
    }

    /// Keeps an old root in the bundle while the index holds an unexpired leaf that chains
    /// only to it ([`Scheduler::hold_old_root`]). On with `--linkerd-identity-domain`: Linkerd's
    /// proxies cannot pick up a new anchor without a restart.
    pub fn with_old_root_hold(mut self) -> Self {
        self.hold_old_root = true;
        self
    }

    /// Sweeps `index` for the certificates of newly denied identities (see the module docs).
    pub fn with_index(mut self, index: Arc<dyn IssuanceIndex>) -> Self {
        self.index = Some(index);
        self
    }

    /// Makes this scheduler write only while `leader` is true.
    pub fn with_leader(mut self, leader: crate::leadership::Leadership) -> Self {
        self.leader = Some(leader);
        self
    }

    fn leading(&self) -> bool {
        self.leader.as_ref().is_none_or(|l| l.leading())
    }

    /// A follower's pass: install whatever the leader committed.
    async fn follow(&self) -> Result<StepReport, CaError> {
        let current = self
            .store
            .load_journal()
            .await?
            .ok_or_else(|| CaError::Config("the store holds no CA journal yet".into()))?;
        let mut installed = self.install(&current.value, &current.revision)?;
        match self.sweep_denied(&current.value).await {
            Ok(Some((journal, revision))) => installed |= self.install(&journal, &revision)?,
            Ok(None) => {}
            Err(e) => tracing::error!(error = %e, "revocation sweep failed; retrying"),
        }
        Ok(StepReport {
            actions: Vec::new(),
            installed,
        })
    }

    /// After a journal with identity denials is installed: puts every certificate this
    /// replica recorded for a denied identity on the CRL. Reads the index only when there is
    /// a denial not swept yet, or the issue path asked. Returns the journal it wrote, if any.
    async fn sweep_denied(
        &self,
        journal: &Journal,
    ) -> Result<Option<(Journal, Revision)>, CaError> {
        let Some(index) = &self.index else {
            return Ok(None);
        };
        let asked = self.sweep.take();
        let denied: HashSet<String> = journal.denied.iter().map(|d| d.identity.clone()).collect();
        let new_denial = {
            let swept = self.swept.lock().unwrap_or_else(|p| p.into_inner());
            denied.iter().any(|d| !swept.contains(d))
        };
        if denied.is_empty() || !(asked || new_denial) {
            return Ok(None);
        }
        let now = self.clock.now();
        let live: Vec<_> = match index.live(now.unix_timestamp(), &|e| denied.contains(&e.identity))
        {
            Ok(l) => l,
            Err(e) => {
                if asked {
                    self.sweep.request();
                }
                return Err(e.into());
            }
        };
        let mut written = None;
        let revoked: HashSet<&str> = journal
            .revocations
            .iter()
            .map(|r| r.serial.as_str())
            .collect();
        if live.iter().any(|e| !revoked.contains(e.serial.as_str())) {
            let validity = self.policy.rotation().crl_validity;
            // A revocation write like any other: it stops at the store's revocation ceiling,
            // so a sweep can never take the room rotation needs (it is retried each pass).
            let result = super::update::update_revocations(self.store.as_ref(), |j| {
                revocation::revoke_denied(j, &live, now, validity)
                    .map(|n| (n > 0).then_some(n))
                    .map_err(|e| e.to_string())
            })
            .await;
            match result {
                Ok(Some((n, j, rev))) => {
                    tracing::info!(target: "citadel::audit", event = "denied_identity_swept", revoked_certificates = n, "revoked certificates of denied identities signed before the denial reached this replica");
                    written = Some((j, rev));
                }
                Ok(None) => {}
                Err(e) => {
                    // Not marked as swept: the next pass tries again.
                    return Err(CaError::Config(format!(
                        "could not revoke certificates of denied identities: {e}"
                    )));
                }
            }
        }
        *self.swept.lock().unwrap_or_else(|p| p.into_inner()) = denied;
        Ok(written)
    }

    /// Runs everything that is due now, then publishes and installs the result.
    pub async fn step(&self) -> Result<StepReport, CaError> {
        if !self.leading() {
            return self.follow().await;
        }
        let mut report = StepReport::default();
        for _ in 0..32 {
            let current = self
                .store
                .load_journal()
                .await?
                .ok_or_else(|| CaError::Config("the store holds no CA journal".into()))?;
            let now = self.clock.now();
            let mut journal = current.value.clone();
            // One policy per pass: what is planned is applied with the same numbers.
            let policy = self.policy.rotation();
            let actions = plan(now.unix_timestamp(), &journal, &policy);
            let actions = self.hold_old_root(&journal, actions, now.unix_timestamp());
            if actions.is_empty() {
                // Install what is committed first (safe: a new chain activates only after its
                // bundle was published), then publish; a failed publish is retried next pass.
                report.installed = self.install(&journal, &current.revision)?;
                match self.sweep_denied(&journal).await {
                    Ok(Some(_)) => continue, // install and publish the new revocations
                    Ok(None) => {}
                    // Signing and publishing go on; the sweep is retried next pass.
                    Err(e) => tracing::error!(error = %e, "revocation sweep failed; retrying"),
                }
                self.publish(&journal).await?;
                // Keys in the JWT bundle just written count as published from now: their
                // activation waits from this moment, as a new root's does.
                let mut newly_published = false;
                for k in journal
                    .jwt_keys
                    .iter_mut()
                    .filter(|k| k.in_bundle() && k.published_at.is_none())
                {
                    k.published_at = Some(now.unix_timestamp());
                    newly_published = true;
                    tracing::info!(target: "citadel::audit", event = "jwt_key_published", kid = %k.kid, "the JWT bundle holding this key is published; it signs after {}s at the earliest (a first key at once)", self.policy.rotation().jwt.publish_lead());
                }
                let root_published = match journal
                    .root_rotation
                    .as_mut()
                    .filter(|r| r.bundle_published_at.is_none())
                {
                    Some(r) => {
                        r.bundle_published_at = Some(now.unix_timestamp());
                        tracing::info!(target: "citadel::audit", event = "root_rotation_published", new_root = %r.new_root, "the two-root trust bundle is published; activation waits {}s from now", r.activate_after_secs);
                        true
                    }
                    None => false,
                };
                if root_published || newly_published {
                    match self
                        .store
                        .save_journal(&journal, Some(&current.revision))
                        .await
                    {
                        Ok(_) | Err(StoreError::Conflict) => continue,
                        Err(e) => return Err(e.into()),
                    }
                }

                return Ok(report);
            }
            for a in &actions {
                apply(&mut journal, a, now, &policy)?;
                if let Action::ExpireDenials { identities } = a {
                    let shown: Vec<&String> = identities.iter().take(20).collect();
                    tracing::info!(target: "citadel::audit", event = "denial_expired", count = identities.len(), identities = ?shown, "dropped denials that have nothing left to cover (--max-ttl plus the skew margin after they were written, and every certificate they revoked expired): these identities may get certificates again");
                } else if !matches!(a, Action::SignCrl { .. } | Action::PruneRevocations) {
                    tracing::info!(target: "citadel::audit", event = "rotation_step", action = %describe(a), "CA rotation step");
                } else {
                    tracing::debug!(action = %describe(a), "CA maintenance");
                }
            }
            match self
                .store
                .save_journal(&journal, Some(&current.revision))
                .await
            {
                Ok(_) => {
                    // Token keys of authorities retired by this write are destroyed now.
                    super::keysource::settle(&current.value, &journal, true);
                    report.actions.extend(actions)
                }
                Err(StoreError::Conflict) => {
                    // Not stored: token keys minted for this attempt would be orphans.
                    super::keysource::settle(&current.value, &journal, false);
                    continue;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(CaError::Config(
            "the CA journal kept changing; will retry".into(),
        ))
    }

    /// Holds back `CompleteRootRotation` (the old root leaving the bundle) while this
    /// replica's issuance index holds an unexpired leaf signed under the old root: such a leaf
    /// chains only to it, and a workload that still presents it (Linkerd's proxies read
    /// anchors only at pod start and renew on their own schedule) would be cut off. The
    /// planner's timing already covers every leaf issued under the policy of the rotation's
    /// start; this catches the rest (a `--max-ttl` raised since, a leaf capped differently).
    /// The index is this replica's own: leaves other replicas signed are covered by the
    /// planner's timing only. An unreadable index holds the root (the safe side).
    fn hold_old_root(&self, journal: &Journal, mut actions: Vec<Action>, now: i64) -> Vec<Action> {
        let (true, Some(index), Some(r)) =
            (self.hold_old_root, &self.index, &journal.root_rotation)
        else {
            return actions;
        };
        if !actions.contains(&Action::CompleteRootRotation) {
            return actions;
        }
        let mut until = self
            .old_root_needed_until
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if until.is_none_or(|u| now >= u) {
            // Intermediates signed by the old root; the new one's cross-signed certificate
            // is by the old root too, but its leaves also chain to the new root.
            let under_old: HashSet<&str> = journal
                .authorities
                .iter()
                .filter(|a| {
                    a.issuer.as_deref() == Some(r.old_root.as_str()) && a.id != r.new_intermediate
                })
                .map(|a| a.id.as_str())
                .collect();
            *until = match index.live(now, &|e| under_old.contains(e.issuer.as_str())) {
                Ok(live) => live.iter().map(|e| e.not_after).max(),
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the issuance index; the old root stays in the bundle");
                    Some(now + 1)
                }
            };
            if let Some(u) = until.filter(|u| now < *u) {
                tracing::info!(target: "citadel::audit", event = "old_root_held", old_root = %r.old_root, until = u, "the old root stays in the bundle until an unexpired leaf signed under it (which chains only to it) expires");
            }
        }
        if until.is_some_and(|u| now < u) {
            actions.retain(|a| *a != Action::CompleteRootRotation);
        }
        actions
    }

    async fn publish(&self, journal: &Journal) -> Result<(), CaError> {
        let bundle: String = journal
            .trusted_roots()
            .map(|r| r.cert_pem.as_str())
            .collect();
        self.store.publish_bundle(&bundle).await?;
        self.store.publish_crl(&crl::bundle(journal)).await?;
        self.store
            .publish_jwks(&jwt::render_jwks(
                journal,
                self.policy.rotation().jwt.refresh_hint,
            )?)
            .await?;
        Ok(())
    }

    /// Offline root: tells the operator (metric, log) whether a root-signed intermediate is
    /// needed and how long is left, at the injected clock's now. Logged once per request at
    /// warn, and again at error once its deadline has passed.
    fn note_offline(&self, journal: &Journal) {
        let now = self.clock.now().unix_timestamp();
        let needed = super::offline::signature_needed(journal, self.policy.rotation().activate_at);
        let before = self.ca.intermediate_needed();
        if let Some(n) = &needed {
            let left = n.deadline - now;
            let was_overdue = before
                .as_ref()
                .is_some_and(|(b, l)| b.request == n.request && *l < 0);
            let new = before.as_ref().is_none_or(|(b, _)| b.request != n.request);
            if new {
                tracing::warn!(target: "citadel::audit", event = "intermediate_signature_needed", request = %n.request, deadline = n.deadline, seconds_left = left, "offline root: the next intermediate's CSR is waiting for the root's signature; run `citadel ca intermediate-csr`, sign it with `citadel ca sign-intermediate` where the root key is, and `citadel ca install-intermediate` (the current intermediate keeps signing meanwhile)");
            }
            if left < 0 && !was_overdue {
                tracing::error!(target: "citadel::audit", event = "intermediate_signature_overdue", request = %n.request, deadline = n.deadline, signer_expires = ?n.signer_expires, "offline root: the intermediate's activation point has passed with no signed successor installed; the current intermediate keeps signing until it expires");
            }
        }
        self.ca.note_intermediate_needed(needed, now);
    }

    /// Installs the signer for `journal` unless that revision is already installed.
    fn install(&self, journal: &Journal, revision: &Revision) -> Result<bool, CaError> {
        if journal.offline_root {
            self.note_offline(journal);
        }
        let mut installed = self.installed.lock().unwrap_or_else(|p| p.into_inner());
        if installed.as_ref() == Some(revision) && self.ca.current().is_some() {
            return Ok(false);
        }
        let signer = bootstrap::signer_from_journal(journal, &self.trust_domain)
            .map_err(|e| CaError::Config(format!("{}: {e}", self.store.describe())))?;
        let jwt = jwt::JwtKeys::from_journal(journal, &self.policy.rotation().jwt)?;
        tracing::info!(signer = %signer.signing_cert().subject, roots = signer.roots_der().len(), revoked = signer.revocations().crl_entries, jwt_kid = jwt.active.as_ref().map(|k| k.kid.as_str()).unwrap_or(""), "installed CA state");
        self.ca.install_jwt(jwt);
        self.ca.install(signer);
        *installed = Some(revision.clone());
        Ok(true)
    }

    /// Steps every `interval` until `shutdown`. Errors are logged and retried: the CA keeps
    /// signing with what it has.
    pub async fn run(self: Arc<Self>, interval: Duration, shutdown: Shutdown) {
        // One receiver for the whole loop: a clone made per pass would see every past
        // leadership change as new, and the loop would never sleep again.
        let mut leader = self.leader.as_ref().map(|l| l.changes());
        loop {
            if let Err(e) = self.step().await {
                self.ca.note_step_failure();
                tracing::error!(error = %e, "CA scheduler step failed; retrying");
            }
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = self.wake.notified() => {}
                _ = self.sweep.requested() => {}
                _ = async { match leader.as_mut() { Some(l) => { let _ = l.changed().await; } None => std::future::pending().await } } => {}
                _ = shutdown.wait() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::policy::RotationPolicy;
    use crate::clock::ManualClock;
    use crate::store::mem::MemStore;

    /// A scheduler over `j` in a memory store, on a manual clock at `t0`.
    fn on_manual_clock(
        j: Journal,
        policy: RotationPolicy,
        t0: time::OffsetDateTime,
        td: TrustDomain,
    ) -> (Arc<MemStore>, Arc<Ca>, ManualClock, Scheduler) {
        let store = Arc::new(MemStore::with_journal(j));
        let clock = ManualClock::new(t0);
        let ca = Ca::new();
        let s = Scheduler::new(
            store.clone(),
            ca.clone(),
            policy,
            Arc::new(clock.clone()),
            td,
        );
        (store, ca, clock, s)
    }

    /// Issue 20, M2: a denial expires by itself once nothing it covers can be valid, moved by
    /// the injected clock alone: installed and enforced before, dropped from the journal and
    /// no longer enforced after. Failed before: the denial stayed forever.
    #[tokio::test]
    async fn a_denial_expires_by_itself_on_the_injected_clock() {
        let t0 = time::macros::datetime!(2030-01-01 0:00 UTC);
        let td = TrustDomain::new("cluster.local").unwrap();
        let opts = super::bootstrap::CaOptions::new(td.clone());
        let mut j = super::bootstrap::new_journal(&opts, t0).unwrap();
        let id = "spiffe://cluster.local/ns/shop/sa/cart";
        j.denied.push(crate::journal::DeniedIdentity {
            identity: id.into(),
            since: t0.unix_timestamp(),
            reason: "key-compromise".into(),
            revocation: Some("citadel/cart".into()),
        });
        let policy = RotationPolicy {
            max_leaf_ttl: Duration::from_secs(3600),
            ..RotationPolicy::default()
        };
        let (store, ca, clock, s) = on_manual_clock(j, policy.clone(), t0, td);
        s.step().await.unwrap();
        assert!(ca.current().unwrap().is_denied(id));
        // One second before: max_ttl + skew margin after the denial.
        let ends = time::Duration::seconds(3600 + policy.skew_margin.as_secs() as i64);
        clock.set(t0 + ends - time::Duration::seconds(1));
        s.step().await.unwrap();
        assert!(ca.current().unwrap().is_denied(id), "still covering");
        assert_eq!(store.journal().unwrap().denied.len(), 1);
        clock.set(t0 + ends);
        s.step().await.unwrap();
        assert!(store.journal().unwrap().denied.is_empty());
        assert!(!ca.current().unwrap().is_denied(id), "expired");
    }

    /// Through the real scheduler and a store: every JWT key that signs was in the JWT bundle
    /// the store published before it signed, for a whole key rotation on a moved clock, and
    /// the new key only signs once its bundle was published for the lead.
    #[tokio::test]
    async fn a_jwt_key_is_published_before_it_signs() {
        let t0 = time::macros::datetime!(2030-01-01 0:00 UTC);
        let td = TrustDomain::new("cluster.local").unwrap();
        let opts = super::bootstrap::CaOptions::new(td.clone());
        let policy = RotationPolicy {
            jwt: crate::ca::policy::JwtKeyPolicy {
                key_ttl: Duration::from_secs(3600),
                refresh_hint: Duration::from_secs(120),
                ..Default::default()
            },
            ..RotationPolicy::default()
        };
        let j = super::bootstrap::new_journal(&opts, t0).unwrap();
        let (store, ca, clock, s) = on_manual_clock(j, policy, t0, td);
        let kids = |jwks: &str| -> Vec<String> {
            let v: serde_json::Value = serde_json::from_str(jwks).unwrap();
            v["keys"]
                .as_array()
                .unwrap()
                .iter()
                .map(|k| k["kid"].as_str().unwrap().to_string())
                .collect()
        };
        let mut signers = Vec::new();
        let mut published_before_signing = std::collections::HashMap::new();
        for minute in 0..=120 {
            clock.set(t0 + time::Duration::minutes(minute));
            s.step().await.unwrap();
            for k in kids(&store.jwks()) {
                published_before_signing.entry(k).or_insert(minute);
            }
            let active = ca.jwt_current().unwrap().active.clone().unwrap().kid;
            let since = published_before_signing
                .get(&active)
                .unwrap_or_else(|| panic!("{active} signs at minute {minute}, unpublished"));
            if signers.last() != Some(&active) {
                // The first key signs at once; later ones 5 hints (10 min) after publication.
                if !signers.is_empty() {
                    assert!(
                        minute - since >= 10,
                        "{active} signed {}m after",
                        minute - since
                    );
                }
                signers.push(active);
            }
        }
        // 1h keys, each made at its predecessor's half-life (0, 30, 60, 90 min) and signing
        // from its predecessor's 5/6: at 0, 50, 80 and 110 min.
        assert_eq!(signers.len(), 4, "{signers:?}");
        assert!(ca.jwt_current().unwrap().sequence >= 3);
    }

    /// Issue 22: the old root never leaves the bundle while an unexpired leaf signed under it
    /// is in the index (it chains only to that root; Linkerd's proxies cannot pick up a new
    /// anchor without a restart). A leaf longer than the rotation's grace (issued before
    /// `--max-ttl` was lowered) holds the completion until it expires, on the injected clock.
    #[tokio::test]
    async fn the_old_root_stays_while_a_leaf_signed_under_it_is_unexpired() {
        let t0 = time::macros::datetime!(2030-01-01 0:00 UTC);
        let hour = 3600;
        let td = TrustDomain::new("cluster.local").unwrap();
        let opts = super::bootstrap::CaOptions::new(td.clone());
        let j = super::bootstrap::new_journal(&opts, t0).unwrap();
        let old_root = j.active_root().unwrap().id.clone();
        let old_int = j.active_signer().unwrap().id.clone();
        let store = Arc::new(MemStore::with_journal(j));
        let policy = RotationPolicy {
            max_leaf_ttl: Duration::from_secs(hour),
            ..RotationPolicy::default()
        };
        let dir = tempfile::tempdir().unwrap();
        let index = Arc::new(crate::store::index::FileIndex::new(dir.path()));
        // A leaf signed under the old root, valid for 30 days (longer than the 1 h max TTL
        // the rotation below plans with).
        let long = t0.unix_timestamp() + 30 * 24 * hour as i64;
        index
            .record(&crate::store::index::IssuedEntry {
                serial: "abcd".into(),
                identity: "spiffe://cluster.local/ns/shop/sa/cart".into(),
                not_after: long,
                issuer: old_int.clone(),
            })
            .unwrap();
        let clock = ManualClock::new(t0);
        let s = Scheduler::new(
            store.clone(),
            Ca::new(),
            policy.clone(),
            Arc::new(clock.clone()),
            td,
        )
        .with_index(index)
        .with_old_root_hold();
        s.step().await.unwrap();
        crate::ca::update::update_journal(store.as_ref(), |j| {
            super::super::apply::prepare_root_rotation(
                j,
                t0,
                &policy,
                "operator",
                Duration::ZERO,
                Duration::from_secs(hour),
            )
            .map_err(|e| e.to_string())
        })
        .await
        .unwrap();
        let roots = || {
            store
                .journal()
                .unwrap()
                .trusted_roots()
                .map(|r| r.id.clone())
                .collect::<Vec<_>>()
        };
        // Publish, activate, withdraw the cross-signed certificate: hours, not days.
        for _ in 0..48 {
            clock.advance(time::Duration::hours(1));
            s.step().await.unwrap();
        }
        assert!(store
            .journal()
            .unwrap()
            .root_rotation
            .as_ref()
            .unwrap()
            .cross_withdrawn_at
            .is_some());
        assert!(
            roots().contains(&old_root),
            "held: the 30-day leaf chains only to the old root"
        );
        clock.set(time::OffsetDateTime::from_unix_timestamp(long - 1).unwrap());
        s.step().await.unwrap();
        assert!(roots().contains(&old_root), "held until the leaf expires");
        clock.set(time::OffsetDateTime::from_unix_timestamp(long).unwrap());
        s.step().await.unwrap();
        assert!(
            !roots().contains(&old_root),
            "the leaf expired: the old root leaves the bundle"
        );
        assert!(store.journal().unwrap().root_rotation.is_none());
    }
}
