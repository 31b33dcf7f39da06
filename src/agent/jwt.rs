//! The agent's JWT side: JWT-SVIDs and the JWT bundle from the CA's
//! `citadel.v1.JwtSvidService`, over the same credentials as certificate renewal
//! ([`fetch::ca_call`]: the token, else the current certificate over mTLS).
//!
//! The calls sit behind [`JwtCa`] so the Workload API can be tested with a fake CA. The
//! bundle is kept current by [`follow`] (on every renewal and on a timer) and published on a
//! `watch`, like the credentials.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tonic::transport::Channel;

use super::fetch::{ca_call, FetchConfig, FetchError};
use super::{Credentials, CredentialsRx};
use crate::auth::jwks::{Jwks, JwksError};
use crate::client::ClientError;
use crate::clock::SharedClock;
use crate::identity::{SpiffeId, TrustDomain};
use crate::jwtsvid_proto::jwt_svid_service_client::JwtSvidServiceClient;
use crate::jwtsvid_proto::{FetchJwtBundleRequest, FetchJwtSvidRequest};
use crate::shutdown::Shutdown;

/// A JWT-SVID the CA signed for us.
#[derive(Clone)]
pub struct JwtSvid {
    /// Its `sub`.
    pub spiffe_id: SpiffeId,
    /// The JWS compact serialization. Never logged.
    pub token: String,
    /// `exp`, Unix seconds.
    pub expires_at: i64,
}

/// A trust domain's JWT bundle as the CA publishes it.
#[derive(Clone)]
pub struct JwtBundle {
    /// Whose keys these are.
    pub trust_domain: TrustDomain,
    /// The JWK Set document, as received (what FetchJWTBundles hands on).
    pub jwks_json: Vec<u8>,
    /// The `jwt-svid` keys, for ValidateJWTSVID; `None` when the set holds none, which means
    /// every JWT-SVID of the trust domain is invalid.
    pub keys: Option<Jwks>,
    /// The CA's sequence number, bumped on every change of the set.
    pub sequence: u64,
    /// The foreign trust domains' JWT bundles (JWK Sets of their `jwt-svid` keys), by trust
    /// domain name, from the credentials' federated bundles; never merged with ours.
    pub federated: std::collections::BTreeMap<String, Vec<u8>>,
}

impl std::fmt::Debug for JwtBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtBundle")
            .field("trust_domain", &self.trust_domain.as_str())
            .field("keys", &self.keys.as_ref().map_or(0, Jwks::len))
            .field("sequence", &self.sequence)
            .finish()
    }
}

impl JwtBundle {
    /// Parses a JWK Set for `trust_domain`, keeping only the keys for JWT-SVIDs (`use`
    /// `jwt-svid`, or no `use`): an X.509 authority in the same set must not verify tokens.
    pub fn parse(
        trust_domain: TrustDomain,
        jwks_json: Vec<u8>,
        sequence: u64,
    ) -> Result<Self, String> {
        let mut doc: serde_json::Value = serde_json::from_slice(&jwks_json)
            .map_err(|e| format!("the JWT bundle is not JSON: {e}"))?;
        let keys = doc
            .get_mut("keys")
            .and_then(|k| k.as_array_mut())
            .ok_or("the JWT bundle has no \"keys\" array")?;
        keys.retain(|k| {
            matches!(
                k.get("use").and_then(|u| u.as_str()),
                None | Some("jwt-svid")
            )
        });
        // auth::jwks takes signature keys (`use: sig`); these are, for JWT-SVIDs.
        for k in keys.iter_mut() {
            if let Some(o) = k.as_object_mut() {
                o.remove("use");
            }
        }
        let keys = if keys.is_empty() {
            None
        } else {
            match Jwks::from_json(doc.to_string().as_bytes()) {
                Ok(k) => Some(k),
                // Only key types we cannot verify with: no token of the domain validates.
                Err(JwksError::Empty) => None,
                Err(e) => return Err(e.to_string()),
            }
        };
        Ok(Self {
            trust_domain,
            jwks_json,
            keys,
            sequence,
            federated: Default::default(),
        })
    }
}

/// What the agent asks of the CA for JWT-SVIDs. `current` is the certificate the agent
/// holds (its mTLS credential when there is no token).
#[tonic::async_trait]
pub trait JwtCa: Send + Sync {
    /// A JWT-SVID for our own identity with these audiences.
    async fn fetch_jwt_svid(
        &self,
        current: &Credentials,
        audience: Vec<String>,
    ) -> Result<JwtSvid, FetchError>;
    /// Our trust domain's JWT bundle.
    async fn fetch_jwt_bundle(&self, current: &Credentials) -> Result<JwtBundle, FetchError>;
}

/// [`JwtCa`] over the network: the CA at `cfg.ca_addr`, authenticated like renewal.
pub struct CaJwt {
    cfg: FetchConfig,
    clock: SharedClock,
}

impl CaJwt {
    /// Calls the CA `cfg` names, with the credentials renewal would use at `clock`'s time.
    pub fn new(cfg: FetchConfig, clock: SharedClock) -> Self {
        Self { cfg, clock }
    }

