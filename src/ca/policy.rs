//! Workload TTL rules, as istiod applies them.

use std::time::Duration;

/// The TTL rules for workload certificates (`serve --default-ttl` and `--max-ttl`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TtlPolicy {
    /// Used when the request asks for 0 or a negative duration.
    pub default: Duration,
    /// A request above this is rejected, not clamped: a silently shorter certificate makes an
    /// agent renew at the wrong time.
    pub max: Duration,
}

/// A requested TTL above the maximum: refused with InvalidArgument, as istiod does.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("requested TTL {requested_secs}s exceeds the maximum of {max_secs}s")]
pub struct TtlError {
    /// What the request asked for (`validity_duration`), seconds.
    pub requested_secs: i64,
    /// The maximum, seconds.
    pub max_secs: u64,
}

impl Default for TtlPolicy {
    fn default() -> Self {
        Self {
            default: Duration::from_secs(24 * 3600),
            max: Duration::from_secs(90 * 24 * 3600),
        }
    }
}

impl TtlPolicy {
    /// Turns `validity_duration` (seconds, from the request) into the TTL to issue.
    pub fn resolve(&self, requested_secs: i64) -> Result<Duration, TtlError> {
        if requested_secs <= 0 {
            return Ok(self.default);
        }
        let requested = Duration::from_secs(requested_secs as u64);
        if requested > self.max {
            return Err(TtlError {
                requested_secs,
                max_secs: self.max.as_secs(),
            });
        }
        Ok(requested)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn istiod_ttl_rules() {
        let p = TtlPolicy::default();
        assert_eq!(p.resolve(0).unwrap(), Duration::from_secs(86_400));
        assert_eq!(p.resolve(-5).unwrap(), Duration::from_secs(86_400));
        assert_eq!(p.resolve(3600).unwrap(), Duration::from_secs(3600));
        assert_eq!(
            p.resolve(90 * 86_400).unwrap(),
            Duration::from_secs(90 * 86_400)
        );
        let e = p.resolve(90 * 86_400 + 1).unwrap_err();
        assert_eq!(e.max_secs, 90 * 86_400);
        assert!(p.resolve(i64::MAX).is_err());
    }
}

/// When authorities are prepared, activated and retired, and for how long CRLs are valid:
/// the rules `plan` reads.
#[derive(Debug, Clone, PartialEq)]
pub struct RotationPolicy {
    /// Validity of each new root.
    pub root_ttl: Duration,
    /// Validity of each new intermediate (capped at its root).
    pub intermediate_ttl: Duration,
    /// Fraction of the active intermediate's life at which the next one is prepared.
    pub prepare_at: f64,
    /// ... and at which it takes over.
    pub activate_at: f64,
    /// Fraction of the active root's life at which an automatic root rotation starts.
    pub root_rotate_at: f64,
    /// Propagation period between publishing a new root and signing with it.
    pub activate_after: Duration,
    /// The longest workload TTL: how long an old chain's leaves can outlive its deactivation.
    pub max_leaf_ttl: Duration,
    /// CRL validity (nextUpdate - thisUpdate); CRLs are re-signed at half of it.
    pub crl_validity: Duration,
    /// How long after notAfter a peer with a slow clock may still accept a leaf; every
    /// retirement waits this much longer than the last leaf's notAfter.
    pub skew_margin: Duration,
    /// When JWT-SVID signing keys are prepared, published, activated and retired.
    pub jwt: JwtKeyPolicy,
    /// Key type of the authorities minted from now on (`--ca-key-type`, `spec.caKeyType`);
    /// `None` keeps the type of the authority a new one succeeds. Filled from
    /// [`CaPolicy::key_type`] by [`LivePolicy::rotation`]; CLI commands leave it `None`.
    pub new_key_type: Option<crate::pki::KeyType>,
    /// Base URL of the CRL distribution point (`--crl-distribution-url`, ending in `/`):
    /// intermediates minted from now on carry `<it><issuer id>.crl` in their CRL
    /// Distribution Points extension. `None`: no extension.
    pub crl_distribution_url: Option<String>,
}

/// The JWT-SVID key schedule (`--jwt-key-ttl`, `--jwt-svid-ttl`, `--jwt-bundle-refresh-hint`):
/// the same fractions as intermediates (prepared at 1/2 of the active key's life, activated
/// at 5/6), and never activated before the bundle holding the key has been published for
/// [`JwtKeyPolicy::PUBLISH_LEAD_HINTS`] refresh hints (SPIFFE: publish keys 3-5 refresh hints
/// before signing with them).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct JwtKeyPolicy {
    /// The planned life of each key: its successor is prepared and activated at fractions
    /// of it. A key past it keeps signing until a successor may take over (signing never
    /// stops for want of a published successor).
    pub key_ttl: Duration,
    /// Fraction of the active key's life at which its successor is prepared.
    pub prepare_at: f64,
    /// ... and at which the successor takes over (once published long enough).
    pub activate_at: f64,
    /// The bundle's `spiffe_refresh_hint`: how often relying parties should fetch it.
    pub refresh_hint: Duration,
    /// The lifetime of each JWT-SVID (`exp - iat`).
    pub svid_ttl: Duration,
}

