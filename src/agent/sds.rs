//! Envoy's Secret Discovery Service on a Unix socket: `default` (the workload certificate)
//! and `ROOTCA` (trust bundle, and CRL when known).
//!
//! Per stream it tracks the subscribed names and the nonce it last sent. A request whose
//! nonce is stale is ignored; an ACK changes nothing; a NACK is logged and counted and the
//! same version is NOT re-sent (no loop): the next push happens when credentials change.
//!
//! Only processes of this user reach the socket (0700 directory, 0600 socket), but one buggy
//! or compromised process in the pod must still not exhaust the agent that serves Envoy, so
//! every dimension a client controls is bounded (see the `MAX_*` constants and
//! docs/operations.md): open streams, streams per connection, message size, and the number
//! and length of resource names.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::{data_source::Specifier, DataSource};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    secret, CertificateValidationContext, Secret, TlsCertificate,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_server::{
    SecretDiscoveryService, SecretDiscoveryServiceServer,
};
use envoy_types::pb::google::protobuf::Any;
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::{AgentStats, Credentials, CredentialsRx};
use crate::shutdown::Shutdown;

/// SDS streams open at once, over all connections. Envoy opens one per secret config
/// (usually one or two); the rest wait for a free slot by retrying.
pub const MAX_STREAMS: usize = 64;
/// Resource names in one request. Envoy asks for `default` and `ROOTCA`.
pub const MAX_RESOURCE_NAMES: usize = 16;
/// Bytes in one resource name.
pub const MAX_NAME_BYTES: usize = 256;
/// Bytes of HTTP/2 headers in one request (Envoy sends a few hundred).
pub const MAX_HEADER_LIST_BYTES: u32 = 16 * 1024;
/// Bytes in one decoded request. Envoy's node metadata is the bulk of a DiscoveryRequest
/// and stays far below this.
pub const MAX_MESSAGE_BYTES: usize = 1 << 20;

/// Why an SDS call is refused. The only place this surface turns errors into
/// `tonic::Status` is [`SdsError::status`].
#[derive(Debug, thiserror::Error)]
pub enum SdsError {
    /// Incremental (delta) xDS; Envoy falls back to state-of-the-world streams.
    #[error("delta SDS is not supported; use the state-of-the-world StreamSecrets")]
    DeltaUnsupported,
    /// The agent has no certificate yet (first fetch in progress); Envoy retries.
    #[error("no certificate yet")]
    NotReady,
    /// None of the requested names is one this agent serves.
    #[error("unknown secret name: this agent serves \"default\" and \"ROOTCA\"")]
    UnknownName,
    /// [`MAX_STREAMS`] streams are open already.
    #[error("too many SDS streams are open (at most {MAX_STREAMS}); retry when one closes")]
    TooManyStreams,
    /// More than [`MAX_RESOURCE_NAMES`] names, or one longer than [`MAX_NAME_BYTES`].
    #[error("{0}")]
    BadNames(String),
}

impl SdsError {
    /// Envoy's expectations: Unimplemented, Unavailable (retry), NotFound.
    pub fn status(&self) -> Status {
        let code = match self {
            SdsError::DeltaUnsupported => tonic::Code::Unimplemented,
            SdsError::NotReady => tonic::Code::Unavailable,
            SdsError::UnknownName => tonic::Code::NotFound,
            SdsError::TooManyStreams => tonic::Code::ResourceExhausted,
            SdsError::BadNames(_) => tonic::Code::InvalidArgument,
        };
        Status::new(code, self.to_string())
    }
}

/// The type URL of every resource sent: Envoy's TLS `Secret`.
pub const SECRET_TYPE: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
/// The resource name Envoy asks for the workload certificate and key (Istio's).
pub const WORKLOAD: &str = "default";
/// The resource name Envoy asks for the trust bundle (Istio's).
pub const ROOTCA: &str = "ROOTCA";

fn inline(bytes: &str) -> Option<DataSource> {
    Some(DataSource {
        specifier: Some(Specifier::InlineBytes(bytes.as_bytes().to_vec())),
        ..Default::default()
    })
}

