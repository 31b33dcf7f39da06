//! The SPIFFE Workload API of `citadel agent` (`--workload-api-socket`): the spec's rules
//! checked with our own client over the socket (exact codes, the server serving on after each
//! refusal), the JWT methods against a fake CA, reflection, and real clients written by others
//! (go-spiffe's `workloadapi`, py-spiffe) through renewal and a root rotation.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use citadel::agent::fetch::{fetch, FetchConfig, FetchError};
use citadel::agent::jwt::{JwtBundle, JwtCa, JwtSvid};
use citadel::agent::workload::{self, WorkloadApi};
use citadel::agent::{AgentStats, Credentials};
use citadel::auth::jws::SigningKey;
use citadel::client::ClientError;
use citadel::pki::KeyType;
use citadel::shutdown::{self, Trigger};
use citadel::workload_proto::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use citadel::workload_proto::{
    JwtBundlesRequest, JwtsvidRequest, ValidateJwtsvidRequest, X509BundlesRequest, X509svidRequest,
};
use tokio::io::AsyncBufReadExt;
use tokio::sync::watch;
use tonic::transport::Channel;
use tonic::Code;

use crate::support::*;

type Client = SpiffeWorkloadApiClient<Channel>;

async fn client(path: &Path) -> Client {
    SpiffeWorkloadApiClient::new(uds_channel(path.to_path_buf()).await)
}

/// A request with the header set to each of `values` (none: no header).
fn req<T>(msg: T, values: &[&str]) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    for v in values {
        r.metadata_mut()
            .append(workload::HEADER, v.parse().unwrap());
    }
    r
}

fn ok<T>(msg: T) -> tonic::Request<T> {
    req(msg, &["true"])
}

/// A CA that signs JWT-SVIDs with `key` for whoever asks, or fails with `fail`.
struct FakeCa {
    key: SigningKey,
    fail: Mutex<Option<Code>>,
    asked: Mutex<Vec<Vec<String>>>,
}

impl FakeCa {
    fn new() -> Arc<Self> {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = ring::signature::EcdsaKeyPair::generate_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &rng,
        )
        .unwrap();
        let pem = citadel::pki::pem::encode("PRIVATE KEY", pkcs8.as_ref());
        Arc::new(Self {
            key: SigningKey::from_pkcs8_pem(&pem).unwrap(),
            fail: Mutex::new(None),
            asked: Mutex::new(vec![]),
        })
    }

    fn bundle(&self, sequence: u64) -> JwtBundle {
        let mut jwk = self.key.public_jwk();
        jwk["use"] = serde_json::json!("jwt-svid");
        let doc = serde_json::json!({"keys": [jwk], "spiffe_sequence": sequence});
        JwtBundle::parse(td(), doc.to_string().into_bytes(), sequence).unwrap()
    }

    fn failing(&self) -> Result<(), FetchError> {
        match *self.fail.lock().unwrap() {
            Some(code) => Err(FetchError::Client(ClientError::Rpc {
                code,
                message: "fake".into(),
            })),
            None => Ok(()),
        }
    }
}

#[tonic::async_trait]
impl JwtCa for FakeCa {
    async fn fetch_jwt_svid(
        &self,
        current: &Credentials,
        audience: Vec<String>,
    ) -> Result<JwtSvid, FetchError> {
        self.failing()?;
        self.asked.lock().unwrap().push(audience.clone());
        let exp = now() + 300;
        let token = self.key.sign(&serde_json::json!({
            "sub": current.identity.to_string(), "aud": audience, "exp": exp, "iat": now()
        }));
        Ok(JwtSvid {
            spiffe_id: current.identity.clone(),
            token,
            expires_at: exp,
        })
    }

    async fn fetch_jwt_bundle(&self, _: &Credentials) -> Result<JwtBundle, FetchError> {
        self.failing()?;
        Ok(self.bundle(1))
    }
}

/// A Workload API served at `path` from channels the test drives.
struct Served {
    path: PathBuf,
    creds: watch::Sender<Option<Arc<Credentials>>>,
    jwt: watch::Sender<Option<Arc<JwtBundle>>>,
    ca: Arc<FakeCa>,
    trigger: Trigger,
    task: tokio::task::JoinHandle<Result<(), String>>,
}

impl Served {
    async fn start(
        path: &Path,
        first: Option<Arc<Credentials>>,
        uids: Option<Vec<u32>>,
        mode: u32,
    ) -> Self {
        let ca = FakeCa::new();
        Self::start_with(path, first, uids, mode, ca.clone(), ca).await
    }

