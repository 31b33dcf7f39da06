//! One certificate fetch: read the token, make a key and CSR, call CreateCertificate,
//! verify the answer before anyone uses it.

use std::path::PathBuf;

use time::OffsetDateTime;

use super::Credentials;
use crate::client::{self, ClientError, ConnectOptions};
use crate::identity::{ServiceAccount, SpiffeId, TrustDomain};
use crate::pki::{chain, csr, pem, KeyType};

/// Everything one fetch needs: where the CA is, what to trust, which credential and key to use.
#[derive(Debug, Clone)]
pub struct FetchConfig {
    /// The CA's gRPC address, `HOST:PORT` (istiod's is `:15012`).
    pub ca_addr: String,
    /// Roots trusted for the CA's serving certificate, besides the latest bundle received.
    pub ca_root_pem: Vec<u8>,
    /// Re-read on every fetch when set (in a pod: the mounted istio-ca-root-cert ConfigMap,
    /// which the CA updates during a root rotation).
    pub ca_root_file: Option<PathBuf>,
    /// Name to verify in the CA's serving certificate; `None` uses the host of `ca_addr`.
    pub tls_server_name: Option<String>,
    /// The service-account token file (projected, `aud: istio-ca`); `None` or a missing or expired
    /// token means renewing by client certificate only.
    pub token_file: Option<PathBuf>,
    /// The trust domain of the expected identity.
    pub trust_domain: TrustDomain,
    /// Fixed identity (from --namespace/--service-account); otherwise from the token.
    pub identity: Option<SpiffeId>,
    /// The key algorithm of each new CSR; a new key is made on every fetch.
    pub key_type: KeyType,
    /// The validity asked for (`validity_duration`); the CA may refuse more than its maximum.
    pub cert_ttl: std::time::Duration,
    /// Talk to the CA without TLS (tests only; a bearer token then crosses in clear).
    pub plaintext: bool,
}

/// Why a fetch produced no credentials.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// No unexpired token and no unexpired certificate to renew with, an unreadable token file, or
    /// a token that names no service account.
    #[error("no usable credential: {0}")]
    NoCredential(String),
    /// Connecting to the CA or the RPC itself failed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The CA's answer did not verify (chain, roots or identity), so it is not used.
    #[error("the CA answered with a certificate we refuse: {0}")]
    Rejected(String),
}

impl FetchError {
    /// istio-agent retries these codes; everything else waits for the next attempt.
    pub fn retryable(&self) -> bool {
        use tonic::Code::*;
        match self {
            FetchError::Client(ClientError::Rpc { code, .. }) => {
                matches!(
                    code,
                    Unavailable
                        | DeadlineExceeded
                        | ResourceExhausted
                        | Aborted
                        | Internal
                        | Unknown
                )
            }
            FetchError::Client(ClientError::Connect { .. }) => true,
            _ => false,
        }
    }
}

