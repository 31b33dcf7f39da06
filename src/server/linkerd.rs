//! Linkerd's identity protocol, `io.linkerd.proxy.identity.Identity/Certify`, on the CA port
//! (`--linkerd-identity-domain`), with Linkerd's semantics, so an unmodified linkerd2-proxy
//! gets its certificate from citadel:
//!
//! - the request carries the DNS-form identity it wants, a service-account token projected
//!   with audience `identity.l5d.io` (in the body, not a header) and a DER CSR;
//! - the CSR must have an ECDSA key and exactly one DNS SAN, equal to the requested identity,
//!   and no URI, IP or email SAN;
//! - the token is reviewed by the API server (TokenReview, its own chain on [`LinkerdPort`]),
//!   and the identity `<sa>.<ns>.serviceaccount.identity.<control-plane-ns>.<domain>` of the
//!   account it names must be the one requested;
//! - the answer is the DER leaf, the DER CA certificates between it and the trust anchors,
//!   and `valid_until`, the leaf's notAfter.
//!
//! Everything between decode and answer is the shared issue path
//! ([`crate::auth::issue_path`], [`CsrInput::Dns`]): the identity is denied, recorded and
//! audited exactly as for CreateCertificate, and the DNS SAN in the leaf is derived there from
//! the authenticated account, never copied from the CSR. [`LinkerdError::status`] is this
//! surface's ONE mapping to gRPC codes, Linkerd's: InvalidArgument for a missing field or a
//! bad CSR, FailedPrecondition for an identity mismatch or a token that does not
//! authenticate, Unavailable when no issuer can sign now, Internal otherwise.

use std::sync::Arc;

use linkerd2_proxy_api::identity::identity_server::{Identity, IdentityServer};
use linkerd2_proxy_api::identity::{CertifyRequest, CertifyResponse};
use tonic::{Code, Request, Response, Status};

use crate::auth::issue_path::{CsrInput, IssueError, IssueRequest, Requester, Ttl};
use crate::auth::Credentials;
use crate::ca::issue::IssueFailure;
use crate::pki::csr::{self, MAX_CSR_BYTES};

use super::instrument::Counter;
use super::port::{CaPort, Gated, LinkerdPort};

/// The audience Linkerd projects its proxies' tokens with, and the one their review asks for.
pub const AUDIENCE: &str = "identity.l5d.io";

/// The longest token read: projected tokens are 1-2 KiB (the header limit elsewhere is 16 KiB).
const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// Why a Certify failed: this surface's own refusals, and the shared path's.
#[derive(Debug, thiserror::Error)]
pub enum LinkerdError {
    /// Certify is not served (no `--linkerd-identity-domain`); the router does not add the
    /// service then, so this is only a guard.
    #[error("Linkerd identity is not enabled on this CA (--linkerd-identity-domain)")]
    Disabled,
    /// A required field is empty, Linkerd's words (InvalidArgument).
    #[error("missing {0}")]
    Missing(&'static str),
    /// The token is over [`MAX_TOKEN_BYTES`] or not text (InvalidArgument).
    #[error(
        "the token is not a service-account token (over {MAX_TOKEN_BYTES} bytes or not UTF-8)"
    )]
    BadToken,
    /// The CSR asks for another name than the request's `identity` (FailedPrecondition).
    #[error("CSR name does not match requested identity: csr={csr}; req={requested}")]
    CsrMismatch {
        /// The CSR's DNS SAN, quoted and bounded (caller text).
        csr: String,
        /// The request's `identity`, quoted and bounded.
        requested: String,
    },
    /// `--max-inflight` requests are in progress (Unavailable: the proxy retries).
    #[error("the CA is at its limit of requests in progress (--max-inflight); retry shortly")]
    Busy,
    /// The peer failed authentication too often (Unavailable: the proxy backs off).
    #[error("too many failed authentications from this address; retry in {0:.0}s (--auth-failure-burst)")]
    Throttled(f64),
    /// The shared issue path refused.
    #[error(transparent)]
    Issue(#[from] IssueError),
}