    /// Served with JWT-SVIDs from `jwt_ca` (`ca` stays the handle tests drive).
    async fn start_with(
        path: &Path,
        first: Option<Arc<Credentials>>,
        uids: Option<Vec<u32>>,
        mode: u32,
        ca: Arc<FakeCa>,
        jwt_ca: Arc<dyn JwtCa>,
    ) -> Self {
        let (creds, rx) = watch::channel(first);
        let (jwt, jwt_rx) = watch::channel(None);
        let api = WorkloadApi::new(
            rx,
            jwt_rx,
            jwt_ca,
            citadel::clock::system(),
            AgentStats::new(),
            uids,
        );
        let (trigger, sd) = shutdown::channel();
        let p = path.to_path_buf();
        let task = tokio::spawn(async move { workload::serve(&p, mode, api, sd).await });
        eventually("the socket accepting", 5, async || {
            std::os::unix::net::UnixStream::connect(path).is_ok()
        })
        .await;
        Served {
            path: path.to_path_buf(),
            creds,
            jwt,
            ca,
            trigger,
            task,
        }
    }

    async fn stop(self) {
        self.trigger.trigger();
        let r = tokio::time::timeout(Duration::from_secs(5), self.task).await;
        assert!(
            matches!(r, Ok(Ok(Ok(())))),
            "server did not stop cleanly: {r:?}"
        );
    }
}

/// Real credentials from a real CA, as the agent's renewal would fetch them.
async fn real_creds(ca: &TestCa, sa: &str, version: u64) -> Arc<Credentials> {
    let token_file = ca.dir.join(format!("{sa}-{version}.jwt"));
    std::fs::write(&token_file, token("shop", sa)).unwrap();
    let cfg = FetchConfig {
        ca_addr: ca.addr.to_string(),
        ca_root_pem: ca.root_pem(),
        ca_root_file: None,
        tls_server_name: Some("localhost".into()),
        token_file: Some(token_file),
        trust_domain: td(),
        identity: None,
        key_type: KeyType::EcP256,
        cert_ttl: Duration::from_secs(3600),
        plaintext: false,
    };
    Arc::new(
        fetch(&cfg, None, time::OffsetDateTime::now_utc(), version)
            .await
            .unwrap(),
    )
}

fn der_certs(pem: &str) -> Vec<u8> {
    citadel::pki::pem::parse_certs(pem.as_bytes())
        .unwrap()
        .iter()
        .flat_map(|c| c.as_ref().to_vec())
        .collect()
}

/// The code each of the five methods answers with `header` (None: it succeeded).
async fn codes(c: &mut Client, header: &[&str]) -> [Option<Code>; 5] {
    let code = |r: Result<(), tonic::Status>| r.err().map(|e| e.code());
    [
        code(
            c.fetch_x509svid(req(X509svidRequest {}, header))
                .await
                .map(drop),
        ),
        code(
            c.fetch_x509_bundles(req(X509BundlesRequest {}, header))
                .await
                .map(drop),
        ),
        code(
            c.fetch_jwtsvid(req(
                JwtsvidRequest {
                    audience: vec!["db".into()],
                    spiffe_id: String::new(),
                },
                header,
            ))
            .await
            .map(drop),
        ),
        code(
            c.fetch_jwt_bundles(req(JwtBundlesRequest {}, header))
                .await
                .map(drop),
        ),
        code(
            c.validate_jwtsvid(req(
                ValidateJwtsvidRequest {
                    audience: "db".into(),
                    svid: "x.y.z".into(),
                },
                header,
            ))
            .await
            .map(drop),
        ),
    ]
}

/// The next message of a stream, within 5 s.
async fn next<T>(st: &mut tonic::Streaming<T>) -> T {
    tokio::time::timeout(Duration::from_secs(5), st.message())
        .await
        .expect("a message within 5s")
        .unwrap()
        .unwrap()
}

/// Every method without the header, with `false`, and with two values: InvalidArgument each
/// time; afterwards the same server answers a proper call.
#[tokio::test]
async fn a_missing_false_or_repeated_header_is_invalid_argument_and_serving_goes_on() {
    let ca = TestCa::start(&[]).await;
    let creds = real_creds(&ca, "cart", 1).await;
    let tmp = tempfile::tempdir().unwrap();
    let s = Served::start(
        &tmp.path().join("api.sock"),
        Some(creds.clone()),
        None,
        0o600,
    )
    .await;
    s.jwt.send_replace(Some(Arc::new(s.ca.bundle(1))));
    let mut c = client(&s.path).await;
    for header in [&[][..], &["false"], &["TRUE"], &["true", "true"]] {
        let got = codes(&mut c, header).await;
        assert_eq!(got, [Some(Code::InvalidArgument); 5], "header {header:?}");
    }
    // The same connection, then a new one, still get answers.
    let first = c
        .fetch_x509svid(ok(X509svidRequest {}))
        .await
        .unwrap()
        .into_inner()
        .message()
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.svids[0].spiffe_id, spiffe("shop", "cart").to_string());
    let mut fresh = client(&s.path).await;
    assert!(fresh
        .fetch_x509_bundles(ok(X509BundlesRequest {}))
        .await
        .is_ok());
    s.stop().await;
    ca.stop().await;
}

