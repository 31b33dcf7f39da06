//! Who is calling? Authenticators turn request credentials into a workload identity.
//!
//! The chain tries each authenticator in order and the first success wins (istiod's rule:
//! client certificate for renewals, then the Kubernetes JWT). An authenticator that finds no
//! credential of its kind steps aside; one that finds a bad credential records why, so the
//! final Unauthenticated message explains every attempt.
//!
//! [`issue_path`] is the issue path every surface calls: authenticate with a chain, authorize
//! the identity (the caller's own, or node impersonation), then `ca::issue` and the audit line.

pub mod broker;
pub mod client_cert;
pub mod cluster;
pub mod issue_path;
pub mod jwks;
pub mod jws;
pub mod jwt;
pub mod node;
pub mod pods;
pub mod tokenreview;

use std::fmt;
use std::sync::Arc;

use rustls_pki_types::CertificateDer;

use crate::future::BoxFuture;
use crate::identity::SpiffeId;

/// The credentials a request carries.
///
/// `Debug` is written by hand: a derived one would print the bearer token into any log line
/// or error that formats this value.
#[derive(Default, Clone, Copy)]
pub struct Credentials<'a> {
    /// The bearer token from `authorization: Bearer ...`, if any.
    pub bearer: Option<&'a str>,
    /// The TLS client certificate chain, leaf first, if the client presented one.
    pub peer_chain: Option<&'a [CertificateDer<'static>]>,
    /// The `clusterid` header: which cluster the token says it comes from (see
    /// [`cluster`]); `None` when absent or sent more than once.
    pub cluster_id: Option<&'a str>,
}

impl fmt::Debug for Credentials<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field(
                "bearer",
                &self
                    .bearer
                    .map(|t| format!("<redacted, {} bytes>", t.len())),
            )
            .field("peer_chain", &self.peer_chain.map(<[_]>::len))
            .field("cluster_id", &self.cluster_id)
            .finish()
    }
}

/// How a caller proved its identity: logged in the audit line and labelled in metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    /// A Kubernetes service-account JWT verified locally against the JWKS.
    Jwt,
    /// A client certificate this CA issued (renewal).
    ClientCert,
    /// A service-account token approved by the API server's TokenReview.
    TokenReview,
}

impl fmt::Display for AuthMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AuthMethod::Jwt => "jwt",
            AuthMethod::ClientCert => "client-cert",
            AuthMethod::TokenReview => "tokenreview",
        })
    }
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The SPIFFE ID the certificate will carry.
    pub identity: SpiffeId,
    /// How it was established.
    pub method: AuthMethod,
    /// The pod's name, when the token carries it (projected tokens do); for the audit log.
    pub pod_name: Option<String>,
    /// The pod's UID, when the token carries it; for the audit log and node impersonation.
    pub pod_uid: Option<String>,
    /// The pod's node, when the token carries it (bound tokens since Kubernetes 1.32): node
    /// impersonation checks it against the node the pod index says the pod is on.
    pub node_name: Option<String>,
    /// The remote cluster whose authenticator vouched for the token (`clusterid`); `None` for
    /// the local cluster and client certificates. Checks that look at this cluster's own
    /// objects (node impersonation's pod index) refuse remote callers.
    pub cluster: Option<String>,
}

/// Why an authenticator refused a credential it found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthFailure {
    /// Why it was refused; shown to the client after the authenticator's name.
    pub reason: String,
    /// The credential could not be checked right now (e.g. the API server is unreachable):
    /// the caller should retry, and gets Unavailable rather than Unauthenticated.
    pub transient: bool,
}

impl AuthFailure {
    /// A refusal: the credential is bad, so the caller gets Unauthenticated.
    pub fn invalid(reason: impl std::fmt::Display) -> Self {
        Self {
            reason: reason.to_string(),
            transient: false,
        }
    }
    /// A failure to check the credential now: the caller gets Unavailable and should retry.
    pub fn transient(reason: impl std::fmt::Display) -> Self {
        Self {
            reason: reason.to_string(),
            transient: true,
        }
    }
}

