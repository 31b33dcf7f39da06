//! The SPIFFE Broker API on the CA port, `spiffe.broker.API` (proto/spiffe/broker.proto,
//! served when `--broker-ids` lists a broker): a node-local broker gets the X.509-SVID, the
//! bundles and JWT-SVIDs of ONE pod on its node per call. docs/spiffe.md, "Broker API", has
//! the design; `auth::broker` the rules.
//!
//! Every call, in this order (the order decides which error a request with several faults
//! gets):
//!
//! 1. exactly one `broker.spiffe.io: true` metadata value, else InvalidArgument (the
//!    specification's SSRF guard; clients do not retry);
//! 2. a TLS client certificate (the broker's X.509-SVID), verified by the CA port's client-
//!    certificate authenticator, else Unauthenticated; a certificate that verifies but is
//!    not in `--broker-ids` is PermissionDenied;
//! 3. the workload reference ([`decode_reference`]): a `KubernetesObjectReference` to a pod
//!    (`pods`/`core`, namespace and name, optionally UID); anything else is InvalidArgument,
//!    a `WorkloadPIDReference` included: a PID names a process on the broker's host, which
//!    the CA cannot see (the agent's broker socket is where PIDs belong);
//! 4. the broker's pod-bound token (`authorization: Bearer`), authenticated like any token
//!    on this port (under the per-peer throttle), else Unauthenticated;
//! 5. `NodeAuthorizer::authorize_broker`: the token names the certificate's identity, its
//!    pod ties it to a node, and the referenced pod is an identified pod on that node.
//!    Unavailable while the pod index is not synced or stale; NotFound (one message for
//!    absent, elsewhere, UID mismatch: the specification's code for a workload that could
//!    not be identified) or PermissionDenied (the broker's own checks; a pod with no
//!    identity).
//!
//! Then the one issue path: `IssuePath::issue` with `Requester::Broker` (a P-256 key
//! generated here for the workload, since the API returns key and SVID; the key is never
//! logged) or `IssuePath::issue_jwt_brokered`. Streams send the full state in every message:
//! at once, then whenever the SVID is renewed (at half its life, on the injected clock) or
//! the CA's signer (and so possibly the bundle) changes; they re-check the grant every
//! [`RECHECK`] and end with the refusal when it no longer holds (the pod left the node).
//! [`BrokerError::status`] is this surface's ONE mapping to gRPC codes.

use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataMap;
use tonic::{Code, Request, Response, Status};

use super::port::{bearer, issue_code, BrokerPort, CaPort, CallerError};
use crate::auth::broker::{BrokerAuthError, BrokerGrant, BrokerRefusal, PodRef};
use crate::auth::issue_path::{CsrInput, IssueError, IssueRequest, JwtIssueError, Requester, Ttl};
use crate::auth::{AuthMethod, Caller};
use crate::broker_proto::api_server::{Api, ApiServer};
use crate::broker_proto::{
    FetchJwtsvidRequest, FetchJwtsvidResponse, Jwtsvid, KubernetesObjectReference,
    SubscribeToJwtBundlesRequest, SubscribeToJwtBundlesResponse, SubscribeToX509BundlesRequest,
    SubscribeToX509BundlesResponse, SubscribeToX509svidRequest, SubscribeToX509svidResponse,
    WorkloadPidReference, WorkloadReference, X509svid,
};
use crate::pki::cakey::KeyError;

/// The metadata key every call must carry, with the value `true`.
pub const HEADER: &str = "broker.spiffe.io";

/// The type URL of a PID reference, as go-spiffe's `anypb.New` writes it.
pub const PID_REFERENCE: &str = "type.googleapis.com/spiffe.broker.WorkloadPIDReference";
/// The type URL of a Kubernetes object reference.
pub const KUBERNETES_REFERENCE: &str =
    "type.googleapis.com/spiffe.broker.KubernetesObjectReference";

/// How often an open stream re-checks its grant and the clock.
pub const RECHECK: Duration = Duration::from_secs(5);

/// The longest namespace, name or UID a reference may carry (a DNS subdomain is 253).
const MAX_NAME: usize = 253;

