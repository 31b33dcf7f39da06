//! JWT-SVIDs through the real CA port (`citadel.v1.JwtSvidService`): with a dev token and
//! with a client certificate over TLS, each bad input with its exact code (and the server
//! still serving after it), go-spiffe as the third-party validator, and a key rotation on a
//! moved clock whose new tokens go-spiffe accepts against the bundle fetched again.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use citadel::clock::ManualClock;
use citadel::jwtsvid_proto::jwt_svid_service_client::JwtSvidServiceClient;
use citadel::jwtsvid_proto::{FetchJwtBundleRequest, FetchJwtSvidRequest, FetchJwtSvidResponse};
use citadel::pki::KeyType;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::Code;

use crate::support::*;

type JwtClient = JwtSvidServiceClient<Channel>;

const AUD: &str = "spiffe://cluster.local/ns/db/sa/pg";

/// A client of the JWT-SVID service on `ca`'s port: TLS trusting its root (presenting
/// `identity` when given), or plaintext for a `--plaintext` server.
async fn jwt_client(ca: &TestCa, identity: Option<(Vec<u8>, Vec<u8>)>, tls: bool) -> JwtClient {
    let scheme = if tls { "https" } else { "http" };
    let mut ep = Endpoint::from_shared(format!("{scheme}://{}", ca.addr)).unwrap();
    if tls {
        let mut cfg = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca.root_pem()))
            .domain_name("localhost");
        if let Some((cert, key)) = identity {
            cfg = cfg.identity(Identity::from_pem(cert, key));
        }
        ep = ep.tls_config(cfg).unwrap();
    }
    JwtSvidServiceClient::new(ep.connect().await.unwrap())
}

async fn fetch(
    c: &mut JwtClient,
    token: Option<&str>,
    audience: &[&str],
    spiffe_id: &str,
) -> Result<FetchJwtSvidResponse, tonic::Status> {
    let mut req = tonic::Request::new(FetchJwtSvidRequest {
        audience: audience.iter().map(|s| s.to_string()).collect(),
        spiffe_id: spiffe_id.into(),
    });
    if let Some(t) = token {
        req.metadata_mut()
            .insert("authorization", bearer(t).parse().unwrap());
    }
    c.fetch_jwt_svid(req).await.map(|r| r.into_inner())
}

async fn bundle(c: &mut JwtClient, token: &str) -> (String, String, u64) {
    let mut req = tonic::Request::new(FetchJwtBundleRequest {});
    req.metadata_mut()
        .insert("authorization", bearer(token).parse().unwrap());
    let b = c.fetch_jwt_bundle(req).await.unwrap().into_inner();
    (
        b.trust_domain,
        String::from_utf8(b.jwks).unwrap(),
        b.sequence,
    )
}

/// Waits (up to `secs`) for a JWT-SVID signed by `kid`, and returns it.
async fn signed_by(c: &mut JwtClient, token: &str, kid: &str, secs: u64) -> FetchJwtSvidResponse {
    until(&format!("JWT key {kid} signs"), secs, async || {
        let r = fetch(c, Some(token), &[AUD], "")
            .await
            .map_err(|s| s.to_string())?;
        let got = part(&r.token, 0)["kid"].clone();
        (got == kid)
            .then_some(r)
            .ok_or_else(|| format!("signed by {got}"))
    })
    .await
}

fn part(token: &str, i: usize) -> serde_json::Value {
    serde_json::from_slice(&B64.decode(token.split('.').nth(i).unwrap()).unwrap()).unwrap()
}

fn kids(jwks: &str) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_str(jwks).unwrap();
    v["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| {
            assert_eq!(k["use"], "jwt-svid", "{k}");
            k["kid"].as_str().unwrap().to_string()
        })
        .collect()
}

/// go-spiffe's jwtbundle.Parse + jwtsvid.ParseAndValidate (tests/gojwtsvid, built by
/// scripts/test.sh as CITADEL_GOJWTSVID). None skips the caller's check; under CI=true a
/// missing validator fails instead.
fn gojwtsvid() -> Option<std::path::PathBuf> {
    crate::thirdparty::built_program("CITADEL_GOJWTSVID", "the go-spiffe JWT-SVID validator")
}