/// Before the first SVID every method is Unavailable (clients retry); the moment credentials
/// arrive, a stream opened then gets its first message at once, holding the full state.
#[tokio::test]
async fn unavailable_before_the_first_svid_then_the_full_state_at_once() {
    let ca = TestCa::start(&[]).await;
    let tmp = tempfile::tempdir().unwrap();
    let s = Served::start(&tmp.path().join("api.sock"), None, None, 0o600).await;
    let mut c = client(&s.path).await;
    let got = codes(&mut c, &["true"]).await;
    assert_eq!(got, [Some(Code::Unavailable); 5]);

    let creds = real_creds(&ca, "cart", 1).await;
    s.creds.send_replace(Some(creds.clone()));
    let mut svids = c
        .fetch_x509svid(ok(X509svidRequest {}))
        .await
        .unwrap()
        .into_inner();
    let m = tokio::time::timeout(Duration::from_secs(2), svids.message())
        .await
        .expect("the first message at once")
        .unwrap()
        .unwrap();
    assert_eq!(m.svids.len(), 1);
    let svid = &m.svids[0];
    assert_eq!(svid.spiffe_id, creds.identity.to_string());
    assert_eq!(
        svid.x509_svid,
        der_certs(&creds.chain_pem),
        "leaf then intermediates, DER"
    );
    assert_eq!(svid.bundle, der_certs(&creds.roots_pem));
    assert_eq!(
        svid.x509_svid_key,
        ::pem::parse(creds.key_pem.as_bytes())
            .unwrap()
            .into_contents(),
        "PKCS#8 DER"
    );
    assert!(m.federated_bundles.is_empty());
    let mut bundles = c
        .fetch_x509_bundles(ok(X509BundlesRequest {}))
        .await
        .unwrap()
        .into_inner();
    let b = bundles.message().await.unwrap().unwrap();
    assert_eq!(
        b.bundles.keys().collect::<Vec<_>>(),
        ["spiffe://cluster.local"],
        "own trust domain always present"
    );
    assert_eq!(
        b.bundles["spiffe://cluster.local"],
        der_certs(&creds.roots_pem)
    );
    s.stop().await;
    ca.stop().await;
}

/// Renewal, a rotated bundle and a new CRL each push a new message with the full state to
/// every open stream.
#[tokio::test]
async fn streams_get_every_renewal_rotation_and_crl_change() {
    let ca = TestCa::start(&[]).await;
    let first = real_creds(&ca, "cart", 1).await;
    let tmp = tempfile::tempdir().unwrap();
    let s = Served::start(
        &tmp.path().join("api.sock"),
        Some(first.clone()),
        None,
        0o600,
    )
    .await;
    let mut c = client(&s.path).await;
    let mut svids = c
        .fetch_x509svid(ok(X509svidRequest {}))
        .await
        .unwrap()
        .into_inner();
    let mut bundles = c
        .fetch_x509_bundles(ok(X509BundlesRequest {}))
        .await
        .unwrap()
        .into_inner();
    let m: citadel::workload_proto::X509svidResponse = next(&mut svids).await;
    assert_eq!(m.svids[0].x509_svid, der_certs(&first.chain_pem));

    // Renewal: a new certificate.
    let renewed = real_creds(&ca, "cart", 2).await;
    s.creds.send_replace(Some(renewed.clone()));
    let m: citadel::workload_proto::X509svidResponse = next(&mut svids).await;
    assert_eq!(m.svids[0].x509_svid, der_certs(&renewed.chain_pem));
    assert_ne!(der_certs(&renewed.chain_pem), der_certs(&first.chain_pem));
    let _: citadel::workload_proto::X509BundlesResponse = next(&mut bundles).await;
    let _: citadel::workload_proto::X509BundlesResponse = next(&mut bundles).await;

    // Rotation: the bundle grows a second root (another CA's, for the test).
    let other = TestCa::start(&[]).await;
    let mut rotated = (*renewed).clone();
    rotated.roots_pem = format!(
        "{}{}",
        renewed.roots_pem,
        String::from_utf8(other.root_pem()).unwrap()
    );
    rotated.version = 3;
    s.creds.send_replace(Some(Arc::new(rotated.clone())));
    let m: citadel::workload_proto::X509svidResponse = next(&mut svids).await;
    assert_eq!(m.svids[0].bundle, der_certs(&rotated.roots_pem));
    assert_eq!(
        citadel::pki::pem::parse_certs(rotated.roots_pem.as_bytes())
            .unwrap()
            .len(),
        2
    );
    let b: citadel::workload_proto::X509BundlesResponse = next(&mut bundles).await;
    assert_eq!(
        b.bundles["spiffe://cluster.local"],
        der_certs(&rotated.roots_pem)
    );

    // A CRL (the CA's real one) arrives: both streams carry it, DER.
    let crl_pem = std::fs::read_to_string(ca.state_dir().join("ca-crl.pem")).unwrap();
    let mut with_crl = rotated.clone();
    with_crl.crl_pem = Some(crl_pem.clone());
    with_crl.version = 4;
    s.creds.send_replace(Some(Arc::new(with_crl)));
    let crl_der: Vec<Vec<u8>> = ::pem::parse_many(crl_pem.as_bytes())
        .unwrap()
        .into_iter()
        .map(|p| p.into_contents())
        .collect();
    assert!(!crl_der.is_empty());
    let m: citadel::workload_proto::X509svidResponse = next(&mut svids).await;
    assert_eq!(m.crl, crl_der);
    assert_eq!(m.svids.len(), 1, "the full state, not a delta");
    let b: citadel::workload_proto::X509BundlesResponse = next(&mut bundles).await;
    assert_eq!(b.crl, crl_der);
    s.stop().await;
    other.stop().await;
    ca.stop().await;
}