/// Why a Broker API call failed.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// No (or not exactly one) `broker.spiffe.io: true`.
    #[error("the request must carry the metadata \"broker.spiffe.io: true\" exactly once (SPIFFE Broker Endpoint, SSRF guard)")]
    Header,
    /// No TLS client certificate.
    #[error("the Broker API requires mutual TLS: present the broker's X509-SVID as the client certificate")]
    NoClientCert,
    /// A listed broker sent no token to tie it to its node.
    #[error("the broker must also send its pod-bound service-account token (authorization: Bearer) so the CA can tell which node it runs on")]
    NoToken,
    /// The workload reference is missing, malformed or of a kind this port does not serve.
    #[error("{0}")]
    Reference(String),
    /// `--max-inflight` calls are already in progress.
    #[error("the CA is at its limit of requests in progress (--max-inflight); retry shortly")]
    Busy,
    /// Too many streams are open.
    #[error("too many Broker API streams are open on this server; retry shortly")]
    TooManyStreams,
    /// The peer address failed authentication too often.
    #[error("too many failed authentications from this address; retry in {0:.0}s (--auth-failure-burst)")]
    Throttled(f64),
    /// The broker or the reference was refused, or cannot be judged now.
    #[error(transparent)]
    Auth(#[from] BrokerAuthError),
    /// The shared issue path refused (authentication included).
    #[error(transparent)]
    Issue(#[from] JwtIssueError),
    /// No JWT bundle is installed yet (or the CA keeps none: a plugged-in CA).
    #[error("the JWT bundle is not available yet")]
    NoJwtBundle,
    /// The workload's key could not be generated.
    #[error("could not generate the workload's key")]
    KeyGeneration,
}

impl From<IssueError> for BrokerError {
    fn from(e: IssueError) -> Self {
        BrokerError::Issue(JwtIssueError::Issue(e))
    }
}

impl From<CallerError> for BrokerError {
    fn from(e: CallerError) -> Self {
        match e {
            CallerError::Throttled(t) => BrokerError::Throttled(t),
            CallerError::Issue(e) => e.into(),
        }
    }
}

impl BrokerError {
    /// The Broker Endpoint's codes: InvalidArgument (header, reference; no retry),
    /// Unauthenticated (no client certificate or token, a bad one), PermissionDenied (not an
    /// authorized broker; a workload without identity; a denied identity), NotFound (the
    /// workload is not identified on the broker's node), Unavailable (initialising: no
    /// signer, no JWT key, pod index not synced or stale; retry), ResourceExhausted,
    /// Internal. The only place this surface builds a `tonic::Status`.
    pub fn status(&self) -> Status {
        let not_ready = |e: &dyn std::fmt::Display| format!("CA is not ready: {e}");
        let (code, message) = match self {
            BrokerError::Header | BrokerError::Reference(_) => {
                (Code::InvalidArgument, self.to_string())
            }
            BrokerError::NoClientCert | BrokerError::NoToken => {
                (Code::Unauthenticated, self.to_string())
            }
            BrokerError::Busy | BrokerError::TooManyStreams | BrokerError::Throttled(_) => {
                (Code::ResourceExhausted, self.to_string())
            }
            BrokerError::NoJwtBundle => (Code::Unavailable, not_ready(self)),
            BrokerError::KeyGeneration => (Code::Internal, self.to_string()),
            BrokerError::Auth(a) => match a {
                BrokerAuthError::NotSynced | BrokerAuthError::Stale { .. } => {
                    (Code::Unavailable, a.to_string())
                }
                BrokerAuthError::Denied(d) if d.reason.workload_not_found() => {
                    (Code::NotFound, a.to_string())
                }
                BrokerAuthError::Denied(_) => (Code::PermissionDenied, a.to_string()),
            },
            BrokerError::Issue(e) => match e {
                JwtIssueError::Audience(_) => (Code::InvalidArgument, e.to_string()),
                JwtIssueError::NoKey | JwtIssueError::Sign(KeyError::Unavailable(_)) => {
                    (Code::Unavailable, not_ready(e))
                }
                // The cause is logged, not sent.
                JwtIssueError::Sign(KeyError::Failed(_)) => {
                    (Code::Internal, "signing failed".into())
                }
                JwtIssueError::Issue(i) => issue_code(i),
            },
        };
        Status::new(code, message)
    }

    /// The check behind a refusal, for the log.
    fn check(&self) -> &'static str {
        match self {
            BrokerError::Auth(BrokerAuthError::Denied(d)) => d.reason.label(),
            _ => "",
        }
    }
}

