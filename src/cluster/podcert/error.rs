//! The error of a Pod Certificates pass that could not decide now. Its own file because the
//! request checks, the condition mapping and the controller all return it, and none of them
//! should import another for it.

/// A reconcile that could not decide now (API server unreachable, CA not ready, not
/// leading); the controller retries it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PodCertError(pub(super) String);