impl LinkerdError {
    /// Linkerd's codes. The only place this surface builds a `tonic::Status`.
    pub fn status(&self) -> Status {
        let (code, message) = match self {
            LinkerdError::Disabled => (Code::Unimplemented, self.to_string()),
            LinkerdError::Missing(_) | LinkerdError::BadToken => {
                (Code::InvalidArgument, self.to_string())
            }
            LinkerdError::CsrMismatch { .. } => (Code::FailedPrecondition, self.to_string()),
            LinkerdError::Busy | LinkerdError::Throttled(_) => {
                (Code::Unavailable, self.to_string())
            }
            LinkerdError::Issue(e) => match e {
                IssueError::Ttl(_) | IssueError::Csr(_) => (Code::InvalidArgument, e.to_string()),
                // Linkerd answers a token the API server does not authenticate, and an
                // identity the token does not name, with FailedPrecondition; a denied
                // identity is refused the same way (retrying cannot help).
                IssueError::Unauthenticated(_)
                | IssueError::OtherIdentity { .. }
                | IssueError::ImpersonationRefused(_)
                | IssueError::Ca(IssueFailure::Denied { .. }) => {
                    (Code::FailedPrecondition, e.to_string())
                }
                IssueError::AuthUnavailable(_)
                | IssueError::PodIndexStale { .. }
                | IssueError::PodIndexNotSynced
                | IssueError::Ca(
                    IssueFailure::NoSigner | IssueFailure::Expired(_) | IssueFailure::Index,
                )
                | IssueError::Unaudited => {
                    (Code::Unavailable, format!("cert issuer not ready: {e}"))
                }
                // An HSM that is away or busy: the proxy retries Unavailable.
                e if e.key_unavailable() => (
                    Code::Unavailable,
                    "cert issuer not ready: the CA signing key is unavailable".into(),
                ),
                // The cause is logged, not sent.
                IssueError::Ca(IssueFailure::Sign(_)) | IssueError::TooShort { .. } => {
                    (Code::Internal, "signing failed".into())
                }
            },
        };
        Status::new(code, message)
    }
}

/// Certify answers by gRPC code, for `citadel_linkerd_certify_total{code}`.
#[derive(Default)]
pub struct LinkerdStats {
    by_code: [Counter; CODES.len()],
}

/// The codes Certify answers with (OK first).
const CODES: [Code; 7] = [
    Code::Ok,
    Code::InvalidArgument,
    Code::FailedPrecondition,
    Code::Unavailable,
    Code::Internal,
    Code::Unimplemented,
    Code::Unknown,
];

impl LinkerdStats {
    fn count(&self, code: Code) {
        let i = CODES
            .iter()
            .position(|c| *c == code)
            .unwrap_or(CODES.len() - 1);
        self.by_code[i].inc();
    }

    /// The exposition text, registered as a `Metrics` source when Certify is on.
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write;
        let name = "citadel_linkerd_certify_total";
        let _ = writeln!(
            out,
            "# HELP {name} Linkerd Certify calls answered, by gRPC code.\n# TYPE {name} counter"
        );
        for (code, c) in CODES.iter().zip(&self.by_code) {
            let _ = writeln!(out, "{name}{{code=\"{code:?}\"}} {}", c.get());
        }
    }
}

/// The Certify service, over the CA port's shared parts.
pub struct LinkerdService {
    /// The issue path, limits and counters of the CA port, and Linkerd's own part.
    pub port: Arc<CaPort>,
    /// Its answers by code.
    pub stats: Arc<LinkerdStats>,
}

/// The service as the router adds it (see [`super::router`]), or `None` when
/// `--linkerd-identity-domain` is not set. Registers its counters with the port's metrics.
pub fn service(port: &Arc<CaPort>) -> Option<IdentityServer<LinkerdService>> {
    port.linkerd.as_ref()?;
    let stats = Arc::new(LinkerdStats::default());
    let shown = stats.clone();
    port.metrics
        .sources
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(Box::new(move |out| shown.render(out)));
    Some(
        IdentityServer::new(LinkerdService {
            port: port.clone(),
            stats,
        })
        .max_decoding_message_size(super::MAX_MESSAGE_BYTES),
    )
}

