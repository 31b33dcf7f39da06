//! `citadel dev-token`: mint a service-account-shaped JWT with the dev key. DEV ONLY.

use std::time::Duration;

use crate::devkeys;
use crate::duration::clap_parse;
use crate::identity::ServiceAccount;

use super::CmdResult;

/// Flags of `citadel dev-token`.
#[derive(Debug, clap::Args)]
#[command(after_long_help = "\
The token is signed with the dev key in certs-dev/ (its private key is public), and is
accepted only by `citadel serve --dev`. It looks like a projected Kubernetes token:
sub system:serviceaccount:<ns>:<sa>, aud istio-ca, and a kubernetes.io claim.

Example:
  citadel dev-token --namespace shop --service-account cart > token.jwt")]
pub struct Args {
    /// Kubernetes namespace of the workload.
    #[arg(
        long,
        short = 'n',
        value_name = "NS",
        required_unless_present = "print_jwks"
    )]
    pub namespace: Option<String>,

    /// Service account of the workload.
    #[arg(long, value_name = "SA", required_unless_present = "print_jwks")]
    pub service_account: Option<String>,

    /// Audience claim; repeat for several.
    #[arg(long = "audience", value_name = "AUD", default_value = "istio-ca")]
    pub audiences: Vec<String>,

    /// Token lifetime.
    #[arg(long, default_value = "1h", value_parser = clap_parse, value_name = "DUR")]
    pub ttl: Duration,

    /// Pod name to put in the kubernetes.io claim.
    #[arg(long, value_name = "NAME")]
    pub pod_name: Option<String>,

    /// Print the JWKS that verifies dev tokens (certs-dev/jwks.json) instead of a token.
    #[arg(long)]
    pub print_jwks: bool,
}

/// The claims of a projected service-account token, as kubelet receives them.
pub fn claims(
    sa: &ServiceAccount,
    audiences: &[String],
    now: i64,
    ttl: Duration,
    pod: Option<&str>,
) -> serde_json::Value {
    let mut k8s = serde_json::json!({
        "namespace": sa.namespace,
        "serviceaccount": {"name": sa.name, "uid": "00000000-0000-0000-0000-000000000000"},
    });
    if let Some(p) = pod {
        k8s["pod"] = serde_json::json!({"name": p, "uid": "00000000-0000-0000-0000-000000000001"});
    }
    serde_json::json!({
        "iss": devkeys::DEV_ISSUER,
        "sub": format!("system:serviceaccount:{}:{}", sa.namespace, sa.name),
        "aud": audiences,
        "iat": now,
        "nbf": now,
        "exp": now + ttl.as_secs() as i64,
        "kubernetes.io": k8s,
    })
}

/// Prints a dev token (or, with `--print-jwks`, the dev JWKS) to stdout.
pub fn run(args: Args) -> CmdResult {
    if args.print_jwks {
        print!("{}", devkeys::jwks_json());
        return Ok(());
    }
    let sa = ServiceAccount::new(
        args.namespace.as_deref().unwrap_or_default(),
        args.service_account.as_deref().unwrap_or_default(),
    )
    .map_err(|e| e.to_string())?;
    if args.ttl.is_zero() {
        return Err("--ttl must be positive".into());
    }
    let now = crate::clock::system().now().unix_timestamp();
    let token = devkeys::signing_key().sign(&claims(
        &sa,
        &args.audiences,
        now,
        args.ttl,
        args.pod_name.as_deref(),
    ));
    println!("{token}");
    Ok(())
}
