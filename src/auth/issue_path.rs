//! The one issue path every surface calls: authenticate, authorize the identity, sign,
//! record and audit. Istio's CreateCertificate (`server::istio`), Linkerd's Certify
//! (`server::linkerd`), citadel's JWT-SVID service (`server::jwtsvid`, through
//! [`IssuePath::issue_jwt`]), the Pod Certificates signer (`cluster::podcert`), the
//! Kubernetes CSR signer (`cluster::csrsigner`) and the SPIFFE Broker API (`server::broker`,
//! [`Requester::Broker`], [`IssuePath::issue_jwt_brokered`]) call it; the Workload API on
//! the CA port is to call it too, never copy it.
//!
//! A surface owns only its decode (wire request -> [`Requester`] and [`IssueRequest`]) and its
//! ONE mapping from [`IssueError`] to its wire's answer (a gRPC code, a PodCertificateRequest
//! condition). What happens between "these are the request's credentials" and "here is the
//! certificate, audited" lives here, so a rule added to it (a new identity check, a new
//! revocation check) cannot be forgotten on one surface. The steps, in this order (the order
//! decides which error a request with several faults gets, and is part of the wire
//! behaviour):
//!
//! 1. [`IssuePath::authenticate`]: the surface's [`AuthChain`] over the request's credentials
//!    (a surface with a per-peer throttle wraps this call in it).
//! 2. Authorize the identity: a workload gets its own SPIFFE ID, or another one only when node
//!    impersonation ([`NodeAuthorizer`], `--trusted-node-accounts`) grants it; a request a
//!    controller vouched for from Kubernetes objects gets the identity those objects name.
//! 3. Resolve the TTL ([`TtlPolicy`]: `<= 0` is the default, above the maximum is refused).
//! 4. Read the CSR, and refuse one whose URI SANs name anyone but the identity (or, for a
//!    DNS-form identity, whose one DNS SAN is not the identity's name: [`CsrInput::Dns`]).
//! 5. Sign, record in the issuance index, re-check the deny list ([`sign_leaf`]).
//! 6. Refuse a leaf that the issuer's notAfter cut below the surface's minimum lifetime.
//! 7. Write the audit line ([`audit_issued`]): no audit line, no certificate.
//!
//! JWT-SVIDs ([`IssuePath::issue_jwt`]) take the same path with a JWS in place of the
//! certificate: authenticate (step 1), authorize the caller's own identity only (a
//! `spiffe_id` naming anyone else is [`IssueError::OtherIdentity`]), check the audiences, then
//! `ca::jwt::sign_jwt_svid` (the same deny checks as [`sign_svid`], before and after signing)
//! and one audit line per token ([`crate::ca::jwt::audit_jwt_issued`]; never the token).
//!
//! The error is domain-level: no tonic, no Kubernetes types.

use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;

use super::broker::BrokerGrant;
use super::node::{Impersonation, NodeAuthError, NodeAuthorizer, Refusal};
use super::{AuthChain, AuthError, Caller, Credentials};
use crate::ca::issue::{audit_issued, sign_leaf, AuditRecord, IssueFailure, Leaf};
use crate::ca::jwt::{audit_jwt_issued, sign_jwt_svid, JwtAudit, JwtFailure, JwtSvid};
use crate::ca::policy::{LivePolicy, TtlError};
use crate::ca::revocation::SweepRequest;
use crate::ca::{Ca, Issued, Signer};
use crate::clock::SharedClock;
use crate::identity::{LinkerdNames, SpiffeId};
use crate::pki::cakey::KeyError;
use crate::pki::csr::{self, CsrError, SubjectKey, VerifiedCsr};
use crate::pki::profile::LeafNames;
use crate::store::index::IssuanceIndex;

/// The one answer to every refused impersonation, istiod's words: which check failed is for
/// the server log (and the refusal metric) only, so a caller cannot probe which pods run
/// where.
pub const IMPERSONATION_REFUSED: &str = "request impersonation authentication failure";

