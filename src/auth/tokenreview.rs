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

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::{Api, PostParams};

use super::{AuthFailure, AuthMethod, Authenticator, Caller, Credentials};
use crate::clock::SharedClock;
use crate::identity::{ServiceAccount, TrustDomain};
use crate::store::BoxFuture;

/// Most entries the cache holds; beyond it, expired entries are dropped, then the oldest.
const MAX_CACHE_ENTRIES: usize = 100_000;

type Key = [u8; 32];
type Shared = Arc<tokio::sync::OnceCell<Result<(Caller, i64), AuthFailure>>>;

pub struct TokenReviewAuthenticator {
    client: kube::Client,
    audiences: Vec<String>,
    trust_domain: TrustDomain,
    clock: SharedClock,
    cache_ttl: Duration,
    cache: Mutex<HashMap<Key, (Caller, i64)>>,
    inflight: Mutex<HashMap<Key, Shared>>,
    limiter: RateLimiter,
    /// TokenReviews sent to the API server.
    pub reviews: AtomicU64,
}

impl TokenReviewAuthenticator {
    pub fn new(
        client: kube::Client,
        audiences: Vec<String>,
        trust_domain: TrustDomain,
        clock: SharedClock,
        cache_ttl: Duration,
        qps: f64,
        burst: u32,
    ) -> Self {
        Self {
            client,
            audiences,
            trust_domain,
            clock,
            cache_ttl,
            cache: Mutex::new(HashMap::new()),
            inflight: Mutex::new(HashMap::new()),
            limiter: RateLimiter::new(qps, burst),
            reviews: AtomicU64::new(0),
        }
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

    async fn review(&self, token: &str) -> Result<Caller, AuthFailure> {
        self.limiter.acquire().await;
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
                AuthFailure::transient(format!(
                    "TokenReview could not be sent to the API server: {}",
                    redact(&e.to_string(), token)
                ))
            })?;
        let status = result.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            let why = status.error.unwrap_or_else(|| "not authenticated".into());
            return Err(AuthFailure::invalid(format!(
                "the API server refused the token: {}",
                redact(&why, token)
            )));
        }
        let user = status.user.unwrap_or_default();
        let groups = user.groups.unwrap_or_default();
        if !groups.iter().any(|g| g == "system:serviceaccounts") {
            return Err(AuthFailure::invalid(
                "the token is not a service-account token (group system:serviceaccounts missing)",
            ));
        }
        let username = user.username.unwrap_or_default();
        let sa = ServiceAccount::from_username(&username).map_err(AuthFailure::invalid)?;
        let extra = user.extra.unwrap_or_default();
        let first = |k: &str| extra.get(k).and_then(|v| v.first().cloned());
        Ok(Caller {
            identity: self.trust_domain.service_account_id(&sa),
            method: AuthMethod::TokenReview,
            pod_name: first("authentication.kubernetes.io/pod-name"),
            pod_uid: first("authentication.kubernetes.io/pod-uid"),
        })
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
            return Ok(c);
        }
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
}

/// A token bucket: `qps` per second, up to `burst` at once.
struct RateLimiter {
    qps: f64,
    burst: f64,
    state: tokio::sync::Mutex<(f64, Instant)>,
}

impl RateLimiter {
    fn new(qps: f64, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            qps: qps.max(0.001),
            burst,
            state: tokio::sync::Mutex::new((burst, Instant::now())),
        }
    }

    async fn acquire(&self) {
        let mut s = self.state.lock().await;
        loop {
            let now = Instant::now();
            s.0 = (s.0 + now.duration_since(s.1).as_secs_f64() * self.qps).min(self.burst);
            s.1 = now;
            if s.0 >= 1.0 {
                s.0 -= 1.0;
                return;
            }
            tokio::time::sleep(Duration::from_secs_f64((1.0 - s.0) / self.qps)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On tokio's paused clock: time only moves when the limiter sleeps.
    #[tokio::test(start_paused = true)]
    async fn rate_limiter_allows_a_burst_then_paces() {
        let l = RateLimiter::new(20.0, 5);
        let t0 = Instant::now();
        for _ in 0..5 {
            l.acquire().await;
        }
        assert_eq!(t0.elapsed(), Duration::ZERO, "the burst is immediate");
        for _ in 0..4 {
            l.acquire().await;
        }
        let e = t0.elapsed();
        assert!(
            e >= Duration::from_millis(199) && e <= Duration::from_millis(201),
            "4 more at 20/s take 200ms: {e:?}"
        );
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