/// A decoded workload reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reference {
    /// A pod by namespace and name (and maybe UID).
    Pod(PodRef),
    /// A process on the broker's host.
    Pid(i32),
}

/// The message name an Any's type URL carries (after its last `/`, as protobuf defines).
fn type_name(url: &str) -> &str {
    url.rsplit_once('/').map_or(url, |(_, name)| name)
}

/// Decodes a request's workload reference, refusing what this port cannot resolve.
pub fn decode_reference(r: Option<&WorkloadReference>) -> Result<Reference, String> {
    let any = r
        .and_then(|r| r.reference.as_ref())
        .ok_or("the request carries no workload reference (reference.reference)")?;
    match type_name(&any.type_url) {
        "spiffe.broker.WorkloadPIDReference" => {
            let pid = <WorkloadPidReference as prost::Message>::decode(any.value.as_slice())
                .map_err(|e| format!("the WorkloadPIDReference does not decode: {e}"))?
                .pid;
            if pid <= 0 {
                return Err(format!("the PID must be a positive integer, not {pid}"));
            }
            Ok(Reference::Pid(pid))
        }
        "spiffe.broker.KubernetesObjectReference" => {
            let r = <KubernetesObjectReference as prost::Message>::decode(any.value.as_slice())
                .map_err(|e| format!("the KubernetesObjectReference does not decode: {e}"))?;
            pod_reference(r).map(Reference::Pod)
        }
        other => Err(format!(
            "unsupported workload reference type {} (citadel resolves {KUBERNETES_REFERENCE} to pods)",
            crate::audit::shown(other)
        )),
    }
}

fn pod_reference(r: KubernetesObjectReference) -> Result<PodRef, String> {
    let t = r
        .r#type
        .ok_or("the KubernetesObjectReference has no type (plural, group)")?;
    if t.plural != "pods" || t.group != "core" {
        return Err(format!(
            "citadel resolves only pods (type plural \"pods\", group \"core\"), not {}/{}",
            crate::audit::shown(&t.plural),
            crate::audit::shown(&t.group)
        ));
    }
    let uid = Some(r.uid).filter(|u| !u.is_empty());
    let Some(key) = r.key else {
        return Err(match uid {
            Some(_) => "citadel resolves pods by namespace and name: a reference by UID alone is not supported; set key (and keep uid to pin the pod)".into(),
            None => "the reference names no pod: set key.namespace and key.name".into(),
        });
    };
    if key.namespace.is_empty() || key.name.is_empty() {
        return Err("pods are namespaced: key.namespace and key.name are both required".into());
    }
    for (what, v) in [
        ("namespace", &key.namespace),
        ("name", &key.name),
        ("uid", uid.as_ref().unwrap_or(&String::new())),
    ] {
        if v.len() > MAX_NAME || v.chars().any(char::is_control) {
            return Err(format!(
                "key {what} must be at most {MAX_NAME} bytes without control characters"
            ));
        }
    }
    Ok(PodRef {
        namespace: key.namespace,
        name: key.name,
        uid,
    })
}

/// Exactly one `broker.spiffe.io` value, and it is `true` (case sensitive).
fn header_ok(metadata: &MetadataMap) -> bool {
    let mut values = metadata.get_all(HEADER).iter();
    matches!((values.next(), values.next()), (Some(v), None) if v.as_bytes() == b"true")
}

/// Who calls, and for which pod: what a stream re-judges.
#[derive(Clone)]
struct Call {
    cert: Caller,
    token: Caller,
    target: PodRef,
}

/// What the service shares with its streams.
struct Inner {
    port: Arc<CaPort>,
    /// The port's broker parts (present: [`service`] serves the API only then).
    broker: BrokerPort,
}

impl Inner {
    fn broker(&self) -> &BrokerPort {
        &self.broker
    }