/// With `--workload-api-uid`, a caller of another UID has no identity: PermissionDenied on
/// every method, the header still checked first, and the server answers on.
#[tokio::test]
async fn a_caller_outside_the_allowed_uids_gets_permission_denied() {
    let ca = TestCa::start(&[]).await;
    let creds = real_creds(&ca, "cart", 1).await;
    let tmp = tempfile::tempdir().unwrap();
    let me = std::fs::metadata(tmp.path()).unwrap().uid();
    let denied = Served::start(
        &tmp.path().join("denied.sock"),
        Some(creds.clone()),
        Some(vec![me.wrapping_add(1)]),
        0o600,
    )
    .await;
    let mut c = client(&denied.path).await;
    for _ in 0..2 {
        let got = codes(&mut c, &["true"]).await;
        assert_eq!(got, [Some(Code::PermissionDenied); 5]);
        let no_header = c
            .fetch_x509svid(req(X509svidRequest {}, &[]))
            .await
            .unwrap_err();
        assert_eq!(
            no_header.code(),
            Code::InvalidArgument,
            "the header is checked first"
        );
    }
    let allowed = Served::start(
        &tmp.path().join("allowed.sock"),
        Some(creds),
        Some(vec![me]),
        0o600,
    )
    .await;
    let mut c = client(&allowed.path).await;
    assert!(c.fetch_x509svid(ok(X509svidRequest {})).await.is_ok());
    denied.stop().await;
    allowed.stop().await;
    ca.stop().await;
}