/// Why the chain authenticated nobody; the server maps it to a gRPC status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No authenticator found a credential of its kind.
    #[error("no credentials: send \"authorization: Bearer <service-account token>\" or present a client certificate")]
    NoCredentials,
    /// Every applicable authenticator refused; each reason is listed.
    #[error("authentication failed: {}", .0.join("; "))]
    Failed(Vec<String>),
    /// A credential could not be checked now; retry.
    #[error("authentication is temporarily unavailable: {}", .0.join("; "))]
    Unavailable(Vec<String>),
}

/// What an authenticator can say about a request without spending anything on it: no API
/// call, no wait. The per-peer throttle (server/throttle.rs) applies only to requests the
/// chain cannot settle this way, so a valid client certificate or a token already reviewed
/// is served even from an address that is being throttled for someone else's failures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verified {
    /// `authenticate` would accept the request as this caller.
    Caller(Caller),
    /// `authenticate` would not accept it: no credential of this kind, or a bad one.
    No,
    /// Only `authenticate` can tell, at a cost (a signature check, a TokenReview).
    Unknown,
}

/// One way to establish a caller's identity from the request's credentials.
pub trait Authenticator: Send + Sync {
    /// A short name used in refusal reasons and in the startup log.
    fn name(&self) -> &'static str;

    /// `Ok(None)`: no credential of this kind. `Err`: one was present and was refused.
    fn authenticate<'a>(
        &'a self,
        creds: Credentials<'a>,
    ) -> BoxFuture<'a, Result<Option<Caller>, AuthFailure>>;

    /// What this authenticator knows about `creds` for free. It must never say `Caller`
    /// where `authenticate` would refuse, nor `No` where it would accept; the default
    /// knows nothing.
    fn verified(&self, _creds: Credentials<'_>) -> Verified {
        Verified::Unknown
    }
}

/// Authenticators tried in order.
#[derive(Clone, Default)]
pub struct AuthChain {
    members: Vec<Arc<dyn Authenticator>>,
}

impl AuthChain {
    /// The chain that tries `members` in this order.
    pub fn new(members: Vec<Arc<dyn Authenticator>>) -> Self {
        Self { members }
    }

    /// The members' names, in order.
    pub fn names(&self) -> Vec<&'static str> {
        self.members.iter().map(|m| m.name()).collect()
    }

    /// The caller, when the members can establish it without cost (see [`Verified`]): the
    /// answer [`AuthChain::authenticate`] would give, since members are asked in the same
    /// order and the first that cannot tell for free ends the search.
    pub fn verified(&self, creds: Credentials<'_>) -> Option<Caller> {
        for m in &self.members {
            match m.verified(creds) {
                Verified::Caller(c) => return Some(c),
                Verified::No => {}
                Verified::Unknown => return None,
            }
        }
        None
    }

    /// Tries each member in order: the first that accepts wins. Otherwise Unavailable if any
    /// refusal was transient, else Failed with every reason, or NoCredentials if none found a
    /// credential.
    pub async fn authenticate(&self, creds: Credentials<'_>) -> Result<Caller, AuthError> {
        let (mut reasons, mut transient) = (Vec::new(), false);
        for m in &self.members {
            match m.authenticate(creds).await {
                Ok(Some(caller)) => return Ok(caller),
                Ok(None) => {}
                Err(f) => {
                    transient |= f.transient;
                    reasons.push(format!("{}: {}", m.name(), f.reason));
                }
            }
        }
        match (reasons.is_empty(), transient) {
            (true, _) => Err(AuthError::NoCredentials),
            (false, true) => Err(AuthError::Unavailable(reasons)),
            (false, false) => Err(AuthError::Failed(reasons)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_debug_never_shows_the_token() {
        let token = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzZWNyZXQifQ.c2lnbmF0dXJl";
        let c = Credentials {
            bearer: Some(token),
            peer_chain: None,
            cluster_id: None,
        };
        let shown = format!("{c:?} {c:#?}");
        assert!(!shown.contains(token), "{shown}");
        assert!(!shown.contains("eyJ"), "{shown}");
        assert!(shown.contains("redacted, 56 bytes"), "{shown}");
    }
}