impl Default for JwtKeyPolicy {
    fn default() -> Self {
        Self {
            key_ttl: Duration::from_secs(30 * 86_400),
            prepare_at: 0.5,
            activate_at: 5.0 / 6.0,
            refresh_hint: Duration::from_secs(300),
            svid_ttl: Duration::from_secs(300),
        }
    }
}

impl JwtKeyPolicy {
    /// How many refresh hints a new key is published before it signs (the top of SPIFFE's
    /// 3-5, since a replica's copy and an agent's cache each add a refresh of delay).
    pub const PUBLISH_LEAD_HINTS: u32 = 5;
    /// The longest `--jwt-svid-ttl`: a retired key leaves the bundle this long (plus the skew
    /// margin) after it stopped signing, whatever TTL the server ran with when it signed.
    pub const MAX_SVID_TTL: Duration = Duration::from_secs(86_400);

    /// Seconds between a key's first publication and the earliest moment it may sign.
    pub fn publish_lead(&self) -> i64 {
        (self.refresh_hint * Self::PUBLISH_LEAD_HINTS).as_secs() as i64
    }
}

impl Default for RotationPolicy {
    fn default() -> Self {
        Self {
            root_ttl: Duration::from_secs(10 * 365 * 86_400),
            intermediate_ttl: Duration::from_secs(365 * 86_400),
            prepare_at: 0.5,
            activate_at: 5.0 / 6.0,
            root_rotate_at: 5.0 / 6.0,
            activate_after: Duration::from_secs(90 * 86_400),
            max_leaf_ttl: Duration::from_secs(90 * 86_400),
            crl_validity: Duration::from_secs(86_400),
            skew_margin: Duration::from_secs(120),
            jwt: JwtKeyPolicy::default(),
            new_key_type: None,
            crl_distribution_url: None,
        }
    }
}

impl RotationPolicy {
    /// How long after an intermediate stops signing its last leaf may still be valid.
    pub(crate) fn leaf_grace(&self) -> i64 {
        (self.max_leaf_ttl + self.skew_margin).as_secs() as i64
    }

    /// How long after a JWT key stops signing its last token may still be valid.
    pub(crate) fn jwt_grace(&self) -> i64 {
        (JwtKeyPolicy::MAX_SVID_TTL + self.skew_margin).as_secs() as i64
    }
}

/// The server's whole policy: what it stores with the state (`Journal::policy`) so that CLI
/// commands plan with the server's numbers, not with flags an operator must repeat.
#[derive(Debug, Clone, PartialEq)]
pub struct CaPolicy {
    /// Workload TTLs.
    pub ttl: TtlPolicy,
    /// Rotation and CRL timing (its `max_leaf_ttl` is `ttl.max`).
    pub rotation: RotationPolicy,
    /// Key type of new authorities, as `--ca-key-type` spells it (`ec-p256`, ...).
    pub key_type: String,
}

impl CaPolicy {
    /// The stored form; `source` says where the settings came from (for `ca status` and logs).
    pub fn to_stored(&self, source: &str) -> crate::journal::StoredPolicy {
        let r = &self.rotation;
        crate::journal::StoredPolicy {
            default_ttl_secs: self.ttl.default.as_secs(),
            max_ttl_secs: self.ttl.max.as_secs(),
            root_ttl_secs: r.root_ttl.as_secs(),
            intermediate_ttl_secs: r.intermediate_ttl.as_secs(),
            prepare_at: r.prepare_at,
            activate_at: r.activate_at,
            root_rotate_at: r.root_rotate_at,
            activate_after_secs: r.activate_after.as_secs(),
            crl_validity_secs: r.crl_validity.as_secs(),
            skew_margin_secs: r.skew_margin.as_secs(),
            key_type: self.key_type.clone(),
            source: source.to_string(),
            jwt_key_ttl_secs: r.jwt.key_ttl.as_secs(),
            jwt_svid_ttl_secs: r.jwt.svid_ttl.as_secs(),
            jwt_refresh_hint_secs: r.jwt.refresh_hint.as_secs(),
            crl_distribution_url: r.crl_distribution_url.clone(),
        }
    }

    /// The policy a stored record describes.
    pub fn from_stored(p: &crate::journal::StoredPolicy) -> Self {
        let s = Duration::from_secs;
        Self {
            ttl: TtlPolicy {
                default: s(p.default_ttl_secs),
                max: s(p.max_ttl_secs),
            },
            rotation: RotationPolicy {
                root_ttl: s(p.root_ttl_secs),
                intermediate_ttl: s(p.intermediate_ttl_secs),
                prepare_at: p.prepare_at,
                activate_at: p.activate_at,
                root_rotate_at: p.root_rotate_at,
                activate_after: s(p.activate_after_secs),
                max_leaf_ttl: s(p.max_ttl_secs),
                crl_validity: s(p.crl_validity_secs),
                skew_margin: s(p.skew_margin_secs),
                jwt: {
                    // Zero: a policy stored before JWT-SVIDs existed; the defaults apply.
                    let d = JwtKeyPolicy::default();
                    let or = |secs: u64, default: Duration| {
                        if secs == 0 {
                            default
                        } else {
                            s(secs)
                        }
                    };
                    JwtKeyPolicy {
                        key_ttl: or(p.jwt_key_ttl_secs, d.key_ttl),
                        svid_ttl: or(p.jwt_svid_ttl_secs, d.svid_ttl),
                        refresh_hint: or(p.jwt_refresh_hint_secs, d.refresh_hint),
                        ..d
                    }
                },
                new_key_type: None,
                crl_distribution_url: p.crl_distribution_url.clone(),
            },
            key_type: p.key_type.clone(),
        }
    }
}