    /// Steps 1-4 of the module doc: the broker, its token and the pod it names.
    async fn call<T>(
        &self,
        req: &Request<T>,
        reference: Option<&WorkloadReference>,
    ) -> Result<Call, BrokerError> {
        if !header_ok(req.metadata()) {
            return Err(BrokerError::Header);
        }
        let chain = req.peer_certs().ok_or(BrokerError::NoClientCert)?;
        let remote = req.remote_addr();
        let cert = self
            .port
            .caller(&MetadataMap::new(), remote, Some(chain.as_slice()))
            .await?;
        if cert.method != AuthMethod::ClientCert {
            return Err(BrokerError::NoClientCert);
        }
        if !self.broker().authz.is_broker(&cert.identity) {
            return Err(BrokerAuthError::Denied(crate::auth::broker::BrokerDenied {
                reason: BrokerRefusal::NotListed,
                detail: format!("{} is not in --broker-ids", cert.identity),
            })
            .into());
        }
        let target =
            match decode_reference(reference).map_err(BrokerError::Reference)? {
                Reference::Pod(p) => p,
                Reference::Pid(_) => return Err(BrokerError::Reference(
                    "a WorkloadPIDReference names a process on the broker's host, which the CA \
                     port cannot see: reference the pod (KubernetesObjectReference, pods/core) \
                     here, or use the agent's broker socket"
                        .into(),
                )),
            };
        if bearer(req.metadata())?.is_none() {
            return Err(BrokerError::NoToken);
        }
        let token = self.port.caller(req.metadata(), remote, None).await?;
        Ok(Call {
            cert,
            token,
            target,
        })
    }

    /// Step 5: the grant, judged now.
    fn grant(&self, call: &Call) -> Result<BrokerGrant, BrokerError> {
        Ok(self
            .broker()
            .authz
            .authorize_broker(&call.cert, &call.token, &call.target)?)
    }

    /// A fresh key and X.509-SVID for the granted pod: the full message, and when to renew.
    fn x509(
        &self,
        grant: &BrokerGrant,
    ) -> Result<(SubscribeToX509svidResponse, OffsetDateTime), BrokerError> {
        let key = crate::pki::KeyType::EcP256
            .generate()
            .map_err(|_| BrokerError::KeyGeneration)?;
        let csr = crate::pki::csr::build(&key, &grant.identity.to_string())
            .map_err(|_| BrokerError::KeyGeneration)?;
        let done = self.port.issue.issue(IssueRequest {
            requester: Requester::Broker(grant),
            csr: CsrInput::Pem(csr.as_bytes()),
            ttl: Ttl::Requested(0),
            min_lifetime: None,
        })?;
        let mut chain = done.issued.der.to_vec();
        for c in done.signer.intermediates_der() {
            chain.extend_from_slice(c);
        }
        let life = done.issued.not_after - done.issued.not_before;
        let renew_at = done.issued.not_before + life / 2;
        Ok((
            SubscribeToX509svidResponse {
                svids: vec![X509svid {
                    spiffe_id: done.identity.to_string(),
                    x509_svid: chain,
                    x509_svid_key: key.serialize_der(),
                    bundle: roots(&done.signer),
                    hint: String::new(),
                }],
                crl: Vec::new(),
                federated_bundles: Default::default(),
            },
            renew_at,
        ))
    }

    fn x509_bundles(
        &self,
        grant: &BrokerGrant,
    ) -> Result<SubscribeToX509BundlesResponse, BrokerError> {
        let signer = self
            .port
            .issue
            .ca
            .current()
            .ok_or(IssueError::Ca(crate::ca::issue::IssueFailure::NoSigner))?;
        Ok(SubscribeToX509BundlesResponse {
            crl: Vec::new(),
            bundles: [(td_key(grant), roots(&signer))].into(),
        })
    }

    fn jwt_bundles(
        &self,
        grant: &BrokerGrant,
    ) -> Result<(SubscribeToJwtBundlesResponse, u64), BrokerError> {
        let keys = self
            .port
            .issue
            .ca
            .jwt_current()
            .ok_or(BrokerError::NoJwtBundle)?;
        Ok((
            SubscribeToJwtBundlesResponse {
                bundles: [(td_key(grant), keys.jwks.clone().into_bytes())].into(),
            },
            keys.sequence,
        ))
    }