/// The token, if the file exists and the token has not expired (by its unverified `exp`;
/// the CA verifies it properly). kubelet rotates the file, so it is read on every fetch.
fn read_token(cfg: &FetchConfig, now: i64) -> Result<Option<(String, Option<SpiffeId>)>, String> {
    let Some(path) = &cfg.token_file else {
        return Ok(None);
    };
    let token = match std::fs::read_to_string(path) {
        Ok(t) => t.trim().to_string(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let claims = crate::auth::jws::unverified_claims(&token);
    let exp = claims
        .as_ref()
        .and_then(|c| c.get("exp"))
        .and_then(|e| e.as_i64());
    if exp.is_some_and(|e| e <= now) {
        return Ok(None);
    }
    let id = claims
        .as_ref()
        .and_then(|c| c.get("sub"))
        .and_then(|s| s.as_str())
        .and_then(|s| ServiceAccount::from_username(s).ok())
        .map(|sa| cfg.trust_domain.service_account_id(&sa));
    Ok(Some((token, id)))
}

/// How to call the CA right now: the connection (roots, and the client certificate when
/// renewing by mTLS), the bearer token if there is one, and the identity it stands for.
pub struct CaCall {
    /// Where and how to connect.
    pub opts: ConnectOptions,
    /// The service-account token, sent as `authorization: Bearer` when present.
    pub bearer: Option<String>,
    /// The identity the CA is expected to answer for.
    pub identity: SpiffeId,
}

/// Picks the credential the way istio-agent does: the token if there is an unexpired one, else
/// the `current` certificate over mTLS. Every call to the CA (certificates, JWT-SVIDs) goes
/// through this, so they all authenticate alike. The latest bundle received (`current`'s
/// roots) is trusted for the CA connection too, so a root rotation does not cut the agent off.
pub fn ca_call(
    cfg: &FetchConfig,
    current: Option<&Credentials>,
    now: OffsetDateTime,
) -> Result<CaCall, FetchError> {
    let token = read_token(cfg, now.unix_timestamp()).map_err(FetchError::NoCredential)?;
    let usable_current = current.filter(|c| c.not_after > now);
    let (bearer, identity, mtls) = match (token, usable_current) {
        (Some((t, id)), _) => {
            let id = cfg.identity.clone().or(id).ok_or_else(|| {
                FetchError::NoCredential(
                    "the token names no service account; pass --namespace and --service-account"
                        .into(),
                )
            })?;
            (Some(t), id, None)
        }
        (None, Some(c)) => (
            None,
            c.identity.clone(),
            Some((
                c.chain_pem.clone().into_bytes(),
                c.key_pem.clone().into_bytes(),
            )),
        ),
        (None, None) => return Err(FetchError::NoCredential(
            "the token file is missing or expired and there is no valid certificate to renew with"
                .into(),
        )),
    };
    let mut roots = cfg
        .ca_root_file
        .as_ref()
        .and_then(|f| std::fs::read(f).ok())
        .unwrap_or_else(|| cfg.ca_root_pem.clone());
    if let Some(c) = current {
        roots.extend_from_slice(c.roots_pem.as_bytes());
    }
    Ok(CaCall {
        opts: ConnectOptions {
            addr: cfg.ca_addr.clone(),
            root_pem: roots,
            server_name: cfg.tls_server_name.clone(),
            identity: mtls,
            plaintext: cfg.plaintext,
            local_address: None,
        },
        bearer,
        identity,
    })
}

/// Fetches a certificate, using the token if there is one, else renewing over mTLS with
/// `current` (istio's first authenticator); see [`ca_call`].
pub async fn fetch(
    cfg: &FetchConfig,
    current: Option<&Credentials>,
    now: OffsetDateTime,
    version: u64,
) -> Result<Credentials, FetchError> {
    let CaCall {
        opts,
        bearer,
        identity,
    } = ca_call(cfg, current, now)?;
    let mut ca = client::connect(&opts).await?;
    let key = cfg
        .key_type
        .generate()
        .map_err(|e| FetchError::Rejected(e.to_string()))?;
    let csr =
        csr::build(&key, &identity.to_string()).map_err(|e| FetchError::Rejected(e.to_string()))?;
    let chain_pem = client::create_certificate(
        &mut ca,
        csr,
        bearer.as_deref(),
        cfg.cert_ttl.as_secs() as i64,
    )
    .await?;
    let verified = client::verify_response(&chain_pem, Some(&identity), now)
        .map_err(|e| FetchError::Rejected(e.to_string()))?;
    let leaf = pem::parse_certs(chain_pem[0].as_bytes())
        .map_err(|e| FetchError::Rejected(e.to_string()))?;
    if !chain::key_matches_cert(&key, &leaf[0]).map_err(|e| FetchError::Rejected(e.to_string()))? {
        return Err(FetchError::Rejected(
            "the certificate does not certify our key".into(),
        ));
    }
    Ok(Credentials {
        identity,
        key_pem: key.serialize_pem(),
        chain_pem: verified.cert_chain_pem,
        roots_pem: verified.roots_pem,
        crl_pem: current.and_then(|c| c.crl_pem.clone()),
        serial_hex: verified.leaf.serial_hex,
        not_before: verified.leaf.not_before,
        not_after: verified.leaf.not_after,
        version,
        federated: current.map(|c| c.federated.clone()).unwrap_or_default(),
    })
}
