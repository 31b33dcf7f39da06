//! Per-peer throttling of failed authentications on the CA port.
//!
//! A client that sends bad credentials in a loop costs the CA a JWT verification or a
//! TokenReview each time, and with TokenReview it competes with every honest pod for the API
//! server's rate limit. So each peer address has a bucket of allowed *failures*: a failure
//! takes one token, tokens come back at a steady rate, and a peer whose bucket is empty is
//! refused before its credentials are even looked at (ResourceExhausted, with the wait in the
//! message), until its bucket refills. Calls already in flight when the bucket empties are
//! heard, and put it in debt. Successful calls cost nothing, so a busy but honest
//! peer (ztunnel asking for every workload on its node) is never slowed.
//!
//! A peer is an IPv4 address or an IPv6 /64 ([`PeerKey`]). Sources in
//! `--throttle-exempt-cidr` (an east-west gateway, an SNAT address in front of many honest
//! clients) are never throttled. Credentials that cost nothing to check are checked before
//! the throttle applies (see `istio.rs`): a valid client certificate, or a token already in
//! the TokenReview cache, is served even from a throttled address.
//!
//! Memory is bounded: at most [`MAX_PEERS`] addresses are tracked. When the table is full,
//! entries whose bucket has refilled (peers that stopped failing) are forgotten; if none has,
//! the failures of untracked addresses share one overflow bucket, so spreading an attack over
//! many addresses does not buy unbounded failures either.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

use super::peer::{PeerKey, PeerSet};

/// Addresses tracked at once.
pub const MAX_PEERS: usize = 65_536;

/// How many failures a peer may have, and how fast it earns them back.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ThrottlePolicy {
    /// Failures a peer may make in a row before it is refused (the bucket's size); 0 turns
    /// throttling off.
    pub burst: u32,
    /// Failures per second a peer earns back.
    pub per_second: f64,
}

impl Default for ThrottlePolicy {
    /// 20 failures in a row, then one every 2 seconds: an agent with an expired token
    /// retrying with istio-agent's backoff never reaches it; a flood is cut to 0.5/s.
    fn default() -> Self {
        Self {
            burst: 20,
            per_second: 0.5,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: f64,
}

impl Bucket {
    fn refill(&mut self, p: &ThrottlePolicy, now: f64) {
        let elapsed = (now - self.at).max(0.0);
        self.tokens = (self.tokens + elapsed * p.per_second).min(f64::from(p.burst));
        self.at = now;
    }
}

/// The failure buckets of every peer.
#[derive(Debug)]
pub struct AuthThrottle {
    policy: ThrottlePolicy,
    exempt: PeerSet,
    inner: Mutex<Table>,
}

#[derive(Debug, Default)]
struct Table {
    peers: HashMap<PeerKey, Bucket>,
    overflow: Option<Bucket>,
    /// When the full table was last scanned for refilled buckets: at most once a second, so
    /// a flood from fresh addresses cannot make every request scan the whole table.
    pruned_at: Option<f64>,
}

/// A peer refused for failing too often: how long until it may try again.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Throttled {
    /// Seconds until the peer's bucket holds one failure again.
    pub retry_after_secs: f64,
}

impl AuthThrottle {
    /// Buckets under `policy` for every source not in `exempt`.
    pub fn new(policy: ThrottlePolicy, exempt: PeerSet) -> Self {
        Self {
            policy,
            exempt,
            inner: Mutex::new(Table::default()),
        }
    }

    /// Whether `peer` is outside the throttle: it is off, or the source is exempt.
    fn free(&self, peer: IpAddr) -> bool {
        self.policy.burst == 0 || self.exempt.contains(peer)
    }