    async fn client(
        &self,
        current: &Credentials,
    ) -> Result<(JwtSvidServiceClient<Channel>, Option<String>, SpiffeId), FetchError> {
        let call = ca_call(&self.cfg, Some(current), self.clock.now())?;
        let channel = crate::client::channel(&call.opts).await?;
        Ok((
            JwtSvidServiceClient::new(channel),
            call.bearer,
            call.identity,
        ))
    }
}

/// A request carrying the bearer token, if any.
fn with_bearer<T>(msg: T, bearer: Option<&str>) -> Result<tonic::Request<T>, FetchError> {
    let mut req = tonic::Request::new(msg);
    if let Some(t) = bearer {
        let v = format!("Bearer {t}").parse().map_err(|_| {
            FetchError::NoCredential("the token holds characters not allowed in a header".into())
        })?;
        req.metadata_mut().insert("authorization", v);
    }
    Ok(req)
}

fn rpc(s: tonic::Status) -> FetchError {
    FetchError::Client(ClientError::Rpc {
        code: s.code(),
        message: s.message().to_string(),
    })
}

#[tonic::async_trait]
impl JwtCa for CaJwt {
    async fn fetch_jwt_svid(
        &self,
        current: &Credentials,
        audience: Vec<String>,
    ) -> Result<JwtSvid, FetchError> {
        let (mut ca, bearer, identity) = self.client(current).await?;
        let req = with_bearer(
            FetchJwtSvidRequest {
                audience,
                spiffe_id: identity.to_string(),
            },
            bearer.as_deref(),
        )?;
        let r = ca.fetch_jwt_svid(req).await.map_err(rpc)?.into_inner();
        if r.spiffe_id != identity.to_string() {
            return Err(FetchError::Rejected(format!(
                "a JWT-SVID for {:?}, expected {identity}",
                r.spiffe_id.chars().take(120).collect::<String>()
            )));
        }
        Ok(JwtSvid {
            spiffe_id: identity,
            token: r.token,
            expires_at: r.expires_at,
        })
    }

    async fn fetch_jwt_bundle(&self, current: &Credentials) -> Result<JwtBundle, FetchError> {
        let (mut ca, bearer, _) = self.client(current).await?;
        let req = with_bearer(FetchJwtBundleRequest {}, bearer.as_deref())?;
        let r = ca.fetch_jwt_bundle(req).await.map_err(rpc)?.into_inner();
        // Never merge bundles of different trust domains: ours is the only one we take.
        if r.trust_domain != self.cfg.trust_domain.as_str() {
            return Err(FetchError::Rejected(format!(
                "the CA sent the JWT bundle of {:?}, not of {}",
                r.trust_domain.chars().take(120).collect::<String>(),
                self.cfg.trust_domain.as_str()
            )));
        }
        JwtBundle::parse(self.cfg.trust_domain.clone(), r.jwks, r.sequence)
            .map_err(FetchError::Rejected)
    }
}

/// The receiving side of the JWT bundle: `None` until the first fetch succeeds.
pub type JwtBundleRx = watch::Receiver<Option<Arc<JwtBundle>>>;
/// The sending side, held by [`follow`].
pub type JwtBundleTx = watch::Sender<Option<Arc<JwtBundle>>>;

/// Keeps the JWT bundle current: fetches it once credentials exist, again after every change
/// of credentials (a renewal, a rotation) and every `interval`; publishes only changes.
/// A CA without the JWT-SVID service answers Unimplemented: logged once, retried on the timer.
pub async fn follow(
    ca: Arc<dyn JwtCa>,
    mut creds: CredentialsRx,
    tx: JwtBundleTx,
    interval: Duration,
    shutdown: Shutdown,
) {
    let mut warned = false;
    loop {
        let current = creds.borrow_and_update().clone();
        if let Some(c) = current {
            match ca.fetch_jwt_bundle(&c).await {
                Ok(mut b) => {
                    warned = false;
                    b.federated = c
                        .federated
                        .bundles
                        .iter()
                        .map(|(td, f)| (td.clone(), f.jwt_jwks().into_bytes()))
                        .collect();
                    tx.send_if_modified(|cur| {
                        let same = cur.as_ref().is_some_and(|o| {
                            o.sequence == b.sequence
                                && o.jwks_json == b.jwks_json
                                && o.federated == b.federated
                        });
                        if !same {
                            tracing::info!(
                                trust_domain = b.trust_domain.as_str(),
                                sequence = b.sequence,
                                keys = b.keys.as_ref().map_or(0, Jwks::len),
                                "JWT bundle updated"
                            );
                            *cur = Some(Arc::new(b));
                        }
                        !same
                    });
                }
                Err(e) if !warned => {
                    warned = true;
                    tracing::warn!(error = %e, "cannot fetch the JWT bundle; JWT-SVID validation waits for it");
                }
                Err(e) => tracing::debug!(error = %e, "cannot fetch the JWT bundle"),
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            r = creds.changed() => if r.is_err() { return },
            _ = shutdown.wait() => return,
        }
    }
}
