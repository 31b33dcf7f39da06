//! Workload identity: trust domains, SPIFFE IDs and Kubernetes service accounts.
//!
//! Pure values with strict parsing. The rules follow the SPIFFE ID specification: a trust
//! domain is lowercase `[a-z0-9._-]`, a path is `/`-separated segments of `[A-Za-z0-9._-]`
//! with no empty, `.` or `..` segment. Unlike the `spiffe` crate we *reject* an uppercase
//! trust domain instead of lowercasing it: silently rewriting an identity is how two
//! workloads end up with one name.

use std::fmt;

/// Longest SPIFFE ID URI the spec allows.
const MAX_ID_LEN: usize = 2048;
const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// A string that is not a valid identity; the text names the rule it broke.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// Not lowercase `[a-z0-9._-]`, empty, or over 255 characters.
    #[error("trust domain {0:?} is invalid: use lowercase letters, digits, '.', '-' and '_' (at most 255 characters)")]
    TrustDomain(String),
    /// Not a valid SPIFFE ID URI.
    #[error("SPIFFE ID {id:?} is invalid: {reason}")]
    SpiffeId {
        /// The refused input (at most 120 characters).
        id: String,
        /// Which rule it broke.
        reason: &'static str,
    },
    /// A namespace or service-account name Kubernetes would not accept.
    #[error("{what} {value:?} is not a valid Kubernetes name")]
    KubeName {
        /// `namespace` or `service account`.
        what: &'static str,
        /// The refused name.
        value: String,
    },
    /// A token subject not of the form `system:serviceaccount:<ns>:<sa>`.
    #[error("subject {0:?} is not of the form system:serviceaccount:<namespace>:<name>")]
    Subject(String),
}

/// A SPIFFE trust domain such as `cluster.local`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Checks the SPIFFE rules; an uppercase trust domain is rejected, not lowercased.
    pub fn new(s: &str) -> Result<Self, IdentityError> {
        let ok = !s.is_empty()
            && s.len() <= MAX_TRUST_DOMAIN_LEN
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
        if ok {
            Ok(Self(s.to_string()))
        } else {
            Err(IdentityError::TrustDomain(s.to_string()))
        }
    }

    /// The trust domain as written, e.g. `cluster.local`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The Istio identity of a Kubernetes service account in this trust domain.
    pub fn service_account_id(&self, sa: &ServiceAccount) -> SpiffeId {
        SpiffeId {
            trust_domain: self.clone(),
            path: format!("/ns/{}/sa/{}", sa.namespace, sa.name),
        }
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for TrustDomain {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

/// `spiffe://<trust-domain><path>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: TrustDomain,
    path: String,
}

impl SpiffeId {
    /// Parses `spiffe://<trust-domain><path>` strictly per the SPIFFE ID specification.
    pub fn parse(s: &str) -> Result<Self, IdentityError> {
        let bad = |reason| IdentityError::SpiffeId {
            id: s.chars().take(120).collect(),
            reason,
        };
        if s.len() > MAX_ID_LEN {
            return Err(bad("longer than 2048 bytes"));
        }
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| bad("scheme must be spiffe://"))?;
        let (td, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if td.is_empty() {
            return Err(bad("trust domain is empty"));
        }
        let trust_domain = TrustDomain::new(td)
            .map_err(|_| bad("trust domain must be lowercase letters, digits, '.', '-' and '_'"))?;
        if !path.is_empty() {
            for seg in path[1..].split('/') {
                if seg.is_empty() {
                    return Err(bad("path has an empty segment or a trailing '/'"));
                }
                if seg == "." || seg == ".." {
                    return Err(bad("path segments '.' and '..' are not allowed"));
                }
                if !seg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
                {
                    return Err(bad("path may hold only letters, digits, '.', '-' and '_'"));
                }
            }
        }
        Ok(Self {
            trust_domain,
            path: path.to_string(),
        })
    }

    /// The trust domain part.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The path, starting with `/`; empty for a trust domain's own ID.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The service account for Istio-shaped IDs (`/ns/<ns>/sa/<sa>`), if this is one.
    pub fn service_account(&self) -> Option<ServiceAccount> {
        let mut parts = self.path.strip_prefix('/')?.split('/');
        match (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) {
            (Some("ns"), Some(ns), Some("sa"), Some(sa), None) => ServiceAccount::new(ns, sa).ok(),
            _ => None,
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}{}", self.trust_domain, self.path)
    }
}

impl std::str::FromStr for SpiffeId {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// A Kubernetes service account, `<namespace>/<name>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServiceAccount {
    /// A DNS label (RFC 1123), as Kubernetes requires of namespaces.
    pub namespace: String,
    /// A DNS subdomain (RFC 1123), as Kubernetes requires of service-account names.
    pub name: String,
}

impl ServiceAccount {
    /// Checks both names against Kubernetes' naming rules.
    pub fn new(namespace: &str, name: &str) -> Result<Self, IdentityError> {
        // Namespaces are DNS labels; service-account names are DNS subdomains.
        if !is_dns_label(namespace) {
            return Err(IdentityError::KubeName {
                what: "namespace",
                value: namespace.to_string(),
            });
        }
        if name.is_empty() || name.len() > 253 || !name.split('.').all(is_dns_label) {
            return Err(IdentityError::KubeName {
                what: "service account",
                value: name.to_string(),
            });
        }
        Ok(Self {
            namespace: namespace.to_string(),
            name: name.to_string(),
        })
    }

    /// Parses a Kubernetes username such as `system:serviceaccount:default:httpbin`.
    pub fn from_username(subject: &str) -> Result<Self, IdentityError> {
        let bad = || IdentityError::Subject(subject.chars().take(200).collect());
        let rest = subject
            .strip_prefix("system:serviceaccount:")
            .ok_or_else(bad)?;
        let (ns, sa) = rest.split_once(':').ok_or_else(bad)?;
        Self::new(ns, sa).map_err(|_| bad())
    }
}

/// Linkerd's DNS-form identities under one control plane: a workload of service account
/// `<sa>` in `<ns>` is `<sa>.<ns>.serviceaccount.identity.<control-plane-ns>.<domain>`, and the
/// identity service itself is `linkerd-identity` in the control-plane namespace. Linkerd's
/// proxies ask for, and check their peers by, these names (not SPIFFE IDs), so the issue path
/// derives the DNS SAN from the authenticated service account with this type; it never
/// copies one a caller sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkerdNames {
    control_plane_ns: String,
    domain: String,
}

