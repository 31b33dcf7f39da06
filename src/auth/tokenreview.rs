//! Kubernetes TokenReview authentication (`--auth tokenreview`), with Istio's semantics:
//! the review carries the configured audiences; the result must be authenticated, in group
//! `system:serviceaccounts`, with a username `system:serviceaccount:<ns>:<sa>`; pod name and
//! UID come from `extra`.
//!
//! Unlike istiod (one review per CSR, istio/istio#27945), positive results are cached, keyed
//! by a SHA-256 of the token (never the token), for at most `--token-cache-ttl` and never past
//! the token's own expiry; concurrent requests with the same token share one review; and
//! reviews are rate-limited (`--kube-qps`, `--kube-burst`) so a thundering herd cannot make
//! the API server throttle the whole mesh.
//!
//! The rate limit is a shared resource an attacker could queue up with garbage, delaying
//! every honest pod's first certificate. So a token only reaches the queue if it could be
//! valid (a well-formed JWS whose unverified claims are unexpired, for one of our audiences,
//! naming a service account), and nobody waits in the queue longer than
//! `--kube-review-max-wait`: past that the request fails at once with a retryable code.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::api::{Api, PostParams};

use super::jwt::{self, JwtPolicy};
use super::{jws, AuthFailure, AuthMethod, Authenticator, Caller, Credentials, Verified};
use crate::clock::SharedClock;
use crate::future::BoxFuture;
use crate::identity::{ServiceAccount, TrustDomain};

/// Most entries the cache holds; beyond it, expired entries are dropped, then the oldest.
const MAX_CACHE_ENTRIES: usize = 100_000;

type Key = [u8; 32];
type Shared = Arc<tokio::sync::OnceCell<Result<(Caller, i64), AuthFailure>>>;

/// How hard this replica may lean on the API server for reviews.
#[derive(Debug, Clone, Copy)]
pub struct ReviewLimits {
    /// Reviews per second...
    pub qps: f64,
    /// ...and how many at once.
    pub burst: u32,
    /// The longest a request waits for its turn; beyond it, Unavailable at once.
    pub max_wait: Duration,
}

impl Default for ReviewLimits {
    fn default() -> Self {
        Self {
            qps: 50.0,
            burst: 100,
            max_wait: Duration::from_secs(2),
        }
    }
}

/// Authenticates a bearer token by asking the API server (TokenReview), caching positive results.
pub struct TokenReviewAuthenticator {
    client: kube::Client,
    audiences: Vec<String>,
    /// The claim checks a token must pass before it may cost a review.
    prefilter: JwtPolicy,
    trust_domain: TrustDomain,
    clock: SharedClock,
    cache_ttl: Duration,
    cache: Mutex<HashMap<Key, (Caller, i64)>>,
    inflight: Mutex<HashMap<Key, Shared>>,
    limiter: RateLimiter,
    /// TokenReviews sent to the API server.
    pub reviews: AtomicU64,
    /// Outcomes and cache hits, shared by every authenticator of this replica (one per
    /// cluster) for the `citadel_tokenreview_*` metrics.
    stats: Arc<ReviewStats>,
}

/// What a replica's TokenReviews came to (`citadel_tokenreview_*`): operators alert on
/// reviews that could not be made (RBAC, API server down) and watch the cache carry the load.
#[derive(Default)]
pub struct ReviewStats {
    /// Tokens answered from the cache, without a review.
    pub cache_hits: AtomicU64,
    /// Reviews the API server answered for a service account of ours.
    pub authenticated: AtomicU64,
    /// Reviews the API server answered with a refusal (not authenticated, another audience,
    /// not a service account).
    pub refused: AtomicU64,
    /// Reviews that could not be made: the API server unreachable, or refusing the request
    /// itself (RBAC, throttling).
    pub errors: AtomicU64,
    /// Reviews not sent because this replica's --kube-qps queue was full.
    pub throttled: AtomicU64,
}

