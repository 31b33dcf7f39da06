//! Issue #25, section 1: every CertificateAuthority field applies while serving, on every
//! replica, against a REAL kube-apiserver with two `citadel serve --store kube` processes.
//! Each change is followed by the next thing it governs: the next certificate from BOTH
//! replicas (TTLs, the issuing intermediate's key type), the next prepared intermediate
//! (key type, lifetime, the planner's fractions), the next CRL (validity), the next root
//! rotation (root TTL, key type, propagation period, skew margin); and each replica's
//! `status.replicas` entry says it runs the new generation (`SpecApplied`). A refused spec
//! (a bad combination, another trust domain) keeps the previous policy on both replicas.

use std::time::Duration;

use citadel::client::CaClient;
use citadel::cluster::ca_resource::{CertificateAuthority, SPEC_APPLIED};
use citadel::journal::{Journal, Role, Status};
use citadel::pki::KeyType;
use citadel::store::Store;
use kube::api::{Api, Patch, PatchParams};
use x509_parser::prelude::*;

use crate::ca_resource::install_crd;
use crate::kube::{ready, replica_in, Replica};
use crate::support::*;

const NS: &str = "citadel";

async fn journal(kube: &KubeEnv) -> Journal {
    citadel::store::kube::KubeStore::new(kube.client.clone(), NS, None)
        .load_journal()
        .await
        .unwrap()
        .unwrap()
        .value
}

/// Merges `spec` into the resource; its new generation.
async fn change(api: &Api<CertificateAuthority>, spec: serde_json::Value) -> i64 {
    api.patch(
        "citadel",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({ "spec": spec })),
    )
    .await
    .unwrap()
    .metadata
    .generation
    .unwrap()
}

/// Both replicas report `generation` with `SpecApplied` of `status` and `reason`.
async fn both_report(api: &Api<CertificateAuthority>, generation: i64, status: &str, reason: &str) {
    eventually(
        &format!("both replicas report generation {generation}: SpecApplied={status} ({reason})"),
        20,
        async || {
            let Ok(cr) = api.get("citadel").await else {
                return false;
            };
            let Some(s) = cr.status else { return false };
            ["replica-a", "replica-b"].iter().all(|r| {
                s.replicas.get(*r).is_some_and(|e| {
                    e.observed_generation == Some(generation)
                        && e.applied_at.is_some()
                        && e.conditions.iter().any(|c| {
                            c.type_ == SPEC_APPLIED
                                && c.status == status
                                && c.reason == reason
                                && c.observed_generation == Some(generation)
                        })
                })
            })
        },
    )
    .await;
}

async fn client_of(r: &Replica, bundle: &str) -> CaClient {
    citadel::client::connect(&citadel::client::ConnectOptions {
        addr: r.addr.to_string(),
        root_pem: bundle.as_bytes().to_vec(),
        server_name: Some("localhost".into()),
        ..Default::default()
    })
    .await
    .unwrap()
}

/// One CreateCertificate asking for `ttl` seconds (0: the default) from `r`.
async fn ask(r: &Replica, bundle: &str, ttl: i64) -> Result<Vec<String>, tonic::Status> {
    let mut c = client_of(r, bundle).await;
    let (_, csr) = csr_for(KeyType::EcP256, &spiffe("shop", "cart"));
    call(
        &mut c,
        &csr,
        Some(&bearer(&token("shop", "cart"))),
        ttl,
        None,
    )
    .await
}

fn der_of(pem: &str) -> Vec<u8> {
    x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .unwrap()
        .1
        .contents
}

/// notAfter - notBefore of a PEM certificate, seconds, and its public key's length (65 bytes:
/// P-256, 97: P-384).
fn lifetime_and_key(pem: &str) -> (i64, usize) {
    let der = der_of(pem);
    let (_, c) = X509Certificate::from_der(&der).unwrap();
    (
        c.validity().not_after.timestamp() - c.validity().not_before.timestamp(),
        c.public_key().subject_public_key.data.len(),
    )
}

/// The leaf's lifetime and the issuing intermediate's key length, from each replica in turn.
async fn leaf_from_both(a: &Replica, b: &Replica, bundle: &str) -> [(i64, usize); 2] {
    let mut out = [(0, 0); 2];
    for (i, r) in [a, b].into_iter().enumerate() {
        let chain = ask(r, bundle, 0).await.unwrap();
        out[i] = (lifetime_and_key(&chain[0]).0, lifetime_and_key(&chain[1]).1);
    }
    out
}

