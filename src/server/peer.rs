//! Who a peer is, for the per-peer limits on the CA port (the failed-authentication throttle
//! and the per-peer connection cap), and which peers are exempt from them.
//!
//! A peer is an IPv4 address, or an IPv6 /64: one host (or one customer of a provider, or
//! one Kubernetes node's pod range) is usually given a whole /64, so keying by the full
//! 128-bit address would let one machine rotate through 2^64 "peers". An IPv4-mapped IPv6
//! address (`::ffff:a.b.c.d`, what a dual-stack `[::]` listener reports for IPv4 clients)
//! is the IPv4 peer it maps.
//!
//! Exempt sources (`--throttle-exempt-cidr`) are the aggregation points an operator knows
//! about: an east-west gateway that forwards a whole remote cluster's agents, or an SNAT
//! address in front of many nodes. Their calls are still bounded by the global limits
//! (`--max-connections`, `--max-inflight`), only not by the per-peer ones.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;
use std::sync::Arc;

/// The unit per-peer limits count in: an IPv4 address, or an IPv6 /64 prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PeerKey {
    /// One IPv4 address (also an IPv4-mapped IPv6 one).
    V4(Ipv4Addr),
    /// The upper 64 bits of an IPv6 address.
    V6(u64),
}

/// `::ffff:a.b.c.d` as `a.b.c.d`; every other address as it is.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

impl PeerKey {
    /// The peer `ip` belongs to.
    pub fn of(ip: IpAddr) -> Self {
        match canonical(ip) {
            IpAddr::V4(v4) => PeerKey::V4(v4),
            IpAddr::V6(v6) => PeerKey::V6((u128::from(v6) >> 64) as u64),
        }
    }
}

impl fmt::Display for PeerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerKey::V4(a) => write!(f, "{a}"),
            PeerKey::V6(net) => write!(f, "{}/64", Ipv6Addr::from(u128::from(*net) << 64)),
        }
    }
}

/// An IP network, `ADDR/PREFIX` (a bare address is a /32 or /128).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    prefix: u8,
}

fn mask(bits: u32, prefix: u8) -> u128 {
    if prefix == 0 {
        0
    } else {
        (!0u128 << (bits - u32::from(prefix))) & (!0u128 >> (128 - bits))
    }
}

fn bits(ip: IpAddr) -> (u128, u32) {
    match ip {
        IpAddr::V4(a) => (u128::from(u32::from(a)), 32),
        IpAddr::V6(a) => (u128::from(a), 128),
    }
}

impl Cidr {
    /// Whether `ip` is in this network (an IPv4-mapped IPv6 address counts as its IPv4 one).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let (want, w) = bits(self.net);
        let (got, g) = bits(canonical(ip));
        w == g && got & mask(w, self.prefix) == want
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.net, self.prefix)
    }
}

impl FromStr for Cidr {
    type Err = String;

    /// Refuses host bits (`10.0.0.1/8`): which network was meant is a guess, and a guess
    /// that widens an exemption is the wrong kind of lenient.
    fn from_str(s: &str) -> Result<Self, String> {
        let shown: String = s.chars().take(64).collect();
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let ip: IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("{shown:?} is not ADDRESS/PREFIX (e.g. 10.20.0.0/16)"))?;
        let ip = canonical(ip);
        let (value, width) = bits(ip);
        let prefix = match prefix {
            None => width as u8,
            Some(p) => match p.trim().parse::<u8>() {
                Ok(p) if u32::from(p) <= width => p,
                _ => {
                    return Err(format!(
                        "{shown:?}: the prefix length must be a number from 0 to {width}"
                    ))
                }
            },
        };
        let masked = value & mask(width, prefix);
        if masked != value {
            let net = match ip {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::from(masked as u32)),
                IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::from(masked)),
            };
            return Err(format!(
                "{shown:?} has host bits set; the network is {net}/{prefix}"
            ));
        }
        Ok(Cidr { net: ip, prefix })
    }
}

/// The sources exempt from per-peer limits (`--throttle-exempt-cidr`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerSet(Arc<[Cidr]>);

impl PeerSet {
    /// The set of these networks.
    pub fn new(nets: Vec<Cidr>) -> Self {
        Self(nets.into())
    }

    /// Whether `ip` is in one of the networks.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|c| c.contains(ip))
    }

    /// The networks, for the start-up log.
    pub fn nets(&self) -> &[Cidr] {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_peer_is_an_ipv4_address_or_an_ipv6_slash_64() {
        assert_eq!(
            PeerKey::of(ip("10.0.0.1")),
            PeerKey::of(ip("::ffff:10.0.0.1"))
        );
        assert_ne!(PeerKey::of(ip("10.0.0.1")), PeerKey::of(ip("10.0.0.2")));
        assert_eq!(
            PeerKey::of(ip("2001:db8:1:2::1")),
            PeerKey::of(ip("2001:db8:1:2:ffff:ffff:ffff:ffff"))
        );
        assert_ne!(
            PeerKey::of(ip("2001:db8:1:2::1")),
            PeerKey::of(ip("2001:db8:1:3::1"))
        );
        assert_eq!(
            PeerKey::of(ip("2001:db8:1:2::7")).to_string(),
            "2001:db8:1:2::/64"
        );
        assert_eq!(PeerKey::of(ip("::ffff:10.0.0.1")).to_string(), "10.0.0.1");
    }

    #[test]
    fn cidrs_parse_strictly_and_match() {
        let c: Cidr = "10.20.0.0/16".parse().unwrap();
        assert!(c.contains(ip("10.20.255.1")));
        assert!(c.contains(ip("::ffff:10.20.0.9")));
        assert!(!c.contains(ip("10.21.0.1")));
        assert!(!c.contains(ip("::1")));
        let one: Cidr = "127.0.0.2".parse().unwrap();
        assert_eq!(one.to_string(), "127.0.0.2/32");
        assert!(one.contains(ip("127.0.0.2")) && !one.contains(ip("127.0.0.3")));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(ip("192.0.2.1")) && !all.contains(ip("2001:db8::1")));
        let v6: Cidr = "2001:db8::/32".parse().unwrap();
        assert!(v6.contains(ip("2001:db8:ffff::1")) && !v6.contains(ip("2001:db9::1")));
        assert!("::/0".parse::<Cidr>().unwrap().contains(ip("2001:db8::1")));
        for (bad, says) in [
            ("10.0.0.1/8", "10.0.0.0/8"),
            ("10.0.0.0/33", "0 to 32"),
            ("2001:db8::/129", "0 to 128"),
            ("10.0.0.0/x", "prefix"),
            ("example.com/8", "ADDRESS/PREFIX"),
            ("", "ADDRESS/PREFIX"),
        ] {
            let e = bad.parse::<Cidr>().unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
        let set = PeerSet::new(vec![c, one]);
        assert!(set.contains(ip("127.0.0.2")) && set.contains(ip("10.20.1.1")));
        assert!(!set.contains(ip("127.0.0.1")));
        assert!(!PeerSet::default().contains(ip("127.0.0.1")));
    }
}