    /// Logs a refusal (never the request's key or token) and turns it into its status.
    fn refused(&self, what: &str, e: BrokerError) -> Status {
        let status = e.status();
        if let BrokerError::Issue(JwtIssueError::Issue(
            IssueError::Unauthenticated(_) | IssueError::AuthUnavailable(_),
        )) = &e
        {
            self.port.metrics.authentication_failure_count.inc();
        }
        match &e {
            BrokerError::Auth(BrokerAuthError::Denied(d)) => tracing::warn!(
                code = ?status.code(),
                check = d.reason.label(),
                detail = %d.detail,
                "refused Broker API {what}"
            ),
            BrokerError::Throttled(_) => {
                tracing::debug!(error = %e, "refused Broker API {what} unread")
            }
            _ => {
                tracing::info!(code = ?status.code(), check = e.check(), error = %e, "refused Broker API {what}")
            }
        }
        status
    }
}

/// The key of a bundle in the API's maps: the trust domain's SPIFFE ID.
fn td_key(grant: &BrokerGrant) -> String {
    format!("spiffe://{}", grant.identity.trust_domain().as_str())
}

/// The trust bundle: every root, DER, concatenated.
fn roots(signer: &crate::ca::Signer) -> Vec<u8> {
    signer
        .roots_der()
        .iter()
        .flat_map(|c| c.as_ref().to_vec())
        .collect()
}

/// The Broker API service, over the CA port's shared parts.
pub struct BrokerServer {
    inner: Arc<Inner>,
}

/// The service as the router adds it, when `--broker-ids` lists a broker.
pub fn service(port: &Arc<CaPort>) -> Option<ApiServer<BrokerServer>> {
    let b = port.broker.as_ref()?;
    let broker = BrokerPort {
        authz: b.authz.clone(),
        shutdown: b.shutdown.clone(),
        streams: b.streams.clone(),
    };
    Some(
        ApiServer::new(BrokerServer {
            inner: Arc::new(Inner {
                port: port.clone(),
                broker,
            }),
        })
        .max_decoding_message_size(super::MAX_MESSAGE_BYTES),
    )
}

/// What a stream computes each time it looks: a message to send (or nothing new).
type Next<M> = Box<dyn FnMut(&Inner, &BrokerGrant, bool) -> Result<Option<M>, BrokerError> + Send>;

impl BrokerServer {
    /// Authenticates and judges a call under the in-flight limit, then runs `first`.
    async fn unary<T, M>(
        &self,
        what: &str,
        req: &Request<T>,
        reference: Option<&WorkloadReference>,
        first: impl FnOnce(&Inner, &BrokerGrant) -> Result<M, BrokerError>,
    ) -> Result<(Call, M), Status> {
        let inner = &self.inner;
        let result = match inner.port.inflight.clone().try_acquire_owned() {
            Ok(_permit) => match inner.call(req, reference).await {
                Ok(call) => inner
                    .grant(&call)
                    .and_then(|g| first(inner, &g))
                    .map(|m| (call, m)),
                Err(e) => Err(e),
            },
            Err(_) => Err(BrokerError::Busy),
        };
        result.map_err(|e| inner.refused(what, e))
    }

