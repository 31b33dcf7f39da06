//! A client for Istio's CA protocol: connect over TLS, send a CSR, verify the answer.
//! Used by `citadel request`, the benchmark, tests, and the sidecar agent.

use std::time::Duration;

use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::identity::SpiffeId;
use crate::pki::chain::{self, CertInfo, Usage};
use crate::pki::pem;
use crate::proto::istio_certificate_service_client::IstioCertificateServiceClient;
use crate::proto::IstioCertificateRequest;

/// A gRPC client of Istio's `IstioCertificateService`.
pub type CaClient = IstioCertificateServiceClient<Channel>;

/// Why a CreateCertificate call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Not `HOST:PORT`.
    #[error("invalid CA address {0:?}: expected HOST:PORT")]
    Address(String),
    /// The channel could not be set up (TLS config, TCP or handshake).
    #[error("cannot connect to the CA at {addr}: {source}")]
    Connect {
        /// The address as given.
        addr: String,
        /// The transport error.
        #[source]
        source: tonic::transport::Error,
    },
    /// The CA answered with a gRPC error.
    #[error("the CA refused the request: {code:?}: {message}")]
    Rpc {
        /// The gRPC status code.
        code: tonic::Code,
        /// The status message.
        message: String,
    },
    /// The response did not verify (chain length, signature, roots, identity).
    #[error("the CA's response is unusable: {0}")]
    BadResponse(String),
}

/// How to reach the CA.
#[derive(Clone, Default)]
pub struct ConnectOptions {
    /// `HOST:PORT`.
    pub addr: String,
    /// PEM roots that must have issued the CA's serving certificate.
    pub root_pem: Vec<u8>,
    /// TLS server name; defaults to HOST.
    pub server_name: Option<String>,
    /// A client certificate chain and key (PEM) for renewal by mTLS.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// Plain HTTP/2, for a server run with `--plaintext`.
    pub plaintext: bool,
    /// The local address to connect from (the kernel picks when `None`): lets a load
    /// generator or a test speak from several loopback addresses, as many peers would.
    pub local_address: Option<std::net::IpAddr>,
}

impl std::fmt::Debug for ConnectOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The client identity holds a private key: never print it.
        f.debug_struct("ConnectOptions")
            .field("addr", &self.addr)
            .field("server_name", &self.server_name)
            .field(
                "client_identity",
                &self.identity.as_ref().map(|_| "<redacted>"),
            )
            .field("plaintext", &self.plaintext)
            .finish_non_exhaustive()
    }
}

/// Opens a channel to the CA: TLS trusting `root_pem` (and presenting `identity` if set) unless
/// `plaintext`; 5 s connect timeout, TCP_NODELAY.
pub async fn connect(opts: &ConnectOptions) -> Result<CaClient, ClientError> {
    Ok(IstioCertificateServiceClient::new(channel(opts).await?))
}

/// The channel [`connect`] opens, for the CA port's other services (the agent's JWT-SVID
/// calls): one place decides how citadel's clients reach the CA.
pub async fn channel(opts: &ConnectOptions) -> Result<Channel, ClientError> {
    let host = opts
        .addr
        .rsplit_once(':')
        .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']'))
        .filter(|h| !h.is_empty())
        .ok_or_else(|| ClientError::Address(opts.addr.clone()))?;
    let scheme = if opts.plaintext { "http" } else { "https" };
    let mut ep = Endpoint::from_shared(format!("{scheme}://{}", opts.addr))
        .map_err(|_| ClientError::Address(opts.addr.clone()))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5))
        .local_address(opts.local_address);
    if !opts.plaintext {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&opts.root_pem))
            .domain_name(opts.server_name.clone().unwrap_or_else(|| host.to_string()));
        if let Some((cert, key)) = &opts.identity {
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        ep = ep.tls_config(tls).map_err(|source| ClientError::Connect {
            addr: opts.addr.clone(),
            source,
        })?;
    }
    ep.connect().await.map_err(|source| ClientError::Connect {
        addr: opts.addr.clone(),
        source,
    })
}

/// Sends one CreateCertificate the way istio-agent does.
pub async fn create_certificate(
    client: &mut CaClient,
    csr_pem: String,
    token: Option<&str>,
    ttl_secs: i64,
) -> Result<Vec<String>, ClientError> {
    let mut req = tonic::Request::new(IstioCertificateRequest {
        csr: csr_pem,
        validity_duration: ttl_secs,
        metadata: Some(prost_types::Struct {
            fields: [(
                "CertSigner".to_string(),
                prost_types::Value {
                    kind: Some(prost_types::value::Kind::StringValue(String::new())),
                },
            )]
            .into(),
        }),
    });
    if let Some(t) = token {
        let v = format!("Bearer {t}").parse().map_err(|_| {
            ClientError::BadResponse("the token contains characters not allowed in a header".into())
        })?;
        req.metadata_mut().insert("authorization", v);
    }
    client
        .create_certificate(req)
        .await
        .map(|r| r.into_inner().cert_chain)
        .map_err(|s| ClientError::Rpc {
            code: s.code(),
            message: s.message().to_string(),
        })
}

/// A response that verified.
#[derive(Debug, Clone)]
pub struct VerifiedChain {
    /// The leaf, described.
    pub leaf: CertInfo,
    /// Leaf followed by the intermediates, PEM: what `cert-chain.pem` holds.
    pub cert_chain_pem: String,
    /// The trust bundle, PEM: what `root-cert.pem` holds.
    pub roots_pem: String,
    /// The trust bundle, DER, in the order of the last element.
    pub roots: Vec<CertificateDer<'static>>,
}

/// Checks a CreateCertificate response: at least two elements, a chain that verifies to the
/// roots in the last element at `now`, and (if given) exactly the expected SPIFFE ID.
pub fn verify_response(
    chain_pem: &[String],
    expected: Option<&SpiffeId>,
    now: OffsetDateTime,
) -> Result<VerifiedChain, ClientError> {
    let bad = |m: String| ClientError::BadResponse(m);
    if chain_pem.len() < 2 {
        return Err(bad(format!(
            "expected at least 2 elements (leaf and roots), got {}",
            chain_pem.len()
        )));
    }
    let leaf = pem::parse_certs(chain_pem[0].as_bytes()).map_err(|e| bad(format!("leaf: {e}")))?;
    let mut intermediates = Vec::new();
    for (i, p) in chain_pem[1..chain_pem.len() - 1].iter().enumerate() {
        intermediates.extend(
            pem::parse_certs(p.as_bytes()).map_err(|e| bad(format!("element {}: {e}", i + 1)))?,
        );
    }
    let roots_pem = chain_pem.last().cloned().unwrap_or_default();
    let roots = pem::parse_certs(roots_pem.as_bytes()).map_err(|e| bad(format!("roots: {e}")))?;
    chain::verify_leaf(&leaf[0], &intermediates, &roots, now, Usage::ClientAuth)
        .map_err(|e| bad(e.to_string()))?;
    let info = chain::describe(&leaf[0]).map_err(|e| bad(e.to_string()))?;
    if let Some(want) = expected {
        if info.uri_sans != [want.to_string()] {
            return Err(bad(format!(
                "certificate names {:?}, expected {want}",
                info.uri_sans
            )));
        }
    }
    Ok(VerifiedChain {
        leaf: info,
        cert_chain_pem: chain_pem[..chain_pem.len() - 1].concat(),
        roots_pem,
        roots,
    })
}
