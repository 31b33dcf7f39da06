//! Years of CA operation in simulated time (ManualClock, no sleeping), checking the invariant
//! that matters: every leaf issued at any instant verifies against every trust bundle
//! published at any instant of that leaf's lifetime. Plus a crash injected at every write.

use std::sync::Arc;
use std::time::Duration;

use citadel::ca::apply::prepare_root_rotation;
use citadel::ca::bootstrap::{self, CaOptions};
use citadel::ca::policy::RotationPolicy;
use citadel::ca::scheduler::Scheduler;
use citadel::ca::Ca;
use citadel::clock::{Clock, ManualClock};
use citadel::journal::{Role, Status};
use citadel::pki::chain::{self, Usage};
use citadel::pki::{csr, pem, KeyType};
use citadel::store::mem::MemStore;
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;

use crate::support::*;

struct Leaf {
    der: CertificateDer<'static>,
    chain: Vec<CertificateDer<'static>>,
    not_before: i64,
    not_after: i64,
}

/// A trust bundle as clients saw it, from `from` until `until` (exclusive).
struct Bundle {
    roots: Vec<CertificateDer<'static>>,
    from: i64,
    until: i64,
}

struct World {
    store: Arc<MemStore>,
    clock: ManualClock,
    policy: RotationPolicy,
    scheduler: Scheduler,
    leaves: Vec<Leaf>,
    bundles: Vec<Bundle>,
    key: citadel::pki::csr::SubjectKey,
    restarts: usize,
}

impl World {
    fn new(policy: RotationPolicy, start: OffsetDateTime) -> Self {
        citadel::install_crypto_provider();
        let clock = ManualClock::new(start);
        let mut opts = CaOptions::new(td());
        opts.root_ttl = policy.root_ttl;
        opts.intermediate_ttl = policy.intermediate_ttl;
        let store = Arc::new(MemStore::with_journal(
            bootstrap::new_journal(&opts, start).unwrap(),
        ));
        let scheduler = Self::boot(&store, &policy, &clock);
        let k = KeyType::EcP256.generate().unwrap();
        let key = csr::parse_pem(
            csr::build(&k, &spiffe("shop", "cart").to_string())
                .unwrap()
                .as_bytes(),
        )
        .unwrap()
        .key;
        World {
            store,
            clock,
            policy,
            scheduler,
            leaves: vec![],
            bundles: vec![],
            key,
            restarts: 0,
        }
    }

    /// A fresh process: nothing survives but the store.
    fn boot(store: &Arc<MemStore>, policy: &RotationPolicy, clock: &ManualClock) -> Scheduler {
        Scheduler::new(
            store.clone(),
            Ca::new(),
            policy.clone(),
            Arc::new(clock.clone()),
            td(),
        )
    }

    fn now(&self) -> i64 {
        self.clock.now().unix_timestamp()
    }

    /// One scheduler pass; a crash restarts the process and runs the pass again.
    async fn step(&mut self) {
        if self.scheduler.step().await.is_err() {
            self.restarts += 1;
            self.scheduler = Self::boot(&self.store, &self.policy, &self.clock);
            self.scheduler
                .step()
                .await
                .expect("the pass after a restart completes");
        }
        self.observe_bundle();
        self.check_state();
    }

    fn observe_bundle(&mut self) {
        let now = self.now();
        let published = self.store.bundle();
        let roots = pem::parse_certs(published.as_bytes()).unwrap();
        match self.bundles.last_mut() {
            Some(b) if b.roots == roots => b.until = now + 1,
            Some(b) => {
                b.until = now;
                self.bundles.push(Bundle {
                    roots,
                    from: now,
                    until: now + 1,
                });
            }
            None => self.bundles.push(Bundle {
                roots,
                from: now,
                until: now + 1,
            }),
        }
    }

    /// Structural invariants after every pass.
    fn check_state(&self) {
        let j = self.store.journal().unwrap();
        let active: Vec<_> = j
            .authorities
            .iter()
            .filter(|a| a.role == Role::Intermediate && a.status == Status::Active)
            .collect();
        assert_eq!(active.len(), 1, "exactly one active intermediate");
        let signer = self.scheduler.ca.current().expect("a signer is installed");
        assert_eq!(
            signer.id(),
            active[0].id,
            "the installed signer is the journal's active one"
        );
        let bundle: String = j.trusted_roots().map(|r| r.cert_pem.as_str()).collect();
        assert_eq!(
            self.store.bundle(),
            bundle,
            "published bundle = journal's trusted roots"
        );
        assert_eq!(
            signer.roots_pem(),
            bundle,
            "responses carry the published bundle"
        );
        assert!(j.trusted_roots().count() <= 2);
        for c in &j.crls {
            let a = j.get(&c.issuer).expect("CRL of a known authority");
            assert_ne!(
                a.status,
                Status::Retired,
                "no CRL kept for a retired authority"
            );
            assert!(c.next_update > self.now(), "every kept CRL is current");
        }
        assert!(
            signer.signing_cert().not_after.unix_timestamp() > self.now(),
            "the signer is never expired"
        );
    }