/// FetchJWTSVID, FetchJWTBundles and ValidateJWTSVID over a fake CA: the rules and codes.
#[tokio::test]
async fn jwt_methods_follow_the_rules_with_a_fake_ca() {
    let ca = TestCa::start(&[]).await;
    let creds = real_creds(&ca, "cart", 1).await;
    let tmp = tempfile::tempdir().unwrap();
    let s = Served::start(
        &tmp.path().join("api.sock"),
        Some(creds.clone()),
        None,
        0o600,
    )
    .await;
    let mut c = client(&s.path).await;
    let jwt_req = |aud: &[&str], id: &str| {
        ok(JwtsvidRequest {
            audience: aud.iter().map(|a| a.to_string()).collect(),
            spiffe_id: id.into(),
        })
    };
    // Bad input: no audience, an empty one, too many; another identity.
    for (r, code) in [
        (jwt_req(&[], ""), Code::InvalidArgument),
        (jwt_req(&[""], ""), Code::InvalidArgument),
        (jwt_req(&["a"; 17], ""), Code::InvalidArgument),
        (
            jwt_req(&["db"], "spiffe://cluster.local/ns/shop/sa/admin"),
            Code::PermissionDenied,
        ),
    ] {
        assert_eq!(c.fetch_jwtsvid(r).await.unwrap_err().code(), code);
    }
    assert!(
        s.ca.asked.lock().unwrap().is_empty(),
        "refused before asking the CA"
    );
    let r = c
        .fetch_jwtsvid(jwt_req(&["db", "cache"], &creds.identity.to_string()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.svids.len(), 1);
    assert_eq!(r.svids[0].spiffe_id, creds.identity.to_string());
    assert_eq!(
        s.ca.asked.lock().unwrap().as_slice(),
        [vec!["db".to_string(), "cache".to_string()]]
    );
    let token = r.svids[0].svid.clone();

    // No JWT bundle yet: the bundle stream is Unavailable and nothing validates.
    assert_eq!(
        c.fetch_jwt_bundles(ok(JwtBundlesRequest {}))
            .await
            .unwrap_err()
            .code(),
        Code::Unavailable
    );
    let validate = |aud: &str, svid: &str| {
        ok(ValidateJwtsvidRequest {
            audience: aud.into(),
            svid: svid.into(),
        })
    };
    assert_eq!(
        c.validate_jwtsvid(validate("db", &token))
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );
    s.jwt.send_replace(Some(Arc::new(s.ca.bundle(1))));
    let v = c
        .validate_jwtsvid(validate("db", &token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.spiffe_id, creds.identity.to_string());
    let claims = v.claims.unwrap();
    assert!(claims.fields.contains_key("exp") && claims.fields.contains_key("aud"));
    for (aud, svid) in [
        ("other", token.as_str()),
        ("", token.as_str()),
        ("db", ""),
        ("db", "a.b.c"),
    ] {
        assert_eq!(
            c.validate_jwtsvid(validate(aud, svid))
                .await
                .unwrap_err()
                .code(),
            Code::InvalidArgument,
            "{aud:?} {svid:?}"
        );
    }

    // The bundle stream: keyed by trust domain ID, pushed again when the set changes.
    let mut st = c
        .fetch_jwt_bundles(ok(JwtBundlesRequest {}))
        .await
        .unwrap()
        .into_inner();
    let first = st.message().await.unwrap().unwrap();
    assert_eq!(
        first.bundles.keys().collect::<Vec<_>>(),
        ["spiffe://cluster.local"]
    );
    let doc: serde_json::Value =
        serde_json::from_slice(&first.bundles["spiffe://cluster.local"]).unwrap();
    assert_eq!(doc["keys"][0]["use"], "jwt-svid");
    s.jwt.send_replace(Some(Arc::new(s.ca.bundle(2))));
    let second = tokio::time::timeout(Duration::from_secs(5), st.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let doc: serde_json::Value =
        serde_json::from_slice(&second.bundles["spiffe://cluster.local"]).unwrap();
    assert_eq!(doc["spiffe_sequence"], 2);

    // The CA failing: its PermissionDenied passes through, anything else is Unavailable.
    for (ca_code, want) in [
        (Code::Unavailable, Code::Unavailable),
        (Code::Internal, Code::Unavailable),
        (Code::PermissionDenied, Code::PermissionDenied),
    ] {
        *s.ca.fail.lock().unwrap() = Some(ca_code);
        assert_eq!(
            c.fetch_jwtsvid(jwt_req(&["db"], ""))
                .await
                .unwrap_err()
                .code(),
            want
        );
    }
    *s.ca.fail.lock().unwrap() = None;
    assert!(
        c.fetch_jwtsvid(jwt_req(&["db"], "")).await.is_ok(),
        "serving goes on"
    );
    s.stop().await;
    ca.stop().await;
}

/// The socket is 0600 by default and as configured otherwise; a stale socket from an earlier
/// run is replaced, a regular file in its place is not.
#[tokio::test]
async fn the_socket_has_its_mode_and_replaces_only_a_stale_socket() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("run/api.sock");
    let s = Served::start(&path, None, None, 0o600).await;
    assert_eq!(file_mode(&path), 0o600);
    assert_eq!(file_mode(path.parent().unwrap()), 0o700);
    s.stop().await;
    assert!(path.exists(), "the stopped server's socket stays behind");
    let s = Served::start(&path, None, None, 0o660).await;
    assert_eq!(file_mode(&path), 0o660);
    let mut c = client(&path).await;
    assert_eq!(
        c.fetch_x509svid(ok(X509svidRequest {}))
            .await
            .unwrap_err()
            .code(),
        Code::Unavailable,
        "the new server answers on the replaced socket"
    );
    s.stop().await;

    let file = tmp.path().join("precious");
    std::fs::write(&file, "data").unwrap();
    let (api_tx, api_rx) = watch::channel(None);
    let (_jwt_tx, jwt_rx) = watch::channel(None);
    let api = WorkloadApi::new(
        api_rx,
        jwt_rx,
        FakeCa::new(),
        citadel::clock::system(),
        AgentStats::new(),
        None,
    );
    let (_t, sd) = shutdown::channel();
    let err = workload::serve(&file, 0o600, api, sd).await.unwrap_err();
    assert!(err.contains("not a socket"), "{err}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "data");
    drop(api_tx);
}

/// gRPC server reflection on the same socket lists and describes SpiffeWorkloadAPI.
#[tokio::test]
async fn reflection_describes_the_workload_api() {
    use prost::Message;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let tmp = tempfile::tempdir().unwrap();
    let s = Served::start(&tmp.path().join("api.sock"), None, None, 0o600).await;
    let mut r = ServerReflectionClient::new(uds_channel(s.path.clone()).await);
    let ask = |m: MessageRequest| {
        tokio_stream::iter([ServerReflectionRequest {
            host: String::new(),
            message_request: Some(m),
        }])
    };
    let mut st = r
        .server_reflection_info(ask(MessageRequest::ListServices(String::new())))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        st.message().await.unwrap().unwrap().message_response
    else {
        panic!("not a list")
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&"SpiffeWorkloadAPI"), "{names:?}");

    let mut st = r
        .server_reflection_info(ask(MessageRequest::FileContainingSymbol(
            "SpiffeWorkloadAPI".into(),
        )))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::FileDescriptorResponse(files)) =
        st.message().await.unwrap().unwrap().message_response
    else {
        panic!("not a file descriptor")
    };
    let file =
        prost_types::FileDescriptorProto::decode(&files.file_descriptor_proto[0][..]).unwrap();
    assert_eq!(file.package(), "", "no proto package");
    let methods: Vec<_> = file.service[0].method.iter().map(|m| m.name()).collect();
    assert_eq!(
        methods,
        [
            "FetchX509SVID",
            "FetchX509Bundles",
            "FetchJWTSVID",
            "FetchJWTBundles",
            "ValidateJWTSVID"
        ]
    );
    s.stop().await;
}

/// A CA's `citadel.v1.JwtSvidService` stand-in on loopback: signs with `FakeCa`'s key for
/// callers presenting `token`, refuses others (Unauthenticated).
mod fake_service {
    use super::*;
    use citadel::jwtsvid_proto::jwt_svid_service_server::{JwtSvidService, JwtSvidServiceServer};
    use citadel::jwtsvid_proto::*;
    use tonic::{Request, Response, Status};

    pub struct Svc {
        pub ca: Arc<FakeCa>,
        pub token: String,
        pub trust_domain: String,
    }

    impl Svc {
        fn check<T>(&self, r: &Request<T>) -> Result<(), Status> {
            let want = format!("Bearer {}", self.token);
            match r.metadata().get("authorization") {
                Some(v) if v.as_bytes() == want.as_bytes() => Ok(()),
                _ => Err(Status::unauthenticated("no token")),
            }
        }
    }

    #[tonic::async_trait]
    impl JwtSvidService for Svc {
        async fn fetch_jwt_svid(
            &self,
            r: Request<FetchJwtSvidRequest>,
        ) -> Result<Response<FetchJwtSvidResponse>, Status> {
            self.check(&r)?;
            let r = r.into_inner();
            let exp = now() + 300;
            let token = self.ca.key.sign(&serde_json::json!({
                "sub": r.spiffe_id, "aud": r.audience, "exp": exp, "iat": now()
            }));
            Ok(Response::new(FetchJwtSvidResponse {
                spiffe_id: r.spiffe_id,
                token,
                expires_at: exp,
            }))
        }

        async fn fetch_jwt_bundle(
            &self,
            r: Request<FetchJwtBundleRequest>,
        ) -> Result<Response<FetchJwtBundleResponse>, Status> {
            self.check(&r)?;
            let b = self.ca.bundle(7);
            Ok(Response::new(FetchJwtBundleResponse {
                trust_domain: self.trust_domain.clone(),
                jwks: b.jwks_json,
                sequence: b.sequence,
            }))
        }
    }

    /// Serves `svc` on 127.0.0.1 (plaintext); returns the address.
    pub async fn serve(svc: Svc) -> String {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(JwtSvidServiceServer::new(svc))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l)),
        );
        addr
    }
}