/// Why no certificate was handed out. Each surface maps these to its wire in one function
/// (`server::istio::IstioError::status`, `cluster::podcert::status::decision`).
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    /// No authenticator accepted the caller; the text lists why each one refused.
    #[error("{0}")]
    Unauthenticated(String),
    /// A credential could not be checked now (the API server is unreachable, the review
    /// queue is full): the caller should retry.
    #[error("{0}")]
    AuthUnavailable(String),
    /// Node impersonation refused the identity asked for. The check that failed is for logs
    /// and metrics; the caller is told [`IMPERSONATION_REFUSED`] only.
    #[error("{IMPERSONATION_REFUSED}")]
    ImpersonationRefused(Refusal),
    /// Node impersonation cannot be judged: the pod watch has been broken too long.
    #[error(
        "the pod index may be out of date (its watch has been broken for {}s, more than \
         --pod-index-max-staleness {}s); retry shortly",
        .broken_for.as_secs(),
        .max.as_secs()
    )]
    PodIndexStale {
        /// How long the watch has been broken.
        broken_for: Duration,
        /// `--pod-index-max-staleness`.
        max: Duration,
    },
    /// Node impersonation cannot be judged yet: the pod watch has not listed once.
    #[error("the pod index is not synced yet; retry shortly")]
    PodIndexNotSynced,
    /// The requested TTL is above the maximum.
    #[error(transparent)]
    Ttl(#[from] TtlError),
    /// The CSR is malformed, badly signed or has a refused key.
    #[error("invalid CSR: {0}")]
    Csr(#[from] CsrError),
    /// The CSR asks for another identity than the one authorized.
    #[error("CSR asks for {asked}, but the caller is {identity}")]
    OtherIdentity {
        /// The first URI SAN that is not the identity, quoted and bounded
        /// ([`crate::audit::shown`]): it is caller text.
        asked: String,
        /// The authorized identity.
        identity: String,
    },
    /// The CA refused or failed: no signer, denied identity, expired signer, index down,
    /// signing failed.
    #[error(transparent)]
    Ca(#[from] IssueFailure),
    /// The issuer's notAfter cut the leaf below the surface's minimum lifetime
    /// ([`IssueRequest::min_lifetime`]); it is signed and recorded but never handed out.
    #[error("the signing CA expires at {not_after}, too soon for the minimum lifetime of {}s", .min.as_secs())]
    TooShort {
        /// The leaf's (capped) notAfter.
        not_after: OffsetDateTime,
        /// The minimum the surface asked for.
        min: Duration,
    },
    /// The audit line could not be written. The certificate is in the issuance index (so
    /// revocable by identity) but never handed out (Vault's rule: no audit, no certificate).
    #[error("the audit log cannot be written; no certificate is handed out unaudited")]
    Unaudited,
}

/// The most audiences one JWT-SVID may carry (SPIFFE recommends one).
pub const MAX_AUDIENCES: usize = 16;
/// The longest audience, in bytes.
pub const MAX_AUDIENCE_BYTES: usize = 1024;

/// Why no JWT-SVID was handed out. The surface maps these in one function
/// (`server::jwtsvid::JwtSvidError::status`).
#[derive(Debug, thiserror::Error)]
pub enum JwtIssueError {
    /// The refusals a certificate request gets too: authentication, another identity asked
    /// for, no signer, a denied identity, no audit line.
    #[error(transparent)]
    Issue(#[from] IssueError),
    /// No audience, or one that cannot go into a token (empty, too long, control characters).
    #[error("{0}")]
    Audience(String),
    /// No JWT key is active yet (or this CA keeps none: a plugged-in CA).
    #[error("no JWT-SVID signing key is active yet")]
    NoKey,
    /// The JWT key could not sign.
    #[error(transparent)]
    Sign(KeyError),
}

/// A request for a JWT-SVID, decoded by a surface.
#[derive(Debug, Clone, Copy)]
pub struct JwtRequest<'a> {
    /// The authenticated caller: the token is for its own identity only.
    pub caller: &'a Caller,
    /// The identity the request names, if any: it must be the caller's.
    pub spiffe_id: Option<&'a str>,
    /// The `aud` claim: one or more.
    pub audience: &'a [String],
}

/// A JWT-SVID signed and audited: the surface only has to answer with it.
#[derive(Debug)]
pub struct JwtIssued {
    /// The identity in `sub`.
    pub identity: SpiffeId,
    /// The token and its times.
    pub svid: JwtSvid,
}

/// Refuses audiences that cannot go into a token as they are: none, too many, empty, too
/// long, or with control characters (a relying party compares them byte for byte; nothing
/// the caller chose goes into a credential unchecked).
fn check_audience(audience: &[String]) -> Result<(), JwtIssueError> {
    if audience.is_empty() {
        return Err(JwtIssueError::Audience(
            "a JWT-SVID needs at least one audience".into(),
        ));
    }
    if audience.len() > MAX_AUDIENCES {
        return Err(JwtIssueError::Audience(format!(
            "{} audiences; at most {MAX_AUDIENCES}",
            audience.len()
        )));
    }
    for a in audience {
        if a.is_empty() || a.len() > MAX_AUDIENCE_BYTES || a.chars().any(char::is_control) {
            return Err(JwtIssueError::Audience(format!(
                "audience {} must be 1-{MAX_AUDIENCE_BYTES} bytes without control characters",
                crate::audit::shown(a)
            )));
        }
    }
    Ok(())
}

/// Who asks, as the surface established it.
#[derive(Debug, Clone, Copy)]
pub enum Requester<'a> {
    /// A workload authenticated by [`IssuePath::authenticate`] (or its chain's free
    /// `verified` answer). `asks_for`: another identity it wants (ztunnel's
    /// `ImpersonatedIdentity`), judged by node impersonation; naming its own identity is the
    /// same as naming none.
    Workload {
        /// The authenticated caller.
        caller: &'a Caller,
        /// The identity asked for on another workload's behalf, as the request spelled it.
        asks_for: Option<&'a str>,
    },
    /// A request a controller vouched for from Kubernetes objects it checked itself (Pod
    /// Certificates: the live pod, service account and node); the identity is the one those
    /// objects name.
    Vouched(Vouched<'a>),
    /// A SPIFFE broker (`server::broker`) on behalf of a pod on its node, as
    /// `NodeAuthorizer::authorize_broker` granted it: the identity is the pod's, and the
    /// certificate is marked node-issued like an impersonated one (it cannot renew itself).
    Broker(&'a BrokerGrant),
}

/// A request vouched for by a controller, and what its audit line says about it.
#[derive(Debug, Clone, Copy)]
pub struct Vouched<'a> {
    /// The identity the checked objects name.
    pub identity: &'a SpiffeId,
    /// How it was established, for the audit line (`pod-certificate`, `kubernetes-csr`).
    pub auth: &'a str,
    /// Who asked, when the request object records it (a CSR's `spec.username`); empty when
    /// it does not (a PodCertificateRequest: the kubelet).
    pub caller: &'a str,
    /// The pod it is for.
    pub pod: &'a str,
    /// The node that asked.
    pub node: &'a str,
    /// The request object, `<ns>/<name>`.
    pub request: &'a str,
}

/// How long the certificate should live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ttl {
    /// What the request asked for, in seconds, resolved by the path's [`TtlPolicy`].
    Requested(i64),
    /// A lifetime the surface computed under its own wire's rules (Pod Certificates'
    /// `maxExpirationSeconds`), capped only at the issuer.
    Exact(Duration),
}

/// The CSR, as the surface received it.
#[derive(Debug, Clone, Copy)]
pub enum CsrInput<'a> {
    /// A PEM CSR: parsed and verified here, and its URI SANs must name the identity.
    Pem(&'a [u8]),
    /// A DER CSR: the same.
    Der(&'a [u8]),
    /// Only the key, from a CSR the surface parsed itself and whose names it does not use
    /// (Pod Certificates' stub request: signers take only its public key).
    Key(&'a SubjectKey),
    /// A CSR for a DNS-form identity (Linkerd's Certify), parsed and verified by the surface
    /// (it checks the name against the request before spending a TokenReview). It must have
    /// an ECDSA key and exactly one DNS SAN, equal to the authorized identity's name under
    /// `names`, and nothing else ([`csr::single_dns_name`]). The leaf carries the name this
    /// path derives from the identity (never the CSR's bytes), plus the SPIFFE ID when
    /// `spiffe_san`.
    Dns {
        /// The parsed CSR.
        csr: &'a VerifiedCsr,
        /// The control plane and domain the DNS-form identity is under.
        names: &'a LinkerdNames,
        /// Also put the SPIFFE ID in the leaf (`--linkerd-spiffe-san`).
        spiffe_san: bool,
    },
}

/// One request for a certificate, decoded by a surface.
#[derive(Debug, Clone, Copy)]
pub struct IssueRequest<'a> {
    /// Who asks.
    pub requester: Requester<'a>,
    /// The key to certify, and the names asked for.
    pub csr: CsrInput<'a>,
    /// How long.
    pub ttl: Ttl,
    /// The shortest leaf the surface's wire accepts (Pod Certificates: the API's 1 h); a leaf
    /// the issuer's notAfter cuts shorter is [`IssueError::TooShort`].
    pub min_lifetime: Option<Duration>,
}

/// A certificate issued, recorded and audited: the surface only has to answer with it.
#[derive(Debug)]
pub struct Certified {
    /// The identity it carries: the caller's, one a node impersonated, or the vouched one.
    pub identity: SpiffeId,
    /// Set when a node proxy asked on a workload's behalf.
    pub via_node: Option<Impersonation>,
    /// The signer that signed it (for the chain the surface sends).
    pub signer: Arc<Signer>,
    /// The certificate.
    pub issued: Issued,
}

impl IssueError {
    /// The CA key could not sign now (an HSM away, busy or reconnecting): a retry may
    /// succeed. Every surface's one mapping asks this rather than matching the nesting, so a
    /// token outage is retryable on all of them (Unavailable, a requeue), never a permanent
    /// refusal.
    pub fn key_unavailable(&self) -> bool {
        matches!(
            self,
            IssueError::Ca(IssueFailure::Sign(crate::ca::SignError::Key(
                KeyError::Unavailable(_)
            )))
        )
    }
}

impl Certified {
    /// The leaf, then the CA certificates up to (not including) the roots, as PEM: what a
    /// Kubernetes signer writes (the roots reach workloads through a trust bundle).
    pub fn chain_without_roots(&self) -> String {
        let mut chain = self.issued.pem.clone();
        for c in self.signer.intermediates_der() {
            if !chain.ends_with('\n') {
                chain.push('\n');
            }
            chain.push_str(&crate::pki::pem::cert_to_pem(c));
        }
        chain
    }
}

/// What issuing needs, shared by every surface of a replica.
pub struct IssuePath {
    /// The CA whose current signer issues.
    pub ca: Arc<Ca>,
    /// Where issued certificates are recorded for `revoke --identity`; `None` keeps no index.
    pub index: Option<Arc<dyn IssuanceIndex>>,
    /// Asks the scheduler to sweep the index again (a denial raced with a signature).
    pub sweep: Arc<SweepRequest>,
    /// The time certificates are issued at.
    pub clock: SharedClock,
    /// How requested TTLs are resolved ([`Ttl::Requested`]): the running policy, read per
    /// request (a CertificateAuthority spec change applies to the next certificate).
    pub ttl: LivePolicy,
    /// Judges requests for another identity (`--trusted-node-accounts`); `None` refuses
    /// them all.
    pub node_auth: Option<Arc<NodeAuthorizer>>,
}

impl IssuePath {
    /// Step 1: the caller `chain` accepts for `creds` (first success wins), or why nobody.
    pub async fn authenticate(
        chain: &AuthChain,
        creds: Credentials<'_>,
    ) -> Result<Caller, IssueError> {
        chain.authenticate(creds).await.map_err(|e| match e {
            e @ AuthError::Unavailable(_) => IssueError::AuthUnavailable(e.to_string()),
            e => IssueError::Unauthenticated(e.to_string()),
        })
    }

    /// Steps 2-7: authorizes the identity, signs, records and audits, or says why not.
    pub fn issue(&self, req: IssueRequest<'_>) -> Result<Certified, IssueError> {
        let (identity, via_node) = self.authorize(&req.requester)?;
        let ttl = match req.ttl {
            Ttl::Requested(secs) => self.ttl.ttl().resolve(secs)?,
            Ttl::Exact(d) => d,
        };
        let parsed;
        let mut leaf_names = LeafNames::SPIFFE;
        let dns_name;
        let (key, sans): (&SubjectKey, &[String]) = match req.csr {
            CsrInput::Pem(pem) => {
                parsed = csr::parse_pem(pem)?;
                (&parsed.key, &parsed.uri_sans)
            }
            CsrInput::Der(der) => {
                parsed = csr::parse_der(der)?;
                (&parsed.key, &parsed.uri_sans)
            }
            CsrInput::Key(key) => (key, &[]),
            CsrInput::Dns {
                csr,
                names,
                spiffe_san,
            } => {
                let asked = csr::single_dns_name(csr)?;
                dns_name = dns_identity(&identity, names, asked)?;
                leaf_names = LeafNames {
                    spiffe: spiffe_san,
                    dns: Some(&dns_name),
                };
                // single_dns_name refused any URI SAN.
                (&csr.key, &csr.uri_sans)
            }
        };
        let want = identity.to_string();
        if let Some(other) = sans.iter().find(|u| **u != want) {
            return Err(IssueError::OtherIdentity {
                asked: crate::audit::shown(other).to_string(),
                identity: want,
            });
        }

        let leaf = Leaf {
            key,
            id: &identity,
            names: leaf_names,
            for_node: via_node.is_some(),
        };
        let (signer, issued) = sign_leaf(
            &self.ca,
            self.index.as_ref(),
            &self.sweep,
            &leaf,
            self.clock.now(),
            ttl,
        )?;
        if let Some(min) = req.min_lifetime {
            if issued.not_after - issued.not_before < min {
                return Err(IssueError::TooShort {
                    not_after: issued.not_after,
                    min,
                });
            }
        }

        let key_type = key.kind().to_string();
        let written = match &req.requester {
            Requester::Workload { caller, .. } => audit_issued(&AuditRecord {
                serial_hex: &issued.serial_hex,
                identity: &want,
                caller: &caller.identity.to_string(),
                not_after: issued.not_after,
                key_type: &key_type,
                auth: &caller.method.to_string(),
                pod: caller.pod_name.as_deref().unwrap_or(""),
                node: via_node.as_ref().map(|i| i.node.as_str()).unwrap_or(""),
                request: "",
                cluster: caller.cluster.as_deref().unwrap_or(""),
            }),
            Requester::Broker(g) => audit_issued(&AuditRecord {
                serial_hex: &issued.serial_hex,
                identity: &want,
                caller: &g.broker.to_string(),
                not_after: issued.not_after,
                key_type: &key_type,
                auth: "broker",
                pod: &g.pod,
                node: &g.node,
                request: "",
                cluster: "",
            }),
            Requester::Vouched(v) => audit_issued(&AuditRecord {
                serial_hex: &issued.serial_hex,
                identity: &want,
                caller: v.caller,
                not_after: issued.not_after,
                key_type: &key_type,
                auth: v.auth,
                pod: v.pod,
                node: v.node,
                request: v.request,
                cluster: "",
            }),
        };
        if !written {
            return Err(IssueError::Unaudited);
        }
        Ok(Certified {
            identity,
            via_node,
            signer,
            issued,
        })
    }

    /// The JWT-SVID steps after authentication: the caller's own identity only, the
    /// audiences, the deny checks and the JWS, then the audit line (no audit, no token).
    pub fn issue_jwt(&self, req: JwtRequest<'_>) -> Result<JwtIssued, JwtIssueError> {
        let caller = req.caller;
        self.sign_jwt_for(
            &caller.identity,
            req.spiffe_id,
            req.audience,
            &caller.method.to_string(),
            caller.pod_name.as_deref().unwrap_or(""),
            caller.cluster.as_deref().unwrap_or(""),
        )
    }

    /// A JWT-SVID for the pod a broker was granted (`NodeAuthorizer::authorize_broker`):
    /// the same steps as [`IssuePath::issue_jwt`] with the pod's identity in place of the
    /// caller's; a `spiffe_id` naming anyone else is [`IssueError::OtherIdentity`].
    pub fn issue_jwt_brokered(
        &self,
        grant: &BrokerGrant,
        spiffe_id: Option<&str>,
        audience: &[String],
    ) -> Result<JwtIssued, JwtIssueError> {
        self.sign_jwt_for(
            &grant.identity,
            spiffe_id,
            audience,
            "broker",
            &grant.pod,
            "",
        )
    }

    /// The JWT-SVID steps for `identity`: the identity asked for must be it, the audiences,
    /// the deny checks and the JWS, then the audit line (no audit, no token).
    fn sign_jwt_for(
        &self,
        identity: &SpiffeId,
        spiffe_id: Option<&str>,
        audience: &[String],
        auth: &str,
        pod: &str,
        cluster: &str,
    ) -> Result<JwtIssued, JwtIssueError> {
        let identity = identity.clone();
        let want = identity.to_string();
        if let Some(asked) = spiffe_id.filter(|s| !s.is_empty() && *s != want) {
            return Err(IssueError::OtherIdentity {
                asked: crate::audit::shown(asked).to_string(),
                identity: want,
            }
            .into());
        }
        check_audience(audience)?;
        let svid =
            sign_jwt_svid(&self.ca, &identity, audience, self.clock.now()).map_err(
                |e| match e {
                    JwtFailure::Refused(f) => JwtIssueError::Issue(IssueError::Ca(f)),
                    JwtFailure::NoKey => JwtIssueError::NoKey,
                    JwtFailure::Sign(k) => JwtIssueError::Sign(k),
                },
            )?;
        let written = audit_jwt_issued(&JwtAudit {
            identity: &want,
            kid: &svid.kid,
            audience,
            expires_at: svid.expires_at,
            auth,
            pod,
            cluster,
        });
        if !written {
            return Err(IssueError::Unaudited.into());
        }
        Ok(JwtIssued { identity, svid })
    }

    /// Step 2: the identity the certificate will carry, and the impersonation that granted
    /// it when it is not the caller's own.
    fn authorize(
        &self,
        requester: &Requester<'_>,
    ) -> Result<(SpiffeId, Option<Impersonation>), IssueError> {
        match requester {
            Requester::Vouched(v) => Ok((v.identity.clone(), None)),
            Requester::Broker(g) => Ok((
                g.identity.clone(),
                Some(Impersonation {
                    identity: g.identity.clone(),
                    node: g.node.clone(),
                    node_account: g.broker.to_string(),
                }),
            )),
            Requester::Workload {
                caller,
                asks_for: Some(other),
            } if *other != caller.identity.to_string() => {
                let granted = self.impersonate(caller, other)?;
                Ok((granted.identity.clone(), Some(granted)))
            }
            Requester::Workload { caller, .. } => Ok((caller.identity.clone(), None)),
        }
    }

    /// Judges a request for another identity. A refusal is logged with its check, and
    /// answered with [`IMPERSONATION_REFUSED`] only.
    fn impersonate(&self, caller: &Caller, requested: &str) -> Result<Impersonation, IssueError> {
        let shown = crate::audit::shown(requested);
        let result = match &self.node_auth {
            Some(a) => a.authorize(caller, requested),
            None => Err(NodeAuthError::Denied(super::node::Denied {
                reason: Refusal::Disabled,
                detail: "no --trusted-node-accounts are configured".into(),
            })),
        };
        match result {
            Ok(granted) => Ok(granted),
            Err(NodeAuthError::Stale { broken_for, max }) => {
                tracing::warn!(caller = %caller.identity, requested = %shown, broken_for_secs = broken_for.as_secs(), "impersonation refused: the pod watch has been broken for longer than --pod-index-max-staleness");
                Err(IssueError::PodIndexStale { broken_for, max })
            }
            Err(NodeAuthError::NotSynced) => {
                tracing::warn!(caller = %caller.identity, requested = %shown, "impersonation cannot be judged yet: the pod index has not synced");
                Err(IssueError::PodIndexNotSynced)
            }
            Err(NodeAuthError::Denied(d)) => {
                tracing::warn!(
                    caller = %caller.identity,
                    auth = %caller.method,
                    pod = %crate::audit::shown(caller.pod_name.as_deref().unwrap_or("")),
                    requested = %shown,
                    check = d.reason.label(),
                    detail = %d.detail,
                    "refused impersonation"
                );
                Err(IssueError::ImpersonationRefused(d.reason))
            }
        }
    }
}

/// The DNS-form name of `identity` under `names`, when the CSR asked for exactly it. The name
/// is derived from the authorized identity's service account; a CSR naming anyone else (or an
/// identity that is no service account, or whose name would be too long for DNS) is refused
/// as asking for another identity.
fn dns_identity(
    identity: &SpiffeId,
    names: &LinkerdNames,
    asked: &str,
) -> Result<String, IssueError> {
    match identity
        .service_account()
        .and_then(|sa| names.identity_of(&sa))
    {
        Some(own) if own == asked => Ok(own),
        own => Err(IssueError::OtherIdentity {
            asked: crate::audit::shown(asked).to_string(),
            identity: own.unwrap_or_else(|| identity.to_string()),
        }),
    }
}
