//! What a `CertificateAuthority` spec may set beyond what the schema checks: each duration
//! parsed, the documented caps on TTLs and CRL validity (docs/operations.md, "Limits on the
//! spec"), and the combinations no single-field schema rule can see.

use std::time::Duration;

use crate::ca::policy::CaPolicy;

/// The longest workload TTL (`defaultWorkloadTtl`, `maxWorkloadTtl`) a spec may set unless
/// `serve --ca-resource-max-workload-ttl` raises it: istiod's maximum.
pub const MAX_SPEC_WORKLOAD_TTL: Duration = Duration::from_secs(90 * 86_400);
/// The longest `intermediateTtl` a spec may set (5 years).
pub const MAX_SPEC_INTERMEDIATE_TTL: Duration = Duration::from_secs(5 * 365 * 86_400);
/// The longest `rootTtl` a spec may set (20 years).
pub const MAX_SPEC_ROOT_TTL: Duration = Duration::from_secs(20 * 365 * 86_400);
/// The longest `crlValidity` a spec may set (7 days): a CRL stays acceptable that long, so a
/// longer one lets an old CRL that predates a revocation be replayed for longer.
pub const MAX_SPEC_CRL_VALIDITY: Duration = Duration::from_secs(7 * 86_400);

/// The most a CertificateAuthority spec may set. Whoever may edit the resource is often a
/// narrower grant than whoever deploys citadel with its flags, so the spec alone must not be
/// able to make citadel hand out year-long workload certificates or month-long CRLs; flags are
/// not capped (docs/operations.md, "Limits on the spec").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecCaps {
    /// `defaultWorkloadTtl` and `maxWorkloadTtl` (`--ca-resource-max-workload-ttl`).
    pub workload_ttl: Duration,
}

impl Default for SpecCaps {
    fn default() -> Self {
        Self {
            workload_ttl: MAX_SPEC_WORKLOAD_TTL,
        }
    }
}

/// The most one duration field of the spec may say.
#[derive(Debug, Clone, Copy)]
pub(super) struct Cap {
    max: Duration,
    /// The flag that raises `max`, if one does.
    raise: Option<&'static str>,
}

impl Cap {
    /// A fixed cap (`MAX_SPEC_*`).
    pub(super) fn fixed(max: Duration) -> Option<Cap> {
        Some(Cap { max, raise: None })
    }

    /// The workload TTL cap, which `--ca-resource-max-workload-ttl` raises.
    pub(super) fn workload(caps: &SpecCaps) -> Option<Cap> {
        Some(Cap {
            max: caps.workload_ttl,
            raise: Some("--ca-resource-max-workload-ttl"),
        })
    }
}

/// `spec.<field>` (`value`) as a duration; `None` when unset. Refused when it does not parse,
/// or when it is above `cap`, with a message naming the field and the cap (and the flag that
/// raises the cap, if one does).
pub(super) fn duration(
    field: &str,
    value: &Option<String>,
    cap: Option<Cap>,
) -> Result<Option<Duration>, String> {
    let Some(s) = value.as_deref() else {
        return Ok(None);
    };
    let v = crate::duration::parse(s).map_err(|e| format!("spec.{field}: {e}"))?;
    match cap {
        Some(cap) if v > cap.max => Err(format!(
            "spec.{field} {} is above the cap of {} for a CertificateAuthority spec{}",
            crate::duration::format(v),
            crate::duration::format(cap.max),
            cap.raise
                .map(|f| format!(" (raise it with {f})"))
                .unwrap_or_default()
        )),
        _ => Ok(Some(v)),
    }
}