    /// A stream: `first` at once, then whatever `next` says each time the signer changes or
    /// [`RECHECK`] passes, the grant re-judged before each look; a refusal ends the stream
    /// with its status, a retryable failure is retried at the next look.
    async fn stream<T, M>(
        &self,
        what: &'static str,
        req: &Request<T>,
        reference: Option<&WorkloadReference>,
        first: impl FnOnce(&Inner, &BrokerGrant) -> Result<M, BrokerError>,
        mut next: Next<M>,
    ) -> Result<Response<ReceiverStream<Result<M, Status>>>, Status>
    where
        M: Send + 'static,
    {
        let (call, first) = self.unary(what, req, reference, first).await?;
        let inner = self.inner.clone();
        let permit = inner
            .broker()
            .streams
            .clone()
            .try_acquire_owned()
            .map_err(|_| inner.refused(what, BrokerError::TooManyStreams))?;
        let (out, rx) = mpsc::channel(2);
        let shutdown = inner.broker().shutdown.clone();
        let mut signer = inner.port.issue.ca.subscribe();
        tokio::spawn(async move {
            let _permit = permit;
            if out.send(Ok(first)).await.is_err() {
                return;
            }
            loop {
                let changed = tokio::select! {
                    r = signer.changed() => { if r.is_err() { return } true }
                    _ = tokio::time::sleep(RECHECK) => false,
                    _ = out.closed() => return,
                    _ = shutdown.wait() => return,
                };
                signer.borrow_and_update();
                let result = inner.grant(&call).and_then(|g| next(&inner, &g, changed));
                match result {
                    Ok(Some(m)) => {
                        if out.send(Ok(m)).await.is_err() {
                            return;
                        }
                    }
                    Ok(None) => {}
                    Err(e) => {
                        let status = e.status();
                        if matches!(status.code(), Code::Unavailable | Code::ResourceExhausted) {
                            tracing::info!(error = %e, "Broker API {what} stream: retrying at the next look");
                            continue;
                        }
                        let _ = out.send(Err(inner.refused(what, e))).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

#[tonic::async_trait]
impl Api for BrokerServer {
    type SubscribeToX509SVIDStream = ReceiverStream<Result<SubscribeToX509svidResponse, Status>>;
    type SubscribeToX509BundlesStream =
        ReceiverStream<Result<SubscribeToX509BundlesResponse, Status>>;
    type SubscribeToJWTBundlesStream =
        ReceiverStream<Result<SubscribeToJwtBundlesResponse, Status>>;

    async fn subscribe_to_x509svid(
        &self,
        request: Request<SubscribeToX509svidRequest>,
    ) -> Result<Response<Self::SubscribeToX509SVIDStream>, Status> {
        let renew_at = Arc::new(std::sync::Mutex::new(None::<OffsetDateTime>));
        let first_at = renew_at.clone();
        let clock = self.inner.port.issue.clock.clone();
        self.stream(
            "X509-SVID",
            &request,
            request.get_ref().reference.as_ref(),
            move |inner, g| {
                let (m, at) = inner.x509(g)?;
                *first_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(at);
                Ok(m)
            },
            Box::new(move |inner, g, changed| {
                let mut at = renew_at.lock().unwrap_or_else(|p| p.into_inner());
                let due = at.is_none_or(|t| clock.now() >= t);
                if !changed && !due {
                    return Ok(None);
                }
                let (m, next_at) = inner.x509(g)?;
                *at = Some(next_at);
                Ok(Some(m))
            }),
        )
        .await
    }

    async fn subscribe_to_x509_bundles(
        &self,
        request: Request<SubscribeToX509BundlesRequest>,
    ) -> Result<Response<Self::SubscribeToX509BundlesStream>, Status> {
        let mut last: Option<SubscribeToX509BundlesResponse> = None;
        let last_first = Arc::new(std::sync::Mutex::new(None));
        let seed = last_first.clone();
        self.stream(
            "X.509 bundles",
            &request,
            request.get_ref().reference.as_ref(),
            move |inner, g| {
                let m = inner.x509_bundles(g)?;
                *seed.lock().unwrap_or_else(|p| p.into_inner()) = Some(m.clone());
                Ok(m)
            },
            Box::new(move |inner, g, _| {
                if last.is_none() {
                    last = last_first.lock().unwrap_or_else(|p| p.into_inner()).take();
                }
                let m = inner.x509_bundles(g)?;
                if last.as_ref() == Some(&m) {
                    return Ok(None);
                }
                last = Some(m.clone());
                Ok(Some(m))
            }),
        )
        .await
    }

    async fn fetch_jwtsvid(
        &self,
        request: Request<FetchJwtsvidRequest>,
    ) -> Result<Response<FetchJwtsvidResponse>, Status> {
        let msg = request.get_ref();
        let (_, m) = self
            .unary("JWT-SVID", &request, msg.reference.as_ref(), |inner, g| {
                let spiffe_id = Some(msg.spiffe_id.as_str()).filter(|s| !s.is_empty());
                let done = inner
                    .port
                    .issue
                    .issue_jwt_brokered(g, spiffe_id, &msg.audience)?;
                inner.port.metrics.jwt_svid_issued.inc();
                Ok(FetchJwtsvidResponse {
                    svids: vec![Jwtsvid {
                        spiffe_id: done.identity.to_string(),
                        svid: done.svid.token,
                        hint: String::new(),
                    }],
                })
            })
            .await?;
        Ok(Response::new(m))
    }

    async fn subscribe_to_jwt_bundles(
        &self,
        request: Request<SubscribeToJwtBundlesRequest>,
    ) -> Result<Response<Self::SubscribeToJWTBundlesStream>, Status> {
        let seq = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let first_seq = seq.clone();
        self.stream(
            "JWT bundles",
            &request,
            request.get_ref().reference.as_ref(),
            move |inner, g| {
                let (m, s) = inner.jwt_bundles(g)?;
                first_seq.store(s, std::sync::atomic::Ordering::Relaxed);
                Ok(m)
            },
            Box::new(move |inner, g, _| {
                let (m, s) = inner.jwt_bundles(g)?;
                if seq.swap(s, std::sync::atomic::Ordering::Relaxed) == s {
                    return Ok(None);
                }
                Ok(Some(m))
            }),
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::broker::BrokerDenied;
    use crate::broker_proto::{KubernetesObjectKey, KubernetesObjectType};
    use crate::ca::issue::IssueFailure;

    fn any<M: prost::Message>(url: &str, m: &M) -> Option<WorkloadReference> {
        Some(WorkloadReference {
            reference: Some(prost_types::Any {
                type_url: url.into(),
                value: m.encode_to_vec(),
            }),
        })
    }

    fn pod(
        plural: &str,
        group: &str,
        ns: &str,
        name: &str,
        uid: &str,
    ) -> KubernetesObjectReference {
        KubernetesObjectReference {
            r#type: Some(KubernetesObjectType {
                plural: plural.into(),
                group: group.into(),
            }),
            key: Some(KubernetesObjectKey {
                namespace: ns.into(),
                name: name.into(),
            }),
            uid: uid.into(),
        }
    }

    #[test]
    fn references_decode_to_pods_and_pids_and_nothing_else() {
        let p = decode_reference(
            any(
                KUBERNETES_REFERENCE,
                &pod("pods", "core", "shop", "cart-1", ""),
            )
            .as_ref(),
        )
        .unwrap();
        assert_eq!(
            p,
            Reference::Pod(PodRef {
                namespace: "shop".into(),
                name: "cart-1".into(),
                uid: None
            })
        );
        let p = decode_reference(
            any(
                KUBERNETES_REFERENCE,
                &pod("pods", "core", "shop", "cart-1", "u1"),
            )
            .as_ref(),
        )
        .unwrap();
        assert!(matches!(p, Reference::Pod(PodRef { uid: Some(u), .. }) if u == "u1"));
        // Any type URL prefix: protobuf reads the name after the last '/'.
        let p = decode_reference(
            any(
                "example.com/x/spiffe.broker.WorkloadPIDReference",
                &WorkloadPidReference { pid: 42 },
            )
            .as_ref(),
        )
        .unwrap();
        assert_eq!(p, Reference::Pid(42));

        let mut no_key = pod("pods", "core", "shop", "cart-1", "u1");
        no_key.key = None;
        let mut no_type = pod("pods", "core", "shop", "cart-1", "");
        no_type.r#type = None;
        let bad: Vec<(Option<WorkloadReference>, &str)> = vec![
            (None, "no workload reference"),
            (
                Some(WorkloadReference { reference: None }),
                "no workload reference",
            ),
            (
                any(PID_REFERENCE, &WorkloadPidReference { pid: 0 }),
                "positive",
            ),
            (
                any(PID_REFERENCE, &WorkloadPidReference { pid: -3 }),
                "positive",
            ),
            (
                any(
                    KUBERNETES_REFERENCE,
                    &pod("deployments", "apps", "shop", "cart", ""),
                ),
                "only pods",
            ),
            (
                any(KUBERNETES_REFERENCE, &pod("pods", "", "shop", "cart", "")),
                "only pods",
            ),
            (
                any(KUBERNETES_REFERENCE, &pod("pods", "core", "", "cart", "")),
                "namespaced",
            ),
            (
                any(KUBERNETES_REFERENCE, &pod("pods", "core", "shop", "", "")),
                "namespaced",
            ),
            (any(KUBERNETES_REFERENCE, &no_key), "UID alone"),
            (any(KUBERNETES_REFERENCE, &no_type), "no type"),
            (
                any(
                    KUBERNETES_REFERENCE,
                    &pod("pods", "core", "shop", &"x".repeat(300), ""),
                ),
                "at most",
            ),
            (
                any(
                    KUBERNETES_REFERENCE,
                    &pod("pods", "core", "shop\n", "c", ""),
                ),
                "control",
            ),
            (
                any(
                    "type.googleapis.com/vendor.Thing",
                    &WorkloadPidReference { pid: 1 },
                ),
                "unsupported",
            ),
            (
                Some(WorkloadReference {
                    reference: Some(prost_types::Any {
                        type_url: KUBERNETES_REFERENCE.into(),
                        value: vec![0xff, 0xff, 0xff],
                    }),
                }),
                "does not decode",
            ),
        ];
        for (r, want) in bad {
            let e = decode_reference(r.as_ref()).unwrap_err();
            assert!(e.contains(want), "{r:?}: {e}");
        }
    }

    #[test]
    fn the_header_must_be_exactly_one_true() {
        let mut m = MetadataMap::new();
        assert!(!header_ok(&m));
        m.insert(HEADER, "True".parse().unwrap());
        assert!(!header_ok(&m));
        m.insert(HEADER, "true".parse().unwrap());
        assert!(header_ok(&m));
        m.append(HEADER, "true".parse().unwrap());
        assert!(!header_ok(&m), "twice");
    }

    #[test]
    fn each_refusal_has_its_code() {
        let denied = |reason| {
            BrokerError::Auth(BrokerAuthError::Denied(BrokerDenied {
                reason,
                detail: "pod shop/pay-1 is on n2".into(),
            }))
        };
        let cases: Vec<(BrokerError, Code)> = vec![
            (BrokerError::Header, Code::InvalidArgument),
            (BrokerError::Reference("x".into()), Code::InvalidArgument),
            (BrokerError::NoClientCert, Code::Unauthenticated),
            (BrokerError::NoToken, Code::Unauthenticated),
            (BrokerError::Busy, Code::ResourceExhausted),
            (BrokerError::TooManyStreams, Code::ResourceExhausted),
            (BrokerError::Throttled(2.0), Code::ResourceExhausted),
            (BrokerError::NoJwtBundle, Code::Unavailable),
            (BrokerError::KeyGeneration, Code::Internal),
            (BrokerAuthError::NotSynced.into(), Code::Unavailable),
            (
                BrokerAuthError::Stale {
                    broken_for: Duration::from_secs(90),
                    max: Duration::from_secs(60),
                }
                .into(),
                Code::Unavailable,
            ),
            (denied(BrokerRefusal::NotListed), Code::PermissionDenied),
            (denied(BrokerRefusal::TokenMismatch), Code::PermissionDenied),
            (denied(BrokerRefusal::NoNode), Code::PermissionDenied),
            (denied(BrokerRefusal::PodNoIdentity), Code::PermissionDenied),
            (denied(BrokerRefusal::PodNotFound), Code::NotFound),
            (denied(BrokerRefusal::PodUidMismatch), Code::NotFound),
            (denied(BrokerRefusal::PodNotOnNode), Code::NotFound),
            (
                IssueError::Unauthenticated("no".into()).into(),
                Code::Unauthenticated,
            ),
            (
                IssueError::AuthUnavailable("down".into()).into(),
                Code::Unavailable,
            ),
            (
                IssueError::Ca(IssueFailure::NoSigner).into(),
                Code::Unavailable,
            ),
            (
                IssueError::Ca(IssueFailure::Denied {
                    identity: "spiffe://td/x".into(),
                    after_signing: false,
                })
                .into(),
                Code::PermissionDenied,
            ),
            (
                JwtIssueError::Audience("none".into()).into(),
                Code::InvalidArgument,
            ),
            (JwtIssueError::NoKey.into(), Code::Unavailable),
            (
                JwtIssueError::Sign(KeyError::Failed("x".into())).into(),
                Code::Internal,
            ),
        ];
        for (e, code) in cases {
            let s = e.status();
            assert_eq!(s.code(), code, "{e:?}");
            // Which pod is where stays in the log.
            assert!(!s.message().contains("n2"), "{e:?}: {}", s.message());
        }
    }
}