/// The policy a server runs with, shared by every consumer and swapped whole while serving
/// (the CertificateAuthority reconciler on every replica), the way [`super::Ca`] shares the
/// signer: readers take a snapshot per request or per scheduler step and never hold a lock,
/// so a spec change reaches the next certificate, CRL and planned action without a restart.
#[derive(Clone, Debug)]
pub struct LivePolicy(std::sync::Arc<arc_swap::ArcSwap<CaPolicy>>);

impl LivePolicy {
    /// Starts with `p`.
    pub fn new(p: CaPolicy) -> Self {
        Self(std::sync::Arc::new(arc_swap::ArcSwap::from_pointee(p)))
    }

    /// The current policy (a snapshot: one request reads one policy throughout).
    pub fn load(&self) -> std::sync::Arc<CaPolicy> {
        self.0.load_full()
    }

    /// The workload TTL rules now.
    pub fn ttl(&self) -> TtlPolicy {
        self.0.load().ttl
    }

    /// The rotation rules now, with [`RotationPolicy::new_key_type`] set from the key type
    /// (new authorities get it; an unparsable one, like a plugged-in CA's, keeps the
    /// predecessor's).
    pub fn rotation(&self) -> RotationPolicy {
        let p = self.0.load();
        RotationPolicy {
            new_key_type: p.key_type.parse().ok().or(p.rotation.new_key_type),
            ..p.rotation.clone()
        }
    }

    /// Runs with `p` from now on; whether it differs from the policy it replaces.
    pub fn replace(&self, p: CaPolicy) -> bool {
        let changed = **self.0.load() != p;
        self.0.store(std::sync::Arc::new(p));
        changed
    }
}

/// Fixed TTL rules with default rotation rules, for surfaces and tests that have no
/// CertificateAuthority behind them.
impl From<TtlPolicy> for LivePolicy {
    fn from(ttl: TtlPolicy) -> Self {
        Self::new(CaPolicy {
            ttl,
            rotation: RotationPolicy {
                max_leaf_ttl: ttl.max,
                ..RotationPolicy::default()
            },
            key_type: String::new(),
        })
    }
}

/// Fixed rotation rules (CLI commands, tests): the workload TTLs follow `max_leaf_ttl`.
impl From<RotationPolicy> for LivePolicy {
    fn from(rotation: RotationPolicy) -> Self {
        Self::new(CaPolicy {
            ttl: TtlPolicy {
                max: rotation.max_leaf_ttl,
                ..TtlPolicy::default()
            },
            rotation,
            key_type: String::new(),
        })
    }
}

#[cfg(test)]
mod live_tests {
    use super::*;

    /// A clone reads what the original was given afterwards (the reconciler and the
    /// consumers hold clones of one cell), `replace` says whether anything changed, and the
    /// key type reaches the rotation rules.
    #[test]
    fn every_clone_sees_a_replaced_policy_at_once() {
        let live = LivePolicy::from(TtlPolicy::default());
        let reader = live.clone();
        assert_eq!(reader.rotation().new_key_type, None, "no key type: follow");
        let mut p = (*live.load()).clone();
        p.ttl.max = Duration::from_secs(3600);
        p.rotation.crl_validity = Duration::from_secs(600);
        p.key_type = "ec-p384".into();
        assert!(live.replace(p.clone()));
        assert!(!live.replace(p), "the same policy again is no change");
        assert_eq!(reader.ttl().max, Duration::from_secs(3600));
        assert_eq!(reader.rotation().crl_validity, Duration::from_secs(600));
        assert_eq!(
            reader.rotation().new_key_type,
            Some(crate::pki::KeyType::EcP384)
        );
        assert!(reader.ttl().resolve(3601).is_err());
    }
}

#[cfg(test)]
mod stored_tests {
    use super::*;

    #[test]
    fn the_stored_policy_round_trips() {
        let p = CaPolicy {
            ttl: TtlPolicy {
                default: Duration::from_secs(600),
                max: Duration::from_secs(3600),
            },
            rotation: RotationPolicy {
                max_leaf_ttl: Duration::from_secs(3600),
                activate_after: Duration::from_secs(60),
                ..RotationPolicy::default()
            },
            key_type: "ec-p384".into(),
        };
        let stored = p.to_stored("flags");
        assert_eq!(stored.source, "flags");
        assert_eq!(CaPolicy::from_stored(&stored), p);
    }
}