/// The agent's real CA client for JWT-SVIDs (`agent::jwt::CaJwt`: the bearer token renewal
/// uses, the answer checked) over the network to a stand-in `JwtSvidService`, with the
/// bundle kept by `agent::jwt::follow`; then go-spiffe's and py-spiffe's JWT calls
/// (FetchJWTSVID, FetchJWTBundles, local validation, ValidateJWTSVID) on the socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_svids_through_the_agents_ca_client_reach_real_clients() {
    use citadel::agent::jwt::{follow, CaJwt};
    let ca = TestCa::start(&[]).await;
    let creds = real_creds(&ca, "cart", 1).await;
    let tmp = tempfile::tempdir().unwrap();
    let token_file = tmp.path().join("token");
    let token = self::token("shop", "cart");
    std::fs::write(&token_file, &token).unwrap();
    let fake = FakeCa::new();
    let cfg = |addr: String| FetchConfig {
        ca_addr: addr,
        ca_root_pem: vec![],
        ca_root_file: None,
        tls_server_name: None,
        token_file: Some(token_file.clone()),
        trust_domain: td(),
        identity: None,
        key_type: KeyType::EcP256,
        cert_ttl: Duration::from_secs(3600),
        plaintext: true,
    };
    let addr = fake_service::serve(fake_service::Svc {
        ca: fake.clone(),
        token: token.clone(),
        trust_domain: "cluster.local".into(),
    })
    .await;
    let jwt_ca = Arc::new(CaJwt::new(cfg(addr), citadel::clock::system()));

    // Directly: the bundle of another trust domain, or a token the CA refuses, are errors.
    let foreign = fake_service::serve(fake_service::Svc {
        ca: fake.clone(),
        token: token.clone(),
        trust_domain: "other.org".into(),
    })
    .await;
    let err = CaJwt::new(cfg(foreign), citadel::clock::system())
        .fetch_jwt_bundle(&creds)
        .await
        .expect_err("another trust domain's bundle is refused");
    assert!(err.to_string().contains("other.org"), "{err}");
    let strict = fake_service::serve(fake_service::Svc {
        ca: fake.clone(),
        token: "another".into(),
        trust_domain: "cluster.local".into(),
    })
    .await;
    let err = CaJwt::new(cfg(strict), citadel::clock::system())
        .fetch_jwt_svid(&creds, vec!["db".into()])
        .await
        .err()
        .expect("refused");
    assert!(
        matches!(
            &err,
            FetchError::Client(ClientError::Rpc {
                code: Code::Unauthenticated,
                ..
            })
        ),
        "{err}"
    );

    let path = tmp.path().join("api.sock");
    let s = Served::start_with(
        &path,
        Some(creds.clone()),
        None,
        0o600,
        fake,
        jwt_ca.clone(),
    )
    .await;
    let (_stop, sd) = shutdown::channel();
    tokio::spawn(follow(
        jwt_ca,
        s.creds.subscribe(),
        s.jwt.clone(),
        Duration::from_secs(60),
        sd,
    ));
    let mut jwt_rx = s.jwt.subscribe();
    tokio::time::timeout(Duration::from_secs(10), jwt_rx.wait_for(|b| b.is_some()))
        .await
        .expect("the follower fetched the bundle")
        .unwrap();
    assert_eq!(s.jwt.borrow().as_ref().unwrap().sequence, 7);

    let mut c = client(&path).await;
    let r = c
        .fetch_jwtsvid(ok(JwtsvidRequest {
            audience: vec!["db".into()],
            spiffe_id: String::new(),
        }))
        .await
        .unwrap()
        .into_inner();
    let v = c
        .validate_jwtsvid(ok(ValidateJwtsvidRequest {
            audience: "db".into(),
            svid: r.svids[0].svid.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.spiffe_id, creds.identity.to_string());

    let endpoint = format!("unix://{}", path.display());
    let id = creds.identity.to_string();
    real_clients_check_jwt(&endpoint, &id).await;
    s.stop().await;
    ca.stop().await;
}

/// go-spiffe's and py-spiffe's JWT checks (FetchJWTSVID for "db", FetchJWTBundles, local
/// validation, ValidateJWTSVID, another audience refused) against the socket at `endpoint`.
async fn real_clients_check_jwt(endpoint: &str, id: &str) {
    if let Some(bin) = real_client("CITADEL_GOWORKLOAD", "the go-spiffe Workload API client") {
        let mut cmd = tokio::process::Command::new(bin);
        cmd.args([
            "jwt",
            "-audience",
            "db",
            "-timeout",
            "30s",
            "-socket",
            endpoint,
        ]);
        let mut out = Lines::spawn(cmd);
        let v = out.until("go-spiffe's JWT check", 40, |_| true).await;
        assert_eq!(v["id"], id);
        assert_eq!(v["remote_id"], id);
        assert_eq!(v["audience"], serde_json::json!(["db"]));
        assert!(out.child.wait().await.unwrap().success());
    }
    if let Some(py) = real_client("CITADEL_PYSPIFFE_PYTHON", "py-spiffe") {
        let mut cmd = tokio::process::Command::new(py);
        cmd.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/pyworkload/watch.py"))
            .args(["jwt", "--audience", "db"])
            .env("SPIFFE_ENDPOINT_SOCKET", endpoint);
        let mut out = Lines::spawn(cmd);
        let v = out.until("py-spiffe's JWT check", 40, |_| true).await;
        assert_eq!(v["id"], id);
        assert_eq!(v["remote_id"], id);
        assert!(out.child.wait().await.unwrap().success());
    }
}

// --- real clients written by others -------------------------------------------------------

/// A Workload API client program, or None (skip; under CI=true a missing one fails).
fn real_client(var: &str, what: &str) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(var).map(PathBuf::from) {
        assert!(p.exists(), "{var}={} does not exist", p.display());
        return Some(p);
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{what} is required under CI=true ({var}); run scripts/test.sh"
    );
    eprintln!("SKIPPED: {what} not available (set {var}; scripts/test.sh provides it)");
    None
}