    fn issue(&mut self, ttl: Duration) {
        let signer = self.scheduler.ca.current().unwrap();
        let issued = signer
            .issue_workload(&self.key, &spiffe("shop", "cart"), self.clock.now(), ttl)
            .unwrap();
        // Response order: cross-signed (if any) first, then the regular intermediates.
        let mut chain: Vec<CertificateDer<'static>> = signer.alternates_der().to_vec();
        chain.extend(signer.intermediates_der().iter().cloned());
        self.leaves.push(Leaf {
            der: issued.der,
            chain,
            not_before: issued.not_before.unix_timestamp(),
            not_after: issued.not_after.unix_timestamp(),
        });
    }

    /// The invariant, checked at both ends of every (leaf lifetime x bundle period) overlap.
    fn check_validity(&self) -> usize {
        let mut checks = 0;
        for leaf in &self.leaves {
            for b in &self.bundles {
                let (lo, hi) = (leaf.not_before.max(b.from), leaf.not_after.min(b.until));
                if lo >= hi {
                    continue;
                }
                for t in [lo, hi - 1] {
                    let at = OffsetDateTime::from_unix_timestamp(t).unwrap();
                    // Full path building (webpki), and first-match like OpenSSL/BoringSSL:
                    // only the first intermediate of the response.
                    for (how, ints) in [
                        ("webpki", &leaf.chain[..]),
                        ("first-match", &leaf.chain[..1]),
                    ] {
                        chain::verify_leaf(&leaf.der, ints, &b.roots, at, Usage::ClientAuth).unwrap_or_else(|e| {
                            panic!("{how}: leaf issued at {} fails at {t} against the bundle published {}..{}: {e}", leaf.not_before, b.from, b.until)
                        });
                        checks += 1;
                    }
                }
            }
        }
        checks
    }
}

impl World {
    /// The same invariant as `check_validity`, judged by go-spiffe (`x509svid.Verify`, Go's
    /// path building): every leaf, at both ends of its overlap with every bundle clients held.
    fn gospiffe_check_validity(&self, bin: &std::path::Path) -> usize {
        use citadel::pki::pem::{cert_to_pem, certs_to_pem};
        let id = spiffe("shop", "cart").to_string();
        let mut checks = 0;
        for leaf in &self.leaves {
            let chain = cert_to_pem(&leaf.der) + &certs_to_pem(&leaf.chain);
            for b in &self.bundles {
                let (lo, hi) = (leaf.not_before.max(b.from), leaf.not_after.min(b.until));
                if lo >= hi {
                    continue;
                }
                let bundle = certs_to_pem(&b.roots);
                for t in [lo, hi - 1] {
                    crate::thirdparty::gospiffe_verify(bin, &chain, &bundle, &id, Some(t))
                        .unwrap_or_else(|e| panic!("go-spiffe: leaf issued at {} fails at {t} against the bundle published {}..{}: {e}", leaf.not_before, b.from, b.until));
                    checks += 1;
                }
            }
            // And it can fail: after the leaf expired, against the last bundle.
            let last = certs_to_pem(&self.bundles.last().unwrap().roots);
            crate::thirdparty::gospiffe_verify(bin, &chain, &last, &id, Some(leaf.not_after + 1))
                .expect_err("go-spiffe accepted an expired leaf");
        }
        checks
    }
}

const DAY: u64 = 86_400;

#[tokio::test]
async fn ten_years_of_automatic_rotation_never_leave_a_validation_gap() {
    let policy = RotationPolicy {
        root_ttl: Duration::from_secs(4 * 365 * DAY),
        intermediate_ttl: Duration::from_secs(180 * DAY),
        activate_after: Duration::from_secs(14 * DAY),
        max_leaf_ttl: Duration::from_secs(14 * DAY),
        crl_validity: Duration::from_secs(30 * DAY),
        ..RotationPolicy::default()
    };
    let start = time::macros::datetime!(2030-01-01 0:00 UTC);
    let mut w = World::new(policy, start);
    let ttls = [
        Duration::from_secs(DAY),
        Duration::from_secs(7 * DAY),
        Duration::from_secs(14 * DAY),
    ];
    for day in 0..(10 * 365) {
        w.clock.advance(time::Duration::hours(12));
        w.step().await;
        w.issue(ttls[day % 3]);
        w.clock.advance(time::Duration::hours(12));
        w.step().await;
    }
    let j = w.store.journal().unwrap();
    let roots = j
        .authorities
        .iter()
        .filter(|a| a.role == Role::Root)
        .count();
    let ints = j
        .authorities
        .iter()
        .filter(|a| a.role == Role::Intermediate)
        .count();
    assert!(
        roots >= 3,
        "4-year roots rotate at least twice in 10 years: {roots}"
    );
    assert!(
        ints >= 20,
        "180-day intermediates rotate ~every 150 days: {ints}"
    );
    let checks = w.check_validity();
    assert!(checks > 4 * w.leaves.len(), "{checks} checks");
    assert_eq!(w.restarts, 0);
}