/// The longest DNS name (RFC 1035 presentation form without the final dot).
const MAX_DNS_NAME: usize = 253;

impl LinkerdNames {
    /// Names under `domain` (Linkerd's `identityTrustDomain`, e.g. `cluster.local`) for the
    /// control plane in `control_plane_ns` (Linkerd's default is `linkerd`).
    pub fn new(control_plane_ns: &str, domain: &str) -> Result<Self, IdentityError> {
        if !is_dns_label(control_plane_ns) {
            return Err(IdentityError::KubeName {
                what: "namespace",
                value: control_plane_ns.to_string(),
            });
        }
        let domain = domain.strip_suffix('.').unwrap_or(domain);
        if domain.is_empty() || domain.len() > 200 || !domain.split('.').all(is_dns_label) {
            return Err(IdentityError::KubeName {
                what: "Linkerd identity domain",
                value: domain.to_string(),
            });
        }
        Ok(Self {
            control_plane_ns: control_plane_ns.to_string(),
            domain: domain.to_string(),
        })
    }

    /// The control plane's namespace (where the trust anchors ConfigMap lives).
    pub fn control_plane_ns(&self) -> &str {
        &self.control_plane_ns
    }

    /// The identity domain.
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// The DNS-form identity of `sa`, or `None` when it would be longer than a DNS name may
    /// be (a 253-character service-account name): such an account has no Linkerd identity.
    pub fn identity_of(&self, sa: &ServiceAccount) -> Option<String> {
        let name = format!(
            "{}.{}.serviceaccount.identity.{}.{}",
            sa.name, sa.namespace, self.control_plane_ns, self.domain
        );
        (name.len() <= MAX_DNS_NAME).then_some(name)
    }

