//! The `CertificateAuthority` resource (citadel.dev/v1alpha1) against a REAL kube-apiserver:
//! the schema's refusals, a root rotation requested through the resource and followed through
//! every condition to completion across a leader killed mid-rotation, idempotent re-apply,
//! and the policy stored with the state (file store: `ca rotate-root` needs no server flags).

use std::process::Command;
use std::time::Duration;

use citadel::cluster::ca_resource::{CertificateAuthority, CertificateAuthorityStatus};
use citadel::store::Store;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::ApiResource;

use crate::kube::{leads, ready, replica_in};

fn replica(kube: &KubeEnv, name: &str) -> crate::kube::Replica {
    replica_in(kube, name, "citadel")
}
use crate::support::*;

const CRD: &str = "deploy/crds/certificateauthority.yaml";

/// `kubectl ARGS` against the test API server: success, stdout + stderr.
fn kubectl(kube: &KubeEnv, args: &[&str]) -> (bool, String) {
    let out = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(&kube.kubeconfig)
        .args(args)
        .output()
        .expect("kubectl runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// Installs the CRD from deploy/ and waits until it is served.
pub(crate) async fn install_crd(kube: &KubeEnv) {
    let (ok, out) = kubectl(kube, &["apply", "--server-side", "-f", CRD]);
    assert!(ok, "{out}");
    let (ok, out) = kubectl(
        kube,
        &[
            "wait",
            "--for=condition=Established",
            "--timeout=30s",
            "crd/certificateauthorities.citadel.dev",
        ],
    );
    assert!(ok, "{out}");
}

fn dynamic(kube: &KubeEnv, ns: &str) -> Api<DynamicObject> {
    Api::namespaced_with(
        kube.client.clone(),
        ns,
        &ApiResource::erase::<CertificateAuthority>(&()),
    )
}

fn object(name: &str, spec: serde_json::Value) -> DynamicObject {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "citadel.dev/v1alpha1",
        "kind": "CertificateAuthority",
        "metadata": {"name": name},
        "spec": spec,
    }))
    .unwrap()
}

/// The API server's refusal of `spec`: code 422 and a message containing `want`.
async fn refused(api: &Api<DynamicObject>, name: &str, spec: serde_json::Value, want: &str) {
    match api
        .create(&PostParams::default(), &object(name, spec.clone()))
        .await
    {
        Err(kube::Error::Api(s)) => {
            assert_eq!(s.code, 422, "{spec}: {s:?}");
            assert!(s.message.contains(want), "{spec}: {}", s.message);
        }
        other => panic!("{spec} was accepted: {other:?}"),
    }
}

