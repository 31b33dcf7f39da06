//! Abuse of TokenReview authentication, against a REAL kube-apiserver: a flood of tokens
//! must not queue up honest pods' first certificates behind it.

use std::time::{Duration, Instant};

use citadel::pki::KeyType;
use tonic::Code;

use crate::support::*;

/// Every kind of token that cannot pass a review, each distinct.
fn hopeless(i: usize) -> String {
    let mut c = claims("shop", "cart");
    c["jti"] = serde_json::json!(format!("flood-{i}"));
    match i % 4 {
        0 => format!("not-a-jwt-{i}"),
        1 => {
            c["exp"] = serde_json::json!(now() - 3600);
            sign(&c)
        }
        2 => {
            c["aud"] = serde_json::json!(["vault"]);
            sign(&c)
        }
        _ => {
            c["sub"] = serde_json::json!("system:admin");
            sign(&c)
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_flood_neither_reaches_the_api_server_nor_queues_honest_pods() {
    let Some(kube) = KubeEnv::start().await else {
        return;
    };
    kube.service_account("shop", "cart").await;
    let tmp = tempfile::tempdir().unwrap();
    let kubeconfig = kube.kubeconfig.to_str().unwrap().to_string();
    let ca = TestCa::start_in(
        tmp.path(),
        &[
            "--kubeconfig",
            &kubeconfig,
            "--auth",
            "tokenreview",
            "--kube-qps",
            "5",
            "--kube-burst",
            "5",
            "--kube-review-max-wait",
            "1s",
            // This tests the TokenReview path's own bounds, as when a flood comes from many
            // addresses; the per-peer throttle (which would cut this one-address flood off
            // first) is tested in errors.rs.
            "--auth-failure-burst",
            "0",
        ],
    )
    .await;
    let (_, csr) = csr_for(KeyType::EcP256, &spiffe("shop", "cart"));

    // 1. 2,000 tokens that cannot be valid (not a JWT, expired, another audience, not a
    //    service account), from 8 connections at once, while an honest pod asks.
    let before = kube.token_reviews().await;
    let mut flood = Vec::new();
    for w in 0..8 {
        let (mut c, csr) = (ca.client().await, csr.clone());
        flood.push(tokio::spawn(async move {
            for i in 0..250 {
                let t = hopeless(w * 250 + i);
                let err = call(&mut c, &csr, Some(&bearer(&t)), 0, None)
                    .await
                    .unwrap_err();
                assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
                assert!(!err.message().contains(&t), "the token is echoed");
            }
        }));
    }
    let honest = kube.token("shop", "cart", "istio-ca").await;
    let mut client = ca.client().await;
    call(&mut client, &csr, Some(&bearer(&honest)), 0, None)
        .await
        .expect("the honest pod gets its certificate during the flood");
    for f in flood {
        f.await.unwrap();
    }
    assert_eq!(
        kube.token_reviews().await - before,
        1,
        "only the honest token cost a TokenReview"
    );

    // 2. Forgeries that look valid until the API server checks the signature (each one
    //    distinct, so neither the cache nor single-flight absorbs them). They may take every
    //    review slot, but nobody waits past --kube-review-max-wait: the rest get Unavailable
    //    at once, which istio-agent retries.
    let mut forged = Vec::new();
    let t0 = Instant::now();
    let clients = [ca.client().await, ca.client().await];
    for i in 0..200 {
        let (mut c, csr) = (clients[i % 2].clone(), csr.clone());
        forged.push(tokio::spawn(async move {
            let mut cl = claims("shop", "cart");
            cl["jti"] = serde_json::json!(format!("forged-{i}"));
            let start = Instant::now();
            let err = call(&mut c, &csr, Some(&bearer(&sign(&cl))), 0, None)
                .await
                .unwrap_err();
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "a forgery was held {:?}",
                start.elapsed()
            );
            vec![err.code()]
        }));
    }
    let mut unavailable = 0;
    for f in forged {
        for code in f.await.unwrap() {
            assert!(
                matches!(code, Code::Unauthenticated | Code::Unavailable),
                "{code:?}"
            );
            unavailable += usize::from(code == Code::Unavailable);
        }
    }
    let spent = t0.elapsed().as_secs_f64();
    assert!(
        unavailable > 0,
        "200 forgeries at 5 reviews/s must overflow the bounded queue"
    );
    // And an honest pod retrying as istio-agent does (5 tries, backoff) gets through. The
    // sleeps are istio-agent's backoff, the client behaviour under test, not a wait.
    let honest = kube.token("shop", "cart", "istio-ca").await;
    let mut last = None;
    for attempt in 0..5 {
        match call(&mut client, &csr, Some(&bearer(&honest)), 0, None).await {
            Ok(_) => {
                last = None;
                break;
            }
            Err(e) if e.code() == Code::Unavailable => last = Some(e),
            Err(e) => panic!("{e:?}"),
        }
        tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
    }
    assert!(last.is_none(), "{last:?}");
    eprintln!("forgeries: {unavailable} of 200 refused as Unavailable in {spent:.1}s");
    ca.stop().await;
}