/// Refuses a merged policy that cannot work although each field alone is fine (the API
/// server's schema checks each field alone; the flags may supply the other half).
pub(super) fn combination(p: &CaPolicy) -> Result<(), String> {
    if p.ttl.default > p.ttl.max {
        return Err(format!(
            "the default workload TTL {} exceeds the maximum {}",
            crate::duration::format(p.ttl.default),
            crate::duration::format(p.ttl.max)
        ));
    }
    if p.rotation.prepare_at > p.rotation.activate_at {
        return Err("intermediatePrepareAt must not be later than intermediateActivateAt".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::policy::effective_policy;
    use super::super::policy::tests::flags;
    use super::super::resource::CertificateAuthoritySpec;
    use super::*;

    /// The documented maxima (docs/operations.md, "Limits on the spec"): a spec above one is
    /// refused with a message naming the field and the cap; at the cap it is taken; only the
    /// workload cap moves, and only with the flag.
    #[test]
    fn spec_ttls_and_crl_validity_above_their_caps_are_refused_naming_field_and_cap() {
        let refused = |spec: CertificateAuthoritySpec, caps: SpecCaps| {
            effective_policy(&spec, &flags(), false, &caps).unwrap_err()
        };
        let d = |s: &str| Some(s.to_string());
        let default = SpecCaps::default();
        let cases = [
            (
                CertificateAuthoritySpec {
                    max_workload_ttl: d("91d"),
                    ..Default::default()
                },
                "spec.maxWorkloadTtl 91d is above the cap of 90d",
            ),
            (
                CertificateAuthoritySpec {
                    max_workload_ttl: d("90d"),
                    default_workload_ttl: d("2160h1s"),
                    ..Default::default()
                },
                "spec.defaultWorkloadTtl",
            ),
            (
                CertificateAuthoritySpec {
                    intermediate_ttl: d("1826d"),
                    ..Default::default()
                },
                "spec.intermediateTtl 1826d is above the cap of 1825d",
            ),
            (
                CertificateAuthoritySpec {
                    root_ttl: d("7301d"),
                    ..Default::default()
                },
                "spec.rootTtl 7301d is above the cap of 7300d",
            ),
            (
                CertificateAuthoritySpec {
                    crl_validity: d("8d"),
                    ..Default::default()
                },
                "spec.crlValidity 8d is above the cap of 7d",
            ),
        ];
        for (spec, want) in cases {
            let e = refused(spec, default);
            assert!(e.contains(want), "{want}: {e}");
        }
        let e = refused(
            CertificateAuthoritySpec {
                max_workload_ttl: d("365d"),
                ..Default::default()
            },
            default,
        );
        assert!(e.contains("--ca-resource-max-workload-ttl"), "{e}");
        // Only the workload cap names a flag: the others are fixed.
        let e = refused(
            CertificateAuthoritySpec {
                crl_validity: d("30d"),
                ..Default::default()
            },
            default,
        );
        assert!(!e.contains("--"), "{e}");

        // At the caps, taken.
        let at = CertificateAuthoritySpec {
            max_workload_ttl: d("90d"),
            default_workload_ttl: d("90d"),
            intermediate_ttl: d("1825d"),
            root_ttl: d("7300d"),
            crl_validity: d("7d"),
            ..Default::default()
        };
        let (p, _) = effective_policy(&at, &flags(), false, &default).unwrap();
        assert_eq!(p.ttl.max, MAX_SPEC_WORKLOAD_TTL);
        assert_eq!(p.rotation.root_ttl, MAX_SPEC_ROOT_TTL);
        assert_eq!(p.rotation.intermediate_ttl, MAX_SPEC_INTERMEDIATE_TTL);
        assert_eq!(p.rotation.crl_validity, MAX_SPEC_CRL_VALIDITY);

        // The flag raises the workload cap, and nothing else.
        let raised = SpecCaps {
            workload_ttl: Duration::from_secs(365 * 86_400),
        };
        let long = CertificateAuthoritySpec {
            max_workload_ttl: d("365d"),
            ..Default::default()
        };
        let (p, _) = effective_policy(&long, &flags(), false, &raised).unwrap();
        assert_eq!(p.ttl.max, Duration::from_secs(365 * 86_400));
        let e = refused(
            CertificateAuthoritySpec {
                max_workload_ttl: d("366d"),
                ..Default::default()
            },
            raised,
        );
        assert!(e.contains("above the cap of 365d"), "{e}");
        let e = refused(
            CertificateAuthoritySpec {
                crl_validity: d("8d"),
                ..Default::default()
            },
            raised,
        );
        assert!(e.contains("spec.crlValidity"), "{e}");

        // Flags are the deployer's and not capped: a spec that leaves the field unset keeps
        // a flag above the cap.
        let mut f = flags();
        f.ttl.max = Duration::from_secs(365 * 86_400);
        let (p, _) =
            effective_policy(&CertificateAuthoritySpec::default(), &f, false, &default).unwrap();
        assert_eq!(p.ttl.max, Duration::from_secs(365 * 86_400));
    }

    #[test]
    fn combinations_the_schema_cannot_see_are_refused() {
        let spec = CertificateAuthoritySpec {
            max_workload_ttl: Some("1h".into()),
            default_workload_ttl: Some("2h".into()),
            ..Default::default()
        };
        let e = effective_policy(&spec, &flags(), false, &SpecCaps::default()).unwrap_err();
        assert!(e.contains("exceeds the maximum"), "{e}");
        let spec = CertificateAuthoritySpec {
            crl_validity: Some("-1h".into()),
            ..Default::default()
        };
        let e = effective_policy(&spec, &flags(), false, &SpecCaps::default()).unwrap_err();
        assert!(e.contains("spec.crlValidity"), "{e}");
    }
}
