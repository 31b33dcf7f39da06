//! An in-memory [`Store`], for tests and simulations: the scheduler's unit tests, the
//! years-in-milliseconds rotation simulation, and anything that needs the Store contract
//! without a disk or a cluster.
//!
//! It can "crash the process" at a chosen mutation, before or after the write lands, so
//! tests can check that every interrupted step is completed by the next start.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use super::{Revision, Store, StoreError, Versioned};
use crate::future::BoxFuture;
use crate::journal::Journal;

/// Journal, bundle and CRLs in memory, with compare-and-swap like the real stores.
#[derive(Debug, Default)]
pub struct MemStore {
    journal: Mutex<Option<(Journal, u64)>>,
    bundle: Mutex<String>,
    crl: Mutex<String>,
    jwks: Mutex<String>,
    mutations: AtomicUsize,
    /// Fail at this mutation number: `(n, false)` before it takes effect, `(n, true)` just
    /// after.
    crash_at: Mutex<Option<(usize, bool)>>,
    /// What [`Store::revocation_ceiling`] answers (tests of the bounded backends).
    ceiling: Option<usize>,
}

impl MemStore {
    /// A store already holding `journal` (at revision 1; not counted as a mutation).
    pub fn with_journal(journal: Journal) -> Self {
        let s = Self::default();
        *s.journal.lock().unwrap_or_else(|p| p.into_inner()) = Some((journal, 1));
        s
    }

    /// Bounds revocation writes the way the Kubernetes store does, at `bytes`.
    pub fn with_revocation_ceiling(mut self, bytes: usize) -> Self {
        self.ceiling = Some(bytes);
        self
    }

    /// The stored journal, if any.
    pub fn journal(&self) -> Option<Journal> {
        self.journal
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|(j, _)| j.clone())
    }

    /// The trust bundle last published.
    pub fn bundle(&self) -> String {
        self.bundle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The CRLs last published.
    pub fn crl(&self) -> String {
        self.crl.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The JWT bundle last published.
    pub fn jwks(&self) -> String {
        self.jwks.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Mutations so far (journal writes and changed publications).
    pub fn mutations(&self) -> usize {
        self.mutations.load(Ordering::SeqCst)
    }

    /// Makes mutation number `at` fail as if the process died, after the write landed when
    /// `after` is true; `None` stops injecting.
    pub fn crash_at(&self, crash: Option<(usize, bool)>) {
        *self.crash_at.lock().unwrap_or_else(|p| p.into_inner()) = crash;
    }

    fn mutate(&self, write: impl FnOnce()) -> Result<(), StoreError> {
        let n = self.mutations.fetch_add(1, Ordering::SeqCst);
        match *self.crash_at.lock().unwrap_or_else(|p| p.into_inner()) {
            Some((at, after)) if at == n => {
                if after {
                    write();
                }
                Err(StoreError::Corrupt {
                    what: "process".into(),
                    reason: format!("crash injected at mutation {n}"),
                })
            }
            _ => {
                write();
                Ok(())
            }
        }
    }

    fn publish(&self, slot: &Mutex<String>, pem: &str) -> Result<(), StoreError> {
        if *slot.lock().unwrap_or_else(|p| p.into_inner()) == pem {
            return Ok(());
        }
        self.mutate(|| *slot.lock().unwrap_or_else(|p| p.into_inner()) = pem.to_string())
    }
}

impl Store for MemStore {
    fn describe(&self) -> String {
        "memory".into()
    }

    fn revocation_ceiling(&self) -> Option<usize> {
        self.ceiling
    }

    fn load_journal(&self) -> BoxFuture<'_, Result<Option<Versioned<Journal>>, StoreError>> {
        let v = self
            .journal
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        Box::pin(async move {
            Ok(v.map(|(j, r)| Versioned {
                value: j,
                revision: Revision(r.to_string()),
            }))
        })
    }

    fn save_journal<'a>(
        &'a self,
        journal: &'a Journal,
        expected: Option<&'a Revision>,
    ) -> BoxFuture<'a, Result<Revision, StoreError>> {
        Box::pin(async move {
            let cur = self
                .journal
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
                .map(|(_, r)| *r);
            if cur.map(|r| r.to_string()) != expected.map(|r| r.0.clone()) {
                return Err(StoreError::Conflict);
            }
            let next = cur.unwrap_or(0) + 1;
            self.mutate(|| {
                *self.journal.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some((journal.clone(), next))
            })?;
            Ok(Revision(next.to_string()))
        })
    }

    fn publish_bundle<'a>(&'a self, pem: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(std::future::ready(self.publish(&self.bundle, pem)))
    }

    fn publish_crl<'a>(&'a self, pem: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(std::future::ready(self.publish(&self.crl, pem)))
    }

    fn publish_jwks<'a>(&'a self, jwks: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(std::future::ready(self.publish(&self.jwks, jwks)))
    }
}
