//! Where CA state lives. The default is a directory ([`file::FileStore`]); a Kubernetes
//! store (Secrets and ConfigMaps) plugs in behind the same trait.
//!
//! Writes are compare-and-swap on a revision, so two processes that race to create or
//! rotate a CA cannot both win.

pub mod file;
pub mod index;
pub mod kube;
pub mod mem;

use crate::future::BoxFuture;
use crate::journal::Journal;

/// An opaque version of stored state (a counter for files, a resourceVersion for Kubernetes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revision(pub String);

/// A stored value with the revision to pass back for compare-and-swap.
#[derive(Debug, Clone)]
pub struct Versioned<T> {
    /// What was stored.
    pub value: T,
    /// Its revision when read.
    pub revision: Revision,
}

/// Why the store could not read or write.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Someone else wrote first; reload and retry.
    #[error("the stored CA state changed concurrently")]
    Conflict,
    /// A file or directory could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The path involved.
        path: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Stored data does not decode, or the backend (the Kubernetes API) failed.
    #[error("{what} is corrupt: {reason}")]
    Corrupt {
        /// What was being read or written.
        what: String,
        /// What went wrong.
        reason: String,
    },
    /// The state does not fit the backend (a Kubernetes Secret holds at most 1 MiB); nothing
    /// was written.
    #[error("{what}: {reason}")]
    TooLarge {
        /// Where it was to be written.
        what: String,
        /// How large, what fills it, and what to do.
        reason: String,
    },
}

/// Where the journal is kept and the bundle and CRLs are published; compare-and-swap on a
/// [`Revision`].
pub trait Store: Send + Sync + std::fmt::Debug {
    /// A short description for logs, e.g. `file:/var/lib/citadel`.
    fn describe(&self) -> String;

    /// The stored journal and its revision; `None` when nothing is stored yet.
    fn load_journal(&self) -> BoxFuture<'_, Result<Option<Versioned<Journal>>, StoreError>>;

    /// Writes `journal` if the stored revision is still `expected` (`None`: nothing stored).
    fn save_journal<'a>(
        &'a self,
        journal: &'a Journal,
        expected: Option<&'a Revision>,
    ) -> BoxFuture<'a, Result<Revision, StoreError>>;

    /// Publishes the trust bundle where clients look for it.
    fn publish_bundle<'a>(&'a self, roots_pem: &'a str) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Publishes the CRLs (`ca-crl.pem`).
    fn publish_crl<'a>(&'a self, crl_pem: &'a str) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Publishes the JWT bundle (a JWK Set, `ca::jwt::render_jwks`) where relying parties
    /// and operators look for it. The default publishes nowhere (the bundle is still served
    /// by the CA port's FetchJwtBundle).
    fn publish_jwks<'a>(&'a self, jwks: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        let _ = jwks;
        Box::pin(std::future::ready(Ok(())))
    }

    /// The most bytes a write that adds revocations or denials may leave the journal at
    /// ([`crate::ca::update::update_revocations`] refuses beyond it), so the rest of a bounded
    /// backend always stays free for rotation and CRL re-signing. `None`: unbounded (files).
    fn revocation_ceiling(&self) -> Option<usize> {
        None
    }

    /// The journal's size as this process last read or wrote it, and the most the backend
    /// holds (`citadel_ca_journal_bytes`, `citadel_ca_journal_limit_bytes`). `None`: unbounded
    /// (files), or not read yet.
    fn journal_size(&self) -> Option<(u64, usize)> {
        None
    }
}
