//! The SPIFFE Workload API (`/SpiffeWorkloadAPI/*`) on a Unix socket, for SPIFFE-aware
//! workloads (go-spiffe, py-spiffe, spiffe-helper) instead of Envoy.
//!
//! The agent holds one identity, its own, so every caller that reaches the socket receives
//! it: the socket's permissions (0600 by default, `--workload-api-socket-mode`) are the access
//! control, optionally narrowed to peer UIDs (`--workload-api-uid`; others get
//! PermissionDenied). The spec's rules:
//! - every call carries exactly one `workload.spiffe.io: true` metadata value, else
//!   InvalidArgument (clients do not retry it);
//! - Unavailable until the first SVID is held (clients retry with backoff);
//! - a stream's first message goes out at once; a new one, the full state, follows every
//!   change of credentials: renewal, root rotation (the bundle changes), a new CRL.
//!
//! Errors turn into `tonic::Status` in one place, [`WorkloadError::status`].

pub mod jwt;
pub mod x509;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::{mpsc, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::fetch::FetchError;
use super::jwt::{JwtBundleRx, JwtCa};
use super::{AgentStats, Credentials, CredentialsRx};
use crate::client::ClientError;
use crate::clock::SharedClock;
use crate::shutdown::Shutdown;
use crate::workload_proto::spiffe_workload_api_server::{
    SpiffeWorkloadApi, SpiffeWorkloadApiServer,
};
use crate::workload_proto::{
    JwtBundlesRequest, JwtBundlesResponse, Jwtsvid, JwtsvidRequest, JwtsvidResponse,
    ValidateJwtsvidRequest, ValidateJwtsvidResponse, X509BundlesRequest, X509BundlesResponse,
    X509svidRequest, X509svidResponse,
};

/// The metadata every Workload API call must carry, with the value `true`.
pub const HEADER: &str = "workload.spiffe.io";
/// Streams open at once over all connections; more are ResourceExhausted.
pub const MAX_STREAMS: usize = 64;
/// Bytes of HTTP/2 headers in one request.
pub const MAX_HEADER_LIST_BYTES: u32 = 16 * 1024;
/// Bytes in one decoded request (the largest is a JWT-SVID to validate).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// Audiences in one FetchJWTSVID, and bytes in one audience.
pub const MAX_AUDIENCES: usize = 16;
/// See [`MAX_AUDIENCES`].
pub const MAX_AUDIENCE_BYTES: usize = 256;

/// Why a Workload API call is refused. The only place this surface turns errors into
/// `tonic::Status` is [`WorkloadError::status`].
#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    /// The `workload.spiffe.io: true` metadata is missing, repeated or not `true`.
    #[error("the metadata {HEADER}: true is required (exactly once)")]
    MissingHeader,
    /// No SVID (or, for the JWT bundle, no bundle) yet; clients retry with backoff.
    #[error("{0} not available yet; retry")]
    NotReady(&'static str),
    /// The caller is not among the allowed peer UIDs, or asked for another identity.
    #[error("no identity for this caller{0}")]
    NoIdentity(&'static str),
    /// A required field is empty or a bound is exceeded.
    #[error("{0}")]
    InvalidArgument(String),
    /// ValidateJWTSVID's token did not validate.
    #[error("the JWT-SVID is not valid: {0}")]
    InvalidToken(#[from] jwt::ValidationError),
    /// [`MAX_STREAMS`] streams are open already.
    #[error(
        "too many Workload API streams are open (at most {MAX_STREAMS}); retry when one closes"
    )]
    TooManyStreams,
    /// The CA refused or could not be reached for a JWT-SVID.
    #[error("the CA did not sign a JWT-SVID: {0}")]
    Ca(#[from] FetchError),
    /// Our own credentials would not encode (a bug, never the caller's fault).
    #[error("internal error: {0}")]
    Internal(String),
}

impl WorkloadError {
    /// The spec's codes: InvalidArgument (do not retry), Unavailable (retry), PermissionDenied
    /// (no identity), ResourceExhausted, Internal. A CA refusal keeps the CA's PermissionDenied
    /// or InvalidArgument; anything else from the CA is Unavailable, so clients retry.
    pub fn status(&self) -> Status {
        use tonic::Code;
        let code = match self {
            WorkloadError::MissingHeader
            | WorkloadError::InvalidArgument(_)
            | WorkloadError::InvalidToken(_) => Code::InvalidArgument,
            WorkloadError::NotReady(_) => Code::Unavailable,
            WorkloadError::NoIdentity(_) => Code::PermissionDenied,
            WorkloadError::TooManyStreams => Code::ResourceExhausted,
            WorkloadError::Ca(FetchError::Client(ClientError::Rpc { code, .. }))
                if matches!(code, Code::PermissionDenied | Code::InvalidArgument) =>
            {
                *code
            }
            WorkloadError::Ca(_) => Code::Unavailable,
            WorkloadError::Internal(_) => Code::Internal,
        };
        Status::new(code, self.to_string())
    }
}

/// Checks the mandatory metadata: exactly one `workload.spiffe.io` value, equal to `true`.
fn check_header<T>(req: &Request<T>) -> Result<(), WorkloadError> {
    let mut values = req.metadata().get_all(HEADER).iter();
    match (values.next(), values.next()) {
        (Some(v), None) if v.as_bytes() == b"true" => Ok(()),
        _ => Err(WorkloadError::MissingHeader),
    }
}

/// What the Workload API serves from: the agent's credentials and JWT side.
pub struct WorkloadApi {
    creds: CredentialsRx,
    jwt_bundle: JwtBundleRx,
    ca: Arc<dyn JwtCa>,
    clock: SharedClock,
    stats: Arc<AgentStats>,
    uids: Option<Vec<u32>>,
    streams: Arc<Semaphore>,
    /// Set by [`serve`]: ends every stream at shutdown (a graceful stop waits for them).
    shutdown: Option<Shutdown>,
}

impl WorkloadApi {
    /// Serves `creds` and `jwt_bundle`; JWT-SVIDs come from `ca`; ValidateJWTSVID reads
    /// `clock`. `uids`, when set, are the only peer UIDs that get an identity.
    pub fn new(
        creds: CredentialsRx,
        jwt_bundle: JwtBundleRx,
        ca: Arc<dyn JwtCa>,
        clock: SharedClock,
        stats: Arc<AgentStats>,
        uids: Option<Vec<u32>>,
    ) -> Self {
        Self {
            creds,
            jwt_bundle,
            ca,
            clock,
            stats,
            uids,
            streams: Arc::new(Semaphore::new(MAX_STREAMS)),
            shutdown: None,
        }
    }

    /// The header, then the caller: both checked before anything is answered.
    fn admit<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let checked = check_header(req).and_then(|()| match &self.uids {
            None => Ok(()),
            Some(allowed) => {
                let uid = req
                    .extensions()
                    .get::<tonic::transport::server::UdsConnectInfo>()
                    .and_then(|i| i.peer_cred)
                    .map(|c| c.uid());
                match uid {
                    Some(u) if allowed.contains(&u) => Ok(()),
                    _ => Err(WorkloadError::NoIdentity(" (its UID is not allowed)")),
                }
            }
        });
        checked.map_err(|e| self.refused(e))
    }

    fn refused(&self, e: WorkloadError) -> Status {
        self.stats.workload_refused.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(error = %e, "refused a Workload API call");
        e.status()
    }

    fn current(&self) -> Result<Arc<Credentials>, Status> {
        self.creds
            .borrow()
            .clone()
            .ok_or_else(|| WorkloadError::NotReady("no X.509-SVID").status())
    }

    /// A stream that sends `make(current)` at once and again on every change of `watched`
    /// (the credentials or the JWT bundle), until the client goes away.
    fn stream<W, M>(
        &self,
        mut watched: tokio::sync::watch::Receiver<Option<W>>,
        what: &'static str,
        make: fn(&W) -> Result<M, WorkloadError>,
    ) -> Result<Response<ReceiverStream<Result<M, Status>>>, Status>
    where
        W: Clone + Send + Sync + 'static,
        M: Send + 'static,
    {
        let first = watched
            .borrow_and_update()
            .clone()
            .ok_or_else(|| WorkloadError::NotReady(what).status())?;
        let first = make(&first).map_err(|e| e.status())?;
        let permit = self
            .streams
            .clone()
            .try_acquire_owned()
            .map_err(|_| self.refused(WorkloadError::TooManyStreams))?;
        let (out, rx) = mpsc::channel(4);
        let stats = self.stats.clone();
        let shutdown = self.shutdown.clone();
        stats.workload_streams.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            let stopped = async {
                match &shutdown {
                    Some(s) => s.wait().await,
                    None => std::future::pending().await,
                }
            };
            tokio::pin!(stopped);
            let _permit = permit;
            let mut next = Some(Ok(first));
            while let Some(msg) = next.take() {
                if out.send(msg).await.is_err() {
                    break;
                }
                stats.workload_pushes.fetch_add(1, Ordering::Relaxed);
                tokio::select! {
                    changed = watched.changed() => if changed.is_err() { break },
                    _ = out.closed() => break,
                    _ = &mut stopped => break,
                }
                let current = watched.borrow_and_update().clone();
                // Credentials never go back to None; if they did, nothing is sent.
                next = current.map(|c| make(&c).map_err(|e| e.status()));
            }
            stats.workload_streams.fetch_sub(1, Ordering::Relaxed);
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

fn x509_svid(c: &Arc<Credentials>) -> Result<X509svidResponse, WorkloadError> {
    x509::svid_response(c)
}

fn x509_bundles(c: &Arc<Credentials>) -> Result<X509BundlesResponse, WorkloadError> {
    x509::bundles_response(c)
}

fn jwt_bundles(b: &Arc<super::jwt::JwtBundle>) -> Result<JwtBundlesResponse, WorkloadError> {
    // Foreign trust domains' JWT bundles (federation), each under its own key, then ours.
    let mut bundles: std::collections::HashMap<String, Vec<u8>> = b
        .federated
        .iter()
        .filter(|(td, _)| td.as_str() != b.trust_domain.as_str())
        .map(|(td, jwks)| (format!("spiffe://{td}"), jwks.clone()))
        .collect();
    bundles.insert(x509::trust_domain_id(&b.trust_domain), b.jwks_json.clone());
    Ok(JwtBundlesResponse { bundles })
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadApi {
    type FetchX509SVIDStream = ReceiverStream<Result<X509svidResponse, Status>>;
    type FetchX509BundlesStream = ReceiverStream<Result<X509BundlesResponse, Status>>;
    type FetchJWTBundlesStream = ReceiverStream<Result<JwtBundlesResponse, Status>>;

    async fn fetch_x509svid(
        &self,
        req: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        self.admit(&req)?;
        self.stream(self.creds.clone(), "no X.509-SVID", x509_svid)
    }

    async fn fetch_x509_bundles(
        &self,
        req: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        self.admit(&req)?;
        self.stream(self.creds.clone(), "no X.509-SVID", x509_bundles)
    }

    async fn fetch_jwtsvid(
        &self,
        req: Request<JwtsvidRequest>,
    ) -> Result<Response<JwtsvidResponse>, Status> {
        self.admit(&req)?;
        let r = req.into_inner();
        let bad = |m: String| WorkloadError::InvalidArgument(m).status();
        if r.audience.is_empty() || r.audience.iter().any(String::is_empty) {
            return Err(bad("audience is required (and may not be empty)".into()));
        }
        if r.audience.len() > MAX_AUDIENCES
            || r.audience.iter().any(|a| a.len() > MAX_AUDIENCE_BYTES)
        {
            return Err(bad(format!(
                "at most {MAX_AUDIENCES} audiences of at most {MAX_AUDIENCE_BYTES} bytes"
            )));
        }
        let c = self.current()?;
        if !r.spiffe_id.is_empty() && r.spiffe_id != c.identity.to_string() {
            return Err(self.refused(WorkloadError::NoIdentity(" with that SPIFFE ID")));
        }
        let svid = self.ca.fetch_jwt_svid(&c, r.audience).await.map_err(|e| {
            tracing::warn!(error = %e, "the CA did not sign a JWT-SVID");
            WorkloadError::Ca(e).status()
        })?;
        Ok(Response::new(JwtsvidResponse {
            svids: vec![Jwtsvid {
                spiffe_id: svid.spiffe_id.to_string(),
                svid: svid.token,
                hint: String::new(),
            }],
        }))
    }

    async fn fetch_jwt_bundles(
        &self,
        req: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        self.admit(&req)?;
        self.current()?;
        self.stream(self.jwt_bundle.clone(), "no JWT bundle", jwt_bundles)
    }

    async fn validate_jwtsvid(
        &self,
        req: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        self.admit(&req)?;
        let r = req.into_inner();
        if r.audience.is_empty() || r.svid.is_empty() {
            return Err(
                WorkloadError::InvalidArgument("audience and svid are required".into()).status(),
            );
        }
        self.current()?;
        let bundle = self.jwt_bundle.borrow().clone();
        let v = jwt::validate(&r.svid, &r.audience, bundle.as_deref(), self.clock.now())
            .map_err(|e| WorkloadError::from(e).status())?;
        Ok(Response::new(ValidateJwtsvidResponse {
            spiffe_id: v.spiffe_id.to_string(),
            claims: Some(jwt::to_struct(v.claims)),
        }))
    }
}

/// Serves the Workload API, and gRPC reflection describing it, on a Unix socket at `path`
/// (created with `mode`, replacing a stale socket; see `agent::socket`) until shutdown.
pub async fn serve(
    path: &Path,
    mode: u32,
    mut api: WorkloadApi,
    shutdown: Shutdown,
) -> Result<(), String> {
    api.shutdown = Some(shutdown.clone());
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::workload_proto::FILE_DESCRIPTOR_SET)
    };
    let bad = |e: tonic_reflection::server::Error| format!("reflection: {e}");
    let (v1, v1alpha) = (
        reflection().build_v1().map_err(bad)?,
        reflection().build_v1alpha().map_err(bad)?,
    );
    let listener = super::socket::bind(path, mode)?;
    tracing::info!(socket = %path.display(), mode = format!("{mode:04o}"), "SPIFFE Workload API serving");
    // Every connection through agent::authority: grpcio and grpc-java clients send an
    // :authority h2 would refuse.
    let incoming = tokio_stream::StreamExt::map(
        tokio_stream::wrappers::UnixListenerStream::new(listener),
        |conn| conn.map(super::authority::wrap),
    );
    tonic::transport::Server::builder()
        .max_concurrent_streams(Some(MAX_STREAMS as u32))
        .http2_max_header_list_size(Some(MAX_HEADER_LIST_BYTES))
        .add_service(SpiffeWorkloadApiServer::new(api).max_decoding_message_size(MAX_MESSAGE_BYTES))
        // Server reflection (the spec asks for it): grpcurl and friends list and describe
        // SpiffeWorkloadAPI without a copy of the proto file. It needs no header.
        .add_service(v1)
        .add_service(v1alpha)
        .serve_with_incoming_shutdown(incoming, async move { shutdown.wait().await })
        .await
        .map_err(|e| format!("Workload API server failed: {e}"))
}
