//! The spec over the flags: the policy a server runs with, each field from the spec when it
//! sets it, else from the flag, and which of the two each came from.

use std::time::Duration;

use super::resource::CertificateAuthoritySpec;
use super::validate::{
    combination, duration, Cap, SpecCaps, MAX_SPEC_CRL_VALIDITY, MAX_SPEC_INTERMEDIATE_TTL,
    MAX_SPEC_ROOT_TTL,
};
use crate::ca::policy::{CaPolicy, RotationPolicy, TtlPolicy};

/// Which source each effective setting came from: `(spec field, value, source)`.
pub type Sources = Vec<(&'static str, String, String)>;

/// How a merged value is shown in [`Sources`] (and so in the start-up log line).
trait Show {
    fn show(&self) -> String;
}

impl Show for Duration {
    fn show(&self) -> String {
        crate::duration::format(*self)
    }
}

impl Show for f64 {
    fn show(&self) -> String {
        self.to_string()
    }
}

impl Show for String {
    fn show(&self) -> String {
        self.clone()
    }
}

/// The one merge rule, applied per field: the spec's value when the spec sets the field, else
/// the fallback (the flag's value); either way recorded in the sources.
#[derive(Default)]
struct Merge(Sources);

impl Merge {
    /// `spec` if set, else `fallback`, which came from `from` (`flag --root-ttl`, ...).
    fn pick<T: Show>(
        &mut self,
        field: &'static str,
        from: &str,
        spec: Option<T>,
        fallback: T,
    ) -> T {
        let (value, source) = match spec {
            Some(v) => (v, "spec".to_string()),
            None => (fallback, from.to_string()),
        };
        self.0.push((field, value.show(), source));
        value
    }

    /// [`Self::pick`] for a duration field, parsed and held to `cap` first.
    fn duration(
        &mut self,
        field: &'static str,
        from: &str,
        spec: &Option<String>,
        cap: Option<Cap>,
        fallback: Duration,
    ) -> Result<Duration, String> {
        Ok(self.pick(field, from, duration(field, spec, cap)?, fallback))
    }
}

/// The effective policy: each field the spec sets wins over the flag; unset ones keep the
/// flag's value. Refuses a combination that cannot work (the API server's schema checks each
/// field alone), and a TTL or CRL validity above `caps` and the `MAX_SPEC_*` maxima.
///
/// One struct-level expression, one line per field and no `..flags` rest: a field added to
/// the policy does not compile until it is given its spec field and flag here.
pub fn effective_policy(
    spec: &CertificateAuthoritySpec,
    flags: &CaPolicy,
    activate_after_from_flag: bool,
    caps: &SpecCaps,
) -> Result<(CaPolicy, Sources), String> {
    let (f, r) = (&flags.ttl, &flags.rotation);
    let mut m = Merge::default();
    let workload = Cap::workload(caps);
    let ttl = TtlPolicy {
        default: m.duration(
            "defaultWorkloadTtl",
            "flag --default-ttl",
            &spec.default_workload_ttl,
            workload,
            f.default,
        )?,
        max: m.duration(
            "maxWorkloadTtl",
            "flag --max-ttl",
            &spec.max_workload_ttl,
            workload,
            f.max,
        )?,
    };
    // --activate-after defaults to --max-ttl: without either flag, a spec that shortens the
    // max TTL shortens the propagation period too.
    let (activate_after, activate_from) = match activate_after_from_flag {
        true => (r.activate_after, "flag --activate-after"),
        false => (ttl.max, "maxWorkloadTtl (the default)"),
    };
    let key_type = spec.ca_key_type.map(|k| k.as_str().to_string());
    let p = CaPolicy {
        key_type: m.pick(
            "caKeyType",
            "flag --ca-key-type",
            key_type,
            flags.key_type.clone(),
        ),
        rotation: RotationPolicy {
            root_ttl: m.duration(
                "rootTtl",
                "flag --root-ttl",
                &spec.root_ttl,
                Cap::fixed(MAX_SPEC_ROOT_TTL),
                r.root_ttl,
            )?,
            intermediate_ttl: m.duration(
                "intermediateTtl",
                "flag --intermediate-ttl",
                &spec.intermediate_ttl,
                Cap::fixed(MAX_SPEC_INTERMEDIATE_TTL),
                r.intermediate_ttl,
            )?,
            prepare_at: m.pick(
                "intermediatePrepareAt",
                "flag --intermediate-prepare-at",
                spec.intermediate_prepare_at,
                r.prepare_at,
            ),
            activate_at: m.pick(
                "intermediateActivateAt",
                "flag --intermediate-activate-at",
                spec.intermediate_activate_at,
                r.activate_at,
            ),
            root_rotate_at: m.pick(
                "rootRotateAt",
                "flag --root-rotate-at",
                spec.root_rotate_at,
                r.root_rotate_at,
            ),
            activate_after: m.duration(
                "activateAfter",
                activate_from,
                &spec.activate_after,
                None,
                activate_after,
            )?,
            crl_validity: m.duration(
                "crlValidity",
                "flag --crl-validity",
                &spec.crl_validity,
                Cap::fixed(MAX_SPEC_CRL_VALIDITY),
                r.crl_validity,
            )?,
            skew_margin: m.duration(
                "clockSkewMargin",
                "flag --clock-skew-margin",
                &spec.clock_skew_margin,
                None,
                r.skew_margin,
            )?,
            // Not a setting of its own: how long a workload leaf lives at most.
            max_leaf_ttl: ttl.max,
            // The spec has no JWT-SVID fields (yet): the flags'.
            jwt: r.jwt,
            // Follows `key_type` above, through `LivePolicy::rotation`.
            new_key_type: None,
            // A flag only: where this deployment serves its CRLs.
            crl_distribution_url: r.crl_distribution_url.clone(),
        },
        ttl,
    };
    combination(&p)?;
    Ok((p, m.0))
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

    /// Every policy field of the spec, set alone, moves the policy off the flags and is
    /// reported as coming from the spec, while every other field keeps its flag; with all of
    /// them set, each lands where it belongs. Driven by the spec's own serialized fields, and
    /// the spec below is written out without `..Default`, so a spec field added without its
    /// merge line fails here (the policy side fails to compile without one).
    #[test]
    fn every_spec_field_overrides_its_flag_and_an_absent_one_keeps_it() {
        use super::super::resource::RootRotationRequest;
        let full = CertificateAuthoritySpec {
            trust_domain: Some("example.org".into()),
            ca_key_type: Some(CaKeyType::Rsa3072),
            root_ttl: Some("3000d".into()),
            intermediate_ttl: Some("300d".into()),
            default_workload_ttl: Some("2h".into()),
            max_workload_ttl: Some("30h".into()),
            intermediate_prepare_at: Some(0.3),
            intermediate_activate_at: Some(0.9),
            root_rotate_at: Some(0.6),
            activate_after: Some("5h".into()),
            crl_validity: Some("2d".into()),
            clock_skew_margin: Some("7m".into()),
            root_rotation: Some(RootRotationRequest {
                request: "r".into(),
                activate_immediately: true,
            }),
        };
        // Read by the reconciler and at start, not part of the policy.
        const NOT_POLICY: [&str; 2] = ["trustDomain", "rootRotation"];
        let caps = SpecCaps::default();
        let h = |n: u64| Duration::from_secs(n * 3600);
        let d = |n: u64| Duration::from_secs(n * 86_400);

        // Nothing set: the flags, each reported as a flag.
        let (base, sources) =
            effective_policy(&CertificateAuthoritySpec::default(), &flags(), true, &caps).unwrap();
        assert_eq!(base, flags());
        assert!(
            sources.iter().all(|s| s.2.starts_with("flag --")),
            "{sources:?}"
        );

        // Each field alone (values the flags' other fields can live with).
        let json = serde_json::to_value(&full).unwrap();
        let fields = json.as_object().unwrap();
        let policy_fields: Vec<&String> = fields
            .keys()
            .filter(|k| !NOT_POLICY.contains(&k.as_str()))
            .collect();
        assert_eq!(policy_fields.len(), 11, "{policy_fields:?}");
        let mut reported: Vec<&str> = sources.iter().map(|s| s.0).collect();
        reported.sort_unstable();
        let mut want: Vec<&str> = policy_fields.iter().map(|k| k.as_str()).collect();
        want.sort_unstable();
        assert_eq!(reported, want, "every policy field has a source");
        for field in &policy_fields {
            let one: CertificateAuthoritySpec =
                serde_json::from_value(serde_json::json!({ *field: fields[*field] })).unwrap();
            let (p, sources) = effective_policy(&one, &flags(), true, &caps).unwrap();
            assert_ne!(p, base, "spec.{field} alone does not change the policy");
            for (f, _, source) in &sources {
                assert_eq!(
                    source == "spec",
                    f == field,
                    "spec.{field} alone: {f} is from {source}"
                );
            }
        }

        // All set: each value where it belongs.
        let (p, sources) = effective_policy(&full, &flags(), true, &caps).unwrap();
        assert!(sources.iter().all(|s| s.2 == "spec"), "{sources:?}");
        assert_eq!(p.key_type, "rsa-3072");
        assert_eq!(p.rotation.root_ttl, d(3000));
        assert_eq!(p.rotation.intermediate_ttl, d(300));
        assert_eq!(p.ttl.default, h(2));
        assert_eq!(p.ttl.max, h(30));
        assert_eq!(p.rotation.max_leaf_ttl, h(30));
        assert_eq!(p.rotation.prepare_at, 0.3);
        assert_eq!(p.rotation.activate_at, 0.9);
        assert_eq!(p.rotation.root_rotate_at, 0.6);
        assert_eq!(p.rotation.activate_after, h(5));
        assert_eq!(p.rotation.crl_validity, d(2));
        assert_eq!(p.rotation.skew_margin, Duration::from_secs(7 * 60));
    }
}