impl ReviewStats {
    /// Appends the Prometheus text exposition of these counters.
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let name = "citadel_tokenreview_requests_total";
        let _ = writeln!(out, "# HELP {name} TokenReviews, by result: authenticated, refused (the API server said no), error (the review could not be made), throttled (not sent: --kube-qps queue full).\n# TYPE {name} counter");
        for (result, c) in [
            ("authenticated", &self.authenticated),
            ("refused", &self.refused),
            ("error", &self.errors),
            ("throttled", &self.throttled),
        ] {
            let _ = writeln!(out, "{name}{{result=\"{result}\"}} {}", get(c));
        }
        let name = "citadel_tokenreview_cache_hits_total";
        let _ = writeln!(out, "# HELP {name} Tokens authenticated from the TokenReview cache (--token-cache-ttl), without an API call.\n# TYPE {name} counter\n{name} {}", get(&self.cache_hits));
    }
}

impl TokenReviewAuthenticator {
    /// An authenticator that sends reviews through `client` with these audiences.
    pub fn new(
        client: kube::Client,
        audiences: Vec<String>,
        trust_domain: TrustDomain,
        clock: SharedClock,
        cache_ttl: Duration,
        limits: ReviewLimits,
    ) -> Self {
        Self {
            client,
            prefilter: JwtPolicy {
                issuer: None,
                audiences: audiences.clone(),
                leeway: jwt::DEFAULT_LEEWAY,
            },
            audiences,
            trust_domain,
            clock,
            cache_ttl,
            cache: Mutex::new(HashMap::new()),
            inflight: Mutex::new(HashMap::new()),
            limiter: RateLimiter::new(limits.qps, limits.burst, limits.max_wait),
            reviews: AtomicU64::new(0),
            stats: Arc::default(),
        }
    }

    /// Counts into `stats` (shared with the replica's other authenticators and its metrics).
    pub fn with_stats(mut self, stats: Arc<ReviewStats>) -> Self {
        self.stats = stats;
        self
    }

    fn key(token: &str) -> Key {
        let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
        let mut k = [0u8; 32];
        k.copy_from_slice(d.as_ref());
        k
    }

    /// The token's own `exp` (unverified: it only shortens how long a positive review is kept).
    fn token_exp(token: &str) -> Option<i64> {
        super::jws::unverified_claims(token)?.get("exp")?.as_i64()
    }

    /// Refuses, without an API call, a token that cannot pass the review. The claims are
    /// unverified here, so passing proves nothing; failing proves the token is useless.
    fn prefilter(&self, token: &str, now: i64) -> Result<(), AuthFailure> {
        let parsed = jws::parse(token).map_err(AuthFailure::invalid)?;
        jwt::check_claims(&parsed.payload, &self.prefilter, now)
            .map(|_| ())
            .map_err(AuthFailure::invalid)
    }

