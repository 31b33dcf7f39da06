//! The operator's kit (issue 25): the Helm chart in deploy/helm/citadel, the alert rules in
//! deploy/prometheus and the dashboard in deploy/grafana, each checked with the real program
//! that will consume it:
//! - the chart renders deploy/ byte for byte (real Helm v4, `CITADEL_HELM`), its values do
//!   what they say, and what it renders passes the real API server's server-side dry run;
//! - the rules pass `promtool test rules` (`CITADEL_PROMTOOL`), every rule tested firing and
//!   not firing;
//! - a real Prometheus (`CITADEL_PROMETHEUS`) scraping a real citadel loads the rules, sees
//!   every metric they use, and every dashboard expression returns data.
//!
//! scripts/test.sh builds or installs the three programs and exports the variables; without
//! one a test is skipped, and under CI=true it fails.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use citadel::pki::KeyType;
use tonic::Code;

use crate::support::*;

/// A program from `var`, else from PATH (`fallback`, if any); None skips the test, and
/// under CI=true a missing program fails it.
fn program(var: &str, fallback: Option<&str>) -> Option<PathBuf> {
    let found = std::env::var_os(var).map(PathBuf::from).or_else(|| {
        let name = fallback?;
        let out = Command::new("sh")
            .args(["-c", &format!("command -v {name}")])
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
    });
    match found {
        Some(p) if p.is_file() => Some(p),
        _ => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "{var} is required under CI=true; run scripts/test.sh"
            );
            eprintln!("SKIPPED: {var} not set (run scripts/test.sh)");
            None
        }
    }
}

/// Helm: $CITADEL_HELM, or the build scripts/helm.sh cached (without building it here).
/// Runs `cmd`: whether it succeeded, and its stdout followed by its stderr.
fn exec(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// Runs `cmd`, which must succeed; its output.
fn exec_ok(cmd: &mut Command) -> String {
    let (ok, text) = exec(cmd);
    assert!(ok, "{cmd:?} failed:\n{text}");
    text
}

fn helm() -> Option<PathBuf> {
    if std::env::var_os("CITADEL_HELM").is_none() {
        let version = Command::new("scripts/helm.sh")
            .arg("version")
            .output()
            .ok()?;
        let cache = std::env::var_os("CITADEL_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/citadel")
            });
        let cached = cache
            .join(format!(
                "helm-{}",
                String::from_utf8_lossy(&version.stdout).trim()
            ))
            .join("helm");
        if cached.is_file() {
            return Some(cached);
        }
    }
    program("CITADEL_HELM", None)
}

const CHART: &str = "deploy/helm/citadel";

/// `helm template citadel deploy/helm/citadel --namespace NS ARGS`: Ok(manifests) or
/// Err(stderr).
fn template(helm: &Path, namespace: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(helm)
        .args(["template", "citadel", CHART, "--namespace", namespace])
        .args(args)
        .output()
        .unwrap();
    if out.status.success() {
        Ok(String::from_utf8(out.stdout).unwrap())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).to_string())
    }
}

fn render(helm: &Path, args: &[&str]) -> String {
    template(helm, "istio-system", args).unwrap_or_else(|e| panic!("helm template {args:?}: {e}"))
}

/// The rendered document of `kind` named `name`, if any.
fn doc<'a>(manifests: &'a str, kind: &str, name: &str) -> Option<&'a str> {
    manifests.split("\n---\n").find(|d| {
        d.lines().any(|l| l == format!("kind: {kind}"))
            && d.lines().any(|l| l == format!("  name: {name}"))
    })
}

/// The container's `args` of the rendered Deployment, one per line.
fn args(manifests: &str) -> Vec<String> {
    let d = doc(manifests, "Deployment", "citadel").expect("a Deployment");
    d.lines()
        .skip_while(|l| l.trim() != "args:")
        .skip(1)
        .take_while(|l| l.trim_start().starts_with("- "))
        .map(|l| {
            l.trim_start()
                .trim_start_matches("- ")
                .trim_matches('"')
                .to_string()
        })
        .collect()
}

/// Asserts the Deployment's container has each of `want` among its args.
fn has_args(manifests: &str, want: &[&str]) {
    let a = args(manifests);
    for w in want {
        assert!(a.iter().any(|x| x == w), "{w} missing from {a:?}");
    }
}