/// A CA with 10 s leaves and a `citadel agent` serving the Workload API for shop/cart, its
/// socket given by SPIFFE_ENDPOINT_SOCKET (which our CLI honours too).
struct Mesh {
    ca: TestCa,
    agent: tokio::process::Child,
    socket: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Mesh {
    async fn start() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let ca = TestCa::start_in(
            tmp.path(),
            &[
                "--default-ttl",
                "10s",
                "--max-ttl",
                "12s",
                "--reconcile-interval",
                "200ms",
                "--clock-skew-margin",
                "1s",
            ],
        )
        .await;
        let token = tmp.path().join("cart.jwt");
        std::fs::write(&token, self::token("shop", "cart")).unwrap();
        let socket = tmp.path().join("spiffe/agent.sock");
        let log = std::fs::File::create(tmp.path().join("agent.log")).unwrap();
        let agent = tokio::process::Command::new(BIN)
            .args([
                "agent",
                "--ca-addr",
                &ca.addr.to_string(),
                "--tls-server-name",
                "localhost",
            ])
            .arg("--ca-root-cert")
            .arg(ca.state_dir().join("root-cert.pem"))
            .arg("--token-file")
            .arg(&token)
            .args([
                "--cert-ttl",
                "10s",
                "--retry-initial",
                "200ms",
                "--retry-max",
                "2s",
            ])
            .args(["--metrics-listen", "", "--jwt-bundle-refresh", "2s"])
            .env(
                "SPIFFE_ENDPOINT_SOCKET",
                format!("unix://{}", socket.display()),
            )
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        eventually("the agent's Workload API socket", 20, async || {
            socket.exists()
        })
        .await;
        Mesh {
            ca,
            agent,
            socket,
            _tmp: tmp,
        }
    }

