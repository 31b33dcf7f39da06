//! The CRDs citadel defines (`citadel.dev/v1alpha1`), rendered as YAML from the Rust types.
//!
//! One format, one header and one regeneration command for every kind, so `deploy/crds/` and
//! the copies inside `deploy/citadel.yaml` (one `kubectl apply` installs everything) cannot
//! drift from the code: each kind's unit test calls [`check_deployed`].

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;

/// Set to `1` to make the CRD tests rewrite `deploy/` instead of only comparing.
pub const REGENERATE: &str = "CITADEL_REGENERATE_CRDS";

/// How to regenerate every CRD file, for headers and failure messages.
pub const REGENERATE_COMMAND: &str = "CITADEL_REGENERATE_CRDS=1 cargo test --lib crds_in_deploy";

/// `crd` as YAML, headed by where it comes from and how to regenerate it.
pub fn yaml(crd: &CustomResourceDefinition, source: &str) -> String {
    let body = serde_saphyr::to_string(crd).unwrap_or_default();
    format!(
        "# Generated from {source}; do not edit. Regenerate with\n#   {REGENERATE_COMMAND}\n{body}"
    )
}

/// Asserts that `deploy/crds/<file>` and the text between the `# BEGIN crds/<file>` and
/// `# END crds/<file>` lines of `deploy/citadel.yaml` are `want`; with [`REGENERATE`]`=1` it
/// rewrites both first.
#[cfg(test)]
pub fn check_deployed(file: &str, want: &str) {
    // Every kind's test rewrites the same deploy/citadel.yaml: one at a time, or one
    // regeneration overwrites the other's.
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy");
    let (path, all_path) = (format!("{dir}/crds/{file}"), format!("{dir}/citadel.yaml"));
    let (begin, end) = (format!("# BEGIN crds/{file}"), format!("# END crds/{file}"));
    let all = std::fs::read_to_string(&all_path).unwrap_or_default();
    let embedded = |all: &str| -> Option<String> {
        let b = all.find(&begin)?;
        let b = b + all[b..].find('\n')? + 1;
        let e = all.find(&end)?;
        (b <= e).then(|| format!("{}{want}{}", &all[..b], &all[e..]))
    };
    let all_want = embedded(&all).unwrap_or_default();
    if std::env::var(REGENERATE).as_deref() == Ok("1") {
        std::fs::create_dir_all(format!("{dir}/crds")).unwrap();
        std::fs::write(&path, want).unwrap();
        if !all_want.is_empty() {
            std::fs::write(&all_path, &all_want).unwrap();
        }
    }
    assert!(
        std::fs::read_to_string(&path).unwrap_or_default() == want,
        "{path} differs from the CRD the code generates; regenerate with {REGENERATE_COMMAND}"
    );
    assert!(
        !all_want.is_empty() && std::fs::read_to_string(&all_path).unwrap_or_default() == all_want,
        "{all_path} does not embed the generated CRD between its `{begin}` and `{end}` lines; regenerate with {REGENERATE_COMMAND}"
    );
}