impl LinkerdService {
    /// Decodes and checks the request (Linkerd's order: fields, CSR, then the token), then
    /// hands it to the issue path.
    async fn handle(
        &self,
        linkerd: &LinkerdPort,
        req: &Request<CertifyRequest>,
    ) -> Result<CertifyResponse, LinkerdError> {
        let msg = req.get_ref();
        if msg.identity.is_empty() {
            return Err(LinkerdError::Missing("identity"));
        }
        if msg.token.is_empty() {
            return Err(LinkerdError::Missing("token"));
        }
        if msg.certificate_signing_request.is_empty() {
            return Err(LinkerdError::Missing("certificate signing request"));
        }
        if msg.certificate_signing_request.len() > MAX_CSR_BYTES {
            return Err(IssueError::Csr(csr::CsrError::TooLarge {
                len: msg.certificate_signing_request.len(),
            })
            .into());
        }
        let token = std::str::from_utf8(&msg.token)
            .ok()
            .filter(|t| t.len() <= MAX_TOKEN_BYTES)
            .ok_or(LinkerdError::BadToken)?;
        // The CSR is read before the token costs a review: a malformed or misnamed one is
        // refused for free, as Linkerd's identity service does.
        let parsed = csr::parse_der(&msg.certificate_signing_request).map_err(IssueError::Csr)?;
        let asked = csr::single_dns_name(&parsed).map_err(IssueError::Csr)?;
        if asked != msg.identity {
            return Err(LinkerdError::CsrMismatch {
                csr: crate::audit::shown(asked).to_string(),
                requested: crate::audit::shown(&msg.identity).to_string(),
            });
        }
        let creds = Credentials {
            bearer: Some(token),
            ..Default::default()
        };
        let caller = match linkerd.auth.verified(creds) {
            // A token reviewed moments ago costs nothing: served even from a throttled peer.
            Some(caller) => caller,
            None => self
                .port
                .authenticate_throttled(&linkerd.auth, req.remote_addr().map(|a| a.ip()), creds)
                .await
                .map_err(|g| match g {
                    Gated::Throttled(secs) => LinkerdError::Throttled(secs),
                    Gated::Failed(e) => LinkerdError::Issue(e),
                })?,
        };
        let done = self.port.issue.issue(IssueRequest {
            requester: Requester::Workload {
                caller: &caller,
                asks_for: None,
            },
            csr: CsrInput::Dns {
                csr: &parsed,
                names: &linkerd.names,
                spiffe_san: linkerd.spiffe_san,
            },
            // Linkerd's proxies ask for no lifetime: the CA's default (Linkerd's is 24 h).
            ttl: Ttl::Requested(0),
            min_lifetime: None,
        })?;
        let signer = &done.signer;
        let intermediate_certificates = signer
            .alternates_der()
            .iter()
            .chain(signer.intermediates_der())
            .map(|c| c.to_vec())
            .collect();
        Ok(CertifyResponse {
            leaf_certificate: done.issued.der.to_vec(),
            intermediate_certificates,
            // The certificate's notAfter, which has whole seconds.
            valid_until: Some(prost_types::Timestamp {
                seconds: done.issued.not_after.unix_timestamp(),
                nanos: 0,
            }),
        })
    }
}

