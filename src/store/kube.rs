//! The Kubernetes store (`--store kube`): CA state in Secrets of citadel's namespace.
//!
//! - `citadel-ca-journal` (key `journal.json`): the journal, the source of truth. Every write
//!   is compare-and-swap on `resourceVersion`: creating it when it exists, or replacing a
//!   stale version, is a Conflict, so two replicas racing on an empty cluster end with ONE CA.
//! - `istio-ca-secret`: the active CA in Istio's self-signed layout (`ca-cert.pem`,
//!   `ca-key.pem`, `cert-chain.pem`, `root-cert.pem`), rewritten after each journal change
//!   for tools that read Istio's secret.
//! - The trust bundle and CRLs go to ConfigMaps in every namespace through [`Publisher`].

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;
use kube::api::{Api, PostParams};

use super::{Revision, Store, StoreError, Versioned};
use crate::future::BoxFuture;
use crate::journal::Journal;

/// Name of the Secret that holds the journal.
pub const JOURNAL_SECRET: &str = "citadel-ca-journal";
/// Name of the Secret written in Istio's self-signed CA layout.
pub const ISTIO_CA_SECRET: &str = "istio-ca-secret";
const JOURNAL_KEY: &str = "journal.json";

/// Where the bundle and CRLs are published (ConfigMaps in every namespace).
pub trait Publisher: Send + Sync {
    /// Publishes the bundle and/or the CRLs; `None` leaves that one unchanged.
    fn publish<'a>(
        &'a self,
        bundle_pem: Option<&'a str>,
        crl_pem: Option<&'a str>,
    ) -> BoxFuture<'a, Result<(), String>>;

    /// Publishes the JWT bundle (a JWK Set); the default publishes nowhere.
    fn publish_jwks<'a>(&'a self, jwks: &'a str) -> BoxFuture<'a, Result<(), String>> {
        let _ = jwks;
        Box::pin(std::future::ready(Ok(())))
    }
}

/// CA state in Secrets of one namespace, published through an optional [`Publisher`].
pub struct KubeStore {
    api: Api<Secret>,
    namespace: String,
    publisher: Option<Arc<dyn Publisher>>,
    /// Bytes of the journal as this replica last read or wrote it (0: not yet), for
    /// `citadel_ca_journal_bytes`: the Secret's 1 MiB is a hard limit worth alerting on.
    journal_bytes: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for KubeStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KubeStore({})", self.namespace)
    }
}

fn backend(what: &str, e: kube::Error) -> StoreError {
    StoreError::Corrupt {
        what: what.to_string(),
        reason: format!("Kubernetes API: {e}"),
    }
}

/// The most data a Secret may hold (the API server refuses more with a 422).
pub const SECRET_DATA_LIMIT: usize = 1024 * 1024;

/// The most bytes a write that adds revocations or denials may leave the journal Secret at:
/// 768 KiB of the 1 MiB a Secret holds. The 256 KiB above it are kept for what the CA itself
/// must always be able to write, whatever Revocations exist: a root rotation (a new root, an
/// intermediate, a cross-signed certificate and their CRLs: about 5 KiB with P-256 keys,
/// 15 KiB with RSA-4096), further intermediates, and CRLs re-signed with a longer CRL
/// number. docs/operations.md ("Limits, in numbers") says what fits under it.
pub const REVOCATION_CEILING: usize = 768 * 1024;

