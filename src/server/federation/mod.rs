//! SPIFFE federation: this trust domain's bundle endpoint (`endpoint`), and the fetcher
//! that follows other trust domains' endpoints (`fetch`, scheduled by the pure `schedule`).
//!
//! Foreign bundles are kept per trust domain in [`FederatedBundles`] and never merged into
//! our own trust bundle: whoever hands them out (the agent's Workload API, SDS) decides per
//! trust domain what to do with them.

pub mod endpoint;
pub mod fetch;
pub mod schedule;
pub mod service;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::watch;

use crate::identity::{SpiffeId, TrustDomain};
use crate::pki::spiffe_bundle::SpiffeBundle;

/// `--bundle-endpoint` and `--federate-with`: what `citadel serve` serves and follows.
#[derive(Debug, Clone, Default)]
pub struct FederationConfig {
    /// Serve our bundle here; `None` serves no endpoint.
    pub endpoint: Option<EndpointConfig>,
    /// Foreign trust domains to follow.
    pub peers: Vec<Peer>,
}

/// Our bundle endpoint.
#[derive(Debug, Clone)]
pub struct EndpointConfig {
    /// The address to listen on.
    pub listen: SocketAddr,
    /// How it authenticates itself to clients.
    pub profile: EndpointProfile,
}

/// The endpoint's TLS profile (SPIFFE Federation, section 5).
#[derive(Debug, Clone)]
pub enum EndpointProfile {
    /// `https_spiffe`: an X.509-SVID of this trust domain for `id`, issued by our CA and
    /// renewed at half-life and whenever the CA changes.
    Spiffe {
        /// The endpoint's SPIFFE ID, which federated clients are configured with.
        id: SpiffeId,
    },
    /// `https_web`: a certificate and key the operator gives (a public CA's), read at start.
    Web {
        /// PEM chain, leaf first.
        cert: PathBuf,
        /// PEM private key (PKCS#8, SEC1 or PKCS#1).
        key: PathBuf,
    },
}

/// A foreign trust domain we follow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// Its trust domain: the bundle is filed under it, whatever the document holds.
    pub trust_domain: TrustDomain,
    /// The endpoint URL (`https://host[:port]/path`).
    pub url: String,
    /// How we authenticate the endpoint.
    pub profile: PeerProfile,
}

/// How the fetcher authenticates a foreign endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerProfile {
    /// `https_spiffe`: the endpoint must present an X.509-SVID for `endpoint_id`, verified
    /// against the last bundle we hold for the endpoint's trust domain (at first, the
    /// bootstrap bundle).
    Spiffe {
        /// The endpoint's SPIFFE ID.
        endpoint_id: SpiffeId,
        /// PEM roots or a SPIFFE bundle document of the endpoint's trust domain; needed
        /// only until a bundle has been fetched (it is then kept in the state directory).
        bootstrap: Option<PathBuf>,
    },
    /// `https_web`: ordinary web PKI against the roots in `roots` (PEM), host name checked.
    Web {
        /// The root CAs to trust for the endpoint's certificate.
        roots: PathBuf,
    },
}

impl Peer {
    /// Parses `TD=URL[,SPIFFE_ID]` (`--federate-with`). With a SPIFFE ID the profile is
    /// `https_spiffe` (its bootstrap bundle comes from `bootstrap`), without one `https_web`
    /// (its roots from `web_roots`).
    pub fn parse(
        s: &str,
        bootstrap: &BTreeMap<String, PathBuf>,
        web_roots: Option<&PathBuf>,
    ) -> Result<Self, String> {
        let usage = "expected TD=URL[,SPIFFE_ID], e.g. b.example=https://bundle.b.example:8443/,spiffe://b.example/citadel/bundle-endpoint";
        let (td, rest) = s
            .split_once('=')
            .ok_or_else(|| format!("--federate-with {s:?}: {usage}"))?;
        let trust_domain =
            TrustDomain::new(td).map_err(|e| format!("--federate-with {s:?}: {e}"))?;
        let (url, id) = match rest.split_once(',') {
            Some((u, id)) => (u, Some(id)),
            None => (rest, None),
        };
        let uri: http::Uri = url
            .parse()
            .map_err(|e| format!("--federate-with {s:?}: bad URL: {e}"))?;
        if uri.scheme_str() != Some("https") || uri.host().is_none() {
            return Err(format!(
                "--federate-with {s:?}: the URL must be https://host[:port]/path (both profiles are HTTPS)"
            ));
        }
        let profile = match id {
            Some(id) => PeerProfile::Spiffe {
                endpoint_id: SpiffeId::parse(id)
                    .map_err(|e| format!("--federate-with {s:?}: endpoint SPIFFE ID: {e}"))?,
                bootstrap: bootstrap.get(trust_domain.as_str()).cloned(),
            },
            None => PeerProfile::Web {
                roots: web_roots.cloned().ok_or_else(|| {
                    format!("--federate-with {s:?} uses https_web (no SPIFFE ID): give --federation-web-roots FILE")
                })?,
            },
        };
        Ok(Self {
            trust_domain,
            url: url.to_string(),
            profile,
        })
    }
}