    fn endpoint(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    async fn stop(mut self) {
        let _ = self.agent.kill().await;
        self.ca.stop().await;
    }
}

/// JSON lines from a client program's stdout.
struct Lines {
    child: tokio::process::Child,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
    seen: Vec<serde_json::Value>,
}

impl Lines {
    fn spawn(mut cmd: tokio::process::Command) -> Self {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        Lines {
            child,
            lines: tokio::io::BufReader::new(out).lines(),
            seen: vec![],
        }
    }

    /// The first line from now on that satisfies `pred`, within `secs`.
    async fn until(
        &mut self,
        what: &str,
        secs: u64,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let line = tokio::time::timeout_at(deadline, self.lines.next_line())
                .await
                .unwrap_or_else(|_| {
                    panic!("{what}: not within {secs}s; lines so far: {:#?}", self.seen)
                })
                .unwrap()
                .unwrap_or_else(|| panic!("{what}: the client exited; lines: {:#?}", self.seen));
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            self.seen.push(v.clone());
            if pred(&v) {
                return v;
            }
        }
    }
}

fn roots(v: &serde_json::Value) -> Vec<String> {
    v["roots"]
        .as_array()
        .map(|a| a.iter().map(|r| r.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

/// What both real clients must see: the SVID (verified by the client), a renewed one, then
/// the old AND the new root during a root rotation, in an SVID update after renewal.
async fn renewal_and_rotation_reach(mesh: &Mesh, mut out: Lines) {
    let want_id = spiffe("shop", "cart").to_string();
    let is_svid = |v: &serde_json::Value| v["kind"] == "svid";
    let first = out.until("the first X.509-SVID", 30, is_svid).await;
    assert_eq!(first["id"], want_id.as_str());
    assert!(
        first.get("verified").is_some(),
        "the client verified it: {first}"
    );
    let first_roots = roots(&first);
    assert_eq!(first_roots.len(), 1);
    let serial = first["serial"].clone();
    let renewed = out
        .until("a renewed X.509-SVID", 30, |v| {
            is_svid(v) && v["serial"] != serial
        })
        .await;
    assert_eq!(renewed["id"], want_id.as_str());
    assert!(renewed.get("verified").is_some(), "{renewed}");

    // A root rotation, staged slowly enough that both roots are trusted for a while.
    citadel_ok(
        &[
            "ca",
            "rotate-root",
            "--activate-after",
            "40s",
            "--retire-after",
            "40s",
            "--max-ttl",
            "12s",
            "--clock-skew-margin",
            "1s",
        ],
        &mesh.ca.state_dir(),
    );
    let both = out
        .until("an X.509-SVID with both roots", 40, |v| {
            is_svid(v) && roots(v).len() == 2
        })
        .await;
    assert!(
        roots(&both).contains(&first_roots[0]),
        "the old root is still trusted: {both}"
    );
    assert!(both.get("verified").is_some(), "{both}");
}

/// go-spiffe v2.9.0's `workloadapi` (WatchX509Context, WatchX509Bundles) through renewal and
/// a root rotation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_spiffe_receives_renewals_and_both_roots_during_rotation() {
    let Some(bin) = real_client("CITADEL_GOWORKLOAD", "the go-spiffe Workload API client") else {
        return;
    };
    let mesh = Mesh::start().await;
    let mut cmd = tokio::process::Command::new(bin);
    cmd.args(["x509", "-timeout", "120s", "-socket", &mesh.endpoint()]);
    let mut out = Lines::spawn(cmd);
    let bundles = out
        .until("an X.509 bundles update", 30, |v| v["kind"] == "bundles")
        .await;
    assert!(
        bundles["bundles"]["spiffe://cluster.local"].is_array(),
        "{bundles}"
    );
    renewal_and_rotation_reach(&mesh, out).await;
    mesh.stop().await;
}

/// py-spiffe's `WorkloadApiClient.stream_x509_contexts` through renewal and a root rotation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn py_spiffe_receives_renewals_and_both_roots_during_rotation() {
    let Some(py) = real_client("CITADEL_PYSPIFFE_PYTHON", "py-spiffe") else {
        return;
    };
    let mesh = Mesh::start().await;
    let mut cmd = tokio::process::Command::new(py);
    cmd.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/pyworkload/watch.py"))
        .args(["x509", "--timeout", "120"])
        .env("SPIFFE_ENDPOINT_SOCKET", mesh.endpoint());
    let out = Lines::spawn(cmd);
    renewal_and_rotation_reach(&mesh, out).await;
    mesh.stop().await;
}

/// go-spiffe's FetchJWTSVID, FetchJWTBundles, `jwtsvid.ParseAndValidate` and ValidateJWTSVID
/// against the agent and a CA serving `citadel.v1.JwtSvidService`; then py-spiffe's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_clients_fetch_and_validate_jwt_svids() {
    let mesh = Mesh::start().await;
    let id = spiffe("shop", "cart").to_string();
    real_clients_check_jwt(&mesh.endpoint(), &id).await;
    mesh.stop().await;
}