/// The named secret, if we serve that name.
pub fn secret_for(name: &str, c: &Credentials) -> Option<Secret> {
    let kind = match name {
        WORKLOAD => secret::Type::TlsCertificate(TlsCertificate {
            certificate_chain: inline(&c.chain_pem),
            private_key: inline(&c.key_pem),
            ..Default::default()
        }),
        ROOTCA => secret::Type::ValidationContext(CertificateValidationContext {
            // Our roots, then those of the foreign trust domains allowed into SDS
            // (`--sds-federated-trust-domain`); empty unless the agent was told to.
            trusted_ca: inline(&format!("{}{}", c.roots_pem, c.federated.sds_roots_pem)),
            crl: c.crl_pem.as_deref().and_then(inline),
            // Check the leaf against its issuer's CRL only. With the full-chain default,
            // Envoy fails every handshake whose chain has a CA without a CRL in the set
            // (the root, a cross-signed certificate during a root rotation); citadel revokes
            // workload certificates, and retires CAs by rotation instead.
            only_verify_leaf_cert_crl: c.crl_pem.is_some(),
            ..Default::default()
        }),
        _ => return None,
    };
    Some(Secret {
        name: name.to_string(),
        r#type: Some(kind),
    })
}

/// Checks a request's resource names against [`MAX_RESOURCE_NAMES`] and [`MAX_NAME_BYTES`].
fn check_names(names: &[String]) -> Result<(), SdsError> {
    if names.len() > MAX_RESOURCE_NAMES {
        return Err(SdsError::BadNames(format!(
            "{} resource names requested; at most {MAX_RESOURCE_NAMES} (this agent serves \"default\" and \"ROOTCA\")",
            names.len()
        )));
    }
    if let Some(n) = names.iter().find(|n| n.len() > MAX_NAME_BYTES) {
        return Err(SdsError::BadNames(format!(
            "a resource name of {} bytes; at most {MAX_NAME_BYTES}",
            n.len()
        )));
    }
    Ok(())
}

/// The SDS gRPC service: streams the current [`Credentials`] to every subscriber.
pub struct Sds {
    rx: CredentialsRx,
    stats: Arc<AgentStats>,
    streams: Arc<tokio::sync::Semaphore>,
}

impl Sds {
    /// A service that reads credentials from `rx` and counts streams and pushes in `stats`.
    pub fn new(rx: CredentialsRx, stats: Arc<AgentStats>) -> Self {
        Self {
            rx,
            stats,
            streams: Arc::new(tokio::sync::Semaphore::new(MAX_STREAMS)),
        }
    }

    fn refused(&self, e: SdsError) -> Status {
        self.stats.sds_refused.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(error = %e, "refused an SDS call");
        e.status()
    }
}

/// What one stream has been sent.
struct StreamState {
    names: BTreeSet<String>,
    last_nonce: String,
    sent_version: Option<u64>,
    nonces: u64,
}

impl StreamState {
    fn response(&mut self, c: &Credentials) -> Option<DiscoveryResponse> {
        let resources: Vec<Any> = self
            .names
            .iter()
            .filter_map(|n| secret_for(n, c))
            .map(|s| Any {
                type_url: SECRET_TYPE.into(),
                value: s.encode_to_vec(),
            })
            .collect();
        if resources.is_empty() {
            tracing::warn!(names = ?self.names, "Envoy asked only for secrets this agent does not serve (it serves \"default\" and \"ROOTCA\")");
            return None;
        }
        self.nonces += 1;
        self.last_nonce = format!("{}-{}", c.version, self.nonces);
        self.sent_version = Some(c.version);
        Some(DiscoveryResponse {
            version_info: c.version.to_string(),
            resources,
            type_url: SECRET_TYPE.into(),
            nonce: self.last_nonce.clone(),
            ..Default::default()
        })
    }
}

#[tonic::async_trait]
impl SecretDiscoveryService for Sds {
    type DeltaSecretsStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;
    type StreamSecretsStream = ReceiverStream<Result<DiscoveryResponse, Status>>;