    fn bucket<'a>(
        &self,
        t: &'a mut Table,
        peer: PeerKey,
        now: f64,
        create: bool,
    ) -> Option<&'a mut Bucket> {
        let p = self.policy;
        if !t.peers.contains_key(&peer) {
            if !create {
                if t.peers.len() < MAX_PEERS {
                    return None;
                }
                let b = t.overflow.as_mut()?;
                b.refill(&p, now);
                return Some(b);
            }
            if t.peers.len() >= MAX_PEERS && t.pruned_at.is_none_or(|at| now - at >= 1.0) {
                t.pruned_at = Some(now);
                t.peers.retain(|_, b| {
                    b.refill(&p, now);
                    b.tokens < f64::from(p.burst)
                });
            }
            if t.peers.len() >= MAX_PEERS {
                let b = t.overflow.get_or_insert(Bucket {
                    tokens: f64::from(p.burst),
                    at: now,
                });
                b.refill(&p, now);
                return Some(b);
            }
            t.peers.insert(
                peer,
                Bucket {
                    tokens: f64::from(p.burst),
                    at: now,
                },
            );
        }
        let b = t.peers.get_mut(&peer)?;
        b.refill(&p, now);
        Some(b)
    }

    /// Whether `peer` may be heard at `now` (seconds on any steady clock).
    pub fn check(&self, peer: IpAddr, now: f64) -> Result<(), Throttled> {
        if self.free(peer) {
            return Ok(());
        }
        let mut t = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        match self.bucket(&mut t, PeerKey::of(peer), now, false) {
            Some(b) if b.tokens < 1.0 => Err(Throttled {
                retry_after_secs: (1.0 - b.tokens) / self.policy.per_second.max(f64::MIN_POSITIVE),
            }),
            _ => Ok(()),
        }
    }

    /// Records a failed authentication by `peer` at `now`; true when this failure is the one
    /// that emptied its bucket (the moment to tell the operator, once).
    pub fn failed(&self, peer: IpAddr, now: f64) -> bool {
        if self.free(peer) {
            return false;
        }
        let mut t = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let Some(b) = self.bucket(&mut t, PeerKey::of(peer), now, true) else {
            return false;
        };
        let was_open = b.tokens >= 1.0;
        {
            // Calls already past `check` when the bucket emptied still fail into it: the
            // bucket goes into debt (at most one burst deep), so they lengthen the wait
            // instead of being free.
            b.tokens = (b.tokens - 1.0).max(-f64::from(self.policy.burst));
        }
        was_open && b.tokens < 1.0
    }

    /// Addresses currently tracked (for the `citadel_auth_throttle_peers` gauge).
    pub fn peers(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .peers
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_peer_is_refused_after_its_burst_and_earns_failures_back() {
        let t = AuthThrottle::new(
            ThrottlePolicy {
                burst: 3,
                per_second: 0.5,
            },
            PeerSet::default(),
        );
        let (bad, good) = (ip("10.0.0.1"), ip("10.0.0.2"));
        for i in 0..3 {
            assert!(t.check(bad, 0.0).is_ok());
            assert_eq!(t.failed(bad, 0.0), i == 2, "the third failure empties it");
        }
        let refused = t.check(bad, 0.0).unwrap_err();
        assert!((refused.retry_after_secs - 2.0).abs() < 1e-9);
        assert!(t.check(good, 0.0).is_ok(), "other peers are not affected");
        assert!(t.check(bad, 1.9).is_err());
        assert!(
            t.check(bad, 2.0).is_ok(),
            "one failure earned back after 2 s"
        );
        t.failed(bad, 2.0);
        assert!(t.check(bad, 2.0).is_err());
        // A call that was already in flight fails too: debt, so a longer wait.
        t.failed(bad, 2.0);
        assert!(t.check(bad, 5.9).is_err());
        assert!(t.check(bad, 6.0).is_ok());
        assert!(t.check(bad, 100.0).is_ok());
    }

    #[test]
    fn zero_burst_turns_it_off() {
        let t = AuthThrottle::new(
            ThrottlePolicy {
                burst: 0,
                per_second: 1.0,
            },
            PeerSet::default(),
        );
        for _ in 0..100 {
            t.failed(ip("10.0.0.1"), 0.0);
        }
        assert!(t.check(ip("10.0.0.1"), 0.0).is_ok());
        assert_eq!(t.peers(), 0);
    }

    #[test]
    fn the_table_is_bounded_and_untracked_peers_share_an_overflow_bucket() {
        let t = AuthThrottle::new(
            ThrottlePolicy {
                burst: 2,
                per_second: 1.0,
            },
            PeerSet::default(),
        );
        for i in 0..MAX_PEERS as u32 {
            t.failed(IpAddr::from(i.to_be_bytes()), 0.0);
        }
        assert_eq!(t.peers(), MAX_PEERS);
        // Every tracked bucket is still draining: a new address goes to the overflow bucket.
        let (a, b) = (ip("2001:db8:0:1::1"), ip("2001:db8:0:2::1"));
        t.failed(a, 0.0);
        t.failed(b, 0.0);
        assert!(
            t.check(ip("2001:db8:0:3::1"), 0.0).is_err(),
            "overflow drained"
        );
        assert_eq!(t.peers(), MAX_PEERS);
        // Once tracked peers have refilled, they are forgotten to make room.
        t.failed(a, 10.0);
        assert_eq!(t.peers(), 1);
        assert!(t.check(b, 10.0).is_ok());
    }

    #[test]
    fn an_ipv6_slash_64_is_one_peer_and_exempt_sources_are_never_throttled() {
        let t = AuthThrottle::new(
            ThrottlePolicy {
                burst: 2,
                per_second: 0.01,
            },
            PeerSet::new(vec!["192.0.2.0/24".parse().unwrap()]),
        );
        // Rotating addresses inside one /64 buys nothing.
        t.failed(ip("2001:db8::1"), 0.0);
        t.failed(ip("2001:db8::2"), 0.0);
        assert!(t.check(ip("2001:db8::ffff:3"), 0.0).is_err());
        assert!(t.check(ip("2001:db8:0:1::1"), 0.0).is_ok());
        // An IPv4 peer is the same through a dual-stack listener.
        t.failed(ip("10.0.0.1"), 0.0);
        t.failed(ip("::ffff:10.0.0.1"), 0.0);
        assert!(t.check(ip("10.0.0.1"), 0.0).is_err());
        for _ in 0..100 {
            assert!(!t.failed(ip("192.0.2.7"), 0.0));
        }
        assert!(t.check(ip("192.0.2.7"), 0.0).is_ok());
        assert!(t.check(ip("::ffff:192.0.2.7"), 0.0).is_ok());
        assert_eq!(t.peers(), 2, "exempt sources take no table entry");
    }
}
