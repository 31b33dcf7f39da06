//! Decoding a CertificateSigningRequest and checking it: where it stands (approved, denied,
//! decided), and whether its requester may have a certificate for the identity it names,
//! under our usages and lifetime. Pure: no API call, so every rule is tested here, and a
//! refusal costs nothing but a parse.

use std::time::Duration;

use k8s_openapi::api::certificates::v1::CertificateSigningRequest;

use super::status::{self, approved, denied, is_decided, reason, refuse, Refusal};
use super::MIN_EXPIRATION_SECS;
use crate::auth::issue_path::IssueError;
use crate::identity::{ServiceAccount, SpiffeId, TrustDomain};
use crate::pki::csr;

/// The usages our workload leaf carries (key usage digitalSignature and keyEncipherment, EKU
/// serverAuth and clientAuth), as `spec.usages` spells them. A CSR may ask for any of them;
/// one asking for anything else is refused: we never issue what was not asked for under a
/// name it did not choose, nor pretend to issue what it asked for.
pub const ALLOWED_USAGES: [&str; 4] = [
    "digital signature",
    "key encipherment",
    "server auth",
    "client auth",
];

/// The group every service account's credentials carry.
const SERVICE_ACCOUNTS_GROUP: &str = "system:serviceaccounts";

/// Where a CSR of our signer stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CsrState {
    /// It has a certificate, or is Denied or Failed: nothing to do, ever.
    Decided,
    /// Nobody approved it yet.
    AwaitingApproval,
    /// Approved and not yet answered: ours to sign or fail.
    Approved,
}

/// Where `csr` stands. Denied wins over everything (a CSR that is both approved and denied is
/// never signed).
pub fn state(csr: &CertificateSigningRequest) -> CsrState {
    if is_decided(csr) || denied(csr) {
        CsrState::Decided
    } else if approved(csr) {
        CsrState::Approved
    } else {
        CsrState::AwaitingApproval
    }
}

/// What a CSR is checked against.
#[derive(Debug, Clone, Copy)]
pub struct Rules<'a> {
    /// Identities are SPIFFE IDs of this trust domain only.
    pub trust_domain: &'a TrustDomain,
    /// Requesters that may ask for any identity of the trust domain (istiod).
    pub istiod_requesters: &'a [String],
    /// `--max-ttl`: a longer `expirationSeconds` is cut to it.
    pub max_ttl: Duration,
}

/// A CSR that passed every check: what the issue path signs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    /// The identity the certificate will carry (the CSR's one URI SAN).
    pub identity: SpiffeId,
    /// Seconds asked for, capped at `--max-ttl` (0: the default TTL).
    pub ttl_secs: i64,
    /// `spec.username`, for the audit line.
    pub requester: String,
}

/// Checks `csr` against `rules`, cheap checks first: usages, lifetime, the PEM request, its one
/// URI SAN, and whether the requester may ask for that identity.
pub fn check(rules: Rules<'_>, csr: &CertificateSigningRequest) -> Result<Checked, Refusal> {
    let spec = &csr.spec;
    let usages = spec.usages.as_deref().unwrap_or_default();
    if usages.is_empty() {
        return Err(refuse(reason::UNSUPPORTED_USAGE, "spec.usages is empty"));
    }
    if let Some(u) = usages
        .iter()
        .find(|u| !ALLOWED_USAGES.contains(&u.as_str()))
    {
        return Err(refuse(
            reason::UNSUPPORTED_USAGE,
            format!(
                "citadel issues SPIFFE SVIDs with the usages {ALLOWED_USAGES:?} only, not {}",
                crate::audit::shown(u)
            ),
        ));
    }
    let ttl_secs = match spec.expiration_seconds {
        None => 0,
        Some(s) if (s as i64) < MIN_EXPIRATION_SECS as i64 => {
            return Err(refuse(
                reason::INVALID_EXPIRATION,
                format!("spec.expirationSeconds {s} is below the minimum of {MIN_EXPIRATION_SECS}"),
            ))
        }
        // Kubernetes lets a signer issue shorter than asked: cap at our maximum.
        Some(s) => (s as u64).min(rules.max_ttl.as_secs()) as i64,
    };
    let parsed = match csr::parse_pem(&spec.request.0) {
        Ok(p) => p,
        // Worded by the surface's one mapping, as the issue path's CSR errors are.
        Err(e) => {
            return Err(status::refusal(IssueError::Csr(e), "")
                .unwrap_or_else(|r| refuse(reason::INVALID_REQUEST, r.0)))
        }
    };
    let [uri] = parsed.uri_sans.as_slice() else {
        return Err(refuse(
            reason::INVALID_REQUEST,
            format!(
                "the request must carry exactly one URI SAN (a SPIFFE ID); it has {}",
                parsed.uri_sans.len()
            ),
        ));
    };
    let identity = SpiffeId::parse(uri).map_err(|e| {
        refuse(
            reason::INVALID_IDENTITY,
            format!("{} is no SPIFFE ID: {e}", crate::audit::shown(uri)),
        )
    })?;
    if identity.trust_domain() != rules.trust_domain {
        return Err(refuse(
            reason::INVALID_IDENTITY,
            format!(
                "{identity} is not in the trust domain {}",
                rules.trust_domain
            ),
        ));
    }
    let requester = spec.username.clone().unwrap_or_default();
    if !may_request(rules, csr, &requester, &identity) {
        return Err(refuse(
            reason::REQUESTER_NOT_ALLOWED,
            format!(
                "{} may not obtain a certificate for {identity}: a service account may ask for \
                 its own identity only, istiod's (--csr-istiod-requester) for any",
                crate::audit::shown(&requester)
            ),
        ));
    }
    Ok(Checked {
        identity,
        ttl_secs,
        requester,
    })
}