/// deploy/citadel.yaml, ambient.yaml, multicluster.yaml, podcertificate-policy.yaml,
/// istio-ra.yaml and istio-ra-auto-approve.yaml are what the chart renders
/// (scripts/render-deploy.sh), byte for byte: the kubectl path and the Helm path cannot drift. The CRD unit tests (`crds_in_deploy_*`) in turn keep the chart's
/// crds/ and the copies embedded in deploy/citadel.yaml equal to the Rust types.
#[test]
fn the_chart_renders_deploy_byte_for_byte() {
    let Some(helm) = helm() else { return };
    for file in [
        "citadel.yaml",
        "ambient.yaml",
        "multicluster.yaml",
        "podcertificate-policy.yaml",
        "istio-ra.yaml",
        "istio-ra-auto-approve.yaml",
    ] {
        let out = Command::new("scripts/render-deploy.sh")
            .args(["--print", file])
            .env("CITADEL_HELM", &helm)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "render-deploy.sh --print {file}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let committed = std::fs::read(format!("deploy/{file}")).unwrap();
        assert!(
            out.stdout == committed,
            "deploy/{file} differs from what the chart renders; run scripts/render-deploy.sh"
        );
    }
    // The CRDs are the chart's own (Helm installs crds/ first and never deletes them), and
    // deploy/crds is that directory.
    for crd in ["certificateauthority.yaml", "revocation.yaml"] {
        let chart = std::fs::read(format!("{CHART}/crds/{crd}")).unwrap();
        assert_eq!(chart, std::fs::read(format!("deploy/crds/{crd}")).unwrap());
        let embedded = std::fs::read_to_string("deploy/citadel.yaml").unwrap();
        assert!(embedded.contains(std::str::from_utf8(&chart).unwrap()));
    }
}