#[tonic::async_trait]
impl Identity for LinkerdService {
    async fn certify(
        &self,
        request: Request<CertifyRequest>,
    ) -> Result<Response<CertifyResponse>, Status> {
        let result = match (
            self.port.linkerd.as_ref(),
            self.port.inflight.clone().try_acquire_owned(),
        ) {
            (None, _) => Err(LinkerdError::Disabled),
            (Some(l), Ok(_permit)) => self.handle(l, &request).await,
            (Some(_), Err(_)) => Err(LinkerdError::Busy),
        };
        match result {
            Ok(r) => {
                self.stats.count(Code::Ok);
                Ok(Response::new(r))
            }
            Err(e) => {
                let status = e.status();
                self.stats.count(status.code());
                match &e {
                    LinkerdError::Issue(IssueError::Ca(IssueFailure::Sign(inner))) => {
                        tracing::error!(error = %inner, "Linkerd certificate signing failed")
                    }
                    LinkerdError::Throttled(_) => {
                        tracing::debug!(error = %e, "refused a Linkerd CSR unread")
                    }
                    _ => {
                        tracing::info!(code = ?status.code(), error = %e, "refused a Linkerd CSR")
                    }
                }
                Err(status)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::node::Refusal;
    use crate::pki::csr::CsrError;

    /// Every refusal keeps Linkerd's code (tests/it/linkerd.rs checks them end to end through
    /// the real API server; this pins the one mapping itself, variant by variant).
    #[test]
    fn each_refusal_has_linkerds_code() {
        let t = time::macros::datetime!(2030-01-01 00:00 UTC);
        let cases: Vec<(LinkerdError, Code, &str)> = vec![
            (
                LinkerdError::Missing("identity"),
                Code::InvalidArgument,
                "missing identity",
            ),
            (
                LinkerdError::Missing("token"),
                Code::InvalidArgument,
                "missing token",
            ),
            (
                LinkerdError::BadToken,
                Code::InvalidArgument,
                "the token is not",
            ),
            (
                LinkerdError::CsrMismatch {
                    csr: "\"a\"".into(),
                    requested: "\"b\"".into(),
                },
                Code::FailedPrecondition,
                "CSR name does not match requested identity: csr=\"a\"; req=\"b\"",
            ),
            (
                LinkerdError::Busy,
                Code::Unavailable,
                "the CA is at its limit",
            ),
            (
                LinkerdError::Issue(IssueError::Ca(IssueFailure::Sign(
                    crate::ca::SignError::Key(crate::pki::KeyError::Unavailable(
                        "token removed".into(),
                    )),
                ))),
                Code::Unavailable,
                "cert issuer not ready: the CA signing key is unavailable",
            ),
            (
                LinkerdError::Throttled(2.0),
                Code::Unavailable,
                "too many failed authentications",
            ),
            (
                LinkerdError::Disabled,
                Code::Unimplemented,
                "Linkerd identity is not enabled",
            ),
            (
                IssueError::Unauthenticated("no".into()).into(),
                Code::FailedPrecondition,
                "no",
            ),
            (
                IssueError::AuthUnavailable("later".into()).into(),
                Code::Unavailable,
                "cert issuer not ready: later",
            ),
            (
                IssueError::Csr(CsrError::Empty).into(),
                Code::InvalidArgument,
                "invalid CSR: ",
            ),
            (
                IssueError::Csr(CsrError::NotOneDnsName("1 URI".into())).into(),
                Code::InvalidArgument,
                "invalid CSR: CSR must carry exactly one DNS name",
            ),
            (
                IssueError::OtherIdentity {
                    asked: "\"x\"".into(),
                    identity: "y".into(),
                }
                .into(),
                Code::FailedPrecondition,
                "CSR asks for \"x\", but the caller is y",
            ),
            (
                IssueError::ImpersonationRefused(Refusal::Disabled).into(),
                Code::FailedPrecondition,
                "",
            ),
            (
                IssueError::Ca(IssueFailure::Denied {
                    identity: "spiffe://td/x".into(),
                    after_signing: false,
                })
                .into(),
                Code::FailedPrecondition,
                "spiffe://td/x has been revoked by an operator",
            ),
            (
                IssueError::Ca(IssueFailure::NoSigner).into(),
                Code::Unavailable,
                "cert issuer not ready: no signing CA",
            ),
            (
                IssueError::Ca(IssueFailure::Expired(t)).into(),
                Code::Unavailable,
                "cert issuer not ready: the signing CA expired",
            ),
            (
                IssueError::Ca(IssueFailure::Index).into(),
                Code::Unavailable,
                "cert issuer not ready",
            ),
            (
                IssueError::Unaudited.into(),
                Code::Unavailable,
                "cert issuer not ready",
            ),
            (
                IssueError::Ca(IssueFailure::Sign(crate::ca::SignError::Expired(t))).into(),
                Code::Internal,
                "signing failed",
            ),
        ];
        for (e, code, text) in cases {
            let s = e.status();
            assert_eq!(s.code(), code, "{e:?}");
            assert!(
                s.message().starts_with(text),
                "{e:?}: {:?} does not start with {text:?}",
                s.message()
            );
        }
    }

    #[test]
    fn the_counters_render_by_code() {
        let s = LinkerdStats::default();
        s.count(Code::Ok);
        s.count(Code::FailedPrecondition);
        s.count(Code::FailedPrecondition);
        let mut out = String::new();
        s.render(&mut out);
        assert!(
            out.contains("citadel_linkerd_certify_total{code=\"Ok\"} 1\n"),
            "{out}"
        );
        assert!(
            out.contains("citadel_linkerd_certify_total{code=\"FailedPrecondition\"} 2\n"),
            "{out}"
        );
    }
}
