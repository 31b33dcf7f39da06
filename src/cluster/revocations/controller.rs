//! The Revocation controller of one replica (every replica runs one, leader or not): the
//! reconcile of each Revocation against this replica's issuance index, the journal cache fed
//! by the journal Secret's watch, batched journal writes, the loop that lifts denials whose
//! Revocation is gone, and the Events.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::TryStreamExt;
use kube::api::{Api, Patch, PatchParams};
use kube::core::DynamicObject;
use kube::runtime::controller::{self, Action};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::{reflector, watcher, Controller, WatchStreamExt};
use kube::{Resource, ResourceExt};

use super::status::{changes, rfc3339};
use super::*;
use crate::ca::revocation;
use crate::clock::SharedClock;
use crate::journal::Journal;
use crate::shutdown::Shutdown;
use crate::store::index::{IssuanceIndex, IssuedEntry};
use crate::store::Store;

/// How long after a serial Revocation was created a replica whose index does not know the
/// serial waits for the one that does, before listing it on every unexpired intermediate's CRL.
pub const FALLBACK_AFTER: Duration = Duration::from_secs(10);

/// How often each replica looks for denials whose Revocation is gone (an in-memory check; the
/// API server is asked only when one is found).
pub const LIFT_EVERY: Duration = Duration::from_secs(5);

/// Why a reconcile failed (retried; a person sees it as a Warning Event).
#[derive(Debug, thiserror::Error)]
pub enum RevocationError {
    /// Reading the index, the journal, or the API failed.
    #[error("{0}")]
    Failed(String),
}

/// The Revocation controller of one replica.
pub struct RevocationController {
    client: kube::Client,
    namespace: String,
    /// This replica's name: its key in `status.replicas`.
    replica: String,
    store: Arc<dyn Store>,
    index: Arc<dyn IssuanceIndex>,
    clock: SharedClock,
    trust_domain: String,
    /// The rotation policy the scheduler runs with: how long a denial lasts by itself
    /// ([`revocation::denial_ends_at`]).
    policy: crate::ca::policy::LivePolicy,
    recorder: Recorder,
    /// Wakes the scheduler after this controller wrote the journal (installs the denial now).
    wake: Arc<tokio::sync::Notify>,
    /// (uid, generation) -> index entries found, so a re-reconcile (every journal change)
    /// does not rescan the index.
    scanned: Mutex<BTreeMap<(String, i64), Vec<IssuedEntry>>>,
    /// The newest journal this replica has seen, with its resourceVersion: filled by the
    /// journal watch (which carries the whole Secret anyway) and by this controller's own
    /// writes. Every reconcile of a pass reads it here, so a journal change costs no GET per
    /// Revocation (issue 20, M3: it cost R GETs of a Secret up to 1 MiB, R^2 for R new ones).
    journal: Mutex<Option<(crate::store::Revision, Arc<Journal>)>>,
    /// One journal write at a time from this replica: reconciles run concurrently, and R of
    /// them racing one compare-and-swap cost O(R^2) API calls in conflicts.
    writer: tokio::sync::Mutex<()>,
    /// Changes waiting for [`RevocationController::write_batched`]'s next write.
    queue: Mutex<Vec<Pending>>,
    /// What that write did for each change (by holder) whose reconcile still waits.
    outcomes: Mutex<BTreeMap<String, Outcome>>,
    /// The CertificateAuthority resource (`serve --ca-resource`) that also gets the Events.
    ca_resource: String,
}

/// One Revocation's change, queued for a batched journal write.
struct Pending {
    target: Target,
    reason: RevocationReason,
    mine: Vec<IssuedEntry>,
    fallback: bool,
    holder: String,
    now: time::OffsetDateTime,
}

/// What a batched write did for one change.
enum Outcome {
    /// Applied (certificates newly on a CRL) in memory, or nothing to do (`None`).
    Done(Option<usize>),
    /// Written, with the journal committed.
    Written(usize, Arc<Journal>),
    /// Refused: it would pass the ceiling.
    Full {
        bytes: usize,
        ceiling: usize,
        revocations: usize,
        denied: usize,
    },
    /// Refused or failed otherwise.
    Failed(String),
}