/// Refuses, before the API server does and with a message a person can act on, a journal too
/// large for one Secret. Revocation writes stop at [`REVOCATION_CEILING`] already, so only
/// the CA's own writes can come here, with room to spare.
pub fn check_size(bytes: usize, journal: &Journal) -> Result<(), StoreError> {
    if bytes <= SECRET_DATA_LIMIT {
        return Ok(());
    }
    Err(StoreError::TooLarge {
        what: format!("Secret {JOURNAL_SECRET}"),
        reason: format!(
            "the CA journal would be {bytes} bytes ({} unexpired revocations, {} denied \
             identities), over the {SECRET_DATA_LIMIT} bytes a Kubernetes Secret holds; nothing \
             was written. Revocations leave the journal when their certificates expire; until \
             then deny identities (one entry each) rather than revoking serials one by one",
            journal.revocations.len(),
            journal.denied.len()
        ),
    })
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

impl KubeStore {
    /// A store in `namespace`; without `publisher` the bundle and CRLs are not published.
    pub fn new(
        client: kube::Client,
        namespace: &str,
        publisher: Option<Arc<dyn Publisher>>,
    ) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            namespace: namespace.to_string(),
            publisher,
            journal_bytes: Default::default(),
        }
    }

    /// Writes Istio's `istio-ca-secret` layout for the active CA (best effort, derived).
    async fn mirror_istio_secret(&self, j: &Journal) {
        let (Some(int), Some(root)) = (j.active_signer(), j.active_root()) else {
            return;
        };
        let roots: String = j.trusted_roots().map(|r| r.cert_pem.as_str()).collect();
        let data: BTreeMap<String, ByteString> = [
            ("ca-cert.pem", int.cert_pem.clone()),
            ("ca-key.pem", int.key_pem.expose().to_string()),
            (
                "cert-chain.pem",
                format!("{}{}", int.cert_pem, root.cert_pem),
            ),
            ("root-cert.pem", roots),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), ByteString(v.into_bytes())))
        .collect();
        let mut s = Secret {
            data: Some(data),
            type_: Some("istio.io/ca-root".into()),
            ..Default::default()
        };
        s.metadata.name = Some(ISTIO_CA_SECRET.into());
        let result = match self.api.get_opt(ISTIO_CA_SECRET).await {
            Ok(Some(cur)) => {
                if cur.data == s.data {
                    return;
                }
                s.metadata.resource_version = cur.metadata.resource_version;
                self.api
                    .replace(ISTIO_CA_SECRET, &PostParams::default(), &s)
                    .await
                    .map(|_| ())
            }
            Ok(None) => self
                .api
                .create(&PostParams::default(), &s)
                .await
                .map(|_| ()),
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, "could not update istio-ca-secret (the journal is the source of truth)");
        }
    }
}

/// Decodes the journal Secret as the API server returned it. Separate from the API call so the
/// fuzzer (fuzz/fuzz_targets/journal_secret.rs) reaches exactly the code a replica runs.
pub fn decode_journal_secret(
    namespace: &str,
    secret: &Secret,
) -> Result<Versioned<Journal>, StoreError> {
    let what = || format!("Secret {namespace}/{JOURNAL_SECRET}");
    let rv = secret.metadata.resource_version.clone().unwrap_or_default();
    let bytes = secret
        .data
        .as_ref()
        .and_then(|d| d.get(JOURNAL_KEY))
        .ok_or_else(|| StoreError::Corrupt {
            what: what(),
            reason: format!("no {JOURNAL_KEY} key"),
        })?;
    // serde_json errors carry a line and column, never the content (it holds keys).
    let journal: Journal = serde_json::from_slice(&bytes.0).map_err(|e| StoreError::Corrupt {
        what: what(),
        reason: e.to_string(),
    })?;
    journal
        .check_format()
        .map_err(|reason| StoreError::Corrupt {
            what: what(),
            reason,
        })?;
    Ok(Versioned {
        value: journal,
        revision: Revision(rv),
    })
}

impl Store for KubeStore {
    fn describe(&self) -> String {
        format!("kube:{}/{JOURNAL_SECRET}", self.namespace)
    }