    async fn review(&self, token: &str) -> Result<Caller, AuthFailure> {
        if !self.limiter.acquire().await {
            self.stats.throttled.fetch_add(1, Ordering::Relaxed);
            return Err(AuthFailure::transient(
                "too many TokenReviews are waiting for the API server; retry shortly",
            ));
        }
        self.reviews.fetch_add(1, Ordering::Relaxed);
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_string(),
                audiences: Some(self.audiences.clone()),
            },
            ..Default::default()
        };
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let result = api
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                AuthFailure::transient(format!(
                    "TokenReview could not be sent to the API server: {}",
                    redact(&e.to_string(), token)
                ))
            })?;
        let caller = caller_from_review(
            result.status.unwrap_or_default(),
            &self.audiences,
            &self.trust_domain,
        );
        let outcome = match caller {
            Ok(_) => &self.stats.authenticated,
            Err(_) => &self.stats.refused,
        };
        outcome.fetch_add(1, Ordering::Relaxed);
        caller.map_err(|e| AuthFailure::invalid(redact(&e, token)))
    }

    fn cached(&self, key: &Key, now: i64) -> Option<Caller> {
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache
            .get(key)
            .filter(|(_, until)| *until > now)
            .map(|(c, _)| c.clone())
    }

    fn remember(&self, key: Key, caller: &Caller, until: i64, now: i64) {
        if until <= now {
            return;
        }
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= MAX_CACHE_ENTRIES {
            cache.retain(|_, (_, u)| *u > now);
            if cache.len() >= MAX_CACHE_ENTRIES {
                if let Some(oldest) = cache.iter().min_by_key(|(_, (_, u))| *u).map(|(k, _)| *k) {
                    cache.remove(&oldest);
                }
            }
        }
        cache.insert(key, (caller.clone(), until));
    }

    async fn authenticate_token(&self, token: &str) -> Result<Caller, AuthFailure> {
        let key = Self::key(token);
        let now = self.clock.now().unix_timestamp();
        if let Some(c) = self.cached(&key, now) {
            self.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(c);
        }
        self.prefilter(token, now)?;
        let cell: Shared = {
            let mut inflight = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
            inflight.entry(key).or_default().clone()
        };
        // Removes the in-flight entry however this future ends, also when the RPC is
        // cancelled mid-review (otherwise garbage tokens with short deadlines would grow the
        // map without bound).
        let _guard = InflightGuard {
            map: &self.inflight,
            key,
            cell: cell.clone(),
        };
        let result = cell
            .get_or_init(|| async {
                let caller = self.review(token).await?;
                let mut until = now + self.cache_ttl.as_secs() as i64;
                if let Some(exp) = Self::token_exp(token) {
                    until = until.min(exp);
                }
                Ok((caller, until))
            })
            .await
            .clone();
        let (caller, until) = result?;
        if !self.cache_ttl.is_zero() {
            self.remember(key, &caller, until, now);
        }
        Ok(caller)
    }
}

struct InflightGuard<'a> {
    map: &'a Mutex<HashMap<Key, Shared>>,
    key: Key,
    cell: Shared,
}

impl Drop for InflightGuard<'_> {
    fn drop(&mut self) {
        let mut inflight = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if inflight
            .get(&self.key)
            .is_some_and(|c| Arc::ptr_eq(c, &self.cell))
        {
            inflight.remove(&self.key);
        }
    }
}

/// Error texts from the API server never get to echo the token.
/// What a TokenReview's status says about the caller: authenticated, for one of `audiences`,
/// a service account. Separate from the API call so the fuzzer
/// (fuzz/fuzz_targets/tokenreview.rs) reaches exactly this code. The error text may quote
/// the API server; the caller redacts the token from it.
pub fn caller_from_review(
    status: TokenReviewStatus,
    audiences: &[String],
    trust_domain: &TrustDomain,
) -> Result<Caller, String> {
    if status.authenticated != Some(true) {
        let why = status.error.unwrap_or_else(|| "not authenticated".into());
        return Err(format!("the API server refused the token: {why}"));
    }
    // The API server says which of our audiences the token is good for; a token it
    // authenticated for none of them (an authenticator that ignores audiences) is not
    // meant for this CA.
    let granted = status.audiences.unwrap_or_default();
    if !granted.iter().any(|a| audiences.contains(a)) {
        return Err(format!(
            "the API server did not confirm the token is for any of the audiences {audiences:?}"
        ));
    }
    let user = status.user.unwrap_or_default();
    let groups = user.groups.unwrap_or_default();
    if !groups.iter().any(|g| g == "system:serviceaccounts") {
        return Err(
            "the token is not a service-account token (group system:serviceaccounts missing)"
                .into(),
        );
    }
    let username = user.username.unwrap_or_default();
    let sa = ServiceAccount::from_username(&username).map_err(|e| e.to_string())?;
    let extra = user.extra.unwrap_or_default();
    let first = |k: &str| extra.get(k).and_then(|v| v.first().cloned());
    Ok(Caller {
        identity: trust_domain.service_account_id(&sa),
        method: AuthMethod::TokenReview,
        pod_name: first("authentication.kubernetes.io/pod-name"),
        pod_uid: first("authentication.kubernetes.io/pod-uid"),
        node_name: first("authentication.kubernetes.io/node-name"),
        cluster: None,
    })
}