/// istiod's service account may ask for any identity (it authenticated the proxy it asks for);
/// another service account for its own identity only (the API server vouches for
/// `spec.username` and `spec.groups`); anyone else for nothing.
fn may_request(
    rules: Rules<'_>,
    csr: &CertificateSigningRequest,
    requester: &str,
    identity: &SpiffeId,
) -> bool {
    if rules.istiod_requesters.iter().any(|r| r == requester) {
        return true;
    }
    let is_sa = csr
        .spec
        .groups
        .iter()
        .flatten()
        .any(|g| g == SERVICE_ACCOUNTS_GROUP);
    match ServiceAccount::from_username(requester) {
        Ok(sa) if is_sa => rules.trust_domain.service_account_id(&sa) == *identity,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::KeyType;

    const ISTIOD: &str = "system:serviceaccount:istio-system:istiod";

    fn td() -> TrustDomain {
        TrustDomain::new("cluster.local").unwrap()
    }

    fn pem_for(uris: &[&str]) -> String {
        let key = KeyType::EcP256.generate().unwrap();
        let mut p = rcgen::CertificateParams::default();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.subject_alt_names = uris
            .iter()
            .map(|u| rcgen::SanType::URI(rcgen::string::Ia5String::try_from(*u).unwrap()))
            .collect();
        p.serialize_request(&key).unwrap().pem().unwrap()
    }

    fn csr(
        pem: &str,
        user: &str,
        groups: &[&str],
        usages: &[&str],
        exp: Option<i32>,
    ) -> CertificateSigningRequest {
        use base64::Engine;
        let mut spec = serde_json::json!({
            "signerName": "citadel.dev/spiffe",
            "request": base64::engine::general_purpose::STANDARD.encode(pem),
            "usages": usages, "username": user, "groups": groups,
        });
        if let Some(e) = exp {
            spec["expirationSeconds"] = e.into();
        }
        serde_json::from_value(serde_json::json!({"metadata": {"name": "c"}, "spec": spec}))
            .unwrap()
    }

    const ALL: [&str; 4] = ALLOWED_USAGES;
    const SA_GROUPS: [&str; 3] = [
        "system:serviceaccounts",
        "system:serviceaccounts:shop",
        "system:authenticated",
    ];

    fn run(c: &CertificateSigningRequest) -> Result<Checked, &'static str> {
        let reqs = vec![ISTIOD.to_string()];
        let td = td();
        check(
            Rules {
                trust_domain: &td,
                istiod_requesters: &reqs,
                max_ttl: Duration::from_secs(86_400),
            },
            c,
        )
        .map_err(|r| r.reason)
    }

    #[test]
    fn istiod_may_ask_for_any_identity_of_the_trust_domain() {
        let pem = pem_for(&["spiffe://cluster.local/ns/shop/sa/cart"]);
        let ok = run(&csr(&pem, ISTIOD, &SA_GROUPS, &ALL, Some(3600))).unwrap();
        assert_eq!(
            ok.identity.to_string(),
            "spiffe://cluster.local/ns/shop/sa/cart"
        );
        assert_eq!((ok.ttl_secs, ok.requester.as_str()), (3600, ISTIOD));
        // Default lifetime when none is asked; capped at the maximum when more is.
        assert_eq!(
            run(&csr(&pem, ISTIOD, &SA_GROUPS, &["client auth"], None))
                .unwrap()
                .ttl_secs,
            0
        );
        assert_eq!(
            run(&csr(&pem, ISTIOD, &SA_GROUPS, &ALL, Some(90 * 86_400)))
                .unwrap()
                .ttl_secs,
            86_400
        );
        // Not another trust domain, not a non-SPIFFE URI.
        let other = pem_for(&["spiffe://evil.example/ns/shop/sa/cart"]);
        assert_eq!(
            run(&csr(&other, ISTIOD, &SA_GROUPS, &ALL, None)),
            Err(reason::INVALID_IDENTITY)
        );
        let http = pem_for(&["https://cluster.local/x"]);
        assert_eq!(
            run(&csr(&http, ISTIOD, &SA_GROUPS, &ALL, None)),
            Err(reason::INVALID_IDENTITY)
        );
    }

    #[test]
    fn another_service_account_gets_its_own_identity_only() {
        let own = pem_for(&["spiffe://cluster.local/ns/shop/sa/cart"]);
        let me = "system:serviceaccount:shop:cart";
        assert!(run(&csr(&own, me, &SA_GROUPS, &ALL, None)).is_ok());
        let theirs = pem_for(&["spiffe://cluster.local/ns/shop/sa/payments"]);
        assert_eq!(
            run(&csr(&theirs, me, &SA_GROUPS, &ALL, None)),
            Err(reason::REQUESTER_NOT_ALLOWED)
        );
        // A username shaped like a service account without the group the API server adds to
        // service-account credentials (a client certificate with that CN, say) counts as
        // nobody; so does a user.
        assert_eq!(
            run(&csr(&own, me, &["system:authenticated"], &ALL, None)),
            Err(reason::REQUESTER_NOT_ALLOWED)
        );
        assert_eq!(
            run(&csr(&own, "alice", &["system:authenticated"], &ALL, None)),
            Err(reason::REQUESTER_NOT_ALLOWED)
        );
    }

    #[test]
    fn bad_requests_are_refused_with_their_reason() {
        let ok = pem_for(&["spiffe://cluster.local/ns/shop/sa/cart"]);
        assert_eq!(
            run(&csr(
                &ok,
                ISTIOD,
                &SA_GROUPS,
                &["client auth", "code signing"],
                None
            )),
            Err(reason::UNSUPPORTED_USAGE)
        );
        assert_eq!(
            run(&csr(&ok, ISTIOD, &SA_GROUPS, &[], None)),
            Err(reason::UNSUPPORTED_USAGE)
        );
        assert_eq!(
            run(&csr(&ok, ISTIOD, &SA_GROUPS, &ALL, Some(599))),
            Err(reason::INVALID_EXPIRATION)
        );
        assert_eq!(
            run(&csr("not a pem", ISTIOD, &SA_GROUPS, &ALL, None)),
            Err(reason::INVALID_REQUEST)
        );
        let two = pem_for(&[
            "spiffe://cluster.local/ns/a/sa/a",
            "spiffe://cluster.local/ns/b/sa/b",
        ]);
        assert_eq!(
            run(&csr(&two, ISTIOD, &SA_GROUPS, &ALL, None)),
            Err(reason::INVALID_REQUEST)
        );
        let none = pem_for(&[]);
        assert_eq!(
            run(&csr(&none, ISTIOD, &SA_GROUPS, &ALL, None)),
            Err(reason::INVALID_REQUEST)
        );
        // A tampered request: its self-signature no longer verifies.
        let mut bad = csr(&ok, ISTIOD, &SA_GROUPS, &ALL, None);
        let block = ::pem::parse(&bad.spec.request.0).unwrap();
        let mut der = block.contents().to_vec();
        let n = der.len();
        der[n - 5] ^= 1;
        bad.spec.request.0 =
            ::pem::encode(&::pem::Pem::new("CERTIFICATE REQUEST", der)).into_bytes();
        assert_eq!(run(&bad), Err(reason::INVALID_REQUEST));
    }

    #[test]
    fn state_follows_the_conditions_and_denied_wins() {
        let mut c = csr(&pem_for(&[]), ISTIOD, &[], &ALL, None);
        assert_eq!(state(&c), CsrState::AwaitingApproval);
        let cond = |t: &str| {
            serde_json::from_value(serde_json::json!({"type": t, "status": "True"})).unwrap()
        };
        c.status = Some(
            k8s_openapi::api::certificates::v1::CertificateSigningRequestStatus {
                conditions: Some(vec![cond("Approved")]),
                certificate: None,
            },
        );
        assert_eq!(state(&c), CsrState::Approved);
        c.status
            .as_mut()
            .unwrap()
            .conditions
            .as_mut()
            .unwrap()
            .push(cond("Denied"));
        assert_eq!(state(&c), CsrState::Decided);
        c.status.as_mut().unwrap().conditions = Some(vec![cond("Approved")]);
        c.status.as_mut().unwrap().certificate = Some(k8s_openapi::ByteString(b"x".to_vec()));
        assert_eq!(state(&c), CsrState::Decided, "never a second certificate");
    }
}