/// go-spiffe's verdict on `token` against `jwks` for `audience`: the SPIFFE ID, or its reason.
fn gojwtsvid_verify(bin: &Path, token: &str, jwks: &str, audience: &str) -> Result<String, String> {
    let tmp = tempfile::tempdir().unwrap();
    let (t, b) = (tmp.path().join("token"), tmp.path().join("jwks.json"));
    std::fs::write(&t, token).unwrap();
    std::fs::write(&b, jwks).unwrap();
    let out = Command::new(bin)
        .arg(&t)
        .arg(&b)
        .arg("cluster.local")
        .arg(audience)
        .output()
        .unwrap();
    match out.status.code() {
        Some(0) => Ok(String::from_utf8_lossy(&out.stdout).trim().to_string()),
        Some(1) => Err(String::from_utf8_lossy(&out.stderr).trim().to_string()),
        _ => panic!(
            "gojwtsvid-check could not run: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

#[tokio::test]
async fn jwt_svids_over_tls_with_a_token_and_with_a_client_certificate() {
    let ca = TestCa::start(&[]).await;
    let id = spiffe("shop", "cart").to_string();
    let tok = token("shop", "cart");

    // By token.
    let mut c = jwt_client(&ca, None, true).await;
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let r = fetch(&mut c, Some(&tok), &[AUD], "").await.unwrap();
    assert_eq!(r.spiffe_id, id);
    let header = part(&r.token, 0);
    let claims = part(&r.token, 1);
    let kid = header["kid"].as_str().unwrap().to_string();
    assert_eq!(
        header,
        serde_json::json!({"alg": "ES256", "kid": kid, "typ": "JWT"})
    );
    let iat = claims["iat"].as_i64().unwrap();
    assert!(
        iat >= before - 1 && iat <= before + 5,
        "iat {iat} now {before}"
    );
    assert_eq!(
        claims,
        serde_json::json!({"aud": [AUD], "exp": iat + 300, "iat": iat, "sub": id})
    );
    assert_eq!(r.expires_at, iat + 300);
    // Naming its own identity is the same as naming none.
    fetch(&mut c, Some(&tok), &[AUD], &id).await.unwrap();

    // The bundle: by RPC, in the state directory, and from the CLI, all the same.
    let (td, jwks, seq) = bundle(&mut c, &tok).await;
    assert_eq!(td, "cluster.local");
    assert!(seq >= 1);
    assert_eq!(kids(&jwks), vec![kid.clone()]);
    let file = std::fs::read_to_string(ca.state_dir().join("jwt-bundle.json")).unwrap();
    assert_eq!(file, jwks);
    let (ok, out) = cli(&["ca", "jwt-bundle"], &ca.state_dir());
    assert!(ok, "{out}");
    assert_eq!(out.trim_end(), jwks);
    let (ok, out) = cli(&["ca", "status"], &ca.state_dir());
    assert!(ok && out.contains(&kid) && out.contains("active"), "{out}");

    // By client certificate (no token at all).
    let (key, csr) = csr_for(KeyType::EcP256, &spiffe("shop", "cart"));
    let mut x509 = ca.client().await;
    let chain = issue(&mut x509, &csr, "shop", "cart").await;
    let mut m = jwt_client(
        &ca,
        Some((
            chain[..2].concat().into_bytes(),
            key.serialize_pem().into_bytes(),
        )),
        true,
    )
    .await;
    let by_cert = fetch(&mut m, None, &[AUD, "other"], "").await.unwrap();
    assert_eq!(by_cert.spiffe_id, id);
    assert_eq!(
        part(&by_cert.token, 1)["aud"],
        serde_json::json!([AUD, "other"])
    );

    // A real third-party validator.
    if let Some(go) = gojwtsvid() {
        assert_eq!(gojwtsvid_verify(&go, &r.token, &jwks, AUD).unwrap(), id);
        assert_eq!(
            gojwtsvid_verify(&go, &by_cert.token, &jwks, "other").unwrap(),
            id
        );
        let e = gojwtsvid_verify(&go, &r.token, &jwks, "spiffe://cluster.local/ns/x/sa/y")
            .expect_err("a token for another audience");
        assert!(e.contains("REJECTED") && e.contains("audience"), "{e}");
    }

    let m = ca.metrics().await;
    assert!(m.contains("citadel_jwt_svid_issued_total 3"), "{m}");
    ca.stop().await;
}

#[tokio::test]
async fn each_bad_jwt_svid_request_gets_its_code_and_the_server_keeps_serving() {
    let ca = TestCa::start(&[]).await;
    let mut c = jwt_client(&ca, None, true).await;
    let tok = token("shop", "cart");
    let good = async |c: &mut JwtClient| {
        fetch(c, Some(&token("shop", "cart")), &[AUD], "")
            .await
            .expect("still serving")
    };
    let expect = |r: Result<FetchJwtSvidResponse, tonic::Status>, code: Code, text: &str| {
        let s = r.expect_err("refused");
        assert_eq!(s.code(), code, "{s:?}");
        assert!(
            s.message().contains(text),
            "{:?} lacks {text:?}",
            s.message()
        );
    };

    expect(
        fetch(&mut c, Some(&tok), &[], "").await,
        Code::InvalidArgument,
        "at least one audience",
    );
    good(&mut c).await;
    expect(
        fetch(&mut c, Some(&tok), &["a\nb"], "").await,
        Code::InvalidArgument,
        "control characters",
    );
    good(&mut c).await;
    expect(
        fetch(&mut c, None, &[AUD], "").await,
        Code::Unauthenticated,
        "",
    );
    good(&mut c).await;
    expect(
        fetch(&mut c, Some("not.a.token"), &[AUD], "").await,
        Code::Unauthenticated,
        "",
    );
    good(&mut c).await;
    // A token signed by someone else's key.
    let forged = {
        let t = token("shop", "cart");
        let (input, _) = t.rsplit_once('.').unwrap();
        format!("{input}.{}", B64.encode([7u8; 64]))
    };
    expect(
        fetch(&mut c, Some(&forged), &[AUD], "").await,
        Code::Unauthenticated,
        "",
    );
    good(&mut c).await;
    expect(
        fetch(
            &mut c,
            Some(&tok),
            &[AUD],
            "spiffe://cluster.local/ns/bank/sa/vault",
        )
        .await,
        Code::PermissionDenied,
        "but the caller is spiffe://cluster.local/ns/shop/sa/cart",
    );
    good(&mut c).await;
    // The bundle wants a caller too.
    let s = c
        .fetch_jwt_bundle(FetchJwtBundleRequest {})
        .await
        .expect_err("anonymous");
    assert_eq!(s.code(), Code::Unauthenticated);

    // A denied identity gets no JWT-SVID, exactly as it gets no certificate.
    let front = token("shop", "front");
    fetch(&mut c, Some(&front), &[AUD], "").await.unwrap();
    citadel_ok(
        &[
            "revoke",
            "--identity",
            "spiffe://cluster.local/ns/shop/sa/front",
        ],
        &ca.state_dir(),
    );
    eventually("the denial is installed", 10, async || {
        matches!(fetch(&mut c, Some(&front), &[AUD], "").await, Err(s) if s.code() == Code::PermissionDenied)
    })
    .await;
    expect(
        fetch(&mut c, Some(&front), &[AUD], "").await,
        Code::PermissionDenied,
        "revoked by an operator",
    );
    // Its certificate path says the same.
    let (_, csr) = csr_for(KeyType::EcP256, &spiffe("shop", "front"));
    let mut x509 = ca.client().await;
    let s = call(&mut x509, &csr, Some(&bearer(&front)), 0, None)
        .await
        .expect_err("denied");
    assert_eq!(s.code(), Code::PermissionDenied);
    // Others are unaffected, and the denied identity may still read the bundle.
    good(&mut c).await;
    let (_, jwks, _) = bundle(&mut c, &front).await;
    assert_eq!(kids(&jwks).len(), 1);

    let m = ca.metrics().await;
    for line in [
        "citadel_jwt_svid_refused_total{code=\"InvalidArgument\"} 2",
        "citadel_jwt_svid_refused_total{code=\"Unauthenticated\"} 4",
    ] {
        assert!(m.contains(line), "{line} in {m}");
    }
    assert!(m.contains("citadel_jwt_svid_refused_total{code=\"PermissionDenied\"}"));
    ca.stop().await;
}

/// A JWT key rotation on a moved clock, ending at the real time (go-spiffe checks `exp` and
/// `iat` against the wall clock): the new key is in the bundle before it signs, its tokens
/// are refused against the bundle fetched before it existed and accepted against the bundle
/// fetched again, and the old key stays in the bundle while its tokens may live.
#[tokio::test]
async fn after_a_jwt_key_rotation_go_spiffe_accepts_tokens_of_the_new_key() {
    let start = time::OffsetDateTime::now_utc() - time::Duration::minutes(60);
    let clock = Arc::new(ManualClock::new(start));
    let ca = TestCa::start_on_clock(
        clock.clone(),
        &[
            "--plaintext",
            "--jwt-key-ttl",
            "1h",
            "--jwt-bundle-refresh-hint",
            "1m",
            "--reconcile-interval",
            "100ms",
        ],
    )
    .await;
    let mut c = jwt_client(&ca, None, false).await;
    let tok = |clock: &ManualClock| token_at(clock, "shop", "cart");
    let first = fetch(&mut c, Some(&tok(&clock)), &[AUD], "").await.unwrap();
    let kid1 = part(&first.token, 0)["kid"].as_str().unwrap().to_string();
    let (_, old_bundle, seq1) = bundle(&mut c, &tok(&clock)).await;
    assert_eq!(kids(&old_bundle), vec![kid1.clone()]);

    // Half-life (30 min): the successor is prepared and published, not yet signing.
    let state = ca.state_dir();
    let journal = || crate::envoy::journal(&state);
    clock.advance(time::Duration::minutes(31));
    let kid2 = until("the next JWT key is published", 10, async || {
        let j = journal().await;
        let stages: Vec<_> = j.jwt_keys.iter().map(|k| k.stage()).collect();
        j.next_jwt_key()
            .filter(|k| k.published_at.is_some())
            .map(|k| k.kid.clone())
            .ok_or_else(|| format!("{stages:?}"))
    })
    .await;
    let (_, published, seq2) = bundle(&mut c, &tok(&clock)).await;
    assert!(seq2 > seq1, "the key set changed");
    assert_eq!(kids(&published), vec![kid1.clone(), kid2.clone()]);
    let r = fetch(&mut c, Some(&tok(&clock)), &[AUD], "").await.unwrap();
    assert_eq!(
        part(&r.token, 0)["kid"],
        kid1.as_str(),
        "published, not yet signing"
    );

    // 5/6 (50 min) and 5 refresh hints after publication (36 min): the new key signs. Then
    // the clock reaches the real time.
    clock.set(start + time::Duration::minutes(60));
    signed_by(&mut c, &tok(&clock), &kid2, 10).await;
    clock.set(time::OffsetDateTime::now_utc());
    let new = fetch(&mut c, Some(&tok(&clock)), &[AUD], "").await.unwrap();
    assert_eq!(part(&new.token, 0)["kid"], kid2.as_str());
    let (_, again, _) = bundle(&mut c, &tok(&clock)).await;
    assert_eq!(
        kids(&again),
        vec![kid1.clone(), kid2.clone()],
        "the old key stays while its tokens may live"
    );
    let j = journal().await;
    let stages: Vec<_> = j
        .jwt_keys
        .iter()
        .map(|k| (k.kid.clone(), k.stage()))
        .collect();
    assert_eq!(stages, vec![(kid1, "retiring"), (kid2, "active")]);

    if let Some(go) = gojwtsvid() {
        let id = spiffe("shop", "cart").to_string();
        assert_eq!(gojwtsvid_verify(&go, &new.token, &again, AUD).unwrap(), id);
        let e = gojwtsvid_verify(&go, &new.token, &old_bundle, AUD)
            .expect_err("the bundle from before the key existed");
        assert!(e.contains("REJECTED"), "{e}");
    }
    ca.stop().await;
}

#[tokio::test]
async fn jwt_flags_are_checked_at_start() {
    for (flags, text) in [
        (["--jwt-svid-ttl", "2d"], "--jwt-svid-ttl"),
        (["--jwt-key-ttl", "10s"], "--jwt-key-ttl"),
        (
            ["--jwt-bundle-refresh-hint", "0s"],
            "--jwt-bundle-refresh-hint",
        ),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let e = match TestCa::try_start_in(tmp.path(), &flags).await {
            Ok(_) => panic!("{flags:?} accepted"),
            Err(e) => e,
        };
        assert!(e.contains(text), "{e}");
    }
}

/// With `--store kube` the leader publishes the JWT bundle as the ConfigMap
/// `citadel-jwt-bundle` (key `jwks.json`) in its namespace, the same bytes FetchJwtBundle
/// serves; it follows a key change (moved clock), and an edit is put back.
#[tokio::test]
async fn the_jwt_bundle_configmap_appears_and_follows_a_key_change() {
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::api::{Api, PostParams};
    let Some(kube) = KubeEnv::start().await else {
        return;
    };
    kube.namespace("citadel").await;
    let tmp = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(time::OffsetDateTime::now_utc()));
    let kubeconfig = kube.kubeconfig.to_str().unwrap().to_string();
    let ca = TestCa::try_start_with(
        tmp.path(),
        &[
            "--kubeconfig",
            &kubeconfig,
            "--store",
            "kube",
            "--namespace",
            "citadel",
            "--lease-duration",
            "3s",
            "--reconcile-interval",
            "200ms",
            "--no-pod-certificates",
            "--plaintext",
            "--jwt-key-ttl",
            "4h",
            "--jwt-bundle-refresh-hint",
            "1m",
        ],
        "127.0.0.1:0".parse().unwrap(),
        clock.clone(),
    )
    .await
    .unwrap();
    let cms: Api<ConfigMap> = Api::namespaced(kube.client.clone(), "citadel");
    let held = || async {
        cms.get_opt("citadel-jwt-bundle")
            .await
            .ok()
            .flatten()
            .and_then(|c| c.data?.get("jwks.json").cloned())
    };
    let mut c = jwt_client(&ca, None, false).await;
    let tok = token_at(&*clock, "shop", "cart");
    let (_, served, _) = bundle(&mut c, &tok).await;
    assert_eq!(kids(&served).len(), 1);
    until("the JWT bundle ConfigMap", 30, async || {
        let h = held().await;
        (h.as_deref() == Some(served.as_str()))
            .then_some(())
            .ok_or_else(|| format!("{h:?}"))
    })
    .await;

    // Half of the key's life: the next key joins the bundle, and the ConfigMap follows.
    // (A short jump: the lease and the serving certificate live on this clock too.)
    clock.advance(time::Duration::hours(2) + time::Duration::minutes(1));
    let two = until("the ConfigMap holds the next key", 30, async || {
        let h = held().await.unwrap_or_default();
        if h.is_empty() || kids(&h).len() != 2 {
            return Err(h);
        }
        Ok(h)
    })
    .await;
    let (_, served, _) = bundle(&mut c, &token_at(&*clock, "shop", "cart")).await;
    assert_eq!(
        two, served,
        "the ConfigMap and the RPC serve the same bundle"
    );

    // Someone edits it: the leader puts it back.
    let mut cm = cms.get("citadel-jwt-bundle").await.unwrap();
    cm.data
        .as_mut()
        .unwrap()
        .insert("jwks.json".into(), "{\"keys\":[]}".into());
    cms.replace("citadel-jwt-bundle", &PostParams::default(), &cm)
        .await
        .unwrap();
    // The namespace controller repairs it on its next look at the CA namespace; a pass is
    // forced by touching the namespace (an edit of a ConfigMap it does not watch by name).
    let ns: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(kube.client.clone());
    let mut n = ns.get("citadel").await.unwrap();
    n.metadata
        .labels
        .get_or_insert_with(Default::default)
        .insert("touched".into(), "1".into());
    ns.replace("citadel", &PostParams::default(), &n)
        .await
        .unwrap();
    eventually(
        "the edited JWT bundle ConfigMap is repaired",
        30,
        async || held().await.as_deref() == Some(served.as_str()),
    )
    .await;
    ca.stop().await;
}

/// `citadel ca rotate-jwt-key` against a running server on the real clock: the new key is in
/// the bundle at once, signs 5 refresh hints (here 5 x 1s) after its bundle was published,
/// and go-spiffe accepts its tokens against the bundle fetched again (and refuses them
/// against the bundle from before).
#[tokio::test]
async fn rotate_jwt_key_from_the_cli_reaches_a_running_server() {
    let ca = TestCa::start(&["--jwt-bundle-refresh-hint", "1s"]).await;
    let mut c = jwt_client(&ca, None, true).await;
    let tok = token("shop", "cart");
    let first = fetch(&mut c, Some(&tok), &[AUD], "").await.unwrap();
    let kid1 = part(&first.token, 0)["kid"].as_str().unwrap().to_string();
    let (_, before, _) = bundle(&mut c, &tok).await;

    let (ok, out) = cli(&["ca", "rotate-jwt-key"], &ca.state_dir());
    assert!(ok, "{out}");
    let kid2 = out
        .split_whitespace()
        .nth(2)
        .expect("the new kid is printed")
        .to_string();
    assert_ne!(kid2, kid1);
    let t0 = std::time::Instant::now();
    let new = signed_by(&mut c, &tok, &kid2, 20).await;
    assert!(
        t0.elapsed() >= std::time::Duration::from_secs(4),
        "signed {:?} after the request, before the 5s lead",
        t0.elapsed()
    );
    let (_, after, _) = bundle(&mut c, &tok).await;
    assert_eq!(kids(&after), vec![kid1, kid2]);
    if let Some(go) = gojwtsvid() {
        let id = spiffe("shop", "cart").to_string();
        assert_eq!(gojwtsvid_verify(&go, &new.token, &after, AUD).unwrap(), id);
        let e = gojwtsvid_verify(&go, &new.token, &before, AUD).expect_err("old bundle");
        assert!(e.contains("REJECTED"), "{e}");
    }
    ca.stop().await;
}