/// The foreign bundles held now, by trust domain. Each is the last good one fetched.
#[derive(Debug, Clone)]
pub struct FederatedBundles {
    tx: Arc<watch::Sender<BTreeMap<String, Arc<SpiffeBundle>>>>,
}

impl Default for FederatedBundles {
    fn default() -> Self {
        Self {
            tx: Arc::new(watch::channel(BTreeMap::new()).0),
        }
    }
}

impl FederatedBundles {
    /// Every bundle held now.
    pub fn current(&self) -> BTreeMap<String, Arc<SpiffeBundle>> {
        self.tx.borrow().clone()
    }

    /// Follows changes.
    pub fn subscribe(&self) -> watch::Receiver<BTreeMap<String, Arc<SpiffeBundle>>> {
        self.tx.subscribe()
    }

    /// Replaces the bundle of `b.trust_domain`; tells subscribers only if it changed.
    pub fn set(&self, b: SpiffeBundle) {
        self.tx.send_if_modified(|m| {
            let key = b.trust_domain.as_str().to_string();
            if m.get(&key).is_some_and(|old| **old == b) {
                return false;
            }
            m.insert(key, Arc::new(b));
            true
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn federate_with_syntax() {
        let mut boot = BTreeMap::new();
        boot.insert("b.test".to_string(), PathBuf::from("/b.pem"));
        let p = Peer::parse(
            "b.test=https://127.0.0.1:8443/,spiffe://b.test/citadel/bundle-endpoint",
            &boot,
            None,
        )
        .unwrap();
        assert_eq!(p.trust_domain.as_str(), "b.test");
        assert_eq!(p.url, "https://127.0.0.1:8443/");
        assert!(
            matches!(&p.profile, PeerProfile::Spiffe { endpoint_id, bootstrap: Some(b) }
            if endpoint_id.to_string() == "spiffe://b.test/citadel/bundle-endpoint" && b == &PathBuf::from("/b.pem"))
        );
        let roots = PathBuf::from("/roots.pem");
        let w = Peer::parse("c.test=https://bundle.c.test/", &boot, Some(&roots)).unwrap();
        assert_eq!(w.profile, PeerProfile::Web { roots });
        for bad in [
            "b.test",
            "B.TEST=https://x/",
            "b.test=http://x/",
            "b.test=https://x/,not-a-spiffe-id",
            "c.test=https://x/",
        ] {
            assert!(Peer::parse(bad, &boot, None).is_err(), "{bad}");
        }
    }

    #[test]
    fn set_notifies_only_on_change() {
        let f = FederatedBundles::default();
        let mut rx = f.subscribe();
        let b = SpiffeBundle {
            trust_domain: TrustDomain::new("b.test").unwrap(),
            x509_authorities: vec![],
            jwt_keys: vec![],
            sequence: Some(1),
            refresh_hint: None,
        };
        f.set(b.clone());
        assert!(rx.has_changed().unwrap());
        rx.borrow_and_update();
        f.set(b.clone());
        assert!(!rx.has_changed().unwrap());
        f.set(SpiffeBundle {
            sequence: Some(2),
            ..b
        });
        assert!(rx.has_changed().unwrap());
        assert_eq!(f.current()["b.test"].sequence, Some(2));
    }
}
