//! Human durations for flags: `90s`, `15m`, `24h`, `90d`, and sums such as `1h30m`.
//!
//! Operators write these on command lines and in manifests; a bare number is refused because
//! "is 3600 seconds or hours?" is exactly the ambiguity that causes outages.

use std::time::Duration;

/// A flag value that is not a duration; the message shows the accepted forms.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid duration {input:?}: {reason} (use e.g. 90s, 15m, 24h, 90d or 1h30m)")]
pub struct ParseDurationError {
    input: String,
    reason: &'static str,
}

/// Parses a duration made of `<number><unit>` parts, with units `ms`, `s`, `m`, `h`, `d`.
pub fn parse(input: &str) -> Result<Duration, ParseDurationError> {
    let err = |reason| ParseDurationError {
        input: input.to_string(),
        reason,
    };
    let s = input.trim();
    if s.is_empty() {
        return Err(err("empty"));
    }
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let mut total: u64 = 0; // milliseconds
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(err("expected a number"));
        }
        let n: u64 = rest[..digits]
            .parse()
            .map_err(|_| err("number too large"))?;
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let per_unit: u64 = match &rest[..unit_len] {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            "" => return Err(err("missing unit")),
            _ => return Err(err("unknown unit")),
        };
        rest = &rest[unit_len..];
        total = n
            .checked_mul(per_unit)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(|| err("too large"))?;
    }
    Ok(Duration::from_millis(total))
}

/// Formats a duration the way [`parse`] reads it, choosing the largest exact unit.
pub fn format(d: Duration) -> String {
    let secs = d.as_secs();
    if d.subsec_millis() != 0 || secs == 0 {
        return format!("{}ms", d.as_millis());
    }
    for (unit, size) in [("d", 86_400), ("h", 3_600), ("m", 60)] {
        if secs.is_multiple_of(size) {
            return format!("{}{unit}", secs / size);
        }
    }
    format!("{secs}s")
}

/// A clap value parser.
pub fn clap_parse(s: &str) -> Result<Duration, String> {
    parse(s).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_unit_and_sums() {
        assert_eq!(parse("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse("15m").unwrap(), Duration::from_secs(900));
        assert_eq!(parse("24h").unwrap(), Duration::from_secs(86_400));
        assert_eq!(parse("90d").unwrap(), Duration::from_secs(90 * 86_400));
        assert_eq!(parse("1h30m").unwrap(), Duration::from_secs(5_400));
        assert_eq!(parse("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse("0").unwrap(), Duration::ZERO);
    }

    #[test]
    fn refuses_ambiguous_or_garbage() {
        for bad in ["", "10", "h", "5y", "-5s", "5 s", "99999999999999999999d"] {
            assert!(parse(bad).is_err(), "{bad:?} should be refused");
        }
        assert!(parse("10")
            .unwrap_err()
            .to_string()
            .contains("missing unit"));
    }

    #[test]
    fn format_round_trips() {
        for s in ["90s", "15m", "90d", "250ms"] {
            assert_eq!(format(parse(s).unwrap()), s);
        }
        // The largest exact unit wins, and parsing it back gives the same duration.
        assert_eq!(format(parse("24h").unwrap()), "1d");
        assert_eq!(format(parse("90m").unwrap()), "90m");
        assert_eq!(
            parse(&format(Duration::from_secs(3601))).unwrap(),
            Duration::from_secs(3601)
        );
    }
}