fn redact(msg: &str, token: &str) -> String {
    if token.len() > 8 {
        msg.replace(token, "<token>")
    } else {
        msg.to_string()
    }
}

impl Authenticator for TokenReviewAuthenticator {
    fn name(&self) -> &'static str {
        "tokenreview"
    }

    fn authenticate<'a>(
        &'a self,
        creds: Credentials<'a>,
    ) -> BoxFuture<'a, Result<Option<Caller>, AuthFailure>> {
        Box::pin(async move {
            match creds.bearer {
                None => Ok(None),
                Some(t) if t.len() > super::jws::MAX_TOKEN_BYTES => {
                    Err(AuthFailure::invalid("token is too large"))
                }
                Some(t) => self.authenticate_token(t).await.map(Some),
            }
        })
    }

    /// A token whose positive review is still cached is known for free; any other costs a
    /// review (or at least a place in the review queue).
    fn verified(&self, creds: Credentials<'_>) -> Verified {
        match creds.bearer {
            None => Verified::No,
            Some(t) if t.len() > super::jws::MAX_TOKEN_BYTES => Verified::No,
            Some(t) => match self.cached(&Self::key(t), self.clock.now().unix_timestamp()) {
                Some(c) => {
                    // The caller is served on this answer: a hit, as in authenticate_token.
                    self.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
                    Verified::Caller(c)
                }
                None => Verified::Unknown,
            },
        }
    }
}

/// A token bucket: `qps` per second, up to `burst` at once, where a caller reserves its turn
/// and gives up at once if that turn is more than `max_wait` away. Reservations are taken
/// under a short lock and slept outside it, so the queue is bounded (about
/// `burst + qps * max_wait` waiters) and never a FIFO that garbage can fill.
struct RateLimiter {
    qps: f64,
    burst: f64,
    max_wait: Duration,
    /// Tokens (may go negative: reserved ahead) and when they were last refilled.
    state: Mutex<(f64, Instant)>,
}