/// Whether resourceVersion `a` is newer than `b`. Kubernetes calls them opaque, but they are
/// etcd revisions and order as integers; anything else counts as newer (take what came last).
fn newer(a: &crate::store::Revision, b: &crate::store::Revision) -> bool {
    match (a.0.parse::<u64>(), b.0.parse::<u64>()) {
        (Ok(a), Ok(b)) => a > b,
        _ => a != b,
    }
}

impl RevocationController {
    /// A controller for the Revocations in `namespace`, reporting as `replica`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        client: kube::Client,
        namespace: &str,
        replica: &str,
        store: Arc<dyn Store>,
        index: Arc<dyn IssuanceIndex>,
        clock: SharedClock,
        trust_domain: &str,
        policy: impl Into<crate::ca::policy::LivePolicy>,
        wake: Arc<tokio::sync::Notify>,
        ca_resource: &str,
    ) -> Arc<Self> {
        Arc::new(Self {
            recorder: Recorder::new(
                client.clone(),
                Reporter {
                    controller: "citadel".into(),
                    instance: Some(replica.to_string()),
                },
            ),
            client,
            namespace: namespace.to_string(),
            replica: replica.to_string(),
            store,
            index,
            clock,
            trust_domain: trust_domain.to_string(),
            policy: policy.into(),
            wake,
            scanned: Mutex::new(BTreeMap::new()),
            journal: Mutex::new(None),
            writer: tokio::sync::Mutex::new(()),
            queue: Mutex::new(Vec::new()),
            outcomes: Mutex::new(BTreeMap::new()),
            ca_resource: ca_resource.to_string(),
        })
    }

    /// Applies `p` to the journal together with every other change queued meanwhile: one
    /// compare-and-swap write for a burst of Revocations (600 created at once were 600
    /// writes of a journal of up to 768 KiB, one after the other). Each change gets its own
    /// answer: how many certificates it put on a CRL (`None`: nothing to do any more), or
    /// `JournalFull` for a change that would pass the ceiling (the others are still written).
    async fn write_batched(
        &self,
        p: Pending,
    ) -> Result<Option<(usize, Arc<Journal>)>, crate::ca::update::UpdateError> {
        use crate::ca::update::{check_ceiling, UpdateError};
        let key = p.holder.clone();
        self.queue.lock().unwrap_or_else(|e| e.into_inner()).push(p);
        let _one_writer = self.writer.lock().await;
        let outcome = self
            .outcomes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&key);
        let outcome = match outcome {
            Some(o) => o,
            None => {
                let items =
                    std::mem::take(&mut *self.queue.lock().unwrap_or_else(|e| e.into_inner()));
                let ceiling = self.store.revocation_ceiling();
                let validity = self.policy.rotation().crl_validity;
                let mut results: Vec<Outcome> = Vec::new();
                let written = crate::ca::update::update(self.store.as_ref(), None, |j| {
                    let apply_one = |j: &mut Journal, it: &Pending| {
                        apply(
                            j,
                            &it.target,
                            it.reason,
                            &it.mine,
                            it.fallback,
                            it.now,
                            validity,
                            &it.holder,
                        )
                    };
                    // Fast path: all of them, then one size check.
                    let orig = j.clone();
                    results = items
                        .iter()
                        .map(|it| match apply_one(j, it) {
                            Ok(n) => Outcome::Done(n),
                            Err(e) => Outcome::Failed(e),
                        })
                        .collect();
                    if check_ceiling(j, ceiling).is_err() {
                        // Near the ceiling: one at a time, each checked.
                        *j = orig;
                        for (it, r) in items.iter().zip(results.iter_mut()) {
                            if !matches!(r, Outcome::Done(Some(_))) {
                                continue;
                            }
                            let mut t = j.clone();
                            *r = match apply_one(&mut t, it) {
                                Ok(n) => match check_ceiling(&t, ceiling) {
                                    Ok(()) => {
                                        *j = t;
                                        Outcome::Done(n)
                                    }
                                    Err(UpdateError::JournalFull {
                                        bytes,
                                        ceiling,
                                        revocations,
                                        denied,
                                    }) => Outcome::Full {
                                        bytes,
                                        ceiling,
                                        revocations,
                                        denied,
                                    },
                                    Err(e) => Outcome::Failed(e.to_string()),
                                },
                                Err(e) => Outcome::Failed(e),
                            };
                        }
                    }
                    let any = results.iter().any(|r| matches!(r, Outcome::Done(Some(_))));
                    Ok(any.then_some(()))
                })
                .await;
                let mut journal = None;
                match written {
                    Ok(Some(((), j, revision))) => {
                        journal =
                            Some(self.remember(crate::store::Versioned { value: j, revision }));
                        self.wake.notify_one();
                    }
                    Ok(None) => {}
                    Err(e) => {
                        let msg = e.to_string();
                        results = items.iter().map(|_| Outcome::Failed(msg.clone())).collect();
                    }
                }
                let mut mine = None;
                let mut outcomes = self.outcomes.lock().unwrap_or_else(|e| e.into_inner());
                for (it, r) in items.into_iter().zip(results) {
                    let r = match (r, &journal) {
                        (Outcome::Done(Some(n)), Some(j)) => Outcome::Written(n, j.clone()),
                        (Outcome::Done(Some(_)), None) => Outcome::Done(None),
                        (r, _) => r,
                    };
                    if it.holder == key {
                        mine = Some(r);
                    } else {
                        outcomes.insert(it.holder, r);
                    }
                }
                mine.unwrap_or(Outcome::Done(None))
            }
        };
        match outcome {
            Outcome::Written(n, j) => Ok(Some((n, j))),
            Outcome::Done(_) => Ok(None),
            Outcome::Full {
                bytes,
                ceiling,
                revocations,
                denied,
            } => Err(UpdateError::JournalFull {
                bytes,
                ceiling,
                revocations,
                denied,
            }),
            Outcome::Failed(e) => Err(UpdateError::Refused(e)),
        }
    }

    /// Keeps `v` as the newest journal seen unless a newer one is already kept; returns the
    /// newest.
    fn remember(&self, v: crate::store::Versioned<Journal>) -> Arc<Journal> {
        let mut cache = self.journal.lock().unwrap_or_else(|p| p.into_inner());
        match cache.as_ref() {
            Some((rev, j)) if !newer(&v.revision, rev) => j.clone(),
            _ => {
                let j = Arc::new(v.value);
                *cache = Some((v.revision, j.clone()));
                j
            }
        }
    }

    /// The newest journal seen; read from the store only before the watch delivered one.
    async fn current_journal(&self) -> Result<Arc<Journal>, RevocationError> {
        if let Some((_, j)) = self
            .journal
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            return Ok(j.clone());
        }
        let loaded = self
            .store
            .load_journal()
            .await
            .map_err(|e| RevocationError::Failed(format!("cannot read the CA journal: {e}")))?
            .ok_or_else(|| RevocationError::Failed("the store holds no CA journal".into()))?;
        Ok(self.remember(loaded))
    }

    /// Runs until shutdown, on every replica. Every Revocation is reconciled when it changes,
    /// and all of them when the journal Secret changes (another replica applied one: the
    /// status counts move), debounced; denials whose Revocation is gone are lifted.
    pub async fn run(self: Arc<Self>, shutdown: Shutdown) {
        let api: Api<Revocation> = Api::namespaced(self.client.clone(), &self.namespace);
        // Without the CRD the watch just retries; say once why revocations are not applied.
        if let Err(kube::Error::Api(s)) = api.list(&kube::api::ListParams::default().limit(1)).await
        {
            tracing::warn!(namespace = %self.namespace, code = s.code, error = %s.message, "cannot list Revocations (citadel.dev/v1alpha1): install the CRD (kubectl apply -f deploy/crds/revocation.yaml) and grant citadel get/list/watch on revocations; until then Revocation resources are not applied");
        }
        let secrets: Api<k8s_openapi::api::core::v1::Secret> =
            Api::namespaced(self.client.clone(), &self.namespace);
        let me = self.clone();
        let journal_changes = watcher(
            secrets,
            watcher::Config::default().fields(&format!(
                "metadata.name={}",
                crate::store::kube::JOURNAL_SECRET
            )),
        )
        .default_backoff()
        .touched_objects()
        .filter_map(move |r| {
            // The watch event carries the Secret: decode it once here for every reconcile of
            // the pass it triggers.
            if let Ok(secret) = r.as_ref() {
                match crate::store::kube::decode_journal_secret(&me.namespace, secret) {
                    Ok(v) => {
                        me.remember(v);
                    }
                    Err(e) => tracing::warn!(error = %e, "the journal Secret does not decode"),
                }
            }
            std::future::ready(r.ok().map(|_| ()))
        });
        let sd = shutdown.clone();
        // The Revocation cache, built here rather than by `Controller::new` so the lift loop
        // learns that it holds the API server's list from the stream itself. It must not wait
        // on the cache's own readiness: the controller waits on it too, and kube-runtime's
        // `Store::wait_until_ready` wakes only the last of several concurrent waiters (its
        // one-shot keeps one waker), so the lift loop, which waited first, never woke and no
        // denial was ever lifted (the KNOWN FAILING `deleting_a_revocation_lifts_its_denial`).
        let (cache, writer) = reflector::store::<Revocation>();
        let (listed_tx, listed) = tokio::sync::watch::channel(false);
        let revocations = watcher(api, watcher::Config::default())
            .reflect(writer)
            .inspect_ok(move |e| {
                // After `reflector` applied it: the cache now holds the whole list.
                if matches!(e, watcher::Event::InitDone) {
                    listed_tx.send_replace(true);
                }
            })
            .applied_objects();
        let controller = Controller::for_stream(revocations, cache.clone())
            .with_config(controller::Config::default().debounce(Duration::from_millis(500)));
        tokio::spawn(self.clone().lift_loop(cache, listed, shutdown.clone()));
        controller
            .reconcile_all_on(journal_changes)
            .graceful_shutdown_on(async move { sd.wait().await })
            .run(
                |rev, me: Arc<Self>| async move { me.reconcile(&rev).await },
                |rev, e, me: Arc<Self>| {
                    tracing::warn!(revocation = %rev.name_any(), error = %e, "could not apply a Revocation yet; will retry");
                    let (rev, me, note) = (rev.clone(), me.clone(), e.to_string());
                    tokio::spawn(async move { me.event(&rev, EventType::Warning, "Failed", note).await });
                    Action::requeue(Duration::from_secs(5))
                },
                self.clone(),
            )
            .for_each(|_| std::future::ready(()))
            .await;
    }

    /// Every [`LIFT_EVERY`], lifts the denials whose Revocation is gone, once `listed` says the
    /// cache of Revocations holds the API server's initial list (an empty cache would lift
    /// them all).
    async fn lift_loop(
        self: Arc<Self>,
        revocations: reflector::Store<Revocation>,
        mut listed: tokio::sync::watch::Receiver<bool>,
        shutdown: Shutdown,
    ) {
        tokio::select! {
            r = listed.wait_for(|l| *l) => if r.is_err() { return },
            _ = shutdown.wait() => return,
        }
        tracing::debug!(
            revocations = revocations.state().len(),
            "Revocations listed: denials whose Revocation is deleted are lifted from now on"
        );
        loop {
            if let Err(e) = self.lift_unheld(&revocations).await {
                tracing::warn!(error = %e, "could not lift denials whose Revocation was deleted; will retry");
            }
            tokio::select! {
                _ = tokio::time::sleep(LIFT_EVERY) => {}
                _ = shutdown.wait() => return,
            }
        }
    }

    /// The identities the Revocations in `revs` deny now (see [`held_at`]).
    fn held<'a>(&self, revs: impl Iterator<Item = &'a Revocation>) -> HashSet<String> {
        held_at(revs, &self.trust_domain, self.clock.now().unix_timestamp())
    }

    /// Removes from the journal every denial held by a Revocation (see
    /// [`crate::journal::DeniedIdentity`]) when no Revocation names its identity any more:
    /// deleting the Revocation lifts the denial. Returns how many were lifted.
    ///
    /// Found in the in-memory cache first (no API call when nothing is to lift), then
    /// confirmed with a list from the API server: the cache may not have seen a Revocation
    /// created a moment ago whose denial another replica already wrote.
    pub async fn lift_unheld(
        &self,
        revocations: &reflector::Store<Revocation>,
    ) -> Result<usize, RevocationError> {
        let journal = self.current_journal().await?;
        let cached = self.held(revocations.state().iter().map(|r| r.as_ref()));
        let candidates: Vec<&str> = journal
            .denied
            .iter()
            .filter(|d| d.revocation.is_some() && !cached.contains(&d.identity))
            .map(|d| d.identity.as_str())
            .collect();
        if candidates.is_empty() {
            return Ok(0);
        }
        let api: Api<Revocation> = Api::namespaced(self.client.clone(), &self.namespace);
        let listed = api
            .list(&kube::api::ListParams::default())
            .await
            .map_err(|e| RevocationError::Failed(format!("cannot list Revocations: {e}")))?;
        let held = self.held(listed.items.iter());
        let lift: HashSet<String> = candidates
            .into_iter()
            .filter(|c| !held.contains(*c))
            .map(str::to_string)
            .collect();
        if lift.is_empty() {
            return Ok(0);
        }
        let _one_writer = self.writer.lock().await;
        let written = crate::ca::update::update(self.store.as_ref(), None, |j| {
            let before = j.denied.len();
            j.denied
                .retain(|d| !(d.revocation.is_some() && lift.contains(&d.identity)));
            let n = before - j.denied.len();
            Ok((n > 0).then_some(n))
        })
        .await
        .map_err(|e| RevocationError::Failed(format!("cannot write the CA journal: {e}")))?;
        let Some((n, j, rev)) = written else {
            return Ok(0);
        };
        self.remember(crate::store::Versioned {
            value: j,
            revision: rev,
        });
        self.wake.notify_one();
        let names: Vec<&String> = lift.iter().collect();
        tracing::info!(target: "citadel::audit", event = "denial_lifted", identities = ?names, "lifted the denial of identities no Revocation names any more (their Revocations were deleted); the certificates they revoked stay on the CRL until they expire");
        Ok(n)
    }

    /// Records an Event on the Revocation, and on the CertificateAuthority resource if it exists.
    async fn event(&self, rev: &Revocation, type_: EventType, reason: &str, note: String) {
        let ev = Event {
            type_,
            reason: reason.into(),
            note: Some(note.chars().take(1000).collect()),
            action: "Revoke".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, &rev.object_ref(&())).await {
            tracing::debug!(error = %e, "could not record an Event on the Revocation");
        }
        let ar = crate::cluster::names::certificate_authority();
        let cas: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), &self.namespace, &ar);
        if let Ok(Some(ca)) = cas.get_opt(&self.ca_resource).await {
            if let Err(e) = self.recorder.publish(&ev, &ca.object_ref(&ar)).await {
                tracing::debug!(error = %e, "could not record an Event on the CertificateAuthority");
            }
        }
    }

    async fn reconcile(&self, rev: &Revocation) -> Result<Action, RevocationError> {
        let name = rev.name_any();
        let generation = rev.metadata.generation.unwrap_or(0);
        let uid = rev.metadata.uid.clone().unwrap_or_default();
        let now = self.clock.now();
        let old_cond = rev
            .status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == APPLIED));
        let target = match target(&rev.spec, &self.trust_domain) {
            Ok(t) => t,
            Err(msg) => {
                let cond = condition(old_cond, false, "Invalid", msg.clone(), generation, now);
                let report = ReplicaReport {
                    found_in_index: 0,
                    observed_generation: generation,
                };
                let patch = status_patch(None, &cond, &self.replica, &report);
                if changes(rev.status.as_ref(), &patch) {
                    tracing::warn!(revocation = %name, error = %msg, "refused a Revocation");
                    self.event(rev, EventType::Warning, "Invalid", msg).await;
                    self.patch_status(&name, &patch).await?;
                }
                return Ok(Action::await_change());
            }
        };
        // This replica's live certificates of the target, read from the index once per
        // generation (a reconcile on every journal change must not rescan it).
        let key = (uid, generation);
        let cached = self
            .scanned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .cloned();
        let mine = match cached {
            Some(m) => m,
            None => {
                let t = target.clone();
                let m = self
                    .index
                    .live(now.unix_timestamp(), &|e| match &t {
                        Target::Identity(id) => &e.identity == id,
                        Target::Serial(s) => &e.serial == s,
                    })
                    .map_err(|e| {
                        RevocationError::Failed(format!("cannot read the issuance index: {e}"))
                    })?;
                self.scanned
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(key, m.clone());
                m
            }
        };
        let age = rev
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| now.unix_timestamp() - t.0.as_second())
            .unwrap_or(i64::MAX);
        let fallback = age >= FALLBACK_AFTER.as_secs() as i64;
        let holder = format!("{}/{name}", self.namespace);
        let mut journal = self.current_journal().await?;
        // A serial the journal carried once and has pruned (its certificate expired) is done:
        // adding it again would keep an expired serial on every CRL for another year.
        let applied_at = rev.status.as_ref().and_then(|s| s.applied_at.as_deref());
        let expired = match &target {
            Target::Serial(_) => applied_at.is_some() && journal_view(&journal, &target).is_none(),
            // Its denial was dropped by the scheduler once nothing it covered could be valid
            // (at the earliest `--max-ttl` after it was applied): applying it again would deny
            // the identity for another `--max-ttl`, on every journal change.
            Target::Identity(_) if matches!(expires_at(&rev.spec), Ok(Some(e)) if now.unix_timestamp() >= e) => {
                true
            }
            Target::Identity(_) => denial_over(
                applied_at,
                journal_view(&journal, &target).is_some(),
                now.unix_timestamp(),
                self.policy.rotation().max_leaf_ttl,
            ),
        };
        let placeable = matches!(target, Target::Identity(_)) || !mine.is_empty() || fallback;
        let (validity, reason) = (self.policy.rotation().crl_validity, rev.spec.reason);
        let ceiling = self.store.revocation_ceiling();
        let mut full = None;
        if !expired && placeable && !satisfied(&journal, &target, &mine) {
            // Tried on the journal in memory first: a Revocation that would pass the ceiling
            // is refused without an API call on every journal change.
            let mut trial = (*journal).clone();
            let changed = apply(
                &mut trial, &target, reason, &mine, fallback, now, validity, &holder,
            )
            .map_err(RevocationError::Failed)?;
            let checked = match changed {
                None => Ok(()),
                Some(_) => crate::ca::update::check_ceiling(&trial, ceiling),
            };
            let written = match checked {
                Ok(()) if changed.is_some() => {
                    self.write_batched(Pending {
                        target: target.clone(),
                        reason,
                        mine: mine.clone(),
                        fallback,
                        holder: holder.clone(),
                        now,
                    })
                    .await
                }
                Ok(()) => Ok(None),
                Err(e) => Err(e),
            };
            match written {
                Ok(Some((n, j))) => {
                    journal = j;
                    self.wake.notify_one();
                    let how = match &target {
                        Target::Serial(_) if mine.is_empty() => {
                            " (no replica's index knew it: listed on every unexpired intermediate's CRL)"
                        }
                        _ => "",
                    };
                    tracing::info!(target: "citadel::audit", event = "revocation_applied", revocation = %name, what = %target, reason = reason.as_str(), revoked_certificates = n, "applied a Revocation{how}");
                    self.event(
                        rev,
                        EventType::Normal,
                        "Applied",
                        format!(
                            "{} applied {target} ({}): {n} certificate(s) newly on the CRL{how}",
                            self.replica,
                            reason.as_str()
                        ),
                    )
                    .await;
                }
                Ok(None) => {}
                Err(e @ crate::ca::update::UpdateError::JournalFull { .. }) => {
                    full = Some(e.to_string());
                }
                Err(e) => {
                    return Err(RevocationError::Failed(format!(
                        "cannot write the CA journal: {e}"
                    )))
                }
            }
        }
        let view = journal_view(&journal, &target);
        let report = ReplicaReport {
            found_in_index: mine.len() as u64,
            observed_generation: generation,
        };
        let cond = match (&view, &target, &full) {
            (Some((_, n, crls)), Target::Identity(id), _) => {
                let ends = journal
                    .is_denied(id)
                    .map(|d| rfc3339(revocation::denial_ends_at(&journal, d, &self.policy.rotation())))
                    .unwrap_or_default();
                condition(
                    old_cond,
                    true,
                    "Applied",
                    format!("{id} is denied new certificates while a Revocation names it (deleting this one lifts the denial unless another names it too), until {ends} at the latest, when every certificate it covers has expired; {n} certificate(s) on {} CRL(s)", crls.len()),
                    generation,
                    now,
                )
            }
            (Some((_, _, crls)), Target::Serial(s), _) => condition(
                old_cond,
                true,
                "Applied",
                format!("serial {s} is on {} CRL(s)", crls.len()),
                generation,
                now,
            ),
            (None, _, Some(msg)) => condition(
                old_cond,
                false,
                "JournalFull",
                format!("refused: {msg}"),
                generation,
                now,
            ),
            (None, Target::Serial(s), None) if expired => condition(
                old_cond,
                true,
                "Expired",
                format!("serial {s} was on the CRL until its certificate expired; nothing is left to revoke"),
                generation,
                now,
            ),
            (None, Target::Identity(id), None) if expired => condition(
                old_cond,
                false,
                "DenialExpired",
                match &rev.spec.expiration_timestamp {
                    Some(at) if matches!(expires_at(&rev.spec), Ok(Some(e)) if now.unix_timestamp() >= e) => format!("the denial of {id} ended at its expirationTimestamp {at}: {id} may get certificates again; delete this Revocation, or create a new one to deny it again"),
                    _ => format!("the denial of {id} ended by itself once every certificate it covered had expired (--max-ttl after it was applied, plus the clock-skew margin): {id} may get certificates again; delete this Revocation, or create a new one to deny it again"),
                },
                generation,
                now,
            ),
            (None, _, None) => condition(
                old_cond,
                false,
                "Pending",
                format!("no replica's index holds serial yet; it goes on every unexpired intermediate's CRL {}s after creation", FALLBACK_AFTER.as_secs()),
                generation,
                now,
            ),
        };
        let patch = status_patch(view.as_ref(), &cond, &self.replica, &report);
        if changes(rev.status.as_ref(), &patch) {
            if let Some(msg) = &full {
                tracing::warn!(revocation = %name, error = %msg, "refused a Revocation: the CA journal is full");
                self.event(rev, EventType::Warning, "JournalFull", msg.clone())
                    .await;
            }
            self.patch_status(&name, &patch).await?;
        }
        if full.is_some() {
            // Retried on every journal change (room may have been freed) and now and then.
            return Ok(Action::requeue(Duration::from_secs(60)));
        }
        if view.is_none() && !expired {
            let wait = (FALLBACK_AFTER.as_secs() as i64 - age).clamp(1, 10) as u64;
            return Ok(Action::requeue(Duration::from_secs(wait)));
        }
        Ok(Action::requeue(Duration::from_secs(300)))
    }

    async fn patch_status(
        &self,
        name: &str,
        patch: &serde_json::Value,
    ) -> Result<(), RevocationError> {
        let api: Api<Revocation> = Api::namespaced(self.client.clone(), &self.namespace);
        api.patch_status(name, &PatchParams::default(), &Patch::Merge(patch))
            .await
            .map(|_| ())
            .map_err(|e| {
                RevocationError::Failed(format!(
                    "cannot update the status of Revocation {name}: {e}"
                ))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The numbers in docs/operations.md: the real index format, 100,000 certificates with
    /// mesh-like identities, its bytes and one scan for an identity. Run with
    /// `cargo test --lib index_bytes_per_100k -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn index_bytes_per_100k() {
        use crate::store::index::{FileIndex, INDEX_FILE};
        let dir = tempfile::tempdir().unwrap();
        let index = FileIndex::new(dir.path());
        let issuer = hex::encode(crate::pki::random_serial());
        for i in 0..100_000u32 {
            index
                .record(&IssuedEntry {
                    serial: crate::pki::chain::serial_hex(&crate::pki::random_serial()),
                    identity: format!(
                        "spiffe://cluster.local/ns/team-{}/sa/service-{}",
                        i % 300,
                        i % 5000
                    ),
                    not_after: 2_000_000_000,
                    issuer: issuer.clone(),
                })
                .unwrap();
        }
        let bytes = std::fs::metadata(dir.path().join(INDEX_FILE))
            .unwrap()
            .len();
        let started = std::time::Instant::now();
        let found = index
            .live(0, &|e| {
                e.identity == "spiffe://cluster.local/ns/team-7/sa/service-7"
            })
            .unwrap();
        println!(
            "100000 entries: {bytes} bytes ({:.1} MiB, {:.0} B/entry); one identity scan: {} found in {:?}",
            bytes as f64 / 1048576.0,
            bytes as f64 / 100_000.0,
            found.len(),
            started.elapsed()
        );
    }
}
