//! The spec over the flags: the policy a server runs with, each field from the spec when it
//! sets it, else from the flag, and which of the two each came from.

use std::time::Duration;

use super::resource::CertificateAuthoritySpec;
use super::validate::{
    capped, dur, SpecCaps, MAX_SPEC_CRL_VALIDITY, MAX_SPEC_INTERMEDIATE_TTL, MAX_SPEC_ROOT_TTL,
};
use crate::ca::policy::CaPolicy;

/// Which source each effective setting came from: `(spec field, value, source)`.
pub type Sources = Vec<(&'static str, String, String)>;

/// The effective policy: each field the spec sets wins over the flag; unset ones keep the
/// flag's value. Refuses a combination that cannot work (the API server's schema checks each
/// field alone), and a TTL or CRL validity above `caps` and the `MAX_SPEC_*` maxima.
pub fn effective_policy(
    spec: &CertificateAuthoritySpec,
    flags: &CaPolicy,
    activate_after_from_flag: bool,
    caps: &SpecCaps,
) -> Result<(CaPolicy, Sources), String> {
    const RAISE: Option<&str> = Some("--ca-resource-max-workload-ttl");
    let mut p = flags.clone();
    let mut sources: Sources = Vec::new();
    let fmt = crate::duration::format;
    macro_rules! take {
        ($field:literal, $flag:literal, $spec:expr, $target:expr, $show:expr) => {
            match $spec {
                Some(v) => {
                    $target = v;
                    sources.push(($field, $show(&$target), "spec".to_string()));
                }
                None => sources.push(($field, $show(&$target), format!("flag {}", $flag))),
            }
        };
    }
    take!(
        "caKeyType",
        "--ca-key-type",
        spec.ca_key_type.map(|k| k.as_str().to_string()),
        p.key_type,
        |v: &String| v.clone()
    );
    take!(
        "rootTtl",
        "--root-ttl",
        capped(
            "rootTtl",
            dur("rootTtl", &spec.root_ttl)?,
            MAX_SPEC_ROOT_TTL,
            None
        )?,
        p.rotation.root_ttl,
        |v: &Duration| fmt(*v)
    );
    take!(
        "intermediateTtl",
        "--intermediate-ttl",
        capped(
            "intermediateTtl",
            dur("intermediateTtl", &spec.intermediate_ttl)?,
            MAX_SPEC_INTERMEDIATE_TTL,
            None
        )?,
        p.rotation.intermediate_ttl,
        |v: &Duration| fmt(*v)
    );
    take!(
        "defaultWorkloadTtl",
        "--default-ttl",
        capped(
            "defaultWorkloadTtl",
            dur("defaultWorkloadTtl", &spec.default_workload_ttl)?,
            caps.workload_ttl,
            RAISE
        )?,
        p.ttl.default,
        |v: &Duration| fmt(*v)
    );
    take!(
        "maxWorkloadTtl",
        "--max-ttl",
        capped(
            "maxWorkloadTtl",
            dur("maxWorkloadTtl", &spec.max_workload_ttl)?,
            caps.workload_ttl,
            RAISE
        )?,
        p.ttl.max,
        |v: &Duration| fmt(*v)
    );
    p.rotation.max_leaf_ttl = p.ttl.max;
    take!(
        "intermediatePrepareAt",
        "--intermediate-prepare-at",
        spec.intermediate_prepare_at,
        p.rotation.prepare_at,
        |v: &f64| v.to_string()
    );
    take!(
        "intermediateActivateAt",
        "--intermediate-activate-at",
        spec.intermediate_activate_at,
        p.rotation.activate_at,
        |v: &f64| v.to_string()
    );
    take!(
        "rootRotateAt",
        "--root-rotate-at",
        spec.root_rotate_at,
        p.rotation.root_rotate_at,
        |v: &f64| v.to_string()
    );
    // --activate-after defaults to --max-ttl: without either flag, a spec that shortens the
    // max TTL shortens the propagation period too.
    let activate = dur("activateAfter", &spec.activate_after)?;
    if activate.is_none() && !activate_after_from_flag {
        p.rotation.activate_after = p.ttl.max;
        sources.push((
            "activateAfter",
            fmt(p.rotation.activate_after),
            "maxWorkloadTtl (the default)".into(),
        ));
    } else {
        take!(
            "activateAfter",
            "--activate-after",
            activate,
            p.rotation.activate_after,
            |v: &Duration| fmt(*v)
        );
    }
    take!(
        "crlValidity",
        "--crl-validity",
        capped(
            "crlValidity",
            dur("crlValidity", &spec.crl_validity)?,
            MAX_SPEC_CRL_VALIDITY,
            None
        )?,
        p.rotation.crl_validity,
        |v: &Duration| fmt(*v)
    );
    take!(
        "clockSkewMargin",
        "--clock-skew-margin",
        dur("clockSkewMargin", &spec.clock_skew_margin)?,
        p.rotation.skew_margin,
        |v: &Duration| fmt(*v)
    );
    if p.ttl.default > p.ttl.max {
        return Err(format!(
            "the default workload TTL {} exceeds the maximum {}",
            fmt(p.ttl.default),
            fmt(p.ttl.max)
        ));
    }
    if p.rotation.prepare_at > p.rotation.activate_at {
        return Err("intermediatePrepareAt must not be later than intermediateActivateAt".into());
    }
    Ok((p, sources))
}

#[cfg(test)]
pub(super) mod tests {
    use super::super::resource::CaKeyType;
    use super::*;

    pub(crate) fn flags() -> CaPolicy {
        CaPolicy {
            ttl: Default::default(),
            rotation: Default::default(),
            key_type: "ec-p256".into(),
        }
    }

    #[test]
    fn spec_fields_win_and_unset_ones_keep_the_flags() {
        let spec = CertificateAuthoritySpec {
            max_workload_ttl: Some("1h".into()),
            default_workload_ttl: Some("10m".into()),
            ca_key_type: Some(CaKeyType::EcP384),
            ..Default::default()
        };
        let (p, sources) = effective_policy(&spec, &flags(), false, &SpecCaps::default()).unwrap();
        assert_eq!(p.ttl.max, Duration::from_secs(3600));
        assert_eq!(p.rotation.max_leaf_ttl, Duration::from_secs(3600));
        assert_eq!(p.ttl.default, Duration::from_secs(600));
        assert_eq!(p.key_type, "ec-p384");
        // --activate-after was not given: it follows the (spec's) max TTL.
        assert_eq!(p.rotation.activate_after, Duration::from_secs(3600));
        assert_eq!(p.rotation.crl_validity, flags().rotation.crl_validity);
        let src = |f: &str| sources.iter().find(|s| s.0 == f).unwrap().2.clone();
        assert_eq!(src("maxWorkloadTtl"), "spec");
        assert_eq!(src("crlValidity"), "flag --crl-validity");
        // An explicit --activate-after is kept.
        let mut f = flags();
        f.rotation.activate_after = Duration::from_secs(60);
        let (p, _) = effective_policy(&spec, &f, true, &SpecCaps::default()).unwrap();
        assert_eq!(p.rotation.activate_after, Duration::from_secs(60));
    }
}