impl RateLimiter {
    fn new(qps: f64, burst: u32, max_wait: Duration) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            qps: qps.max(0.001),
            burst,
            max_wait,
            state: Mutex::new((burst, Instant::now())),
        }
    }

    /// Waits for a turn; `false` if the turn is further away than `max_wait`.
    async fn acquire(&self) -> bool {
        let wait = {
            let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            s.0 = (s.0 + now.duration_since(s.1).as_secs_f64() * self.qps).min(self.burst);
            s.1 = now;
            let wait = if s.0 >= 1.0 {
                Duration::ZERO
            } else {
                Duration::from_secs_f64((1.0 - s.0) / self.qps)
            };
            if wait > self.max_wait {
                return false;
            }
            s.0 -= 1.0;
            wait
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On tokio's paused clock: time only moves when the limiter sleeps.
    #[tokio::test(start_paused = true)]
    async fn rate_limiter_allows_a_burst_then_paces() {
        let l = RateLimiter::new(20.0, 5, Duration::from_secs(10));
        let t0 = Instant::now();
        for _ in 0..5 {
            assert!(l.acquire().await);
        }
        assert_eq!(t0.elapsed(), Duration::ZERO, "the burst is immediate");
        for _ in 0..4 {
            assert!(l.acquire().await);
        }
        let e = t0.elapsed();
        assert!(
            e >= Duration::from_millis(199) && e <= Duration::from_millis(201),
            "4 more at 20/s take 200ms: {e:?}"
        );
    }

    /// Concurrent callers beyond what fits in `max_wait` are refused at once instead of
    /// queueing behind each other.
    #[tokio::test(start_paused = true)]
    async fn rate_limiter_refuses_turns_beyond_max_wait() {
        let l = Arc::new(RateLimiter::new(10.0, 2, Duration::from_secs(1)));
        let t0 = Instant::now();
        let tasks: Vec<_> = (0..50)
            .map(|_| {
                let l = l.clone();
                tokio::spawn(async move { (l.acquire().await, Instant::now()) })
            })
            .collect();
        let mut granted = 0;
        for t in tasks {
            let (ok, at) = t.await.unwrap();
            if ok {
                granted += 1;
                assert!(at - t0 <= Duration::from_secs(1), "waited {:?}", at - t0);
            } else {
                assert_eq!(at, t0, "a refusal is immediate");
            }
        }
        // 2 at once, then 10 more within the second.
        assert_eq!(granted, 12);
        // Once the reservations are spent, turns come back.
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(l.acquire().await);
    }

    fn offline() -> TokenReviewAuthenticator {
        // Nothing listens there: any review that is sent fails as transient.
        let cfg = kube::Config::new("https://127.0.0.1:9".parse().unwrap());
        TokenReviewAuthenticator::new(
            kube::Client::try_from(cfg).unwrap(),
            vec!["istio-ca".into()],
            TrustDomain::new("cluster.local").unwrap(),
            crate::clock::system(),
            Duration::from_secs(60),
            ReviewLimits::default(),
        )
    }

    fn token(claims: serde_json::Value) -> String {
        use base64::Engine;
        let b = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        format!(
            "{}.{}.{}",
            b(br#"{"alg":"RS256","kid":"k"}"#),
            b(claims.to_string().as_bytes()),
            b(b"not-a-signature")
        )
    }

    /// A stand-in API server (unit tests only; the real one is in tests/it/kube.rs) that
    /// authenticates every review as shop/cart, confirming `audiences`.
    async fn fake_api_server(audiences: serde_json::Value) -> TokenReviewAuthenticator {
        use axum::routing::post;
        let app = axum::Router::new().route(
            "/apis/authentication.k8s.io/v1/tokenreviews",
            post(move |body: axum::body::Bytes| {
                let audiences = audiences.clone();
                async move {
                    let mut review: serde_json::Value = serde_json::from_slice(&body).unwrap();
                    review["status"] = serde_json::json!({
                        "authenticated": true,
                        "audiences": audiences,
                        "user": {
                            "username": "system:serviceaccount:shop:cart",
                            "groups": ["system:serviceaccounts", "system:serviceaccounts:shop"],
                        },
                    });
                    ([("content-type", "application/json")], review.to_string())
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        TokenReviewAuthenticator::new(
            kube::Client::try_from(kube::Config::new(url.parse().unwrap())).unwrap(),
            vec!["istio-ca".into()],
            TrustDomain::new("cluster.local").unwrap(),
            crate::clock::system(),
            Duration::ZERO,
            ReviewLimits::default(),
        )
    }

    /// The review must confirm one of our audiences; an API server authenticator that
    /// ignores audiences answers with none (or others), and that token is not for us.
    #[tokio::test]
    async fn a_review_must_confirm_one_of_our_audiences() {
        crate::install_crypto_provider();
        let now = crate::clock::system().now().unix_timestamp();
        let t = token(serde_json::json!({
            "sub": "system:serviceaccount:shop:cart", "aud": ["istio-ca"], "exp": now + 3600
        }));
        let ok = fake_api_server(serde_json::json!(["istio-ca"])).await;
        let caller = ok.authenticate_token(&t).await.unwrap();
        assert_eq!(
            caller.identity.to_string(),
            "spiffe://cluster.local/ns/shop/sa/cart"
        );
        for audiences in [
            serde_json::json!(null),
            serde_json::json!([]),
            serde_json::json!(["https://kubernetes.default.svc"]),
        ] {
            let a = fake_api_server(audiences.clone()).await;
            let err = a.authenticate_token(&t).await.unwrap_err();
            assert!(
                !err.transient && err.reason.contains("audiences"),
                "{audiences}: {err:?}"
            );
            assert_eq!(a.reviews.load(Ordering::Relaxed), 1);
        }
    }

    /// Each review is counted once under its result, in the stats shared by the replica's
    /// authenticators, and a token refused before any review is counted nowhere.
    #[tokio::test]
    async fn review_results_are_counted_in_the_shared_stats() {
        crate::install_crypto_provider();
        let now = crate::clock::system().now().unix_timestamp();
        let t = token(serde_json::json!({
            "sub": "system:serviceaccount:shop:cart", "aud": ["istio-ca"], "exp": now + 3600
        }));
        let stats = Arc::new(ReviewStats::default());
        let ok = fake_api_server(serde_json::json!(["istio-ca"]))
            .await
            .with_stats(stats.clone());
        let other = fake_api_server(serde_json::json!(["vault"]))
            .await
            .with_stats(stats.clone());
        let down = offline().with_stats(stats.clone());
        ok.authenticate_token(&t).await.unwrap();
        ok.authenticate_token(&t).await.unwrap();
        other.authenticate_token(&t).await.unwrap_err();
        down.authenticate_token(&t).await.unwrap_err();
        down.authenticate_token("garbage").await.unwrap_err();
        let mut text = String::new();
        stats.render(&mut text);
        for line in [
            "citadel_tokenreview_requests_total{result=\"authenticated\"} 2\n",
            "citadel_tokenreview_requests_total{result=\"refused\"} 1\n",
            "citadel_tokenreview_requests_total{result=\"error\"} 1\n",
            "citadel_tokenreview_requests_total{result=\"throttled\"} 0\n",
            "citadel_tokenreview_cache_hits_total 0\n",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
    }

    /// Tokens that cannot be valid are refused as invalid (not retryable) without a review.
    #[tokio::test]
    async fn hopeless_tokens_never_reach_the_api_server() {
        crate::install_crypto_provider();
        let a = offline();
        let now = crate::clock::system().now().unix_timestamp();
        let sub = "system:serviceaccount:shop:cart";
        let hopeless = [
            "garbage".to_string(),
            "a.b.c".to_string(),
            token(serde_json::json!({"sub": sub, "aud": ["istio-ca"], "exp": now - 3600})),
            token(serde_json::json!({"sub": sub, "aud": ["kubernetes"], "exp": now + 3600})),
            token(serde_json::json!({"sub": sub, "aud": "istio-ca"})),
            token(serde_json::json!({"sub": "admin", "aud": "istio-ca", "exp": now + 3600})),
            token(
                serde_json::json!({"sub": sub, "aud": "istio-ca", "exp": now + 3600, "nbf": now + 3600}),
            ),
        ];
        for t in &hopeless {
            let err = a.authenticate_token(t).await.unwrap_err();
            assert!(!err.transient, "{t}: {}", err.reason);
        }
        assert_eq!(a.reviews.load(Ordering::Relaxed), 0);

        // A plausible token does cost a review (which fails here: no API server).
        let plausible =
            token(serde_json::json!({"sub": sub, "aud": ["istio-ca"], "exp": now + 3600}));
        let err = a.authenticate_token(&plausible).await.unwrap_err();
        assert!(err.transient, "{}", err.reason);
        assert_eq!(a.reviews.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn redaction_and_exp() {
        assert_eq!(
            redact("bad token abcdefghijk here", "abcdefghijk"),
            "bad token <token> here"
        );
        let t = format!("x.{}.y", {
            use base64::Engine;
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(r#"{"exp":123}"#)
        });
        assert_eq!(TokenReviewAuthenticator::token_exp(&t), Some(123));
        assert_eq!(TokenReviewAuthenticator::token_exp("garbage"), None);
    }
}