    async fn delta_secrets(
        &self,
        _: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaSecretsStream>, Status> {
        Err(SdsError::DeltaUnsupported.status())
    }

    async fn fetch_secrets(
        &self,
        req: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        check_names(&req.get_ref().resource_names).map_err(|e| self.refused(e))?;
        let c = self
            .rx
            .borrow()
            .clone()
            .ok_or_else(|| SdsError::NotReady.status())?;
        let mut st = StreamState {
            names: req.into_inner().resource_names.into_iter().collect(),
            last_nonce: String::new(),
            sent_version: None,
            nonces: 0,
        };
        st.response(&c)
            .map(Response::new)
            .ok_or_else(|| SdsError::UnknownName.status())
    }

    async fn stream_secrets(
        &self,
        req: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamSecretsStream>, Status> {
        let permit = self
            .streams
            .clone()
            .try_acquire_owned()
            .map_err(|_| self.refused(SdsError::TooManyStreams))?;
        let mut inbound = req.into_inner();
        let (out, rx) = mpsc::channel(8);
        let (mut creds, stats) = (self.rx.clone(), self.stats.clone());
        stats.sds_streams.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            let _permit = permit; // held for the stream's life
            let mut st = StreamState {
                names: BTreeSet::new(),
                last_nonce: String::new(),
                sent_version: None,
                nonces: 0,
            };
            loop {
                let push = tokio::select! {
                    msg = inbound.message() => match msg {
                        Ok(Some(r)) => {
                            if !r.response_nonce.is_empty() && r.response_nonce != st.last_nonce {
                                continue; // answers an older response; a newer one is in flight
                            }
                            if let Some(err) = &r.error_detail {
                                stats.sds_nacks.fetch_add(1, Ordering::Relaxed);
                                tracing::warn!(version = %r.version_info, error = %err.message, names = ?r.resource_names, "Envoy rejected (NACK) a secret; not re-sending it");
                                continue;
                            }
                            if let Err(e) = check_names(&r.resource_names) {
                                stats.sds_refused.fetch_add(1, Ordering::Relaxed);
                                tracing::warn!(error = %e, "ended an SDS stream");
                                let _ = out.send(Err(e.status())).await;
                                break;
                            }
                            let names: BTreeSet<String> = r.resource_names.into_iter().collect();
                            let first = st.last_nonce.is_empty();
                            if names != st.names || first {
                                st.names = names;
                                Push::Always
                            } else {
                                Push::No // an ACK
                            }
                        }
                        Ok(None) => break,
                        // A frame or message the transport refused (garbage, over
                        // MAX_MESSAGE_BYTES): tell the client why, then end the stream.
                        Err(status) => {
                            let _ = out.send(Err(status)).await;
                            break;
                        }
                    },
                    changed = creds.changed() => {
                        if changed.is_err() { break }
                        if st.names.is_empty() { Push::No } else { Push::IfNewVersion }
                    }
                };
                if matches!(push, Push::No) {
                    continue; // and leave any pending change unseen, so it is pushed next
                }
                let current = creds.borrow_and_update().clone();
                let Some(c) = current else { continue }; // answered once the first certificate arrives
                if matches!(push, Push::IfNewVersion) && st.sent_version == Some(c.version) {
                    continue;
                }
                if let Some(resp) = st.response(&c) {
                    stats.sds_pushes.fetch_add(1, Ordering::Relaxed);
                    if out.send(Ok(resp)).await.is_err() {
                        break;
                    }
                }
            }
            stats.sds_streams.fetch_sub(1, Ordering::Relaxed);
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

enum Push {
    /// The subscription changed (or is new): send the current version.
    Always,
    /// Credentials changed: send if this stream has not seen that version.
    IfNewVersion,
    No,
}

/// Serves SDS on a Unix socket at `path` (0600, replacing a stale socket) until shutdown.
pub async fn serve(
    path: &Path,
    rx: CredentialsRx,
    stats: Arc<AgentStats>,
    shutdown: Shutdown,
) -> Result<(), String> {
    // Only this user (Envoy runs as the same user in the pod) may fetch the private key.
    let listener = super::socket::bind(path, 0o600)?;
    tracing::info!(socket = %path.display(), "SDS serving");
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    tonic::transport::Server::builder()
        .max_concurrent_streams(Some(MAX_STREAMS as u32))
        .http2_max_header_list_size(Some(MAX_HEADER_LIST_BYTES))
        .add_service(
            SecretDiscoveryServiceServer::new(Sds::new(rx, stats))
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
        )
        .serve_with_incoming_shutdown(incoming, async move { shutdown.wait().await })
        .await
        .map_err(|e| format!("SDS server failed: {e}"))
}