/// Each value changes what it says and nothing it should not; values that cannot work are
/// refused at render time, naming the value.
#[test]
fn chart_values_do_what_they_say() {
    let Some(helm) = helm() else { return };
    exec_ok(Command::new(&helm).args(["lint", "--strict", CHART]));
    let defaults = render(&helm, &[]);
    has_args(
        &defaults,
        &[
            "--store=kube",
            "--namespace=istio-system",
            "--auth=tokenreview",
            "--trust-domain=cluster.local",
            "--server-dns-name=istiod.istio-system.svc",
            "--pod-cert-signer-name=citadel.dev/spiffe",
        ],
    );
    assert!(defaults.contains("  replicas: 2\n"));
    for (kind, name) in [
        ("ClusterRole", "citadel"),
        ("Role", "citadel"),
        ("ClusterRole", "citadel-pod-certificates"),
        (
            "ValidatingAdmissionPolicy",
            "citadel-pod-certificate-requests",
        ),
    ] {
        assert!(doc(&defaults, kind, name).is_some(), "{kind} {name}");
    }
    for (kind, name) in [
        ("ClusterRole", "citadel-ambient"),
        ("Role", "citadel-multicluster"),
        ("PersistentVolumeClaim", "citadel-state"),
    ] {
        assert!(doc(&defaults, kind, name).is_none(), "{kind} {name}");
    }
    // Helm installs the CRDs from crds/ (not templates), so upgrades never drop them.
    assert!(!defaults.contains("kind: CustomResourceDefinition"));
    assert_eq!(
        render(&helm, &["--include-crds"])
            .matches("kind: CustomResourceDefinition")
            .count(),
        2
    );

    // Everything on, in another namespace, with another trust domain and signer name.
    let all = template(
        &helm,
        "mesh-ca",
        &[
            "--set",
            "replicaCount=3,trustDomain=example.org,ambient.enabled=true,multicluster.enabled=true",
            "--set",
            "podCertificates.signerName=example.com/svid,ambient.trustedNodeAccounts={kube-system/ztunnel,x/y}",
        ],
    )
    .unwrap();
    has_args(
        &all,
        &[
            "--namespace=mesh-ca",
            "--trust-domain=example.org",
            "--server-dns-name=citadel.mesh-ca.svc",
            "--pod-cert-signer-name=example.com/svid",
            "--trusted-node-accounts=kube-system/ztunnel,x/y",
            "--multicluster",
        ],
    );
    assert!(all.contains("  replicas: 3\n"));
    assert!(doc(&all, "ClusterRole", "citadel-ambient").is_some());
    let mc = doc(&all, "Role", "citadel-multicluster").unwrap();
    assert!(mc.contains("namespace: mesh-ca"));
    let pc = doc(&all, "ClusterRole", "citadel-pod-certificates").unwrap();
    assert!(
        pc.contains(r#"resourceNames: ["example.com/svid"]"#),
        "{pc}"
    );
    assert!(
        pc.contains(r#"resourceNames: ["example.com:svid:roots"]"#),
        "{pc}"
    );
    let vap = doc(
        &all,
        "ValidatingAdmissionPolicy",
        "citadel-pod-certificate-requests",
    )
    .unwrap();
    assert!(
        vap.contains(r#"'object.spec.signerName == "example.com/svid"'"#),
        "{vap}"
    );
    for d in all
        .split("\n---\n")
        .filter(|d| d.contains("kind: ServiceAccount\n"))
    {
        assert!(d.contains("namespace: mesh-ca"), "{d}");
    }

    // Pod Certificates off: the flag, and neither their RBAC nor the policy.
    let off = render(&helm, &["--set", "podCertificates.enabled=false"]);
    has_args(&off, &["--no-pod-certificates"]);
    assert!(doc(&off, "ClusterRole", "citadel-pod-certificates").is_none());
    assert!(doc(
        &off,
        "ValidatingAdmissionPolicy",
        "citadel-pod-certificate-requests"
    )
    .is_none());

    // The file store: one replica on a kept PersistentVolumeClaim, replaced (not rolled),
    // and only the TokenReview grant (no Secrets, Lease, ConfigMaps, Pod Certificates).
    let file = render(&helm, &["--set", "store=file,replicaCount=1"]);
    has_args(&file, &["--store=file"]);
    let pvc = doc(&file, "PersistentVolumeClaim", "citadel-state").unwrap();
    assert!(pvc.contains("helm.sh/resource-policy: keep"));
    let dep = doc(&file, "Deployment", "citadel").unwrap();
    assert!(dep.contains("strategy: {type: Recreate}") && dep.contains("claimName: citadel-state"));
    assert!(doc(&file, "Role", "citadel").is_none());
    assert!(doc(&file, "ClusterRole", "citadel-pod-certificates").is_none());
    let cr = doc(&file, "ClusterRole", "citadel").unwrap();
    assert!(
        cr.contains("tokenreviews") && !cr.contains("configmaps"),
        "{cr}"
    );

    // istiod's RA mode: off by default; on, the flags and `sign` on exactly the signer names
    // (own and mapped), the mapped CA's Secret mounted where its flag points, the roots
    // Secret by name; `approve` only with autoApprove.
    for (kind, name) in [
        ("ClusterRole", "citadel-csr-signer"),
        ("ClusterRole", "citadel-csr-approver"),
    ] {
        assert!(doc(&defaults, kind, name).is_none(), "{kind} {name}");
    }
    assert!(!args(&defaults).iter().any(|a| a.starts_with("--csr-")));
    let ra = template(
        &helm,
        "mesh-ca",
        &[
            "--set",
            "istioRA.enabled=true,istioRA.signerNames={example.com/own}",
            "--set",
            "istioRA.mappedSigners[0].name=example.com/old,istioRA.mappedSigners[0].secret=old-ca",
            "--set",
            "istioRA.mappedSigners[1].name=example.com/older,istioRA.mappedSigners[1].secret=old-ca",
            "--set",
            "istioRA.istiodRequesters={system:serviceaccount:istio:istiod},istioRA.rootSecret=ra-roots",
        ],
    )
    .unwrap();
    has_args(
        &ra,
        &[
            "--csr-signer=example.com/own",
            "--csr-signer=example.com/old=/etc/citadel/csr-ca/old-ca",
            "--csr-signer=example.com/older=/etc/citadel/csr-ca/old-ca",
            "--csr-istiod-requester=system:serviceaccount:istio:istiod",
            "--csr-root-secret=ra-roots",
        ],
    );
    assert!(!args(&ra)
        .iter()
        .any(|a| a.starts_with("--csr-auto-approve")));
    let signer = doc(&ra, "ClusterRole", "citadel-csr-signer").unwrap();
    assert!(
        signer.contains(
            r#"resourceNames: ["example.com/own", "example.com/old", "example.com/older"]
  verbs: ["sign"]"#
        ),
        "{signer}"
    );
    assert!(!signer.contains("approve"), "{signer}");
    let roots = doc(&ra, "Role", "citadel-csr-signer").unwrap();
    assert!(
        roots.contains("namespace: mesh-ca") && roots.contains(r#"resourceNames: ["ra-roots"]"#),
        "{roots}"
    );
    assert!(doc(&ra, "RoleBinding", "citadel-csr-signer").is_some());
    assert!(doc(&ra, "ClusterRole", "citadel-csr-approver").is_none());
    let dep = doc(&ra, "Deployment", "citadel").unwrap();
    // Two names share one Secret: one volume, one mount; its key readable by citadel's
    // group only.
    assert_eq!(dep.matches("secretName: old-ca").count(), 1, "{dep}");
    assert!(
        dep.contains("secret: {secretName: old-ca, defaultMode: 288}")
            && dep.contains("fsGroup: 65532"),
        "{dep}"
    );
    assert!(
        dep.contains("- {name: csr-ca-0, mountPath: /etc/citadel/csr-ca/old-ca, readOnly: true}"),
        "{dep}"
    );
    // autoApprove: the flags and `approve` on the same names; no roots Secret: no Role.
    let approving = render(
        &helm,
        &[
            "--set",
            "istioRA.enabled=true,istioRA.autoApprove={system:serviceaccount:a:b,u2},istioRA.rootSecret=",
        ],
    );
    has_args(
        &approving,
        &[
            "--csr-signer=citadel.dev/spiffe",
            "--csr-istiod-requester=system:serviceaccount:istio-system:istiod",
            "--csr-auto-approve=system:serviceaccount:a:b",
            "--csr-auto-approve=u2",
            "--csr-root-secret=",
        ],
    );
    let approver = doc(&approving, "ClusterRole", "citadel-csr-approver").unwrap();
    assert!(
        approver.contains(
            r#"resourceNames: ["citadel.dev/spiffe"]
  verbs: ["approve"]"#
        ),
        "{approver}"
    );
    assert!(doc(&approving, "ClusterRoleBinding", "citadel-csr-approver").is_some());
    assert!(doc(&approving, "Role", "citadel-csr-signer").is_none());
    assert!(!approving.contains("fsGroup"), "no mapped CA, no fsGroup");

    // Refused, naming the value.
    for (set, why) in [
        ("store=file,replicaCount=2", "replicaCount must be 1"),
        ("store=etcd", "store must be kube or file"),
        ("trustDomain=Example.ORG", "trustDomain"),
        ("replicaCount=0", "replicaCount must be at least 1"),
        (
            "podCertificates.signerName=nodomain",
            "podCertificates.signerName",
        ),
        (
            "ambient.enabled=true,ambient.trustedNodeAccounts=null",
            "trustedNodeAccounts",
        ),
        (
            "istioRA.enabled=true,store=file,replicaCount=1",
            "istioRA (the CSR signer) needs store: kube",
        ),
        (
            "istioRA.enabled=true,istioRA.signerNames=null",
            "at least one signer name",
        ),
        (
            "istioRA.enabled=true,istioRA.signerNames={nodomain}",
            r#"signer name "nodomain""#,
        ),
        (
            "istioRA.enabled=true,istioRA.signerNames={Citadel.dev/x}",
            r#"signer name "Citadel.dev/x""#,
        ),
        (
            "istioRA.enabled=true,istioRA.signerNames={kubernetes.io/kube-apiserver-client}",
            "reserved for Kubernetes",
        ),
        (
            "istioRA.enabled=true,istioRA.signerNames={a.dev/x,a.dev/x}",
            "given twice",
        ),
        (
            "istioRA.enabled=true,istioRA.mappedSigners[0].name=a.dev/y,istioRA.mappedSigners[0].secret=Bad_Secret",
            "secret must name a Secret",
        ),
        (
            "istioRA.enabled=true,istioRA.istiodRequesters=null",
            "istioRA.istiodRequesters needs at least one username",
        ),
        (
            "istioRA.enabled=true,istioRA.rootSecret=Roots",
            "istioRA.rootSecret",
        ),
    ] {
        let err = template(&helm, "istio-system", &["--set", set]).unwrap_err();
        assert!(err.contains(why), "--set {set}: {err}");
    }
}

/// `kubectl apply --server-side --dry-run=server` of what the chart renders, against the real
/// kube-apiserver: the defaults (as deploy/citadel.yaml), every feature on with the CRDs,
/// istiod's RA mode (a mapped CA and auto-approval), and the file store. The API server validates every object (RBAC, the admission policy's CEL,
/// the Deployment) without creating it.
#[tokio::test]
async fn what_the_chart_renders_passes_server_side_dry_run() {
    let Some(helm) = helm() else { return };
    let Some(kube) = KubeEnv::start().await else {
        return;
    };
    if !require_tool("kubectl") {
        return;
    }
    // Namespaced objects need their namespace to exist, even in a dry run.
    kube.namespace("istio-system").await;
    kube.namespace("mesh-ca").await;
    let tmp = tempfile::tempdir().unwrap();
    let cases: [(&str, String, &[&str]); 4] = [
        (
            "deploy/citadel.yaml",
            std::fs::read_to_string("deploy/citadel.yaml").unwrap(),
            &[
                "namespace/istio-system",
                "customresourcedefinition.apiextensions.k8s.io/certificateauthorities.citadel.dev",
                "customresourcedefinition.apiextensions.k8s.io/revocations.citadel.dev",
                "clusterrole.rbac.authorization.k8s.io/citadel-pod-certificates",
                "validatingadmissionpolicy.admissionregistration.k8s.io/citadel-pod-certificate-requests",
                "validatingadmissionpolicybinding.admissionregistration.k8s.io/citadel-pod-certificate-requests",
                "deployment.apps/citadel",
            ],
        ),
        (
            "everything on",
            template(
                &helm,
                "mesh-ca",
                &[
                    "--include-crds",
                    "--set",
                    "replicaCount=3,trustDomain=example.org,ambient.enabled=true,multicluster.enabled=true,podCertificates.signerName=example.com/svid",
                ],
            )
            .unwrap(),
            &[
                "clusterrole.rbac.authorization.k8s.io/citadel-ambient",
                "role.rbac.authorization.k8s.io/citadel-multicluster",
                "rolebinding.rbac.authorization.k8s.io/citadel-multicluster",
                "customresourcedefinition.apiextensions.k8s.io/revocations.citadel.dev",
                "deployment.apps/citadel",
            ],
        ),
        (
            "istiod's RA mode",
            template(
                &helm,
                "mesh-ca",
                &[
                    "--set",
                    "istioRA.enabled=true,istioRA.autoApprove={system:serviceaccount:mesh-ca:requester}",
                    "--set",
                    "istioRA.mappedSigners[0].name=citadel.dev/legacy,istioRA.mappedSigners[0].secret=legacy-cacerts",
                ],
            )
            .unwrap(),
            &[
                "clusterrole.rbac.authorization.k8s.io/citadel-csr-signer",
                "clusterrolebinding.rbac.authorization.k8s.io/citadel-csr-signer",
                "role.rbac.authorization.k8s.io/citadel-csr-signer",
                "rolebinding.rbac.authorization.k8s.io/citadel-csr-signer",
                "clusterrole.rbac.authorization.k8s.io/citadel-csr-approver",
                "clusterrolebinding.rbac.authorization.k8s.io/citadel-csr-approver",
                "deployment.apps/citadel",
            ],
        ),
        (
            "file store",
            template(&helm, "mesh-ca", &["--set", "store=file,replicaCount=1"]).unwrap(),
            &[
                "persistentvolumeclaim/citadel-state",
                "clusterrole.rbac.authorization.k8s.io/citadel",
                "deployment.apps/citadel",
            ],
        ),
    ];
    let dry_run = |manifests: &str| {
        let path = tmp.path().join("manifests.yaml");
        std::fs::write(&path, manifests).unwrap();
        exec(
            Command::new("kubectl")
                .arg("--kubeconfig")
                .arg(&kube.kubeconfig)
                .args(["apply", "--server-side", "--dry-run=server", "-f"])
                .arg(&path),
        )
    };
    for (name, manifests, want) in cases {
        let (ok, text) = dry_run(&manifests);
        assert!(
            ok,
            "{name}: kubectl apply --server-side --dry-run=server failed:\n{text}"
        );
        for object in want {
            assert!(
                text.contains(&format!("{object} serverside-applied (server dry run)")),
                "{name}: {object} missing from:\n{text}"
            );
        }
    }
    // And a broken render is refused by the API server, not only by Helm: a Deployment with
    // a negative replica count.
    let (ok, text) = dry_run(&render(&helm, &[]).replace("replicas: 2", "replicas: -1"));
    assert!(!ok && text.contains("spec.replicas"), "{text}");
}

const RULES: &str = "deploy/prometheus/citadel-rules.yaml";
const DASHBOARD: &str = "deploy/grafana/citadel.json";

/// The alert rules as YAML values.
fn rules() -> Vec<serde_json::Value> {
    let v: serde_json::Value =
        serde_saphyr::from_str(&std::fs::read_to_string(RULES).unwrap()).unwrap();
    v["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap().clone())
        .collect()
}

/// Every `citadel_*` metric name in a PromQL expression (histogram series by their family).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(i) = rest.find("citadel_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

/// `promtool check rules` and `promtool test rules` over deploy/prometheus/tests: every
/// alert has a test where it fires and one where it does not.
#[test]
fn alert_rules_pass_promtool_unit_tests() {
    let Some(promtool) = program("CITADEL_PROMTOOL", Some("promtool")) else {
        return;
    };
    exec_ok(Command::new(&promtool).args(["check", "rules", RULES]));
    let mut tests: Vec<PathBuf> = std::fs::read_dir("deploy/prometheus/tests")
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    tests.sort();
    let text = exec_ok(Command::new(&promtool).args(["test", "rules"]).args(&tests));
    assert_eq!(text.matches("SUCCESS").count(), tests.len(), "{text}");

    // Coverage: each alert name both fires and stays quiet somewhere in the tests.
    let (mut fires, mut quiet) = (BTreeSet::new(), BTreeSet::new());
    for t in &tests {
        let v: serde_json::Value =
            serde_saphyr::from_str(&std::fs::read_to_string(t).unwrap()).unwrap();
        for case in v["tests"].as_array().unwrap() {
            for a in case["alert_rule_test"].as_array().unwrap() {
                let name = a["alertname"].as_str().unwrap().to_string();
                if a["exp_alerts"].as_array().is_some_and(|e| !e.is_empty()) {
                    fires.insert(name);
                } else {
                    quiet.insert(name);
                }
            }
        }
    }
    let names: BTreeSet<String> = rules()
        .iter()
        .map(|r| r["alert"].as_str().unwrap().to_string())
        .collect();
    assert!(names.len() >= 13, "{names:?}");
    for n in &names {
        assert!(fires.contains(n), "no test where {n} fires");
        assert!(quiet.contains(n), "no test where {n} stays quiet");
    }
}

/// A real Prometheus, stopped (by its process id) on drop.
struct Prometheus {
    child: std::process::Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    /// Scrapes `target` every second with the alert rules loaded, on a loopback port it picks;
    /// it checks that the port answers as THIS Prometheus (its config names a marker label)
    /// and picks another if the port was taken meanwhile.
    async fn start(bin: &Path, target: SocketAddr) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let marker = format!("kit-{}-{}", std::process::id(), now());
        let rules = std::fs::canonicalize(RULES).unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n  external_labels: {{kit: {marker}}}\n\
                 rule_files: ['{}']\n\
                 scrape_configs:\n- job_name: citadel\n  static_configs:\n  - targets: ['{target}']\n",
                rules.display()
            ),
        )
        .unwrap();
        let log_path = dir.path().join("prometheus.log");
        for _ in 0..5 {
            let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
            let mut child = Command::new(bin)
                .arg(format!("--config.file={}", config.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join(format!("data-{}", addr.port())).display()
                ))
                .arg(format!("--web.listen-address={addr}"))
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log_path).unwrap())
                .spawn()
                .unwrap();
            for _ in 0..300 {
                if child.try_wait().unwrap().is_some() {
                    break;
                }
                if let Ok((200, body)) = http_get(addr, "/api/v1/status/config").await {
                    if body.contains(&marker) {
                        return Prometheus {
                            child,
                            addr,
                            _dir: dir,
                        };
                    }
                    // Another program answers there: ours will fail to bind.
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let _ = child.kill();
            let _ = child.wait();
            eprintln!(
                "prometheus on {addr} did not come up, trying another port:\n{}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
        }
        panic!(
            "prometheus did not start:\n{}",
            std::fs::read_to_string(&log_path).unwrap_or_default()
        );
    }

    /// GET `path` on the HTTP API: the `data` of a successful answer.
    async fn api(&self, path: &str) -> serde_json::Value {
        let (code, body) = get_http10(self.addr, path).await;
        let v: serde_json::Value =
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {code} {e}: {body}"));
        assert_eq!(v["status"], "success", "{path}: {body}");
        v["data"].clone()
    }

    /// An instant query at `at` (unix seconds): the result vector.
    async fn query(&self, expr: &str, at: f64) -> Vec<serde_json::Value> {
        let data = self
            .api(&format!("/api/v1/query?query={}&time={at}", encode(expr)))
            .await;
        assert_eq!(data["resultType"], "vector", "{expr}: {data}");
        data["result"].as_array().unwrap().clone()
    }
}

/// An HTTP/1.0 GET: the answer is the body up to the close (never chunked, unlike HTTP/1.1
/// answers of a few kilobytes from Go's server).
async fn get_http10(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.unwrap();
    let code = buf
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = buf.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    (code, body.to_string())
}

/// Percent-encodes a query parameter.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Every PromQL expression of the dashboard (panel targets and the `job` variable's query),
/// as Grafana would send it: `$job` as All (`.*`), `$__rate_interval` as 1m.
fn dashboard_queries() -> Vec<(String, String)> {
    let d: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(DASHBOARD).unwrap()).unwrap();
    let mut out = Vec::new();
    for p in d["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().unwrap();
            out.push((
                format!("{} / {}", p["title"].as_str().unwrap(), t["legendFormat"]),
                expr.replace("$job", ".*").replace("$__rate_interval", "1m"),
            ));
        }
    }
    for v in d["templating"]["list"].as_array().unwrap() {
        if let Some(q) = v["query"]["query"].as_str() {
            // label_values(METRIC, LABEL): the series of METRIC.
            let metric = q
                .trim_start_matches("label_values(")
                .split(',')
                .next()
                .unwrap();
            out.push((format!("variable {}", v["name"]), metric.to_string()));
        }
    }
    out
}

/// A real Prometheus scrapes a real citadel (`serve --dev --store kube --auth tokenreview`
/// against the real API server) that has issued certificates, refused bad requests, shed load,
/// reviewed tokens and started a root rotation. Then: the rules load and evaluate without
/// error, every metric a rule uses exists, and every dashboard expression returns data.
#[tokio::test]
async fn prometheus_sees_every_rule_metric_and_every_dashboard_panel_has_data() {
    let Some(prometheus) = program("CITADEL_PROMETHEUS", Some("prometheus")) else {
        return;
    };
    let Some(kube) = KubeEnv::start().await else {
        return;
    };
    kube.namespace("citadel").await;
    kube.service_account("shop", "cart").await;
    let replica = crate::kube::replica_with(
        &kube,
        "kit-0",
        "citadel",
        &["--auth", "tokenreview", "--max-inflight", "1"],
    );
    eventually("the replica leads", 60, async || {
        crate::kube::leads(&replica).await
    })
    .await;
    let prom = Prometheus::start(&prometheus, replica.metrics).await;
    // Scraping before anything happens, so rates see the traffic start.
    until("Prometheus scrapes citadel", 30, async || {
        let up = prom.query("up", now() as f64).await;
        match up.first() {
            Some(s) if s["value"][1] == "1" => Ok(()),
            _ => Err(format!(
                "up: {up:?}; targets: {}",
                prom.api("/api/v1/targets").await
            )),
        }
    })
    .await;

    // A root rotation that stays in its first stage (an hour of propagation), so the
    // rotation gauges exist.
    exec_ok(
        Command::new(BIN)
            .args([
                "ca",
                "rotate-root",
                "--activate-after",
                "1h",
                "--wait",
                "0s",
            ])
            .args(["--store", "kube", "--namespace", "citadel", "--kubeconfig"])
            .arg(&kube.kubeconfig),
    );
    let bundle = until("the two-root bundle", 30, async || {
        match kube.bundle("shop").await {
            Some(b) if b.matches("BEGIN CERTIFICATE").count() == 2 => Ok(b),
            other => Err(format!("{other:?}")),
        }
    })
    .await;

    let t0 = now() as f64;
    let mut client = citadel::client::connect(&citadel::client::ConnectOptions {
        addr: replica.addr.to_string(),
        root_pem: bundle.as_bytes().to_vec(),
        server_name: Some("localhost".into()),
        ..Default::default()
    })
    .await
    .unwrap();
    let (_, csr) = csr_for(KeyType::EcP256, &spiffe("shop", "cart"));
    // Issued: distinct tokens (each a TokenReview), then one token again (a cache hit).
    let token = kube.token("shop", "cart", "istio-ca").await;
    for _ in 0..3 {
        let t = kube.token("shop", "cart", "istio-ca").await;
        call(&mut client, &csr, Some(&bearer(&t)), 0, None)
            .await
            .unwrap();
    }
    for _ in 0..2 {
        call(&mut client, &csr, Some(&bearer(&token)), 0, None)
            .await
            .unwrap();
    }
    // Refused: a token the API server did not sign (Unauthenticated, a refused review), a
    // CSR that does not parse (InvalidArgument), another identity (PermissionDenied).
    let forged = crate::support::token("shop", "cart");
    let e = call(&mut client, &csr, Some(&bearer(&forged)), 0, None)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let e = call(&mut client, "not a CSR", Some(&bearer(&token)), 0, None)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let (_, other) = csr_for(KeyType::EcP256, &spiffe("shop", "other"));
    let e = call(&mut client, &other, Some(&bearer(&token)), 0, None)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    // Shed: --max-inflight 1, and a burst of requests that each need a TokenReview.
    let mut shed = false;
    for _ in 0..10 {
        let mut tokens = Vec::new();
        for _ in 0..16 {
            tokens.push(kube.token("shop", "cart", "istio-ca").await);
        }
        let calls = tokens.iter().map(|t| {
            let (mut c, csr) = (client.clone(), csr.clone());
            let t = bearer(t);
            async move { call(&mut c, &csr, Some(&t), 0, None).await }
        });
        let results = futures_util::future::join_all(calls).await;
        if results.iter().any(|r| {
            r.as_ref()
                .is_err_and(|e| e.code() == Code::ResourceExhausted)
        }) {
            shed = true;
            break;
        }
    }
    assert!(shed, "no request was shed under --max-inflight 1");
    // The server keeps serving after all of it.
    call(&mut client, &csr, Some(&bearer(&token)), 0, None)
        .await
        .unwrap();
    let t1 = now() as f64;

    // Scraped once more after the traffic: evaluate everything at a time that sees it all.
    let at = t1 + 3.0;
    until("Prometheus scraped after the traffic", 30, async || {
        let seen = prom
            .query("citadel_server_success_cert_issuance_count", at)
            .await;
        let issued = seen
            .first()
            .and_then(|s| s["value"][1].as_str()?.parse::<f64>().ok());
        if now() as f64 > at + 1.0 && issued.is_some_and(|n| n >= 6.0) {
            return Ok(());
        }
        Err(format!("issued at {at}: {seen:?}"))
    })
    .await;

    // The rules loaded and evaluate without error.
    let groups = prom.api("/api/v1/rules").await;
    let loaded: Vec<&serde_json::Value> = groups["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .collect();
    assert_eq!(loaded.len(), rules().len(), "{groups}");
    for r in &loaded {
        assert_eq!(r["health"], "ok", "{r}");
    }

    // Every metric a rule uses exists.
    let mut used = BTreeSet::new();
    for r in rules() {
        used.extend(metric_names(r["expr"].as_str().unwrap()));
    }
    assert!(used.len() >= 11, "{used:?}");
    let mut missing = Vec::new();
    for m in &used {
        if prom.query(&format!("count({m})"), at).await.is_empty() {
            missing.push(m.clone());
        }
    }
    assert!(
        missing.is_empty(),
        "metrics the rules use but citadel did not export: {missing:?}"
    );

    // Every dashboard expression returns data, all of it numbers (no NaN: the rates and
    // quantiles cover the traffic above).
    let queries = dashboard_queries();
    assert!(queries.len() >= 25, "{}", queries.len());
    let mut empty = Vec::new();
    for (what, expr) in &queries {
        let result = prom.query(expr, at).await;
        let values: Vec<f64> = result
            .iter()
            .map(|s| s["value"][1].as_str().unwrap().parse::<f64>().unwrap())
            .collect();
        if values.is_empty() || values.iter().any(|v| v.is_nan()) {
            empty.push(format!("{what}: {expr} -> {result:?}"));
        }
    }
    assert!(
        empty.is_empty(),
        "dashboard expressions without data:\n{}",
        empty.join("\n")
    );

    // And the values say what happened: certificates issued in [t0, t1], a review refused,
    // a cache hit, a shed request, one leader, a rotation in stage 1 due in about an hour.
    let value = async |expr: &str| -> f64 {
        let r = prom.query(expr, at).await;
        assert_eq!(r.len(), 1, "{expr}: {r:?}");
        r[0]["value"][1].as_str().unwrap().parse().unwrap()
    };
    assert!(value("sum(citadel_server_success_cert_issuance_count)").await >= 6.0);
    assert!(value(r#"sum(citadel_tokenreview_requests_total{result="refused"})"#).await >= 1.0);
    assert!(
        value(r#"sum(citadel_tokenreview_requests_total{result="authenticated"})"#).await >= 4.0
    );
    assert!(value("sum(citadel_tokenreview_cache_hits_total)").await >= 1.0);
    assert!(value(r#"sum(citadel_server_csr_sign_err_count{error="busy"})"#).await >= 1.0);
    assert_eq!(value("sum(citadel_leader)").await, 1.0);
    assert_eq!(value("max(citadel_ca_root_rotation_stage)").await, 1.0);
    let due = value("max(citadel_ca_root_rotation_next_stage_due_timestamp)").await;
    assert!(
        due > t0 + 3000.0 && due < t1 + 3700.0,
        "{due} vs {t0}..{t1}"
    );
    let journal = value("max(citadel_ca_journal_bytes)").await;
    assert!(journal > 1000.0 && journal < 786_432.0, "{journal}");
    // No alert fires on this healthy CA.
    let alerts = prom.api("/api/v1/alerts").await;
    let firing: Vec<&serde_json::Value> = alerts["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["state"] == "firing")
        .collect();
    assert!(firing.is_empty(), "{firing:?}");
}
