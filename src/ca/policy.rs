//! Workload TTL rules, as istiod applies them.

use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TtlPolicy {
    /// Used when the request asks for 0 or a negative duration.
    pub default: Duration,
    /// A request above this is rejected, not clamped: a silently shorter certificate makes an
    /// agent renew at the wrong time.
    pub max: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("requested TTL {requested_secs}s exceeds the maximum of {max_secs}s")]
pub struct TtlError {
    pub requested_secs: i64,
    pub max_secs: u64,
}

impl Default for TtlPolicy {
    fn default() -> Self {
        Self {
            default: Duration::from_secs(24 * 3600),
            max: Duration::from_secs(90 * 24 * 3600),
        }
    }
}

impl TtlPolicy {
    /// Turns `validity_duration` (seconds, from the request) into the TTL to issue.
    pub fn resolve(&self, requested_secs: i64) -> Result<Duration, TtlError> {
        if requested_secs <= 0 {
            return Ok(self.default);
        }
        let requested = Duration::from_secs(requested_secs as u64);
        if requested > self.max {
            return Err(TtlError {
                requested_secs,
                max_secs: self.max.as_secs(),
            });
        }
        Ok(requested)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn istiod_ttl_rules() {
        let p = TtlPolicy::default();
        assert_eq!(p.resolve(0).unwrap(), Duration::from_secs(86_400));
        assert_eq!(p.resolve(-5).unwrap(), Duration::from_secs(86_400));
        assert_eq!(p.resolve(3600).unwrap(), Duration::from_secs(3600));
        assert_eq!(
            p.resolve(90 * 86_400).unwrap(),
            Duration::from_secs(90 * 86_400)
        );
        let e = p.resolve(90 * 86_400 + 1).unwrap_err();
        assert_eq!(e.max_secs, 90 * 86_400);
        assert!(p.resolve(i64::MAX).is_err());
    }
}