    fn load_journal(&self) -> BoxFuture<'_, Result<Option<Versioned<Journal>>, StoreError>> {
        Box::pin(async move {
            let Some(secret) = self
                .api
                .get_opt(JOURNAL_SECRET)
                .await
                .map_err(|e| backend(JOURNAL_SECRET, e))?
            else {
                return Ok(None);
            };
            let size = secret
                .data
                .as_ref()
                .and_then(|d| d.get(JOURNAL_KEY))
                .map_or(0, |b| b.0.len());
            let journal = decode_journal_secret(&self.namespace, &secret)?;
            self.journal_bytes
                .store(size as u64, std::sync::atomic::Ordering::Relaxed);
            Ok(Some(journal))
        })
    }

    fn save_journal<'a>(
        &'a self,
        journal: &'a Journal,
        expected: Option<&'a Revision>,
    ) -> BoxFuture<'a, Result<Revision, StoreError>> {
        Box::pin(async move {
            let body = serde_json::to_vec(journal).map_err(|e| StoreError::Corrupt {
                what: "journal".into(),
                reason: e.to_string(),
            })?;
            check_size(body.len(), journal)?;
            let size = body.len() as u64;
            let mut s = Secret {
                data: Some([(JOURNAL_KEY.to_string(), ByteString(body))].into()),
                type_: Some("Opaque".into()),
                ..Default::default()
            };
            s.metadata.name = Some(JOURNAL_SECRET.into());
            s.metadata.labels = Some(
                [(
                    "app.kubernetes.io/managed-by".to_string(),
                    "citadel".to_string(),
                )]
                .into(),
            );
            let result = match expected {
                None => self.api.create(&PostParams::default(), &s).await,
                Some(rv) => {
                    s.metadata.resource_version = Some(rv.0.clone());
                    self.api
                        .replace(JOURNAL_SECRET, &PostParams::default(), &s)
                        .await
                }
            };
            match result {
                Ok(saved) => {
                    self.journal_bytes
                        .store(size, std::sync::atomic::Ordering::Relaxed);
                    self.mirror_istio_secret(journal).await;
                    Ok(Revision(
                        saved.metadata.resource_version.unwrap_or_default(),
                    ))
                }
                Err(e) if is_conflict(&e) || (expected.is_some() && is_not_found(&e)) => {
                    Err(StoreError::Conflict)
                }
                Err(e) => Err(backend(JOURNAL_SECRET, e)),
            }
        })
    }

    fn publish_bundle<'a>(&'a self, roots_pem: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            match &self.publisher {
                Some(p) => {
                    p.publish(Some(roots_pem), None)
                        .await
                        .map_err(|e| StoreError::Corrupt {
                            what: "trust bundle ConfigMaps".into(),
                            reason: e,
                        })
                }
                None => Ok(()),
            }
        })
    }

    fn revocation_ceiling(&self) -> Option<usize> {
        Some(REVOCATION_CEILING)
    }

    fn journal_size(&self) -> Option<(u64, usize)> {
        let bytes = self
            .journal_bytes
            .load(std::sync::atomic::Ordering::Relaxed);
        (bytes > 0).then_some((bytes, SECRET_DATA_LIMIT))
    }

    fn publish_jwks<'a>(&'a self, jwks: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            match &self.publisher {
                Some(p) => p.publish_jwks(jwks).await.map_err(|e| StoreError::Corrupt {
                    what: "JWT bundle ConfigMap".into(),
                    reason: e,
                }),
                None => Ok(()),
            }
        })
    }

    fn publish_crl<'a>(&'a self, crl_pem: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            match &self.publisher {
                Some(p) => p
                    .publish(None, Some(crl_pem))
                    .await
                    .map_err(|e| StoreError::Corrupt {
                        what: "CRL ConfigMaps".into(),
                        reason: e,
                    }),
                None => Ok(()),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_journal_too_large_for_a_secret_is_refused_with_what_fills_it() {
        let j = Journal::new("cluster.local");
        assert!(check_size(SECRET_DATA_LIMIT, &j).is_ok());
        let e = check_size(SECRET_DATA_LIMIT + 1, &j).unwrap_err();
        assert!(matches!(e, StoreError::TooLarge { .. }));
        let msg = e.to_string();
        assert!(msg.contains("1048577 bytes"), "{msg}");
        assert!(msg.contains("0 unexpired revocations"), "{msg}");
        assert!(msg.contains("nothing was written"), "{msg}");
    }
}