/// The leaf's notBefore is backdated two minutes.
const BACKDATE: i64 = 120;

/// A leaf lifetime of `ttl` seconds (plus the backdate), give or take the second the clock
/// ticked between notBefore and notAfter.
fn lives(lifetime: i64, ttl: i64) -> bool {
    (lifetime - ttl - BACKDATE).abs() <= 1
}

#[tokio::test]
async fn every_spec_field_applies_on_both_running_replicas_and_each_reports_it() {
    let Some(kube) = KubeEnv::start().await else {
        return;
    };
    kube.namespace(NS).await;
    kube.namespace("shop").await;
    install_crd(&kube).await;
    let api: Api<CertificateAuthority> = Api::namespaced(kube.client.clone(), NS);
    // No trustDomain in the spec (set later, to another value, to be refused).
    let cr: CertificateAuthority = serde_json::from_value(serde_json::json!({
        "apiVersion": "citadel.dev/v1alpha1",
        "kind": "CertificateAuthority",
        "metadata": {"name": "citadel", "namespace": NS},
        "spec": {
            "caKeyType": "ec-p256",
            "defaultWorkloadTtl": "1h",
            "maxWorkloadTtl": "2h",
            "intermediateTtl": "1h",
        },
    }))
    .unwrap();
    api.create(&Default::default(), &cr).await.unwrap();
    let (a, b) = (
        replica_in(&kube, "replica-a", NS),
        replica_in(&kube, "replica-b", NS),
    );
    eventually("both replicas ready", 30, async || {
        ready(&a).await && ready(&b).await
    })
    .await;
    let g1 = api
        .get("citadel")
        .await
        .unwrap()
        .metadata
        .generation
        .unwrap();
    both_report(&api, g1, "True", "Applied").await;
    let bundle: String = journal(&kube)
        .await
        .trusted_roots()
        .map(|r| r.cert_pem.clone())
        .collect();
    for (lifetime, key) in leaf_from_both(&a, &b, &bundle).await {
        assert!(
            lives(lifetime, 3600) && key == 65,
            "the start spec: {lifetime} {key}"
        );
    }

    // defaultWorkloadTtl and maxWorkloadTtl: the next certificate from each replica.
    let changed_at = std::time::Instant::now();
    let g = change(
        &api,
        serde_json::json!({"defaultWorkloadTtl": "30m", "maxWorkloadTtl": "40m"}),
    )
    .await;
    both_report(&api, g, "True", "Applied").await;
    let applied_in = changed_at.elapsed();
    for (lifetime, _) in leaf_from_both(&a, &b, &bundle).await {
        assert!(lives(lifetime, 1800), "{} {lifetime}", "defaultWorkloadTtl");
    }
    for r in [&a, &b] {
        let e = ask(r, &bundle, 3600).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains("2400"), "{}", e.message());
        // ... and the replica keeps serving.
        assert!(ask(r, &bundle, 2400).await.is_ok());
    }

    // An impossible combination: refused by both replicas with the reason, the previous
    // policy runs on.
    let g = change(&api, serde_json::json!({"defaultWorkloadTtl": "50m"})).await;
    both_report(&api, g, "False", "InvalidSpec").await;
    let msg = api.get("citadel").await.unwrap().status.unwrap().replicas["replica-a"].conditions[0]
        .message
        .clone();
    assert!(msg.contains("previous policy"), "{msg}");
    for (lifetime, _) in leaf_from_both(&a, &b, &bundle).await {
        assert!(
            lives(lifetime, 1800),
            "{} {lifetime}",
            "the previous policy runs on"
        );
    }
    let g = change(&api, serde_json::json!({"defaultWorkloadTtl": "20m"})).await;
    both_report(&api, g, "True", "Applied").await;
    for (lifetime, _) in leaf_from_both(&a, &b, &bundle).await {
        assert!(lives(lifetime, 1200), "{lifetime}");
    }

    // crlValidity: shorter than the current CRLs', so they are re-signed at once with it.
    let g = change(&api, serde_json::json!({"crlValidity": "1h"})).await;
    both_report(&api, g, "True", "Applied").await;
    eventually(
        "every CRL re-signed with the new validity",
        20,
        async || {
            let j = journal(&kube).await;
            !j.crls.is_empty() && j.crls.iter().all(|c| c.next_update - c.signed_at == 3600)
        },
    )
    .await;
    let j = journal(&kube).await;
    let active = j.active_signer().unwrap().id.clone();
    let crl = j.crls.iter().find(|c| c.issuer == active).unwrap();
    let der = der_of(&crl.pem);
    let (_, parsed) = CertificateRevocationList::from_der(&der).unwrap();
    assert_eq!(
        parsed.next_update().unwrap().timestamp() - parsed.last_update().timestamp(),
        3600 + 60,
        "the signed CRL says it (thisUpdate is backdated a minute)"
    );

    // caKeyType and intermediateTtl: the next intermediate. The planner's fractions make it
    // due at once (prepared at 1%, active at 2% of a 1h life), so it also signs the next
    // leaves on both replicas.
    let before = j.active_signer().unwrap().id.clone();
    let g = change(
        &api,
        serde_json::json!({"caKeyType": "ec-p384", "intermediateTtl": "2h"}),
    )
    .await;
    both_report(&api, g, "True", "Applied").await;
    let g = change(
        &api,
        serde_json::json!({"intermediatePrepareAt": 0.01, "intermediateActivateAt": 0.02}),
    )
    .await;
    both_report(&api, g, "True", "Applied").await;
    eventually("a P-384 intermediate of 2h signs", 120, async || {
        let j = journal(&kube).await;
        j.active_signer().is_some_and(|s| {
            let (life, key) = lifetime_and_key(&s.cert_pem);
            s.id != before && key == 97 && (life - 7200).abs() <= 300
        })
    })
    .await;
    eventually(
        "both replicas sign with a P-384 intermediate",
        20,
        async || {
            leaf_from_both(&a, &b, &bundle)
                .await
                .iter()
                .all(|(_, key)| *key == 97)
        },
    )
    .await;
    // Calm the planner again.
    let g = change(
        &api,
        serde_json::json!({"intermediatePrepareAt": 0.5, "intermediateActivateAt": 0.8}),
    )
    .await;
    both_report(&api, g, "True", "Applied").await;

    // rootTtl, rootRotateAt, activateAfter, clockSkewMargin: the next root rotation starts
    // (rotateAt 1e-7 of a 10-year root is 32 s into its life), with the new root's lifetime
    // and key type, the new propagation period, and a grace of maxWorkloadTtl + the margin.
    let g = change(
        &api,
        serde_json::json!({"rootTtl": "2d", "activateAfter": "7m", "clockSkewMargin": "3m", "rootRotateAt": 0.0000001}),
    )
    .await;
    both_report(&api, g, "True", "Applied").await;
    eventually(
        "an automatic root rotation under the new policy",
        60,
        async || journal(&kube).await.root_rotation.is_some(),
    )
    .await;
    let j = journal(&kube).await;
    let r = j.root_rotation.clone().unwrap();
    assert_eq!(r.activate_after_secs, 7 * 60, "activateAfter");
    assert_eq!(
        r.old_root_grace_secs,
        2400 + 180,
        "maxWorkloadTtl + clockSkewMargin"
    );
    let root = j.authorities.iter().find(|x| x.id == r.new_root).unwrap();
    assert_eq!((root.role, root.status), (Role::Root, Status::Prepared));
    let (life, key) = lifetime_and_key(&root.cert_pem);
    assert!((life - 2 * 86_400).abs() <= 300, "rootTtl: {life}");
    assert_eq!(key, 97, "caKeyType");
    // Stop automatic rotations again.
    let g = change(&api, serde_json::json!({"rootRotateAt": 0.8})).await;
    both_report(&api, g, "True", "Applied").await;

    // The policy stored with the state is the running one.
    let p = journal(&kube).await.policy.unwrap();
    assert_eq!(
        (
            p.default_ttl_secs,
            p.max_ttl_secs,
            p.crl_validity_secs,
            p.key_type.as_str()
        ),
        (1200, 2400, 3600, "ec-p384")
    );

    // trustDomain: the one thing that cannot change while serving. Setting another one is
    // refused by both replicas, which keep signing with the running policy.
    let g = change(
        &api,
        serde_json::json!({"trustDomain": "other.org", "defaultWorkloadTtl": "10m"}),
    )
    .await;
    both_report(&api, g, "False", "TrustDomainMismatch").await;
    for (lifetime, _) in leaf_from_both(&a, &b, &bundle).await {
        assert!(
            lives(lifetime, 1200),
            "{} {lifetime}",
            "the previous policy runs on"
        );
    }
    eprintln!(
        "live spec: a TTL change was reported applied by both replicas {:.2} s after the patch",
        applied_in.as_secs_f64()
    );
    assert!(applied_in < Duration::from_secs(5), "{applied_in:?}");
}