#[tokio::test]
async fn the_schema_refuses_nonsense_at_the_api_server() {
    let Some(kube) = KubeEnv::start().await else {
        return;
    };
    kube.namespace("citadel").await;
    install_crd(&kube).await;
    let api = dynamic(&kube, "citadel");
    refused(
        &api,
        "negative",
        serde_json::json!({"maxWorkloadTtl": "-1h"}),
        "must be a duration such as 90s",
    )
    .await;
    refused(
        &api,
        "bare-number",
        serde_json::json!({"defaultWorkloadTtl": "3600"}),
        "must be a duration such as 90s",
    )
    .await;
    refused(
        &api,
        "keytype",
        serde_json::json!({"caKeyType": "ec-p521"}),
        "Unsupported value: \"ec-p521\"",
    )
    .await;
    refused(
        &api,
        "fraction",
        serde_json::json!({"rootRotateAt": 1.5}),
        "between 0 and 1",
    )
    .await;
    refused(
        &api,
        "empty-request",
        serde_json::json!({"rootRotation": {"request": ""}}),
        "request must not be empty",
    )
    .await;
    // A valid one is accepted; its trust domain cannot change afterwards, nor be removed.
    api.create(
        &PostParams::default(),
        &object(
            "citadel",
            serde_json::json!({"trustDomain": "cluster.local", "maxWorkloadTtl": "1h"}),
        ),
    )
    .await
    .unwrap();
    for patch in [
        serde_json::json!({"spec": {"trustDomain": "other.example"}}),
        serde_json::json!({"spec": {"trustDomain": null}}),
    ] {
        match api
            .patch("citadel", &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Err(kube::Error::Api(s)) => {
                assert_eq!(s.code, 422, "{s:?}");
                assert!(
                    s.message.contains("trustDomain is immutable"),
                    "{}",
                    s.message
                );
            }
            other => panic!("{patch} was accepted: {other:?}"),
        }
    }
    // Other fields change freely; `kubectl get ca` shows the printer columns.
    api.patch(
        "citadel",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"spec": {"maxWorkloadTtl": "2h"}})),
    )
    .await
    .unwrap();
    let (ok, out) = kubectl(&kube, &["get", "ca", "-n", "citadel"]);
    assert!(ok, "{out}");
    eprintln!("$ kubectl get ca -n citadel\n{out}");
    for col in [
        "TRUST DOMAIN",
        "READY",
        "ROTATION",
        "BUNDLE",
        "DEGRADED",
        "AGE",
    ] {
        assert!(out.contains(col), "{col} missing: {out}");
    }
}

fn condition<'a>(
    s: &'a CertificateAuthorityStatus,
    t: &str,
) -> Option<&'a citadel::cluster::ca_resource::Condition> {
    s.conditions.iter().find(|c| c.type_ == t)
}

async fn status(
    api: &Api<CertificateAuthority>,
) -> Option<(Option<i64>, CertificateAuthorityStatus)> {
    let cr = api.get("citadel").await.ok()?;
    Some((cr.metadata.generation, cr.status?))
}

async fn journal(kube: &KubeEnv) -> citadel::journal::Journal {
    citadel::store::kube::KubeStore::new(kube.client.clone(), "citadel", None)
        .load_journal()
        .await
        .unwrap()
        .unwrap()
        .value
}