#[tokio::test]
async fn emergency_root_rotation_keeps_old_bundle_holders_working_via_cross_signing() {
    let policy = RotationPolicy {
        root_ttl: Duration::from_secs(3650 * DAY),
        intermediate_ttl: Duration::from_secs(365 * DAY),
        max_leaf_ttl: Duration::from_secs(DAY),
        crl_validity: Duration::from_secs(30 * DAY),
        ..RotationPolicy::default()
    };
    let start = time::macros::datetime!(2031-05-01 0:00 UTC);
    let mut w = World::new(policy.clone(), start);
    w.step().await;
    w.issue(Duration::from_secs(DAY));
    // Activate at once: the bundle published a moment ago (old root only) is still what
    // many workloads hold while the first new-chain leaves appear.
    let now = w.clock.now();
    citadel::ca::update::update_journal(w.store.as_ref(), |j| {
        prepare_root_rotation(
            j,
            now,
            &policy,
            "operator",
            Duration::ZERO,
            policy.max_leaf_ttl,
        )
        .map_err(|e| e.to_string())
    })
    .await
    .unwrap();
    w.step().await;
    let signer = w.scheduler.ca.current().unwrap();
    assert_eq!(signer.rotation_stage(), 2, "activated immediately");
    assert_eq!(
        signer.alternates_der().len(),
        1,
        "the new intermediate travels with its cross-signed twin"
    );
    w.issue(Duration::from_secs(DAY));
    // The new leaf verifies against the OLD bundle alone, through the cross-signed path.
    let old_bundle = &w.bundles[0].roots;
    let leaf = w.leaves.last().unwrap();
    chain::verify_leaf(
        &leaf.der,
        &leaf.chain,
        old_bundle,
        w.clock.now(),
        Usage::ClientAuth,
    )
    .unwrap();
    for _ in 0..12 {
        w.clock.advance(time::Duration::hours(8));
        w.step().await;
        w.issue(Duration::from_secs(DAY));
    }
    assert_eq!(
        w.scheduler.ca.current().unwrap().rotation_stage(),
        0,
        "old root retired after the last old leaf"
    );
    w.check_validity();
    if let Some(gs) = crate::thirdparty::gospiffe() {
        let checks = w.gospiffe_check_validity(&gs);
        assert!(checks >= 2 * w.leaves.len(), "{checks} go-spiffe checks");
        // Those bundles were the old root alone (new leaves verify only through the
        // cross-signed intermediate, which Go's path building must find), both roots, and
        // the new root alone.
        let bundles: Vec<_> = w.bundles.iter().map(|b| b.roots.len()).collect();
        assert!(
            bundles.len() >= 3 && bundles.contains(&2),
            "bundles held: {bundles:?}"
        );
    }
}

#[tokio::test]
async fn a_crash_at_every_write_is_completed_by_the_next_start() {
    let policy = RotationPolicy {
        root_ttl: Duration::from_secs(240 * DAY),
        intermediate_ttl: Duration::from_secs(60 * DAY),
        activate_after: Duration::from_secs(3 * DAY),
        max_leaf_ttl: Duration::from_secs(2 * DAY),
        crl_validity: Duration::from_secs(90 * DAY),
        ..RotationPolicy::default()
    };
    let start = time::macros::datetime!(2032-01-01 0:00 UTC);
    let days = 260;
    let run = |crash: Option<(usize, bool)>| {
        let policy = policy.clone();
        async move {
            let mut w = World::new(policy, start);
            w.store.crash_at(crash);
            for _ in 0..days {
                w.clock.advance(time::Duration::days(1));
                w.step().await;
                w.issue(Duration::from_secs(2 * DAY));
            }
            w.check_validity();
            let j = w.store.journal().unwrap();
            let mut shape: Vec<(String, String)> = j
                .authorities
                .iter()
                .map(|a| (format!("{:?}", a.role), format!("{:?}", a.status)))
                .collect();
            shape.sort();
            (w.store.mutations(), shape, w.restarts)
        }
    };
    let (mutations, clean_shape, _) = run(None).await;
    assert!(mutations > 10, "the scenario writes {mutations} times");
    for at in 0..mutations {
        for after in [false, true] {
            let (_, shape, restarts) = run(Some((at, after))).await;
            assert_eq!(restarts, 1, "crash {at}/{after} happened once");
            assert_eq!(
                shape, clean_shape,
                "crash at write {at} (applied: {after}) ends in the same CA shape"
            );
        }
    }
}