    /// The identity service's own TLS name, which proxies expect of the CA port
    /// (`LINKERD2_PROXY_IDENTITY_SVC_NAME`): service account `linkerd-identity` of the
    /// control-plane namespace.
    pub fn service_name(&self) -> String {
        format!(
            "linkerd-identity.{ns}.serviceaccount.identity.{ns}.{}",
            self.domain,
            ns = self.control_plane_ns
        )
    }
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trust_domain_rules() {
        assert!(TrustDomain::new("cluster.local").is_ok());
        assert!(TrustDomain::new("prod_1-a.example").is_ok());
        for bad in ["", "Cluster.local", "a b", "a/b", "td:80", &"a".repeat(256)] {
            assert!(TrustDomain::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn spiffe_id_parses_and_displays() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/cart").unwrap();
        assert_eq!(id.trust_domain().as_str(), "cluster.local");
        assert_eq!(id.path(), "/ns/shop/sa/cart");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/cart");
        let sa = id.service_account().unwrap();
        assert_eq!((sa.namespace.as_str(), sa.name.as_str()), ("shop", "cart"));
        assert!(SpiffeId::parse("spiffe://td")
            .unwrap()
            .service_account()
            .is_none());
        assert!(SpiffeId::parse("spiffe://td/workload/x")
            .unwrap()
            .service_account()
            .is_none());
    }

    #[test]
    fn spiffe_id_rejects_bad_forms() {
        for bad in [
            "http://cluster.local/ns/a/sa/b",
            "spiffe://",
            "spiffe:///ns/a",
            "spiffe://Cluster.Local/ns/a/sa/b",
            "spiffe://td/ns//sa/b",
            "spiffe://td/ns/a/sa/b/",
            "spiffe://td/ns/../sa/b",
            "spiffe://td/ns/a b/sa/b",
            "spiffe://td/ns/a?x=1",
            "spiffe://user@td/ns/a",
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "{bad:?} should be rejected");
        }
        assert!(SpiffeId::parse(&format!("spiffe://td/{}", "a".repeat(2100))).is_err());
    }

    #[test]
    fn service_account_from_username() {
        let sa = ServiceAccount::from_username("system:serviceaccount:default:httpbin").unwrap();
        assert_eq!(sa.namespace, "default");
        assert_eq!(sa.name, "httpbin");
        for bad in [
            "system:serviceaccount:default",
            "system:serviceaccounts:default:x",
            "system:serviceaccount:Default:x",
            "system:serviceaccount:ns:x:y",
            "system:serviceaccount::x",
            "admin",
        ] {
            assert!(ServiceAccount::from_username(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn service_account_id_shape() {
        let td = TrustDomain::new("cluster.local").unwrap();
        let sa = ServiceAccount::new("shop", "frontend").unwrap();
        assert_eq!(
            td.service_account_id(&sa).to_string(),
            "spiffe://cluster.local/ns/shop/sa/frontend"
        );
    }

    #[test]
    fn linkerd_names_follow_linkerds_form() {
        let n = LinkerdNames::new("linkerd", "cluster.local").unwrap();
        let sa = ServiceAccount::new("shop", "cart").unwrap();
        assert_eq!(
            n.identity_of(&sa).unwrap(),
            "cart.shop.serviceaccount.identity.linkerd.cluster.local"
        );
        assert_eq!(
            n.service_name(),
            "linkerd-identity.linkerd.serviceaccount.identity.linkerd.cluster.local"
        );
        // A trailing dot is the same domain; bad namespaces and domains are refused.
        assert_eq!(LinkerdNames::new("linkerd", "cluster.local.").unwrap(), n);
        for (ns, d) in [
            ("Linkerd", "cluster.local"),
            ("linkerd", ""),
            ("linkerd", "a..b"),
            ("linkerd", "UP.local"),
            ("linkerd", "a b"),
        ] {
            assert!(LinkerdNames::new(ns, d).is_err(), "{ns:?} {d:?}");
        }
        // A name too long for DNS gets no identity rather than a truncated one.
        let long_name = format!("{}.{}", vec!["a".repeat(63); 3].join("."), "b".repeat(50));
        let long = ServiceAccount::new("shop", &long_name).unwrap();
        assert_eq!(n.identity_of(&long), None);
    }
}