#[tokio::test]
async fn a_root_rotation_requested_through_the_resource_completes_across_a_killed_leader() {
    let Some(kube) = KubeEnv::start().await else {
        return;
    };
    kube.namespace("citadel").await;
    kube.namespace("shop").await;
    install_crd(&kube).await;
    // The operator's declaration, with kubectl, before citadel starts: a CA whose leaves
    // live seconds, so a whole staged rotation takes about fifteen.
    let manifest = kube.dir.join("ca.yaml");
    std::fs::write(
        &manifest,
        "apiVersion: citadel.dev/v1alpha1\n\
         kind: CertificateAuthority\n\
         metadata:\n  name: citadel\n  namespace: citadel\n\
         spec:\n  trustDomain: cluster.local\n  caKeyType: ec-p256\n  maxWorkloadTtl: 4s\n  \
         defaultWorkloadTtl: 2s\n  activateAfter: 3s\n  clockSkewMargin: 1s\n  intermediateTtl: 1h\n",
    )
    .unwrap();
    let (ok, out) = kubectl(&kube, &["apply", "-f", manifest.to_str().unwrap()]);
    assert!(ok, "{out}");

    let (a, b) = (replica(&kube, "replica-a"), replica(&kube, "replica-b"));
    eventually("both replicas ready", 30, async || {
        ready(&a).await && ready(&b).await
    })
    .await;
    let api: Api<CertificateAuthority> = Api::namespaced(kube.client.clone(), "citadel");
    eventually(
        "status: Ready, bundle everywhere, nothing degraded",
        20,
        async || {
            let Some((generation, s)) = status(&api).await else {
                return false;
            };
            s.observed_generation == generation
                && condition(&s, "Ready")
                    .is_some_and(|c| c.status == "True" && c.reason == "Signing")
                && condition(&s, "BundlePublished").is_some_and(|c| c.status == "True")
                && condition(&s, "Degraded").is_some_and(|c| c.status == "False")
                && condition(&s, "RootRotationInProgress")
                    .is_some_and(|c| c.status == "False" && c.reason == "NoRotation")
        },
    )
    .await;
    let (_, s0) = status(&api).await.unwrap();
    assert_eq!(s0.roots.len(), 1);
    assert!(!s0.intermediates.is_empty());
    assert!(s0
        .bundle
        .as_ref()
        .is_some_and(|b| b.current == b.namespaces && b.namespaces >= 4));
    // The policy lives with the state: the spec's numbers, and where they came from.
    let j0 = journal(&kube).await;
    let p = j0.policy.clone().expect("the leader stored its policy");
    assert_eq!(
        (
            p.max_ttl_secs,
            p.default_ttl_secs,
            p.activate_after_secs,
            p.skew_margin_secs
        ),
        (4, 2, 3, 1)
    );
    assert_eq!(p.source, "CertificateAuthority citadel/citadel");

    // Applying the same spec again changes nothing: no new generation, no status write, no
    // journal write.
    let rv = api.get("citadel").await.unwrap().metadata.resource_version;
    let secret_rv = |j: Api<k8s_openapi::api::core::v1::Secret>| async move {
        j.get("citadel-ca-journal")
            .await
            .unwrap()
            .metadata
            .resource_version
    };
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(kube.client.clone(), "citadel");
    let jrv = secret_rv(secrets.clone()).await;
    let (ok, out) = kubectl(&kube, &["apply", "-f", manifest.to_str().unwrap()]);
    assert!(ok && out.contains("unchanged"), "{out}");
    tokio::time::sleep(Duration::from_secs(2)).await; // four reconcile intervals
    assert_eq!(
        api.get("citadel").await.unwrap().metadata.resource_version,
        rv,
        "status churn"
    );
    assert_eq!(
        secret_rv(secrets.clone()).await,
        jrv,
        "journal written on a re-apply"
    );

    // Record every status the CA resource goes through from here.
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let watcher = tokio::spawn({
        let (api, seen) = (api.clone(), seen.clone());
        async move {
            loop {
                if let Some((_, s)) = status(&api).await {
                    if let Some(c) = condition(&s, "RootRotationInProgress") {
                        let mut v = seen.lock().unwrap();
                        let key = format!("{}/{}", c.status, c.reason);
                        if v.last() != Some(&key) {
                            v.push(key);
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });

    // The operator asks for a rotation with the CLI, which writes the resource and follows
    // its status. It needs no timing flags: the policy is the server's.
    let out = Command::new(BIN)
        .args([
            "ca",
            "rotate-root",
            "--store",
            "kube",
            "--namespace",
            "citadel",
            "--wait",
            "20s",
        ])
        .arg("--kubeconfig")
        .arg(&kube.kubeconfig)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("requested a root rotation"), "{text}");
    assert!(text.contains("Prepared: stage prepared"), "{text}");
    let request = api
        .get("citadel")
        .await
        .unwrap()
        .spec
        .root_rotation
        .unwrap()
        .request;

    let (_, out) = kubectl(&kube, &["get", "ca", "-n", "citadel"]);
    eprintln!("$ kubectl get ca -n citadel\n{out}");
    let log = std::fs::read_to_string(kube.dir.join("replica-a.log")).unwrap_or_default();
    let line = log
        .lines()
        .find(|l| l.contains("policy: "))
        .unwrap_or_default();
    assert!(line.contains("maxWorkloadTtl=4s (spec)"), "{line}");
    eprintln!("{line}");

    // Kill the leader mid-rotation (-9, no goodbye): the other replica resumes from the journal.
    let (mut leader, follower) = if leads(&a).await { (a, b) } else { (b, a) };
    let _ = leader.child.kill();
    let _ = leader.child.wait();
    eventually("the follower takes over", 15, async || {
        leads(&follower).await
    })
    .await;

    eventually("rotation complete under the new leader", 40, async || {
        let Some((_, s)) = status(&api).await else {
            return false;
        };
        condition(&s, "RootRotationInProgress").is_some_and(|c| c.status == "False")
            && s.root_rotation
                .as_ref()
                .and_then(|r| r.handled_request.as_deref())
                == Some(request.as_str())
            && s.roots.len() == 1
            && condition(&s, "BundlePublished").is_some_and(|c| c.status == "True")
    })
    .await;
    watcher.abort();
    let seen = seen.lock().unwrap().clone();
    eprintln!("RootRotationInProgress went through {seen:?}");
    // Every transition, in order: False/NoRotation before (asserted above), then each stage,
    // then False again (the wait above). Preparing lasts only until the bundle is published,
    // so it may fall between two reads. (The blocking CLI call holds the test's runtime, so
    // the recorder starts reading once it returned, at Prepared.)
    let order = ["True/Prepared", "True/Activated", "True/Retiring"];
    let mut it = seen.iter();
    for want in order {
        assert!(
            it.any(|s| s == want),
            "{want} missing or out of order in {seen:?}"
        );
    }
    let (_, s) = status(&api).await.unwrap();
    assert_ne!(
        s.roots[0].id, s0.roots[0].id,
        "the new root is the only one"
    );
    assert!(condition(&s, "Ready").is_some_and(|c| c.status == "True"));
    // One request, one rotation: the journal holds exactly two roots (old retired, new active).
    let j = journal(&kube).await;
    let roots = j
        .authorities
        .iter()
        .filter(|a| a.role == citadel::journal::Role::Root)
        .count();
    assert_eq!(roots, 2, "a second rotation was started");
    assert_eq!(j.root_rotation_request.as_deref(), Some(request.as_str()));
    let bundle = kube.bundle("shop").await.unwrap();
    assert_eq!(bundle.matches("BEGIN CERTIFICATE").count(), 1);

    // Every step is an Event on the resource, for `kubectl describe ca`.
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(kube.client.clone(), "citadel");
    let reasons: Vec<String> = events
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| {
            e.regarding.as_ref().and_then(|r| r.kind.as_deref()) == Some("CertificateAuthority")
        })
        .filter_map(|e| e.reason)
        .collect();
    for want in [
        "RootRotationRequested",
        "RootRotationPrepared",
        "RootRotationActivated",
        "RootRotationRetiring",
        "RootRotationCompleted",
    ] {
        assert!(
            reasons.iter().any(|r| r == want),
            "no {want} Event: {reasons:?}"
        );
    }
    let (ok, out) = kubectl(&kube, &["describe", "ca", "citadel", "-n", "citadel"]);
    assert!(ok, "{out}");
    eprintln!("$ kubectl describe ca citadel -n citadel\n{out}");

    // Re-applying the handled request starts nothing.
    let secrets_rv = secret_rv(secrets.clone()).await;
    api.patch(
        "citadel",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"spec": {"rootRotation": {"request": request}}})),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let j = journal(&kube).await;
    assert!(j.root_rotation.is_none());
    let _ = secrets_rv;
    drop(follower);
}

/// A spec the server cannot use (a trust domain that is not the CA's) is Degraded with the
/// reason, a Warning Event, and the CA keeps signing.
#[tokio::test]
async fn a_trust_domain_that_is_not_the_cas_degrades_and_keeps_signing_and_drift_is_reported_on_it()
{
    let Some(kube) = KubeEnv::start().await else {
        return;
    };
    kube.namespace("citadel").await;
    install_crd(&kube).await;
    let a = replica(&kube, "replica-a");
    eventually("replica ready", 30, async || ready(&a).await).await;
    // Created after start, naming another trust domain than the journal's.
    let api: Api<CertificateAuthority> = Api::namespaced(kube.client.clone(), "citadel");
    dynamic(&kube, "citadel")
        .create(
            &PostParams::default(),
            &object(
                "citadel",
                serde_json::json!({"trustDomain": "other.example"}),
            ),
        )
        .await
        .unwrap();
    eventually("Degraded TrustDomainMismatch", 15, async || {
        status(&api).await.is_some_and(|(_, s)| {
            condition(&s, "Degraded")
                .is_some_and(|c| c.status == "True" && c.reason == "TrustDomainMismatch")
                && condition(&s, "Ready").is_some_and(|c| c.status == "True")
        })
    })
    .await;
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(kube.client.clone(), "citadel");
    eventually("a Warning Event", 10, async || {
        events
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .iter()
            .any(|e| {
                e.reason.as_deref() == Some("TrustDomainMismatch")
                    && e.type_.as_deref() == Some("Warning")
            })
    })
    .await;
    assert!(ready(&a).await, "still serving");

    // Drift repaired in a namespace is an Event on the CertificateAuthority too, so
    // `kubectl describe ca citadel` shows every repair in one place.
    kube.namespace("shop").await;
    eventually("bundle in shop", 15, async || {
        kube.bundle("shop").await.is_some()
    })
    .await;
    let bundle = kube.bundle("shop").await.unwrap();
    let cms: Api<k8s_openapi::api::core::v1::ConfigMap> =
        Api::namespaced(kube.client.clone(), "shop");
    let mut edited = cms.get("istio-ca-root-cert").await.unwrap();
    edited.data = Some([("root-cert.pem".to_string(), "tampered".to_string())].into());
    cms.replace("istio-ca-root-cert", &PostParams::default(), &edited)
        .await
        .unwrap();
    eventually("the edited ConfigMap put back", 15, async || {
        kube.bundle("shop").await.as_deref() == Some(bundle.as_str())
    })
    .await;
    eventually(
        "a Drifted Event on the CertificateAuthority",
        10,
        async || {
            events
                .list(&Default::default())
                .await
                .unwrap()
                .items
                .iter()
                .any(|e| {
                    e.reason.as_deref() == Some("Drifted")
                        && e.regarding.as_ref().and_then(|r| r.kind.as_deref())
                            == Some("CertificateAuthority")
                        && e.note
                            .as_deref()
                            .is_some_and(|n| n.starts_with("shop/istio-ca-root-cert: "))
                })
        },
    )
    .await;
}

/// File store: the server stores its policy with the state at start, and `ca rotate-root`
/// without flags plans with it (here a 1h max TTL, not the 90d default).
#[tokio::test]
async fn rotate_root_without_flags_plans_with_the_servers_stored_policy() {
    let ca = TestCa::start(&[
        "--max-ttl",
        "1h",
        "--default-ttl",
        "10m",
        "--clock-skew-margin",
        "30s",
    ])
    .await;
    let state = ca.state_dir();
    let store = citadel::store::file::FileStore::open(&state).unwrap();
    let j = store.load_journal().await.unwrap().unwrap().value;
    let p = j.policy.expect("the server stored its policy");
    assert_eq!(
        (p.max_ttl_secs, p.activate_after_secs, p.skew_margin_secs),
        (3600, 3600, 30)
    );
    assert_eq!(p.source, "flags");
    let (ok, out) = cli(&["ca", "rotate-root"], &state);
    assert!(ok, "{out}");
    assert!(
        out.contains("using the server's policy stored with the CA state"),
        "{out}"
    );
    let j = store.load_journal().await.unwrap().unwrap().value;
    let r = j.root_rotation.unwrap();
    assert_eq!(
        r.activate_after_secs, 3600,
        "propagation: the server's --max-ttl"
    );
    assert_eq!(r.retire_after_secs, 3600);
    // A flag still overrides, and says so.
    ca.stop().await;
}
